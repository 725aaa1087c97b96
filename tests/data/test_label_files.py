"""Label files: human soft labels and replacement labels, in both layouts, and --labels end to end."""
import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

import hardprobe
from hardprobe import pipeline
from hardprobe.config import build_config
from hardprobe.data.label_files import human_columns, read_labels, read_soft_labels
from hardprobe.errors import ConfigError, LabelFileError

NAMES = ["cat", "dog", "frog"]


@pytest.fixture
def examples():
    labels = np.array([0, 1, 2, 0, 1, 2])
    paths = [f"{NAMES[c]}/img_{i:03d}.png" for i, c in enumerate(labels)]
    return pd.DataFrame({"id": [f"test/{p}" for p in paths], "split": "test", "path": paths,
                         "label": labels, "label_name": [NAMES[c] for c in labels]})


@pytest.fixture
def counts():  # (6, 3) votes of 10 people per image (CIFAR-10H's layout)
    return np.array([[10, 0, 0], [2, 8, 0], [0, 5, 5], [1, 1, 8], [0, 10, 0], [3, 3, 4]])


def test_soft_labels_npy_in_dataset_order(tmp_path, examples, counts):
    np.save(tmp_path / "h.npy", counts)
    soft = read_soft_labels(tmp_path / "h.npy", examples, 3)
    assert np.allclose(soft, counts / counts.sum(1, keepdims=True))
    cols = human_columns(examples, soft, examples["label"])
    assert np.allclose(cols["human_p_given"], [1.0, 0.8, 0.5, 0.1, 1.0, 0.4])
    assert cols["human_majority"].tolist()[:5] == [0, 1, 1, 2, 1]  # a tie: the first class
    # entropy in nats: 0 for unanimous, log 2 for an even split between two classes
    assert cols["human_entropy"].iloc[0] == 0 and np.isclose(cols["human_entropy"].iloc[2],
                                                              np.log(2))
    assert cols["human_entropy"].iloc[5] > cols["human_entropy"].iloc[1]


@pytest.mark.parametrize("key,fmt", [("id", "csv"), ("path", "parquet"), ("path", "csv")])
def test_soft_labels_table_by_id_or_path(tmp_path, examples, counts, key, fmt):
    order = [3, 0, 5, 1]  # a subset, shuffled
    table = pd.DataFrame(counts[order], columns=NAMES)[["frog", "cat", "dog"]]  # any order
    table.insert(0, key, examples[key].to_numpy()[order])
    f = tmp_path / f"h.{fmt}"
    table.to_csv(f, index=False) if fmt == "csv" else table.to_parquet(f)
    soft = read_soft_labels(f, examples, 3)
    want = counts / counts.sum(1, keepdims=True)
    assert np.allclose(soft[order], want[order])
    missing = [2, 4]
    assert np.isnan(soft[missing]).all()
    cols = human_columns(examples, soft, examples["label"])
    assert cols["human_majority"].iloc[missing].tolist() == [-1, -1]
    # columns named by class index work too
    by_index = table.rename(columns={n: str(i) for i, n in enumerate(NAMES)})
    by_index.to_csv(tmp_path / "i.csv", index=False)
    assert np.allclose(read_soft_labels(tmp_path / "i.csv", examples, 3)[order], want[order])


def test_soft_label_errors_are_named(tmp_path, examples, counts):
    np.save(tmp_path / "short.npy", counts[:4])
    with pytest.raises(LabelFileError, match="has 4 rows but the split has 6"):
        read_soft_labels(tmp_path / "short.npy", examples, 3)
    np.save(tmp_path / "wide.npy", np.ones((6, 4)))
    with pytest.raises(LabelFileError, match=r"\(N, 3\)"):
        read_soft_labels(tmp_path / "wide.npy", examples, 3)
    t = pd.DataFrame(counts, columns=NAMES).assign(id=examples["id"])
    t.assign(id=["test/nope.png"] + examples["id"].tolist()[1:]).to_csv(tmp_path / "u.csv",
                                                                        index=False)
    with pytest.raises(LabelFileError, match="name no example.*nope"):
        read_soft_labels(tmp_path / "u.csv", examples, 3)
    t.drop(columns="frog").to_csv(tmp_path / "c.csv", index=False)
    with pytest.raises(LabelFileError, match="one per class"):
        read_soft_labels(tmp_path / "c.csv", examples, 3)
    t.drop(columns="id").to_csv(tmp_path / "k.csv", index=False)
    with pytest.raises(LabelFileError, match="neither an `id` nor a `path`"):
        read_soft_labels(tmp_path / "k.csv", examples, 3)
    with pytest.raises(LabelFileError, match="not found"):
        read_soft_labels(tmp_path / "absent.npy", examples, 3)


