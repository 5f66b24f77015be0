"""``edgeseg export`` with the checkpoints users really have: flags, errors and export.json."""

from __future__ import annotations

import argparse
import json
from collections import OrderedDict

import numpy as np
import torch
import yaml

from models_util import nuclei_folder, random_net
from test_cli import assert_clear_error, edgeseg


def test_dataparallel_training_checkpoint_is_fixed_and_every_fix_recorded(tmp_path):
    """A NestedUNet with deep supervision, trained under nn.DataParallel, saved with its args."""
    model = random_net("nested_unet", seed=7, deep_supervision=True)
    folder = tmp_path / "models" / "dsb2018_NestedUNet_woDS"
    folder.mkdir(parents=True)
    state = OrderedDict(("module." + k, v) for k, v in model.state_dict().items())
    torch.save({"epoch": 99, "state_dict": state, "best_iou": np.float64(0.81),
                "config": argparse.Namespace(arch="NestedUNet", deep_supervision=True)},
               str(folder / "model.pth"))
    (folder / "config.yml").write_text(yaml.safe_dump(
        {"arch": "NestedUNet", "deep_supervision": True, "input_channels": 3, "num_classes": 1,
         "input_h": 32, "input_w": 32}))
    val = nuclei_folder(tmp_path / "val", 2, 48)
    out = edgeseg("export", folder / "model.pth", "--out", tmp_path / "out", "--precision",
                  "fp32", "--val", val, "--target-ort", "1.16", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report == json.loads((tmp_path / "out" / "export.json").read_text())
    fixes = " | ".join(report["fixes"])
    assert "'state_dict' key" in fixes and "'module.' stripped" in fixes
    assert "3 auxiliary head(s) dropped" in fixes
    assert set(report["versions"]) >= {"torch", "onnx", "onnxruntime", "onnxsim", "onnxscript"}
    export = report["export"]
    assert export["exporter"] == "torchscript" and export["opset"] == 17
    assert export["inputs"] == [{"name": "input", "shape": ["batch", 3, 32, 32]}]
    assert export["outputs"] == [{"name": "logits", "shape": ["batch", 1, 32, 32]}]
    (art,) = report["artifacts"]
    assert art["opset"] == 17 and isinstance(art["ir_version"], int) and art["ir_version"] <= 9
    assert isinstance(report["warnings"], list)
    assert any("TorchScript" in w for w in export["expected_warnings"])
    assert report["options"]["target_ort"] == "1.16" and report["options"]["exporter"] == "torchscript"
    assert "checkpoint: key prefix 'module.' stripped" in out.stderr


def test_whole_pickled_model_needs_the_flag_on_the_command_line(tmp_path):
    path = tmp_path / "model.pth"
    torch.save(random_net("unet", seed=1), str(path))
    val = nuclei_folder(tmp_path / "val", 2, 32)
    out = edgeseg("export", path, "--out", tmp_path / "out", "--precision", "fp32", "--val", val,
                  "--size", "32")
    assert_clear_error(out, "whole pickled model", "--trust-checkpoint")
    assert not (tmp_path / "out").exists()
    out = edgeseg("export", path, "--out", tmp_path / "out", "--precision", "fp32", "--val", val,
                  "--size", "32", "--trust-checkpoint", "--json")
    assert out.returncode == 0, out.stderr
    assert any("converted to its state_dict" in f for f in json.loads(out.stdout)["fixes"])


USER_NET = """
import torch
from torch import nn


class Shallow(nn.Module):
    def __init__(self, in_ch=3, classes=1):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_ch, 8, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(8, classes, 1))

    def forward(self, x):
        return self.body(x)
"""


def test_user_architecture_flags(tmp_path):
    code = tmp_path / "src"
    code.mkdir()
    (code / "shallow.py").write_text(USER_NET)
    import sys

    sys.path.insert(0, str(code))
    try:
        import shallow

        torch.manual_seed(0)
        torch.save(shallow.Shallow(classes=2).state_dict(), str(tmp_path / "w.pth"))
    finally:
        sys.path.remove(str(code))
        sys.modules.pop("shallow", None)
    val = nuclei_folder(tmp_path / "val", 2, 32)
    args = ["export", tmp_path / "w.pth", "--out", tmp_path / "out", "--precision", "fp32",
            "--val", val, "--size", "32", "--arch", "shallow:Shallow"]
    assert_clear_error(edgeseg(*args), "Cannot import module 'shallow'", "--code-path")
    assert_clear_error(edgeseg(*args, "--code-path", code, "--arch-kwargs", "[1]"),
                       "must be a JSON object")
    out = edgeseg(*args, "--code-path", code, "--arch-kwargs", '{"classes": 2}', "--json",
                  "--activation", "softmax")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["ok"] and report["contract"]["num_classes"] == 2
    assert report["contract"]["arch"] == "shallow:Shallow"
    assert report["contract"]["activation"] == "softmax"
