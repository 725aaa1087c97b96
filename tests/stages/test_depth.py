"""Prediction depth: the definition, a network whose answer is known, the cache, the stage."""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_folder

import hardprobe
from hardprobe import pipeline
from hardprobe.backbones import Backbone, Preprocess
from hardprobe.config import build_config
from hardprobe.core.io import read_json
from hardprobe.data.datasets import Split
from hardprobe.stages import depth as D


# ------------------------------------------------------------------ the definition
def test_prediction_depth_by_hand():
    final = np.array([0, 0, 0, 0, 1, 1])
    preds = np.array([[0, 1, 1, 0, 1, 0],   # layer 0
                      [0, 0, 1, 1, 1, 0],   # layer 1
                      [0, 0, 0, 0, 1, 0]])  # layer 2 (the last)
    # ex 3 agrees at 0, not at 1: settles at 2; ex 5's last layer disagrees: never (= 3)
    np.testing.assert_array_equal(D.prediction_depth(preds, final), [0, 1, 2, 2, 0, 3])
    with pytest.raises(ValueError, match="must be"):
        D.prediction_depth(preds[:, :3], final)


def test_pool_output_conv_tokens_and_tuples():
    x = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    torch.testing.assert_close(D.pool_output(x), x.mean(dim=(2, 3)))
    torch.testing.assert_close(D.pool_output((x, "aux")), x.mean(dim=(2, 3)))
    nhwc = x.permute(0, 2, 3, 1)  # a timm NHWC map with its cam_reshape
    torch.testing.assert_close(D.pool_output(nhwc, lambda t: t.permute(0, 3, 1, 2)),
                               x.mean(dim=(2, 3)))
    tokens = torch.randn(2, 1 + 4, 6)  # class token + a 2x2 patch grid
    grid = lambda t: t[:, 1:].reshape(2, 2, 2, 6).permute(0, 3, 1, 2)  # noqa: E731
    torch.testing.assert_close(D.pool_output(tokens, grid), tokens[:, 1:].mean(1))
    torch.testing.assert_close(D.pool_output(tokens), tokens.mean(1))  # no grid: all tokens
    torch.testing.assert_close(D.pool_output(tokens, grid, "cls"), tokens[:, 0])


def test_stratified_subset_keeps_class_shares():
    labels = np.array([0] * 90 + [1] * 30 + [2] * 30)
    pos = D.stratified_subset(labels, 30, seed=3)
    assert len(pos) == 30 and (np.diff(pos) > 0).all()
    assert np.bincount(labels[pos]).tolist() == [18, 6, 6]
    np.testing.assert_array_equal(pos, D.stratified_subset(labels, 30, seed=3))
    np.testing.assert_array_equal(D.stratified_subset(labels, None), np.arange(150))
    np.testing.assert_array_equal(D.stratified_subset(labels, 500), np.arange(150))


# ------------------------------------------------------------------ a network with known depths
class Pick(torch.nn.Module):
    """Reads input channel i (a 0/1 class code as a dark/bright image) -> 2 features."""

    def __init__(self, i: int, tokens: bool = False):
        super().__init__()
        self.i, self.tokens = i, tokens

    def forward(self, x):
        v = x[:, self.i:self.i + 1]
        h = torch.cat([v, 1 - v], dim=1)  # (N, 2, H, W)
        return h.flatten(2).transpose(1, 2) if self.tokens else h  # tokens: (N, H*W, 2)


class ThreeLayers(torch.nn.Module):
    """Layer l sees only the class code in input channel l: the data decides where the class
    information is right and where it points to the other class."""

    def __init__(self):
        super().__init__()
        self.layer0, self.layer1, self.layer2 = Pick(0), Pick(1, tokens=True), Pick(2)
        self.calls = 0

    def forward(self, x):
        self.calls += len(x)
        self.layer0(x), self.layer1(x)
        emb = self.layer2(x).mean(dim=(2, 3))
        return emb, emb


