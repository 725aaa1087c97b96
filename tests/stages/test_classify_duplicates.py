"""classify's duplicate step: an example's near-copies never vote for it, never share a fold
with its scorer, and test accuracy is also given without test images copied from train.

The planted case: two exact copies of a train cat, both labelled dog (a mislabelled copy
that memorisation would hide), and a test cat that is a shifted copy of a train cat.
"""
from __future__ import annotations

import dataclasses
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import make_folder
from PIL import Image

from hardprobe import load_run, pipeline
from hardprobe.config import build_config, load_config

TWINS = ("train/dog/twin_a.png", "train/dog/twin_b.png")
SOURCE = "train/cat/img_000.png"
SHIFTED, SHIFT_SOURCE = "test/cat/shifted.png", "train/cat/img_001.png"


def _plant(tmp: Path) -> tuple[Path, Path]:
    train, test = make_folder(tmp / "train", 12, 0), make_folder(tmp / "test", 4, 1)
    for twin in TWINS:
        shutil.copy(tmp / SOURCE, tmp / twin)
    a = np.asarray(Image.open(tmp / SHIFT_SOURCE))
    shifted = np.pad(a, ((3, 3), (3, 3), (0, 0)), mode="edge")[2:34, 5:37]  # 2 px, 1 px
    Image.fromarray(shifted).save(tmp / SHIFTED)
    return train, test


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{True: run with duplicate groups, False: the same run with --no-duplicates}."""
    tmp = tmp_path_factory.mktemp("dups")
    train, test = _plant(tmp)
    out = {}
    for dup in (True, False):
        cfg = build_config(model="cifar_resnet20", random_init=True, data="imagefolder",
                           train=str(train), test=str(test), out=str(tmp / f"run_{dup}"),
                           cache_dir=str(tmp / "cache"), k=3, num_workers=0, folds=3,
                           similarity=False, top=0, explorer=False, duplicates=dup)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out[dup] = load_run(pipeline.run(cfg, progress=False))
    return out


def _rows(run, ids):
    return run.examples.set_index("id").loc[list(ids)]


def test_copies_share_a_group_and_distinct_images_do_not(runs):
    ex = runs[True].examples.set_index("id")
    g = ex["duplicate_group"]
    assert g[TWINS[0]] == g[TWINS[1]] == g[SOURCE] >= 0
    assert g[SHIFTED] == g[SHIFT_SOURCE] >= 0 and g[SHIFTED] != g[SOURCE]
    others = ex.index.difference([*TWINS, SOURCE, SHIFTED, SHIFT_SOURCE])
    assert (g[others] == -1).all()


def test_a_mislabelled_copy_is_flagged_only_when_its_twin_is_left_out(runs):
    with_, without = _rows(runs[True], TWINS), _rows(runs[False], TWINS)
    # left out, the twins' kNN votes come from real cats only; kept, each twin votes for
    # the other with similarity 1 and the mislabel hides behind it
    assert (with_["prob_true_knn"] == 0).all() and (without["prob_true_knn"] > 0.3).all()
    assert with_["label_issue"].all() and not without["label_issue"].any()
    # in one fold, neither twin's linear probe was fitted on the other
    assert (with_["prob_true_linear"] < without["prob_true_linear"]).all()


def test_a_shifted_test_copy_is_a_train_duplicate_and_accuracy_is_given_without_it(runs):
    run = runs[True]
    ex = run.examples
    test = ex[ex["split"] == "test"].set_index("id")
    assert test["train_duplicate"].astype(bool).sum() == 1 and test.loc[SHIFTED, "train_duplicate"]
    assert ex.loc[ex["split"] == "train", "train_duplicate"].isna().all()
    m = run.metrics["duplicates"]
    assert m["n_train_duplicates_in_test"] == 1
    for head, acc in m["accuracy"].items():
        keep = ~test["train_duplicate"].astype(bool)
        assert acc["n_without"] == keep.sum() == len(test) - 1
        assert acc["without_train_duplicates"] == pytest.approx(
            test.loc[keep, f"correct_{head}"].mean()), head
    page = (run.path / "report.html").read_text()
    assert "without train duplicates" in page and 'id="duplicates"' in page
    groups = ex.loc[ex["duplicate_group"] >= 0, "duplicate_group"]
    assert m["n_groups_total"] == groups.nunique() >= 2  # the report shows the stored counts
    assert f"<b>{m['n_groups_total']}</b> holding {len(groups)} examples" in page


def test_no_duplicates_writes_no_duplicate_columns(runs):
    run = runs[False]
    assert "duplicate_group" not in run.examples and "train_duplicate" not in run.examples
    assert "duplicates" not in run.metrics and not (run.path / "duplicates").exists()
    assert 'id="duplicates"' not in (run.path / "report.html").read_text()
    assert runs[True].stamps()["classify"] != run.stamps()["classify"]


@pytest.mark.parametrize("dup", [True, False])
def test_the_stored_probabilities_are_the_ones_the_table_was_scored_with(runs, dup):
    run = runs[dup]
    for split in run.splits:
        part = run.split_examples(split)
        y = part["label"].to_numpy()
        for head in run.metrics["heads"]:
            p = run.head_probs(split, head)
            assert p.shape == (len(part), len(run.class_names)) and p.dtype == np.float32
            np.testing.assert_allclose(p[np.arange(len(y)), y], part[f"prob_true_{head}"],
                                       rtol=1e-6, atol=1e-7)
            assert (p.argmax(1) == part[f"pred_{head}"]).all(), (split, head)


def test_a_classify_rerun_reads_the_stored_pair_search(runs, monkeypatch):
    """Other heads, same images: the table comes from RUN_DIR/duplicates/, not a new search;
    a changed thumbnail (other key) searches again and finds the same groups."""
    from hardprobe.stages import classify as classify_mod
    from hardprobe.stages import duplicate_groups

    run = runs[True]
    before = run.examples[["id", "duplicate_group", "train_duplicate"]]
    calls = []
    real = duplicate_groups.find_duplicates
    monkeypatch.setattr(duplicate_groups, "find_duplicates",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    cfg = dataclasses.replace(load_config(run.path / "config.yaml"), k=2)  # other heads
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        classify_mod.classify(run.path, cfg, progress=False)
    assert calls == []
    after = load_run(run.path).examples[["id", "duplicate_group", "train_duplicate"]]
    pd.testing.assert_frame_equal(after.reset_index(drop=True), before.reset_index(drop=True))
    grey = np.load(run.path / "duplicates" / "grey32.npy")
    splits = run.examples["split"].to_numpy().astype(str)
    key = duplicate_groups.search_key(grey, splits)
    grey[0, 0, 0] ^= 1  # one pixel of one thumbnail: another key
    assert duplicate_groups.search_key(grey, splits) != key
    (run.path / "duplicates" / "table_key.json").write_text('{"key": "stale"}')
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        classify_mod.classify(run.path, cfg, progress=False)
    assert calls == [1]
    again = load_run(run.path).examples[["id", "duplicate_group", "train_duplicate"]]
    pd.testing.assert_frame_equal(again.reset_index(drop=True), before.reset_index(drop=True))
