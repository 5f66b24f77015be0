"""The device package: sources, preprocessing, runner, postprocessing and the agent loop."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from edgeseg.device import cli as agent_cli
from edgeseg.device.agent import run_agent
from edgeseg.device.contract import Contract
from edgeseg.device.errors import ModelError, SourceError, UsageError
from edgeseg.device.postprocess import masks_from_logits
from edgeseg.device.preprocess import preprocess
from edgeseg.device.runner import Runner
from edgeseg.device.sources import open_source, sample_frames

from conftest import DATA


def test_folder_source_reads_sorted_rgb_frames(frames_dir):
    with open_source(str(frames_dir)) as src:
        frames = list(src)
    assert [f.name for f in frames] == ["crop{:02d}".format(i) for i in range(8)]
    assert frames[0].image.shape == (64, 64, 3) and frames[0].image.dtype == np.uint8
    assert [f.index for f in frames] == list(range(8))


def test_glob_and_file_uri_and_loop(frames_dir):
    assert len(list(open_source(str(frames_dir / "crop0*.png")))) == 8
    one = list(open_source("file://" + str(frames_dir / "crop03.png")))
    assert len(one) == 1 and one[0].name == "crop03"
    looped = open_source(str(frames_dir), loop=True)
    names = [looped.read().name for _ in range(10)]
    assert names[8:] == ["crop00", "crop01"] and looped.loops == 1


def test_video_source_reads_real_video():
    with open_source(str(DATA / "vtest.avi")) as src:
        frame = src.read()
        assert frame.image.shape == (576, 768, 3)
        assert src.len_hint == 795
    picks = sample_frames(str(DATA / "vtest.avi"), count=4)
    assert [f.index for f in picks] == [0, 265, 529, 794]
    assert not np.array_equal(picks[0].image, picks[1].image)


def test_sixteen_bit_tiff_frame_keeps_values(nuclei):
    image, _ = nuclei
    frame = open_source(str(DATA / "img2d.tif")).read()
    assert frame.image.shape == (512, 512, 3)
    np.testing.assert_array_equal(frame.image[:, :, 0], image)


@pytest.mark.parametrize("bad, words", [
    ("/nonexistent/clip.avi", "does not exist"),
    ("rtsp2://cam/stream", "Unsupported source URI scheme"),
])
def test_bad_sources_are_clear(bad, words):
    with pytest.raises(SourceError, match=words):
        open_source(bad)


def test_empty_folder_is_refused(tmp_path):
    with pytest.raises(SourceError, match="holds no images"):
        open_source(str(tmp_path))


def test_preprocess_matches_the_formula_written_out():
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
    contract = Contract(input_size=[40, 48])
    out = preprocess(frame, contract)
    mean = np.array([0.485, 0.456, 0.406])
    std = np.array([0.229, 0.224, 0.225])
    expected = ((frame / 255.0 - mean) / std).transpose(2, 0, 1)[None]
    assert out.shape == (1, 3, 40, 48) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, atol=1e-5)
    bgr = preprocess(frame, Contract(input_size=[40, 48], color_order="BGR"))
    np.testing.assert_allclose(bgr[0, 0], (frame[:, :, 2] / 255.0 - 0.485) / 0.229, atol=1e-5)


def test_preprocess_resizes_to_the_contract_size():
    frame = np.zeros((100, 70, 3), dtype=np.uint8)
    assert preprocess(frame, Contract(input_size=[32, 64])).shape == (1, 3, 32, 64)


def test_masks_use_threshold_and_come_back_at_frame_size():
    logits = np.array([[[-3.0, 0.1], [3.0, -0.1]]], dtype=np.float32)
    masks = masks_from_logits(logits, Contract(threshold=0.5), (4, 4))
    assert masks.shape == (1, 4, 4)
    np.testing.assert_array_equal(masks[0, ::2, ::2], [[False, True], [True, False]])
    strict = masks_from_logits(logits, Contract(threshold=0.9), (2, 2))
    np.testing.assert_array_equal(strict[0], [[False, False], [True, False]])


def test_runner_reads_contract_and_runs(tiny_onnx):
    runner = Runner(str(tiny_onnx), threads=1)
    assert runner.contract.input_size == [64, 64]
    assert "CPUExecutionProvider" in runner.providers and not runner.fell_back
    out = runner.run(np.zeros((2, 3, 64, 64), np.float32))
    assert out.shape == (2, 1, 64, 64)


def test_runner_refuses_a_file_that_is_not_onnx(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_text("this is not a model")
    with pytest.raises(ModelError, match="cannot load"):
        Runner(str(bad))
    with pytest.raises(ModelError, match="does not exist"):
        Runner(str(tmp_path / "missing.onnx"))


def test_agent_report_has_every_stage_and_saves_masks(tiny_onnx, frames_dir, tmp_path):
    report_path = tmp_path / "r" / "report.json"
    report = run_agent(model=str(tiny_onnx), source=str(frames_dir), frames=10, warmup=2,
                       report=str(report_path), save_masks=str(tmp_path / "masks"), threads=1)
    assert json.loads(report_path.read_text()) == report
    assert report["frames"] == 10 and report["warmup"] == 2 and report["loops"] == 1
    for stage in ("read", "preprocess", "inference", "postprocess", "total"):
        s = report["latency_ms"][stage]
        assert 0 <= s["p50"] <= s["p90"] <= s["p95"] <= s["p99"] <= s["max"]
    assert report["latency_ms"]["total"]["p50"] >= report["latency_ms"]["inference"]["p50"]
    assert report["fps"] > 0 and report["device"]["cpu_count"] >= 1
    assert len(report["model_sha256"]) == 64 and report["export_failures"] is None
    masks = sorted(p.name for p in (tmp_path / "masks").iterdir())
    assert masks == ["crop{:02d}.png".format(i) for i in range(8)]
    assert Image.open(tmp_path / "masks" / "crop00.png").size == (64, 64)


def test_agent_without_loop_stops_at_the_end(tiny_onnx, frames_dir):
    report = run_agent(model=str(tiny_onnx), source=str(frames_dir), frames=50, warmup=0,
                       loop=False)
    assert report["frames"] == 8 and report["frames_requested"] == 50


def test_agent_cli_error_is_one_paragraph_and_nonzero(tiny_onnx, capsys):
    code = agent_cli.main(["run", "--model", str(tiny_onnx), "--source", "/nope", "--frames", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "does not exist" in err and "Traceback" not in err


def test_agent_check_reports_packages():
    out = subprocess.run([sys.executable, "-m", "edgeseg.device.cli", "check", "--json"],
                         capture_output=True, text=True)
    data = json.loads(out.stdout)
    assert out.returncode == 0 and data["ok"] and data["packages"]["onnxruntime"]


def test_device_imports_no_host_packages():
    code = ("import sys, edgeseg.device.cli, edgeseg.device.agent, edgeseg.device.sources;"
            "bad = [m for m in ('torch', 'onnx', 'onnxsim', 'fabric', 'paramiko', 'yaml') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_peak_memory_is_the_agents_own_not_its_parents():
    """ru_maxrss survives exec on Linux; the agent must report its own peak (VmHWM)."""
    ballast = np.ones(800 * 1024 * 1024 // 8)  # the parent touches 800 MiB first
    code = "from edgeseg.device.metrics import rss_mb; print(rss_mb())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert 5 < float(out.stdout) < 400, out.stdout
    del ballast


def test_missing_accelerator_with_a_listed_fallback_runs_on_cpu(tiny_onnx):
    runner = Runner(str(tiny_onnx), providers=["cuda", "cpu"])
    assert runner.providers == ["CPUExecutionProvider"]
    assert runner.requested_providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert runner.fell_back
    with pytest.raises(UsageError, match="CUDAExecutionProvider"):
        Runner(str(tiny_onnx), providers=["cuda"])


def test_unwritable_report_path_fails_before_measuring(tiny_onnx, frames_dir, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code = agent_cli.main(["run", "--model", str(tiny_onnx), "--source", str(frames_dir),
                           "--frames", "2", "--report", str(blocker / "r.json")])
    err = capsys.readouterr().err
    assert code == 2 and "--report" in err and "Traceback" not in err
    assert "warm-up done" not in err


def test_short_source_warns_when_fewer_frames_than_asked(tiny_onnx, frames_dir):
    messages = []
    report = run_agent(model=str(tiny_onnx), source=str(frames_dir), frames=20, warmup=0,
                       loop=False, log=messages.append)
    assert report["frames"] == 8
    assert any("8 of 20" in m for m in messages)