def synthetic_split(name, codes, labels, seed) -> Split:
    """codes (N, 3) in {0, 1}: the class each layer sees; images (3, 4, 4) uint8."""
    rng = np.random.default_rng(seed)
    imgs = [torch.from_numpy((np.where(np.asarray(c)[:, None, None] == 1, 200, 55)
                              + rng.integers(-20, 21, (3, 4, 4))).astype(np.uint8))
            for c in codes]
    ids = [f"{name}/{i}" for i in range(len(codes))]
    ex = pd.DataFrame({"id": ids, "split": name, "path": ids, "label": labels,
                       "label_name": [str(y) for y in labels]})
    return Split(name, "memory", ex, imgs.__getitem__, f"synthetic-{name}-{seed}")


def test_depths_of_a_network_where_the_answer_is_known(tmp_path, monkeypatch):
    net = ThreeLayers().eval()
    bb = Backbone(name="three", model=net, preprocess=Preprocess(None, None, (0, 0, 0), (1, 1, 1)),
                  embed_dim=2, class_names=None, cam_layer="layer2", weights_id="test:three",
                  forward_fn=lambda m, x: m(x), depth_layers=["layer0", "layer1", "layer2"])
    y_train = np.repeat([0, 1], 10)
    train = synthetic_split("train", [[y] * 3 for y in y_train], y_train, 0)
    # test groups: (codes seen by layers 0, 1, 2 as functions of the class c) -> known depth
    groups = {0: lambda c: (c, c, c), 1: lambda c: (1 - c, c, c), 2: lambda c: (1 - c, 1 - c, c),
              3: lambda c: (c, c, 1 - c),       # the last layer disagrees: never settles
              4: lambda c: (c, 1 - c, c)}       # agrees at layer 0 but not 1: settles at 2
    want = {0: 0, 1: 1, 2: 2, 3: 3, 4: 2}
    y_test = np.tile([0, 1], 3 * len(groups))
    g_test = np.repeat(list(groups), 6)
    test = synthetic_split("test", [groups[g](c) for g, c in zip(g_test, y_test)], y_test, 1)
    kw = dict(cache_dir=tmp_path, batch_size=4, shard_size=7, progress=False)
    (ftr, ok_tr, _), (fte, ok_te, entry) = (D.extract_layer_features(bb, s, **kw)
                                            for s in (train, test))
    assert ok_tr.all() and ok_te.all() and list(fte) == bb.depth_layers
    assert all(f.shape == (len(y_test), 2) for f in fte.values())
    trl, tel = list(ftr.values()), list(fte.values())
    preds = D.layer_knn_predictions(trl, y_train, tel, k=5, n_classes=2)  # (3, N)
    final = y_test  # the model's final prediction: the class (layer 2's code in group != 3)
    depth = D.prediction_depth(preds, final)
    np.testing.assert_array_equal(depth, [want[g] for g in g_test])
    # train examples, left out of their own vote, agree everywhere: depth 0
    loo = D.layer_knn_predictions(trl, y_train, None, k=5, n_classes=2)
    assert (D.prediction_depth(loo, y_train) == 0).all()

    # the cache: a rerun reads the arrays without running the model
    calls = net.calls
    monkeypatch.setattr(D, "_fill_shards", lambda *a, **k: pytest.fail("recomputed"))
    again, _, entry2 = D.extract_layer_features(bb, test, **kw)
    assert net.calls == calls and entry2.dir == entry.dir
    np.testing.assert_array_equal(again["layer1"], fte["layer1"])
    # ... and the key names the layers and the rows
    assert D.depth_key(bb, test, np.arange(5), ["layer2"], "mean") != entry.key
    assert D.depth_key(bb, test, np.arange(len(test)), bb.depth_layers, "mean") == entry.key


def test_extract_refuses_unknown_layers(tiny_backbone, tmp_path):
    split = synthetic_split("test", [[0, 0, 0]], [0], 0)
    with pytest.raises(ValueError, match="not modules of tiny"):
        D.extract_layer_features(tiny_backbone, split, layers=["nope"], cache_dir=tmp_path)
    with pytest.raises(ValueError, match="names no depth layers"):
        D.extract_layer_features(tiny_backbone, split, cache_dir=tmp_path)


