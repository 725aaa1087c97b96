"""The perturb stage: corruptions, occlusion and blends of a run's test images, where its
predictions break, written to the run directory.

`perturb_run(run_dir)` probes a run's model with perturbed copies of a stratified subset of its
test images and writes RUN_DIR/perturb/:

    accuracy.csv       corruption, severity, head, accuracy, n  (every head of the run)
    summary.json       clean and mean corruption accuracy per head, accuracy by severity and by
                       corruption, Spearman(clean hardness, flip severity) as
                       depth.rank_correlation writes it ({"rho", "p", "n"}; rho and p None
                       when undefined), the classes that break first, occlusion / erasing /
                       blend summaries, sources, seconds
    examples.parquet   one row per probed example: id, label, clean_pred, flip_severity,
                       flip_severity_<corruption>, occlusion_max_drop, erase_flip_area,
                       blend_flip_weight, blend_partner, blend_partner_id
    occlusion.npz      ids, maps (N, G, G) float32: drop of the given label's probability per
                       grey-patch position (Zeiler & Fergus 2014), grid, patch fractions
    strips.npz         the images the report shows, as probed: ids (S,) of the STRIP_EXAMPLES
                       examples with the lowest flip_severity (ties by id), severity (the
                       STRIP_SEVERITY level, else the middle computed one), corruptions, and
                       per example k: clean_<k> (H, W, 3) uint8 and <corruption>_<k> the same
                       image corrupted at that severity (its own per-example random draw)

and joins the per-example columns (flip_severity, flip_severity_<corruption>,
occlusion_max_drop, erase_flip_area, blend_flip_weight) into RUN_DIR/examples.parquet; rows
outside the subset get NaN.

Definitions (primary head = the model's own classifier, else the linear probe, else k-NN; every
flip is a change of the primary head's prediction away from its prediction on the clean image):

    flip_severity_<c>  lowest severity at which corruption c flips the prediction; 6 = never
                       (at none of the severities computed)
    flip_severity      mean of flip_severity_<c> over the corruptions computed
    occlusion_max_drop largest drop of p(given label) over the grey-patch positions (can be < 0)
    erase_flip_area    smallest erased share of the image (ERASE_AREAS) that flips; 1.0 = never
    blend_flip_weight  smallest weight w of (1-w)*image + w*partner (BLEND_WEIGHTS) that flips;
                       1.0 = never

Heads: the run's own, as `classify` fitted and stored them in RUN_DIR/heads/ (every head
option, knn_backend included; nothing is refitted: `rundir.heads.load_heads`), applied to the
features of the perturbed test images rounded to the run's feature dtype, as the clean ones
are (float16 with --feature-dtype float16: like with like, see run_heads.RunHeads). Perturbed images go through the backbone's own preprocessing and the
batched forward of `features.py` (`_forward_indices`: uint8 resize/crop, batched normalise,
channels_last, inference_mode, the run's precision).

Cost: 75 forward passes per example for 15 corruptions x 5 severities, plus G*G = 49
(occlusion), 7 (erasing) and 9 (blend); bounded by `subset`. The embeddings (and logits) of each
(corruption, severity, subset ids, images, backbone, precision) are cached as a CacheEntry under
the run's cache dir (its N x D float32 arrays: 75 x N x D x 4 bytes for all corruptions), and
occlusion / erasing / blend results per (subset, backbone, heads), so a rerun costs the lookups.

The corruptions, their sources and their random draws: see corruptions.py; the image operations
and flip searches: probes.py.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from ...core.stats import stratified_subset
from ...errors import PerturbError
from .cifar10c import CIFAR10C
from .corruptions import (
    CORRUPTION_NOTES,
    CORRUPTIONS,
    SEVERITIES,
    check_corruptions,
    check_severities,
)
from .frost_textures import _frost_key, _frost_textures, frost_source
from .probes import (
    BLEND_WEIGHTS,
    ERASE_AREAS,
    ERASE_ASPECT,
    NEVER,
    OCCLUSION_GREY,
    OCCLUSION_GRID,
    OCCLUSION_PATCH,
    _Corrupted,
    _forward,
    _Plain,
    blend_flip_weights,
    erase_flip_areas,
    lowest_flip,
    occlusion_sensitivity,
)
from .run_heads import TRAIN, RunHeads

log = logging.getLogger(__name__)

OUT_DIR = "perturb"
PERTURB_VERSION = 1
TEST = "test"
STRIP_EXAMPLES = 4  # examples stored as clean-vs-corrupted strips for the report
STRIP_SEVERITY = 3


# ------------------------------------------------------------------ the stage
def perturb_columns(corruptions=CORRUPTIONS) -> list[str]:
    """The per-example columns perturb_run joins into examples.parquet (all it may write)."""
    return (["flip_severity"] + [f"flip_severity_{c}" for c in corruptions]
            + ["occlusion_max_drop", "erase_flip_area", "blend_flip_weight"])



def perturb_run(run_dir, *, subset: int | None = 2000, corruptions=None, severities=SEVERITIES,
                seed: int = 0, batch_size: int = 128, device="auto", occlusion: bool = True,
                blend: bool = True, cifar10c=None, progress: bool = True,
                num_workers: int | None = None, cache_dir=None) -> Path:
    """Corruption, occlusion (grey patch + random erasing) and blend probes of a run's test
    split -> RUN_DIR/perturb/ (see the module docstring); returns that folder.

    subset: examples probed, stratified by class with `seed` (None = all). corruptions: names
    from CORRUPTIONS (None = all 15). occlusion: grey-patch sensitivity and random erasing.
    blend: blend toward the prototype of the nearest other class. cifar10c: a CIFAR-10-C folder
    whose images replace the generated corruptions (the run must be on CIFAR-10 test, in
    order). num_workers: DataLoader workers that build the perturbed images (None: the run's
    setting). cache_dir: default the run's cache dir.
    """
    from ...rundir.layout import require
    from ...rundir.run import load_run

    t0 = time.perf_counter()
    secs: dict[str, float] = {}
    run = load_run(run_dir)
    names = check_corruptions(corruptions)
    sev = check_severities(severities)
    if int(seed) < 0:
        raise PerturbError(f"seed must be >= 0, got {seed}")
    if TEST not in run.splits or TRAIN not in run.splits:
        raise PerturbError(f"{run.path} needs a train and a test split (it has {run.splits})")
    require(run.examples.columns, "perturb")
    p = _probe_setup(run, subset, int(seed), device, batch_size, num_workers, cache_dir,
                     progress, cifar10c, sev)
    secs["setup"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    acc_rows, flip, frost_info = _corruption_probes(p, names, sev)
    secs["corruptions"] = time.perf_counter() - t1
    per_ex = p.sub[["id", "label", "label_name"]].copy()
    per_ex["clean_pred"] = p.clean_pred
    per_ex["flip_severity"] = np.mean([flip[c] for c in names], axis=0)
    for c in names:
        per_ex[f"flip_severity_{c}"] = flip[c].astype(np.int64)
    summary_extra: dict = {}
    if occlusion:
        t1 = time.perf_counter()
        summary_extra.update(_occlusion_probes(p, per_ex, run.path / OUT_DIR))
        secs["occlusion"] = time.perf_counter() - t1
    if blend:
        t1 = time.perf_counter()
        summary_extra["blend"] = _blend_probe(p, per_ex)
        secs["blend"] = time.perf_counter() - t1

    out = run.path / OUT_DIR
    acc = pd.DataFrame(acc_rows, columns=["corruption", "severity", "head", "accuracy", "n"])
    summary = _summary(run, p.heads, acc, per_ex, names, sev, p.clean_probs, p.labels, p.seed,
                       subset, p.c10c, frost_info, p.notes, p.hits)
    summary.update(summary_extra)
    _write_strips(out, per_ex, p.images, p.ids, names, sev, p.seed, p.c10c, p.rows)
    _write_outputs(run, out, acc, per_ex, names, summary, secs, t0)
    p.say(f"wrote {out} ({p.hits['computed']} computed, {p.hits['cached']} from the cache)")
    return out


@dataclass
class _Probe:
    """What every probe of one perturb run shares: the probed subset (rows of the test
    split, stratified), its clean images (H, W, 3) uint8 and predictions, the heads and the
    backbone, the forward options `fw`, and `cached(key, compute)`, which reads or fills one
    cache entry keyed by the run's inputs plus `key`."""
    run: object
    rows: np.ndarray
    sub: pd.DataFrame
    ids: list
    labels: np.ndarray
    heads: RunHeads
    clean_arrays: dict
    clean_probs: dict
    clean_pred: np.ndarray
    backbone: object
    images: list
    fw: dict
    seed: int
    c10c: object
    notes: list
    say: Callable
    cache_root: Path
    base_key: dict = field(default_factory=dict)
    hits: dict = field(default_factory=lambda: {"computed": 0, "cached": 0})

    def cached(self, key: dict, compute: Callable[[], dict]) -> dict:
        from ...core.cache import CacheEntry
        entry = CacheEntry(self.cache_root, {**self.base_key, **key})
        with entry.lock():
            if not entry.complete:
                arrays = compute()
                n = len(next(iter(arrays.values())))
                entry.write_shard(0, index=np.arange(n), **arrays)
                entry.finalize(1, meta={"n": n, "kind": key.get("kind")})
                self.hits["computed"] += 1
            else:
                self.hits["cached"] += 1
            return {k: v for k, v in entry.load().items() if k != "index"}


