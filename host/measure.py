"""Latency and memory of one ONNX artifact on this machine, measured the way the agent runs it."""

from __future__ import annotations

import statistics
import time
from typing import Optional, Sequence

import numpy as np

from edgeseg.device.preprocess import preprocess
from edgeseg.device.runner import Runner


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
