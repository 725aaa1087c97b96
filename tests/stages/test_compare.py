"""Comparing two runs: known overlaps and rank agreement, id checks, a self-contained page,
and two real tiny runs end to end."""
from __future__ import annotations

import json
import sys
import types
import warnings
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
from conftest import make_folder
from sklearn.metrics import cohen_kappa_score

import hardprobe
from hardprobe import pipeline
from hardprobe.compare import compare  # the stage's tables, then the report's page
from hardprobe.config import build_config
from hardprobe.core.io import write_json
from hardprobe.report import plots
from hardprobe.rundir.run import save_array, write_examples
from hardprobe.stages import compare as C
from hardprobe.stages.depth import depth_run

EVIL = "<script>alert(1)</script>"
N = 40


def fake_run(path, hardness, *, ids=None, X=None, class_names=("cat", EVIL), **cols):
    """A run dir of N test examples (no images): enough for load_run and compare."""
    n = len(hardness)
    y = np.arange(n) % 2
    ex = pd.DataFrame({"id": ids or [f"test/{i:02d}.png" for i in range(n)], "split": "test",
                       "path": [f"{i}.png" for i in range(n)], "label": y,
                       "label_name": [class_names[c] for c in y], "hardness": hardness})
    for c, v in cols.items():
        ex[c] = v
    write_examples(path, ex)
    write_json(path / "provenance.json", {"dataset": {"class_names": list(class_names)},
                                          "backbone": {"name": f"model {EVIL}"}})
    if X is not None:
        save_array(path, "test", "embedding", np.asarray(X, np.float32))
    return path


class Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.urls, self.tags = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.urls += [v or "" for k, v in attrs if k in ("src", "href", "srcset", "action",
                                                         "poster", "data")]


def assert_self_contained(html: str):
    p = Links()
    p.feed(html)
    assert p.urls and all(u.startswith(("data:", "#")) for u in p.urls), p.urls
    assert "script" not in p.tags and "iframe" not in p.tags
    assert "url(" not in html and "@import" not in html


@pytest.fixture
def known(tmp_path):
    """Run A ranks 0..39 by hardness; B swaps A's ranks 2, 3 with 4, 5. Top 10% = 4 each:
    both {0, 1}, only A {2, 3}, only B {4, 5}; sum d^2 = 16, 4 discordant pairs."""
    h_a = 1 - np.arange(N) / N
    perm = np.arange(N)
    perm[[2, 3, 4, 5]] = [4, 5, 2, 3]
    h_b = h_a[perm]
    y = np.arange(N) % 2
    rng = np.random.default_rng(0)
    X = rng.normal(size=(N, 8))
    Q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    pred_b = y.copy()
    pred_b[:10] = 1 - pred_b[:10]  # B gets the first 10 wrong
    a = fake_run(tmp_path / "A", h_a, X=X, pred_knn=1 - y, pred_linear=y,
                 label_issue=np.isin(np.arange(N), [0, 1, 2]))
    b = fake_run(tmp_path / "B", h_b, X=3 * X @ Q, pred_linear=1 - y, pred_model=pred_b,
                 label_issue=np.isin(np.arange(N), [1, 2, 3, 4]))
    return a, b, y, pred_b


