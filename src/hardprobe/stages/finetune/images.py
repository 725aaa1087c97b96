"""The image side of fine-tuning: the network (a backbone with a classifier on its embedding),
which of its layers train at a chosen depth, light augmentation, and batches of images.

Depths: "last" trains the backbone's last stage and everything after it, "all" every layer.
The last stage is found from the backbone's `depth_layers` (shallow -> deep), see `last_stage`.
Frozen layers keep their BatchNorm statistics (eval mode) while the rest trains.

Augmentation works on uint8 batches after the backbone's resize / crop, before normalisation:
small images (side <= 64, CIFAR) get a random crop with zero padding of side/8 pixels and a
horizontal flip; larger ones a light RandomResizedCrop (area 35-100%, aspect 3/4-4/3, resized
back to the input size) and a flip. Every draw comes from the generator passed in.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import functional as TF
from tqdm.auto import tqdm

from ...backbones import Backbone
from ...data.datasets import Split, SplitDataset, collate_skipping
from ...errors import ConfigError

SMALL_IMAGE = 64  # px: at or below, crop-with-padding; above, resized crops
RRC_SCALE, RRC_RATIO = (0.35, 1.0), (3 / 4, 4 / 3)
MEMORY_BUDGET = 2 * 2**30  # bytes of decoded uint8 images kept in memory; beyond, streamed


class FineTuneNet(nn.Module):
    """backbone -> embedding -> a new Linear(embed_dim, n_out) head; or, with use_model_head, the
    backbone's own classifier (then `n_extra` extra outputs, e.g. AUM's fake class, come from a
    new Linear(embed_dim, n_extra) on the embedding)."""

    def __init__(self, backbone: Backbone, n_classes: int, *, n_extra: int = 0,
                 use_model_head: bool = False):
        super().__init__()
        self.model = backbone.model
        self.forward_fn = backbone.forward_fn
        self.use_model_head = use_model_head
        d = backbone.embed_dim
        self.head = None if use_model_head else nn.Linear(d, n_classes + n_extra)
        self.extra = nn.Linear(d, n_extra) if use_model_head and n_extra else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        emb, logits = self.forward_fn(self.model, x)
        if self.head is not None:
            return self.head(emb)
        return logits if self.extra is None else torch.cat([logits, self.extra(emb)], dim=1)


def last_stage(backbone: Backbone) -> str:
    """Module name of the backbone's last stage: the parent of its deepest depth layer when the
    depth layers have more than one parent (cifar_resnet: layer3.2 -> "layer3"), else the deepest
    depth layer itself (resnet50: "layer4"; a ViT: its last encoder block)."""
    layers = list(backbone.depth_layers)
    if not layers:
        raise ConfigError(f"{backbone.name} names no depth layers, so its last stage is unknown; "
                         "use mode='all' (every layer) or 'head' / 'mlp' (frozen features)")
    parent = layers[-1].rpartition(".")[0]
    parents = {name.rpartition(".")[0] for name in layers}
    return parent if parent and len(parents) > 1 else layers[-1]


def set_trainable(net: FineTuneNet, backbone: Backbone, depth: str) -> list[str]:
    """Freeze the backbone below `depth` ("last" | "all"); the head always trains. Returns the
    names of the frozen backbone modules that hold parameters (kept in eval mode)."""
    names = [n for n, _ in net.model.named_parameters()]
    start = 0
    if depth == "last":
        stage = last_stage(backbone)
        hits = [i for i, n in enumerate(names) if n.startswith(stage + ".")]
        if not hits:
            raise ConfigError(f"the last stage {stage!r} of {backbone.name} holds no parameters")
        start = hits[0]
    elif depth != "all":
        raise ConfigError(f"depth must be 'last' or 'all', got {depth!r}")
    for i, (_, p) in enumerate(net.model.named_parameters()):
        p.requires_grad_(i >= start)
    frozen = []
    for name, m in net.model.named_modules():
        ps = list(m.parameters())
        if ps and not any(p.requires_grad for p in ps):
            frozen.append(name)
    return frozen


def train_mode(frozen: list[str]):
    """net.train(), except the frozen modules (their BatchNorm statistics stay as they are)."""
    def apply(net: FineTuneNet) -> None:
        net.train()
        mods = dict(net.model.named_modules())
        for name in frozen:
            mods[name].eval()
    return apply


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Light augmentation of a uint8 batch (B, 3, H, W), see the module docstring."""
    b, _, h, w = x.shape
    if max(h, w) <= SMALL_IMAGE:
        p = max(1, round(max(h, w) / 8))
        xp = F.pad(x, (p, p, p, p))
        oy = torch.randint(0, 2 * p + 1, (b,), generator=gen).tolist()
        ox = torch.randint(0, 2 * p + 1, (b,), generator=gen).tolist()
        out = torch.stack([xp[i, :, oy[i]:oy[i] + h, ox[i]:ox[i] + w] for i in range(b)])
    else:
        u = torch.rand(b, 4, generator=gen).tolist()
        crops = []
        for i in range(b):
            area = h * w * (RRC_SCALE[0] + (RRC_SCALE[1] - RRC_SCALE[0]) * u[i][0])
            ratio = math.exp(math.log(RRC_RATIO[0]) + math.log(RRC_RATIO[1] / RRC_RATIO[0])
                             * u[i][1])
            cw = min(w, max(1, round(math.sqrt(area * ratio))))
            ch = min(h, max(1, round(math.sqrt(area / ratio))))
            top, left = int(u[i][2] * (h - ch + 1)), int(u[i][3] * (w - cw + 1))
            crops.append(TF.resized_crop(x[i], top, left, ch, cw, [h, w], antialias=True))
        out = torch.stack(crops)
    flip = torch.rand(b, generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out)