def _probe_setup(run, subset, seed, device, batch_size, num_workers, cache_dir, progress,
                 cifar10c, sev) -> _Probe:
    """The subset, its clean predictions and images, the backbone, the cache key's base."""
    from ...core.cache import default_cache_dir, key_digest
    from ...core.device import default_num_workers, resolve_device, resolve_precision
    cfg = run.config
    dev = resolve_device(device)
    precision = resolve_precision(cfg.precision, dev)
    if num_workers is None:
        num_workers = cfg.num_workers if cfg.num_workers is not None else default_num_workers()
    fw = dict(device=str(dev), precision=precision, batch_size=batch_size,
              num_workers=num_workers, progress=progress)
    test = run.split_examples(TEST)
    labels_all = test["label"].to_numpy()
    rows = stratified_subset(labels_all, subset, seed=seed)
    sub = test.iloc[rows].reset_index(drop=True)
    ids = sub["id"].astype(str).tolist()
    heads = RunHeads(run, cfg, device=str(dev))
    clean_arrays = {"embedding": run.features(TEST)[rows]}
    if heads.with_logits:
        clean_arrays["logits"] = run.logits(TEST)[rows]
    clean_probs = heads.probs(clean_arrays)
    say = log.info if progress else (lambda msg: None)
    say(f"{len(rows)} of {len(test)} test examples (stratified, seed {seed}); heads "
        f"{', '.join(heads.names)}, primary {heads.primary}")
    notes: list[str] = []
    c10c = None
    if cifar10c is not None:
        c10c = CIFAR10C(cifar10c)
        c10c.check_labels(labels_all, sev)
        notes.append(f"corrupted images read from CIFAR-10-C at {c10c.root}; its labels match "
                     "the run's test labels in order")
    images = [np.ascontiguousarray(t.permute(1, 2, 0).numpy()) for t in run.images(ids)]
    _size_note(images, c10c, notes)
    backbone = run.backbone()
    p = _Probe(run=run, rows=rows, sub=sub, ids=ids, labels=sub["label"].to_numpy(np.int64),
               heads=heads, clean_arrays=clean_arrays, clean_probs=clean_probs,
               clean_pred=clean_probs[heads.primary].argmax(1), backbone=backbone,
               images=images, fw=fw, seed=seed, c10c=c10c, notes=notes, say=say,
               cache_root=Path(cache_dir or cfg.cache_dir or default_cache_dir()).expanduser())
    p.base_key = {"version": PERTURB_VERSION, "backbone": backbone.describe(),
                  "precision": precision, "with_logits": heads.with_logits,
                  "images": run.provenance["dataset"]["splits"][TEST]["manifest"],
                  "ids": key_digest({"ids": ids})}
    return p


