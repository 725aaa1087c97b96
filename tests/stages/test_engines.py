"""The extract engines: OpenVINO fp32 and int8 against torch on TinyNet, the cache key
separating engines and precisions, and auto falling back where openvino is absent."""
import builtins

import numpy as np
import pytest
import torch

from hardprobe.data.datasets import load_imagefolder
from hardprobe.errors import ConfigError
from hardprobe.stages.extract import engines
from hardprobe.stages.extract.features import extract_split

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
needs_ov = pytest.mark.skipif(engines.openvino_version() is None,
                              reason="openvino is not installed (pip install hardprobe[openvino])")


def _extract(bb, split, cache, **kw):
    return extract_split(bb, split, cache_dir=cache, device="cpu", batch_size=8, num_workers=0,
                         progress=False, **kw)


def _knn_agreement(train_e, train_y, a, b, k=3):
    """Share of equal k-NN (cosine, majority) predictions of test embeddings a and b."""
    def pred(q):
        t = train_e / np.linalg.norm(train_e, axis=1, keepdims=True)
        s = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ t.T
        nn = np.argsort(-s, axis=1)[:, :k]
        return np.array([np.bincount(train_y[r]).argmax() for r in nn])
    return (pred(a) == pred(b)).mean()


@needs_ov
@pytest.mark.parametrize("precision,threshold", [("fp32", 0.999), ("int8", 0.99)])
def test_openvino_agrees_with_torch(tiny_backbone, tiny_folder, tmp_path, precision, threshold):
    data = load_imagefolder(*tiny_folder)
    train, test = data.splits["train"], data.splits["test"]
    ref = {s.name: _extract(tiny_backbone, s, tmp_path)[0] for s in (train, test)}
    ov = {s.name: _extract(tiny_backbone, s, tmp_path, engine="openvino", precision=precision,
                           calibration=train)[0] for s in (train, test)}
    for s in ("train", "test"):
        agree = (ov[s]["logits"].argmax(1) == ref[s]["logits"].argmax(1)).mean()
        assert agree >= threshold, (s, agree)
    if precision == "fp32":  # the same arithmetic up to op order
        np.testing.assert_allclose(ov["test"]["embedding"], ref["test"]["embedding"],
                                   rtol=1e-4, atol=1e-5)
    y = train.examples["label"].to_numpy()
    assert _knn_agreement(ref["train"]["embedding"], y, ref["test"]["embedding"],
                          ov["test"]["embedding"]) >= threshold


@needs_ov
def test_cache_key_separates_engines_and_precisions(tiny_backbone, tiny_folder, tmp_path):
    data = load_imagefolder(*tiny_folder)
    split = data.splits["test"]
    keys = {}
    for eng, prec in [("torch", "fp32"), ("openvino", "fp32"), ("openvino", "int8")]:
        _, entry = _extract(tiny_backbone, split, tmp_path, engine=eng, precision=prec,
                            calibration=data.splits["train"])
        keys[eng, prec] = entry
    assert len({e.digest for e in keys.values()}) == 3
    assert "engine" not in keys["torch", "fp32"].key  # torch keys unchanged: caches stay valid
    assert keys["openvino", "int8"].key["precision"] == "int8"
    assert keys["openvino", "fp32"].key["engine"] == f"openvino-{engines.openvino_version()}"


def test_auto_falls_back_to_torch_without_openvino(monkeypatch, tiny_backbone, tiny_folder,
                                                   tmp_path, caplog):
    real_import = builtins.__import__

    def no_openvino(name, *a, **kw):
        if name == "openvino" or name.startswith("openvino."):
            raise ImportError("No module named 'openvino'")
        return real_import(name, *a, **kw)
    monkeypatch.setattr(builtins, "__import__", no_openvino)
    monkeypatch.setattr(engines.importlib, "import_module", lambda n: no_openvino(n))
    assert engines.openvino_version() is None
    with caplog.at_level("INFO"):
        assert engines.resolve_engine("auto", CPU, "fp32") == ("torch",
                                                               "auto: openvino not installed")
    assert "openvino is not installed" in caplog.text
    split = load_imagefolder(*tiny_folder).splits["test"]
    arrays, entry = _extract(tiny_backbone, split, tmp_path, engine="auto")
    assert "engine" not in entry.key and np.isfinite(arrays["embedding"]).all()
    with pytest.raises(ConfigError, match="pip install"):
        engines.resolve_engine("openvino", CPU, "fp32")
    with pytest.raises(ConfigError, match="int8 needs OpenVINO"):
        engines.resolve_engine("auto", CPU, "int8")


def test_auto_rules_and_bad_combinations():
    assert engines.resolve_engine("auto", torch.device("cuda"), "fp32")[0] == "torch"
    assert engines.resolve_engine("torch", CPU, "fp32") == ("torch", "asked")
    with pytest.raises(ConfigError, match="--engine must be"):
        engines.resolve_engine("tensorrt", CPU, "fp32")
    if engines.openvino_version() is not None:
        assert engines.resolve_engine("auto", CPU, "fp32")[0] == "openvino"
        with pytest.raises(ConfigError, match="run on the CPU"):
            engines.resolve_engine("openvino", torch.device("cuda"), "fp32")
        with pytest.raises(ConfigError, match="int8 runs with --engine openvino"):
            engines.resolve_engine("torch", CPU, "int8")
