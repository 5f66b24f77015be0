"""Latency and memory of one ONNX artifact on this machine, measured the way the agent runs it.

``median_latency_ms`` times a session in this process (quick, for search loops).
``measure_artifact`` runs the session in a fresh child Python process, so its peak memory is that of
a process running this model alone (not of a host that also holds PyTorch and other models):

- ``peak_rss_mb``: VmHWM of the child (Linux ``/proc/self/status``, reset by exec), read with the
  agent's own :func:`edgeseg.device.metrics.rss_mb`;
- ``session_mb``: that peak minus the child's resident memory just before the session is created
  (Python, numpy, onnxruntime's library and the input batches are already loaded by then), i.e.
  what the session itself costs: weights, graph transforms, arena and activations.

Frames are preprocessed here with the model's contract and handed over as float32 arrays in a
temporary ``.npz`` (never pickled); every artifact is measured with the same thread count
(default ``os.cpu_count()``) so the numbers compare.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Optional, Sequence

import numpy as np

from edgeseg.device.errors import EdgesegError, ModelError, SourceError, UsageError
from edgeseg.device.preprocess import preprocess
from edgeseg.device.runner import Runner

CHILD_TIMEOUT_S = 900.0
_ERRORS = {cls.__name__: cls for cls in (EdgesegError, ModelError, SourceError, UsageError)}


def median_latency_ms(*, path: str, frames: Sequence, threads: Optional[int] = None,
                      warmup: int = 3, runs: int = 10, optimization: str = "all") -> float:
    """Median wall time (ms) of ``Runner.run`` on preprocessed real frames, after warm-up."""
    runner = Runner(str(path), providers=["cpu"], threads=threads, optimization=optimization)
    batches = [preprocess(f.image, runner.contract) for f in frames] or [
        np.zeros([1, runner.contract.channels] + list(runner.contract.input_size), np.float32)]
    for i in range(warmup):
        runner.run(batches[i % len(batches)])
    times = []
    for i in range(runs):
        t0 = time.perf_counter()
        runner.run(batches[i % len(batches)])
        times.append((time.perf_counter() - t0) * 1000.0)
    return float(statistics.median(times))


def _batches(frames: Sequence, contract) -> list:
    """1xCxHxW float32 batches: Frames / HxWx3 images go through the agent's ``preprocess``."""
    out = []
    for item in frames:
        image = getattr(item, "image", item)
        array = np.asarray(image)
        if array.ndim == 4 and array.dtype == np.float32:
            out.append(np.ascontiguousarray(array))
        elif array.ndim in (2, 3):
            out.append(preprocess(array, contract))
        else:
            raise UsageError("measure_artifact got a frame of shape {} and dtype {}.".format(
                array.shape, array.dtype),
                "Pass Frames, HxWx3 uint8 images or preprocessed 1xCxHxW float32 batches.")
    if not out:
        out.append(np.zeros([1, contract.channels] + list(contract.input_size), np.float32))
    return out


