import numpy as np
import pytest
import torch

from hardprobe.core.device import resolve_device, resolve_precision
from hardprobe.data.datasets import load_imagefolder
from hardprobe.errors import NonFiniteFeaturesError
from hardprobe.stages.extract.features import extract_split, feature_key


def _extract(bb, split, cache, **kw):
    kw.setdefault("batch_size", 5)
    kw.setdefault("num_workers", 0)
    kw.setdefault("progress", False)
    return extract_split(bb, split, cache_dir=cache, device="cpu", **kw)


def test_features_match_a_direct_forward(tiny_backbone, tiny_folder, tmp_path):
    split = load_imagefolder(*tiny_folder).splits["test"]
    arrays, entry = _extract(tiny_backbone, split, tmp_path / "c", shard_size=5)
    assert arrays["embedding"].shape == (12, 8) and arrays["embedding"].dtype == np.float32
    assert arrays["logits"].shape == (12, 3)
    x = torch.stack([tiny_backbone.preprocess(split.decode(i)) for i in range(12)])
    with torch.no_grad():
        emb, logits = tiny_backbone(x)
    np.testing.assert_allclose(arrays["embedding"], emb.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(arrays["logits"], logits.numpy(), rtol=1e-5, atol=1e-6)
    assert entry.complete


def test_cache_hit_does_not_touch_the_model(tiny_backbone, tiny_folder, tmp_path):
    split = load_imagefolder(*tiny_folder).splits["train"]
    a, _ = _extract(tiny_backbone, split, tmp_path)
    calls = tiny_backbone.model.calls
    b, _ = _extract(tiny_backbone, split, tmp_path)
    assert tiny_backbone.model.calls == calls
    np.testing.assert_array_equal(a["embedding"], b["embedding"])


def test_cache_invalidated_by_any_input(tiny_backbone, tiny_folder, tmp_path):
    from dataclasses import replace

    from PIL import Image
    train, test = tiny_folder
    split = load_imagefolder(train, test).splits["test"]
    _, e0 = _extract(tiny_backbone, split, tmp_path)
    _, e_prec = _extract(tiny_backbone, split, tmp_path, precision="bf16")
    bb2 = replace(tiny_backbone, weights_id="sha256:other")
    _, e_w = _extract(bb2, split, tmp_path)
    bb3 = replace(tiny_backbone, preprocess=replace(tiny_backbone.preprocess, mean=(0.4, 0.5, 0.5)))
    _, e_pp = _extract(bb3, split, tmp_path)
    Image.new("RGB", (32, 32), (9, 9, 9)).save(test / "cat" / "img_000.png")
    split2 = load_imagefolder(train, test).splits["test"]
    _, e_img = _extract(tiny_backbone, split2, tmp_path)
    digests = {e.digest for e in (e0, e_prec, e_w, e_pp, e_img)}
    assert len(digests) == 5


def test_resume_computes_only_missing_shards(tiny_backbone, tiny_folder, tmp_path, monkeypatch):
    import hardprobe.stages.extract.features as F
    split = load_imagefolder(*tiny_folder).splits["train"]  # 36 images, shards of 10 -> 4
    full, _ = _extract(tiny_backbone, split, tmp_path / "ref", shard_size=10)

    real = F._forward_indices
    seen = []

    def dies_on_third(bb, sp, idx, *a):
        if len(seen) == 2:
            raise KeyboardInterrupt
        seen.append(idx[0])
        return real(bb, sp, idx, *a)

    monkeypatch.setattr(F, "_forward_indices", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        _extract(tiny_backbone, split, tmp_path / "c", shard_size=10)
    monkeypatch.setattr(F, "_forward_indices", lambda bb, sp, idx, *a: (seen.append(idx[0]), real(bb, sp, idx, *a))[1])
    seen.clear()
    resumed, entry = _extract(tiny_backbone, split, tmp_path / "c", shard_size=10)
    assert seen == [20, 30]  # shards 0 and 1 were kept, only 2 and 3 computed
    np.testing.assert_array_equal(resumed["embedding"], full["embedding"])


def test_nan_features_name_the_examples(tiny_backbone, tiny_folder, tmp_path):
    from dataclasses import replace
    split = load_imagefolder(*tiny_folder).splits["test"]

    def nan_forward(m, x):
        e, lg = m(x)
        e[0, 0] = float("nan")
        return e, lg

    bb = replace(tiny_backbone, forward_fn=nan_forward, weights_id="nan")
    with pytest.raises(NonFiniteFeaturesError, match="test/cat/img_000.png"):
        _extract(bb, split, tmp_path, batch_size=100)


def test_headless_model_stores_no_logits(tiny_backbone, tiny_folder, tmp_path):
    split = load_imagefolder(*tiny_folder).splits["test"]
    arrays, _ = _extract(tiny_backbone, split, tmp_path, with_logits=False)
    assert "logits" not in arrays


def test_device_and_precision_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    from hardprobe.core.device import cpu_has_bf16_units
    want = "bf16" if cpu_has_bf16_units() else "fp32"
    assert resolve_precision("auto", torch.device("cpu")) == want
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp8", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            resolve_device("cuda")


def test_feature_key_names_its_inputs(tiny_backbone, tiny_folder):
    split = load_imagefolder(*tiny_folder).splits["test"]
    key = feature_key(tiny_backbone, split, precision="fp32", with_logits=True)
    assert key["backbone"]["weights"] == "random-init:test"
    assert key["manifest"] == split.manifest_digest and key["split"] == "test"


def test_float16_storage_halves_the_embedding(tiny_backbone, tiny_folder, tmp_path):
    split = load_imagefolder(*tiny_folder).splits["test"]
    full, e32 = _extract(tiny_backbone, split, tmp_path)
    half, e16 = _extract(tiny_backbone, split, tmp_path, dtype="float16")
    assert e16.digest != e32.digest and half["embedding"].dtype == np.float16
    assert half["logits"].dtype == np.float32
    np.testing.assert_allclose(half["embedding"], full["embedding"], rtol=1e-3, atol=1e-3)
    size = lambda e: (e.dir / "embedding.npy").stat().st_size - 128  # less the .npy header
    assert size(e16) * 2 == size(e32)
    with pytest.raises(ValueError, match="float16"):
        _extract(tiny_backbone, split, tmp_path, dtype="int8")