# ------------------------------------------------------------------ the stage
@pytest.fixture
def tiny_run(tmp_path):
    train, test = make_folder(tmp_path / "train", 12, 0), make_folder(tmp_path / "test", 4, 1)
    cfg = build_config(model="cifar_resnet20", random_init=True, data="imagefolder",
                       train=str(train), test=str(test), out=str(tmp_path / "run"),
                       cache_dir=str(tmp_path / "cache"), k=5, num_workers=0,
                       similarity=False, top=0, report=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pipeline.run(cfg, progress=False)


def test_depth_run_end_to_end(tiny_run, monkeypatch):
    out = D.depth_run(tiny_run, k=None, progress=False)  # k=None: the run's k (5)
    run = hardprobe.load_run(tiny_run)
    layers = read_json(out / "layers.json")["layers"]
    assert layers == [f"layer{s}.{i}" for s in (1, 2, 3) for i in range(3)]
    d = pd.read_parquet(out / "depth.parquet")
    ex = run.examples
    assert len(d) == len(ex) == 48 and set(d["split"]) == {"train", "test"}
    assert d["prediction_depth"].between(0, len(layers)).all()
    # the primary head here is linear (the CIFAR classifier does not fit 3 classes)
    merged = d.merge(ex, on="id", suffixes=("", "_ex"))
    assert (merged["final_pred"] == merged["pred_linear"]).all()
    np.testing.assert_array_equal(merged["prediction_depth"], merged["prediction_depth_ex"])
    agree = d[[f"agree_{i}" for i in range(9)]].to_numpy()
    np.testing.assert_array_equal(D.prediction_depth(agree.T, np.ones(len(d), bool)),
                                  d["prediction_depth"])
    # the last probed layer is the embedding: its probe is the run's kNN head
    assert (merged["knn_pred_8"] == merged["pred_knn"]).mean() >= 0.95
    s = read_json(out / "summary.json")
    assert s["n_layers"] == 9 and s["primary_head"] == "linear" and s["k_used"] == 5
    for split in ("train", "test"):
        assert len(s["knn_accuracy"][split]) == 9
        assert sum(s["splits"][split]["depth_counts"]) == (36 if split == "train" else 12)
    assert set(s["spearman_hardness"]) == {"rho", "p", "n"}

    # a rerun reads the cached layer features; a subset leaves the other rows NaN
    monkeypatch.setattr(D, "_fill_shards", lambda *a, **k: pytest.fail("recomputed"))
    D.depth_run(tiny_run, k=None, progress=False)
    monkeypatch.undo()
    D.depth_run(tiny_run, k=None, subset=6, progress=False)
    ex = hardprobe.load_run(tiny_run).examples
    covered = ex[ex["prediction_depth"].notna()]
    assert covered.groupby("split").size().to_dict() == {"test": 6, "train": 6}
    assert covered.groupby(["split", "label"]).size().eq(2).all()  # stratified: 2 per class
    assert read_json(out / "summary.json")["subset"] == 6


def test_depth_probes_default_to_baldocks_k_not_the_runs(tiny_run):
    """Issue 13, item 9: Baldock et al. probe with k = 30; the run's kNN head uses k = 5 here."""
    import inspect

    from hardprobe.config import DepthConfig
    assert inspect.signature(D.depth_run).parameters["k"].default == 30 == DepthConfig().k
    out = D.depth_run(tiny_run, progress=False)  # 36 train examples: k = 30 fits
    s, layers = read_json(out / "summary.json"), read_json(out / "layers.json")
    assert s["k"] == s["k_used"] == layers["k"] == 30
    assert any("k = 30 as in Baldock" in n and "k = 5" in n for n in s["notes"])
    d = pd.read_parquet(out / "depth.parquet")
    # the last probe (the embedding) is a 30-neighbour vote: recompute it from the run
    run = hardprobe.load_run(tiny_run)
    tr = run.examples["split"].to_numpy() == "train"
    want = D.layer_knn_predictions([run.features("train")], run.examples.loc[tr, "label"]
                                   .to_numpy(), k=30, n_classes=len(run.class_names))[0]
    got = d[d["split"] == "train"].set_index("id").loc[run.examples.loc[tr, "id"], "knn_pred_8"]
    assert (got.to_numpy() == want).mean() >= 0.95


def test_depth_run_needs_scores(tmp_path):
    from hardprobe.rundir.run import write_examples
    write_examples(tmp_path, pd.DataFrame({"id": ["a"], "split": ["train"], "label": [0]}))
    with pytest.raises(ValueError, match="classify"):
        D.depth_run(tmp_path, progress=False)
