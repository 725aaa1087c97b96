"""Datasets: CIFAR-10 (torchvision's format) and ImageFolder trees.

Both give an `ImageSet`: the class names and, per split, an examples table
(id, split, path, label, label_name) plus a way to decode example i to a uint8
(3, H, W) tensor. A split's `manifest_digest` fingerprints its files, so the feature
cache is invalidated when an image changes.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageOps

from ..errors import DataError, MixedImageSizesError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
EXAMPLE_COLUMNS = ["id", "split", "path", "label", "label_name"]


@dataclass
class Split:
    name: str
    root: str
    examples: pd.DataFrame  # EXAMPLE_COLUMNS, one row per example, row order = feature order
    decode: Callable[[int], torch.Tensor]  # row index -> uint8 (3, H, W)
    manifest_digest: str

    def __len__(self) -> int:
        return len(self.examples)


@dataclass
class ImageSet:
    name: str
    class_names: list[str]
    splits: dict[str, Split]

    def describe(self) -> dict:
        return {"name": self.name, "class_names": self.class_names,
                "splits": {s: {"root": sp.root, "n": len(sp), "manifest": sp.manifest_digest}
                           for s, sp in self.splits.items()}}


class SplitDataset(torch.utils.data.Dataset):
    """Torch view of a split: item j -> (preprocessed tensor or None, row i, error message).

    An image that cannot be decoded gives (None, i, "why") instead of stopping the whole
    run; `collate_skipping` batches the rest and passes the failures on to be recorded.
    """

    def __init__(self, split: Split, transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 indices: np.ndarray | None = None):
        self.split, self.transform = split, transform
        self.indices = np.arange(len(split)) if indices is None else np.asarray(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int):
        i = int(self.indices[j])
        try:
            img = self.split.decode(i)
        except DataError as e:
            return None, i, str(e)
        return (self.transform(img) if self.transform else img), i, ""


def collate_skipping(batch):
    """-> (x (B_ok, ...) or None, rows of x (B_ok,) int64, [(row, error)] of the failed items)."""
    ok, rows, failed = _ok_rows_failed(batch)
    if not ok:
        return None, rows, failed
    try:
        x = torch.stack(ok)
    except RuntimeError as e:  # images of different sizes and no resize/crop to unify them
        raise MixedImageSizesError.of(tuple(x.shape) for x in ok) from e
    return x, rows, failed


def collate_ragged(batch):
    """collate_skipping for images decoded at their source size (extract's resize_on=device):
    x is one (B_ok, 3, H, W) tensor when every image has the same size (CIFAR), else the list
    of the B_ok (3, H, W) tensors, for `Preprocess.geometric_batch` to resize on the device."""
    ok, rows, failed = _ok_rows_failed(batch)
    if not ok:
        return None, rows, failed
    same = all(x.shape == ok[0].shape for x in ok)
    return (torch.stack(ok) if same else ok), rows, failed


def _ok_rows_failed(batch) -> tuple[list[torch.Tensor], torch.Tensor, list[tuple[int, str]]]:
    """SplitDataset items -> (the decoded tensors, their rows (int64), [(row, error)])."""
    ok = [x for x, _, err in batch if not err]
    rows = torch.tensor([i for _, i, err in batch if not err], dtype=torch.int64)
    return ok, rows, [(i, err) for _, i, err in batch if err]


# ---------------------------------------------------------------- decoding
def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL image -> uint8 (3, H, W). EXIF orientation applied; grayscale, palette, RGBA
    (alpha dropped), CMYK and 16-bit images converted to 8-bit RGB."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def read_image(path: str | os.PathLike) -> torch.Tensor:
    try:
        with Image.open(path) as img:
            img.load()
            return pil_to_tensor(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:  # bad files
        raise DataError(f"cannot decode image {path}: {e}. Remove or replace the file.") from e


# ---------------------------------------------------------------- ImageFolder
def _scan_folder(root: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """-> (sorted class names, [(relative path, class name)]) as torchvision's ImageFolder."""
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist; expected <root>/<class>/<image> files")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise DataError(f"{root} has no class folders; expected <root>/<class>/<image> files")
    items, empty = [], []
    skip = len(str(root)) + 1  # plain string slicing: pathlib costs seconds on 60,000 files
    for c in classes:
        files = sorted(
            os.path.join(dirpath, f)[skip:].replace(os.sep, "/")
            for dirpath, _, fnames in os.walk(os.path.join(root, c), followlinks=True)
            for f in fnames if f.lower().endswith(IMG_EXTENSIONS))
        if not files:
            empty.append(c)
        items += [(f, c) for f in files]
    if empty:
        raise DataError(f"class folder(s) with no images in {root}: {', '.join(empty)} "
                        f"(extensions {', '.join(IMG_EXTENSIONS)}). Remove them or add images.")
    return classes, items


def _manifest_digest(root: Path, rel_paths: list[str]) -> str:
    h = hashlib.sha256()
    base = str(root)
    for rel in rel_paths:
        st = os.stat(os.path.join(base, rel))
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _examples(split: str, paths: list[str], labels: np.ndarray, class_names: list[str]) -> pd.DataFrame:
    return pd.DataFrame({
        "id": [f"{split}/{p}" for p in paths],
        "split": split,
        "path": paths,
        "label": labels.astype(np.int64),
        "label_name": [class_names[i] for i in labels],
    })


def load_imagefolder(train: str | os.PathLike, test: str | os.PathLike | None = None) -> ImageSet:
    """Train (and test) folders of <class>/<image> files; labels follow the train classes."""
    splits, class_names = {}, None
    for name, root in (("train", train), ("test", test)):
        if root is None:
            continue
        root = Path(root).expanduser().resolve()
        classes, items = _scan_folder(root)
        if class_names is None:
            class_names = classes
        unknown = sorted(set(classes) - set(class_names))
        if unknown:
            raise DataError(f"{name} folder {root} has classes not in the train folder: "
                            f"{', '.join(unknown)}. Both splits must share the train classes.")
        index = {c: i for i, c in enumerate(class_names)}
        paths = [p for p, _ in items]
        labels = np.array([index[c] for _, c in items], dtype=np.int64)
        splits[name] = Split(name, str(root), _examples(name, paths, labels, class_names),
                             _folder_decoder(root, paths), _manifest_digest(root, paths))
    return ImageSet("imagefolder", class_names, splits)


def _folder_decoder(root: Path, paths: list[str]) -> Callable[[int], torch.Tensor]:
    return _FolderDecoder(str(root), paths)


class _FolderDecoder:  # a class, not a closure, so DataLoader workers can pickle it
    def __init__(self, root: str, paths: list[str]):
        self.root, self.paths = root, paths

    def __call__(self, i: int) -> torch.Tensor:
        return read_image(os.path.join(self.root, self.paths[i]))


# ---------------------------------------------------------------- CIFAR-10
class _ArrayDecoder:
    def __init__(self, images: np.ndarray):  # (N, H, W, 3) uint8
        self.images = images

    def __call__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.images[i]).permute(2, 0, 1).contiguous()


