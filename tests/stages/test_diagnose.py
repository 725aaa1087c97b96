"""The diagnosis on a synthetic run whose answers are known by construction.

Images are flat grey noise (their statistics only matter for low_quality); the features are
written over extract's with clustered vectors, and the model's logits are a cosine classifier
except on a planted set it gets wrong on purpose. Planted in the test split:
flip_* (cluster a, labelled b), amb_* (halfway between a and b, labelled a), sub_* (a rare
sub-cluster of b that train holds 2 of), merr_* (typical c, the model says a), dark_* / blur_*
(typical a features, darkened / blurred images)."""
from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageFilter

import hardprobe
from hardprobe import pipeline
from hardprobe.config import build_config
from hardprobe.errors import DiagnoseError, UnknownExampleError
from hardprobe.rundir.run import save_array
from hardprobe.scoring import image_quality
from hardprobe.stages.classify import classify
from hardprobe.stages.diagnose import causes, diagnose_run, why

pytestmark = pytest.mark.usefixtures("one_thread")
CLASSES = ("a", "b", "c")
D = 16
TRAIN = {"a": {"n": 80}, "b": {"n": 80, "s": 2}, "c": {"n": 80}}
TEST = {"a": {"n": 20, "amb": 4, "dark": 3, "blur": 3}, "b": {"n": 20, "flip": 4, "sub": 3},
        "c": {"n": 20, "merr": 4}}
CENTRES = 3 * np.eye(D)[:3]  # class c's centre points along axis c
SUB = 2 * np.eye(D)[1] + 3 * np.eye(D)[3]  # b's rare sub-cluster


def _image(rng, kind: str) -> Image.Image:
    base = 120 + rng.integers(-20, 21)
    arr = np.clip(base + rng.integers(-40, 41, size=(32, 32, 3)), 0, 255).astype(np.uint8)
    if kind == "dark":
        arr = (arr * 0.15).astype(np.uint8)
    im = Image.fromarray(arr)
    return im.filter(ImageFilter.GaussianBlur(2)) if kind == "blur" else im


