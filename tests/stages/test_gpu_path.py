"""GPU-path rules that CPU tests can reach: fp16 is CUDA only and asks autocast for float16."""
from unittest import mock

import pytest
import torch

from hardprobe.core.device import resolve_precision
from hardprobe.errors import ConfigError
from hardprobe.stages.extract.engines import TorchEngine


def test_fp16_refused_on_cpu_with_fix():
    with pytest.raises(ConfigError, match="bf16"):
        resolve_precision("fp16", torch.device("cpu"))


def test_fp16_kept_on_cuda_and_auto_never_picks_it():
    cuda = torch.device("cuda")
    assert resolve_precision("fp16", cuda) == "fp16"
    with mock.patch("torch.cuda.is_bf16_supported", return_value=False):
        assert resolve_precision("auto", cuda) == "fp32"


def test_fp16_engine_requests_float16_autocast():
    seen = []

    class Spy:
        def __init__(self, device_type, dtype):
            seen.append((device_type, dtype))

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

    net = lambda x: (x.flatten(1), None)
    eng = TorchEngine(net, torch.device("cpu"), "fp16")
    with mock.patch("torch.autocast", Spy):
        e, lg = eng(torch.ones(2, 3, 2, 2))
    assert seen == [("cpu", torch.float16)] and e.shape == (2, 12) and lg is None
