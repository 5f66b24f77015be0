"""The .pth files users really have: training checkpoints with extra objects, whole pickled models,
CUDA-saved tensors, other architectures (``--arch module:Class``)."""

from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from edgeseg.host.checkpoint import load_checkpoint
from edgeseg.host.errors import CheckpointError, UsageError

from models_util import random_net


def _same(a, b, channels=3):
    x = torch.randn(1, channels, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return torch.equal(a(x), b(x))


@pytest.fixture(scope="module")
def unet():
    return random_net("unet", seed=5)


def _run(code: str, cwd=None):
    """Run python code in a fresh interpreter (how a user's training script saves its files)."""
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_training_checkpoint_with_namespace_numpy_and_optimizer(tmp_path, unet):
    optimizer = torch.optim.Adam(unet.parameters(), lr=1e-3)
    unet(torch.zeros(1, 3, 32, 32)).mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    unet.eval()
    path = tmp_path / "checkpoint.pth"
    torch.save({"epoch": 42, "model_state_dict": unet.state_dict(),
                "optimizer": optimizer.state_dict(),
                "args": argparse.Namespace(lr=1e-3, arch="UNet", out=pathlib.Path("runs/x")),
                "best_iou": np.float64(0.83), "best_epoch": np.int64(40),
                "history": np.array([0.5, 0.7, 0.83], dtype=np.float32),
                "dtype": np.dtype("float32")}, str(path))
    loaded = load_checkpoint(path)
    assert loaded.report["weights_key"] == "model_state_dict"
    assert any("'model_state_dict' key" in f and "'optimizer'" in f for f in loaded.report["fixes"])
    assert loaded.report["trusted"] is False
    assert _same(loaded.model, unet)


def test_unknown_global_is_refused_by_name_and_never_executed(tmp_path):
    code = tmp_path / "code"
    code.mkdir()
    marker = tmp_path / "executed"
    (code / "payload.py").write_text(textwrap.dedent("""
        import pathlib
        def touch(path):
            pathlib.Path(path).write_text("ran")
            return 0.9
        class Best:
            def __reduce__(self):
                return (touch, ({!r},))
        """.format(str(marker))))
    _run("""
        import torch, payload
        from edgeseg.host.archs import UNet
        torch.save({"state_dict": UNet(1).state_dict(), "best": payload.Best()}, "model.pth")
        """, cwd=code)
    marker.unlink() if marker.exists() else None
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(code / "model.pth")
    assert "payload.touch" in str(err.value) and "--trust-checkpoint" in err.value.hint
    assert not marker.exists()


def test_whole_pickled_builtin_model_needs_trust(tmp_path, unet):
    path = tmp_path / "model.pth"
    torch.save(unet, str(path))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert "whole pickled model" in str(err.value)
    assert "edgeseg.host.archs.UNet" in str(err.value)
    assert "--trust-checkpoint" in err.value.hint and "--code-path" not in err.value.hint
    loaded = load_checkpoint(path, trust=True)
    assert loaded.report["trusted"] is True
    assert any("whole pickled model (edgeseg.host.archs.UNet); converted to its state_dict" in f
               for f in loaded.report["fixes"])
    assert _same(loaded.model, unet)


def test_whole_model_from_a_training_repo_needs_trust_and_code_path(tmp_path):
    """pytorch-nested-unet style: ``archs.py`` in the training repo, ``torch.save(model)``."""
    repo = tmp_path / "pytorch-nested-unet"
    repo.mkdir()
    (repo / "archs.py").write_text(textwrap.dedent("""
        from edgeseg.host import archs as _edgeseg_archs
        class NestedUNet(_edgeseg_archs.NestedUNet):
            pass
        """))
    _run("""
        import torch, archs
        torch.manual_seed(3)
        model = archs.NestedUNet(num_classes=2, input_channels=3, deep_supervision=True).eval()
        torch.save({"epoch": 3, "model": model}, "model.pth")
        torch.save(model(torch.ones(1, 3, 32, 32))[-1], "expected.pt")
        """, cwd=repo)
    path = repo / "model.pth"
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert "archs.NestedUNet" in str(err.value)
    assert "--trust-checkpoint" in err.value.hint and "--code-path DIR" in err.value.hint
    assert "archs" in err.value.hint
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, trust=True)
    assert "--code-path" in err.value.hint
    try:
        loaded = load_checkpoint(path, trust=True, code_path=str(repo))
    finally:
        sys.modules.pop("archs", None)
    assert loaded.config["deep_supervision"] is True and loaded.config["num_classes"] == 2
    assert loaded.report["weights_key"] == "model"
    with torch.no_grad():
        out = loaded.model(torch.ones(1, 3, 32, 32))[-1]
    assert torch.equal(out, torch.load(str(repo / "expected.pt"), weights_only=True))


