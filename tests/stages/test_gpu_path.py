"""GPU-path rules that CPU tests can reach: fp16 is CUDA only and asks autocast for float16;
resize_on=device gives the workers' pixels (so the same features and cache key); --compile
agrees with eager and falls back to it with a warning; cuda-only branches are mocked."""
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


# ---------------------------------------------------------------- resize_on: workers | device
MIXED_SIZES = [(32, 32), (40, 28), (17, 50), (64, 48), (40, 28), (25, 25)]  # (W, H)


def _mixed_folder(root):
    """test/<class>/<image>: 3 classes x 6 images of mixed sizes (two share 40x28)."""
    import numpy as np

    from conftest import CLASS_COLORS, make_image
    rng = np.random.default_rng(3)
    for c, color in CLASS_COLORS.items():
        (root / c).mkdir(parents=True)
        for i, size in enumerate(MIXED_SIZES):
            make_image(rng, color, size=size).save(root / c / f"img_{i:03d}.png")
    return root


def _resizing(bb, interpolation="bilinear"):
    from dataclasses import replace

    from hardprobe.backbones import Preprocess
    return replace(bb, preprocess=Preprocess(24, 20, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25),
                                             interpolation=interpolation))


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_geometric_batch_equals_per_image_bit_for_bit(tmp_path, interpolation):
    from hardprobe.backbones import Preprocess
    from hardprobe.data.datasets import load_imagefolder
    split = load_imagefolder(_mixed_folder(tmp_path / "t")).splits["train"]
    pre = Preprocess(24, 20, (0.5,) * 3, (0.25,) * 3, interpolation=interpolation)
    images = [split.decode(i) for i in range(len(split))]
    assert len({tuple(x.shape) for x in images}) == 5  # mixed sizes, one repeated
    one = torch.stack([pre.geometric(x) for x in images])
    assert torch.equal(pre.geometric_batch(images), one)
    same = torch.stack([x for x in images if x.shape == images[1].shape])
    assert torch.equal(pre.geometric_batch(same), torch.stack([pre.geometric(x) for x in same]))


def test_geometric_batch_refuses_mixed_sizes_it_cannot_unify():
    from hardprobe.backbones import Preprocess
    from hardprobe.errors import DataError
    pre = Preprocess(None, None, (0.5,) * 3, (0.25,) * 3)
    with pytest.raises(DataError, match="different sizes"):
        pre.geometric_batch([torch.zeros(3, 8, 8, dtype=torch.uint8),
                             torch.zeros(3, 8, 9, dtype=torch.uint8)])


def test_collate_ragged_stacks_one_size_and_lists_mixed_sizes():
    from hardprobe.data.datasets import collate_ragged
    a, b = torch.zeros(3, 4, 4, dtype=torch.uint8), torch.ones(3, 5, 4, dtype=torch.uint8)
    x, rows, failed = collate_ragged([(a, 7, ""), (None, 8, "bad file"), (a, 9, "")])
    assert x.shape == (2, 3, 4, 4) and rows.tolist() == [7, 9] and failed == [(8, "bad file")]
    x, rows, _ = collate_ragged([(a, 1, ""), (b, 2, "")])
    assert isinstance(x, list) and [t.shape[1] for t in x] == [4, 5] and rows.tolist() == [1, 2]
    x, rows, failed = collate_ragged([(None, 3, "bad")])
    assert x is None and rows.dtype == torch.int64 and len(rows) == 0 and failed == [(3, "bad")]


def test_resize_on_device_gives_the_workers_features_and_key(tiny_backbone, tmp_path,
                                                              monkeypatch):
    import numpy as np

    from hardprobe.backbones.preprocess import Preprocess
    from hardprobe.data.datasets import load_imagefolder
    from hardprobe.stages.extract.features import extract_split
    bb = _resizing(tiny_backbone)
    split = load_imagefolder(_mixed_folder(tmp_path / "t")).splits["train"]
    calls = []
    real = Preprocess.geometric_batch
    monkeypatch.setattr(Preprocess, "geometric_batch",
                        lambda self, x: calls.append(type(x).__name__) or real(self, x))
    kw = dict(device="cpu", batch_size=4, num_workers=0, progress=False)
    a, ea = extract_split(bb, split, cache_dir=tmp_path / "w", resize_on="workers", **kw)
    assert calls == []
    b, eb = extract_split(bb, split, cache_dir=tmp_path / "d", resize_on="device", **kw)
    assert "list" in calls and len(calls) == 5  # 18 images in batches of 4: mixed-size lists
    np.testing.assert_array_equal(a["embedding"], b["embedding"])  # same pixels: same floats
    np.testing.assert_array_equal(a["logits"], b["logits"])
    assert ea.digest == eb.digest  # not in the key: the features are the same
    _, ec = extract_split(bb, split, cache_dir=tmp_path / "d", resize_on="auto", **kw)
    assert len(calls) == 5 and ec.digest == ea.digest  # a hit: auto on the CPU is workers


