"""Preprocessing that travels with the weights.

One small, serialisable description (resize, crop, mean, std) that works on a single
uint8 image tensor (C, H, W) or on a batch (N, C, H, W), so the same object can run per
image in DataLoader workers or once per batch on the device (`geometric_batch` also takes
a list of images of mixed source sizes). Its `describe()` dict is part of the feature-cache
key: change any field and cached features are recomputed.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from ..errors import ConfigError, MixedImageSizesError


@dataclass(frozen=True)
class Preprocess:
    """uint8 image(s) -> normalised float32 tensor(s).

    resize_size: shorter side is resized to this (torchvision semantics), None = keep size.
    crop_size:   centre crop to (crop_size, crop_size), None = no crop.
    mean, std:   per-channel normalisation applied after scaling to [0, 1].
    """

    resize_size: int | None
    crop_size: int | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"
    antialias: bool = True

    @classmethod
    def from_torchvision(cls, weights_transform) -> "Preprocess":
        """Build from `weights.transforms()` (torchvision's ImageClassification preset)."""
        t = weights_transform
        return cls(
            resize_size=int(t.resize_size[0]),
            crop_size=int(t.crop_size[0]),
            mean=tuple(float(m) for m in t.mean),
            std=tuple(float(s) for s in t.std),
            interpolation=t.interpolation.value,
            antialias=bool(t.antialias) if t.antialias is not None else True,
        )

    @classmethod
    def from_timm(cls, data_config: dict) -> "Preprocess":
        """Build from timm's `resolve_data_config(...)` dict (input_size, crop_pct, mean, std)."""
        size = int(data_config["input_size"][-1])
        crop_pct = float(data_config.get("crop_pct", 1.0) or 1.0)
        mode = data_config.get("crop_mode", "center")
        if mode not in ("center", None):
            raise ConfigError(f"timm crop_mode {mode!r} is not supported; only 'center' is")
        return cls(
            resize_size=int(round(size / crop_pct)),
            crop_size=size,
            mean=tuple(float(m) for m in data_config["mean"]),
            std=tuple(float(s) for s in data_config["std"]),
            interpolation=str(data_config.get("interpolation", "bicubic")),
        )

    def with_image_size(self, size: int) -> "Preprocess":
        """Override the network input size, keeping the weights' resize/crop ratio."""
        if self.crop_size is None or self.resize_size is None:
            return replace(self, resize_size=size, crop_size=size)
        ratio = self.resize_size / self.crop_size
        return replace(self, resize_size=int(round(size * ratio)), crop_size=size)

    @property
    def output_size(self) -> int | None:
        return self.crop_size if self.crop_size is not None else self.resize_size

    def describe(self) -> dict:
        return asdict(self)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        """uint8 (C, H, W) or (N, C, H, W) -> normalised float32, resized and cropped."""
        return self.normalize(self.geometric(img))

    def geometric(self, img: torch.Tensor) -> torch.Tensor:
        """Resize and centre-crop, staying uint8 (cheap to batch, move and pin)."""
        if img.dtype != torch.uint8:
            raise ConfigError(f"Preprocess expects uint8 images, got {img.dtype}")
        x = img
        if self.resize_size is not None:
            x = TF.resize(x, [self.resize_size], interpolation=InterpolationMode(self.interpolation),
                          antialias=self.antialias)
        if self.crop_size is not None:
            x = TF.center_crop(x, [self.crop_size])
        return x

    def geometric_batch(self, images: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """geometric() of a whole batch where the images are (the device, for resize_on=device):
        uint8 (N, C, H, W), or a list of uint8 (C, H, W) of mixed source sizes (ImageFolder
        trees) -> uint8 (N, C, S, S) in the list's order. Images of one source size are
        resized together. Equal bit for bit to geometric() per image on the CPU: torchvision
        resizes each image of a batch on its own (tests/stages/test_gpu_path.py)."""
        if isinstance(images, torch.Tensor):
            return self.geometric(images)
        groups: dict[tuple[int, ...], list[int]] = {}
        for j, img in enumerate(images):
            groups.setdefault(tuple(img.shape), []).append(j)
        out: list[torch.Tensor | None] = [None] * len(images)
        for rows in groups.values():
            for j, y in zip(rows, self.geometric(torch.stack([images[j] for j in rows]))):
                out[j] = y
        shapes = {tuple(y.shape) for y in out}
        if len(shapes) > 1:
            raise MixedImageSizesError.of(shapes)
        return torch.stack(out)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 -> float32 (x / 255 - mean) / std in one batched step, on x's device."""
        if x.dtype != torch.uint8:
            raise ConfigError(f"Preprocess expects uint8 images, got {x.dtype}")
        # (x/255 - m)/s == x * (1/(255 s)) - m/s : one multiply-add per pixel
        scale = torch.tensor([1.0 / (255.0 * s) for s in self.std], device=x.device)
        shift = torch.tensor([m / s for m, s in zip(self.mean, self.std)], device=x.device)
        return torch.addcmul(-shift.view(-1, 1, 1), x.float(), scale.view(-1, 1, 1))