def test_labels_both_layouts_and_errors(tmp_path, examples):
    new = np.array([1, 1, 2, 0, 0, 2])
    np.save(tmp_path / "n.npy", new)
    assert (read_labels(tmp_path / "n.npy", examples, 3) == new).all()
    pd.DataFrame({"path": examples["path"][:3], "label": [NAMES[v] for v in new[:3]]}).to_csv(
        tmp_path / "n.csv", index=False)
    got = read_labels(tmp_path / "n.csv", examples, 3)  # unlisted rows keep their label
    assert (got == np.r_[new[:3], examples["label"][3:]]).all()
    pd.DataFrame({"id": examples["id"], "label": new}).to_parquet(tmp_path / "n.parquet")
    assert (read_labels(tmp_path / "n.parquet", examples, 3) == new).all()
    np.save(tmp_path / "long.npy", np.r_[new, 0])
    with pytest.raises(LabelFileError, match="has 7 rows"):
        read_labels(tmp_path / "long.npy", examples, 3)
    np.save(tmp_path / "big.npy", np.r_[new[:5], 3])
    with pytest.raises(LabelFileError, match=r"\[0, 2\].*3 classes"):
        read_labels(tmp_path / "big.npy", examples, 3)
    pd.DataFrame({"id": examples["id"], "label": ["cat"] * 5 + ["horse"]}).to_csv(
        tmp_path / "h.csv", index=False)
    with pytest.raises(LabelFileError, match="unknown class name.*horse"):
        read_labels(tmp_path / "h.csv", examples, 3)
    pd.DataFrame({"id": ["train/x.png"], "label": [0]}).to_csv(tmp_path / "x.csv", index=False)
    with pytest.raises(LabelFileError, match="name no example"):
        read_labels(tmp_path / "x.csv", examples, 3)


def test_labels_run_keeps_clean_label_and_scores_the_finder(tiny_folder, tmp_path):
    train, test = tiny_folder
    cfg = build_config(model="cifar_resnet20", random_init=True, data="imagefolder",
                       train=str(train), test=str(test), out=str(tmp_path / "run"),
                       cache_dir=str(tmp_path / "cache"), k=5, num_workers=0, batch_size=16,
                       similarity=False, top=0, report=False)
    paths = sorted(p.relative_to(train).as_posix() for p in train.rglob("*.png"))
    given = [p.split("/")[0] for p in paths]
    flipped = {p: ("dog" if c == "cat" else "cat") for p, c in zip(paths[::4], given[::4])}
    pd.DataFrame({"path": list(flipped), "label": list(flipped.values())}).to_csv(
        tmp_path / "noisy.csv", index=False)
    out = pipeline.run(dataclasses.replace(cfg, labels=str(tmp_path / "noisy.csv")),
                       progress=False)
    ex = hardprobe.load_run(out).examples
    tr = ex[ex["split"] == "train"].set_index("path")
    assert (tr.loc[list(flipped), "label_name"] == list(flipped.values())).all()
    assert (tr["clean_label"] == [["cat", "dog", "frog"].index(c) for c in
                                  [p.split("/")[0] for p in tr.index]]).all()
    assert tr["planted_noise"].sum() == len(flipped)
    assert not ex.loc[ex["split"] == "test", "planted_noise"].any()
    m = json.loads((out / "metrics.json").read_text())["planted_noise"]
    assert m["planted"] == len(flipped) and m["n"] == len(tr)
    assert m["caught"] == (tr["planted_noise"] & tr["label_issue"]).sum()
    with pytest.raises(ConfigError, match="pass one of them"):
        build_config(labels="x.csv", label_noise=0.1)