def _size_note(images, c10c, notes) -> None:
    sizes = sorted({im.shape[:2] for im in images})
    if c10c is None and sizes != [(32, 32)]:
        notes.append(f"test images are {sizes[0][0]}x{sizes[0][1]}"
                     + (" and other sizes" if len(sizes) > 1 else "")
                     + ": the CIFAR-10 parameters are pixel units for 32x32, so blurs and noise "
                       "grain are milder relative to these images than on CIFAR-10-C")


def _corruption_probes(p: _Probe, names, sev):
    """-> (accuracy rows per corruption/severity/head, {corruption: (n,) lowest flip
    severity (NEVER = never flips)}, the frost source or None)."""
    from ...core.cache import key_digest
    frost_info = frost_source() if "frost" in names and p.c10c is None else None
    if frost_info:
        _frost_textures(_frost_key())  # loaded once here, inherited by DataLoader workers
        if frost_info["kind"] == "procedural":
            p.notes.append(f"frost: {frost_info['note']}")
    heads, acc_rows, flip = p.heads, [], {}
    for c in names:
        preds = []
        for s in sev:
            if p.c10c is not None:
                key = {"kind": "cifar10c", "corruption": c, "severity": s,
                       "source": p.c10c.describe(c),
                       "rows": key_digest({"rows": p.rows.tolist()})}
                src = _Plain(list(p.c10c.images(c, s, p.rows)))
            else:
                key = {"kind": "corruption", "corruption": c, "severity": s, "seed": p.seed,
                       "frost": frost_info and [frost_info["kind"], frost_info["path"]]}
                src = _Corrupted(p.images, p.ids, c, s, p.seed)
            arrays = p.cached(key, lambda: _forward(p.backbone, src, desc=f"{c} {s}",
                                                    with_logits=heads.with_logits, **p.fw))
            probs = heads.probs(arrays)
            for h in heads.names:
                acc_rows.append({"corruption": c, "severity": s, "head": h,
                                 "accuracy": float((probs[h].argmax(1) == p.labels).mean()),
                                 "n": len(p.labels)})
            preds.append(probs[heads.primary].argmax(1))
        flip[c] = lowest_flip(p.clean_pred, np.stack(preds), sev, NEVER)
        p.say(f"{c}: " + ", ".join(f"s{r['severity']} {r['accuracy']:.3f}" for r in acc_rows
                                   if r["corruption"] == c and r["head"] == heads.primary))
    return acc_rows, flip, frost_info