def test_known_overlap_and_rank_agreement(known):
    a, b, y, pred_b = known
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning on this clean input
        out = compare(a, b)
    assert out == a / "compare_B"
    s = json.loads((out / "summary.json").read_text())
    assert s["n"] == N and s["n_top"] == 4
    assert s["hardness"]["spearman"]["rho"] == pytest.approx(1 - 6 * 16 / (N * (N ** 2 - 1)))
    assert s["hardness"]["kendall"]["tau"] == pytest.approx(1 - 2 * 4 / (N * (N - 1) / 2))
    g = s["groups"]
    assert (g["both"], g["only_a"], g["only_b"], g["neither"]) == (2, 2, 2, 34)
    assert g["jaccard"] == pytest.approx(2 / 6) and g["expected_both"] == pytest.approx(0.4)
    ov = pd.read_parquet(out / "overlap.parquet")
    groups = ov.set_index("id")["group"]
    for i, want in {0: "both", 1: "both", 2: "only_a", 3: "only_a", 4: "only_b", 5: "only_b",
                    6: "neither"}.items():
        assert groups[f"test/{i:02d}.png"] == want
    assert list(ov.columns[:5]) == ["id", "label", "hardness_a", "hardness_b", "group"]
    p = s["predictions"]
    assert (p["head_a"], p["head_b"]) == ("linear", "model")  # primary heads
    assert p["agreement"] == pytest.approx(0.75) and p["accuracy_b"] == pytest.approx(0.75)
    assert p["cohen_kappa"] == pytest.approx(cohen_kappa_score(y, pred_b))
    li = s["label_issues"]
    assert (li["n_a"], li["n_b"], li["both"]) == (3, 4, 2)
    assert li["jaccard"] == pytest.approx(2 / 5) and li["agreement"] == pytest.approx(37 / 40)
    assert li["cohen_kappa"] == pytest.approx(cohen_kappa_score(np.isin(np.arange(N), [0, 1, 2]),
                                                                np.isin(np.arange(N), [1, 2, 3, 4])))
    assert s["cka"] == pytest.approx(1, abs=1e-9)  # B's features: A's rotated and scaled
    assert not s["robustness"]["available"] and not s["depth"]["shown"]
    html = (out / "compare.html").read_text()
    assert_self_contained(html)
    assert EVIL not in html and "&lt;script&gt;" in html  # names and models escaped
    assert "thumbnails unavailable" in html  # no images: placeholders, said on the page
    assert html.count('class="missing"') == 6


def test_rows_are_matched_by_id(tmp_path):
    h = np.r_[np.ones(4), np.zeros(N - 4)]  # ties: the first 4 of A's order are hard
    a = fake_run(tmp_path / "a", h, pred_linear=np.zeros(N, int))
    ids = [f"test/{i:02d}.png" for i in range(N)][::-1]  # B lists the same ids reversed
    b = fake_run(tmp_path / "b", h[::-1], ids=ids, pred_linear=np.zeros(N, int))
    s = json.loads((C.compare_runs(a, b, out=tmp_path / "c") / "summary.json").read_text())
    assert s["groups"]["both"] == 4 and s["hardness"]["spearman"]["rho"] == pytest.approx(1)
    assert s["cka"] is None and any("CKA" in n for n in s["notes"])  # no features stored
    assert "label issues: not compared" in " ".join(s["notes"])


def test_ties_at_the_cut_off_are_broken_independently_per_run(tmp_path):
    """Issue 13, item 7: with all-equal hardness the hard sets are unrelated, so about
    n_top^2 / N = 5 of the 50 are hard for both, not 50 (row order in both runs)."""
    n = 500
    both = [int((C.hard_groups(np.ones(n), np.ones(n), 0.1, seeds=(s, s + 1000))[0] == "both")
                .sum()) for s in range(20)]
    assert np.mean(both) == pytest.approx(5, abs=1.5)  # hypergeometric mean 50 * 50 / 500
    # without ties the tie-break changes nothing: the hard sets are the hardest, exactly
    h = np.random.default_rng(0).permutation(n) / n
    g1, n_top = C.hard_groups(h, h, 0.1, seeds=(1, 2))
    g2, _ = C.hard_groups(h, h, 0.1, seeds=(3, 4))
    assert n_top == 50 and (g1 == g2).all() and set(np.flatnonzero(g1 == "both")) == set(
        np.argsort(-h)[:50])
    # end to end: two runs with all-equal hardness (other classify stamps: other seeds)
    for name in ("a", "b"):
        fake_run(tmp_path / name, np.ones(n), pred_linear=np.zeros(n, int))
        write_json(tmp_path / name / "stages.json", {"classify": f"stamp {name}"})
    s = json.loads((C.compare_runs(tmp_path / "a", tmp_path / "b", out=tmp_path / "c")
                    / "summary.json").read_text())
    assert s["n_top"] == 50 and s["groups"]["both"] < 20
    assert s["groups"]["tied_at_cutoff"] == {"a": n, "b": n}
    assert any("tie at the hard-set cut-off" in m for m in s["notes"])
    assert C.tie_seed(hardprobe.load_run(tmp_path / "a")) != C.tie_seed(
        hardprobe.load_run(tmp_path / "b"))


