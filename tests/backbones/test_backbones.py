"""Backbones: registry, weights loading and its errors, CAM reshapes, preprocessing, accuracy.

Big models run with random_init (no weights are downloaded); the real CIFAR ResNet checkpoint
is checked against the real CIFAR-10 test JPEGs in ../shared when that folder exists.
"""
from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import os
import time
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from hardprobe.backbones import Preprocess, create_backbone, list_backbones, list_layers
from hardprobe.backbones import _weights as W
from hardprobe.backbones.cifar_resnet import CifarResNet, ShortcutA
from hardprobe.errors import UnknownModelError

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
CIFAR_CKPT = SHARED / "models" / "cifar-resnet"
CIFAR_TEST_TAR = SHARED / "data" / "cifar10-jpeg" / "test.tar"
needs_shared = pytest.mark.skipif(
    not (CIFAR_CKPT.is_dir() and CIFAR_TEST_TAR.is_file()),
    reason=f"{SHARED} (real CIFAR-10 JPEGs and CIFAR ResNet checkpoints) is absent")

REGISTERED = [b["name"] for b in list_backbones() if not b["name"].endswith("<name>")]
SMALL_INPUT = {"resnet50": 64}  # image_size overrides that keep the tests fast


@functools.lru_cache(maxsize=None)
def random_backbone(name: str, image_size: int | None = None):
    """Shared random-init backbones (building ViT-B/16 takes seconds); do not mutate them."""
    return create_backbone(name, random_init=True, image_size=image_size)


def images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


def batch_for(bb, n: int = 2) -> torch.Tensor:
    size = bb.preprocess.output_size or 32
    return bb.preprocess(images(n, size + 6))  # off-size on purpose: preprocess must fix it


def perturbed(state_dict: dict) -> dict:
    """Other weights of the same shapes (so a load that does nothing is caught); cheap."""
    return {k: v * 1.05 + 0.01 if v.is_floating_point() else v.clone() for k, v in state_dict.items()}


