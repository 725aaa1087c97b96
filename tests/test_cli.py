"""The command line, end to end, as a user types it."""
import subprocess
import sys

import pytest

from hardprobe import cli
from hardprobe.cli import main
from hardprobe.config import RunConfig


def test_run_then_rank(tiny_folder, tmp_path, capsys):
    train, test = tiny_folder
    out = tmp_path / "run"
    rc = main(["run", "--model", "cifar_resnet20", "--random-init", "--data", "imagefolder",
               "--train", str(train), "--test", str(test), "--out", str(out), "--cache-dir",
               str(tmp_path / "c"), "--k", "5", "--num-workers", "0", "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "knn" in printed and "accuracy" in printed
    assert main(["rank", str(out), "--top", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[0] == "id" and len(lines) == 4
    assert main(["classify", str(out), "--heads", "knn", "--k", "3"]) == 0


def test_config_file_and_flag_override(tiny_folder, tmp_path):
    train, test = tiny_folder
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: cifar_resnet20\nrandom_init: true\ndata: imagefolder\ntrain: {train}\n"
                   f"test: {test}\nk: 50\nnum_workers: 0\ncache_dir: {tmp_path / 'c'}\n")
    out = tmp_path / "r"
    assert main(["extract", "--config", str(cfg), "--k", "4", "--out", str(out), "--no-progress"]) == 0
    assert "k: 4" in (out / "config.yaml").read_text()


def test_errors_are_one_clear_line(tmp_path, capsys):
    assert main(["run", "--model", "resnet5", "--random-init", "--data", "imagefolder",
                 "--train", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'resnet5'" in err and "resnet50" in err and "Traceback" not in err
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("modle: x\n")
    assert main(["run", "--config", str(cfg)]) == 2
    assert "modle" in capsys.readouterr().err


def test_no_weights_offline_is_a_clear_error(tmp_path, tiny_folder, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    train, test = tiny_folder
    assert main(["run", "--model", "cifar_resnet20", "--data", "imagefolder", "--train", str(train),
                 "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "--weights" in err and "Traceback" not in err


def test_models_lists_the_registry(capsys):
    assert main(["models"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert {"resnet50", "vit_b_16", "cifar_resnet56", "timm:<name>"} <= set(names)


def test_console_script_entry_point():
    r = subprocess.run([sys.executable, "-m", "hardprobe", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "run" in r.stdout and "rank" in r.stdout


@pytest.mark.parametrize("model,size", [("resnet50", "64"), ("vit_b_16", "32")])
def test_imagenet_backbones_end_to_end(model, size, tiny_folder, tmp_path, monkeypatch, capsys):
    """--random-init, then a --weights file saved from that model: same features; no weights
    offline: the clear message."""
    import numpy as np
    import torch

    import hardprobe
    from hardprobe.backbones import create_backbone
    train, test = tiny_folder
    common = ["--model", model, "--image-size", size, "--data", "imagefolder", "--train",
              str(train), "--test", str(test), "--cache-dir", str(tmp_path / "c"), "--k", "5",
              "--num-workers", "0", "--no-progress", "--batch-size", "16"]
    assert main(["run", "--random-init", "--out", str(tmp_path / "a")] + common) == 0
    torch.save(create_backbone(model, random_init=True, image_size=int(size)).model.state_dict(),
               tmp_path / "w.pth")
    assert main(["run", "--weights", str(tmp_path / "w.pth"), "--out", str(tmp_path / "b")] + common) == 0
    a, b = hardprobe.load_run(tmp_path / "a"), hardprobe.load_run(tmp_path / "b")
    np.testing.assert_allclose(a.features("test"), b.features("test"), rtol=1e-4, atol=1e-5)
    assert b.provenance["backbone"]["weights"].startswith("sha256:")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_network)
    capsys.readouterr()
    assert main(["run", "--out", str(tmp_path / "c")] + common) == 2
    err = capsys.readouterr().err
    assert "--weights" in err and "empty_torch_home" in err and "Traceback" not in err


def _no_network(*a, **k):
    raise OSError("network is unreachable (test)")


def test_doctor_reports_what_it_finds(tmp_path, monkeypatch, capsys):
    import json
    monkeypatch.setenv("HARDPROBE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / "resnet20-12fca82f.th").write_bytes(b"x")
    assert main(["doctor", "--json"]) == 0
    env = json.loads(capsys.readouterr().out)
    assert env["packages"]["torch"] and env["cache"]["path"] == str(tmp_path / "cache")
    assert env["weights_on_disk"]["cifar_resnet20"] == str(hub / "resnet20-12fca82f.th")
    assert env["weights_on_disk"]["cifar_resnet56"] is None
    import torch.distributed as dist
    assert env["distributed"]["gloo"] == dist.is_gloo_available()
    assert main(["doctor"]) == 0
    text = capsys.readouterr().out
    assert "-- not found" in text
    assert f"gloo {'yes' if dist.is_gloo_available() else 'no'}" in text


def test_stage_commands(tiny_folder, tmp_path, capsys):
    train, test = tiny_folder
    out = tmp_path / "run"
    common = ["--model", "cifar_resnet20", "--random-init", "--data", "imagefolder", "--train",
              str(train), "--test", str(test), "--cache-dir", str(tmp_path / "c"), "--k", "5",
              "--num-workers", "0", "--no-progress", "--no-similarity", "--top", "0", "--no-report"]
    assert main(["run", "--out", str(out)] + common) == 0
    assert not (out / "report.html").exists() and not (out / "explain").exists()
    assert main(["explain", str(out), "--top", "3", "--device", "cpu"]) == 0
    assert main(["similarity", str(out), "--top", "3", "--map-method", "pca"]) == 0
    assert main(["report", str(out)]) == 0
    assert (out / "explain" / "cams.npz").exists() and (out / "report.html").exists()
    assert main(["run", "--out", str(tmp_path / "run2")] + common) == 0
    capsys.readouterr()
    assert main(["cka", str(out), str(tmp_path / "run2")]) == 0
    assert "linear CKA (test): 1.0000" in capsys.readouterr().out
    assert main(["explain", str(out), "--layer", "layer9"]) == 2
    assert "hardprobe layers" in capsys.readouterr().err


def test_depth_and_compare_commands(tiny_folder, tmp_path, capsys):
    train, test = tiny_folder
    common = ["--random-init", "--data", "imagefolder", "--train", str(train), "--test", str(test),
              "--cache-dir", str(tmp_path / "c"), "--k", "5", "--num-workers", "0", "--no-progress",
              "--no-similarity", "--top", "0", "--no-report"]
    for m in ("cifar_resnet20", "cifar_resnet32"):
        assert main(["run", "--model", m, "--out", str(tmp_path / m)] + common) == 0
    assert main(["depth", str(tmp_path / "cifar_resnet20"), "--device", "cpu"]) == 0
    import hardprobe
    assert hardprobe.load_run(tmp_path / "cifar_resnet20").examples["prediction_depth"].notna().all()
    assert main(["compare", str(tmp_path / "cifar_resnet20"), str(tmp_path / "cifar_resnet32"),
                 "--out", str(tmp_path / "cmp")]) == 0
    assert (tmp_path / "cmp" / "compare.html").exists()


def test_perturb_command(tiny_folder, tmp_path):
    train, test = tiny_folder
    out = tmp_path / "run"
    assert main(["run", "--model", "cifar_resnet20", "--random-init", "--data", "imagefolder",
                 "--train", str(train), "--test", str(test), "--out", str(out), "--cache-dir",
                 str(tmp_path / "c"), "--k", "5", "--num-workers", "0", "--no-progress",
                 "--no-similarity", "--top", "0", "--no-report"]) == 0
    assert main(["perturb", str(out), "--subset", "6", "--corruptions", "gaussian_noise",
                 "--severities", "1", "3", "--no-blend", "--device", "cpu"]) == 0
    import pandas as pd
    acc = pd.read_csv(out / "perturb" / "accuracy.csv")
    assert set(acc["severity"]) == {1, 3} and set(acc["corruption"]) == {"gaussian_noise"}
    import hardprobe
    assert hardprobe.load_run(out).examples["flip_severity"].notna().sum() == 6


def test_finetune_command(tiny_folder, tmp_path, capsys):
    import json

    import hardprobe
    train, test = tiny_folder
    out = tmp_path / "run"
    assert main(["run", "--out", str(out), "--model", "cifar_resnet20", "--random-init", "--data",
                 "imagefolder", "--train", str(train), "--test", str(test), "--cache-dir",
                 str(tmp_path / "c"), "--k", "5", "--num-workers", "0", "--no-progress",
                 "--no-similarity", "--top", "0", "--no-report", "--label-noise", "0.2"]) == 0
    assert main(["finetune", str(out), "--mode", "mlp", "--epochs", "3", "--batch-size", "8",
                 "--device", "cpu", "--num-workers", "0", "--no-progress"]) == 0
    assert f"wrote {out / 'finetune'}" in capsys.readouterr().out
    s = json.loads((out / "finetune" / "summary.json").read_text())
    assert s["planted_noise"]["planted"] > 0
    ex = hardprobe.load_run(out).examples
    assert ex.loc[ex["split"] == "train", "ft_aum"].notna().all()
    assert {"planted_noise", "label_issue", "hardness"} <= set(ex.columns)  # kept
    assert main(["finetune", str(out), "--epochs", "0"]) == 2
    assert "epochs" in capsys.readouterr().err


@pytest.mark.parametrize("cmd", [c for c in cli.COMMANDS if c.config is not None
                                 and c.config is not RunConfig], ids=lambda c: c.name)
def test_python_and_cli_defaults_agree(cmd):
    """A stage called from Python behaves as the command does when no flag is given."""
    import dataclasses
    import inspect
    params = inspect.signature(cli.target(cmd)).parameters
    if "config" in params:  # built from the config itself: the defaults agree by construction
        return
    cfg = cmd.config()
    for f in dataclasses.fields(cfg):
        assert f.name in params, f"{cmd.target} has no parameter {f.name}"
        default = params[f.name].default
        want = getattr(cfg, f.name)
        norm = (lambda v: list(v) if isinstance(v, tuple) else v)
        assert norm(default) == norm(want), (cmd.name, f.name, default, want)


def test_cam_method_choices_are_explains():
    from hardprobe.config import CAM_METHODS
    from hardprobe.stages.explain.cams import CAM_METHODS as REAL
    assert set(CAM_METHODS) == set(REAL)


def test_a_bad_choice_is_named_before_any_work(capsys):
    with pytest.raises(SystemExit):
        cli.main(["explain", "RUN", "--method", "gradcamm"])
    assert "invalid choice: 'gradcamm'" in capsys.readouterr().err
