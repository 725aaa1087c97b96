"""Other labels for a split, read from files: human soft labels and replacement labels.

Two layouts, for both readers:

- `.npy` (or a single-array `.npz`): rows in the split's dataset order, which is the order of
  the split's examples table (torchvision's order for `--data cifar10`, as CIFAR-10H and
  CIFAR-10N publish theirs; sorted class/file paths for `imagefolder`). Its length must be
  the split's number of images.
- `.csv` / `.parquet`: an `id` column (the run's ids, e.g. `test/cat/0001.png`) or a `path`
  column (relative to the split's folder, e.g. `cat/0001.png`) naming each row's example.
  Soft labels: one column per class, named by class name or by class index (0 .. C-1).
  Labels: a `label` column holding class names or indices. Examples the file does not list
  keep NaN (soft labels) or their label (labels); a row naming no example is an error.

Soft labels are counts or probabilities per class; both are returned as probabilities (each
row divided by its sum).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import LabelFileError

log = logging.getLogger(__name__)
KEY_COLUMNS = ("id", "path")


def read_soft_labels(path, examples: pd.DataFrame, n_classes: int, *,
                     class_names=None) -> np.ndarray:
    """(N, C) human label distributions for the rows of `examples` (NaN rows: not in file).

    examples: the split's examples (id, path, and label/label_name) in dataset order."""
    path = Path(path)
    names = _class_names(examples, n_classes, class_names)
    if _is_array(path):
        arr = np.asarray(_load_array(path), np.float64)
        if arr.ndim != 2 or arr.shape[1] != n_classes:
            raise LabelFileError(f"{path} holds an array of shape {arr.shape}; soft labels need "
                                 f"(N, {n_classes}): one column per class of the dataset")
        _check_length(path, len(arr), examples)
        out = arr
    else:
        table = _read_table(path)
        rows = _match_rows(path, table, examples)
        cols = _class_columns(path, table, names)
        out = np.full((len(examples), n_classes), np.nan)
        out[rows] = table[cols].to_numpy(np.float64)
    return _normalise(path, out)


