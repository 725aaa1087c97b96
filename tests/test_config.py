import pytest

from hardprobe.config import RunConfig, build_config, load_config, save_config
from hardprobe.errors import ConfigError


def test_yaml_then_flags(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model: cifar_resnet20\nk: 10\nheads: [knn]\n")
    cfg = build_config(str(f), k=5, out=None)
    assert cfg.model == "cifar_resnet20" and cfg.k == 5 and cfg.heads == ["knn"]
    assert cfg.out == RunConfig().out  # None means "flag not given"


def test_unknown_key_is_an_error(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("modle: resnet50\n")
    with pytest.raises(ConfigError, match="modle"):
        build_config(str(f))


@pytest.mark.parametrize("key,value", [("k", "twenty"), ("batch_size", 1.5), ("random_init", "yes"),
                                       ("heads", "knn")])
def test_wrong_types(key, value):
    with pytest.raises(ConfigError, match=key):
        build_config(**{key: value})


def test_int_accepted_for_float():
    assert build_config(temperature=1).temperature == 1


@pytest.mark.parametrize("kw,msg", [
    ({"weights": "w.pth", "random_init": True}, "contradict"),
    ({"data": "imagefolder"}, "train"),
    ({"heads": ["knn", "svm"]}, "svm"),
    ({"k": 0}, "k must"),
    ({"issue_head": "lienar"}, "issue_head must be"),  # a typo never falls back silently
])
def test_conflicts(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        build_config(**kw)


def test_roundtrip(tmp_path):
    cfg = build_config(model="resnet50", k=7, heads=["knn", "linear"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
