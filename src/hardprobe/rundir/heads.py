"""The heads classify fitted, stored in RUN_DIR/heads/ so that later stages load them.

    RUN_DIR/heads/
      knn.json      the KNNClassifier's parameters (k as used, temperature, weights, backend,
                    index, nlist, nprobe, seed), n_classes, and the digests below
      knn.npz       y_fit: the (N_train,) int64 labels it votes with
      linear.json   the LinearProbe's parameters (C, seed, ...), n_classes and the digests
      linear.npz    coef_ (C, D), intercept_ (C,), mean_ (D,), scale_ (D,): its fitted state
      probs/<split>.<head>.npy  (N_split, C) float32: the probabilities classify scored with,
                    rows in `Run.split_examples(split)` order (train: kNN leave-one-out,
                    linear out-of-fold; other splits: the fitted heads; model: softmax of
                    the logits), so that later stages (diagnose) read them instead of refitting

A kNN's fitted state is its train features and labels: the features are the run's
`features/train.embedding.npy`, named by their cache key (`train_features`), and loading
builds the index from them with the stored parameters (the torch search keeps a normalised
copy; FAISS adds them chunk by chunk), which is no refit of anything learnt. The probe's
weights are stored as fitted, so explain and perturb use the very probe classify scored with.

Each .json holds `classify` (the classify stamp the head belongs to) and `train_labels` (a
digest of the labels it was fitted on): `load_heads` refuses a head whose stamp or labels are
no longer the run's (a re-classify or a change of labels since), naming the fix.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from ..core.cache import key_digest
from ..core.io import atomic_save_npy, atomic_write, read_json, write_json
from ..errors import StageOrderError
from .layout import FIT_SPLIT

HEADS_DIR = "heads"
PROBS_DIR = "probs"
STORED = ("knn", "linear")  # the heads with a state; "model" is the backbone's own logits
_LINEAR_ARRAYS = ("coef_", "intercept_", "mean_", "scale_")


def labels_digest(labels) -> str:
    return key_digest({"labels": np.asarray(labels, np.int64).tolist()})


def save_heads(run_path, fitted: dict, *, classify_key: str, train_features: str,
               train_labels, n_classes: int) -> None:
    """Write RUN_DIR/heads/ for fitted = {"knn": KNNClassifier, "linear": LinearProbe} (either
    may be absent); heads of an earlier classify that this one did not fit are removed."""
    d = Path(run_path) / HEADS_DIR
    meta = {"classify": classify_key, "train_features": train_features,
            "train_labels": labels_digest(train_labels), "n_classes": int(n_classes)}
    for name in STORED:
        if name not in fitted:
            for suffix in (".json", ".npz"):
                (d / f"{name}{suffix}").unlink(missing_ok=True)
    if "knn" in fitted:
        knn = fitted["knn"]
        params = {k: v for k, v in knn.get_params().items() if k != "device"}
        _savez(d / "knn.npz", y_fit=np.asarray(train_labels, np.int64))
        write_json(d / "knn.json", {**meta, "params": params})
    if "linear" in fitted:
        probe = fitted["linear"]
        params = {k: v for k, v in probe.get_params().items() if k != "device"}
        _savez(d / "linear.npz", **{a: np.asarray(getattr(probe, a)) for a in _LINEAR_ARRAYS})
        write_json(d / "linear.json", {**meta, "params": params})


def _savez(path: Path, **arrays) -> None:
    def write(f):
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        f.write(buf.getvalue())
    atomic_write(path, write)


def heads_current(run) -> bool:
    """Whether RUN_DIR/heads/ holds the heads of the run's current classify stamp and labels."""
    try:
        _check_all(run)
    except StageOrderError:
        return False
    return True


def stored_names(run) -> list[str]:
    return [h for h in STORED if (Path(run.path) / HEADS_DIR / f"{h}.json").exists()]


