"""Inference engines for the extract stage: torch eager, or OpenVINO on CPUs (fp32, bf16, or
int8 post-training quantised with NNCF on a few hundred training images).

Every engine maps a normalised (B, 3, H, W) float tensor to (embedding (B, D), logits (B, C)
or None) as float32 numpy, the same pair as `Backbone.forward`.

`--engine auto` rules (documented in docs/benchmarks.md):
  - cuda / mps device -> torch (OpenVINO's CPU plugin does not apply);
  - cpu and `openvino` importable -> openvino (1.6x torch fp32 measured on ResNet-50 @ 224,
    issue 16); the model is converted once per backbone, and a model that fails to convert
    falls back to torch with a warning;
  - cpu without openvino -> torch, logged.
`--precision int8` needs openvino and nncf (`pip install hardprobe[openvino]`); it is never
chosen by auto. `--compile` runs the torch engine's forward through torch.compile, and eager
with a warning when it cannot compile (no C compiler, an unsupported op).
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from ...errors import ConfigError

log = logging.getLogger(__name__)

ENGINES = ("torch", "openvino", "auto")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # fp32 / int8: no autocast


def openvino_version() -> str | None:
    """The installed openvino version, or None when it cannot be imported."""
    try:
        ov = importlib.import_module("openvino")
    except ImportError:
        return None
    return str(ov.__version__)


def resolve_engine(engine: str, device: torch.device, precision: str) -> tuple[str, str]:
    """-> (engine name, the reason it was chosen). Raises ConfigError for a combination that
    cannot run (openvino on a GPU, int8 without openvino)."""
    if engine not in ENGINES:
        raise ConfigError(f"--engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    have_ov = openvino_version() is not None
    if precision == "int8" and not have_ov:
        raise ConfigError("--precision int8 needs OpenVINO and NNCF: pip install "
                          "'hardprobe[openvino]' (or openvino nncf), or use --precision fp32")
    if engine == "openvino" or (precision == "int8" and engine == "auto"):
        if device.type != "cpu":
            raise ConfigError(f"--engine openvino (and --precision int8) run on the CPU, not "
                              f"{device}; use --device cpu, or --engine torch")
        if not have_ov:
            raise ConfigError("--engine openvino: openvino is not installed; pip install "
                              "'hardprobe[openvino]', or use --engine torch or auto")
        return "openvino", "asked" if engine == "openvino" else "int8 needs openvino"
    if engine == "torch":
        if precision == "int8":
            raise ConfigError("--precision int8 runs with --engine openvino (or auto)")
        return "torch", "asked"
    if device.type != "cpu":
        return "torch", f"auto: {device.type} device"
    if not have_ov:
        log.info("engine auto: openvino is not installed, using torch")
        return "torch", "auto: openvino not installed"
    return "openvino", "auto: cpu with openvino installed"


def engine_tag(name: str) -> str:
    """The engine as it goes into the cache key and provenance: 'torch' or 'openvino-<ver>'."""
    return name if name == "torch" else f"openvino-{openvino_version()}"


class _Pair(torch.nn.Module):
    """The backbone's (embedding, logits) forward as one module for tracing."""

    def __init__(self, backbone):
        super().__init__()
        self.model, self.forward_fn = backbone.model, backbone.forward_fn

    def forward(self, x):
        e, lg = self.forward_fn(self.model, x)
        return (e,) if lg is None else (e, lg)


@dataclass
class TorchEngine:
    """Torch forward (autocast bf16 / fp16 when precision is bf16 / fp16), eager or, with
    compile=True, through torch.compile. A compilation that fails (at the first batch, or at a
    later batch shape) warns once with the reason and runs eager from then on: the batch is
    redone eagerly, so an error that is not the compiler's is raised by eager itself."""
    backbone: object
    device: torch.device
    precision: str
    name: str = "torch"
    compile: bool = False
    _compiled: object = field(default=None, repr=False)

    def __call__(self, x: torch.Tensor):
        dtype = AUTOCAST_DTYPES.get(self.precision)
        autocast = (torch.autocast(self.device.type, dtype=dtype)
                    if dtype is not None else contextlib.nullcontext())
        with torch.inference_mode(), autocast:
            e, lg = self._forward(x.contiguous(memory_format=torch.channels_last))
        return e.float().cpu().numpy(), None if lg is None else lg.float().cpu().numpy()

    def _forward(self, x: torch.Tensor):
        if not self.compile:
            return self.backbone(x)
        try:
            if self._compiled is None:
                self._compiled = torch.compile(self.backbone)
            return self._compiled(x)
        except Exception as e:  # noqa: BLE001 - any compiler failure; eager re-raises real ones
            reason = (str(e).strip().splitlines() or [""])[0][:300]
            warnings.warn(f"--compile: torch.compile failed ({type(e).__name__}: {reason}); "
                          f"running eager instead", RuntimeWarning, stacklevel=3)
            self.compile, self._compiled = False, None
            return self.backbone(x)


