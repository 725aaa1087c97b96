"""Gathering the evidence the rules read: probabilities, neighbours, class density, image
statistics, perturbation flips and the other runs' opinions. Arrays are in the row order of
`run.split_examples(split)`."""
from __future__ import annotations

import logging
import warnings

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ...core.stats import softmax
from ...data.datasets import SplitDataset
from ...errors import DiagnoseError
from ...heads import KNNClassifier, LinearProbe, cross_val_predict_proba
from ...rundir.layout import FIT_SPLIT, primary_head
from ...rundir.run import load_run
from ...scoring import image_quality
from ...scoring.duplicates import shared_groups

log = logging.getLogger(__name__)


def unit(X) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(X, np.float32))
    return torch.nn.functional.normalize(t, dim=1)


class HeadProbs:
    """Full (N, C) probabilities per head and split, computed once on demand. Read first from
    what classify scored with (`Run.head_probs`: heads/probs/<split>.<head>.npy), then from an
    older run's features/<split>.probs_<head>.npy, each used only when its shape is
    (N_split, C); else recomputed as classify does: knn leave-one-out on train (near-duplicate
    groups left out, as classify leaves them), linear out-of-fold on train (the run's folds
    and seed) and fitted on train for the other splits, model the softmax of the stored
    logits (in-sample on train when the model was trained on these images). The linear refit
    is most of this stage's time on a run without stored probabilities."""

    def __init__(self, run, n_classes: int):
        self.run, self.c, self.cfg = run, n_classes, run.config
        self.y_fit = run.split_examples(FIT_SPLIT)["label"].to_numpy()
        self._cache: dict = {}
        self.extra: dict = {}  # other per-run arrays a caller computes once (densities)
        self._knn = None

    def knn(self, split: str):
        """-> (probs (N, C), sims (N, k), train rows idx (N, k)). The neighbours need a refit
        (the index is not stored); on train it leaves out the train rows' duplicate groups
        (`exclude_groups`), so the neighbours are those classify voted with."""
        if ("knn", split) not in self._cache:
            if self._knn is None:
                k = min(self.cfg.k, len(self.y_fit) - 1)
                self._knn = KNNClassifier(k=k, temperature=self.cfg.temperature,
                                          weights=self.cfg.knn_weights).fit(
                    self.run.features(FIT_SPLIT), self.y_fit, n_classes=self.c)
            x = None if split == FIT_SPLIT else self.run.features(split)
            self._cache["knn", split] = self._knn.predict_proba_and_neighbors(
                x, exclude_self=x is None,
                exclude_groups=fit_duplicate_groups(self.run) if x is None else None)
        return self._cache["knn", split]

    def neighbors(self, split: str) -> np.ndarray:
        """(N, k) train rows of the kNN vote on `split`: classify's, when stored for this k
        (no second search: it costs as much as classify's), else from `knn`."""
        stored = self.run.knn_neighbors(split)
        want = (int((self.run.examples["split"] == split).sum()),
                min(self.cfg.k, len(self.y_fit) - 1))
        return stored.astype(np.int64) if stored is not None and stored.shape == want \
            else self.knn(split)[2]

    def get(self, head: str, split: str) -> np.ndarray:
        """(N_split, C) probabilities of `head` on `split` (higher = more likely that class)."""
        if ("probs", head, split) not in self._cache:
            stored = self._stored(head, split)
            if stored is not None:
                self._cache["probs", head, split] = stored
            elif head == "knn":
                self._cache["probs", head, split] = self.knn(split)[0]
            elif head == "model":
                self._cache["probs", head, split] = softmax(self.run.logits(split))
            else:
                self._linear()
        return self._cache["probs", head, split]

    def _stored(self, head: str, split: str) -> np.ndarray | None:
        """classify's stored probabilities, else an older run's features/ copy, or None;
        a file of the wrong shape is skipped with a warning (it belongs to other rows)."""
        want = (int((self.run.examples["split"] == split).sum()), self.c)
        old = self.run.path / "features" / f"{split}.probs_{head}.npy"
        for name, load in ((f"heads/probs/{split}.{head}.npy",
                            lambda: self.run.head_probs(split, head)),
                           (f"features/{old.name}", lambda: np.load(old) if old.exists()
                            else None)):
            arr = load()
            if arr is None:
                continue
            if arr.shape == want:
                return np.asarray(arr, np.float64)
            warnings.warn(f"diagnose: {name} has shape {arr.shape}, not {want}; "
                          "recomputing the probabilities (re-classify to store them again)")
        return None

    def _linear(self):
        probe = LinearProbe(C=self.cfg.linear_c, seed=self.cfg.seed)
        X = self.run.features(FIT_SPLIT)
        self._cache["probs", "linear", FIT_SPLIT] = cross_val_predict_proba(
            probe, X, self.y_fit, n_folds=self.cfg.folds, seed=self.cfg.seed, n_classes=self.c,
            groups=fit_duplicate_groups(self.run))
        probe.fit(X, self.y_fit, n_classes=self.c)
        for s in self.run.splits:
            if s != FIT_SPLIT:
                self._cache["probs", "linear", s] = probe.predict_proba(self.run.features(s))


