"""Weights files: hashing, safe loading, strict loading with useful errors.

Private to `hardprobe.backbones`; the model families call these so every family gives the
same errors for the same problems (missing file, corrupt file, file of another model).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..errors import (
    UntrustedWeightsError,
    WeightsError,
    WeightsMismatchError,
    WeightsUnavailableError,
)

_CHUNK = 1 << 20
_HASH_CACHE: dict[tuple[str, int, int], str] = {}
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.[A-Za-z0-9]+$")


# ---------------------------------------------------------------------------- hashing

def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in chunks; memoised per (path, size, mtime)."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    hit = _HASH_CACHE.get(key)
    if hit is not None:
        return hit
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    _HASH_CACHE[key] = digest
    return digest


def weights_id(path: str | os.PathLike) -> str:
    return f"sha256:{sha256_file(path)}"


def hash_prefix_in_name(path: str | os.PathLike) -> str | None:
    """The hex digits torch.hub-style names carry before the suffix (resnet20-12fca82f.th)."""
    m = _HASH_IN_NAME.search(Path(path).name)
    return m.group(1) if m else None


def verify_hash_prefix(path: str | os.PathLike) -> None:
    """If the file name carries a sha256 prefix (name-<hex>.ext), check it against the file."""
    prefix = hash_prefix_in_name(path)
    if prefix is None:
        return
    digest = sha256_file(path)
    if not digest.startswith(prefix):
        raise WeightsError(
            f"{path}: the file name says its sha256 starts with {prefix}, but it is "
            f"{digest[:len(prefix)]}... "
            f"The file is corrupt, truncated or not the published one; download it again "
            f"(or, if it is a different file on purpose, rename it so the name carries no '-{prefix}').")


# ---------------------------------------------------------------------------- loading

def _numpy_safe_globals() -> list:
    """Harmless non-tensor globals found in published checkpoints (numpy scalars, dtypes)."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency
        return []
    try:
        scalar = np._core.multiarray.scalar  # numpy >= 2
    except AttributeError:  # pragma: no cover - numpy 1.x
        scalar = np.core.multiarray.scalar
    out: list = [np.dtype, (scalar, "numpy.core.multiarray.scalar"),
                 (scalar, "numpy._core.multiarray.scalar")]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        out += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
    return out


def _safe_global_names(entries: list) -> set[str]:
    names = set()
    for e in entries:
        if isinstance(e, tuple):
            names.add(e[1])
        else:
            names.add(f"{e.__module__}.{e.__qualname__}")
    return names


def _first_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _raw_load(path: Path, trust: bool):
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path), device="cpu")
    if trust:
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower() and "weights_only" not in str(e).lower():
            raise
        first_error = e
    # Only non-tensor globals are in the way. Allow the harmless ones, refuse the rest.
    safe = _numpy_safe_globals()
    try:
        unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # legacy (non-zip) format: we cannot list them, just try
        unsafe = None
    allowed = _safe_global_names(safe)
    if unsafe is not None and not unsafe <= allowed:
        raise UntrustedWeightsError(
            f"{path} cannot be loaded safely: besides tensors it pickles "
            f"{', '.join(sorted(unsafe - allowed))}, and unpickling it can run arbitrary code. "
            f"Pass trust=True (CLI: --trust-weights) only if you trust where the file came from."
        ) from first_error
    try:
        with torch.serialization.safe_globals(safe):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UntrustedWeightsError(
            f"{path} cannot be loaded with weights_only=True: it is either corrupt or pickles "
            f"objects besides tensors, and unpickling those can run arbitrary code. If the file "
            f"is intact and you trust where it came from, pass trust=True (CLI: --trust-weights). "
            f"({_first_line(e)})") from e


_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network")


