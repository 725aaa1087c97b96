"""Duplicate detection: planted exact and near copies are grouped, distinct shots are not."""
from __future__ import annotations

import io
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from hardprobe.data.descriptors import grey_thumbnail, run_thumbnails
from hardprobe.scoring import duplicates as D


def textured(rng, color) -> np.ndarray:
    """(32, 32, 3) uint8: a smooth random pattern (an 8x8 field upsampled) tinted by class."""
    field = torch.from_numpy(rng.uniform(0, 1, (1, 1, 8, 8)).astype(np.float32))
    f = F.interpolate(field, size=(32, 32), mode="bicubic", align_corners=False)[0, 0].numpy()
    arr = np.array(color, np.float32)[None, None] * (0.4 + 0.8 * f[..., None])
    return np.clip(arr, 0, 255).astype(np.uint8)


def colour(a):
    return np.clip(a.astype(np.float32) * [1.15, 0.9, 1.05] + 12, 0, 255).astype(np.uint8)


def translate(a, dx=2, dy=-1):
    p = np.pad(a, ((3, 3), (3, 3), (0, 0)), mode="edge")
    return p[3 + dy:35 + dy, 3 + dx:35 + dx]


def rescale(a):
    im = Image.fromarray(a)
    return np.asarray(im.resize((20, 20), Image.BILINEAR).resize((32, 32), Image.BICUBIC))


def jpeg(a, q=30):
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=q)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def grey(images) -> np.ndarray:
    return np.stack([grey_thumbnail(torch.from_numpy(a.copy()).permute(2, 0, 1)) for a in images])


@pytest.fixture(scope="module")
def planted():
    """40 distinct images of 2 classes, then one copy each of 5 of them (exact, colour shift,
    translation, rescale, JPEG) appended: rows 40..44 copy rows 0..4."""
    rng = np.random.default_rng(0)
    base = [textured(rng, (200, 60, 60) if i % 2 else (60, 60, 200)) for i in range(40)]
    copies = [base[0].copy(), colour(base[1]), translate(base[2]), rescale(base[3]), jpeg(base[4])]
    return base + copies


def test_planted_copies_are_grouped_and_distinct_images_are_not(planted):
    g = grey(planted)
    splits = np.array(["train"] * len(g))
    out = D.find_duplicates(g, splits)
    grp = out["duplicate_group"].to_numpy()
    for k in range(5):  # each original shares a group with its copy, and only with it
        assert grp[k] >= 0 and grp[k] == grp[40 + k]
        assert (grp == grp[k]).sum() == 2
    assert (grp[5:40] == -1).all()  # distinct images of the same class stay apart
    assert out["train_duplicate"].isna().all()  # train rows: not applicable


def test_each_near_copy_kind_scores_above_the_threshold_and_distinct_below(planted):
    g = grey(planted)
    sims = D.shift_correlation(g[:5], g[40:45])
    assert (sims >= D.THRESHOLD).all(), sims
    others = D.shift_correlation(np.repeat(g[:5], 7, axis=0), g[5:40])
    assert (others < D.THRESHOLD).all(), others.max()


def test_cross_split_copy_flags_train_duplicate(planted):
    g = grey(planted[:12] + [planted[40 + 1], planted[40 + 2], planted[20]])
    # rows 12, 13: test copies of train rows 1, 2 (colour, translation); row 14 a test image
    # whose original (row 20 of the planted set) is not in this train split
    splits = np.array(["train"] * 12 + ["test"] * 3)
    out = D.find_duplicates(g, splits)
    td = out["train_duplicate"]
    assert td[:12].isna().all()
    assert td[12:].tolist() == [True, True, False]
    assert out["duplicate_group"][12] == out["duplicate_group"][1] >= 0


def test_train_duplicate_needs_a_direct_link_not_a_chain():
    # test 0 - test 1 - train 2 - train 3: only test 1 is a copy of a train image
    i, j = np.array([0, 1, 2]), np.array([1, 2, 3])
    fit = np.array([False, False, True, True, False])
    assert D.linked_to(5, i, j, fit).tolist() == [False, True, True, True, False]
    assert (D.groups_from_pairs(5, i, j)[:4] == 0).all()  # yet all four share a group


def test_groups_from_pairs_is_transitive_and_numbers_by_first_row():
    grp = D.groups_from_pairs(7, np.array([5, 1, 2]), np.array([6, 3, 5]))
    assert grp.tolist() == [-1, 0, 1, 0, -1, 1, 1]


def test_candidate_pairs_find_the_nearest_rows():
    x = np.eye(4, dtype=np.float32)[[0, 0, 1, 2, 3]]  # rows 0 and 1 identical
    i, j = D.candidate_pairs(x, 1)
    assert (0, 1) in set(zip(i.tolist(), j.tolist()))
    assert (i < j).all()


def test_constant_image_matches_nothing():
    g = np.full((3, 32, 32), 128, np.uint8)
    out = D.find_duplicates(g, np.array(["train"] * 3))
    assert (out["duplicate_group"] == -1).all()


