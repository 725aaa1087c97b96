"""Shared fixtures: tiny datasets the tests make themselves, and ../shared when present."""
from __future__ import annotations

import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from threadpoolctl import threadpool_limits

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CLASS_COLORS = {"cat": (200, 40, 40), "dog": (40, 200, 40), "frog": (40, 40, 200)}


def make_image(rng: np.random.Generator, color, size=(32, 32), noise=40) -> Image.Image:
    base = np.array(color, dtype=np.int16)[None, None, :]
    arr = base + rng.integers(-noise, noise + 1, size=(size[1], size[0], 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def make_folder(root: Path, n_per_class: int, seed: int, classes=CLASS_COLORS, ext=".png") -> Path:
    rng = np.random.default_rng(seed)
    for c, color in classes.items():
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            make_image(rng, color).save(root / c / f"img_{i:03d}{ext}")
    return root


@pytest.fixture
def tiny_folder(tmp_path) -> tuple[Path, Path]:
    """train/ and test/ ImageFolder trees: 3 colour-coded classes, 12 and 4 images each."""
    return make_folder(tmp_path / "train", 12, 0), make_folder(tmp_path / "test", 4, 1)


@pytest.fixture
def fake_cifar(tmp_path) -> Path:
    """A CIFAR-10 folder in torchvision's pickle format with 6 train and 4 test images a batch."""
    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [n.encode() for n in names]}, f)
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}", 6) for i in range(1, 6)] + [("test_batch", 4)]:
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": list(rng.integers(0, 10, n))}, f)
    return folder.parent


class TinyNet(torch.nn.Module):
    """A 2-layer conv net: 8-d embedding (mean colour features) and 3 logits."""

    def __init__(self, n_classes=3):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, n_classes)
        self.calls = 0

    def forward(self, x):
        self.calls += len(x)
        emb = torch.relu(self.conv(x)).mean(dim=(2, 3))
        return emb, self.fc(emb)


@pytest.fixture
def tiny_backbone():
    """A Backbone around TinyNet with the tiny datasets' class names."""
    from hardprobe.backbones import Backbone, Preprocess
    net = TinyNet().eval()
    return Backbone(name="tiny", model=net,
                    preprocess=Preprocess(None, None, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
                    embed_dim=8, class_names=list(CLASS_COLORS), cam_layer="conv",
                    weights_id="random-init:test", forward_fn=lambda m, x: m(x))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not (SHARED / "README.md").exists():
        pytest.skip(f"{SHARED} is absent: the real CIFAR-10 JPEGs and checkpoints live there")
    return SHARED


@pytest.fixture(scope="session")
def cifar_jpeg_test(shared_dir, tmp_path_factory) -> Path:
    """The shared JPEG CIFAR-10 test split (10,000 images), extracted once per session."""
    out = tmp_path_factory.mktemp("cifar10-jpeg")
    with tarfile.open(shared_dir / "data" / "cifar10-jpeg" / "test.tar") as t:
        t.extractall(out, filter="data")
    return out / "test"


@pytest.fixture(scope="module")
def one_thread():
    """Torch and BLAS at one thread for a module of tiny problems: on a busy 2-core box a
    second thread only adds contention (measured 6x slower per L-BFGS step). Restored after.
    Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(before)
