"""measure_artifact: latency and peak memory of a real onnxruntime session in a child process."""

from __future__ import annotations

import os
import subprocess

import numpy as np
import onnx
import pytest

from edgeseg.device.contract import Contract
from edgeseg.device.preprocess import preprocess
from edgeseg.host.errors import ModelError, UsageError
from edgeseg.host.measure import _child_error, measure_artifact, median_latency_ms

from conftest import export_tiny
from models_util import nuclei_frames

SIZE = 32


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return export_tiny(tmp_path_factory.mktemp("measure") / "tiny.onnx", size=SIZE)


def test_measures_latency_and_memory_of_a_real_session(tiny):
    result = measure_artifact(path=str(tiny), frames=nuclei_frames(3, 48), threads=1, warmup=2,
                              runs=6)
    assert result["median_ms"] > 0 and result["p90_ms"] >= result["median_ms"]
    assert (result["runs"], result["warmup"], result["threads"]) == (6, 2, 1)
    assert result["batches"] == 3
    assert result["peak_rss_mb"] > result["session_mb"] > 0
    # The session holds at least the weights: the file is almost all float32 initializers.
    weights_mb = os.path.getsize(str(tiny)) / 2 ** 20
    assert result["session_mb"] >= 0.8 * weights_mb
    # ... and the peak is a process running this model alone, not this test process.
    assert result["peak_rss_mb"] < 1500


def test_default_threads_is_the_cpu_count_and_batches_pass_through(tiny):
    batch = preprocess(nuclei_frames(1, SIZE)[0].image, Contract(input_size=[SIZE, SIZE]))
    result = measure_artifact(path=str(tiny), frames=[batch, batch], warmup=0, runs=2)
    assert result["threads"] == os.cpu_count()
    assert result["batches"] == 2 and result["runs"] == 2


def test_no_frames_runs_on_a_zero_batch(tiny):
    result = measure_artifact(path=str(tiny), frames=[], warmup=0, runs=1)
    assert result["batches"] == 1 and result["median_ms"] > 0


def test_in_process_median_still_works(tiny):
    assert median_latency_ms(path=str(tiny), frames=nuclei_frames(2, SIZE), warmup=1, runs=2) > 0


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError) as err:
        measure_artifact(path=str(tmp_path / "nope.onnx"), frames=[])
    assert "nope.onnx" in err.value.message and "does not exist" in err.value.message


def test_a_file_that_is_not_onnx_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model at all" * 10)
    with pytest.raises(ModelError) as err:
        measure_artifact(path=str(bad), frames=[])
    assert "not an ONNX model" in err.value.message


def test_a_model_the_child_cannot_load_reports_onnxruntimes_reason(tiny, tmp_path):
    proto = onnx.load(str(tiny))
    proto.graph.node[0].op_type = "NoSuchOperator"
    broken = tmp_path / "broken.onnx"
    onnx.save(proto, str(broken))
    with pytest.raises(ModelError) as err:
        measure_artifact(path=str(broken), frames=[], warmup=0, runs=1)
    assert "cannot load" in err.value.message and "NoSuchOperator" in err.value.message


def test_a_crashed_child_is_reported_with_its_last_error_line():
    proc = subprocess.CompletedProcess(
        args=[], returncode=1,
        stderr=b"Traceback (most recent call last):\n  File x\nMemoryError: out of arena\n\n")
    err = _child_error(path="m.onnx", proc=proc, payload=None)
    assert isinstance(err, ModelError)
    assert "MemoryError: out of arena" in err.message and "exit status 1" in err.message


def test_bad_counts_and_frames_are_refused(tiny):
    with pytest.raises(UsageError):
        measure_artifact(path=str(tiny), frames=[], runs=0)
    with pytest.raises(UsageError):
        measure_artifact(path=str(tiny), frames=[np.zeros((2, 2, 2, 2, 2), np.uint8)])


def test_precision_table_rows_from_measured_artifacts(tiny):
    from edgeseg.host.report import markdown_table, precision_rows, precision_table

    measured = measure_artifact(path=str(tiny), frames=[], threads=1, warmup=0, runs=3)
    slower = dict(measured, median_ms=measured["median_ms"] * 2)
    report = {"artifacts": [
        {"precision": "fp32", "ok": True, "bytes": 4_000_000, "measure": slower,
         "parity": {"mask_iou": 1.0, "max_abs_err": 1e-5, "gt_iou": 0.81}},
        {"precision": "int8", "ok": False, "bytes": 1_000_000, "measure": measured,
         "parity": {"mask_iou": 0.97, "max_abs_err": 0.4, "gt_iou": None}}]}
    headers, rows = precision_rows(report)
    assert rows[0][:5] == ["fp32", "ok", 4.0, slower["median_ms"], 1.0]
    assert rows[1][:2] == ["int8", "FAILED"] and rows[1][4] == 2.0
    assert rows[1][5:7] == [measured["peak_rss_mb"], measured["session_mb"]]
    text = precision_table(report)
    assert "IoU vs GT" in text and "0.81" in text and "1 thread(s)" in text
    assert text.splitlines()[3].rstrip().endswith("-")  # int8 has no ground-truth IoU
    assert markdown_table(headers, rows).count("\n") == 3