@dataclass
class OpenVINOEngine:
    """OpenVINO CPU inference of the converted backbone. precision fp32 pins f32 inference
    (OpenVINO would otherwise pick bf16 on CPUs with bf16 units); int8 quantises with NNCF
    on `calibration` (an iterable of normalised (B, 3, H, W) tensors) at the first call.
    cache_dir: OpenVINO's compiled-model cache (CACHE_DIR), or None."""
    backbone: object
    precision: str
    calibration: object = None
    cache_dir: str | None = None
    name: str = "openvino"
    _compiled: object = field(default=None, repr=False)

    def __call__(self, x: torch.Tensor):
        if self._compiled is None:
            self._compiled = self._compile(x)
        out = self._compiled(x.numpy())
        e = np.asarray(out[0], dtype=np.float32)
        lg = np.asarray(out[1], dtype=np.float32) if len(out) > 1 else None
        return e, lg

    def _compile(self, x: torch.Tensor):
        import openvino as ov
        model = _Pair(self.backbone).eval().cpu()
        with torch.no_grad():
            ov_model = ov.convert_model(model, example_input=x[:1],
                                        input=[(-1, *x.shape[1:])])
        if self.precision == "int8":
            ov_model = _quantize(ov_model, self.calibration)
        core = ov.Core()
        if self.cache_dir:
            core.set_property({"CACHE_DIR": str(self.cache_dir)})
        hint = {"bf16": "bf16"}.get(self.precision, "f32")  # int8: f32 for the rest
        return core.compile_model(ov_model, "CPU", {"INFERENCE_PRECISION_HINT": hint})


def _quantize(ov_model, calibration):
    """NNCF post-training int8 quantisation on the calibration batches (mixed preset, full
    bias correction, the first convolution and the classifier left in float)."""
    import nncf
    if calibration is None:
        raise ConfigError("--precision int8 needs calibration images from the train split; "
                          "this dataset has none")
    batches = [b.numpy() for b in calibration]
    n = sum(len(b) for b in batches)
    log.info("int8: calibrating on %d training images", n)
    return nncf.quantize(ov_model, nncf.Dataset(batches), subset_size=len(batches),
                         preset=nncf.QuantizationPreset.MIXED, fast_bias_correction=False,
                         ignored_scope=nncf.IgnoredScope(names=_keep_float(ov_model)))


def _keep_float(ov_model) -> list[str]:
    """The ops int8 leaves in float: the first convolution (it sees raw pixels) and the last
    matmul (the classifier). With full bias correction, measured on cifar_resnet56 (1,000
    shared CIFAR-10 test images, 300 calibration images): top-1 agreement with fp32 97.5%
    (NNCF defaults) -> 98.6% (full bias correction) -> 98.9% (and these two ops in float);
    nncf.quantize_with_accuracy_control (max drop 0.5 point) reached only 98.6%."""
    ops = list(ov_model.get_ordered_ops())
    convs = [op.get_friendly_name() for op in ops if op.get_type_name() == "Convolution"]
    mms = [op.get_friendly_name() for op in ops if op.get_type_name() == "MatMul"]
    return convs[:1] + mms[-1:]


def make_engine(backbone, device: torch.device, *, engine: str = "torch",
                precision: str = "fp32", calibration=None, cache_dir=None,
                compile: bool = False):
    """The engine that extract uses; see the module docstring for the rules of auto.
    compile applies to the torch engine; with openvino it is ignored, with a warning."""
    name, reason = resolve_engine(engine, device, precision)
    log.info("extract engine: %s (%s), precision %s%s", name, reason, precision,
             ", torch.compile" if compile and name == "torch" else "")
    if name == "torch":
        return TorchEngine(backbone, device, precision, compile=compile)
    if compile:
        warnings.warn(f"--compile applies to the torch engine; the {name} engine compiles "
                      f"its own model, so --compile is ignored", RuntimeWarning, stacklevel=2)
    return OpenVINOEngine(backbone, precision, calibration, cache_dir)