def human_columns(examples: pd.DataFrame, soft: np.ndarray, labels) -> pd.DataFrame:
    """id, human_p_given (share of people who chose the given label; higher = people agree
    with it), human_entropy (nats of the human distribution; higher = people disagree more),
    human_majority (the class most people chose; -1 where the file has no row)."""
    soft = np.asarray(soft, np.float64)
    labels = np.asarray(labels, np.int64)
    known = np.isfinite(soft).all(axis=1)
    p = np.where(known[:, None], soft, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
    return pd.DataFrame({
        "id": examples["id"].to_numpy(),
        "human_p_given": np.where(known, p[np.arange(len(p)), labels], np.nan),
        "human_entropy": np.where(known, ent, np.nan),
        "human_majority": np.where(known, p.argmax(axis=1), -1).astype(np.int64)})


def read_labels(path, examples: pd.DataFrame, n_classes: int, *, class_names=None) -> np.ndarray:
    """(N,) int labels for the rows of `examples`: the file's where it names the example,
    else the example's own label."""
    path = Path(path)
    names = _class_names(examples, n_classes, class_names)
    if _is_array(path):
        arr = np.asarray(_load_array(path))
        if arr.ndim != 1:
            raise LabelFileError(f"{path} holds an array of shape {arr.shape}; labels need one "
                                 f"class index per image, shape (N,)")
        _check_length(path, len(arr), examples)
        values, rows = arr, np.arange(len(arr))
    else:
        table = _read_table(path)
        if "label" not in table:
            raise LabelFileError(f"{path} has no `label` column (columns: "
                                 f"{', '.join(map(str, table.columns))}); add one holding "
                                 "class names or indices")
        rows, values = _match_rows(path, table, examples), table["label"].to_numpy()
    out = examples["label"].to_numpy(np.int64).copy()
    out[rows] = _label_indices(path, values, names)
    return out


def _label_indices(path: Path, values, names: list[str]) -> np.ndarray:
    """Class names or indices -> indices in [0, C)."""
    values = np.asarray(values)
    if values.dtype.kind in "iu" or (values.dtype.kind == "f" and
                                     np.all(np.mod(values, 1) == 0)):
        idx = values.astype(np.int64)
    else:
        lookup = {n: i for i, n in enumerate(names)}
        bad = sorted({str(v) for v in values if str(v) not in lookup})
        if bad:
            raise LabelFileError(f"{path}: unknown class name(s) {', '.join(bad[:5])}; the "
                                 f"dataset's classes are {', '.join(names)}")
        idx = np.array([lookup[str(v)] for v in values], np.int64)
    if len(idx) and (idx.min() < 0 or idx.max() >= len(names)):
        raise LabelFileError(f"{path}: label indices must lie in [0, {len(names) - 1}] (the "
                             f"dataset has {len(names)} classes); found {idx.min()}..{idx.max()}")
    return idx


def _class_names(examples: pd.DataFrame, n_classes: int, class_names) -> list[str]:
    if class_names is not None:
        return [str(c) for c in class_names]
    names = [str(i) for i in range(n_classes)]
    if "label_name" in examples:
        for i, n in zip(examples["label"], examples["label_name"]):
            names[int(i)] = str(n)
    return names


def _is_array(path: Path) -> bool:
    if not path.is_file():
        raise LabelFileError(f"label file {path} not found; give the path of a .npy, .csv or "
                             ".parquet file")
    return path.suffix.lower() in (".npy", ".npz")


def _load_array(path: Path) -> np.ndarray:
    data = np.load(path, allow_pickle=False)
    if isinstance(data, np.lib.npyio.NpzFile):
        keys = list(data.keys())
        if len(keys) != 1 and "label" not in keys:
            raise LabelFileError(f"{path} holds arrays {', '.join(keys)}; keep one (or name it "
                                 "`label`)")
        return data["label" if "label" in keys else keys[0]]
    return data


def _read_table(path: Path) -> pd.DataFrame:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return pd.read_csv(path)
    if suffix in (".parquet", ".pq"):
        return pd.read_parquet(path)
    raise LabelFileError(f"{path}: unknown label file type {suffix!r}; use .npy (rows in "
                         "dataset order), .csv or .parquet (with an id or path column)")


def _check_length(path: Path, n: int, examples: pd.DataFrame) -> None:
    if n != len(examples):
        raise LabelFileError(f"{path} has {n} rows but the split has {len(examples)} images; "
                             "a .npy must list every image in dataset order. Use a .csv or "
                             ".parquet with an id or path column to label a subset")


def _match_rows(path: Path, table: pd.DataFrame, examples: pd.DataFrame) -> np.ndarray:
    """Row of `examples` for each row of the file, by its id or path column."""
    key = next((k for k in KEY_COLUMNS if k in table), None)
    if key is None:
        raise LabelFileError(f"{path} has neither an `id` nor a `path` column; add one naming "
                             "each row's example (or give a .npy in dataset order)")
    where = {str(v): i for i, v in enumerate(examples[key])}
    wanted = table[key].astype(str).to_numpy()
    unknown = [v for v in wanted if v not in where]
    if unknown:
        raise LabelFileError(f"{path}: {len(unknown)} {key}(s) name no example of the split, "
                             f"e.g. {unknown[0]!r} (the split's look like "
                             f"{str(examples[key].iloc[0])!r}); fix the {key} column")
    if len(set(wanted)) < len(wanted):
        raise LabelFileError(f"{path}: some {key}s appear twice; keep one row per example")
    if len(wanted) < len(examples):
        log.warning("%s labels %d of the split's %d examples; the others keep theirs",
                    path, len(wanted), len(examples))
    return np.array([where[v] for v in wanted], np.int64)


def _class_columns(path: Path, table: pd.DataFrame, names: list[str]) -> list:
    """The file's column for each class in class order: by name, else by index."""
    cols = [c for c in table.columns if c not in KEY_COLUMNS]
    by_text = {str(c): c for c in cols}
    if all(n in by_text for n in names):
        picked = [by_text[n] for n in names]
    elif all(str(i) in by_text for i in range(len(names))):
        picked = [by_text[str(i)] for i in range(len(names))]
    else:
        raise LabelFileError(f"{path} has {len(cols)} class column(s) ({', '.join(map(str, cols))}"
                             f"); soft labels need one per class of the dataset, named by class "
                             f"({', '.join(names)}) or by index (0..{len(names) - 1})")
    extra = [c for c in cols if c not in picked]
    if extra:
        raise LabelFileError(f"{path} has columns beyond the {len(names)} classes: "
                             f"{', '.join(map(str, extra))}; drop them")
    return picked


def _normalise(path: Path, counts: np.ndarray) -> np.ndarray:
    known = np.isfinite(counts).all(axis=1)
    c = counts[known]
    if (c < 0).any():
        raise LabelFileError(f"{path} holds negative values; soft labels are counts or "
                             "probabilities per class")
    total = c.sum(axis=1)
    if (total <= 0).any():
        raise LabelFileError(f"{path}: {int((total <= 0).sum())} row(s) sum to 0; every listed "
                             "example needs at least one vote")
    out = np.full(counts.shape, np.nan)
    out[known] = c / total[:, None]
    return out


def apply_labels(examples: pd.DataFrame, new_labels: pd.Series, class_names: list[str],
                 ) -> pd.DataFrame:
    """Replace the labels of the examples whose id is in `new_labels` (id -> class index),
    keeping the originals in `clean_label` and marking `planted_noise` where they differ: the
    columns --label-noise writes, so classify scores the label-issue finders against them."""
    out = examples.copy()
    clean = out["label"].to_numpy(np.int64)
    given = out["id"].map(new_labels).fillna(pd.Series(clean, index=out.index))
    given = given.to_numpy(np.int64)
    out["clean_label"] = clean
    out["planted_noise"] = given != clean
    out["label"] = given
    out["label_name"] = [class_names[v] for v in given]
    return out
