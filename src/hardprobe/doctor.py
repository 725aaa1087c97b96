"""`hardprobe doctor`: what this machine offers hardprobe, checked rather than assumed.

Versions, devices and precision support, the feature cache, and which published weights are
on disk (so a user knows before a long run whether it can work offline).
"""
from __future__ import annotations

import importlib.metadata as md
import os
import platform
from pathlib import Path

PACKAGES = ("torch", "torchvision", "timm", "grad-cam", "cleanlab", "scikit-learn", "numpy",
            "pandas", "pyarrow", "faiss-cpu", "faiss-gpu")


def environment() -> dict:
    import torch

    from .core.cache import default_cache_dir
    from .core.device import cpu_has_bf16_units, resolve_device
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {p: _version(p) for p in PACKAGES},
        "cpu": {"cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                "capability": torch.backends.cpu.get_cpu_capability(),
                "bf16_matmul": cpu_has_bf16_units()},
        "cuda": [{"name": torch.cuda.get_device_name(i),
                  "bf16": torch.cuda.is_bf16_supported()} for i in range(torch.cuda.device_count())],
        "mps": bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()),
        "auto_device": str(resolve_device("auto")),
        "distributed": {"available": torch.distributed.is_available(),
                        "gloo": torch.distributed.is_available()
                        and torch.distributed.is_gloo_available(),
                        "nccl": torch.distributed.is_available()
                        and torch.distributed.is_nccl_available()},
        "cache": _cache(default_cache_dir()),
        "weights_on_disk": published_weights_on_disk(),
        "hf_cache": os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME")
                    or str(Path.home() / ".cache" / "huggingface"),
    }


def published_weights_on_disk() -> dict[str, str | None]:
    """Registry weights name -> path of its published file when found offline, else None.

    The names and files come from the backbone registry's weights metadata
    (`backbones._registry.registered_weights`), so a family that registers weights is listed."""
    from .backbones._registry import registered_weights
    from .backbones._weights import hub_checkpoints_dir
    from .backbones.build import list_backbones  # noqa: F401  (importing it registers them)
    hub = hub_checkpoints_dir()
    return {w.name: (str(hub / w.file) if w.file and (hub / w.file).exists() else None)
            for w in registered_weights()}


def report(env: dict) -> str:
    lines = [f"python {env['python']} on {env['platform']}", "packages:"]
    lines += [f"  {p:<14} {v or '-- not installed'}" for p, v in env["packages"].items()]
    cpu = env["cpu"]
    lines.append(f"cpu: {cpu['cores']} cores, torch threads {cpu['torch_threads']}, "
                 f"{cpu['capability']}, bf16 matmul units: {'yes' if cpu['bf16_matmul'] else 'no'}")
    for i, g in enumerate(env["cuda"]):
        lines.append(f"cuda:{i}: {g['name']} (bf16 {'yes' if g['bf16'] else 'no'})")
    if not env["cuda"]:
        lines.append("cuda: none")
    lines.append(f"mps: {'yes' if env['mps'] else 'no'}; --device auto -> {env['auto_device']}")
    d = env["distributed"]
    lines.append("torchrun: " + (f"gloo {'yes' if d['gloo'] else 'no'}, nccl "
                                 f"{'yes' if d['nccl'] else 'no'}" if d["available"]
                                 else "no torch.distributed in this build"))
    c = env["cache"]
    lines.append(f"feature cache: {c['path']} ({c['entries']} entries, {c['bytes'] / 2**20:.1f} MiB)")
    lines.append("published weights on disk (else downloaded on first use, or pass --weights):")
    lines += [f"  {n:<36} {p or '-- not found'}" for n, p in env["weights_on_disk"].items()]
    lines.append(f"timm weights: Hugging Face cache at {env['hf_cache']}")
    return "\n".join(lines)


def _version(pkg: str) -> str | None:
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return None


def _cache(path: Path) -> dict:
    entries = list((path / "features").glob("*/manifest.json")) if path.exists() else []
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0
    return {"path": str(path), "entries": len(entries), "bytes": size}