class ImageSource:
    """Images of `rows` of a split (position k = split row rows[k]) as model-ready batches.

    Decoded once into memory (uint8 after the backbone's resize / crop) when they fit in
    MEMORY_BUDGET, else decoded again every epoch by a DataLoader. `ok` marks the positions
    whose image decoded; `errors` lists (position, message) of the others, which no batch holds.
    """

    def __init__(self, backbone: Backbone, split: Split, rows, *, batch_size: int,
                 num_workers: int, device, progress: bool = False, desc: str = ""):
        self.pre, self.split = backbone.preprocess, split
        self.rows = np.asarray(rows, dtype=np.int64)
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self.device = torch.device(device)
        self.pos_of = {int(r): k for k, r in enumerate(self.rows)}
        self.ok = np.ones(len(self.rows), bool)
        self.errors: list[tuple[int, str]] = []
        self.images = None
        first = self._first_shape()
        if first is not None and len(self.rows) * math.prod(first) <= MEMORY_BUDGET:
            self.images = torch.zeros((len(self.rows), *first), dtype=torch.uint8)
            bar = tqdm(total=len(self.rows), unit="img", disable=not progress, leave=False,
                       desc=f"decode {desc}")
            for x, pos in self._stream(np.arange(len(self.rows))):
                self.images[torch.from_numpy(pos)] = x
                bar.update(len(pos))
            bar.close()

    def _first_shape(self):
        ds = SplitDataset(self.split, self.pre.geometric, self.rows)
        for k in range(len(ds)):
            x, _, err = ds[k]
            if not err:
                return tuple(x.shape)
        return None

    def _stream(self, order):
        loader = torch.utils.data.DataLoader(
            SplitDataset(self.split, self.pre.geometric, self.rows[order]),
            batch_size=self.batch_size, num_workers=self.num_workers,
            collate_fn=collate_skipping)
        for x, rows, failed in loader:
            for row, err in failed:
                k = self.pos_of[int(row)]
                if self.ok[k]:
                    self.ok[k] = False
                    self.errors.append((k, err))
            if x is not None:
                yield x, np.array([self.pos_of[int(r)] for r in rows.tolist()], dtype=np.int64)

    def batches(self, order, gen: torch.Generator | None = None, *, augmented: bool = False):
        """(x normalised, channels_last, on the device; positions) in `order`, augmented with
        draws from `gen` when asked."""
        order = np.asarray(order, dtype=np.int64)
        if self.images is not None:
            order = order[self.ok[order]]
            chunks = ((self.images[torch.from_numpy(order[s:s + self.batch_size])],
                       order[s:s + self.batch_size])
                      for s in range(0, len(order), self.batch_size))
        else:
            chunks = self._stream(order[self.ok[order]])
        for x, pos in chunks:
            if augmented:
                x = augment(x, gen)
            x = self.pre.normalize(x.to(self.device, non_blocking=True))
            yield x.contiguous(memory_format=torch.channels_last), pos