def run(bb, x):
    with torch.inference_mode():
        return bb(x)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread: on a busy 2-core machine two threads that wait on each other make
    a small-batch ResNet-50 forward ~30x slower; one thread is always fast enough here."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Empty TORCH_HOME / HF cache under tmp, and every download fails at once."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)  # undo any torch.hub.set_dir

    def no_network(url, *a, **k):
        raise urllib.error.URLError(f"test: no network for {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    try:
        from huggingface_hub import constants
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    except ImportError:
        pass
    return tmp_path / "torch" / "hub" / "checkpoints"


# ---------------------------------------------------------------------------- registry


@pytest.mark.parametrize("name", REGISTERED)
def test_every_registered_backbone_builds_and_runs(name):
    bb = random_backbone(name, SMALL_INPUT.get(name))
    x = batch_for(bb, 1 if name.startswith("vit") else 2)
    emb, logits = run(bb, x)
    assert emb.shape == (x.shape[0], bb.embed_dim) and emb.dtype == torch.float32
    assert logits.shape == (x.shape[0], bb.num_classes) and logits.dtype == torch.float32
    assert torch.isfinite(emb).all() and torch.isfinite(logits).all()
    assert bb.weights_id == "random-init:seed=0"
    assert not bb.model.training
    layers = list_layers(bb)
    assert bb.cam_layer in layers
    assert bb.depth_layers and all(d in layers for d in bb.depth_layers)
    assert bb.describe()["num_classes"] == bb.num_classes


def test_random_init_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = create_backbone("cifar_resnet20", random_init=True)
    assert torch.equal(torch.random.get_rng_state(), before)
    b = create_backbone("cifar_resnet20", random_init=True)
    for (k, v), w in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(v, w), k


def test_unknown_name_suggests_close_matches():
    with pytest.raises(UnknownModelError, match="resnet50") as e:
        create_backbone("resnet5O")
    assert "hardprobe models" in str(e.value)
    with pytest.raises(UnknownModelError, match="timm:resnet18"):
        create_backbone("timm:resnet1800", random_init=True)


def test_weights_and_random_init_contradict():
    with pytest.raises(ValueError, match="contradict"):
        create_backbone("cifar_resnet20", weights="x.th", random_init=True)


def test_weights_tags():
    v1 = create_backbone("resnet50", weights_tag="IMAGENET1K_V1", random_init=True)
    assert v1.preprocess.resize_size == 256 and v1.extra["weights_tag"] == "IMAGENET1K_V1"
    assert random_backbone("resnet50", 64).extra["weights_tag"] == "IMAGENET1K_V2"
    with pytest.raises(ValueError, match="IMAGENET1K_V2"):
        create_backbone("resnet50", weights_tag="IMAGENET1K_V9", random_init=True)


# ---------------------------------------------------------------------------- no weights


@pytest.mark.parametrize("name, expect", [
    ("resnet50", "download.pytorch.org/models/resnet50-11ad3fa6.pth"),
    ("vit_b_16", "download.pytorch.org/models/vit_b_16-c867db91.pth"),
    ("cifar_resnet20", "akamaster/pytorch_resnet_cifar10"),
    ("cifar_resnet110", "resnet110-1d1ed7c2.th"),
    ("timm:resnet18", "timm/resnet18"),
])
def test_missing_weights_fail_fast_with_the_fix(offline, name, expect):
    t = time.perf_counter()
    with pytest.raises(W.WeightsUnavailableError) as e:
        create_backbone(name)
    assert time.perf_counter() - t < 10
    msg = str(e.value)
    assert expect in msg and "--weights" in msg
    if not name.startswith("timm:"):
        assert str(offline) in msg  # the exact place to put the file


def test_cached_torchvision_file_is_used_and_hash_checked(offline):
    # A file at torch.hub's path is used without a download; its name's hash prefix is checked.
    offline.mkdir(parents=True)
    torch.save(random_backbone("resnet50", 64).model.state_dict(), offline / "resnet50-11ad3fa6.pth")
    with pytest.raises(W.WeightsError, match="11ad3fa6"):
        create_backbone("resnet50")


# ---------------------------------------------------------------------------- weights files


def _roundtrip(name, tmp_path, image_size=None, n=2):
    ref = copy.deepcopy(random_backbone(name, image_size))
    sd = perturbed(ref.model.state_dict())
    ref.model.load_state_dict(sd)
    path = tmp_path / f"{name.replace(':', '_')}.pth"
    torch.save(sd, path)
    bb = create_backbone(name, weights=str(path), image_size=image_size)
    x = batch_for(bb, n)
    (e0, l0), (e1, l1) = run(ref, x), run(bb, x)
    assert torch.equal(e0, e1) and torch.equal(l0, l1)
    assert not torch.equal(e1, run(random_backbone(name, image_size), x)[0])
    assert bb.weights_id == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    return bb, path


@pytest.mark.parametrize("name, size", [("cifar_resnet20", None), ("resnet50", 64),
                                        ("timm:resnet18", 64)])
def test_weights_file_reproduces_outputs(tmp_path, name, size):
    _roundtrip(name, tmp_path, size)


def test_vit_b_16_weights_file_and_other_image_size(tmp_path):
    bb, path = _roundtrip("vit_b_16", tmp_path, n=1)
    # The same 224 file at 64x64: the position embedding is interpolated to the 4x4 grid.
    small = create_backbone("vit_b_16", weights=str(path), image_size=64)
    assert small.preprocess.crop_size == 64 and small.cam_reshape.grid == (4, 4)
    assert small.model.encoder.pos_embedding.shape == (1, 1 + 16, 768)
    emb, logits = run(small, batch_for(small, 1))
    assert emb.shape == (1, 768) and logits.shape == (1, 1000)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        create_backbone("vit_b_16", weights=str(path), image_size=100)


def test_timm_vit_file_of_another_image_size_is_resampled(tmp_path):
    # timm's own checkpoint conversion (checkpoint_filter_fn) resamples the position embedding.
    path = tmp_path / "vit_tiny_224.pth"
    torch.save(perturbed(random_backbone("timm:vit_tiny_patch16_224").model.state_dict()), path)
    bb = create_backbone("timm:vit_tiny_patch16_224", weights=str(path), image_size=64)
    assert bb.model.pos_embed.shape == (1, 1 + 16, 192) and bb.cam_reshape.grid == (4, 4)
    emb, logits = run(bb, batch_for(bb, 1))
    assert emb.shape == (1, 192) and logits.shape == (1, 1000)


def test_timm_pretrained_weights_come_from_the_hf_cache(offline, tmp_path):
    # timm's own download path, offline, from a Hugging Face cache laid out as the hub does.
    from safetensors.torch import save_file
    sd = perturbed(random_backbone("timm:resnet18", 64).model.state_dict())
    repo = tmp_path / "hf" / "models--timm--resnet18.a1_in1k"
    snap = repo / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    save_file(sd, str(snap / "model.safetensors"))
    bb = create_backbone("timm:resnet18")
    assert bb.weights_id == W.weights_id(snap / "model.safetensors")
    got = bb.model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in sd.items())


