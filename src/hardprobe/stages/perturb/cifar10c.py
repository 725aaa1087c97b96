"""The released CIFAR-10-C on disk: `CIFAR10C(root)` and `read_cifar10c`."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ...errors import PerturbError
from .corruptions import CORRUPTIONS, SEVERITIES


class CIFAR10C:
    """A CIFAR-10-C folder (Hendrycks & Dietterich 2019): <corruption>.npy, (5 * B, 32, 32, 3)
    uint8, severity s in rows (s-1)*B .. s*B - 1 (B = 10,000 in the release), and labels.npy,
    (5 * B,) the labels of those rows (the CIFAR-10 test labels, in order, five times)."""

    def __init__(self, root):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise PerturbError(f"CIFAR-10-C folder {self.root} does not exist")
        lab = self.root / "labels.npy"
        if not lab.is_file():
            raise PerturbError(f"{self.root} has no labels.npy: not a CIFAR-10-C folder "
                               "(<corruption>.npy files and labels.npy)")
        self._labels = np.load(lab, mmap_mode="r")
        if self._labels.ndim != 1 or len(self._labels) % 5 or not len(self._labels):
            raise PerturbError(f"{lab} has shape {self._labels.shape}: expected (5 * B,) with "
                               "B labels per severity")
        self.block = len(self._labels) // 5

    def available(self) -> list[str]:
        return [c for c in CORRUPTIONS if (self.root / f"{c}.npy").is_file()]

    def labels(self, severity: int) -> np.ndarray:
        s = int(severity)
        return np.asarray(self._labels[(s - 1) * self.block:s * self.block], dtype=np.int64)

    def _array(self, corruption: str) -> np.ndarray:
        p = self.root / f"{corruption}.npy"
        if not p.is_file():
            raise PerturbError(f"{self.root} has no {corruption}.npy (it has: "
                               f"{', '.join(self.available()) or 'no corruption file'})")
        a = np.load(p, mmap_mode="r")
        if a.dtype != np.uint8 or a.ndim != 4 or a.shape[0] != 5 * self.block or a.shape[3] != 3:
            raise PerturbError(f"{p} has {a.dtype} {a.shape}; expected uint8 "
                               f"({5 * self.block}, H, W, 3) like labels.npy")
        return a

    def images(self, corruption: str, severity: int, rows=None) -> np.ndarray:
        """(n, H, W, 3) uint8: the block of `severity`, rows of it (default all), in memory."""
        s = int(severity)
        if s not in SEVERITIES:
            raise PerturbError(f"severity must be in 1..5, got {severity}")
        block = self._array(corruption)[(s - 1) * self.block:s * self.block]
        return np.array(block if rows is None else block[np.asarray(rows)], dtype=np.uint8)

    def check_labels(self, test_labels, severities=SEVERITIES) -> None:
        """Raise unless labels.npy's blocks equal `test_labels` (the run's test split, in
        order): CIFAR-10-C rows are CIFAR-10 test images by position."""
        test_labels = np.asarray(test_labels, np.int64)
        if len(test_labels) != self.block:
            raise PerturbError(
                f"the run's test split has {len(test_labels)} images but {self.root} has "
                f"{self.block} per severity: --cifar10c needs a run on the CIFAR-10 test set in "
                f"its original order (data: cifar10)")
        for s in severities:
            bad = int((self.labels(s) != test_labels).sum())
            if bad:
                raise PerturbError(
                    f"labels.npy of {self.root} (severity {s}) differs from the run's test "
                    f"labels at {bad} of {self.block} positions: its images are not this run's "
                    f"test images in order. --cifar10c needs a run on the CIFAR-10 test set in "
                    f"its original order (data: cifar10)")

    def describe(self, corruption: str | None = None) -> dict:
        files = ["labels.npy"] + ([f"{corruption}.npy"] if corruption else [])
        return {"root": str(self.root.resolve()),
                "files": {f: [(st := (self.root / f).stat()).st_size, st.st_mtime_ns]
                          for f in files}}


def read_cifar10c(root, corruption: str, severity: int, rows=None) -> np.ndarray:
    """(n, 32, 32, 3) uint8 images of `corruption` at `severity` from a CIFAR-10-C folder."""
    return CIFAR10C(root).images(corruption, severity, rows)
