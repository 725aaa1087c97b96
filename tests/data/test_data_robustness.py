"""Messy folders and hostile bytes: the readers either decode or raise DataError, nothing else."""
import io
import os
import random

import numpy as np
import pytest
import torch
from conftest import make_image
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from hardprobe.data.datasets import load_imagefolder, read_image
from hardprobe.errors import DataError

FUZZ_CASES = int(os.environ.get("HARDPROBE_FUZZ_CASES", "300"))


def _seed_files():
    rng = np.random.default_rng(0)
    img = make_image(rng, (120, 60, 200), size=(24, 16))
    out = {}
    for fmt in ("JPEG", "PNG"):
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        out[fmt] = buf.getvalue()
    return out


def _mutate(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    op = rng.choice(["flip", "truncate", "insert", "zero", "header"])
    if op == "flip":
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif op == "truncate":
        b = b[:rng.randrange(len(b))]
    elif op == "insert":
        i = rng.randrange(len(b))
        b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    elif op == "zero":
        i = rng.randrange(len(b))
        b[i:i + rng.randint(1, 64)] = bytes(min(64, len(b) - i))
    else:  # damage the first bytes: sizes, magic numbers
        for i in range(rng.randint(1, 4)):
            b[rng.randrange(min(32, len(b)))] = rng.randrange(256)
    return bytes(b)


def test_fuzz_image_reader(tmp_path):
    """Mutated JPEG/PNG bytes: every case decodes to uint8 (3, H, W) or raises DataError."""
    rng = random.Random(0)
    seeds = _seed_files()
    outcomes = {"decoded": 0, "DataError": 0}
    for case in range(FUZZ_CASES):
        fmt = rng.choice(sorted(seeds))
        path = tmp_path / f"case.{'jpg' if fmt == 'JPEG' else 'png'}"
        path.write_bytes(_mutate(seeds[fmt], rng))
        try:
            t = read_image(path)
        except DataError:
            outcomes["DataError"] += 1
            continue
        assert t.dtype == torch.uint8 and t.ndim == 3 and t.shape[0] == 3, case
        outcomes["decoded"] += 1
    assert sum(outcomes.values()) == FUZZ_CASES and outcomes["DataError"] > 0


@settings(max_examples=40, deadline=None)
@given(w=st.integers(1, 64), h=st.integers(1, 64),
       mode=st.sampled_from(["RGB", "L", "P", "RGBA", "LA", "1", "CMYK", "I;16"]),
       fmt=st.sampled_from(["PNG", "TIFF", "JPEG", "BMP", "WEBP"]))
def test_any_mode_and_size_reads_as_rgb_uint8(tmp_path_factory, w, h, mode, fmt):
    if (fmt, mode) in {("JPEG", "P"), ("JPEG", "RGBA"), ("JPEG", "LA"), ("JPEG", "I;16"),
                       ("BMP", "CMYK"), ("BMP", "LA"), ("BMP", "I;16"), ("WEBP", "CMYK"),
                       ("WEBP", "I;16"), ("PNG", "CMYK"), ("BMP", "RGBA"), ("WEBP", "LA"),
                       ("WEBP", "P"), ("WEBP", "1"), ("WEBP", "L")}:
        return  # the format cannot store the mode
    rng = np.random.default_rng(w * 100 + h)
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    else:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
    path = tmp_path_factory.mktemp("img") / f"x.{fmt.lower()}"
    img.save(path, format=fmt)
    t = read_image(path)
    assert t.dtype == torch.uint8 and t.shape == (3, h, w)


def test_unusual_paths_and_symlinks(tmp_path):
    root = tmp_path / "train"
    rng = np.random.default_rng(0)
    for cls in ("chat noir", "déjà vu", "猫"):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            make_image(rng, (10, 20, 30)).save(root / cls / f"ïmage {i}.png")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    make_image(rng, (1, 2, 3)).save(elsewhere / "linked.png")
    os.symlink(elsewhere / "linked.png", root / "猫" / "link.png")
    os.symlink(root / "chat noir", root / "symlinked class")
    ds = load_imagefolder(root)
    ex = ds.splits["train"].examples
    assert ds.class_names == sorted(["chat noir", "déjà vu", "猫", "symlinked class"])
    assert "猫/link.png" in set(ex["path"]) and len(ex) == 9
    for i in range(len(ex)):
        assert ds.splits["train"].decode(i).shape == (3, 32, 32)


def test_non_image_files_in_class_folders_are_ignored(tmp_path):
    root = tmp_path / "train"
    (root / "a").mkdir(parents=True)
    make_image(np.random.default_rng(0), (1, 1, 1)).save(root / "a" / "x.png")
    (root / "a" / "notes.txt").write_text("not an image")
    (root / "a" / ".DS_Store").write_bytes(b"\0\0")
    assert list(load_imagefolder(root).splits["train"].examples["path"]) == ["a/x.png"]


def test_image_bomb_header_is_a_data_error(tmp_path):
    Image.MAX_IMAGE_PIXELS, old = 1000, Image.MAX_IMAGE_PIXELS
    try:
        Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
        with pytest.raises(DataError, match="big.png"):
            read_image(tmp_path / "big.png")
    finally:
        Image.MAX_IMAGE_PIXELS = old