def fit_duplicate_groups(run) -> np.ndarray | None:
    """(N_train,) int64 near-duplicate groups of the fit split (-1 = none) in split_examples
    order, as classify used them, or None when the table has no duplicate_group column or no
    two train examples share a group (classify then ran its heads without groups: the linear
    folds differ with groups, so None keeps them classify's)."""
    tr = run.split_examples(FIT_SPLIT)
    if "duplicate_group" not in tr:
        return None
    return shared_groups(tr["duplicate_group"].fillna(-1).to_numpy(np.int64))


def class_similarity(run, split: str, k: int, classes=None, chunk: int = 4096) -> np.ndarray:
    """(N,) mean cosine similarity of each example to its k nearest TRAIN examples of class
    classes[i] (default: its own given label; -1 = skip, NaN); a train example never counts
    itself. Higher = denser, more typical of that class."""
    tr = run.split_examples(FIT_SPLIT)
    Xt, yt = unit(run.features(FIT_SPLIT)), tr["label"].to_numpy()
    q = run.split_examples(split)
    Xq = unit(run.features(split))
    classes = q["label"].to_numpy() if classes is None else np.asarray(classes)
    out = np.full(len(q), np.nan)
    for c in np.unique(classes[classes >= 0]):
        ref_rows = np.flatnonzero(yt == c)
        rows = np.flatnonzero(classes == c)
        kk = min(k, len(ref_rows) - (split == FIT_SPLIT))
        if kk < 1:
            continue
        R = Xt[ref_rows]  # (N_c, D)
        for a in range(0, len(rows), chunk):
            r = rows[a:a + chunk]
            S = Xq[r] @ R.T  # (B, N_c)
            if split == FIT_SPLIT:  # a train query of class c is ref row pos: leave it out
                pos = np.searchsorted(ref_rows, r)
                mine = (pos < len(ref_rows)) & (ref_rows[np.minimum(pos, len(ref_rows) - 1)] == r)
                S[torch.as_tensor(np.flatnonzero(mine)), torch.as_tensor(pos[mine])] = -np.inf
            out[r] = S.topk(kk, dim=1).values.mean(1).numpy()
    return out


def _as_arrays(batch):  # module level so that DataLoader workers can pickle it
    """[(uint8 (3, H, W) tensor or None, row, error)] -> the same with numpy images: a worker
    sends a tensor through its own shared-memory segment, an array inside the batch's pickle
    (one message per batch, not one segment per image)."""
    return [(None if x is None else x.numpy(), i, err) for x, i, err in batch]


def image_stats(run, *, batch_size: int, num_workers: int, progress: bool) -> pd.DataFrame | None:
    """id + image_quality.STATS for every example of the table, or None (with a warning) when
    the run's images cannot be opened. Images of one shape are measured as one batch."""
    try:
        ds = run.dataset()
    except Exception as e:  # the images moved or changed: quality stays unknown, not invented
        warnings.warn(f"diagnose: the run's images could not be opened ({e}); image-quality "
                      "evidence is missing (low_quality stays False)")
        return None
    want = set(run.examples["id"])
    frames = []
    for name, split in ds.splits.items():
        ids = split.examples["id"].to_numpy()
        rows = np.flatnonzero(pd.Series(ids).isin(want).to_numpy())
        loader = torch.utils.data.DataLoader(SplitDataset(split, None, rows),
                                             batch_size=batch_size, num_workers=num_workers,
                                             collate_fn=_as_arrays)
        for batch in tqdm(loader, desc=f"image statistics ({name})", disable=not progress):
            ok = [(x, i) for x, i, err in batch if not err]
            shapes: dict = {}
            for x, i in ok:
                shapes.setdefault(tuple(x.shape), []).append((x, i))
            for group in shapes.values():
                arr = np.stack([x for x, _ in group]).transpose(0, 2, 3, 1)  # (B, H, W, 3)
                st = image_quality.image_statistics(arr)
                st.insert(0, "id", ids[[i for _, i in group]])
                frames.append(st)
    return pd.concat(frames, ignore_index=True) if frames else None


def other_runs(run, paths: list[str]) -> dict[str, pd.DataFrame]:
    """{name: DataFrame(id, label, pred, hardness)} of the other runs' primary heads, checked to
    hold the same images with the same labels."""
    out = {}
    ids = set(run.examples["id"])
    ref = run.examples.set_index("id")["label"]
    for p in paths:
        other = load_run(p)
        ex = other.examples
        if "hardness" not in ex:
            raise DiagnoseError(f"--with {p}: that run has no scores; run `hardprobe classify "
                                f"{p}` first")
        common = ex[ex["id"].isin(ids)]
        if len(common) < len(ex) / 2 or common.empty:
            raise DiagnoseError(f"--with {p}: only {len(common)} of its {len(ex)} examples are "
                                f"in {run.path}; --with needs runs on the same images")
        bad = (ref.loc[common["id"]].to_numpy() != common["label"].to_numpy()).sum()
        if bad:
            raise DiagnoseError(f"--with {p}: {bad} shared examples have other labels than in "
                                f"{run.path}; compare runs made with the same labels")
        head = primary_head(ex.columns)
        name = f"{other.provenance.get('backbone', {}).get('name', 'run')}@{other.path.name}"
        out[name] = pd.DataFrame({"id": common["id"].to_numpy(),
                                  "pred": common[f"pred_{head}"].to_numpy(),
                                  "hardness": common["hardness"].to_numpy(),
                                  "split": common["split"].to_numpy()})
    return out
