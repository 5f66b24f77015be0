"""End to end over real SSH: the trained NestedUNet's INT8 model deployed to an sshd 'device' and
profiled there on the microscope scan; live masks scored against the expert ground truth."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest

from edgeseg.host.deploy import deploy
from edgeseg.host.profile import profile
from edgeseg.host.quickstart import scan_iou


@pytest.mark.slow
def test_trained_nested_unet_int8_over_ssh(quickstart_run, sshd_server, ssh_target, tmp_path):
    int8 = next(a for a in quickstart_run["export"]["artifacts"] if a["precision"] == "int8")
    assert int8["ok"] and int8["path"].endswith("model.int8.onnx")
    install_dir = str(tmp_path / "device")
    deployed = deploy(target=ssh_target, model_path=int8["path"], install_dir=install_dir,
                      python=sys.executable)
    remote = Path(deployed["remote_path"])  # the "device" is this machine behind sshd
    assert hashlib.sha256(remote.read_bytes()).hexdigest() == deployed["model_sha256"] == int8["sha256"]
    assert str(sshd_server.port) in deployed["target"]
    scan = Path(quickstart_run["out_dir"]) / "sources" / "nuclei_scan"
    masks = tmp_path / "masks"
    report = profile(target=ssh_target, source=str(scan), frames=30, warmup=3,
                     install_dir=install_dir, python=sys.executable, fetch_masks=str(masks))
    assert report["frames"] == 30 and report["warmup"] == 3
    for stage in ("read", "preprocess", "inference", "postprocess", "total"):
        s = report["latency_ms"][stage]
        assert s["p50"] <= s["p95"] <= s["max"]
    assert report["providers"] == ["CPUExecutionProvider"]
    assert report["model_sha256"] == deployed["model_sha256"]
    assert report["precision"] == "int8"
    live = scan_iou(mask_dir=masks)
    assert live["frames"] == 25 and live["coverage"] == 1.0
    assert live["heldout_iou"] >= 0.8, live
