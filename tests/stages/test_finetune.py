"""Fine-tuning stage: the MLP head, exact resume, AUM on planted noise, the joined columns."""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_folder
from sklearn.base import clone
from sklearn.datasets import make_classification
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from hardprobe import pipeline
from hardprobe.backbones import Backbone, Preprocess, create_backbone
from hardprobe.config import build_config, save_config
from hardprobe.core.io import write_json
from hardprobe.heads import MLPHead, training
from hardprobe.rundir.run import save_array, write_examples
from hardprobe.stages.finetune.images import (
    FineTuneNet,
    augment,
    last_stage,
    set_trainable,
    train_mode,
)
from hardprobe.stages.finetune.stage import finetune_run

FAST = dict(epochs=3, batch_size=8, num_workers=0, progress=False)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems: see conftest


@pytest.fixture(scope="module")
def image_run(tmp_path_factory) -> Path:
    """A real tiny run: random-init cifar_resnet20 on 3 colour classes, 12 + 4 images each."""
    root = tmp_path_factory.mktemp("ft")
    train, test = make_folder(root / "train", 12, 0), make_folder(root / "test", 4, 1)
    cfg = build_config(model="cifar_resnet20", random_init=True, data="imagefolder",
                       train=str(train), test=str(test), out=str(root / "run"),
                       cache_dir=str(root / "cache"), k=5, num_workers=0, similarity=False,
                       top=0, report=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pipeline.run(cfg, progress=False)


def copy_run(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


def synthetic_run(root: Path, *, n_train=600, n_test=200, n_classes=4, noise=0.1, seed=0):
    """A run directory on synthetic features (no images): separable classes, `noise` of the
    train labels flipped to another class (planted_noise, clean_label kept), then classified."""
    X, y = make_classification(n_samples=n_train + n_test, n_features=16, n_informative=8,
                               n_redundant=0, n_classes=n_classes, n_clusters_per_class=1,
                               class_sep=2.0, random_state=seed)
    rng = np.random.default_rng(seed)
    split = np.array(["train"] * n_train + ["test"] * n_test)
    flip = np.zeros(len(y), bool)
    flip[rng.choice(n_train, int(noise * n_train), replace=False)] = True
    given = np.where(flip, (y + rng.integers(1, n_classes, len(y))) % n_classes, y)
    names = [f"c{k}" for k in range(n_classes)]
    ex = pd.DataFrame({"id": [f"{s}/{i:05d}.png" for i, s in enumerate(split)], "split": split,
                       "path": [f"{i:05d}.png" for i in range(len(y))],
                       "label": given.astype(np.int64), "label_name": [names[k] for k in given],
                       "clean_label": y, "planted_noise": flip})
    root.mkdir(parents=True)
    save_config(build_config(model="cifar_resnet20", random_init=True, data="imagefolder",
                             train=str(root / "no-images"), out=str(root), heads=["knn", "linear"],
                             duplicates=False,  # features only: no pixels to compare
                             k=10, top=0, similarity=False, report=False), root / "config.yaml")
    write_examples(root, ex)
    for s in ("train", "test"):
        save_array(root, s, "embedding", X[split == s].astype(np.float32))
    write_json(root / "provenance.json", {
        "dataset": {"name": "synthetic", "class_names": names, "splits": {}},
        "features": {s: {"key": f"synthetic-{s}-{seed}"} for s in ("train", "test")},
        "model_head": False})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipeline.classify(root)
    return root


# ---------------------------------------------------------------- MLPHead
def test_mlp_head_on_separable_data():
    X, y = make_classification(n_samples=900, n_features=20, n_informative=10, n_redundant=0,
                               n_classes=3, class_sep=2.0, random_state=0)
    Xtr, ytr, Xte, yte = X[:600], y[:600], X[600:], y[600:]
    ref = LogisticRegression(max_iter=2000).fit(StandardScaler().fit(Xtr).transform(Xtr), ytr)
    ref_acc = ref.score(StandardScaler().fit(Xtr).transform(Xte), yte)
    for hidden in ((64,), ()):
        head = MLPHead(hidden=hidden, dropout=0.2, epochs=20, batch_size=32, lr=3e-3, seed=1)
        assert head.fit(Xtr, ytr) is head
        p = head.predict_proba(Xte)
        np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-9)
        assert np.mean(head.predict(Xte) == yte) >= ref_acc - 0.03
        assert len(head.history_) == 20 and head.dynamics_["margin"].shape == (600, 20)
        assert head.n_classes_ == 3 and head.n_features_in_ == 20
    again = clone(head).fit(Xtr, ytr)  # sklearn clone: same params, same seed, same result
    np.testing.assert_array_equal(again.predict_proba(Xte), p)
    with pytest.raises(ValueError, match="epochs"):
        MLPHead(epochs=0).fit(Xtr, ytr)
    with pytest.raises(ValueError, match="features"):
        head.predict_proba(Xte[:, :5])


# ---------------------------------------------------------------- resume
@pytest.fixture(scope="module")
def uninterrupted(image_run, tmp_path_factory) -> Path:
    run = copy_run(image_run, tmp_path_factory.mktemp("a") / "run")
    finetune_run(run, mode="all", **FAST)
    return run


def _interrupt_mid_epoch(monkeypatch):
    """KeyboardInterrupt after the first batch of the 5th epoch trained (run1, epoch 2)."""
    orig, calls = training.Trainer._epoch, {"n": 0}

    def epoch(self, e, batches):
        calls["n"] += 1
        if calls["n"] != 5:
            return orig(self, e, batches)

        def one_batch_then_stop(order, gen):
            yield next(iter(batches(order, gen)))
            raise KeyboardInterrupt
        return orig(self, e, one_batch_then_stop)
    monkeypatch.setattr(training.Trainer, "_epoch", epoch)


def _interrupt_after_checkpoint(monkeypatch):
    """KeyboardInterrupt right after the 2nd checkpoint is written (run0, epoch 2)."""
    orig, calls = training.Trainer.save, {"n": 0}

    def save(self):
        path = orig(self)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return path
    monkeypatch.setattr(training.Trainer, "save", save)


@pytest.mark.parametrize("interrupt, epochs_left", [(_interrupt_mid_epoch, 2),
                                                    (_interrupt_after_checkpoint, 4)])
def test_resume_is_bit_identical(image_run, uninterrupted, tmp_path, monkeypatch, interrupt,
                                 epochs_left):
    run = copy_run(image_run, tmp_path / "run")
    with monkeypatch.context() as m:
        interrupt(m)
        with pytest.raises(KeyboardInterrupt):
            finetune_run(run, mode="all", **FAST)
    assert not (run / "finetune" / "summary.json").exists()
    done = {"n": 0}
    orig = training.Trainer._epoch

    def counting(self, e, batches):
        done["n"] += 1
        return orig(self, e, batches)
    monkeypatch.setattr(training.Trainer, "_epoch", counting)
    finetune_run(run, mode="all", resume=True, **FAST)
    assert done["n"] == epochs_left  # it resumed: the finished epochs did not run again
    a, b = uninterrupted / "finetune", run / "finetune"
    pd.testing.assert_frame_equal(pd.read_parquet(a / "per_example.parquet"),
                                  pd.read_parquet(b / "per_example.parquet"), check_exact=True)
    with np.load(a / "dynamics.npz") as za, np.load(b / "dynamics.npz") as zb:
        assert za.files == zb.files
        for k in za.files:
            assert np.array_equal(za[k], zb[k], equal_nan=za[k].dtype.kind == "f"), k
    for job in ("run0", "run1"):
        sa = torch.load(a / "checkpoints" / job / "epoch_0003.pt", weights_only=True)
        sb = torch.load(b / "checkpoints" / job / "epoch_0003.pt", weights_only=True)
        for name, t in sa["model"].items():
            assert torch.equal(t, sb["model"][name]), (job, name)
        assert sa["history"][-1]["loss"] == sb["history"][-1]["loss"]


def test_resume_refuses_other_options(image_run, tmp_path):
    run = copy_run(image_run, tmp_path / "run")
    finetune_run(run, mode="head", aum_runs=0, **FAST)
    with pytest.raises(training.CheckpointMismatchError, match="resume=False"):
        finetune_run(run, mode="head", aum_runs=0, resume=True, **{**FAST, "batch_size": 4})
    finetune_run(run, mode="head", aum_runs=0, **{**FAST, "batch_size": 4})  # starts over


# ---------------------------------------------------------------- AUM on planted noise
def test_planted_noise_is_flagged_by_aum(tmp_path):
    run = synthetic_run(tmp_path / "syn", noise=0.1)
    out = finetune_run(run, mode="head", epochs=20, lr=0.05, batch_size=32, progress=False)
    ex = pd.read_parquet(run / "examples.parquet")
    tr = ex[ex["split"] == "train"]
    assert tr["ft_aum_flag"].notna().all()  # two AUM runs: every example has a verdict
    flag, truth = tr["ft_aum_flag"].astype(bool), tr["planted_noise"]
    precision, recall = (flag & truth).sum() / flag.sum(), (flag & truth).sum() / truth.sum()
    base = truth.mean()
    assert precision >= 3 * base and recall >= 0.8, (precision, recall, base)
    # flipped examples have much lower AUM than the rest
    assert tr.loc[truth, "ft_aum"].median() < tr.loc[~truth, "ft_aum"].quantile(0.05)
    s = json.loads((out / "summary.json").read_text())
    pn = s["planted_noise"]
    assert pn["planted"] == truth.sum() and pn["aum"]["caught"] == (flag & truth).sum()
    assert pn["aum"]["precision"] == pytest.approx(precision)
    li = tr["label_issue"].astype(bool)
    assert pn["label_issue"]["caught"] == (li & truth).sum()
    assert pn["matched"]["at_aum_count"]["label_quality"]["flagged"] == flag.sum()
    assert pn["matched"]["at_label_issue_count"]["aum"]["flagged"] == li.sum()
    assert s["aum"]["flagged"] == flag.sum() and len(s["aum"]["thresholds"]) == 2


def test_folds_and_no_aum_runs(tmp_path):
    run = synthetic_run(tmp_path / "syn", n_train=150, n_test=40, noise=0.0)
    out = finetune_run(run, mode="mlp", epochs=4, folds=3, aum_runs=0, batch_size=32,
                       optimizer="adamw", progress=False)
    s = json.loads((out / "summary.json").read_text())
    assert set(s["jobs"]) == {"run0", "fold0", "fold1", "fold2"}
    assert s["train_in_sample"] is False and s["planted_noise"] is None
    assert sum(s["jobs"][f"fold{f}"]["n"] for f in range(3)) == 2 * 150
    ex = pd.read_parquet(run / "examples.parquet")
    assert ex["ft_pred"].notna().all() and not ex["ft_in_sample"].any()
    tr = ex[ex["split"] == "train"]
    assert tr["ft_aum_flag"].isna().all() and tr["ft_aum"].notna().all()  # no thresholds


# ---------------------------------------------------------------- the joined table
def test_columns_joined_nan_outside_subset(image_run, tmp_path):
    run = copy_run(image_run, tmp_path / "run")
    ex = pd.read_parquet(run / "examples.parquet")
    ex["prediction_depth"] = np.arange(len(ex), dtype=float)  # another stage's column
    ex["ft_stale"] = 1.0  # an earlier fine-tune's column: replaced
    write_examples(run, ex)
    finetune_run(run, mode="head", subset=15, precision="bf16", **FAST)
    new = pd.read_parquet(run / "examples.parquet")
    assert new["id"].tolist() == ex["id"].tolist()
    np.testing.assert_array_equal(new["prediction_depth"], ex["prediction_depth"])
    assert "ft_stale" not in new and "hardness" in new and "label_issue" in new
    ft = [c for c in new.columns if c.startswith("ft_")]
    assert {"ft_prob_true", "ft_pred", "ft_margin", "ft_hardness", "ft_confidence",
            "ft_variability", "ft_correctness", "ft_region", "ft_aum", "ft_aum_flag",
            "ft_forgetting", "ft_never_learned", "ft_in_sample"} <= set(ft)
    tr, te = new[new["split"] == "train"], new[new["split"] == "test"]
    inside = tr["ft_prob_true"].notna()
    assert inside.sum() == 15 and tr.loc[inside, "label"].value_counts().min() == 5  # stratified
    assert tr.loc[~inside, ft].isna().all().all()
    assert tr.loc[inside, "ft_confidence"].notna().all() and tr.loc[inside, "ft_in_sample"].all()
    np.testing.assert_allclose(tr.loc[inside, "ft_hardness"], 1 - tr.loc[inside, "ft_prob_true"])
    assert te["ft_pred"].notna().all() and te["ft_confidence"].isna().all()
    s = json.loads((run / "finetune" / "summary.json").read_text())
    assert s["train_in_sample"] is True and "IN-SAMPLE" in " ".join(s["notes"])
    assert s["options"]["precision"] == "bf16" and s["n_train"] == 15
    assert s["accuracy_before"]["linear"]["test"] is not None
    assert sum(s["regions"].values()) == 15
    with np.load(run / "finetune" / "dynamics.npz") as z:
        assert z["prob_given"].shape == (2, 15, 3) and z["is_threshold"].sum(1).tolist() == [3, 3]
        assert (z["trained_label"][z["is_threshold"]] == 3).all()  # the fake class C


@pytest.mark.parametrize("kwargs, match", [
    (dict(mode="deep"), "mode must be one of"),
    (dict(epochs=0), "epochs must be >= 1"),
    (dict(subset=10_000), "larger than the train split"),
    (dict(subset=4), "too small"),
    (dict(folds=1), "folds must be 0"),
    (dict(aum_runs=3), "aum_runs"),
    (dict(subset=12, folds=5), "fewer folds"),
    (dict(optimizer="adam"), "optimizer must be one of"),
    (dict(mode="all", head_init="model"), "head_init='model'"),
    (dict(label_smoothing=1.0), "label_smoothing"),
    (dict(keep_checkpoints=0), "keep_checkpoints"),
])
def test_bad_options(image_run, kwargs, match):
    with pytest.raises(ValueError, match=match):
        finetune_run(image_run, **{**FAST, **kwargs})


def test_streamed_images_equal_in_memory(image_run, tmp_path, monkeypatch):
    """Images too large for memory are decoded every epoch: same batches, same result."""
    from hardprobe.stages.finetune import images as finetune_images
    kw = dict(mode="last", aum_runs=0, **{**FAST, "epochs": 2})
    a = finetune_run(copy_run(image_run, tmp_path / "a"), **kw)
    monkeypatch.setattr(finetune_images, "MEMORY_BUDGET", 0)
    streams, orig = [], finetune_images.ImageSource._stream
    monkeypatch.setattr(finetune_images.ImageSource, "_stream",
                        lambda self, order: streams.append(len(order)) or orig(self, order))
    b = finetune_run(copy_run(image_run, tmp_path / "b"), **kw)
    assert len(streams) == 2 + 1 + 1  # two training epochs, train and test predictions
    pd.testing.assert_frame_equal(pd.read_parquet(a / "per_example.parquet"),
                                  pd.read_parquet(b / "per_example.parquet"), check_exact=True)


# ---------------------------------------------------------------- depth and augmentation
def _fake(depth_layers):
    return Backbone(name="fake", model=torch.nn.Linear(2, 2), preprocess=Preprocess(
        None, None, (0.5,) * 3, (0.25,) * 3), embed_dim=2, class_names=None, cam_layer="",
        weights_id="x", forward_fn=lambda m, x: (x, None), depth_layers=depth_layers)


def test_last_stage_and_frozen_layers():
    bb = create_backbone("cifar_resnet20", random_init=True)
    assert last_stage(bb) == "layer3"
    assert last_stage(_fake(["layer1", "layer2", "layer3", "layer4"])) == "layer4"
    vit = [f"encoder.layers.encoder_layer_{i}" for i in range(12)]
    assert last_stage(_fake(vit)) == vit[-1]
    with pytest.raises(ValueError, match="mode='all'"):
        last_stage(_fake([]))
    net = FineTuneNet(bb, 3, n_extra=1)
    frozen = set_trainable(net, bb, "last")
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert all(n.startswith(("model.layer3.", "model.linear.", "head.")) for n in trainable)
    assert "head.weight" in trainable and "model.layer3.0.conv1.weight" in trainable
    assert "layer1" in frozen and "layer3" not in frozen
    train_mode(frozen)(net)
    assert not net.model.bn1.training and net.model.layer3[0].bn1.training
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 4)  # 3 classes + AUM's fake class
    assert set_trainable(net, bb, "all") == []