def _folder(root: Path, spec: dict, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for c, kinds in spec.items():
        (root / c).mkdir(parents=True)
        for kind, n in kinds.items():
            for i in range(n):
                _image(rng, kind).save(root / c / f"{kind}_{i:03d}.png")
    return root


def _feature(rng, kind: str, label: int) -> np.ndarray:
    noise = rng.normal(0, 0.3, D)
    if kind == "flip":
        return CENTRES[0] + 0.5 * noise
    if kind == "amb":
        return (CENTRES[0] + CENTRES[1]) / 2 + 0.1 * noise
    if kind in ("s", "sub"):
        return SUB + 0.3 * noise
    return CENTRES[label] + noise


def _write_features(run_dir: Path, seed: int = 0, wrong_kind: str = "merr") -> None:
    """Clustered features, and logits of a cosine classifier that gets `wrong_kind` wrong."""
    run = hardprobe.load_run(run_dir)
    rng = np.random.default_rng(seed)
    for split in run.splits:
        ex = run.split_examples(split)
        kinds = ex["path"].str.split("/").str[-1].str.rsplit("_", n=1).str[0]
        X = np.stack([_feature(rng, k, y) for k, y in zip(kinds, ex["label"])]).astype(np.float32)
        unit = X / np.linalg.norm(X, axis=1, keepdims=True)
        logits = 8 * unit @ (CENTRES / 3).T
        logits[(kinds == wrong_kind).to_numpy()] = 8 * np.eye(3)[0]
        save_array(run_dir, split, "embedding", X)
        save_array(run_dir, split, "logits", logits.astype(np.float32))


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("diagnose")
    train, test = _folder(root / "train", TRAIN, 0), _folder(root / "test", TEST, 1)
    cfg = build_config(model="cifar_resnet20", random_init=True, data="imagefolder",
                       train=str(train), test=str(test), out=str(root / "run"),
                       cache_dir=str(root / "cache"), k=10, num_workers=0, folds=3,
                       similarity=False, top=0, report=False)
    out = pipeline.extract(cfg, progress=False)
    _write_features(out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        classify(out, cfg)
    return out


@pytest.fixture(scope="module")
def diagnosed(base, tmp_path_factory) -> Path:
    run_dir = Path(shutil.copytree(base, tmp_path_factory.mktemp("d") / "run"))
    diagnose_run(run_dir, progress=False)
    return run_dir


def _test_rows(run_dir) -> pd.DataFrame:
    ex = hardprobe.load_run(run_dir).split_examples("test")
    return ex.assign(kind=ex["path"].str.split("/").str[-1].str.rsplit("_", n=1).str[0])


@pytest.mark.parametrize("kind,mode", [("flip", "label_error"), ("amb", "ambiguous"),
                                       ("sub", "atypical"), ("merr", "model_error"),
                                       ("dark", "low_quality"), ("blur", "low_quality")])
def test_planted_examples_get_their_cause(diagnosed, kind, mode):
    ex = _test_rows(diagnosed)
    got = ex.loc[ex["kind"] == kind, "failure_mode"]
    assert (got == mode).all(), got.value_counts().to_dict()
    assert ex.loc[ex["kind"] == kind, f"cause_{mode}"].all()


def test_plain_examples_are_mostly_correct_and_causes_are_specific(diagnosed):
    ex = _test_rows(diagnosed)
    plain = ex[ex["kind"] == "n"]
    # atypical cuts 5% of each class's train by construction; nothing else should fire here
    assert (plain["failure_mode"] == "correct").mean() >= 0.85
    assert not plain["cause_label_error"].any() and not plain["cause_model_error"].any()
    assert not plain["cause_low_quality"].any()
    # the merr points are a model failure, not bad data: never a label error
    assert not ex.loc[ex["kind"] == "merr", "cause_label_error"].any()


def test_evidence_names_the_numbers_and_metrics_count(diagnosed):
    run = hardprobe.load_run(diagnosed)
    ex = _test_rows(diagnosed)
    merr = ex[ex["kind"] == "merr"].iloc[0]
    assert "predicts a" in merr["evidence"] and "say c" in merr["evidence"]
    flip = ex[ex["kind"] == "flip"].iloc[0]
    assert flip["evidence"].startswith("label_error:") and "say a" in flip["evidence"]
    assert "dark" in ex[ex["kind"] == "dark"].iloc[0]["evidence"]
    d = run.metrics["diagnose"]
    for split in ("train", "test"):
        n = int((run.examples["split"] == split).sum())
        assert sum(d["counts"][split].values()) == n
    test = run.examples[run.examples["split"] == "test"]
    assert d["counts"]["test"]["label_error"] == int((test["failure_mode"] == "label_error").sum())
    le = d["label_errors"]["test"]
    assert le["candidates"] == int(test["label_issue"].sum())
    assert le["estimated_off_diagonal"] >= 0 and le["diagnosed_label_error"] >= 4
    assert sum(sum(v.values()) for v in d["per_class"]["test"].values()) == len(test)
    assert (diagnosed / "diagnose" / "summary.json").exists()
    assert "diagnose" in run.stamps()


def test_why_prints_one_example(diagnosed):
    ex = _test_rows(diagnosed)
    flip_id = ex.loc[ex["kind"] == "flip", "id"].iloc[0]
    text = why(diagnosed, flip_id)
    assert "cause: label_error" in text and "nearest train neighbours" in text
    nb_lines = [ln for ln in text.splitlines() if ln.startswith("  train/")]
    assert len(nb_lines) == 8 and all(" a " in ln for ln in nb_lines)  # cluster a's examples
    with pytest.raises(UnknownExampleError, match="no example"):
        why(diagnosed, "test/a/nope.png")


def test_with_other_runs_gives_consensus(base, diagnosed, tmp_path):
    other = Path(shutil.copytree(base, tmp_path / "other"))
    _write_features(other, wrong_kind="none")  # same features, a model with no planted error
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        classify(other)
    run_dir = Path(shutil.copytree(diagnosed, tmp_path / "main"))
    diagnose_run(run_dir, with_runs=[str(other)], progress=False)
    ex = _test_rows(run_dir)
    o = hardprobe.load_run(other).examples.set_index("id")
    wrong_other = (o.loc[ex["id"], "pred_model"].to_numpy() != ex["label"].to_numpy())
    expected = (ex["pred_model"] != ex["label"]).to_numpy().astype(int) + wrong_other
    np.testing.assert_array_equal(ex["n_models_wrong"], expected)
    assert (ex.loc[ex["kind"] == "merr", "n_models_wrong"] == 1).all()
    assert (ex.loc[ex["kind"] == "flip", "n_models_agree_wrong"] == 2).all()
    assert (ex.loc[ex["kind"] == "flip", "failure_mode"] == "label_error").all()
    assert ex["hardness_rank_mean"].between(0, 1).all()
    bad = Path(shutil.copytree(base, tmp_path / "bad"))
    t = pd.read_parquet(bad / "examples.parquet")
    t["label"] = (t["label"] + 1) % 3
    t.to_parquet(bad / "examples.parquet")
    with pytest.raises(DiagnoseError, match="other labels"):
        diagnose_run(run_dir, with_runs=[str(bad)], progress=False, images=False)


def test_report_opens_with_why(diagnosed, tmp_path):
    from hardprobe.report import write_report
    html = write_report(diagnosed, top=6, out=tmp_path / "r.html").read_text()
    assert html.index('id="why"') < html.index('id="summary"')
    assert "label_error" in html and "model_error" in html
    assert "candidate" in html and ">label issue<" not in html


def test_image_statistics_point_the_documented_way():
    rng = np.random.default_rng(0)
    imgs = rng.integers(60, 200, size=(4, 16, 16, 3), dtype=np.uint8)
    imgs[1] = imgs[1] // 6  # darker
    imgs[2] = imgs[2].mean(axis=(0, 1), keepdims=True).astype(np.uint8)  # flat: no detail
    st = image_quality.image_statistics(imgs)
    assert st.loc[1, "brightness"] < st.loc[0, "brightness"]
    assert st.loc[2, "sharpness"] == 0 and st.loc[2, "contrast"] < 0.01
    assert st.loc[2, "information"] < st.loc[0, "information"] <= 8
    flags = image_quality.quality_flags(st, image_quality.fences(st.iloc[[0, 3]], 3.0))
    assert flags.loc[1, "dark"] and flags.loc[2, "blurry"] and not flags.loc[0].any()


def test_rules_on_arrays():
    y = np.array([0, 0, 1])
    sig = {"knn": np.array([1, 0, -1]), "linear": np.array([1, 1, -1])}
    alt, n_for, against, avail = causes.vote_alternative(y, sig)
    assert alt.tolist() == [1, 1, -1] and n_for.tolist() == [2, 1, 0]
    assert against.tolist() == [0, 1, 0] and avail.tolist() == [2, 2, 0]
    le = causes.label_error_rule([True] * 3, n_for, against, avail, [0.0] * 3, [0.5] * 3, 0.05)
    assert le.tolist() == [True, False, False]
    modes = causes.primary_cause({"model_error": np.array([True, True, False])},
                                 wrong=[True, False, False], known=[True, True, False])
    assert modes.tolist() == ["model_error", "correct", "unknown"]


def test_fragile_from_perturb_columns(diagnosed, tmp_path):
    run_dir = Path(shutil.copytree(diagnosed, tmp_path / "run"))
    run = hardprobe.load_run(run_dir)
    ex = _test_rows(run_dir)
    plain_right = ex[(ex["kind"] == "n") & (ex["failure_mode"] == "correct")]
    fragile_ids = set(plain_right["id"].iloc[:3])
    flips = pd.DataFrame({"id": ex["id"], "flip_severity_noise": [
        1 if i in fragile_ids else 6 for i in ex["id"]], "flip_severity_blur": 6})
    run.join("perturb", flips)
    (run_dir / "perturb").mkdir()
    pd.DataFrame({"corruption": ["noise"] * 5, "severity": [1, 2, 3, 4, 5], "head": "model",
                  "accuracy": 0.5, "n": 10}).to_csv(run_dir / "perturb" / "accuracy.csv")
    diagnose_run(run_dir, images=False, progress=False)
    got = _test_rows(run_dir).set_index("id")["failure_mode"]
    assert (got.loc[sorted(fragile_ids)] == "fragile").all()
    assert "flips at severity 1 under noise" in _test_rows(run_dir).set_index("id").loc[
        sorted(fragile_ids)[0], "evidence"]
    assert (got.drop(sorted(fragile_ids)) != "fragile").all()


def test_stored_probabilities_spare_the_linear_refit(base, tmp_path, monkeypatch):
    refit = Path(shutil.copytree(base, tmp_path / "refit"))
    shutil.rmtree(refit / "heads" / "probs")  # a run classified before probs were stored
    diagnose_run(refit, images=False, progress=False)
    stored = Path(shutil.copytree(base, tmp_path / "stored"))
    assert (stored / "heads" / "probs" / "train.linear.npy").exists()
    from hardprobe.heads import LinearProbe

    def no_refit(*a, **k):
        raise AssertionError("diagnose refitted the linear probe")
    monkeypatch.setattr(LinearProbe, "fit", no_refit)
    diagnose_run(stored, images=False, progress=False)
    a, b = (hardprobe.load_run(r).examples.set_index("id") for r in (refit, stored))
    assert (a.loc[b.index, "failure_mode"] == b["failure_mode"]).all()
    s = hardprobe.load_run(stored).metrics["diagnose"]["label_errors"]
    assert s == hardprobe.load_run(refit).metrics["diagnose"]["label_errors"]


def test_classify_and_diagnose_say_where_their_time_went(base, diagnosed):
    steps = hardprobe.load_run(base).metrics["classify_seconds_by_step"]
    assert {"duplicates", "knn", "linear"} <= set(steps)
    total = hardprobe.load_run(base).metrics["classify_seconds"]
    assert all(v >= 0 for v in steps.values()) and sum(steps.values()) <= total + 0.05
    summary = hardprobe.load_run(diagnosed).metrics["diagnose"]
    assert set(summary["seconds_by_step"]) == {"image_statistics", "causes", "slices"}
    assert sum(summary["seconds_by_step"].values()) <= summary["seconds"] + 0.05


def test_stored_neighbours_spare_the_second_knn_search(base, tmp_path, monkeypatch):
    # classify stores the train rows its kNN voted with; diagnose reads them and gets the
    # neighbours a fresh search gives (same k, same left-out duplicate groups)
    from hardprobe.heads import KNNClassifier
    from hardprobe.stages.diagnose.evidence import HeadProbs
    run = hardprobe.load_run(Path(shutil.copytree(base, tmp_path / "run")))
    for split in ("train", "test"):
        stored = run.knn_neighbors(split)
        assert stored is not None and stored.shape == (len(run.split_examples(split)), 10)
        fresh = HeadProbs(run, 3).knn(split)[2]
        assert (np.sort(stored, 1) == np.sort(fresh, 1)).mean() > 0.99  # up to exact ties

    def no_search(*a, **k):
        raise AssertionError("diagnose searched the neighbours again")
    monkeypatch.setattr(KNNClassifier, "predict_proba_and_neighbors", no_search)
    diagnose_run(run.path, images=False, progress=False)
    assert "failure_mode" in hardprobe.load_run(run.path).examples


def test_stored_probabilities_of_another_shape_are_not_used(base, tmp_path):
    from hardprobe.stages.diagnose.evidence import HeadProbs
    run_dir = Path(shutil.copytree(base, tmp_path / "run"))
    good = np.load(run_dir / "heads" / "probs" / "test.linear.npy")
    np.save(run_dir / "heads" / "probs" / "test.linear.npy", good[:5])
    with pytest.warns(UserWarning, match="shape"):
        got = HeadProbs(hardprobe.load_run(run_dir), 3).get("linear", "test")
    np.testing.assert_allclose(got, good, atol=1e-5)  # refitted, as classify fitted it


def test_knn_neighbours_leave_out_duplicate_groups(base, tmp_path):
    from hardprobe.stages.diagnose.evidence import HeadProbs
    run_dir = Path(shutil.copytree(base, tmp_path / "run"))
    run = hardprobe.load_run(run_dir)
    nearest = HeadProbs(run, 3).knn("train")[2][:, 0]  # plain leave-one-out
    tr = run.split_examples("train")
    groups = np.full(len(tr), -1)
    for g, i in enumerate(range(0, 40, 4)):  # 10 pairs: a row and its nearest neighbour
        if groups[i] < 0 and groups[nearest[i]] < 0:
            groups[[i, nearest[i]]] = g
    run.join("classify", pd.DataFrame({"id": tr["id"], "duplicate_group": groups}))
    idx = HeadProbs(hardprobe.load_run(run_dir), 3).knn("train")[2]
    paired = np.flatnonzero(groups >= 0)
    assert len(paired) >= 10
    for i in paired:
        mates = set(np.flatnonzero(groups == groups[i])) - {i}
        assert not mates & set(idx[i]), f"row {i} still votes with its duplicate"