def _occlusion_probes(p: _Probe, per_ex: pd.DataFrame, out_dir: Path) -> dict:
    """Grey-patch sensitivity and random erasing: fills per_ex's occlusion_max_drop and
    erase_flip_area, writes occlusion.npz, returns their summary entries."""
    from ...core.cache import key_digest
    from ...core.io import atomic_write
    p.say(f"occlusion: {OCCLUSION_GRID}x{OCCLUSION_GRID} grey patches, random erasing at "
          f"{len(ERASE_AREAS)} areas")
    hkey = {"heads": key_digest(p.heads.key)}
    clean_p = p.clean_probs[p.heads.primary][np.arange(len(p.labels)), p.labels]
    occ = p.cached({"kind": "occlusion", "grid": OCCLUSION_GRID, "patch": OCCLUSION_PATCH,
                    "grey": OCCLUSION_GREY, **hkey},
                   lambda: dict(zip(("maps", "max_drop"), occlusion_sensitivity(
                       p.backbone, p.images, p.labels, predict=p.heads.primary_probs,
                       clean_prob=clean_p, **p.fw))))
    per_ex["occlusion_max_drop"] = occ["max_drop"].astype(np.float64)
    atomic_write(out_dir / "occlusion.npz", lambda f: np.savez_compressed(
        f, ids=np.array(p.ids, dtype=str), maps=occ["maps"],
        grid=np.int64(OCCLUSION_GRID), patch=np.float64(OCCLUSION_PATCH),
        grey=np.int64(OCCLUSION_GREY)))
    er = p.cached({"kind": "erase", "areas": list(ERASE_AREAS), "aspect": list(ERASE_ASPECT),
                   "seed": p.seed, **hkey},
                  lambda: {"flip_area": erase_flip_areas(
                      p.backbone, p.images, ids=p.ids, seed=p.seed,
                      predict=p.heads.primary_probs, clean_pred=p.clean_pred, **p.fw)})
    per_ex["erase_flip_area"] = er["flip_area"]
    flipped = per_ex["erase_flip_area"] < 1.0
    return {"occlusion": {
                "grid": OCCLUSION_GRID, "patch_fraction": OCCLUSION_PATCH, "grey": OCCLUSION_GREY,
                "mean_max_drop": float(per_ex["occlusion_max_drop"].mean()),
                "median_max_drop": float(per_ex["occlusion_max_drop"].median())},
            "erase": {
                "areas": list(ERASE_AREAS), "aspect_range": list(ERASE_ASPECT),
                "fill": "uniform noise", "share_flipped": float(flipped.mean()),
                "median_flip_area": float(per_ex.loc[flipped, "erase_flip_area"].median())
                if flipped.any() else None}}


