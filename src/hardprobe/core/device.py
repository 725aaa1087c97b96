"""Devices, precisions and worker counts: one resolution for every stage."""
from __future__ import annotations

import os

import torch

from ..errors import ConfigError, DeviceError
from . import distributed


def resolve_device(device: str | None = None) -> torch.device:
    """'auto' or None -> cuda, else mps, else cpu; anything else is passed to torch.device."""
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"--device {device} asked for, but torch sees no CUDA device; "
                           "use --device cpu or auto")
    return dev


def resolve_precision(precision: str, device: torch.device) -> str:
    """'fp32' | 'bf16' | 'fp16' | 'int8' | 'auto' -> 'fp32', 'bf16', 'fp16' or 'int8'.

    fp16 (torch autocast float16) is CUDA only and never chosen by auto (bf16 keeps fp32's
    range; fp16 is for GPUs without bf16 units, asked for by name).

    int8 (OpenVINO + NNCF post-training quantisation, CPU only) is kept as asked and never
    chosen by auto: its features differ from fp32's (see stages/extract/engines.py).

    auto = bf16 where the hardware has bf16 matrix units: a CUDA GPU that supports it, or a
    CPU with AMX or AVX512-BF16 (elsewhere bf16 on the CPU is emulated and slower than fp32).
    """
    if precision not in ("fp32", "bf16", "fp16", "int8", "auto"):
        raise ConfigError(f"--precision must be fp32, bf16, fp16, int8 or auto, not {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(f"--precision fp16 runs on a CUDA device, not {device.type}; use "
                          "--precision bf16 (or auto) on the CPU")
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        return "bf16" if device.type == "cpu" and cpu_has_bf16_units() else "fp32"
    return precision


def cpu_has_bf16_units() -> bool:
    """AMX-BF16 or AVX512-BF16 in /proc/cpuinfo (Linux); False where it cannot be read."""
    return bool({"amx_bf16", "avx512_bf16"} & cpu_flags())


def cpu_has_int8_dot() -> bool:
    """An int8 dot-product instruction (AVX512-VNNI, AVX-VNNI or AMX-INT8) in /proc/cpuinfo;
    without one, int8 products go through 16-bit sums that can saturate."""
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & cpu_flags())


def cpu_flags() -> set[str]:
    """The first CPU's flags in /proc/cpuinfo (Linux); empty where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def default_num_workers(ctx: distributed.Context = distributed.SINGLE) -> int:
    """DataLoader workers: the machine's cores, shared by the ranks running on it, less one."""
    cores = (os.cpu_count() or 1) // max(1, ctx.local_world_size)
    return max(0, min(8, cores - 1))