def load_cifar10(root: str | os.PathLike, *, download: bool = True) -> ImageSet:
    """CIFAR-10 in torchvision's format: <root>/cifar-10-batches-py/{data_batch_1..5,test_batch}.

    Downloaded through torchvision when the folder is missing and `download` is set.
    """
    root = Path(root).expanduser().resolve()
    folder = root / CIFAR10_FOLDER
    if not folder.is_dir():
        _download_cifar10(root, folder, download)
    names = _unpickle(folder / "batches.meta", folder)[b"label_names"]
    class_names = [n.decode() if isinstance(n, bytes) else n for n in names]
    splits = {}
    for name, files in (("train", CIFAR10_TRAIN), ("test", CIFAR10_TEST)):
        images, labels, paths = [], [], []
        for f in files:
            batch = _unpickle(folder / f, folder)
            data = np.asarray(batch[b"data"], dtype=np.uint8)  # (n, 3072), channel-major
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels += list(batch.get(b"labels", batch.get(b"fine_labels", [])))
            paths += [f"{f}:{i:05d}" for i in range(len(data))]
        labels = np.asarray(labels, dtype=np.int64)
        splits[name] = Split(name, str(folder), _examples(name, paths, labels, class_names),
                             _ArrayDecoder(np.ascontiguousarray(np.concatenate(images))),
                             _manifest_digest(folder, list(files)))
    return ImageSet("cifar10", class_names, splits)


CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST = ("test_batch",)


def _unpickle(path: Path, folder: Path) -> dict:
    import pickle
    if not path.is_file():
        raise DataError(f"CIFAR-10 folder {folder} lacks {path.name}; expected torchvision's "
                        f"layout (batches.meta, data_batch_1..5, test_batch). Delete the folder "
                        f"to download it again.")
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def _download_cifar10(root: Path, folder: Path, download: bool) -> None:
    from torchvision.datasets import CIFAR10
    fix = (f"Fetch {CIFAR10.url}, extract it so that {folder}/data_batch_1 exists, and pass "
           f"--data-root {root}; or use --data imagefolder with your own folders.")
    if not download:
        raise DataError(f"CIFAR-10 not found at {folder} and --no-download is set. {fix}")
    try:
        CIFAR10(str(root), train=True, download=True)
    except Exception as e:  # noqa: BLE001 - any network failure gets the same advice
        raise DataError(f"CIFAR-10 not found at {folder} and the download failed ({e}). {fix}") from e


def load_dataset(kind: str, *, data_root: str | None = None, train: str | None = None,
                 test: str | None = None, download: bool = True) -> ImageSet:
    """Entry point used by the pipeline: kind is 'cifar10' or 'imagefolder'."""
    if kind == "cifar10":
        return load_cifar10(data_root or "data", download=download)
    if kind == "imagefolder":
        if train is None:
            raise DataError("--data imagefolder needs --train DIR (and usually --test DIR)")
        return load_imagefolder(train, test)
    raise DataError(f"unknown dataset kind {kind!r}; use 'cifar10' or 'imagefolder'")


def plant_label_noise(examples: pd.DataFrame, share: float, class_names: list[str], *,
                      seed: int = 0, split: str = "train") -> pd.DataFrame:
    """Flip `share` of `split`'s labels to another class, uniformly at random (fixed seed):
    a known answer for label-issue finders. Adds `clean_label` (the label read from disk) and
    `planted_noise` (True where flipped); `label` and `label_name` become the given, noisy
    label that every stage then uses. share=0 returns the table unchanged."""
    if share <= 0:
        return examples
    n_classes = len(class_names)
    if n_classes < 2:
        raise DataError("label noise needs at least 2 classes to flip between")
    out = examples.copy()
    rows = np.flatnonzero(out["split"].to_numpy() == split)
    rng = np.random.default_rng([int(seed), 0x6E6F6973])  # own stream: not the heads' seed
    flip = rng.choice(rows, size=int(round(share * len(rows))), replace=False)
    clean = out["label"].to_numpy(np.int64)
    noisy = clean.copy()
    noisy[flip] = (clean[flip] + rng.integers(1, n_classes, size=len(flip))) % n_classes
    out["clean_label"] = clean
    out["planted_noise"] = noisy != clean
    out["label"] = noisy
    out["label_name"] = [class_names[v] for v in noisy]
    return out