def unwrap_state_dict(obj, *, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Plain {name: tensor} from the common checkpoint wrappers.

    Handles {"state_dict": ...} / {"model": ...} (nested), a whole nn.Module, and key prefixes
    from nn.DataParallel ("module.") and torch.compile ("_orig_mod.").
    """
    for _ in range(4):
        if isinstance(obj, nn.Module):
            obj = obj.state_dict()
        if isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = next((obj[k] for k in _WRAPPER_KEYS
                          if k in obj and isinstance(obj[k], (Mapping, nn.Module))), None)
            if inner is None:
                break
            obj = inner
        else:
            break
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{source}: expected a state_dict (a mapping of names to tensors), "
                           f"got {type(obj).__name__}")
    sd = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise WeightsError(f"{source}: no tensors found (top-level keys: {list(obj)[:8]})")
    for prefix in ("module.", "_orig_mod."):
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def load_state_dict(path: str | os.PathLike, *, trust: bool = False) -> dict[str, torch.Tensor]:
    """Load a weights file (.pth/.pt/.th/.bin/.safetensors) into a plain CPU state_dict.

    weights_only loading; harmless numpy scalars (e.g. a saved `best_prec1`) are allowed,
    anything else that needs unpickling is refused unless `trust=True`.
    """
    p = Path(path)
    if not p.is_file():
        raise WeightsUnavailableError(f"weights file {p} does not exist (or is not a file)")
    try:
        obj = _raw_load(p, trust)
    except WeightsError:
        raise
    except Exception as e:  # whatever a damaged file makes torch.load / safetensors throw
        size = p.stat().st_size
        raise WeightsError(
            f"{p} ({size:,} bytes) is not a readable weights file; it is probably truncated or "
            f"corrupt (an interrupted download?). Download it again. ({_first_line(e)})") from e
    return unwrap_state_dict(obj, source=str(p))


# ---------------------------------------------------------------------------- strict load

def _first(keys: list[str], n: int = 5) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > n else f" ({len(keys)})")


def _count_blocks(sd: Mapping[str, torch.Tensor], stage: str) -> int:
    idx = {int(m.group(1)) for k in sd if (m := re.match(rf"{re.escape(stage)}\.(\d+)\.", k))}
    return max(idx) + 1 if idx else 0


def guess_architecture(sd: Mapping[str, torch.Tensor]) -> str | None:
    """A best guess of which model a state_dict belongs to (for error messages)."""
    keys = set(sd)
    if "conv_proj.weight" in keys and any(k.startswith("encoder.layers.encoder_layer_") for k in keys):
        w = sd["conv_proj.weight"]
        depth = len({k.split(".")[2] for k in keys if k.startswith("encoder.layers.")})
        size = {768: "b", 1024: "l", 1280: "h"}.get(w.shape[0])
        guess = f"vit_{size}_{w.shape[-1]}" if size else "a torchvision ViT"
        return f"{guess} (torchvision ViT, width {w.shape[0]}, patch {w.shape[-1]}, {depth} blocks)"
    if "linear.weight" in keys and "layer3.0.conv1.weight" in keys and "layer4.0.conv1.weight" not in keys:
        n = _count_blocks(sd, "layer1")
        return f"cifar_resnet{6 * n + 2} ({n} blocks per stage, {sd['linear.weight'].shape[0]} classes)"
    if "layer4.0.conv1.weight" in keys and "fc.weight" in keys:
        blocks = tuple(_count_blocks(sd, f"layer{i}") for i in range(1, 5))
        bottleneck = "layer1.0.conv3.weight" in keys
        depth = {(True, (3, 4, 6, 3)): 50, (True, (3, 4, 23, 3)): 101, (True, (3, 8, 36, 3)): 152,
                 (False, (2, 2, 2, 2)): 18, (False, (3, 4, 6, 3)): 34}.get((bottleneck, blocks))
        name = f"resnet{depth}" if depth else "a ResNet"
        return (f"{name} (torchvision '{name}' or 'timm:{name}', blocks {blocks}, "
                f"{sd['fc.weight'].shape[0]} classes)")
    if "patch_embed.proj.weight" in keys and any(k.startswith("blocks.") for k in keys):
        w = sd["patch_embed.proj.weight"]
        size = {192: "tiny", 384: "small", 768: "base", 1024: "large"}.get(w.shape[0], "?")
        regs = sd["reg_token"].shape[1] if "reg_token" in keys else 0
        return (f"a timm ViT (e.g. timm:vit_{size}_patch{w.shape[-1]}_..., width {w.shape[0]}, "
                f"{_count_blocks(sd, 'blocks')} blocks, {regs} register tokens)")
    return None


def load_into(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str,
              expected: str | None = None, assign: bool = False) -> None:
    """Load strictly; on any mismatch raise WeightsMismatchError that says what and why.

    BatchNorm's `num_batches_tracked` may be absent from old checkpoints (filled by torch).
    assign: take the tensors over instead of copying (for a model built on the meta device,
    which skips the random init); they are cast to the model's dtypes first.
    """
    own = model.state_dict()
    shape_bad = [f"{k} {tuple(v.shape)} in file vs {tuple(own[k].shape)} in model"
                 for k, v in state_dict.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    missing = [k for k in own if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in own]
    if shape_bad or missing or unexpected:
        parts = [f"{source} does not fit {expected or type(model).__name__}:"]
        if missing:
            parts.append(f"missing keys: {_first(missing)};")
        if unexpected:
            parts.append(f"unexpected keys: {_first(unexpected)};")
        if shape_bad:
            parts.append(f"shape mismatches: {_first(shape_bad, 3)};")
        guess = guess_architecture(state_dict)
        parts.append(f"the file looks like {guess}." if guess else
                     "the file seems to belong to another architecture.")
        raise WeightsMismatchError(" ".join(parts))
    if assign:
        state_dict = {k: v.to(own[k].dtype) if v.is_floating_point() else v
                      for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=False, assign=assign)


# ---------------------------------------------------------------------------- misc helpers

def is_download_error(exc: BaseException) -> bool:
    """True if exc (or its cause chain) is a network / hub / file-system failure."""
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        mod = type(e).__module__ or ""
        if isinstance(e, (OSError, ConnectionError, TimeoutError)) or mod.split(".")[0] in (
                "httpx", "httpcore", "requests", "urllib3", "huggingface_hub", "urllib"):
            return True
        e = e.__cause__ or e.__context__
    return False


def hub_checkpoints_dir() -> Path:
    """Where torch.hub keeps downloaded weights ($TORCH_HOME/hub/checkpoints)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def on_meta_if(condition: bool):
    """Build a model on the meta device (no random init) when its weights will be assigned."""
    return torch.device("meta") if condition else contextlib.nullcontext()


class seeded:
    """Deterministic model init without touching the caller's global RNG state."""

    def __init__(self, seed: int = 0):
        self.seed = seed
        self._fork = None

    def __enter__(self) -> str:
        self._fork = torch.random.fork_rng(devices=[])
        self._fork.__enter__()
        torch.manual_seed(self.seed)
        return f"random-init:seed={torch.initial_seed()}"

    def __exit__(self, *exc):
        return self._fork.__exit__(*exc)