@pytest.mark.parametrize("wrap", ["plain", "module", "state_dict", "state_dict+module+numpy",
                                  "model", "safetensors"])
def test_checkpoint_wrappers_load(tmp_path, wrap):
    sd = perturbed(random_backbone("cifar_resnet20").model.state_dict())
    sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}  # like the originals
    path = tmp_path / "w.pth"
    if wrap == "safetensors":
        from safetensors.torch import save_file
        path = tmp_path / "w.safetensors"
        save_file(sd, str(path))
    else:
        mod = {"module." + k: v for k, v in sd.items()}
        obj = {"plain": sd, "module": mod, "state_dict": {"state_dict": sd, "epoch": 3},
               "state_dict+module+numpy": {"state_dict": mod, "best_prec1": np.float64(91.5),
                                            "epoch": np.int64(7)},
               "model": {"model": sd, "optimizer": {}}}[wrap]
        torch.save(obj, path)
    bb = create_backbone("cifar_resnet20", weights=str(path))
    got = bb.model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in sd.items())


def test_other_architecture_names_missing_and_unexpected_keys(tmp_path):
    path = tmp_path / "r20.pth"
    torch.save(random_backbone("cifar_resnet20").model.state_dict(), path)
    with pytest.raises(W.WeightsMismatchError) as e:
        create_backbone("cifar_resnet56", weights=str(path))
    msg = str(e.value)
    assert "missing keys: layer1.3." in msg and "cifar_resnet20" in msg and str(path) in msg
    with pytest.raises(W.WeightsMismatchError) as e:
        create_backbone("resnet50", weights=str(path), image_size=64)
    msg = str(e.value)
    assert "unexpected keys: linear.weight" in msg and "shape mismatches: conv1.weight" in msg
    assert "cifar_resnet20" in msg
    path50 = tmp_path / "r50.pth"
    torch.save(random_backbone("resnet50", 64).model.state_dict(), path50)
    with pytest.raises(W.WeightsMismatchError, match=r"resnet50 \(torchvision"):
        create_backbone("timm:resnet18", weights=str(path50))


