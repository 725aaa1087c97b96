"""Corruption, occlusion and blend probes: the image operations, the CIFAR-10-C reader, flip
points on synthetic models with known answers, and perturb_run end to end on a tiny run."""
import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import hardprobe
from hardprobe.backbones import Backbone, Preprocess
from hardprobe.core.stats import stratified_subset
from hardprobe.stages import perturb as P
from hardprobe.stages.perturb import frost_textures, probes, stage


def natural_image(h=32, w=32, seed=0) -> np.ndarray:
    """A fixed natural-ish test image: sky gradient, a textured ground, a shaded disc, an edge."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
    img = np.zeros((h, w, 3))
    img[..., 0] = 90 + 80 * yy
    img[..., 1] = 130 + 60 * yy
    img[..., 2] = 220 - 90 * yy
    ground = yy > 0.62
    img[ground] = np.array([70, 110, 40]) + rng.normal(0, 18, (ground.sum(), 3))
    disc = (yy - 0.4) ** 2 + (xx - 0.35) ** 2 < 0.04
    img[disc] = (np.array([230, 180, 40]) * (1.1 - 0.6 * xx[disc, None]))
    img[:, int(0.8 * w):int(0.85 * w)] = [40, 30, 30]  # a dark pole: a sharp edge
    return np.clip(img, 0, 255).astype(np.uint8)


IMG = natural_image()

# Where make_cifar_c.py's own CIFAR-10 parameters do not grow the change from severity to
# severity (measured as the mean absolute difference from the clean image, averaged over
# seeds), with the reason; other corruptions must not decrease by more than TOL.
TOL = 0.35  # grey levels
NON_MONOTONE = {
    # severity 1 has the strongest random affine (jitter 0.08 x side, no elastic field); later
    # severities trade the affine jitter (down to 0.03) for a small-sigma elastic field
    "elastic_transform": "affine jitter shrinks with severity: the change falls from s1 to s5",
    # s5 = s4's two shuffles with more blur (sigma 0.4 vs 0.25), which smooths the shuffled
    # pixels back toward the clean image
    "glass_blur": "s5 changes the image slightly less than s4",
    # s3..s5 lower the image weight (0.9, 0.85, 0.75) while the frost weight stays near 0.4:
    # the darkening cancels part of the added frost brightness -- more masked, less changed
    "frost": "the change peaks at s3",
    # 32 px -> int(32 * c) px -> 32 px: 28 px (s2) aliases more than 27 px (s3)
    "pixelate": "s3 changes a 32 px image less than s2",
}


@pytest.mark.parametrize("name", P.CORRUPTIONS)
def test_corruption_keeps_shape_dtype_and_changes_the_image(name):
    for s in P.SEVERITIES:
        out = P.corrupt(IMG, name, s, seed=0)
        assert out.shape == IMG.shape and out.dtype == np.uint8, (name, s)
        assert np.abs(out.astype(int) - IMG).mean() > 0.3, (name, s)
        assert 0 < out.mean() < 255
    odd = natural_image(24, 40)  # any size: not only 32x32 squares
    assert P.corrupt(odd, name, 5, seed=1).shape == odd.shape


def mad(name, s, seeds=(0, 1, 2)) -> float:
    return float(np.mean([np.abs(P.corrupt(IMG, name, s, seed=k).astype(float) - IMG).mean()
                          for k in seeds]))


@pytest.mark.parametrize("name", P.CORRUPTIONS)
def test_higher_severity_changes_the_image_more(name):
    d = [mad(name, s) for s in P.SEVERITIES]
    if name in NON_MONOTONE:  # every severity still a real change; the order is the paper's
        assert min(d) > 0.5, (name, d)
        return
    for s in range(4):
        assert d[s + 1] >= d[s] - TOL, (name, d)
    assert d[-1] > d[0], (name, d)


@pytest.mark.parametrize("name", P.CORRUPTIONS)
def test_corruptions_are_deterministic_given_a_seed(name):
    a = P.corrupt(IMG, name, 3, seed=7)
    np.testing.assert_array_equal(a, P.corrupt(IMG, name, 3, seed=7))
    np.testing.assert_array_equal(a, P.corrupt(IMG, name, 3, rng=np.random.default_rng(7)))


def test_random_corruptions_depend_on_the_seed_and_the_example():
    assert not np.array_equal(P.corrupt(IMG, "gaussian_noise", 3, seed=0),
                              P.corrupt(IMG, "gaussian_noise", 3, seed=1))
    a = P.corrupt(IMG, "shot_noise", 2, rng=P.example_rng(0, "shot_noise", "test/a.png"))
    b = P.corrupt(IMG, "shot_noise", 2, rng=P.example_rng(0, "shot_noise", "test/b.png"))
    assert not np.array_equal(a, b)


def test_known_values_of_deterministic_corruptions():
    grey = np.full((32, 32, 3), 100, np.uint8)
    # brightness: HSV value + c, so a grey pixel v becomes trunc(v + 255 c)
    assert P.corrupt(grey, "brightness", 3)[0, 0, 0] in (138, 137)
    # contrast of a flat image: unchanged up to the truncation to uint8
    assert abs(int(P.corrupt(grey, "contrast", 5)[0, 0, 0]) - 100) <= 1
    with pytest.raises(P.PerturbError, match="did you mean"):
        P.corrupt(IMG, "gausian_noise", 1)
    with pytest.raises(P.PerturbError, match="1..5"):
        P.corrupt(IMG, "contrast", 6)
    with pytest.raises(P.PerturbError, match="uint8"):
        P.corrupt(IMG.astype(float), "contrast", 1)


def test_frost_uses_the_frost_images_it_finds(tmp_path, monkeypatch):
    from PIL import Image
    for f in frost_textures._FROST_FILES:
        Image.fromarray(np.full((300, 400, 3), 255, np.uint8)).save(tmp_path / f)
    monkeypatch.setenv("HARDPROBE_FROST_DIR", str(tmp_path))
    assert P.frost_source()["kind"] == "directory"
    # severity 1: 1.0 * image + 0.2 * frost (all white) = image + 51
    out = P.corrupt(IMG, "frost", 1)
    np.testing.assert_array_equal(out, np.clip(IMG.astype(int) + 51, 0, 255))
    monkeypatch.setenv("HARDPROBE_FROST_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(P.PerturbError, match="lacks"):
        P.frost_source()


def test_procedural_frost_stand_in_matches_the_photographs_statistics():
    for k, (mean, std) in enumerate(frost_textures._FROST_STATS):
        tex = frost_textures._procedural_frost(k)
        assert tex.shape == (128, 128, 3)
        np.testing.assert_allclose(tex.mean(axis=(0, 1)), mean, atol=4)
        np.testing.assert_allclose(tex.std(axis=(0, 1)), std, rtol=0.1)


def test_erasing_is_nested_and_blend_is_linear():
    rng_draw = probes._EraseDraw(32, 32, np.random.default_rng(3))
    masks = [P.erase(IMG, a, _draw=rng_draw) != IMG for a in P.ERASE_AREAS]
    areas = [m.any(axis=2).mean() for m in masks]
    assert all(b >= a for a, b in zip(areas, areas[1:]))
    assert all((m1.any(2) <= m2.any(2)).all() for m1, m2 in zip(masks, masks[1:]))
    np.testing.assert_allclose(areas, P.ERASE_AREAS, atol=0.03)
    black = np.zeros_like(IMG)
    np.testing.assert_array_equal(P.blend(IMG, black, 0.0), IMG)
    assert np.abs(P.blend(IMG, black, 0.5).astype(int) - IMG / 2).max() <= 1


def test_stratified_subset_and_lowest_flip():
    labels = np.repeat([0, 1, 2], [50, 30, 20])
    rows = stratified_subset(labels, 10, seed=0)
    assert list(np.bincount(labels[rows])) == [5, 3, 2] and (np.diff(rows) > 0).all()
    np.testing.assert_array_equal(rows, stratified_subset(labels, 10, seed=0))
    assert len(stratified_subset(labels, None)) == 100
    preds = np.array([[0, 1, 0], [1, 1, 0], [1, 1, 0]])  # severities 1..3 x examples
    np.testing.assert_array_equal(P.lowest_flip([0, 0, 0], preds, [1, 2, 3], 6), [2, 1, 6])


# ---------------------------------------------------------------- synthetic models
class StatNet(torch.nn.Module):
    """Logits from the mean intensity (in [0, 1]) of a region: class 1 ('bright') when it is
    above `t`: logits (k (t - m), k (m - t))."""

    def __init__(self, t, region=None, k=10.0):
        super().__init__()
        self.t, self.region, self.k = t, region, k

    def forward(self, x):
        if self.region is not None:
            x = x[:, :, :self.region, :self.region]
        m = x.mean(dim=(1, 2, 3))
        return m[:, None], torch.stack([(self.t - m) * self.k, (m - self.t) * self.k], 1)


def stat_backbone(t, region=None) -> Backbone:
    return Backbone(name="stat", model=StatNet(t, region).eval(),
                    preprocess=Preprocess(None, None, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
                    embed_dim=1, class_names=["dark", "bright"], cam_layer="",
                    weights_id="test", forward_fn=lambda m, x: m(x))


def flat(v, size=32) -> np.ndarray:
    return np.full((size, size, 3), v, np.uint8)


def test_brightness_flips_at_the_computable_severity():
    # a grey v becomes trunc(v + 255 c), c = .05 .1 .15 .2 .3: with the threshold at 130,
    # 100 -> 112 125 138 (flips at 3); 120 -> 132 (1); 60 -> ... 111 136 (5); 20 never (6)
    bb = stat_backbone(130 / 255)
    got = P.flip_severities(bb, [flat(v) for v in (100, 120, 60, 20)], "brightness",
                            batch_size=3)
    np.testing.assert_array_equal(got, [3, 1, 5, 6])
    # only some severities computed: the lowest of those that flips, else 6
    got = P.flip_severities(bb, [flat(100)], "brightness", severities=(1, 2, 5))
    np.testing.assert_array_equal(got, [5])


def test_occlusion_finds_the_region_the_model_reads():
    img = flat(0)
    img[:8, :8] = 255  # the model reads the top-left 8x8 only; the patch is 8x8, stride 4
    maps, drop = P.occlusion_sensitivity(stat_backbone(0.6, region=8), [img], [1])
    assert maps.shape == (1, 7, 7)
    assert np.unravel_index(maps[0].argmax(), (7, 7)) == (0, 0)
    assert drop[0] == pytest.approx(maps[0, 0, 0]) and drop[0] > 0.8
    assert np.abs(maps[0, 2:, :]).max() < 1e-6 and np.abs(maps[0, :, 2:]).max() < 1e-6
    assert 0 < maps[0, 0, 1] < maps[0, 0, 0]  # half covered: a smaller drop


def test_blend_and_erase_flip_points():
    bb = stat_backbone(100 / 255)
    # 255 * (1 - w) < 100 from w = 0.7 (0.6 gives 102); 210 * (1 - w) from w = 0.6;
    # white blended toward white never flips
    got = P.blend_flip_weights(bb, [flat(255), flat(210), flat(255)],
                               [flat(0), flat(0), flat(255)])
    np.testing.assert_allclose(got, [0.7, 0.6, 1.0])
    # erasing fills with uniform noise (mean 127.5): a white image's mean falls below 197.6
    # between 40% (about 204) and 50% (about 192) erased
    bb = stat_backbone(197.6 / 255)
    got = P.erase_flip_areas(bb, [flat(255)] * 3, ids=["a", "b", "c"])
    np.testing.assert_allclose(got, [0.5, 0.5, 0.5])


# ---------------------------------------------------------------- CIFAR-10-C reader
def make_cifar10c(root, labels, names=("gaussian_noise", "contrast")):
    """CIFAR-10-C layout with blocks of len(labels): severity s images are all 10 * s, and
    pixel [0, 0, 0] of row r is r % 256 (to check the rows)."""
    root.mkdir(parents=True, exist_ok=True)
    b = len(labels)
    np.save(root / "labels.npy", np.tile(np.asarray(labels, np.uint8), 5))
    for name in names:
        a = np.repeat(np.arange(1, 6, dtype=np.uint8) * 10, b)[:, None, None, None] * np.ones(
            (1, 32, 32, 3), np.uint8)
        a[:, 0, 0, 0] = np.tile(np.arange(b) % 256, 5)
        np.save(root / f"{name}.npy", a)
    return root


def test_cifar10c_reader(tmp_path):
    labels = np.arange(20) % 10
    root = make_cifar10c(tmp_path / "c10c", labels)
    c = P.CIFAR10C(root)
    assert c.block == 20 and c.available() == ["gaussian_noise", "contrast"]
    x = P.read_cifar10c(root, "contrast", 3, rows=[0, 5, 19])
    assert x.shape == (3, 32, 32, 3) and x.dtype == np.uint8
    assert (x[:, 1:] == 30).all() and list(x[:, 0, 0, 0]) == [0, 5, 19]
    np.testing.assert_array_equal(c.labels(4), labels)
    c.check_labels(labels)  # in order: fine
    with pytest.raises(P.PerturbError, match="differs from the run's test labels at 2"):
        c.check_labels(np.r_[labels[:18], labels[19], labels[18]])
    with pytest.raises(P.PerturbError, match="has 19 images"):
        c.check_labels(labels[:19])
    with pytest.raises(P.PerturbError, match="no fog.npy"):
        c.images("fog", 1)
    np.save(root / "fog.npy", np.zeros((10, 32, 32, 3), np.uint8))
    with pytest.raises(P.PerturbError, match="expected uint8"):
        c.images("fog", 1)
    with pytest.raises(P.PerturbError, match="labels.npy"):
        P.CIFAR10C(tmp_path)


# ---------------------------------------------------------------- perturb_run end to end
@pytest.fixture(scope="module")
def _tiny_run_once(tmp_path_factory):
    """One classified tiny run (tests/conftest.py's 3-class folders, random-init ResNet-20)."""
    from conftest import make_folder

    from hardprobe import pipeline
    from hardprobe.config import build_config
    root = tmp_path_factory.mktemp("perturb")
    train, test = make_folder(root / "train", 12, 0), make_folder(root / "test", 4, 1)
    cfg = build_config(model="cifar_resnet20", random_init=True, data="imagefolder",
                       train=str(train), test=str(test), out=str(root / "run"),
                       cache_dir=str(root / "cache"), k=5, num_workers=0, batch_size=16,
                       similarity=False, top=0, report=False)
    return pipeline.run(cfg, progress=False)


@pytest.fixture
def tiny_run(_tiny_run_once, tmp_path):
    """A fresh copy of the tiny run per test (perturb_run writes into it)."""
    import shutil
    return Path(shutil.copytree(_tiny_run_once, tmp_path / "run"))


def test_perturb_run_end_to_end(tiny_run, monkeypatch):
    from hardprobe.report.perturb_section import (
        perturb_section,
        robustness_curve_figure,
    )
    assert "not computed" in perturb_section(tiny_run)
    names = ["gaussian_noise", "contrast"]
    out = P.perturb_run(tiny_run, subset=6, corruptions=names, severities=(1, 2), seed=0,
                        batch_size=64, progress=False)
    assert out == tiny_run / "perturb"
    acc = pd.read_csv(out / "accuracy.csv")
    assert list(acc.columns) == ["corruption", "severity", "head", "accuracy", "n"]
    assert len(acc) == 2 * 2 * 2 and set(acc["head"]) == {"knn", "linear"}
    assert (acc["n"] == 6).all() and acc["accuracy"].between(0, 1).all()
    s = json.loads((out / "summary.json").read_text())
    assert set(s["mean_corruption_accuracy"]) == {"knn", "linear"}
    assert s["mean_corruption_accuracy"]["linear"] == pytest.approx(
        acc[acc["head"] == "linear"]["accuracy"].mean())
    assert s["primary_head"] == "linear" and s["source"] == "generated"
    assert set(s["hardness_flip_spearman"]) == {"rho", "p", "n"}  # as depth's and compare's
    assert [c["class"] for c in s["classes_break_first"]] and s["seconds"]["total"] > 0
    means = [c["mean_flip_severity"] for c in s["classes_break_first"]]
    assert means == sorted(means)
    ex = pd.read_parquet(out / "examples.parquet")
    assert len(ex) == 6 and list(np.bincount(ex["label"])) == [2, 2, 2]  # stratified
    for c in names:
        assert set(ex[f"flip_severity_{c}"]) <= {1, 2, 6}
    np.testing.assert_allclose(ex["flip_severity"], ex[[f"flip_severity_{c}" for c in names]]
                               .mean(axis=1))
    assert np.isfinite(ex["occlusion_max_drop"]).all()
    assert set(ex["erase_flip_area"]) <= set(P.ERASE_AREAS) | {1.0}
    assert set(np.round(ex["blend_flip_weight"], 6)) <= set(P.BLEND_WEIGHTS) | {1.0}
    assert (ex["blend_partner"] != ex["label"]).all()
    with np.load(out / "occlusion.npz") as z:
        assert z["maps"].shape == (6, 7, 7) and list(z["ids"]) == list(ex["id"])
    # joined into the run's table: the subset has values, every other row NaN
    run = hardprobe.load_run(tiny_run)
    from hardprobe.core.stats import rank_correlation
    hardness = run.examples.set_index("id").loc[ex["id"], "hardness"]
    assert s["hardness_flip_spearman"] == rank_correlation(hardness, ex["flip_severity"])
    cols = P.perturb_columns(names)
    assert set(cols) <= set(run.examples.columns)
    assert run.examples["flip_severity"].notna().sum() == 6 and len(run.examples) == 48
    joined = run.examples.set_index("id").loc[ex["id"], cols].reset_index(drop=True)
    pd.testing.assert_frame_equal(joined, ex[cols].astype(float), check_dtype=False)
    # a rerun reads every forward from the cache and joins without duplicate columns
    for where in (stage, probes):  # the stage's own forwards and those of the flip searches
        monkeypatch.setattr(where, "_forward", lambda *a, **k: pytest.fail("recomputed a forward"))
    P.perturb_run(tiny_run, subset=6, corruptions=names, severities=(1, 2), seed=0,
                  progress=False)
    s2 = json.loads((out / "summary.json").read_text())
    assert s2["cache"] == {"computed": 0, "cached": 4 + 3}
    pd.testing.assert_frame_equal(pd.read_parquet(out / "examples.parquet"), ex)
    run = hardprobe.load_run(tiny_run)
    assert not [c for c in run.examples.columns if c.endswith(("_x", "_y"))]
    # perturb stores the strips the report shows: the probed images, not redrawn ones
    with np.load(out / "strips.npz") as z:
        strip_ids = list(z["ids"])
        assert strip_ids == ex.sort_values(["flip_severity", "id"])["id"].head(4).tolist()
        assert int(z["severity"]) == 2 and list(z["corruptions"]) == names  # 3 not computed
        k = 1
        clean = run.images([strip_ids[k]])[0].permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(z[f"clean_{k}"], clean)
        np.testing.assert_array_equal(z[f"contrast_{k}"], P.corrupt(
            clean, "contrast", 2, rng=P.example_rng(0, "contrast", strip_ids[k])))
    # the report section and the compare helper; the report decodes and corrupts nothing
    monkeypatch.setattr(hardprobe.Run, "images", lambda *a: pytest.fail("report decoded"))
    html = perturb_section(tiny_run)
    monkeypatch.undo()
    assert "Accuracy against severity" in html and html.count("<img") >= 1 + 2 * 3
    assert "Examples that break first" in html and html.count('class="card"') == 4
    assert "Classes that break first" in html
    assert robustness_curve_figure([run, tiny_run]).startswith(b"\x89PNG")


def test_report_shows_perturb_s_erase_and_blend_parameters():
    """Issue 12: the report reads the largest area and weight from summary.json instead of
    printing "60% area" and "weight 0.9" whatever perturb used."""
    from hardprobe.report.perturb_section import _summary_table
    html = _summary_table({"erase": {"areas": [0.1, 0.35], "share_flipped": 0.5},
                           "blend": {"weights": [0.2, 0.7], "share_flipped": 0.25}})
    assert "by 35.0% area" in html and "by weight 0.7" in html
    assert "60%" not in html and "0.9" not in html


def test_report_reads_the_spearman_of_rank_correlation():
    from hardprobe.report.perturb_section import _summary_table
    html = _summary_table({"hardness_flip_spearman": {"rho": -0.25, "p": 0.0123, "n": 40}})
    assert "Spearman ρ -0.250 (p 0.0123, n 40)" in html
    html = _summary_table({"hardness_flip_spearman": {"rho": None, "p": None, "n": 2}})
    assert "Spearman ρ — (p —, n 2)" in html  # undefined: fewer than 3 pairs


def test_perturb_run_reads_a_cifar10c_folder(tiny_run, tmp_path):
    run = hardprobe.load_run(tiny_run)
    labels = run.split_examples("test")["label"].to_numpy()
    root = make_cifar10c(tmp_path / "c10c", labels, names=("contrast",))
    out = P.perturb_run(tiny_run, subset=None, corruptions=["contrast"], severities=(1, 3),
                        occlusion=False, blend=False, cifar10c=root, progress=False)
    s = json.loads((out / "summary.json").read_text())
    assert s["source"] == "cifar10c" and s["n"] == 12
    assert any("labels match" in n for n in s["notes"])
    ex = pd.read_parquet(out / "examples.parquet")
    assert "occlusion_max_drop" not in ex and "blend_flip_weight" not in ex
    assert not (out / "occlusion.npz").exists()
    with np.load(out / "strips.npz") as z:  # CIFAR-10-C's own images, at severity 3
        row = run.split_examples("test")["id"].tolist().index(str(z["ids"][0]))
        np.testing.assert_array_equal(z["contrast_0"],
                                      P.CIFAR10C(root).images("contrast", 3, [row])[0])
    bad = make_cifar10c(tmp_path / "bad", (labels + 1) % 3, names=("contrast",))
    with pytest.raises(P.PerturbError, match="differs from the run's test labels"):
        P.perturb_run(tiny_run, corruptions=["contrast"], cifar10c=bad, progress=False)


def test_run_heads_key_changes_with_the_train_labels(tiny_run):
    """Issue 13, item 1: perturb's cache key names the labels the heads were fitted on, so a
    run with other labels (--label-noise, --labels) never reads another run's results."""
    run = hardprobe.load_run(tiny_run)
    before = P.RunHeads(run).key
    ex = run.examples.copy()
    flip = (ex["split"] == "train").to_numpy() & (np.arange(len(ex)) % 5 == 0)
    ex.loc[flip, "label"] = (ex.loc[flip, "label"] + 1) % len(run.class_names)
    from hardprobe.errors import StageOrderError
    from hardprobe.rundir.run import write_examples
    from hardprobe.stages.classify import classify
    write_examples(tiny_run, ex)
    with pytest.raises(StageOrderError, match="train labels"):  # heads of the old labels
        P.RunHeads(hardprobe.load_run(tiny_run))
    classify(tiny_run)  # heads fitted on the new labels
    after = P.RunHeads(hardprobe.load_run(tiny_run)).key
    assert before != after  # other labels: another key


def _reclassify(tiny_run, **options):
    import dataclasses

    from hardprobe.stages.classify import classify
    run = hardprobe.load_run(tiny_run)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        classify(tiny_run, dataclasses.replace(run.config, **options))
    return hardprobe.load_run(tiny_run)


def test_perturb_uses_classify_s_stored_heads_with_every_option(tiny_run, monkeypatch):
    """Issue 12: perturb loads the heads classify fitted (RUN_DIR/heads/), honouring every
    head option (knn_backend faiss included), and refits nothing."""
    pytest.importorskip("faiss")
    from hardprobe.heads import linear
    run = _reclassify(tiny_run, linear_c=0.01, k=3, temperature=0.5, knn_weights="uniform",
                      knn_backend="faiss")
    assert (tiny_run / "heads" / "linear.npz").exists() and (tiny_run / "heads/knn.json").exists()
    monkeypatch.setattr(linear.LinearProbe, "fit", lambda *a, **k: pytest.fail("refitted"))
    monkeypatch.setattr(linear, "cross_val_predict_proba", lambda *a, **k: pytest.fail("cv"))
    heads = P.RunHeads(run)
    knn = heads.fitted["knn"]
    assert (knn.backend, knn.k, knn.temperature, knn.weights) == ("faiss", 3, 0.5, "uniform")
    assert heads.fitted["linear"].C == 0.01
    test = run.split_examples("test")
    probs = heads.probs({"embedding": run.features("test")})
    y = test["label"].to_numpy()
    for h in ("knn", "linear"):  # exactly classify's test predictions and probabilities
        assert (probs[h].argmax(1) == test[f"pred_{h}"].to_numpy()).all()
        np.testing.assert_allclose(probs[h][np.arange(len(y)), y], test[f"prob_true_{h}"],
                                   rtol=1e-6, atol=1e-7)


def test_float16_features_give_no_flip_from_rounding(tiny_run):
    """Issue 13, item 8: with --feature-dtype float16 the clean features are fp16-rounded and the
    perturbed ones come from the forward in fp32. An fp32 feature that rounds to the clean fp16
    one (an unchanged image) must give the clean probabilities, so no flip comes from rounding."""
    feats = tiny_run / "features"
    for f in feats.glob("*.embedding.npy"):
        np.save(f, np.load(f).astype(np.float16))
    run = _reclassify(tiny_run, linear_c=100.0)  # a sharp probe: rounding moves it most
    heads = P.RunHeads(run)
    x16 = run.features("test")
    assert x16.dtype == np.float16
    rng = np.random.default_rng(0)
    # fp32 values within a quarter of an fp16 step of the stored ones: they round back to them
    step = np.abs(np.spacing(x16)).astype(np.float32)
    x32 = x16.astype(np.float32) + rng.uniform(-0.25, 0.25, x16.shape).astype(np.float32) * step
    assert (x32.astype(np.float16) == x16).all() and (x32 != x16.astype(np.float32)).any()
    clean, perturbed = heads.probs({"embedding": x16}), heads.probs({"embedding": x32})
    for h in heads.names:
        np.testing.assert_array_equal(perturbed[h], clean[h])
    np.testing.assert_array_equal(heads.primary_probs({"embedding": x32}), clean[heads.primary])