def test_augment_is_seeded_and_light():
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    a = augment(x, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and a.dtype == torch.uint8
    assert torch.equal(a, augment(x, torch.Generator().manual_seed(0)))
    assert not torch.equal(a, augment(x, torch.Generator().manual_seed(1)))
    big = torch.randint(0, 256, (2, 3, 96, 96), dtype=torch.uint8)
    assert augment(big, torch.Generator().manual_seed(0)).shape == big.shape


# ---------------------------------------------------------------- issue 13, item 4
def test_in_sample_predictions_come_from_a_run_that_trained_the_real_label(tmp_path,
                                                                          monkeypatch):
    """folds=0 with two AUM runs: run 0 trains its threshold samples under the fake class, so
    their predictions must come from run 1, which trained them under their given label."""
    from hardprobe.stages.finetune import stage as S
    run = synthetic_run(tmp_path / "syn", n_train=160, n_test=40, n_classes=3, noise=0.0)
    predicted, real = [], S._job

    def spy(ctx, name, index, pos, labels, n_extra, *, predict_train=None, **kw):
        if predict_train is not None:
            predicted.append((name, labels[predict_train]))
        return real(ctx, name, index, pos, labels, n_extra, predict_train=predict_train, **kw)
    monkeypatch.setattr(S, "_job", spy)
    out = finetune_run(run, mode="head", epochs=8, lr=0.05, batch_size=32, progress=False)
    assert {n for n, _ in predicted} == {"run0", "run1"}
    assert all((lab < 3).all() for _, lab in predicted)  # never the fake class 3
    assert sum(len(lab) for _, lab in predicted) == 160
    dyn = np.load(out / "dynamics.npz")
    tr = pd.read_parquet(run / "examples.parquet").set_index("id").loc[dyn["ids"]]
    thr0 = dyn["is_threshold"][0]
    # separable classes: the in-sample predictions of run 0's threshold samples are as right
    # as everyone else's (run 0's fake-label training would have pushed them down)
    acc = (tr["ft_pred"].astype(int) == tr["label"])
    assert acc[thr0].mean() >= 0.9 and acc[~thr0].mean() >= 0.9
    assert (tr.loc[thr0, "ft_prob_true"].median()
            >= tr.loc[~thr0, "ft_prob_true"].quantile(0.25) - 0.1)


def test_one_aum_run_leaves_its_threshold_samples_without_prediction(tmp_path):
    from hardprobe.report import write_report
    run = synthetic_run(tmp_path / "syn", n_train=160, n_test=40, n_classes=3, noise=0.0)
    out = finetune_run(run, mode="head", epochs=3, aum_runs=1, batch_size=32, progress=False)
    s = json.loads((out / "summary.json").read_text())
    dyn = np.load(out / "dynamics.npz")
    thr = dyn["is_threshold"][0]
    tr = pd.read_parquet(run / "examples.parquet").set_index("id").loc[dyn["ids"]]
    assert thr.sum() == 160 // 4 == s["train_without_prediction"]
    for col in ("ft_prob_true", "ft_pred", "ft_hardness"):
        assert tr.loc[thr, col].isna().all() and tr.loc[~thr, col].notna().all(), col
    ok = ~thr
    want = (tr.loc[ok, "ft_pred"].astype(int) == tr.loc[ok, "label"]).mean()
    assert s["accuracy_after"]["train"] == pytest.approx(want)
    assert any("threshold samples" in n and "NaN" in n for n in s["notes"])
    text = write_report(run, top=0).read_text()
    assert "no prediction (NaN), left out of its train accuracy" in text