def test_resize_on_auto_is_device_on_cuda_only(tiny_backbone, tiny_folder, tmp_path,
                                               monkeypatch):
    import hardprobe.stages.extract.features as F
    from hardprobe.data.datasets import load_imagefolder
    assert F.resolve_resize_on("auto", torch.device("cuda")) == "device"
    assert F.resolve_resize_on("auto", torch.device("cuda:1")) == "device"
    assert F.resolve_resize_on("auto", torch.device("cpu")) == "workers"
    assert F.resolve_resize_on("auto", torch.device("mps")) == "workers"
    assert F.resolve_resize_on("workers", torch.device("cuda")) == "workers"
    assert F.resolve_resize_on("device", torch.device("cpu")) == "device"
    with pytest.raises(ConfigError, match="resize_on"):
        F.resolve_resize_on("gpu", torch.device("cpu"))
    seen = {}

    class Stop(Exception):
        pass

    def fake_compute(*a, **kw):
        seen.update(kw)
        raise Stop

    monkeypatch.setattr(F, "resolve_device", lambda d: torch.device("cuda"))
    monkeypatch.setattr(F, "_compute", fake_compute)
    split = load_imagefolder(*tiny_folder).splits["test"]
    with pytest.raises(Stop):
        F.extract_split(tiny_backbone, split, cache_dir=tmp_path, progress=False)
    assert seen["resize_on"] == "device" and seen["dev"].type == "cuda"


def test_resize_on_and_compile_are_config_keys_and_flags():
    from hardprobe import cli
    from hardprobe.config import build_config
    cfg = build_config()
    assert cfg.resize_on == "auto" and cfg.compile is False
    with pytest.raises(ConfigError, match="resize_on"):
        build_config(resize_on="gpu")
    ns = cli._parser().parse_args(["extract", "--resize-on", "device", "--compile"])
    cfg = cli._run_config(ns)
    assert cfg.resize_on == "device" and cfg.compile is True


# ---------------------------------------------------------------- --compile
class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 3)

    def forward(self, x):
        emb = torch.relu(self.conv(x)).mean(dim=(2, 3))
        return emb, self.fc(emb)


def _tiny_engine(compile):
    net = _Tiny().eval()
    return TorchEngine(lambda x: net(x), torch.device("cpu"), "fp32", compile=compile)