def test_id_mismatch_is_an_error(tmp_path):
    a = fake_run(tmp_path / "a", np.linspace(0, 1, N), pred_linear=np.zeros(N, int))
    ids = [f"test/{i:02d}.png" for i in range(N - 3)] + ["x", "y", "z"]
    b = fake_run(tmp_path / "b", np.linspace(0, 1, N), ids=ids, pred_linear=np.zeros(N, int))
    with pytest.raises(ValueError, match="3 ids only in .*, 3 only in"):
        C.compare_runs(a, b)
    with pytest.raises(ValueError, match="no split 'train'"):
        C.compare_runs(a, b, split="train")


def test_cohen_kappa_and_jaccard():
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 4, 50), rng.integers(0, 4, 50)
    assert C.cohen_kappa(a, b) == pytest.approx(cohen_kappa_score(a, b))
    assert C.cohen_kappa([1, 1], [1, 1]) is None and C.jaccard([0, 0], [0, 0]) is None
    assert C.jaccard([1, 1, 0], [0, 1, 1]) == pytest.approx(1 / 3)


def test_two_real_runs_end_to_end(tmp_path, monkeypatch):
    train, test = make_folder(tmp_path / "train", 12, 0), make_folder(tmp_path / "test", 4, 1)
    runs = []
    for model in ("cifar_resnet20", "cifar_resnet32"):
        cfg = build_config(model=model, random_init=True, data="imagefolder", train=str(train),
                           test=str(test), out=str(tmp_path / model),
                           cache_dir=str(tmp_path / "cache"), k=5, num_workers=0,
                           similarity=False, top=0, report=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            runs.append(pipeline.run(cfg, progress=False))
        depth_run(runs[-1], progress=False)
        (runs[-1] / "perturb").mkdir()
    fake = types.ModuleType("hardprobe.report.perturb_section")
    seen = []
    fake.robustness_curve_figure = lambda rs: seen.append(rs) or plots.thumbnail(
        np.zeros((8, 8, 3), np.uint8), 16)
    monkeypatch.setitem(sys.modules, "hardprobe.report.perturb_section", fake)
    out = compare(*runs, quantile=0.25, top=2)
    assert out == runs[0] / "compare_cifar_resnet32"
    s = json.loads((out / "summary.json").read_text())
    assert s["n"] == 12 and s["n_top"] == 3 and s["model_b"] == "cifar_resnet32"
    assert sum(s["groups"][g] for g in C.GROUPS) == 12
    assert 0 <= s["cka"] <= 1 and s["robustness"]["available"]
    assert [r.path for r in seen[0]] == runs
    d = s["depth"]
    assert d["shown"] and d["n"] == 12 and (d["n_layers_a"], d["n_layers_b"]) == (9, 15)
    html = (out / "compare.html").read_text()
    assert_self_contained(html)
    shown = sum(min(2, s["groups"][g]) for g in ("both", "only_a", "only_b"))
    # thumbnails (decoded from run A's images) + scatter + depth curves + robustness
    assert html.count("data:image/png;base64,") == shown + 3
    assert "thumbnails unavailable" not in html
    ov = pd.read_parquet(out / "overlap.parquet")
    ex_b = hardprobe.load_run(runs[1]).split_examples("test").set_index("id")
    np.testing.assert_allclose(ov["hardness_b"], ex_b.loc[ov["id"], "hardness"])
