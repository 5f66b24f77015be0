"""The demo training: files in pytorch-nested-unet's format, the cache, and (slow) the real model."""

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from edgeseg.host import train
from edgeseg.host.archs import NestedUNet
from edgeseg.host.checkpoint import load_checkpoint
from edgeseg.host.errors import UsageError

REPO = Path(__file__).resolve().parents[1]
STEPS = 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 2-step demo model trained through demo_checkpoint into a fresh cache."""
    cache = tmp_path_factory.mktemp("cache")
    logs = []
    folder = train.demo_checkpoint(cache_dir=cache, steps=STEPS, log=logs.append)
    return {"cache": cache, "folder": folder, "logs": logs}


def test_files_are_pytorch_nested_unet_format(tiny):
    folder = tiny["folder"]
    assert sorted(p.name for p in folder.iterdir()) == ["config.yml", "model.pth", "train.json"]
    state = torch.load(str(folder / "model.pth"), map_location="cpu", weights_only=True)
    model = NestedUNet(num_classes=1, input_channels=3)
    model.load_state_dict(state, strict=True)  # a plain state_dict, nothing wrapped or prefixed
    config = yaml.safe_load((folder / "config.yml").read_text())
    assert {k: config[k] for k in ("arch", "num_classes", "input_channels", "deep_supervision",
                                   "input_h", "input_w")} == {
        "arch": "NestedUNet", "num_classes": 1, "input_channels": 3, "deep_supervision": False,
        "input_h": 96, "input_w": 96}
    assert config["loss"] == "BCEDiceLoss" and config["optimizer"] == "Adam"
    report = json.loads((folder / "train.json").read_text())
    assert report["steps"] == STEPS and report["seed"] == 0
    assert report["torch"] == torch.__version__
    assert 0.0 <= report["heldout_iou"] <= 1.0 and report["seconds"] > 0
    assert any("held-out IoU" in line for line in tiny["logs"])
    assert not list(folder.parent.glob(".*"))  # no temp folder left behind


def test_saved_model_loads_through_load_checkpoint(tiny):
    loaded = load_checkpoint(tiny["folder"] / "model.pth")
    assert loaded.arch == "nested_unet" and loaded.report["inferred"] == []
    assert loaded.config["input_h"] == 96
    iou = train.score_heldout(model=loaded.model)
    assert iou == pytest.approx(json.loads((tiny["folder"] / "train.json").read_text())
                                ["heldout_iou"], abs=1e-5)


def test_cache_is_reused(tiny, monkeypatch):
    weights = tiny["folder"] / "model.pth"
    before = weights.stat().st_mtime_ns
    logs = []
    monkeypatch.setattr(train, "train_demo", lambda **kw: pytest.fail("retrained"))
    again = train.demo_checkpoint(cache_dir=tiny["cache"], steps=STEPS, log=logs.append)
    assert again == tiny["folder"]
    assert weights.stat().st_mtime_ns == before
    assert logs == ["using cached demo model {}".format(tiny["folder"])]
    monkeypatch.setenv("EDGESEG_CACHE_DIR", str(tiny["cache"]))
    assert train.demo_checkpoint(steps=STEPS, log=logs.append) == tiny["folder"]


def test_cache_key_depends_on_parameters():
    assert train.cache_key(steps=5, seed=0) != train.cache_key(steps=6, seed=0)
    assert train.cache_key(steps=5, seed=0) != train.cache_key(steps=5, seed=1)
    assert train.cache_key(steps=5, seed=0) == train.cache_key(steps=5, seed=0)


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.delenv("EDGESEG_CACHE_DIR", raising=False)
    assert train.cache_root() == Path.home() / ".cache" / "edgeseg"
    monkeypatch.setenv("EDGESEG_CACHE_DIR", str(tmp_path))
    assert train.cache_root() == tmp_path
    assert train.cache_root(tmp_path / "x") == tmp_path / "x"


def test_waits_for_another_process_training(tiny, tmp_path, monkeypatch):
    """While the lock is held, demo_checkpoint waits and then uses what the holder wrote."""
    pytest.importorskip("fcntl")
    folder = tmp_path / "demo" / train.cache_key(steps=STEPS, seed=0)
    monkeypatch.setattr(train, "train_demo", lambda **kw: pytest.fail("trained twice"))
    result, logs = {}, []
    with train._file_lock(folder.with_name(folder.name + ".lock")):
        worker = threading.Thread(target=lambda: result.setdefault("folder", train.demo_checkpoint(
            cache_dir=tmp_path, steps=STEPS, log=logs.append)))
        worker.start()
        time.sleep(0.5)
        assert worker.is_alive()  # blocked on the lock
        shutil.copytree(str(tiny["folder"]), str(folder))
    worker.join(10)
    assert result["folder"] == folder
    assert "trained by another process" in logs[0]


def test_cli_is_deterministic_and_matches_the_cache(tiny, tmp_path):
    out = tmp_path / "cli"
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "scripts/train_demo.py", "--out", str(out),
                           "--steps", str(STEPS), "--json"], cwd=str(REPO), env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["steps"] == STEPS and report["out_dir"] == str(out)
    assert "step 2/2" in proc.stderr  # progress goes to stderr
    a = torch.load(str(out / "model.pth"), weights_only=True)
    b = torch.load(str(tiny["folder"] / "model.pth"), weights_only=True)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)  # same seed, same steps: same weights


def test_cli_bad_steps_is_a_clean_error(tmp_path):
    proc = subprocess.run([sys.executable, "scripts/train_demo.py", "--out", str(tmp_path / "o"),
                           "--steps", "0"], cwd=str(REPO), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "error: The number of training steps must be at least 1" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_out_must_be_a_folder(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(UsageError, match="not a folder"):
        train.train_demo(out_dir=target, steps=1)


@pytest.mark.slow
def test_real_demo_model_reaches_heldout_iou():
    """The cached full training (trains once, minutes) segments the held-out quarter well."""
    folder = train.demo_checkpoint()
    loaded = load_checkpoint(folder / "model.pth")
    iou = train.score_heldout(model=loaded.model)  # recomputed from the weights, not train.json
    assert iou >= 0.8
    assert iou == pytest.approx(json.loads((folder / "train.json").read_text())["heldout_iou"],
                                abs=1e-4)


def test_write_dir_into_existing_folder_replaces_only_its_files(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.pth").write_text("old")
    (out / "notes.txt").write_text("keep")
    train._write_dir(out, {"model.pth": lambda p: p.write_text("new"),
                           "train.json": lambda p: p.write_text("{}")})
    assert (out / "model.pth").read_text() == "new" and (out / "train.json").is_file()
    assert (out / "notes.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # temp folder removed


def test_write_dir_failure_leaves_nothing_half_written(tmp_path):
    def boom(path):
        raise OSError("disk full")

    with pytest.raises(OSError):
        train._write_dir(tmp_path / "out", {"model.pth": lambda p: p.write_text("x"),
                                            "config.yml": boom})
    assert list(tmp_path.iterdir()) == []
