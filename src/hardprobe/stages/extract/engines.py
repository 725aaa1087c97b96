"""Inference engines for the extract stage: torch eager, or OpenVINO on CPUs (fp32, bf16, or
int8 post-training quantised with NNCF on a few hundred training images).

Every engine maps a normalised (B, 3, H, W) float tensor to (embedding (B, D), logits (B, C)
or None) as float32 numpy, the same pair as `Backbone.forward`.

`--engine auto` rules (documented in docs/benchmarks.md):
  - cuda / mps device -> torch (OpenVINO's CPU plugin does not apply);
  - cpu and `openvino` importable -> openvino (its steady forward measured at 1.6x torch fp32
    on ResNet-50 @ 224 on an AVX2 Zen 3 (issue 16) and on cifar_resnet56 on an AMX Xeon;
    docs/benchmarks.md); the model is converted once per split (seconds), and a model that
    OpenVINO cannot convert stops with a ConfigError that names --engine torch;
  - cpu without openvino -> torch, logged.
`--precision int8` needs openvino and nncf (`pip install hardprobe[openvino]`); it is never
chosen by auto, and it reports its top-1 agreement with fp32 (see _quantize). `--compile`
runs the torch engine's forward through torch.compile, and eager with a warning when it
cannot compile (no C compiler, an unsupported op).
"""
from __future__ import annotations

import contextlib
import hashlib
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
INT8_MAX_DROP = 0.001  # the most top-1 agreement with fp32 that int8 may lose on `validation`
_QUANTIZED: dict[str, object] = {}  # digest of (model, images) -> int8: once per run, not split


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


def nncf_version() -> str | None:
    """The installed nncf version, or None when it cannot be imported."""
    try:
        return str(importlib.import_module("nncf").__version__)
    except ImportError:
        return None


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
    (OpenVINO would otherwise pick bf16 on CPUs with bf16 units); int8 quantises with NNCF at
    the first call, on `calibration` (normalised (B, 3, H, W) tensors), checked against fp32
    on `validation` (held-out ones, or None), and sets `int8_check` (see _quantize).
    split_check: int8 only, the first split_check images this engine extracts also go through
    the fp32 model, and int8_check["split"] holds the agreement on them: held-out train images
    flatter int8 when the backbone was trained on them (99.9% there against 98.7% on the test
    split for cifar_resnet56 on an AVX2 CPU), so the split's own figure is the one to read.
    cache_dir: OpenVINO's compiled-model cache (CACHE_DIR), or None."""
    backbone: object
    precision: str
    calibration: object = None
    cache_dir: str | None = None
    validation: object = None
    max_drop: float = INT8_MAX_DROP
    overflow_fix: str = "first_layer_only"  # see int8_overflow_fix
    name: str = "openvino"
    int8_check: dict | None = None
    split_check: int = 0
    _compiled: object = field(default=None, repr=False)
    _reference: object = field(default=None, repr=False)  # fp32 model of the split check
    _hits: list = field(default_factory=lambda: [0.0, 0], repr=False)  # [agreeing, seen]

    def __call__(self, x: torch.Tensor):
        if self._compiled is None:
            self._compiled = self._compile(x)
        out = self._compiled(x.numpy())
        e = np.asarray(out[0], dtype=np.float32)
        lg = np.asarray(out[1], dtype=np.float32) if len(out) > 1 else None
        if self._reference is not None and self._hits[1] < self.split_check:
            self._check_split(x[:self.split_check - self._hits[1]].numpy(), e, lg)
        return e, lg

    def _check_split(self, x: np.ndarray, e: np.ndarray, lg) -> None:
        """Agreement of this batch's first len(x) int8 outputs with fp32's, added to
        int8_check["split"]; top-1 with a head, else the embeddings' mean cosine."""
        ref = self._reference(x)
        n = len(x)
        top1 = None if lg is None else np.asarray(ref[1]).argmax(1)
        hit = _agreeing(e[:n], None if lg is None else lg[:n], np.asarray(ref[0]), top1)
        self._hits = [self._hits[0] + hit, self._hits[1] + n]
        metric = "top1_agreement" if lg is not None else "embedding_cosine"
        self.int8_check = {**(self.int8_check or {}), "split": {
            metric: round(self._hits[0] / self._hits[1], 6), "images": self._hits[1]}}

    def _compile(self, x: torch.Tensor):
        import openvino as ov
        model = _Pair(self.backbone).eval().cpu()
        try:
            with torch.no_grad():
                ov_model = ov.convert_model(model, example_input=x[:1],
                                            input=[(-1, *x.shape[1:])])
        except Exception as e:  # noqa: BLE001 - OpenVINO's frontends raise many types
            raise ConfigError(f"OpenVINO could not convert {self.backbone.name} "
                              f"({type(e).__name__}: {str(e).strip()[:300]}); run it with "
                              f"--engine torch") from e
        if self.precision == "int8":
            if self.split_check > 0:
                self._reference = _compile_f32(ov_model)  # before quantisation: fp32
            ov_model, self.int8_check = self._int8(ov_model)
            self.int8_check = dict(self.int8_check)  # this split's copy: "split" is added
        core = ov.Core()
        if self.cache_dir:
            core.set_property({"CACHE_DIR": str(self.cache_dir)})
        hint = {"bf16": "bf16"}.get(self.precision, "f32")  # int8: f32 for the rest
        return core.compile_model(ov_model, "CPU", {"INFERENCE_PRECISION_HINT": hint})

    def _int8(self, ov_model):
        """The int8 model and its check, quantised once per (weights, images) in a process:
        a run's train and test splits share it."""
        h = hashlib.sha256(f"{self.backbone.name}|{self.backbone.weights_id}|"
                           f"{self.max_drop}|{self.overflow_fix}".encode())
        for b in [*(self.calibration or []), None, *(self.validation or [])]:
            h.update(b"|" if b is None else b.numpy().tobytes())
        key = h.hexdigest()
        if key not in _QUANTIZED:
            _QUANTIZED.clear()  # one model held at a time
            _QUANTIZED[key] = _quantize(ov_model, self.calibration, self.validation,
                                        self.max_drop, self.overflow_fix)
        return _QUANTIZED[key]