def test_compile_failure_warns_once_and_runs_eager(monkeypatch):
    import warnings

    import numpy as np
    made = []

    def broken_compile(fn, **kw):
        made.append(fn)

        def run(x):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    x = torch.randn(4, 3, 8, 8)
    eager = _tiny_engine(False)(x)
    eng = _tiny_engine(True)
    with pytest.warns(RuntimeWarning, match=r"torch.compile failed \(RuntimeError: "
                                            r"InvalidCxxCompiler.*running eager"):
        e, lg = eng(x)
    np.testing.assert_array_equal(e, eager[0])
    np.testing.assert_array_equal(lg, eager[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning, no second try
        e2, _ = eng(x)
    assert len(made) == 1 and eng.compile is False
    np.testing.assert_array_equal(e2, eager[0])


def test_compile_failure_at_a_later_batch_shape_falls_back_too(monkeypatch):
    import numpy as np
    calls = []

    def flaky_compile(fn, **kw):
        def run(x):
            calls.append(len(x))
            if len(calls) > 1:
                raise RuntimeError("recompile failed")
            return fn(x)
        return run

    monkeypatch.setattr(torch, "compile", flaky_compile)
    eng, ref = _tiny_engine(True), _tiny_engine(False)
    x = torch.randn(5, 3, 8, 8)
    np.testing.assert_array_equal(eng(x)[0], ref(x)[0])
    with pytest.warns(RuntimeWarning, match="recompile failed"):
        np.testing.assert_array_equal(eng(x[:2])[0], ref(x[:2])[0])
    assert calls == [5, 2] and eng.compile is False


def test_compile_asked_with_openvino_warns_that_it_is_ignored(tiny_backbone):
    pytest.importorskip("openvino")
    from hardprobe.stages.extract.engines import make_engine
    with pytest.warns(RuntimeWarning, match="--compile is ignored"):
        eng = make_engine(tiny_backbone, torch.device("cpu"), engine="openvino", compile=True)
    assert eng.name == "openvino"


def test_compile_is_not_in_the_cache_key(tiny_backbone, tiny_folder, tmp_path, monkeypatch):
    from hardprobe.data.datasets import load_imagefolder
    from hardprobe.stages.extract.features import extract_split
    split = load_imagefolder(*tiny_folder).splits["test"]
    kw = dict(cache_dir=tmp_path, device="cpu", batch_size=4, num_workers=0, progress=False)
    _, e0 = extract_split(tiny_backbone, split, **kw)
    calls = tiny_backbone.model.calls
    monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("compiled on a hit"))
    _, e1 = extract_split(tiny_backbone, split, compile=True, **kw)
    assert e1.digest == e0.digest and tiny_backbone.model.calls == calls


def _cxx() -> str | None:
    import os
    import shutil
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("clang++")


@pytest.mark.slow
@pytest.mark.skipif(_cxx() is None, reason="torch.compile (inductor) on the CPU needs a C++ "
                                           "compiler; the fallback is tested with a mock")
def test_compile_matches_eager_on_cpu():
    """The real inductor path on one batch shape: it compiles, without a fallback, and agrees
    with eager. 5 s with a warm inductor cache, about 30 s cold on a busy 2-core CPU (C++
    compilation); `-m "not slow"` leaves it out."""
    import warnings

    import numpy as np
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    eager = _tiny_engine(False)(x)
    eng = _tiny_engine(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback would fail here
        e, lg = eng(x)
    assert eng.compile is True and eng._compiled is not None
    np.testing.assert_allclose(e, eager[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lg, eager[1], rtol=1e-5, atol=1e-6)


def test_device_path_on_cuda_pins_source_images_and_uploads_non_blocking(
        tiny_backbone, tiny_folder, monkeypatch):
    import numpy as np

    import hardprobe.stages.extract.features as F
    from hardprobe.data.datasets import collate_ragged, collate_skipping, load_imagefolder
    split = load_imagefolder(*tiny_folder).splits["test"]
    made = []

    class Stop(Exception):
        pass

    def fake_loader(dataset, **kw):
        made.append((dataset, kw))
        raise Stop

    monkeypatch.setattr(torch.utils.data, "DataLoader", fake_loader)
    cuda = torch.device("cuda")
    for resize_on in ("device", "workers"):
        with pytest.raises(Stop):
            F._forward_indices(tiny_backbone, split, np.arange(4), cuda, None, 4, 2, True,
                               None, resize_on)
    (ds_d, kw_d), (ds_w, kw_w) = made
    assert ds_d.transform is None and kw_d["collate_fn"] is collate_ragged  # decode only
    assert ds_w.transform == tiny_backbone.preprocess.geometric
    assert kw_w["collate_fn"] is collate_skipping
    assert kw_d["pin_memory"] and kw_w["pin_memory"]  # cuda: pinned host batches
    parts = [mock.Mock(), mock.Mock()]
    assert F.upload(parts, cuda) == [p.to.return_value for p in parts]
    for p in parts:
        p.to.assert_called_once_with(cuda, non_blocking=True)


def test_extract_compile_reaches_the_torch_engine(tiny_backbone, tiny_folder, tmp_path,
                                                  monkeypatch):
    import numpy as np

    from hardprobe.data.datasets import load_imagefolder
    from hardprobe.stages.extract.features import extract_split
    split = load_imagefolder(*tiny_folder).splits["test"]
    kw = dict(device="cpu", batch_size=4, num_workers=0, progress=False)
    eager, _ = extract_split(tiny_backbone, split, cache_dir=tmp_path / "e", **kw)
    wrapped = []
    monkeypatch.setattr(torch, "compile", lambda fn, **k: wrapped.append(fn) or fn)
    comp, _ = extract_split(tiny_backbone, split, cache_dir=tmp_path / "c", compile=True, **kw)
    assert wrapped == [tiny_backbone]  # compiled once per split, the backbone's forward
    np.testing.assert_array_equal(comp["embedding"], eager["embedding"])