def _blend_probe(p: _Probe, per_ex: pd.DataFrame) -> dict:
    """Blend toward the nearest other class's prototype: fills per_ex's blend_flip_weight,
    blend_partner, blend_partner_id; returns the summary entry."""
    from ...core.cache import key_digest
    partner_cls, partner_ids = _blend_partners(p.run, p.clean_arrays["embedding"], p.labels)
    p.say(f"blend toward the nearest other class's prototype at {len(BLEND_WEIGHTS)} weights")
    uniq = sorted(set(partner_ids))
    decoded = dict(zip(uniq, (np.ascontiguousarray(t.permute(1, 2, 0).numpy())
                              for t in p.run.images(uniq))))
    partners = [decoded[q] for q in partner_ids]
    bl = p.cached({"kind": "blend", "weights": list(BLEND_WEIGHTS),
                   "partners": key_digest({"p": partner_ids}),
                   "heads": key_digest(p.heads.key)},
                  lambda: {"flip_weight": blend_flip_weights(
                      p.backbone, p.images, partners, predict=p.heads.primary_probs,
                      clean_pred=p.clean_pred, **p.fw)})
    per_ex["blend_flip_weight"] = bl["flip_weight"]
    per_ex["blend_partner"] = partner_cls
    per_ex["blend_partner_id"] = partner_ids
    flipped = per_ex["blend_flip_weight"] < 1.0
    return {"weights": list(BLEND_WEIGHTS),
            "partner": "the train example closest to its class centroid (its prototype), of the "
                       "class whose train centroid is most cosine-similar to the example's "
                       "embedding, among the classes other than its label",
            "share_flipped": float(flipped.mean()),
            "median_flip_weight": float(per_ex.loc[flipped, "blend_flip_weight"].median())
            if flipped.any() else None}


