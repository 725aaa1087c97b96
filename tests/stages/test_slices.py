"""Slices: a planted sub-population that the model fails on is found, held out, and described."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hardprobe.scoring.image_stats import image_stats
from hardprobe.stages.diagnose.slices import SLICE_KEYS, find_slices, stratified_halves

pytestmark = pytest.mark.usefixtures("one_thread")
N_PER_CLASS, DIM, N_CLASSES = 400, 16, 3


def _data(planted: bool, seed: int = 0):
    """3 Gaussian classes in DIM-d; with planted, 20% of class 0 sits in its own sub-cluster.
    The model errs with probability p_err per example: 0.7 (to class 1) in the sub-cluster,
    0.08 elsewhere (to a random other class). -> features, labels, probs, p_err, planted."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 4, size=(N_CLASSES, DIM))
    labels = np.repeat(np.arange(N_CLASSES), N_PER_CLASS)
    feats = centers[labels] + rng.normal(size=(len(labels), DIM))
    sub = np.zeros(len(labels), bool)
    if planted:
        sub[rng.choice(N_PER_CLASS, size=N_PER_CLASS // 5, replace=False)] = True  # class 0
        feats[sub] += rng.normal(0, 3, size=DIM)  # one shift: a coherent sub-population
    p_err = np.where(sub, 0.7, 0.08)
    wrong = rng.random(len(labels)) < p_err
    other = (labels + rng.integers(1, N_CLASSES, size=len(labels))) % N_CLASSES
    pred = np.where(wrong, np.where(sub, 1, other), labels)
    probs = np.full((len(labels), N_CLASSES), 0.1)
    probs[np.arange(len(labels)), pred] = 0.8
    return feats, labels, probs, p_err, sub


def test_planted_slice_is_recovered_with_its_held_out_error_rate():
    feats, labels, probs, p_err, sub = _data(planted=True)
    names = ["cat", "dog", "frog"]
    res = find_slices(feats, labels, probs, seed=0, class_names=names,
                      ids=[f"id{i}" for i in range(len(labels))])
    assert res.slices, "the planted slice was not found"
    best = max(res.slices, key=lambda s: _jaccard(res.slice_id == s["slice_id"], sub))
    jac = _jaccard(res.slice_id == best["slice_id"], sub)
    assert jac >= 0.5, f"overlap with the planted set: Jaccard {jac:.2f}"
    assert best["slice_id"] == 0  # the worst slice is listed first
    members = (res.slice_id == best["slice_id"]) & res.held_out
    assert best["n"] == members.sum()
    # the true rate of its held-out members: the mean of their generating error probabilities
    true_rate = p_err[members].mean()
    assert best["ci_low"] <= true_rate <= best["ci_high"]
    assert best["error_rate"] == pytest.approx((probs.argmax(1) != labels)[members].mean())
    held_class0 = res.held_out & (labels == 0)
    assert best["class_error_rate"] == pytest.approx(
        (probs.argmax(1) != labels)[held_class0].mean())
    assert best["ci_low"] > best["class_error_rate"]
    assert best["pair"]["given"] == "cat" and best["pair"]["predicted"] == "dog"
    assert best["description"].startswith("cat -> dog")
    assert set(best["top_ids"]) <= {f"id{i}" for i in np.flatnonzero(res.slice_id == 0)}


def test_no_slice_without_a_planted_one():
    feats, labels, probs, _, _ = _data(planted=False, seed=1)
    res = find_slices(feats, labels, probs, seed=0)
    assert res.slices == [] and (res.slice_id == -1).all()
    assert res.settings["tested"] >= 2  # components were tested, none passed


def test_halves_are_stratified_and_seeded():
    labels = np.repeat([0, 1, 2], [10, 21, 6])
    held = stratified_halves(labels, seed=3)
    assert [int(held[labels == c].sum()) for c in range(3)] == [5, 10, 3]
    assert (held == stratified_halves(labels, seed=3)).all()
    assert (held != stratified_halves(labels, seed=4)).any()


def test_slice_description_names_its_image_statistics_and_corruption():
    feats, labels, probs, _, sub = _data(planted=True)
    rng = np.random.default_rng(0)
    stats = pd.DataFrame({"brightness": np.where(sub, 0.2, 0.5) + rng.normal(0, 0.05, len(sub)),
                          "contrast": rng.normal(0.2, 0.05, len(sub)),
                          "saturation": rng.normal(0.3, 0.05, len(sub)),
                          "sharpness": rng.normal(0.01, 0.002, len(sub))})
    flips = pd.DataFrame({"flip_severity_fog": np.where(sub, 1.0, 5.0),
                          "flip_severity_snow": np.full(len(sub), 4.0)})
    flips.iloc[::3] = np.nan  # perturb probes a subset only
    res = find_slices(feats, labels, probs, seed=0, image_stats=stats, flips=flips)
    s = res.slices[0]
    assert s["stats_z"]["brightness"] < -1 and abs(s["stats_z"]["contrast"]) < 0.5
    assert "lower brightness" in s["description"] and "contrast" not in s["description"]
    assert s["worst_corruption"]["name"] == "fog"
    assert "fog" in s["description"]


def test_image_stats_point_the_documented_way():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(3, 16, 16)).astype(np.uint8)
    base = image_stats(img)
    dark = image_stats((img * 0.3).astype(np.uint8))
    assert dark["brightness"] < base["brightness"] and dark["contrast"] < base["contrast"]
    grey = image_stats(np.repeat(img[:1], 3, axis=0))
    assert grey["saturation"] == 0.0 and base["saturation"] > 0
    blurred = (img.astype(float) + np.roll(img, 1, 1) + np.roll(img, 1, 2)
               + np.roll(img, -1, 1) + np.roll(img, -1, 2)) / 5
    assert image_stats(blurred.astype(np.uint8))["sharpness"] < base["sharpness"]
    assert image_stats(np.moveaxis(img, 0, -1)) == base  # (H, W, 3) reads the same


def test_write_slices_keeps_the_keys_the_report_reads(tmp_path):
    from hardprobe.stages.diagnose.slices import write_slices
    feats, labels, probs, _, _ = _data(planted=True)
    res = find_slices(feats, labels, probs, seed=0, ids=[f"id{i}" for i in range(len(labels))])

    class _Run:  # write_slices needs only the run's folder
        path = tmp_path
    write_slices(_Run(), res)
    rows = json.loads((tmp_path / "slices" / "slices.json").read_text())
    assert rows and all(set(SLICE_KEYS) <= set(r) for r in rows)
    table = pd.read_parquet(tmp_path / "slices" / "assignments.parquet")
    assert len(table) == len(labels) and (table["slice_id"].to_numpy() == res.slice_id).all()


def _jaccard(a, b) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


# ---- through the diagnose stage: a run whose test split holds a planted failing slice
RUN_TRAIN, RUN_TEST, N_SUB = 40, 150, 30  # per class; N_SUB of class cat's test images


def _plant(run_dir):
    """Features of 3 Gaussian classes (cat's first N_SUB test images shifted together), and
    logits of a model that errs with probability 0.7 (to dog) on them, 0.05 elsewhere.
    -> (planted (N_test,) bool, p_err (N_test,)) in the test split's row order."""
    import hardprobe
    from hardprobe.rundir.run import save_array
    run = hardprobe.load_run(run_dir)
    rng = np.random.default_rng(0)
    centers, shift = rng.normal(0, 4, size=(N_CLASSES, DIM)), rng.normal(0, 3, size=DIM)
    out = None
    for split in run.splits:
        ex = run.split_examples(split)
        y = ex["label"].to_numpy()
        idx = ex["path"].str.extract(r"img_(\d+)")[0].astype(int).to_numpy()
        sub = (split == "test") & (y == 0) & (idx < N_SUB)
        X = centers[y] + rng.normal(size=(len(y), DIM)) + np.where(sub[:, None], shift, 0)
        p_err = np.where(sub, 0.7, 0.05)
        wrong = rng.random(len(y)) < p_err
        pred = np.where(wrong, np.where(sub, 1, (y + 1 + rng.integers(0, 2, len(y))) % 3), y)
        save_array(run_dir, split, "embedding", X.astype(np.float32))
        save_array(run_dir, split, "logits", (6 * np.eye(N_CLASSES)[pred]).astype(np.float32))
        if split == "test":
            out = sub, p_err
    return out


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    import warnings

    from conftest import make_folder

    from hardprobe import pipeline
    from hardprobe.config import build_config
    from hardprobe.stages.classify import classify
    from hardprobe.stages.diagnose import diagnose_run
    root = tmp_path_factory.mktemp("sliced")
    train = make_folder(root / "train", RUN_TRAIN, 0)
    test = make_folder(root / "test", RUN_TEST, 1)
    cfg = build_config(model="cifar_resnet20", random_init=True, data="imagefolder",
                       train=str(train), test=str(test), out=str(root / "run"),
                       cache_dir=str(root / "cache"), k=10, num_workers=0, folds=3,
                       similarity=False, top=0, report=False)
    run_dir = pipeline.extract(cfg, progress=False)
    sub, p_err = _plant(run_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        classify(run_dir, cfg)
    summary = diagnose_run(run_dir, progress=False)
    return run_dir, sub, p_err, summary


def test_diagnose_recovers_the_planted_slice(planted_run):
    import hardprobe
    run_dir, sub, p_err, summary = planted_run
    ex = hardprobe.load_run(run_dir).split_examples("test")
    sid = ex["slice_id"].to_numpy(np.int64)
    rows = json.loads((run_dir / "slices" / "slices.json").read_text())
    assert rows and summary["slices"]["n"] == len(rows)
    best = max(rows, key=lambda s: _jaccard(sid == s["slice_id"], sub))
    jac = _jaccard(sid == best["slice_id"], sub)
    assert jac >= 0.5, f"overlap with the planted set: Jaccard {jac:.2f}"
    assert best["pair"]["given"] == "cat" and best["pair"]["predicted"] == "dog"
    held = pd.read_parquet(run_dir / "slices" / "assignments.parquet")["held_out"].to_numpy()
    members = (sid == best["slice_id"]) & held
    assert best["n"] == members.sum()
    assert best["ci_low"] <= p_err[members].mean() <= best["ci_high"]
    assert best["ci_low"] > best["class_error_rate"]
    s = next(s for s in summary["slices"]["slices"] if s["slice_id"] == best["slice_id"])
    assert s["error_rate"] == best["error_rate"] and s["description"] == best["description"]
    train = hardprobe.load_run(run_dir).split_examples("train")
    assert train["slice_id"].isna().all()  # slices are the test split's


def test_report_shows_the_slices_diagnose_wrote(planted_run, tmp_path):
    from hardprobe.report import write_report
    run_dir = planted_run[0]
    html = write_report(run_dir, top=4, out=tmp_path / "r.html").read_text()
    assert "Slices: where the model fails" in html and "cat -&gt; dog" in html


def test_rediagnose_keeps_the_stamp_and_no_slices_writes_none(planted_run, tmp_path):
    import shutil

    import hardprobe
    from hardprobe.stages.diagnose import diagnose_run
    run_dir = Path(shutil.copytree(planted_run[0], tmp_path / "run"))
    before = hardprobe.load_run(run_dir).stamps()["diagnose"]
    diagnose_run(run_dir, progress=False, images=False)
    diagnose_run(run_dir, progress=False, images=False)  # the table holds slice_id now
    again = hardprobe.load_run(run_dir).stamps()["diagnose"]
    diagnose_run(run_dir, progress=False, images=False)
    assert hardprobe.load_run(run_dir).stamps()["diagnose"] == again != before
    summary = diagnose_run(run_dir, progress=False, images=False, slices=False)
    assert not (run_dir / "slices").exists()
    assert "slice_id" not in hardprobe.load_run(run_dir).examples
    assert summary["slices"]["computed"] is False
