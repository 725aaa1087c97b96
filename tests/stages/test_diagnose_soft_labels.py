"""--soft-labels for diagnose: known answers on the synthetic run of test_diagnose.py."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from stages.test_diagnose import _test_rows, base  # noqa: F401  (the synthetic run fixture)

from hardprobe.rundir.run import load_run
from hardprobe.stages.diagnose import diagnose_run
from hardprobe.stages.diagnose.stage import DiagnoseConfig, _key

pytestmark = pytest.mark.usefixtures("one_thread")


def _soft(run, agree_with_given=True):
    """10 votes per test example: all for the given label, except row 0 (all for the next
    class) and row 1 (5/5 given and next)."""
    ex = run.split_examples("test")
    C = len(run.class_names)
    y = ex["label"].to_numpy()
    counts = np.zeros((len(ex), C))
    counts[np.arange(len(ex)), y] = 10
    counts[0] = 0
    counts[0, (y[0] + 1) % C] = 10
    counts[1, y[1]] = 5
    counts[1, (y[1] + 1) % C] = 5
    return ex, counts


def test_npy_soft_labels_give_human_columns_and_stamp(base, tmp_path):  # noqa: F811
    run_dir = Path(shutil.copytree(base, tmp_path / "run"))
    run = load_run(run_dir)
    ex, counts = _soft(run)
    f = tmp_path / "soft.npy"
    np.save(f, counts)
    diagnose_run(run_dir, progress=False, soft_labels=str(f))
    out = load_run(run_dir).split_examples("test").set_index("id")
    first, second = ex["id"].iloc[0], ex["id"].iloc[1]
    C = len(run.class_names)
    assert out.loc[first, "human_p_given"] == 0.0
    assert out.loc[first, "human_majority"] == (ex["label"].iloc[0] + 1) % C
    assert out.loc[second, "human_entropy"] == pytest.approx(np.log(2))
    assert out.loc[ex["id"].iloc[2], "human_p_given"] == 1.0
    key = _key(load_run(run_dir), DiagnoseConfig(soft_labels=str(f)))
    counts[2] = 1
    np.save(f, counts)
    assert _key(load_run(run_dir), DiagnoseConfig(soft_labels=str(f))) != key


def test_csv_by_path_matches_the_npy(base, tmp_path):  # noqa: F811
    run_dir = Path(shutil.copytree(base, tmp_path / "run"))
    run = load_run(run_dir)
    ex, counts = _soft(run)
    table = pd.DataFrame(counts[:3], columns=[str(c) for c in run.class_names])
    table.insert(0, "path", ex["path"].iloc[:3].to_numpy())
    f = tmp_path / "soft.csv"
    table.to_csv(f, index=False)
    diagnose_run(run_dir, progress=False, soft_labels=str(f))
    out = load_run(run_dir).split_examples("test")
    assert (out["human_majority"] >= 0).sum() == 3
    assert out["human_p_given"].notna().sum() == 3


def _planted_votes(run):
    """10 votes per test example for its given label, except: every flip_* (cluster a,
    labelled b) 10 for a, the true class; the first merr_* (typical c, the model says a) 10
    for a; the first plain c example 5 for c and 5 for a."""
    ex = _test_rows(run.path)
    counts = np.zeros((len(ex), len(run.class_names)))
    counts[np.arange(len(ex)), ex["label"].to_numpy()] = 10
    flip = (ex["kind"] == "flip").to_numpy()
    counts[flip] = 0
    counts[flip, 0] = 10
    merr0 = int(np.flatnonzero((ex["kind"] == "merr").to_numpy())[0])
    counts[merr0] = [10, 0, 0]
    split = int(np.flatnonzero(((ex["kind"] == "n") & (ex["label"] == 2)).to_numpy())[0])
    counts[split] = [5, 0, 5]
    return ex, counts, merr0, split


def test_people_feed_label_error_ambiguous_model_error_and_the_2x2(base, tmp_path):  # noqa: F811
    run_dir = Path(shutil.copytree(base, tmp_path / "run"))
    ex, counts, merr0, split = _planted_votes(load_run(run_dir))
    f = tmp_path / "soft.npy"
    np.save(f, counts)
    summary = diagnose_run(run_dir, progress=False, soft_labels=str(f))
    run = load_run(run_dir)
    out = run.split_examples("test").set_index("id").loc[ex["id"]]
    flip = (ex["kind"] == "flip").to_numpy()
    assert (out["failure_mode"].to_numpy()[flip] == "label_error").all()
    assert all("people: 100% say a (0% b, the given label)" in e
               for e in out["evidence"].to_numpy()[flip])
    assert out["cause_ambiguous"].iat[split] and out["failure_mode"].iat[split] == "ambiguous"
    assert "people: 50% say a" in out["evidence"].iat[split]
    merr = (ex["kind"] == "merr").to_numpy().copy()
    merr[merr0] = False  # people side with the model there: no model_error
    assert out["cause_model_error"].to_numpy()[merr].all()
    assert not out["cause_model_error"].iat[merr0]
    assert summary["thresholds"]["human_entropy_cut"] == pytest.approx(np.log(3) - 2 / 3 * np.log(2))
    hv = summary["human_vs_model"]
    model = (out[f"pred_{summary['primary_head']}"] != out["label"]).to_numpy()
    people = out["human_p_given"].to_numpy() < 0.5
    want = {"both": model & people, "model_only": model & ~people,
            "people_only": ~model & people, "neither": ~model & ~people}
    assert hv["counts"] == {c: int(m.sum()) for c, m in want.items()}
    assert hv["counts"]["both"] == int(flip.sum()) + 1 and hv["n"] == len(ex)
    ids = out.index.to_numpy()
    for c, m in want.items():
        assert len(hv["examples"][c]) == min(4, int(m.sum()))
        assert set(hv["examples"][c]) <= set(ids[m])
    assert load_run(run_dir).metrics["diagnose"]["human_vs_model"] == hv
    from hardprobe.report import write_report
    html = write_report(run_dir, top=6, out=tmp_path / "r.html").read_text()
    assert "Hard for the model, hard for people" in html and "human_p_given &lt; 0.5" in html


def test_a_row_the_file_lacks_does_not_veto_model_error(base, tmp_path):  # noqa: F811
    run_dir = Path(shutil.copytree(base, tmp_path / "run"))
    ex = _test_rows(run_dir)
    table = pd.DataFrame({"id": ex["id"].iloc[:2], "0": 10, "1": 0, "2": 0})  # 2 a rows only
    f = tmp_path / "soft.parquet"
    table.to_parquet(f)
    diagnose_run(run_dir, progress=False, soft_labels=str(f), images=False, slices=False)
    out = load_run(run_dir).split_examples("test").set_index("id").loc[ex["id"]]
    assert (out["human_p_given"].iloc[:2] == 1.0).all()  # parquet by id, columns by index
    assert out["human_p_given"].iloc[2:].isna().all()
    assert out["cause_model_error"].to_numpy()[(ex["kind"] == "merr").to_numpy()].all()


@pytest.mark.parametrize("make,fix", [
    (lambda ex, C: np.ones((len(ex) - 1, C)), "dataset order"),
    (lambda ex, C: np.ones((len(ex), C + 1)), r"\(N, 3\)"),
    (lambda ex, C: pd.DataFrame({"id": ["test/a/nope.png"], "a": [1], "b": [0], "c": [0]}),
     "fix the id column"),
    (lambda ex, C: pd.DataFrame({"id": ex["id"].iloc[:1], "a": [1], "b": [0]}),
     "one per class"),
])
def test_bad_files_raise_with_the_fix(base, tmp_path, make, fix):  # noqa: F811
    from hardprobe.errors import HardprobeError
    run = load_run(base)
    data = make(run.split_examples("test"), len(run.class_names))
    f = tmp_path / ("soft.npy" if isinstance(data, np.ndarray) else "soft.csv")
    np.save(f, data) if isinstance(data, np.ndarray) else data.to_csv(f, index=False)
    run_dir = Path(shutil.copytree(base, tmp_path / "run"))
    with pytest.raises(HardprobeError, match=fix):
        diagnose_run(run_dir, progress=False, soft_labels=str(f), images=False, slices=False)


def test_rediagnosing_without_the_file_forgets_the_people(base, tmp_path):  # noqa: F811
    run_dir = Path(shutil.copytree(base, tmp_path / "run"))
    ex, counts, merr0, _ = _planted_votes(load_run(run_dir))
    f = tmp_path / "soft.npy"
    np.save(f, counts)
    fast = {"progress": False, "images": False, "slices": False}
    diagnose_run(run_dir, soft_labels=str(f), **fast)
    assert not load_run(run_dir).split_examples("test").set_index("id").loc[
        ex["id"].iat[merr0], "cause_model_error"]
    summary = diagnose_run(run_dir, **fast)  # the stored human_* columns are not a vote
    out = load_run(run_dir).split_examples("test").set_index("id").loc[ex["id"]]
    assert out["cause_model_error"].iat[merr0] and out["human_p_given"].isna().all()
    assert summary["human_vs_model"] is None