def int8_overflow_fix() -> str:
    """NNCF's overflow_fix for this CPU: "enable" (7-bit weights in every layer) where it has
    no int8 dot product, so no 16-bit sum saturates; else NNCF's default, "first_layer_only".
    Measured (cifar_resnet56, 10,000 test images, AVX2-only Zen 3): top-1 agreement with fp32
    98.70% -> 98.99%, on the same calibration and accuracy control."""
    from ...core.device import cpu_has_int8_dot
    return "first_layer_only" if cpu_has_int8_dot() else "enable"


def _quantize(ov_model, calibration, validation, max_drop: float = INT8_MAX_DROP,
              overflow_fix: str = "first_layer_only"):
    """NNCF int8 of ov_model, fitted on `calibration` (normalised batches), with the layers
    that cost most agreement with fp32 on `validation` (held-out batches; calibration when
    None) put back in float until that agreement is within max_drop of 100%
    (nncf.quantize_with_accuracy_control, with fp32's own outputs as the labels). Mixed preset,
    full bias correction, the first convolution, the classifier and the residual adds in
    float; overflow_fix: see int8_overflow_fix. The measured agreement is logged and kept in
    `int8_check`."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix
    fit = [b.numpy() for b in calibration]
    held_out = validation is not None and len(validation) > 0
    items = _reference_outputs(ov_model, [b.numpy() for b in (validation if held_out else
                                                               calibration)])
    n = sum(len(b) for b in fit)
    log.info("int8: calibrating on %d training images, checking on %d %s", n,
             sum(len(x) for x, _, _ in items), "held-out ones" if held_out else
             "of the same (no held-out train images left: in-sample)")
    # subset_size counts images, not dataset items: len(batches) (5 for 300) left most out
    q = nncf.quantize_with_accuracy_control(
        ov_model, nncf.Dataset(fit), nncf.Dataset(items, lambda item: item[0]),
        validation_fn=_agreement, max_drop=max_drop, drop_type=nncf.DropType.ABSOLUTE,
        subset_size=n, preset=nncf.QuantizationPreset.MIXED, fast_bias_correction=False,
        ignored_scope=nncf.IgnoredScope(names=_keep_float(ov_model), types=["Add"]),
        advanced_quantization_parameters=AdvancedQuantizationParameters(
            overflow_fix=OverflowFix(overflow_fix)))
    return q, _check(q, items, held_out)


def _reference_outputs(ov_model, batches):
    """[(x, fp32 embedding (B, D), fp32 top-1 (B,) or None)] from ov_model in f32."""
    ref = _compile_f32(ov_model)
    out = []
    for x in batches:
        r = ref(x)
        out.append((x, np.asarray(r[0]), np.asarray(r[1]).argmax(1) if len(r) > 1 else None))
    return out


def _compile_f32(ov_model):
    """ov_model compiled for the CPU with f32 inference (int8 ops stay int8): no CACHE_DIR,
    since these models are compiled once for the check."""
    import openvino as ov
    return ov.Core().compile_model(ov_model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})


def _agreement(compiled, items) -> float:
    """Top-1 agreement with fp32 (the share of equal argmax), or for a backbone without a
    head the mean cosine similarity of the embeddings with fp32's; 1.0 is fp32 itself."""
    hits = total = 0.0
    for x, e_ref, top1 in items:
        r = compiled(x)
        hits += _agreeing(r[0], r[1] if len(r) > 1 else None, e_ref, top1)
        total += len(x)
    return hits / total


