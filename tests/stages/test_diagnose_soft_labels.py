"""--soft-labels for diagnose: known answers on the synthetic run of test_diagnose.py."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from stages.test_diagnose import base  # noqa: F401  (the synthetic run fixture)

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
