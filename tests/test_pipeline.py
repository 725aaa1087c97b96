"""End to end: images -> features -> heads -> scores in a run directory."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import hardprobe
from hardprobe import pipeline
from hardprobe.config import build_config


@pytest.fixture
def cfg(tiny_folder, tmp_path):
    train, test = tiny_folder
    return build_config(model="cifar_resnet20", random_init=True, data="imagefolder",
                        train=str(train), test=str(test), out=str(tmp_path / "run"),
                        cache_dir=str(tmp_path / "cache"), k=5, num_workers=0, batch_size=16,
                        similarity=False, top=0, report=False)  # the later stages: own test


def test_run_writes_the_contract(cfg):
    out = pipeline.run(cfg, progress=False)
    run = hardprobe.load_run(out)
    ex = run.examples
    assert len(ex) == 48 and set(ex["split"]) == {"train", "test"}
    for col in ["id", "split", "path", "label", "label_name", "pred_knn", "prob_true_knn",
                "margin_knn", "entropy_knn", "pred_linear", "prob_true_linear",
                "knn_disagreement", "hardness", "label_issue", "label_quality"]:
        assert col in ex.columns, col
    assert ex["hardness"].between(0, 1).all() and ex["id"].is_unique
    assert "pred_model" not in ex.columns  # CIFAR-10 classifier vs a 3-class folder: no model head
    # features come back in the table's row order
    test_rows = run.split_examples("test")
    assert run.features("test").shape == (len(test_rows), 64)
    assert run.logits("test") is None
    m = run.metrics
    assert set(m["heads"]) == {"knn", "linear"} and 0 <= m["heads"]["knn"]["test"]["accuracy"] <= 1
    cm = np.array(m["heads"]["linear"]["test"]["confusion_matrix"])
    assert cm.sum() == len(test_rows)
    prov = run.provenance
    assert prov["backbone"]["weights"].startswith("random-init")
    assert prov["dataset"]["class_names"] == ["cat", "dog", "frog"]
    assert pd.read_csv(out / "examples.csv").shape[0] == 48


def test_scores_are_consistent_with_the_heads(cfg):
    run = hardprobe.load_run(pipeline.run(cfg, progress=False))
    ex = run.examples
    # hardness follows its documented formula from the stored columns
    head_term = 1 - ex[["prob_true_knn", "prob_true_linear"]].mean(axis=1)
    np.testing.assert_allclose(ex["hardness"], (head_term + ex["knn_disagreement"]) / 2, atol=1e-6)
    assert (ex["correct_knn"] == (ex["pred_knn"] == ex["label"])).all()
    acc = (ex.query("split == 'test'")["pred_knn"] == ex.query("split == 'test'")["label"]).mean()
    assert run.metrics["heads"]["knn"]["test"]["accuracy"] == pytest.approx(acc)


def test_rerun_hits_the_cache(cfg, monkeypatch):
    pipeline.run(cfg, progress=False)
    import hardprobe.stages.extract.features as F
    monkeypatch.setattr(F, "_compute", lambda *a, **k: pytest.fail("recomputed features"))
    pipeline.run(cfg, progress=False)


def test_classify_alone_with_other_heads(cfg):
    out = pipeline.extract(cfg, progress=False)
    assert "hardness" not in hardprobe.load_run(out).examples.columns
    from dataclasses import replace
    pipeline.classify(out, replace(cfg, heads=["knn"], knn_weights="uniform", k=3))
    ex = hardprobe.load_run(out).examples
    assert "pred_knn" in ex.columns and "pred_linear" not in ex.columns
    assert "heads_disagree" not in ex.columns


def test_model_head_when_label_space_matches(fake_cifar, tmp_path):
    cfg = build_config(model="cifar_resnet20", random_init=True, data="cifar10",
                       data_root=str(fake_cifar), download=False, out=str(tmp_path / "r"),
                       cache_dir=str(tmp_path / "c"), k=3, num_workers=0, folds=2)
    run = hardprobe.load_run(pipeline.run(cfg, progress=False))
    assert "pred_model" in run.examples.columns and run.logits("test").shape == (4, 10)
    assert any("in-sample" in n for n in run.metrics["notes"])
    assert run.metrics["label_issue_head"] == "linear" and not run.metrics["label_issue_in_sample"]
    # issue_head: model is allowed, but the run says its flags are in-sample (issue 13, item 2)
    from dataclasses import replace
    pipeline.classify(cfg.out, replace(cfg, issue_head="model"))
    m = hardprobe.load_run(cfg.out).metrics
    assert m["label_issue_head"] == "model" and m["label_issue_in_sample"]
    assert any("issue_head: model" in w and "in-sample" in w for w in m["warnings"])


def test_rank_orders_by_hardness(cfg):
    out = pipeline.run(cfg, progress=False)
    top = pipeline.rank(out, top=5)
    assert len(top) == 5 and (top["split"] == "test").all()
    assert top["hardness"].is_monotonic_decreasing
    with pytest.raises(ValueError, match="no column"):
        pipeline.rank(out, by="nope")


@pytest.mark.shared
def test_resnet56_reproduces_published_accuracy_on_shared_test(shared_dir, cifar_jpeg_test, tmp_path):
    """The model head of cifar_resnet56 on the JPEG CIFAR-10 test set: 83.20% (shared README)."""
    from hardprobe.backbones import create_backbone
    from hardprobe.data.datasets import load_imagefolder
    from hardprobe.stages.extract.features import extract_split
    bb = create_backbone("cifar_resnet56",
                         weights=str(shared_dir / "models/cifar-resnet/resnet56-4bfd9763.th"))
    split = load_imagefolder(cifar_jpeg_test, cifar_jpeg_test).splits["test"]
    arrays, _ = extract_split(bb, split, cache_dir=tmp_path, device="cpu", batch_size=250,
                              progress=False)
    acc = float((arrays["logits"].argmax(1) == split.examples["label"].to_numpy()).mean())
    assert abs(acc * 100 - 83.20) <= 0.1, acc


def test_warnings_are_kept_in_the_run(cfg):
    with pytest.warns(UserWarning, match="too few examples"):
        out = pipeline.run(cfg, progress=False)
    assert any("too few examples" in w for w in hardprobe.load_run(out).metrics["warnings"])


def test_run_reopens_its_images_and_backbone(cfg):
    run = hardprobe.load_run(pipeline.run(cfg, progress=False))
    ex = run.split_examples("test")
    img = run.images([ex["id"].iloc[5]])[0]
    from hardprobe.data.datasets import read_image
    assert (img == read_image(run.dataset().splits["test"].root + "/" + ex["path"].iloc[5])).all()
    bb = run.backbone()
    import torch
    with torch.no_grad():
        emb, _ = bb(bb.preprocess(img)[None])
    np.testing.assert_allclose(emb[0].numpy(), run.features("test")[5], rtol=1e-4, atol=1e-5)
    m = run.metrics["heads"]["knn"]["test"]
    assert set(m["per_class_accuracy"]) == {"cat", "dog", "frog"} and len(m["reliability"]) == 15


def test_undecodable_images_are_skipped_and_listed(cfg, tiny_folder):
    from dataclasses import replace

    from hardprobe.errors import DataError
    train, test = tiny_folder
    (test / "dog" / "img_001.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    (train / "cat" / "img_004.png").write_bytes(b"")
    with pytest.warns(UserWarning, match="2 undecodable"):
        out = pipeline.run(cfg, progress=False)
    run = hardprobe.load_run(out)
    skipped = pd.read_csv(out / "skipped.csv")
    assert sorted(skipped["id"]) == ["test/dog/img_001.png", "train/cat/img_004.png"]
    assert skipped["error"].str.contains("cannot decode").all()
    assert len(run.examples) == 46 and "test/dog/img_001.png" not in set(run.examples["id"])
    assert run.features("test").shape[0] == 11 and np.isfinite(run.features("test")).all()
    # images after the gap still map to their own files
    img = run.images(["test/dog/img_002.png"])[0]
    from hardprobe.data.datasets import read_image
    assert (img == read_image(test / "dog" / "img_002.png")).all()
    with pytest.raises(DataError, match="strict"):
        pipeline.run(replace(cfg, strict=True), progress=False)


def test_rerun_skips_classify_unless_its_inputs_change(cfg, monkeypatch):
    from dataclasses import replace
    pipeline.run(cfg, progress=False)
    import hardprobe.stages.classify as C
    calls = []
    real = C.classify
    monkeypatch.setattr(C, "classify", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    pipeline.run(cfg, progress=False)
    assert calls == [] and "hardness" in hardprobe.load_run(cfg.out).examples
    pipeline.run(replace(cfg, k=3), progress=False)
    assert calls == [1]


def test_run_with_every_stage_then_rerun_skips_them(cfg, monkeypatch):
    from dataclasses import replace
    full = replace(cfg, similarity=True, top=6, report=True, map_method="tsne")
    out = pipeline.run(full, progress=False)
    for f in ["similarity/neighbors.parquet", "similarity/map2d.parquet", "explain/cams.npz",
              "explain/meta.json", "report.html"]:
        assert (out / f).exists(), f
    import hardprobe.stages.explain.stage as E
    import hardprobe.stages.similarity as S
    monkeypatch.setattr(E, "explain_run", lambda *a, **k: pytest.fail("explain recomputed"))
    monkeypatch.setattr(S, "similarity_run", lambda *a, **k: pytest.fail("similarity recomputed"))
    import hardprobe.report as R
    drawn = []
    real = R.write_report
    monkeypatch.setattr(R, "write_report", lambda *a, **k: (drawn.append(1), real(*a, **k))[1])
    pipeline.run(full, progress=False)
    assert not drawn  # nothing changed: the report stands
    from hardprobe.stages.finetune.stage import finetune_run
    finetune_run(out, mode="head", epochs=1, aum_runs=0, progress=False)
    pipeline.run(full, progress=False)
    assert drawn == [1]  # a stage run alone (finetune) changes the report: redrawn
    assert "finetune" in (out / "report.html").read_text().lower()


def test_run_diagnoses_keeps_the_users_diagnose_options_and_can_skip_it(cfg, monkeypatch):
    from dataclasses import replace

    import hardprobe.stages.diagnose.stage as Dx
    out = pipeline.run(cfg, progress=False)
    run = hardprobe.load_run(out)
    assert "failure_mode" in run.examples and "diagnose" in run.stamps()
    assert run.metrics["diagnose"]["options"]["slices"] is True
    Dx.diagnose_run(out, slices=False, progress=False)  # the user's own options
    monkeypatch.setattr(Dx, "diagnose_run", lambda *a, **k: pytest.fail("diagnose redone"))
    pipeline.run(cfg, progress=False)  # nothing changed: kept, with the user's options
    assert hardprobe.load_run(out).metrics["diagnose"]["options"]["slices"] is False
    bare = pipeline.run(replace(cfg, out=str(Path(cfg.out) / "bare"), diagnose=False),
                        progress=False)
    assert "failure_mode" not in hardprobe.load_run(bare).examples


def test_reclassify_drops_the_stale_columns_of_later_stages(cfg):
    from dataclasses import replace
    out = pipeline.run(cfg, progress=False)
    run = hardprobe.load_run(out)
    depth = run.examples[["id"]].assign(prediction_depth=np.arange(len(run.examples), dtype=float))
    run.join("depth", depth)
    run.stamp("depth", "depth-inputs")
    pipeline.classify(out, replace(cfg, seed=cfg.seed))  # same inputs: depth stays
    assert "prediction_depth" in hardprobe.load_run(out).examples
    pipeline.classify(out, replace(cfg, k=3, heads=["knn"]))  # other heads: depth is stale
    again = hardprobe.load_run(out)
    assert "prediction_depth" not in again.examples.columns
    assert "depth" not in again.stamps() and "classify" in again.stamps()
    assert "pred_linear" not in again.examples.columns  # classify's own columns are replaced


def test_single_class_train_and_empty_test_are_named_before_extraction(tmp_path, monkeypatch):
    import shutil

    from conftest import make_folder

    import hardprobe.stages.extract.features as F
    from hardprobe.errors import DataError
    monkeypatch.setattr(F, "_compute", lambda *a, **k: pytest.fail("extracted before the check"))
    train = make_folder(tmp_path / "train", 4, 0)
    for d in train.iterdir():
        if d.name != "cat":
            shutil.rmtree(d)
    test = make_folder(tmp_path / "test", 2, 1)
    for d in test.iterdir():
        if d.name != "cat":
            shutil.rmtree(d)
    kw = dict(model="cifar_resnet20", random_init=True, data="imagefolder",
              cache_dir=str(tmp_path / "c"), num_workers=0)
    cfg = build_config(**kw, train=str(train), test=str(test), out=str(tmp_path / "r"))
    with pytest.raises(ValueError, match="only class 'cat'.*at least 2 classes"):
        pipeline.run(cfg, progress=False)
    (tmp_path / "empty").mkdir()
    cfg = build_config(**kw, train=str(make_folder(tmp_path / "t2", 2, 0)),
                       test=str(tmp_path / "empty"), out=str(tmp_path / "r2"))
    with pytest.raises(DataError, match="empty has no class folders"):
        pipeline.run(cfg, progress=False)


def test_planted_label_noise_is_a_known_answer(cfg):
    import dataclasses

    from hardprobe.data.datasets import plant_label_noise
    noisy = dataclasses.replace(cfg, label_noise=0.25, seed=3)
    out = pipeline.run(noisy, progress=False)
    ex = hardprobe.load_run(out).examples
    train = ex[ex["split"] == "train"]
    assert train["planted_noise"].sum() == round(0.25 * len(train))
    assert not ex.loc[ex["split"] == "test", "planted_noise"].any()
    flipped = train[train["planted_noise"]]
    assert (flipped["label"] != flipped["clean_label"]).all()
    kept = ex[~ex["planted_noise"]]
    assert (kept["label"] == kept["clean_label"]).all()
    names = hardprobe.load_run(out).class_names
    assert (ex["label_name"] == [names[v] for v in ex["label"]]).all()
    m = json.loads((out / "metrics.json").read_text())["planted_noise"]
    assert m["planted"] == train["planted_noise"].sum() and m["n"] == len(train)
    assert m["caught"] == (train["planted_noise"] & train["label_issue"]).sum()
    # the same seed plants the same flips; a rerun keeps the table and its scores
    again = plant_label_noise(ex[["id", "split", "path", "clean_label", "label_name"]]
                              .rename(columns={"clean_label": "label"}), 0.25, names, seed=3)
    assert (again["label"].to_numpy() == ex["label"].to_numpy()).all()
    assert not pipeline.classify_if_changed(out, noisy)
    from hardprobe.report import write_report
    write_report(out, top=0)
    html = (out / "report.html").read_text()
    assert f"<b>{m['planted']}</b> of {m['n']} train labels flipped on purpose" in html


def test_faiss_knn_backend_gives_the_torch_heads_result(cfg):
    import dataclasses
    pytest.importorskip("faiss")
    out = pipeline.run(cfg, progress=False)
    ref = hardprobe.load_run(out).examples
    cols = ["pred_knn", "prob_true_knn", "knn_disagreement", "hardness"]
    for extra in (dict(knn_backend="faiss"),  # flat: exact
                  dict(knn_backend="faiss", knn_index="ivf", knn_nlist=2, knn_nprobe=2)):
        pipeline.classify(out, dataclasses.replace(cfg, **extra))
        ex = hardprobe.load_run(out).examples
        pd.testing.assert_frame_equal(ex[cols], ref[cols], rtol=1e-5)
        m = json.loads((out / "metrics.json").read_text())["knn_search"]
        assert m["backend"] == "faiss" and m["index"] == extra.get("knn_index", "flat")
    with pytest.raises(Exception, match="knn_backend: faiss"):
        build_config(model="cifar_resnet20", knn_index="ivf")


def test_every_stage_writes_what_the_stage_table_declares(cfg):
    """Each stage's columns and files are declared in rundir.layout.STAGES, and a stage's
    columns are exactly those of the stages that ran (no column without an owner)."""
    from dataclasses import replace

    from hardprobe.rundir import layout
    from hardprobe.stages.depth import depth_run
    from hardprobe.stages.finetune import finetune_run
    out = pipeline.run(replace(cfg, similarity=True, top=2, report=True, map_method="pca"),
                       progress=False)
    depth_run(out, progress=False)
    finetune_run(out, mode="head", epochs=1, aum_runs=0, progress=False)
    run = hardprobe.load_run(out)
    owners = {c: layout.owner(c) for c in run.examples.columns}
    assert None not in owners.values(), [c for c, o in owners.items() if o is None]
    assert set(owners.values()) == {"extract", "classify", "diagnose", "depth", "finetune"}
    declared = {f.rstrip("/") for s in layout.STAGES.values() for f in s.files}
    declared |= {layout.TABLE, "examples.csv", layout.STAMPS, ".run.lock"}
    written = {p.name for p in out.iterdir()}
    assert written <= declared, written - declared
    assert {"classify", "similarity", "explain", "diagnose", "report"} <= set(run.stamps())
    for stage in ("depth", "finetune"):  # a stage run alone replaces only its own columns
        before = run.examples.drop(columns=[c for c in run.examples if owners[c] == stage])
        run.join(stage, run.examples[["id"]])
        after = hardprobe.load_run(out).examples
        assert not any(layout.STAGES[stage].owns(c) for c in after.columns)
        pd.testing.assert_frame_equal(after, before)


# ---------------------------------------------------------------- issue 13, item 3
def _published_cifar_backbone(monkeypatch):
    """Random-init cifar_resnet20 that says it carries the published CIFAR-10 weights (what a
    --weights file with their sha256 gives), so no checkpoint is needed."""
    from hardprobe.backbones.cifar_resnet import published_weights
    from hardprobe.stages.extract import stage as E
    real = E.create_backbone

    def create(*a, **k):
        bb = real(*a, **k)
        bb.weights_info = published_weights(20)
        return bb
    monkeypatch.setattr(E, "create_backbone", create)


def test_features_trained_on_the_train_labels_are_flagged(fake_cifar, tmp_path, monkeypatch):
    from hardprobe.stages.extract.trained_on import UPPER_BOUND, rank_warning
    _published_cifar_backbone(monkeypatch)
    cfg = build_config(model="cifar_resnet20", random_init=True, data="cifar10",
                       data_root=str(fake_cifar), download=False, out=str(tmp_path / "r"),
                       cache_dir=str(tmp_path / "c"), k=3, num_workers=0, folds=2,
                       label_noise=0.2, similarity=False, top=0)
    out = pipeline.run(cfg, progress=False)
    run = hardprobe.load_run(out)
    flag = run.provenance["features_trained_on_train"]
    assert flag["value"] is True and flag["train_split"] == "cifar10:train"
    assert flag["weights_trained_on"] == "cifar10:train" and "cifar10:train" in flag["reason"]
    m = run.metrics
    for head, per in m["heads"].items():  # every train figure says so, no test figure does
        assert per["train"]["caveat"] == UPPER_BOUND, head
        assert "caveat" not in per["test"], head
    assert m["label_issue_caveat"] == {"train": UPPER_BOUND}
    assert m["planted_noise"]["caveat"] == UPPER_BOUND
    assert any(UPPER_BOUND in n for n in m["notes"])
    text = (out / "report.html").read_text()
    assert f"train accuracy ({UPPER_BOUND})" in text and f"train ECE ({UPPER_BOUND})" in text
    assert "features trained on train" in text and f"test accuracy ({UPPER_BOUND}" not in text
    assert rank_warning(out, "train") and rank_warning(out, None)
    assert rank_warning(out, "test") is None


def test_other_data_is_not_flagged_unless_the_config_says(cfg, monkeypatch):
    import dataclasses

    from hardprobe.stages.extract.trained_on import (
        UPPER_BOUND,
        rank_warning,
        split_identity,
    )
    _published_cifar_backbone(monkeypatch)
    out = pipeline.run(cfg, progress=False)  # 3 colour classes: not CIFAR-10 train
    run = hardprobe.load_run(out)
    assert run.provenance["features_trained_on_train"]["value"] is False
    assert "caveat" not in run.metrics["heads"]["linear"]["train"]
    assert rank_warning(out, "train") is None
    forced = dataclasses.replace(cfg, features_trained_on_train=True)
    pipeline.run(forced, progress=False)
    run = hardprobe.load_run(out)
    assert run.provenance["features_trained_on_train"]["reason"].startswith("set by")
    assert run.metrics["heads"]["linear"]["train"]["caveat"] == UPPER_BOUND  # reclassified
    # an ImageFolder of CIFAR-10's classes is CIFAR-10 train only at its full 50,000 images
    from hardprobe.backbones.cifar_resnet import CIFAR10_CLASSES
    ds = {"name": "imagefolder", "class_names": list(CIFAR10_CLASSES),
          "splits": {"train": {"n": 50_000}}}
    assert split_identity(ds) == "cifar10:train"
    assert split_identity({**ds, "splits": {"train": {"n": 49_999}}}) is None
    assert split_identity({**ds, "class_names": CIFAR10_CLASSES[::-1]}) is None