def test_untrusted_pickle_is_refused_unless_trusted(tmp_path):
    sd = random_backbone("cifar_resnet20").model.state_dict()
    path = tmp_path / "args.pth"
    torch.save({"state_dict": sd, "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(W.UntrustedWeightsError, match="--trust-weights") as e:
        create_backbone("cifar_resnet20", weights=str(path))
    assert "argparse.Namespace" in str(e.value)
    bb = create_backbone("cifar_resnet20", weights=str(path), trust_weights=True)
    assert bb.weights_id.startswith("sha256:")


def test_corrupt_file_and_wrong_hash_prefix_are_named(tmp_path):
    sd = random_backbone("cifar_resnet20").model.state_dict()
    good = tmp_path / "good.th"
    torch.save(sd, good)
    cut = tmp_path / "cut.th"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(W.WeightsError, match="cut.th.*truncated or corrupt"):
        create_backbone("cifar_resnet20", weights=str(cut))
    renamed = tmp_path / "resnet20-12fca82f.th"
    renamed.write_bytes(good.read_bytes())
    with pytest.raises(W.WeightsError, match="12fca82f"):
        create_backbone("cifar_resnet20", weights=str(renamed))
    right = tmp_path / f"resnet20-{W.sha256_file(good)[:8]}.th"
    right.write_bytes(good.read_bytes())
    assert create_backbone("cifar_resnet20", weights=str(right)).weights_id == W.weights_id(good)
    with pytest.raises(W.WeightsUnavailableError, match="does not exist"):
        create_backbone("cifar_resnet20", weights=str(tmp_path / "nope.th"))


def test_sha256_file_memo_follows_changes(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"a" * 3_000_000)
    assert W.sha256_file(p) == hashlib.sha256(p.read_bytes()).hexdigest()
    p.write_bytes(b"b" * 10)
    os.utime(p, ns=(1, 1))
    assert W.sha256_file(p) == hashlib.sha256(b"b" * 10).hexdigest()


# ---------------------------------------------------------------------------- CAM layers


def _cam_activation(bb, x):
    out = {}

    def record(module, inputs, output):
        out["a"] = output

    h = bb.model.get_submodule(bb.cam_layer).register_forward_hook(record)
    try:
        run(bb, x)
    finally:
        h.remove()
    return out["a"]


def _check_drops_prefix(reshape, n_prefix, grid, dim):
    h, w = grid
    tokens = torch.randn(2, n_prefix + h * w, dim)
    out = reshape(tokens)
    assert out.shape == (2, dim, h, w)
    # patch (i, j) is token n_prefix + i * w + j
    assert torch.equal(out[:, :, 1, 2], tokens[:, n_prefix + 1 * w + 2])
    assert torch.equal(out[:, :, h - 1, w - 1], tokens[:, -1])


def test_cam_reshape_torchvision_vit():
    bb = random_backbone("vit_b_16")
    assert bb.cam_layer == "encoder.layers.encoder_layer_11.ln_1"
    act = _cam_activation(bb, batch_for(bb, 1))
    assert act.shape == (1, 197, 768)
    assert bb.cam_reshape(act).shape == (1, 768, 14, 14)
    _check_drops_prefix(bb.cam_reshape, 1, (14, 14), 8)


def test_cam_reshape_timm_vit_with_register_tokens():
    # DINOv2 ViT-S/14 with 4 registers: 1 class + 4 register prefix tokens; 56 px -> 4x4 grid.
    bb = create_backbone("timm:vit_small_patch14_reg4_dinov2", random_init=True, image_size=56)
    assert bb.model.num_prefix_tokens == 5 and bb.cam_layer == "blocks.11.norm1"
    assert bb.preprocess.crop_size == 56
    act = _cam_activation(bb, batch_for(bb, 1))
    assert act.shape == (1, 5 + 16, 384)
    assert bb.cam_reshape(act).shape == (1, 384, 4, 4)
    _check_drops_prefix(bb.cam_reshape, 5, (4, 4), 8)
    emb, logits = run(bb, batch_for(bb, 1))
    assert emb.shape == (1, bb.embed_dim) and logits is None and bb.class_names is None


def test_timm_vit_and_cnn_heads():
    vit = random_backbone("timm:vit_tiny_patch16_224")
    assert vit.cam_layer == "blocks.11.norm1" and vit.cam_reshape.grid == (14, 14)
    assert len(vit.class_names) == 1000 and vit.preprocess.mean == (0.5, 0.5, 0.5)
    x = batch_for(vit, 1)
    emb, logits = run(vit, x)
    assert emb.shape == (1, 192) and logits.shape == (1, 1000)
    with torch.inference_mode():  # one pass gives exactly what timm's own forward gives
        assert torch.allclose(logits, vit.model(x), atol=1e-5)
    cnn = random_backbone("timm:resnet18", 64)
    assert cnn.cam_layer == "layer4" and cnn.cam_reshape is None
    assert cnn.depth_layers[-4:] == ["layer1", "layer2", "layer3", "layer4"]
    assert _cam_activation(cnn, batch_for(cnn, 1)).shape == (1, 512, 2, 2)


def test_torchvision_resnet_cam_and_depth_layers():
    bb = random_backbone("resnet50", 64)
    assert bb.cam_layer == "layer4" and bb.depth_layers == ["layer1", "layer2", "layer3", "layer4"]
    x = batch_for(bb, 1)
    assert _cam_activation(bb, x).shape == (1, 2048, 2, 2)
    emb, logits = run(bb, x)
    with torch.inference_mode():
        assert torch.allclose(logits, bb.model(x), atol=1e-5)
        assert torch.allclose(logits, bb.model.fc(emb), atol=1e-6)


# ---------------------------------------------------------------------------- CIFAR ResNets


@pytest.mark.parametrize("depth, params", [(20, 269_722), (56, 853_018)])
def test_cifar_resnet_option_a(depth, params):
    model = CifarResNet(depth)
    n = sum(p.numel() for p in model.parameters())
    assert n == params  # paper: 0.27M and 0.85M
    shortcuts = [m for m in model.modules() if isinstance(m, ShortcutA)]
    assert len(shortcuts) == 2 and all(not list(s.parameters()) for s in shortcuts)
    assert len(model.layer1) == len(model.layer3) == (depth - 2) // 6


def test_option_a_shortcut_subsamples_and_pads_equally():
    x = torch.randn(2, 16, 32, 32)
    y = ShortcutA(16, 32)(x)
    assert y.shape == (2, 32, 16, 16)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])
    assert not y[:, :8].any() and not y[:, 24:].any()