def _save_as_if_on_cuda(obj, path, legacy=False):
    """torch.save exactly as on a GPU machine: every storage carries the location tag 'cuda:0'."""
    registry = torch.serialization._package_registry
    entry = (0, lambda storage: "cuda:0" if storage.device.type == "cpu" else None,
             lambda obj, location: None)
    registry.insert(0, entry)
    try:
        torch.save(obj, str(path), _use_new_zipfile_serialization=not legacy)
    finally:
        registry.remove(entry)


@pytest.mark.parametrize("legacy", [False, True])
def test_cuda_saved_tensors_load_on_a_cpu_machine(tmp_path, unet, legacy):
    path = tmp_path / "model.pth"
    _save_as_if_on_cuda({"state_dict": unet.state_dict(), "epoch": 1}, path, legacy=legacy)
    if not torch.cuda.is_available():  # the file really is CUDA-tagged: plain torch.load fails
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(str(path), weights_only=True)
    loaded = load_checkpoint(path)
    assert _same(loaded.model, unet)
    assert all(t.device.type == "cpu" for t in loaded.model.state_dict().values())


USER_ARCH = """
import torch
from torch import nn


class TinySeg(nn.Module):
    def __init__(self, in_channels=3, n_classes=1, width=8):
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU())
        self.down = nn.MaxPool2d(2)
        self.mid = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU())
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.head = nn.Conv2d(2 * width, n_classes, 1)

    def forward(self, x):
        e = self.enc(x)
        return self.head(torch.cat([e, self.up(self.mid(self.down(e)))], 1))
"""


@pytest.fixture()
def user_code(tmp_path):
    package = tmp_path / "code" / "mynets"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "tiny.py").write_text(USER_ARCH)
    yield tmp_path / "code"
    for name in ("mynets", "mynets.tiny"):
        sys.modules.pop(name, None)


def test_user_arch_with_kwargs_and_code_path(tmp_path, user_code):
    sys.path.insert(0, str(user_code))
    try:
        from mynets.tiny import TinySeg
    finally:
        sys.path.remove(str(user_code))
    torch.manual_seed(0)
    model = TinySeg(in_channels=1, n_classes=2, width=4).eval()
    path = tmp_path / "weights.pth"
    torch.save({"net": model.state_dict()}, str(path))
    loaded = load_checkpoint(path, arch="mynets.tiny:TinySeg", code_path=str(user_code),
                             arch_kwargs={"in_channels": 1, "n_classes": 2, "width": 4})
    assert loaded.arch == "mynets.tiny:TinySeg"
    assert loaded.config["num_classes"] == 2 and loaded.config["input_channels"] == 1
    assert loaded.report["weights_key"] == "net"
    assert _same(loaded.model, model, channels=1)
    with pytest.raises(CheckpointError, match="does not fit mynets.tiny:TinySeg") as err:
        load_checkpoint(path, arch="mynets.tiny:TinySeg", code_path=str(user_code),
                        arch_kwargs={"in_channels": 1, "n_classes": 2, "width": 8})
    assert "shape-mismatched" in str(err.value)


def test_user_arch_errors_name_the_fix(tmp_path, user_code, unet):
    path = tmp_path / "w.pth"
    torch.save(unet.state_dict(), str(path))
    with pytest.raises(CheckpointError, match="Cannot import module 'nowhere.nets'") as err:
        load_checkpoint(path, arch="nowhere.nets:Net")
    assert "--code-path" in err.value.hint
    with pytest.raises(UsageError, match="no torch.nn.Module class 'Missing'"):
        load_checkpoint(path, arch="mynets.tiny:Missing", code_path=str(user_code))
    with pytest.raises(UsageError, match="failed: TypeError"):
        load_checkpoint(path, arch="mynets.tiny:TinySeg", code_path=str(user_code),
                        arch_kwargs={"bogus": 1})
    with pytest.raises(UsageError, match="--arch-kwargs applies"):
        load_checkpoint(path, arch="unet", arch_kwargs={"width": 4})
