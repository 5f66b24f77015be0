"""The edgeseg command line: bad input ends in one clear paragraph, a non-zero exit, nothing half-written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models_util import nuclei_folder, random_net


def edgeseg(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "edgeseg.host.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd)


def assert_clear_error(out, *words, code=2):
    assert out.returncode == code, (out.returncode, out.stdout, out.stderr)
    assert "Traceback" not in out.stderr, out.stderr
    assert out.stderr.count("edgeseg: error: ") == 1, out.stderr
    for word in words:
        assert word in out.stderr, out.stderr


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ckpt")
    torch.save(random_net("unet").state_dict(), folder / "model.pth")
    (folder / "config.yml").write_text("arch: UNet\nnum_classes: 1\ninput_channels: 3\n"
                                       "input_h: 32\ninput_w: 32\n")
    return folder / "model.pth"


def test_missing_checkpoint(tmp_path):
    out = edgeseg("export", tmp_path / "nope.pth", "--out", tmp_path / "out", "--precision", "fp32",
                  "--val", tmp_path)
    assert_clear_error(out, "nope.pth")
    assert not (tmp_path / "out" / "model.fp32.onnx").exists()


def test_corrupt_checkpoint(tmp_path):
    bad = tmp_path / "model.pth"
    bad.write_bytes(b"PK\x03\x04 truncated zip")
    out = edgeseg("export", bad, "--out", tmp_path / "out", "--precision", "fp32", "--val", tmp_path)
    assert_clear_error(out, "model.pth")


def test_size_not_multiple_of_16(small_checkpoint, tmp_path):
    out = edgeseg("export", small_checkpoint, "--out", tmp_path / "out", "--size", "100",
                  "--precision", "fp32", "--val", tmp_path)
    assert_clear_error(out, "16")
    assert not list((tmp_path / "out").glob("*.onnx")) if (tmp_path / "out").exists() else True


def test_int8_without_calibration_images(small_checkpoint, tmp_path):
    out = edgeseg("export", small_checkpoint, "--out", tmp_path / "out")
    assert_clear_error(out, "--calib")


def test_empty_calibration_folder(small_checkpoint, tmp_path):
    empty = tmp_path / "calib"
    empty.mkdir()
    out = edgeseg("export", small_checkpoint, "--out", tmp_path / "out", "--calib", empty)
    assert_clear_error(out, "no images")
    assert not (tmp_path / "out" / "model.int8.onnx").exists()


def test_unknown_precision(small_checkpoint, tmp_path):
    out = edgeseg("export", small_checkpoint, "--out", tmp_path / "out", "--precision", "int4")
    assert_clear_error(out, "int4")


def test_export_json_stdout_is_only_json(small_checkpoint, tmp_path):
    val = nuclei_folder(tmp_path / "val", 3, 32)
    out = edgeseg("export", small_checkpoint, "--out", tmp_path / "out", "--precision", "fp32",
                  "--val", val, "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["ok"] and report["artifacts"][0]["precision"] == "fp32"
    assert report["artifacts"][0]["opset"] == 17
    assert json.loads((tmp_path / "out" / "export.json").read_text())["ok"]


def test_deploy_refuses_a_file_that_is_not_onnx(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_text("not a model")
    out = edgeseg("deploy", "local", bad, "--install-dir", tmp_path / "dev")
    assert_clear_error(out, "model.onnx")
    assert not (tmp_path / "dev" / "models").exists() or not list((tmp_path / "dev" / "models").iterdir())


def test_unreachable_target(tiny_onnx, tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = edgeseg("deploy", "127.0.0.1:{}".format(port), tiny_onnx)
    assert_clear_error(out, "cannot reach", str(port))


def test_target_without_onnxruntime(tiny_onnx, tmp_path):
    venv = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    out = edgeseg("deploy", "local", tiny_onnx, "--install-dir", tmp_path / "dev",
                  "--python", venv / "bin" / "python")
    assert_clear_error(out, "onnxruntime", "pip install", "venv")
    assert not (tmp_path / "dev" / "models" / "tiny.onnx").exists()


def test_deploy_and_profile_local_json(tiny_onnx, frames_dir, tmp_path):
    dev = tmp_path / "dev"
    out = edgeseg("deploy", "local", tiny_onnx, "--install-dir", dev, "--python", sys.executable,
                  "--json")
    assert out.returncode == 0, out.stderr
    deployed = json.loads(out.stdout)
    assert deployed["ok"] and Path(deployed["remote_path"]).is_file()
    out = edgeseg("profile", "local", "--source", frames_dir, "--frames", 5, "--warmup", 1,
                  "--install-dir", dev, "--python", sys.executable, "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["frames"] == 5 and report["target"] == "local"
    assert report["model_sha256"] == deployed["model_sha256"]
    text = edgeseg("profile", "local", "--source", frames_dir, "--frames", 3, "--warmup", 0,
                   "--install-dir", dev, "--python", sys.executable)
    assert text.returncode == 0 and "inference" in text.stdout and "p95" in text.stdout


@pytest.mark.parametrize("opset, words", [("25", "20"), ("7", "11"), ("0", "Opset 0")])
def test_unsupported_opset_is_refused_and_stdout_stays_clean(small_checkpoint, tmp_path, opset, words):
    val = nuclei_folder(tmp_path / "val", 2, 32)
    out = edgeseg("export", small_checkpoint, "--out", tmp_path / "out", "--opset", opset,
                  "--precision", "fp32", "--val", val, "--json")
    assert_clear_error(out, words)
    assert out.stdout == ""


def test_output_folder_that_cannot_be_created(small_checkpoint, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = edgeseg("export", small_checkpoint, "--out", blocker / "sub", "--precision", "fp32",
                  "--val", tmp_path)
    assert_clear_error(out, "Cannot create the output folder")


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_output_folder_where_no_folder_can_be_made(small_checkpoint, tmp_path):
    # /proc looks writable to root by its permission bits, yet refuses new folders
    out = edgeseg("export", small_checkpoint, "--out", "/proc/edgeseg-out", "--precision", "fp32",
                  "--val", tmp_path)
    assert_clear_error(out, "Cannot create the output folder /proc/edgeseg-out",
                       "creating a folder in /proc failed")


@pytest.mark.parametrize("args, words", [
    (["export", "m.pth", "--out", "o", "--num-classes", "0"], "--num-classes"),
    (["profile", "local", "--source", "x", "--frames", "0"], "--frames"),
    (["profile", "local", "--source", "x", "--threads", "-2"], "--threads"),
    (["quickstart", "--frames", "0"], "--frames"),
])
def test_nonsense_counts_are_refused_up_front(args, words):
    out = edgeseg(*args)
    assert out.returncode == 2 and words in out.stderr and "Traceback" not in out.stderr


def test_mask_folder_that_cannot_be_created_fails_before_the_run(tiny_onnx, frames_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = edgeseg("profile", "local", "--source", frames_dir, "--save-masks", blocker / "m",
                  "--install-dir", tmp_path / "dev")
    assert_clear_error(out, "--save-masks")
    assert not (tmp_path / "dev" / "reports").exists()


def test_quickstart_out_that_is_a_file(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = edgeseg("quickstart", "--out", blocker)
    assert_clear_error(out, "quickstart folder")


def test_deploying_a_folder_says_it_is_a_folder(tmp_path):
    out = edgeseg("deploy", "local", tmp_path, "--install-dir", tmp_path / "dev")
    assert_clear_error(out, "is a folder")


def test_a_terminated_export_leaves_nothing_behind(small_checkpoint, tmp_path):
    import signal
    import time

    val = nuclei_folder(tmp_path / "val", 2, 64)
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.fp32.onnx").write_bytes(b"the earlier good model")
    (out / "export.json").write_text('{"ok": true}')
    proc = subprocess.Popen([sys.executable, "-m", "edgeseg.host.cli", "export",
                             str(small_checkpoint), "--out", str(out), "--val", str(val),
                             "--precision", "fp32", "--size", "256", "--measure-runs", "200"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(out.glob(".export-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, proc.communicate()  # still working in its staging folder
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted" in stderr and "Traceback" not in stderr
    assert stdout == ""
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "model.fp32.onnx"]
    assert (out / "model.fp32.onnx").read_bytes() == b"the earlier good model"