def strip_level(severities) -> int:
    """The severity the report's strips show: STRIP_SEVERITY when computed, else the middle."""
    sev = list(severities)
    return STRIP_SEVERITY if STRIP_SEVERITY in sev else sev[len(sev) // 2]


def _write_strips(out: Path, per_ex, images, ids, names, sev, seed, c10c, rows) -> None:
    """perturb/strips.npz (module docstring): the report shows these images, so it redraws
    nothing. Generated corruptions use each example's own draw (example_rng), as probed."""
    from ...core.io import atomic_write
    from .corruptions import corrupt, example_rng
    level = strip_level(sev)
    chosen = per_ex.sort_values(["flip_severity", "id"], kind="stable").head(STRIP_EXAMPLES)
    pos = {i: j for j, i in enumerate(ids)}
    arrays = {"ids": np.array(chosen["id"].astype(str).tolist(), dtype=str),
              "severity": np.int64(level), "corruptions": np.array(list(names), dtype=str)}
    for k, ex_id in enumerate(arrays["ids"]):
        j = pos[str(ex_id)]
        arrays[f"clean_{k}"] = images[j]
        for c in names:
            arrays[f"{c}_{k}"] = (c10c.images(c, level, [rows[j]])[0] if c10c is not None else
                                  corrupt(images[j], c, level, rng=example_rng(seed, c, ids[j])))
    atomic_write(out / "strips.npz", lambda f: np.savez_compressed(f, **arrays))


def _blend_partners(run, emb: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Per example: the class (other than its label) whose train centroid is most similar to
    its embedding, and that class's prototype = the train example most similar to the centroid."""
    from ..similarity import _unit, class_centroids
    train = run.split_examples(TRAIN)
    X, y = run.features(TRAIN), train["label"].to_numpy()
    n_classes = len(run.class_names)
    cent = class_centroids(X, y, n_classes)  # (C, D) unit, NaN rows for absent classes
    sims_train = _unit(X) @ np.nan_to_num(cent).T  # (N_train, C)
    proto = {}
    for c in range(n_classes):
        members = np.flatnonzero(y == c)
        if len(members):
            proto[c] = str(train["id"].iloc[members[np.argmax(sims_train[members, c])]])
    s = _unit(emb) @ np.nan_to_num(cent).T  # (N, C)
    s[:, [c for c in range(n_classes) if c not in proto]] = -np.inf
    s[np.arange(len(labels)), labels] = -np.inf
    if not np.isfinite(s).any(axis=1).all():
        raise PerturbError("blend needs a train example of at least one other class")
    cls = s.argmax(axis=1)
    return cls.astype(np.int64), [proto[int(c)] for c in cls]


def _summary(run, heads, acc, per_ex, names, sev, clean_probs, labels, seed, subset, c10c,
             frost_info, notes, hits) -> dict:
    from ...core.stats import rank_correlation
    class_names = run.class_names
    pa = acc.pivot_table(index=["corruption", "severity"], columns="head", values="accuracy")
    by_sev = {h: {int(s): float(acc[(acc["head"] == h) & (acc["severity"] == s)]["accuracy"]
                                .mean()) for s in sev} for h in heads.names}
    by_cor = {h: {c: float(acc[(acc["head"] == h) & (acc["corruption"] == c)]["accuracy"].mean())
                  for c in names} for h in heads.names}
    hardness = run.examples.set_index("id").loc[per_ex["id"], "hardness"].to_numpy(float)
    fs = per_ex["flip_severity"].to_numpy(float)
    flips = per_ex[[f"flip_severity_{c}" for c in names]]
    never_flipped = (flips == NEVER).all(axis=1).mean()
    per_class = per_ex.groupby("label")["flip_severity"].agg(["mean", "size"]).sort_values(
        "mean", kind="stable")
    classes = [{"class": class_names[int(k)] if 0 <= int(k) < len(class_names) else str(k),
                "label": int(k), "mean_flip_severity": float(v["mean"]), "n": int(v["size"])}
               for k, v in per_class.iterrows()]
    return {
        "split": TEST, "n": len(per_ex), "subset": subset, "seed": int(seed),
        "source": "cifar10c" if c10c is not None else "generated",
        "cifar10c": str(c10c.root) if c10c is not None else None,
        "corruptions": list(names), "severities": list(sev),
        "heads": heads.names, "primary_head": heads.primary,
        "clean_accuracy": {h: float((p.argmax(1) == labels).mean())
                           for h, p in clean_probs.items()},
        "mean_corruption_accuracy": {h: float(pa[h].mean()) for h in heads.names},
        "accuracy_by_severity": by_sev, "accuracy_by_corruption": by_cor,
        "flip_severity": {"never": NEVER, "mean": float(np.mean(fs)),
                          "share_never_flipped": float(never_flipped)},
        "hardness_flip_spearman": rank_correlation(hardness, fs),
        "classes_break_first": classes,
        "frost": frost_info,
        "corruption_notes": {c: CORRUPTION_NOTES[c] for c in names} if c10c is None else None,
        "cache": dict(hits),
        "notes": notes + [
            "flips: the primary head's prediction differs from its prediction on the clean "
            "image; flip_severity 6 = no flip at any computed severity; erase_flip_area and "
            "blend_flip_weight 1.0 = no flip",
            "heads: those classify fitted (RUN_DIR/heads/); perturbed features are rounded "
            "to the run's feature dtype, as the clean ones are"],
    }


def _write_outputs(run, out: Path, acc, per_ex, names, summary, secs, t0) -> None:
    from ...core.io import atomic_write, atomic_write_text, write_json
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "accuracy.csv", acc.to_csv(index=False))
    atomic_write(out / "examples.parquet", lambda f: per_ex.to_parquet(f, index=False))
    if "occlusion_max_drop" not in per_ex and (out / "occlusion.npz").exists():
        (out / "occlusion.npz").unlink()  # a stale map of an earlier run with occlusion
    cols = [c for c in perturb_columns(names) if c in per_ex.columns]
    run.join("perturb", per_ex[["id", *cols]])
    secs["total"] = time.perf_counter() - t0
    summary["seconds"] = {k: round(v, 2) for k, v in secs.items()}
    write_json(out / "summary.json", summary)