def test_duplicate_metrics_on_a_hand_made_table():
    ex = pd.DataFrame({
        "split": ["train", "train", "test", "test", "test", "test", "train", "test"],
        "duplicate_group": [0, 0, 0, 1, 1, -1, 2, 2],
        "train_duplicate": pd.array([pd.NA, pd.NA, True, False, False, False, pd.NA, True],
                                    dtype="boolean"),
        "correct_linear": [1, 1, 1, 0, 1, 1, 1, 1],
        "correct_knn": [1, 1, 1, 0, 0, 0, 1, 0]}).astype({"correct_linear": bool,
                                                         "correct_knn": bool})
    m = D.duplicate_metrics(ex, ["linear", "knn", "model"])
    assert m["n_groups"] == {"train": 1, "test": 1}  # group 0 twice in train; group 1 in test
    assert m["n_cross_split_groups"] == 2  # groups 0 and 2
    assert m["n_groups_total"] == 3 and m["n_label_conflicts"] is None  # no label column
    ex["label"] = [3, 3, 3, 1, 2, 5, 4, 4]  # group 1's two members disagree; -1 is no group
    assert D.duplicate_metrics(ex, ["linear"])["n_label_conflicts"] == 1
    assert m["n_train_duplicates_in_test"] == 2
    assert m["accuracy"]["linear"] == {"all": 0.8, "without_train_duplicates": 2 / 3,
                                       "n_without": 3}
    assert m["accuracy"]["knn"]["all"] == pytest.approx(0.2)
    assert m["accuracy"]["knn"]["without_train_duplicates"] == 0.0
    assert "model" not in m["accuracy"]


class FakeRun:
    """What run_thumbnails reads of a Run: examples, dataset(), path."""

    def __init__(self, path, images):
        from hardprobe.data.datasets import ImageSet, Split
        self.path = Path(path)
        self.examples = pd.DataFrame({"id": [f"train/{i}" for i in range(len(images))],
                                      "split": "train"})
        self.calls = 0

        def decode(i):
            self.calls += 1
            return torch.from_numpy(images[i]).permute(2, 0, 1)
        self._ds = ImageSet("fake", ["a"], {"train": Split("train", "", self.examples, decode, "")})

    def dataset(self):
        return self._ds


def test_run_thumbnails_are_cached_for_the_same_ids(planted, tmp_path):
    run = FakeRun(tmp_path, planted[:6])
    a = run_thumbnails(run, progress=False)
    assert a.shape == (6, 32, 32) and run.calls == 6
    b = run_thumbnails(run, progress=False)
    assert run.calls == 6 and (a == b).all()  # read from RUN_DIR/duplicates/
    run.examples = run.examples.iloc[::-1].reset_index(drop=True)  # other order: recomputed
    c = run_thumbnails(run, progress=False)
    assert run.calls == 12 and (c == a[::-1]).all()


def test_thumbnails_from_workers_equal_the_in_process_ones(tmp_path):
    # a real ImageFolder split (picklable for the DataLoader workers) with one broken file
    from conftest import make_folder

    from hardprobe.data.datasets import load_imagefolder
    from hardprobe.data.descriptors import split_thumbnails
    root = make_folder(tmp_path / "imgs", 4, 0)
    split = load_imagefolder(root).splits["train"]
    broken = Path(split.root) / split.examples["path"].iloc[3]
    broken.write_bytes(b"not an image")
    rows = np.arange(len(split))
    alone, ok_alone = split_thumbnails(split, rows, progress=False)
    workers, ok_workers = split_thumbnails(split, rows, num_workers=2, progress=False)
    assert (alone == workers).all() and (ok_alone == ok_workers).all()
    assert not ok_workers[3] and ok_workers.sum() == len(rows) - 1 and not workers[3].any()
    assert workers[ok_workers].any(axis=(1, 2)).all()  # every decoded image left a thumbnail


def test_report_section_lists_groups_only_when_the_column_exists(tmp_path):
    from conftest import make_folder

    from hardprobe import pipeline
    from hardprobe.config import build_config
    from hardprobe.report import write_report
    from hardprobe.rundir.run import load_run
    train, test = make_folder(tmp_path / "train", 6, 0), make_folder(tmp_path / "test", 2, 1)
    shutil.copy(train / "cat" / "img_000.png", test / "cat" / "img_009.png")  # a cross-split copy
    pages = {}
    for dup in (False, True):
        cfg = build_config(model="cifar_resnet20", random_init=True, data="imagefolder",
                           train=str(train), test=str(test), out=str(tmp_path / f"run{dup}"),
                           cache_dir=str(tmp_path / "cache"), k=3, num_workers=0,
                           heads=["knn"], similarity=False, top=0, report=False,
                           duplicates=dup)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run_dir = Path(pipeline.run(cfg, progress=False))
        pages[dup] = write_report(run_dir).read_text()
    assert 'id="duplicates"' not in pages[False]
    assert load_run(run_dir).metrics["duplicates"]["n_train_duplicates_in_test"] == 1
    assert 'id="duplicates"' in pages[True] and "spans splits" in pages[True]
    assert "without train duplicates" in pages[True]


def test_pair_shift_correlation_equals_the_paired_one(planted):
    g = grey(planted)
    rng = np.random.default_rng(1)
    i, j = rng.integers(0, len(g), 50), rng.integers(0, len(g), 50)
    i[:9] = 3  # one image with more partners than a row holds: its partners span rows
    fast = D.pair_shift_correlation(g, i, j, block=8, width=4)
    np.testing.assert_allclose(fast, D.shift_correlation(g[i], g[j]), atol=1e-5)
