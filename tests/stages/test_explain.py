"""CAMs: fast path == pytorch-grad-cam, known-region synthetic model, guards, stats, the stage."""
import contextlib
import json
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import hardprobe
from hardprobe import pipeline
from hardprobe.backbones import Backbone, Preprocess, create_backbone
from hardprobe.config import build_config
from hardprobe.stages.explain import stage as explain
from hardprobe.stages.explain.cams import (CamWarning, blank_maps, cam_stats, compute_cams,
                                           resolve_layer)
from hardprobe.stages.explain.stage import CamError, faithfulness


# ------------------------------------------------------------------ models
class QuadrantNet(nn.Module):
    """Class 0 reads red in the top-left quadrant, class 1 green in the bottom-right one."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, stride=2, padding=1, bias=False)  # (N, 2, H/2, W/2)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0, 0] = 1 / 9  # channel 0: local mean of red
            self.conv.weight[1, 1] = 1 / 9  # channel 1: local mean of green
        self.act = nn.ReLU()
        self.aux = nn.Conv2d(3, 1, 1)  # runs, output discarded: off the gradient path
        self.unused = nn.Linear(1, 1)  # never runs

    def forward(self, x):
        self.aux(x)
        a = self.act(self.conv(x))
        h, w = a.shape[-2] // 2, a.shape[-1] // 2
        emb = torch.stack([a[:, 0, :h, :w].mean((1, 2)), a[:, 1, h:, w:].mean((1, 2))], 1)
        return emb, 20 * emb


def quadrant_backbone() -> Backbone:
    return Backbone(name="quadrant", model=QuadrantNet().eval(),
                    preprocess=Preprocess(None, None, (0, 0, 0), (1, 1, 1)), embed_dim=2,
                    class_names=["red_tl", "green_br"], cam_layer="act",
                    weights_id="hand-set", forward_fn=lambda m, x: m(x))


def patches(n=2, size=32) -> torch.Tensor:
    """Black images with an 8x8 red patch in the top-left, 8x8 green in the bottom-right."""
    x = torch.zeros(n, 3, size, size)
    x[:, 0, 4:12, 4:12] = 1
    x[:, 1, 20:28, 20:28] = 1
    return x


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    vit = create_backbone("vit_b_16", random_init=True, image_size=32)
    head = vit.model.heads.head
    assert not head.weight.any()  # torchvision initialises the ViT head to zero
    nn.init.normal_(head.weight, std=0.05)
    return {"cifar": create_backbone("cifar_resnet20", random_init=True),
            "resnet18": create_backbone("timm:resnet18", random_init=True, image_size=64),
            "vit": vit,
            "timm_reg": create_backbone("timm:vit_little_patch16_reg4_gap_256",
                                        random_init=True, image_size=32)}


@contextlib.contextmanager
def zeroed(linear: nn.Linear):
    saved = linear.weight.detach().clone(), linear.bias.detach().clone()
    with torch.no_grad():
        linear.weight.zero_(), linear.bias.zero_()
    try:
        yield
    finally:
        with torch.no_grad():
            linear.weight.copy_(saved[0]), linear.bias.copy_(saved[1])


def batch(bb, n=4, seed=0):
    s = bb.preprocess.output_size or 32
    return torch.randn(n, 3, s, s, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ fast path == library
@pytest.mark.parametrize("name", ["cifar", "resnet18", "vit", "timm_reg"])
def test_fast_path_equals_library(models, name):
    bb = models[name]
    x = batch(bb)
    with torch.no_grad():  # image i: its i-th most likely class (random init: else often
        order = bb(x)[1].argsort(dim=1, descending=True)  # no positive evidence, blank maps)
    targets = [int(order[i, i]) for i in range(len(x))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CamWarning)  # random-init CNNs: some maps all negative
        fast = compute_cams(bb, x, targets, fast=True)
        lib = compute_cams(bb, x, targets, fast=False)
    assert fast.shape == (4, *x.shape[-2:]) and fast.dtype == np.float32
    assert 0 <= fast.min() and fast.max() <= 1
    assert (~blank_maps(fast)).sum() >= 2  # a real comparison, not of blank maps
    np.testing.assert_allclose(fast, lib, atol=1e-5)
    assert all(p.requires_grad for p in bb.model.parameters())  # flags restored
    assert all(p.grad is None for p in bb.model.parameters())


def test_vit_reshape_uses_the_model_grid(models):
    vit, reg = models["vit"], models["timm_reg"]
    assert vit.cam_reshape.grid == (2, 2)  # 32 px / patch 16
    assert reg.cam_reshape.grid == tuple(reg.model.patch_embed.grid_size)
    assert reg.cam_reshape.num_prefix_tokens == reg.model.num_prefix_tokens == 4  # registers
    tokens = torch.randn(1, 4 + 4, 5)
    assert reg.cam_reshape(tokens).shape == (1, 5, 2, 2)


def test_other_methods_run_through_the_library(models):
    bb = models["cifar"]
    for method in ["gradcam++", "xgradcam", "layercam", "hirescam", "eigencam", "scorecam"]:
        maps = compute_cams(bb, batch(bb, 1), [2], method=method)
        assert maps.shape == (1, 32, 32) and np.isfinite(maps).all()


def test_library_activation_changed_in_place_is_an_error(models):
    bb = models["resnet18"]  # timm BasicBlock: bn2's output gets `x += shortcut` in place
    x, layer = batch(bb, 2), "layer4.1.bn2"
    with torch.no_grad():
        t = bb(x)[1].argmax(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CamWarning)
        assert compute_cams(bb, x, t, layer=layer).shape == (2, 64, 64)  # fast path: fine
        with pytest.raises(CamError, match="changed in place"):
            compute_cams(bb, x, t, layer=layer, fast=False)


# ------------------------------------------------------------------ known region
def test_cam_peaks_where_the_class_evidence_is():
    bb, x = quadrant_backbone(), patches()
    for fast in (True, False):
        red = compute_cams(bb, x, [0, 0], fast=fast)
        green = compute_cams(bb, x, [1, 1], fast=fast)
        assert red[:, :16, :16].sum() / red.sum() > 0.9
        assert green[:, 16:, 16:].sum() / green.sum() > 0.9
        st = cam_stats(np.concatenate([red, green]))
        assert (st["peak_y"][:2] < 0.5).all() and (st["peak_x"][:2] < 0.5).all()
        assert (st["peak_y"][2:] > 0.5).all() and (st["peak_x"][2:] > 0.5).all()


@pytest.mark.parametrize("perturbation", ["road", "mean"])
def test_faithfulness_beats_random_on_the_known_region(perturbation):
    bb, x = quadrant_backbone(), patches()
    maps = compute_cams(bb, x, [0, 0])
    f = faithfulness(bb, x, [0, 0], maps, perturbation=perturbation, seed=0)
    assert f["drop_cam"] > 0.3 and f["drop_cam"] > f["drop_random"] + 0.2, f


def test_faithfulness_is_finite_and_seeded(models):
    bb = models["cifar"]
    x = batch(bb, 3)
    maps = compute_cams(bb, x, [0, 1, 2])
    a = faithfulness(bb, x, [0, 1, 2], maps, seed=3)
    b = faithfulness(bb, x, [0, 1, 2], maps, seed=3)
    assert np.isfinite([a["drop_cam"], a["drop_random"]]).all() and a == b
    with pytest.raises(ValueError, match="fraction"):
        faithfulness(bb, x, [0, 1, 2], maps, fraction=1.0)


@pytest.mark.parametrize("shape, scattered", [((3, 40, 56), False), ((3, 40, 56), True),
                                             ((1, 24, 24), True)])
def test_road_impute_is_the_librarys_imputer(shape, scattered):
    """road_impute == pytorch-grad-cam's NoisyLinearImputer, bit for bit (same noise draw):
    a blob of missing pixels touching two borders, or scattered ones (isolated and in
    clumps)."""
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer
    rng = np.random.default_rng(1)
    img = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))
    keep = np.ones(shape[1:], np.float32)
    if scattered:
        keep[rng.random(shape[1:]) < 0.3] = 0
    else:
        keep[:15, 30:] = 0  # top-right corner block
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the library's np.argwhere(tensor)
        torch.manual_seed(7)
        want = NoisyLinearImputer()(img, torch.from_numpy(keep))
    torch.manual_seed(7)
    got = explain.road_impute(img, keep)
    assert torch.equal(got, want)
    assert torch.equal(got[:, keep == 1], img[:, keep == 1])  # kept pixels untouched
    assert not torch.equal(got, img)


def _old_faithfulness(bb, x, targets, maps, seed, perturbation="road", fraction=0.2):
    """The single-target faithfulness as it was before faithfulness_pair (the reference)."""
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer
    model = explain.LogitsModel(bb).eval()
    t = torch.tensor(np.asarray(targets, np.int64))
    rng = np.random.default_rng(seed)
    n, height, width = maps.shape
    k = int(round(fraction * height * width))
    rand = explain._random_maps(rng, n, height, width, 7)

    def probs(xs):
        with torch.no_grad():
            return torch.softmax(model(xs).float(), 1)[torch.arange(n), t].numpy()

    def remove(img, cam):
        order = np.lexsort((rng.random(height * width), -np.asarray(cam, np.float64).ravel()))
        keep = np.ones(height * width, np.float32)
        keep[order[:k]] = 0
        keep = torch.from_numpy(keep.reshape(height, width))
        if perturbation == "road":
            return NoisyLinearImputer()(img, keep)
        return torch.where(keep.bool(), img, img.mean(dim=(1, 2), keepdim=True))

    prob, drops = probs(x), {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for key, mp in (("cam", maps), ("random", rand)):
            drops[key] = prob - probs(torch.stack([remove(x[i], mp[i]) for i in range(n)]))
    return prob, drops["cam"], drops["random"]


@pytest.mark.parametrize("perturbation", ["road", "mean"])
def test_one_forward_pair_equals_the_two_call_path(models, perturbation, monkeypatch):
    """cams_given_pred == two compute_cams calls; faithfulness_pair == the old two calls,
    with examples whose given and predicted class agree (0, 2) and differ (1, 3)."""
    from hardprobe.stages.explain.cams import cams_given_pred
    bb = models["cifar"]  # confident (random-init, 10 classes): removals move the probability
    x = batch(bb, 4, seed=1)
    with torch.no_grad():
        order = bb(x)[1].argsort(dim=1, descending=True)
    given = [int(order[i, 0]) for i in range(4)]  # top class: positive evidence, real maps
    pred = [given[0], int(order[1, 1]), given[2], int(order[3, 2])]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CamWarning)
        gm, pm, probs = cams_given_pred(bb, x, given, pred)
        g2, p2 = compute_cams(bb, x, given), compute_cams(bb, x, pred)
    assert (~blank_maps(gm)).sum() >= 2 and not np.allclose(gm[1], pm[1], atol=1e-3)
    np.testing.assert_allclose(gm, g2, atol=1e-5)
    np.testing.assert_allclose(pm, p2, atol=1e-5)
    with torch.no_grad():
        np.testing.assert_allclose(probs, torch.softmax(bb(x)[1], 1).numpy(), atol=1e-6)
    made, remove = [], explain._remove_top
    monkeypatch.setattr(explain, "_remove_top", lambda *a: made.append(1) or remove(*a))
    gf, pf = explain.faithfulness_pair(bb, x, given, pred, gm, pm, seed=5, probs=probs,
                                       perturbation=perturbation)
    assert len(made) == 4 + 2 + 4  # given's, pred's where it differs, the random map's once
    monkeypatch.setattr(explain, "_remove_top", remove)
    for f, tg, mp in ((gf, given, gm), (pf, pred, pm)):
        prob, cam, rnd = _old_faithfulness(bb, x, tg, mp, seed=5, perturbation=perturbation)
        np.testing.assert_allclose(f["prob"], prob, atol=1e-6)
        np.testing.assert_allclose(f["drop_cam_each"], cam, atol=1e-5)
        np.testing.assert_allclose(f["drop_random_each"], rnd, atol=1e-5)
        assert np.abs(cam).max() > 1e-6  # the perturbations change the probabilities
        one = explain.faithfulness(bb, x, tg, mp, seed=5, perturbation=perturbation)
        np.testing.assert_allclose(one["drop_random_each"], rnd, atol=1e-5)


def test_cams_given_pred_library_path_falls_back(models):
    from hardprobe.stages.explain.cams import cams_given_pred
    bb = models["cifar"]
    x = batch(bb, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CamWarning)
        gm, pm, probs = cams_given_pred(bb, x, [0, 1], [2, 1], fast=False)
        np.testing.assert_allclose(pm, compute_cams(bb, x, [2, 1], fast=False), atol=1e-6)
    assert probs is None and gm.shape == pm.shape == (2, 32, 32)
    with pytest.raises(CamError, match="1 targets for a batch of 2"):
        cams_given_pred(bb, x, [0], [1])


# ------------------------------------------------------------------ guards
def test_target_list_must_match_the_batch(models):
    bb = models["cifar"]
    for fast in (True, False):
        with pytest.raises(CamError, match="2 targets for a batch of 4"):
            compute_cams(bb, batch(bb), [0, 1], fast=fast)
        with pytest.raises(CamError, match="outside the 10 logits"):
            compute_cams(bb, batch(bb, 2), [0, 10], fast=fast)


def test_zero_head_and_class_token_layer_give_recorded_blank_maps(models):
    vit = models["vit"]
    x = batch(vit, 2)
    with zeroed(vit.model.heads.head), pytest.warns(CamWarning, match=r"examples \[0, 1\]"):
        maps = compute_cams(vit, x, [0, 1])
    assert not maps.any()
    assert list(cam_stats(maps)["warning"]) == ["all-zero map"] * 2
    with pytest.warns(CamWarning, match="encoder.ln"):  # after the encoder only the class token
        maps = compute_cams(vit, x, [0, 1], layer="encoder.ln")  # reaches the head
    assert not maps.any()


def test_layer_off_the_gradient_path_is_an_error():
    bb = quadrant_backbone()
    for fast in (True, False):
        with pytest.raises(CamError, match="no gradient of the logits reaches layer 'aux'"):
            compute_cams(bb, patches(), [0, 1], layer="aux", fast=fast)
        with pytest.raises(CamError, match="'unused' never ran"):
            compute_cams(bb, patches(), [0, 1], layer="unused", fast=fast)


def test_non_finite_maps_and_shared_layers_are_errors(models):
    bb = models["cifar"]
    x = batch(bb, 2)
    x[1, :, 3, 3] = float("nan")
    for fast in (True, False):
        with pytest.raises(CamError, match=r"examples \[1\].*not finite"):
            compute_cams(bb, x, [0, 1], fast=fast)
    relu = nn.ReLU()  # one module called twice: which call's CAM?
    net = nn.Sequential(nn.Conv2d(3, 4, 3), relu, relu, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(4, 2))
    shared = Backbone(name="shared", model=net, preprocess=Preprocess(None, None, (0,) * 3,
                                                                      (1,) * 3),
                      embed_dim=2, class_names=["a", "b"], cam_layer="1", weights_id="t",
                      forward_fn=lambda m, x: (None, m(x)))
    for fast in (True, False):
        with pytest.raises(CamError, match="ran 2 times"):
            compute_cams(shared, batch(bb, 2), [0, 1], fast=fast)


def test_unknown_method_and_layer_name_the_choices(models):
    bb = models["cifar"]
    with pytest.raises(CamError, match="choose one of gradcam, gradcam\\+\\+, xgradcam"):
        compute_cams(bb, batch(bb, 1), [0], method="gradcan")
    with pytest.raises(CamError, match=r"no layer 'layer33'.*layer3.*hardprobe layers "
                                       r"cifar_resnet20"):
        resolve_layer(bb, "layer33")
    assert resolve_layer(bb) is bb.model.layer3


def test_token_output_without_reshape_is_an_error(models):
    vit = models["vit"]
    reshape, vit.cam_reshape = vit.cam_reshape, None
    try:
        with pytest.raises(CamError, match="cam_reshape"):
            compute_cams(vit, batch(vit, 1), [0])
    finally:
        vit.cam_reshape = reshape


# ------------------------------------------------------------------ statistics
def test_cam_stats_by_hand():
    a = np.zeros((4, 5))
    a[0, 4], a[3, 0] = 1, 3  # mass 1/4 and 3/4; top 10% = 2 pixels
    b = np.ones((4, 5))
    b[1, 2] = 2  # total 21; top 2 pixels hold 3
    st = cam_stats(np.stack([a, b, np.zeros((4, 5)), np.full((4, 5), 0.7)]))
    assert st.loc[0, ["peak_y", "peak_x", "top10_mass"]].tolist() == [1.0, 0.0, 1.0]
    ent = -(0.25 * np.log(0.25) + 0.75 * np.log(0.75)) / np.log(20)
    assert st.loc[0, "entropy"] == pytest.approx(ent)
    assert st.loc[1, ["peak_y", "peak_x"]].tolist() == [1 / 3, 0.5]
    assert st.loc[1, "top10_mass"] == pytest.approx(3 / 21)
    p = np.array([2] + [1] * 19) / 21
    assert st.loc[1, "entropy"] == pytest.approx(-(p * np.log(p)).sum() / np.log(20))
    assert st["warning"].isna().tolist() == [True, True, False, False]  # null: no warning
    assert st["warning"][2:].tolist() == ["all-zero map", "constant map"]
    assert st.loc[2:, ["peak_y", "peak_x", "top10_mass", "entropy"]].isna().all().all()


def test_model_input_view_matches_the_preprocessing():
    pre = Preprocess(40, 32, (0.5, 0.4, 0.3), (0.2, 0.2, 0.2), interpolation="bicubic")
    img = torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8)
    view = explain.model_input_view(pre, img)
    assert view.shape == (32, 32, 3) and view.dtype == np.uint8
    mean, std = torch.tensor(pre.mean)[:, None, None], torch.tensor(pre.std)[:, None, None]
    x = (torch.from_numpy(view).permute(2, 0, 1).float() / 255 - mean) / std
    torch.testing.assert_close(x, pre(img))


# ------------------------------------------------------------------ the stage
def test_explain_run_end_to_end(tiny_folder, tmp_path, monkeypatch):
    train, test = tiny_folder
    cfg = build_config(model="cifar_resnet20", random_init=True, data="imagefolder",
                       train=str(train), test=str(test), out=str(tmp_path / "run"),
                       cache_dir=str(tmp_path / "cache"), k=5, num_workers=0, batch_size=16,
                       linear_c=0.01)  # not the default: the stored probe must carry it
    from hardprobe.heads import LinearProbe
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_dir = pipeline.run(cfg, progress=False)
        # explain uses the probe classify stored in RUN_DIR/heads/: it fits nothing (issue 12)
        monkeypatch.setattr(LinearProbe, "fit", lambda *a, **k: pytest.fail("refitted"))
        out = explain.explain_run(run_dir, top=5, batch_size=3, progress=False)
    run = hardprobe.load_run(run_dir)
    hardest = run.split_examples("test").sort_values("hardness", ascending=False,
                                                     kind="stable").head(5)
    with np.load(out / "cams.npz", allow_pickle=False) as z:
        assert z["ids"].tolist() == hardest["id"].tolist() and z["ids"].dtype.kind == "U"
        assert z["images"].shape == (5, 32, 32, 3) and z["images"].dtype == np.uint8
        for key in ("given", "pred"):
            assert z[key].shape == (5, 32, 32) and z[key].dtype == np.float16
            assert 0 <= z[key].min() and z[key].max() <= 1
        assert z["given_class"].tolist() == hardest["label"].tolist()
        assert z["pred_class"].tolist() == hardest["pred_linear"].tolist()
        assert z["given_class"].dtype.kind == "i"
        img = run.images([hardest["id"].iloc[0]])[0]
        assert (z["images"][0] == img.permute(1, 2, 0).numpy()).all()
    st = pd.read_parquet(out / "cam_stats.parquet")
    assert list(st.columns) == ["id", "target", "class_index", "class_name", "peak_y", "peak_x",
                                "top10_mass", "entropy", "warning"]
    assert len(st) == 10 and set(st["target"]) == {"given", "pred"}
    assert set(st["class_name"]) <= {"cat", "dog", "frog"}
    meta = json.loads((out / "meta.json").read_text())
    assert meta["method"] == "gradcam" and meta["layer"] == "layer3" and meta["fast_path"]
    assert meta["n"] == 5 and meta["score_head"].startswith("linear")
    assert meta["throughput"].startswith("not measured") and meta["images_per_s"] > 0
    assert set(meta["seconds_by_part"]) == {"images", "cams", "faithfulness", "throughput",
                                            "save"}
    assert meta["seconds_by_part"]["throughput"] == 0
    for key in ("given", "pred"):
        f = meta["faithfulness"][key]
        assert np.isfinite([f["drop_cam"], f["drop_random"]]).all() and f["n"] == 5
    assert isinstance(meta["warnings"], list)
    assert "classify fitted" in meta["score_head"]
    head, note = explain._score_head(run, "pred_linear")  # the CAMs' class scores: the run's
    with torch.no_grad():  # stored linear probe; it reproduces classify's test probabilities
        logits = head(torch.from_numpy(run.features("test"))).double()
    t = run.split_examples("test")
    assert (logits.argmax(1).numpy() == t["pred_linear"]).all()
    p = torch.softmax(logits, 1).numpy()[np.arange(len(t)), t["label"].to_numpy()]
    np.testing.assert_allclose(p, t["prob_true_linear"], rtol=1e-4, atol=1e-6)
    again = explain.explain_run(run_dir, top=5, batch_size=3, progress=False, benchmark=True)
    meta2 = json.loads((again / "meta.json").read_text())
    assert meta2["throughput"]["max_abs_diff"] < 1e-5 and meta2["throughput"]["batch"] == 3
    assert meta2["faithfulness"] == meta["faithfulness"]  # timing it changes no number
    picked = explain._select(run.examples, [hardest["id"].iloc[2]], top=16, split="test")
    assert picked["id"].tolist() == [hardest["id"].iloc[2]]
    with pytest.raises(CamError, match="unknown example ids"):
        explain.explain_run(run_dir, ids=["test/cat/nope.png"], progress=False)