def measure_artifact(*, path: str, frames: Sequence, threads: Optional[int] = None,
                     warmup: int = 5, runs: int = 20, optimization: str = "all",
                     timeout_s: float = CHILD_TIMEOUT_S) -> dict:
    """Latency percentiles and peak memory of ``path`` run alone in a fresh child process.

    Returns ``{"median_ms", "p90_ms", "runs", "warmup", "threads", "peak_rss_mb", "session_mb",
    "session_create_ms", "optimization"}``.  Raises ModelError (or the child's own EdgesegError)
    with the child's last error line when it fails.
    """
    from .deploy import validate_model  # the contract, or a clear ModelError for a bad file

    if int(runs) < 1 or int(warmup) < 0:
        raise UsageError("measure_artifact needs runs >= 1 and warmup >= 0 (got {} and {}).".format(
            runs, warmup), "Pass e.g. warmup=5, runs=20.")
    contract = validate_model(model_path=path)
    threads = int(threads or os.cpu_count() or 1)
    batches = _batches(frames, contract)
    with tempfile.TemporaryDirectory(prefix="edgeseg-measure-") as tmp:
        data, result = os.path.join(tmp, "batches.npz"), os.path.join(tmp, "result.json")
        np.savez(data, *batches)
        cmd = [sys.executable, "-m", "edgeseg.host.measure", "--model", os.path.abspath(str(path)),
               "--batches", data, "--threads", str(threads), "--warmup", str(int(warmup)),
               "--runs", str(int(runs)), "--optimization", optimization, "--result", result]
        try:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise ModelError("Measuring {} took longer than {:.0f} s.".format(path, timeout_s),
                             "Use fewer runs, or check that the machine is not overloaded.")
        payload = _read_result(result)
        if proc.returncode != 0 or payload is None or "error" in payload:
            raise _child_error(path=path, proc=proc, payload=payload)
    return payload


def _read_result(path: str) -> Optional[dict]:
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def _child_error(*, path, proc, payload) -> EdgesegError:
    if payload and "error" in payload:
        err = payload["error"]
        return _ERRORS.get(err.get("kind"), ModelError)(err["message"], err.get("hint", ""))
    lines = [ln.strip() for ln in proc.stderr.decode("utf-8", "replace").splitlines() if ln.strip()]
    last = lines[-1] if lines else "no error output (exit status {})".format(proc.returncode)
    return ModelError("Measuring {} failed in its child process (exit status {}): {}".format(
        path, proc.returncode, last[:400]),
        "Run the model once with 'edgeseg-agent run' or onnxruntime directly to see the full "
        "error; a killed child (exit status -9) usually means the machine ran out of memory.")


def _vm_rss_mb() -> Optional[float]:
    """Current resident memory of this process in MiB (Linux), None elsewhere."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _child(args) -> dict:
    """The measurement itself, in the fresh process: batches first, then the session."""
    import importlib

    from edgeseg.device.metrics import rss_mb

    importlib.import_module("onnxruntime")  # its library is loaded before the baseline is taken

    with np.load(args.batches, allow_pickle=False) as npz:
        batches = [np.ascontiguousarray(npz[k]) for k in sorted(npz.files, key=lambda k: int(
            k.split("_")[-1]))]
    before = _vm_rss_mb()
    if before is None:  # no /proc: the peak so far is the best available baseline
        before = rss_mb() or 0.0
    runner = Runner(args.model, providers=["cpu"], threads=args.threads,
                    optimization=args.optimization)
    for i in range(args.warmup):
        runner.run(batches[i % len(batches)])
    times = []
    for i in range(args.runs):
        t0 = time.perf_counter()
        runner.run(batches[i % len(batches)])
        times.append((time.perf_counter() - t0) * 1000.0)
    peak = rss_mb() or 0.0
    return {"median_ms": round(float(statistics.median(times)), 3),
            "p90_ms": round(float(np.percentile(times, 90)), 3),
            "runs": args.runs, "warmup": args.warmup, "threads": args.threads,
            "optimization": args.optimization, "peak_rss_mb": round(peak, 1),
            "session_mb": round(max(0.0, peak - before), 1),
            "session_create_ms": round(runner.session_ms, 1), "batches": len(batches)}


def _write(path: str, payload: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(payload, fh)
    os.replace(tmp, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="edgeseg internal: measure one ONNX artifact.")
    parser.add_argument("--model", required=True)
    parser.add_argument("--batches", required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--optimization", default="all")
    parser.add_argument("--result", required=True)
    args = parser.parse_args(argv)
    try:
        payload = _child(args)
    except EdgesegError as exc:
        _write(args.result, {"error": {"kind": type(exc).__name__, "message": exc.message,
                                       "hint": exc.hint}})
        print("error: {}".format(exc), file=sys.stderr)
        return 2
    _write(args.result, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