def test_cifar_stage_shapes():
    bb = random_backbone("cifar_resnet20")
    assert bb.class_names[0] == "airplane" and bb.class_names[-1] == "truck"
    assert bb.preprocess.resize_size is None and bb.preprocess.crop_size is None
    shapes = {}

    def hook(name):
        def record(module, inputs, output):
            shapes[name] = tuple(output.shape)
        return record

    hooks = [bb.model.get_submodule(n).register_forward_hook(hook(n)) for n in ("layer1", "layer2", "layer3")]
    run(bb, bb.preprocess(images(2, 32)))
    for h in hooks:
        h.remove()
    assert shapes == {"layer1": (2, 16, 32, 32), "layer2": (2, 32, 16, 16), "layer3": (2, 64, 8, 8)}


# ---------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("weights", ["ResNet50_Weights.IMAGENET1K_V2", "ResNet50_Weights.IMAGENET1K_V1",
                                     "ViT_B_16_Weights.IMAGENET1K_V1"])
def test_preprocess_matches_torchvision_transforms(weights):
    from torchvision import models as tvm
    enum, tag = weights.split(".")
    t = getattr(tvm, enum)[tag].transforms()
    pre = Preprocess.from_torchvision(t)
    g = torch.Generator().manual_seed(3)
    img = torch.randint(0, 256, (3, 300, 371), dtype=torch.uint8, generator=g)
    assert torch.allclose(pre(img), t(img), atol=1e-5)
    batch = torch.stack([img, img.flip(-1)])
    assert torch.allclose(pre(batch), t(batch), atol=1e-5)


def test_backbone_preprocess_comes_from_the_weights():
    from torchvision.models import ResNet50_Weights
    bb = create_backbone("resnet50", random_init=True)
    assert bb.preprocess == Preprocess.from_torchvision(ResNet50_Weights.IMAGENET1K_V2.transforms())
    assert random_backbone("resnet50", 64).preprocess.crop_size == 64


# ---------------------------------------------------------------------------- real data