def heads_digest(run) -> str:
    """A digest of the stored heads' metadata (stamp, features, labels, parameters): two runs
    whose heads predict otherwise get other digests (perturb's cache key)."""
    d = Path(run.path) / HEADS_DIR
    return key_digest({h: read_json(d / f"{h}.json") for h in stored_names(run)})


def _check_all(run) -> dict[str, dict]:
    """{head: its .json} after checking that each belongs to the run's classify and labels."""
    d = Path(run.path) / HEADS_DIR
    stamp = run.stamps().get("classify")
    names = stored_names(run)
    if stamp is None or not names:
        raise StageOrderError(f"{run.path} has no stored heads ({d}/ is missing or empty): "
                              "run `hardprobe classify RUN_DIR` (it stores the fitted heads)")
    labels = run.split_examples(FIT_SPLIT)["label"].to_numpy()
    feature_key = run.provenance["features"][FIT_SPLIT]["key"]
    metas = {}
    for h in names:
        meta = read_json(d / f"{h}.json")
        stale = [what for what, ok in (
            ("classify stamp", meta.get("classify") == stamp),
            ("train features", meta.get("train_features") == feature_key),
            ("train labels", meta.get("train_labels") == labels_digest(labels))) if not ok]
        if stale:
            raise StageOrderError(f"{d / (h + '.json')} is stale (its {', '.join(stale)} "
                                  "differ from the run's): rerun `hardprobe classify RUN_DIR`")
        metas[h] = meta
    return metas


def load_heads(run, *, device: str = "cpu", names=STORED) -> dict:
    """{name: fitted head} of the heads classify stored ("knn": KNNClassifier, "linear":
    LinearProbe), with classify's options; nothing learnt is refitted. device: where the kNN
    search and the probe run; names: the heads wanted (those stored among them).
    StageOrderError when heads/ is missing or stale."""
    from ..heads import KNNClassifier, LinearProbe
    d = Path(run.path) / HEADS_DIR
    out = {}
    for h, meta in _check_all(run).items():
        if h not in names:
            continue
        with np.load(d / f"{h}.npz", allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        if h == "knn":
            knn = KNNClassifier(**meta["params"], device=device)
            mmap = meta["params"].get("backend") == "faiss"  # FAISS reads it chunk by chunk
            out[h] = knn.fit(run.features(FIT_SPLIT, mmap=mmap), arrays["y_fit"],
                             n_classes=meta["n_classes"])
        else:
            probe = LinearProbe(**meta["params"], device=device)
            for a in _LINEAR_ARRAYS:  # sklearn's fitted attributes, as unpickling sets them
                setattr(probe, a, arrays[a])
            probe.n_classes_ = int(meta["n_classes"])
            probe.classes_ = np.arange(probe.n_classes_)
            probe.n_features_in_ = int(arrays["coef_"].shape[1])
            out[h] = probe
    return out


def probs_path(run_path, split: str, head: str) -> Path:
    return Path(run_path) / HEADS_DIR / PROBS_DIR / f"{split}.{head}.npy"


def neighbors_path(run_path, split: str) -> Path:
    return Path(run_path) / HEADS_DIR / PROBS_DIR / f"{split}.knn_neighbors.npy"


def save_probs(run_path, probs: dict, neighbors: dict | None = None) -> None:
    """Write probs = {head: {split: (N_split, C)}} as heads/probs/<split>.<head>.npy and
    neighbors = {split: (N_split, k) train rows kNN voted with} as
    heads/probs/<split>.knn_neighbors.npy; the files of an earlier classify are removed
    first, so only this one's remain."""
    d = Path(run_path) / HEADS_DIR / PROBS_DIR
    for old in d.glob("*.npy") if d.exists() else ():
        old.unlink()
    for head, per_split in probs.items():
        for split, p in per_split.items():
            atomic_save_npy(probs_path(run_path, split, head), np.asarray(p, np.float32))
    for split, rows in (neighbors or {}).items():
        atomic_save_npy(neighbors_path(run_path, split), np.asarray(rows, np.int32))