def _agreeing(e, logits, e_ref, top1_ref) -> float:
    """A batch's summed agreement with fp32: equal top-1s when fp32's top-1 is given, else
    the cosines of the embeddings (B, D) with fp32's."""
    if top1_ref is not None:
        return float((np.asarray(logits).argmax(1) == top1_ref).sum())
    e = np.asarray(e)
    return float((np.sum(e * e_ref, 1) / np.maximum(
        np.linalg.norm(e, axis=1) * np.linalg.norm(e_ref, axis=1), 1e-12)).sum())


def _check(q, items, held_out: bool) -> dict:
    compiled = _compile_f32(q)
    metric = "top1_agreement" if items[0][2] is not None else "embedding_cosine"
    check = {metric: round(_agreement(compiled, items), 6),
             "images": int(sum(len(x) for x, _, _ in items)), "held_out": held_out}
    log.info("int8: %s with fp32 %.2f%% on %d %s train images", metric.replace("_", " "),
             100 * check[metric], check["images"], "held-out" if held_out else "calibration "
             "(in-sample)")
    return check


def _keep_float(ov_model) -> list[str]:
    """The ops int8 always leaves in float: the first convolution (it sees raw pixels) and the
    last matmul (the classifier); accuracy control may add more (see docs/benchmarks.md)."""
    ops = list(ov_model.get_ordered_ops())
    convs = [op.get_friendly_name() for op in ops if op.get_type_name() == "Convolution"]
    mms = [op.get_friendly_name() for op in ops if op.get_type_name() == "MatMul"]
    return convs[:1] + mms[-1:]


def make_engine(backbone, device: torch.device, *, engine: str = "torch",
                precision: str = "fp32", calibration=None, cache_dir=None,
                compile: bool = False, validation=None, max_drop: float = INT8_MAX_DROP,
                split_check: int = 0, overflow_fix: str | None = None):
    """The engine that extract uses; see the module docstring for the rules of auto.
    compile applies to the torch engine; with openvino it is ignored, with a warning.
    split_check: see OpenVINOEngine (int8 only); overflow_fix: NNCF's, None = this CPU's
    (int8_overflow_fix)."""
    name, reason = resolve_engine(engine, device, precision)
    log.info("extract engine: %s (%s), precision %s%s", name, reason, precision,
             ", torch.compile" if compile and name == "torch" else "")
    if name == "torch":
        return TorchEngine(backbone, device, precision, compile=compile)
    if compile:
        warnings.warn(f"--compile applies to the torch engine; the {name} engine compiles "
                      f"its own model, so --compile is ignored", RuntimeWarning, stacklevel=2)
    return OpenVINOEngine(backbone, precision, calibration, cache_dir, validation, max_drop,
                          overflow_fix=overflow_fix or int8_overflow_fix(),
                          split_check=split_check if precision == "int8" else 0)
