"""CIFAR-10 ResNets of He et al. 2016, section 4.2 ("Deep Residual Learning", option A).

Depth 6n+2: a 3x3 conv (3->16), then three stages of n basic blocks with 16, 32, 64 channels
(the first block of stages 2 and 3 has stride 2), global average pooling and a linear layer.
Option A shortcuts have no parameters: where the shape changes they take every second pixel
and zero-pad the channels equally on both sides. Module names match the published
checkpoints of github.com/akamaster/pytorch_resnet_cifar10 (conv1, bn1,
layer{1,2,3}.{i}.{conv1,bn1,conv2,bn2}, linear), so those files load as they are.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from . import _weights
from ._registry import Backbone, WeightsInfo, register
from .preprocess import Preprocess

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck"]
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # what the published checkpoints were trained with
IMAGENET_STD = (0.229, 0.224, 0.225)

RELEASE_URL = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/"
PUBLISHED_FILES = {  # depth -> published file name (name carries the sha256 prefix)
    20: "resnet20-12fca82f.th",
    32: "resnet32-d509ac18.th",
    44: "resnet44-014dd654.th",
    56: "resnet56-4bfd9763.th",
    110: "resnet110-1d1ed7c2.th",
}
FULL_SHA256 = {  # measured on the published files; the others are known by their name's prefix
    20: "12fca82f0bebc4135bf1f32f6e3710e61d5108578464b84fd6d7f5c1b04036c8",
    56: "4bfd97631478d6b638d2764fd2baff3edb1d7d82252d54439343b6596b9b5367",
}
PUBLISHED_TEST_ERROR = {20: 8.27, 32: 7.37, 44: 6.90, 56: 6.61, 110: 6.32}  # %, README there
CIFAR10_TRAIN = "cifar10:train"


def published_weights(depth: int) -> WeightsInfo:
    """The akamaster checkpoint of cifar_resnet<depth>: trained on the CIFAR-10 train split."""
    fname = PUBLISHED_FILES[depth]
    return WeightsInfo(
        name=f"cifar_resnet{depth}", file=fname, url=RELEASE_URL + fname,
        sha256=FULL_SHA256.get(depth) or _weights.hash_prefix_in_name(fname),
        trained_on=CIFAR10_TRAIN, licence="BSD-2-Clause",
        metric={"cifar10:test top-1": round(1 - PUBLISHED_TEST_ERROR[depth] / 100, 4)})


class ShortcutA(nn.Module):
    """Parameter-free shortcut: subsample by 2, zero-pad channels equally on both sides."""

    def __init__(self, in_planes: int, planes: int):
        super().__init__()
        self.pad = (planes - in_planes) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = (ShortcutA(in_planes, planes) if stride != 1 or in_planes != planes
                         else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int = 10):
        super().__init__()
        if (depth - 2) % 6:
            raise ConfigError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.depth = depth
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._stage(16, 16, n, 1)
        self.layer2 = self._stage(16, 32, n, 2)
        self.layer3 = self._stage(32, 64, n, 2)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    @staticmethod
    def _stage(in_planes: int, planes: int, n: int, stride: int) -> nn.Sequential:
        blocks = [BasicBlock(in_planes, planes, stride)]
        blocks += [BasicBlock(planes, planes, 1) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled 64-d embedding."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return out.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.features(x))


def _forward(model: CifarResNet, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    emb = model.features(x)
    return emb, model.linear(emb)


def _default_weights_path(depth: int) -> Path:
    fname = PUBLISHED_FILES[depth]
    path = _weights.hub_checkpoints_dir() / fname
    if not path.is_file():
        raise _weights.WeightsUnavailableError(
            f"no weights for cifar_resnet{depth}: {path} does not exist. Download {fname} from "
            f"{RELEASE_URL}{fname} (github.com/akamaster/pytorch_resnet_cifar10) into "
            f"{path.parent} (torch.hub's checkpoint folder, $TORCH_HOME/hub/checkpoints), or pass "
            f"--weights FILE. (--random-init gives untrained weights, for tests only.)")
    return path


def _factory(depth: int):
    def build(name: str, *, weights: str | None, weights_tag: str | None, random_init: bool,
              image_size: int | None, trust_weights: bool = False) -> Backbone:
        if weights_tag is not None:
            raise ConfigError(f"{name} has one published set of weights; weights_tag "
                             f"{weights_tag!r} is not supported (use --weights FILE)")
        with _weights.seeded(0) as seed_id:
            model = CifarResNet(depth)
        info = None
        if random_init:
            wid = seed_id
        else:
            path = Path(weights) if weights is not None else _default_weights_path(depth)
            _weights.verify_hash_prefix(path)
            sd = _weights.load_state_dict(path, trust=trust_weights)
            _weights.load_into(model, sd, source=str(path), expected=name)
            wid = _weights.weights_id(path)
            published = published_weights(depth)
            info = published if published.matches(wid.split(":", 1)[1]) else None
        pre = Preprocess(resize_size=None, crop_size=None, mean=IMAGENET_MEAN, std=IMAGENET_STD)
        if image_size is not None:
            pre = pre.with_image_size(image_size)
        depth_layers = [f"layer{s}.{i}" for s in (1, 2, 3) for i in range(len(getattr(model, f"layer{s}")))]
        return Backbone(
            name=name, model=model, preprocess=pre, embed_dim=64,
            class_names=list(CIFAR10_CLASSES), cam_layer="layer3", weights_id=wid,
            forward_fn=_forward, depth_layers=depth_layers,
            extra={"family": "cifar_resnet", "depth": depth,
                   "published_weights": RELEASE_URL + PUBLISHED_FILES[depth]},
            weights_info=info,
        )
    return build


for _depth in PUBLISHED_FILES:
    register(f"cifar_resnet{_depth}", _factory(_depth),
             f"CIFAR-10 ResNet-{_depth} (He et al. 2016, option A), 32x32 input, 10 classes",
             weights=(published_weights(_depth),))