@pytest.mark.shared
@needs_shared
def test_cifar_resnet20_top1_on_real_cifar10_jpegs(cifar_jpeg_test):
    from PIL import Image

    bb = create_backbone("cifar_resnet20", weights=str(CIFAR_CKPT / "resnet20-12fca82f.th"))
    assert bb.weights_id.startswith("sha256:12fca82f")
    files = sorted(cifar_jpeg_test.glob("*/*.jpg"))
    labels = torch.tensor([bb.class_names.index(p.parent.name) for p in files])
    assert len(files) == 10_000
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(files), 500):
            x = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1)
                             for p in files[i:i + 500]])
            _, logits = bb(bb.preprocess(x))
            correct += (logits.argmax(1) == labels[i:i + 500]).sum().item()
    top1 = 100.0 * correct / len(files)
    assert abs(top1 - 81.03) <= 0.1, f"cifar_resnet20 top-1 {top1:.2f}%, README says 81.03%"


@pytest.mark.shared
@needs_shared
def test_published_cifar_file_found_in_torch_hub_dir(offline):
    offline.mkdir(parents=True)
    (offline / "resnet20-12fca82f.th").symlink_to(CIFAR_CKPT / "resnet20-12fca82f.th")
    bb = create_backbone("cifar_resnet20")
    assert bb.weights_id == W.weights_id(CIFAR_CKPT / "resnet20-12fca82f.th")


# ---------------------------------------------------------------- weights metadata (issue 12)
def test_registry_describes_its_weights_as_data(tmp_path, monkeypatch):
    from hardprobe import doctor
    from hardprobe.backbones._registry import identify_weights, registered_weights
    ws = {w.name: w for w in registered_weights()}
    c20 = ws["cifar_resnet20"]
    assert c20.trained_on == "cifar10:train" and c20.licence == "BSD-2-Clause"
    assert c20.sha256.startswith("12fca82f") and len(c20.sha256) == 64
    assert c20.metric == {"cifar10:test top-1": 0.9173}
    assert ws["cifar_resnet110"].sha256 == "1d1ed7c2"  # only the name's prefix is published
    assert ws["resnet50.IMAGENET1K_V2"].trained_on == "imagenet-1k:train"
    assert ws["vit_b_16.IMAGENET1K_SWAG_E2E_V1"].trained_on.endswith("+ imagenet-1k:train")
    assert identify_weights("cifar_resnet20", c20.sha256) is c20
    assert identify_weights("cifar_resnet20", "0" * 64) is None
    # doctor lists exactly the registry's weights, found or not
    monkeypatch.setattr(W, "hub_checkpoints_dir", lambda: tmp_path)
    (tmp_path / "resnet20-12fca82f.th").write_bytes(b"x")
    listed = doctor.published_weights_on_disk()
    assert list(listed) == list(ws)
    assert listed["cifar_resnet20"] == str(tmp_path / "resnet20-12fca82f.th")
    assert listed["resnet50.IMAGENET1K_V1"] is None


def test_loaded_weights_say_what_they_were_trained_on(tmp_path):
    from hardprobe.backbones.timm_models import weights_info
    assert create_backbone("cifar_resnet20", random_init=True).weights_info is None
    path = tmp_path / "mine.pth"  # a file of the right shape that is not the published one
    torch.save(create_backbone("cifar_resnet20", random_init=True).model.state_dict(), path)
    assert create_backbone("cifar_resnet20", weights=str(path)).weights_info is None
    assert weights_info("vit_small", {"tag": "augreg_in21k_ft_in1k"}).trained_on == \
        "imagenet-21k:train + imagenet-1k:train"
    assert weights_info("x", {"tag": "lvd142m"}).trained_on == "lvd-142m"
    assert weights_info("x", {"tag": "custom"}).trained_on is None
    if CIFAR_CKPT.is_dir():  # the real published file is recognised by its sha256
        bb = create_backbone("cifar_resnet20", weights=str(CIFAR_CKPT / "resnet20-12fca82f.th"))
        assert bb.weights_info.trained_on == "cifar10:train"
