"""Latency statistics and a description of the board the agent runs on."""

from __future__ import annotations

import os
import platform
import sys
from typing import Dict, Optional, Sequence

import numpy as np

STAGES = ("read", "preprocess", "inference", "postprocess", "total")
PERCENTILES = (50, 90, 95, 99)


def summarize(values_ms: Sequence[float]) -> Dict[str, float]:
    """p50/p90/p95/p99/mean/max of a list of milliseconds (linear-interpolated percentiles)."""
    if not len(values_ms):
        return {k: 0.0 for k in ("p50", "p90", "p95", "p99", "mean", "max")}
    arr = np.asarray(values_ms, dtype=np.float64)
    out = {"p{}".format(p): round(float(np.percentile(arr, p)), 3) for p in PERCENTILES}
    out["mean"] = round(float(arr.mean()), 3)
    out["max"] = round(float(arr.max()), 3)
    return out


def _read_text(path: str) -> Optional[str]:
    try:
        with open(path, "rb") as fh:
            return fh.read().decode("utf-8", "replace").strip("\x00 \n")
    except OSError:
        return None


def board_model() -> Optional[str]:
    """The board name from the device tree (Raspberry Pi, Jetson), None on PCs."""
    return _read_text("/proc/device-tree/model") or _read_text("/sys/firmware/devicetree/base/model")


def rss_mb() -> Optional[float]:
    """Peak resident memory of this process in MiB.

    Linux: VmHWM of /proc/self/status (getrusage's ru_maxrss survives exec, so a child started by a
    big host process would report the parent's peak); elsewhere getrusage.
    """
    status = _read_text("/proc/self/status")
    for line in (status or "").splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024.0, 1)
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1024.0 * 1024.0 if sys.platform == "darwin" else 1024.0
    return round(peak / scale, 1)


def device_info() -> dict:
    return {
        "machine": platform.machine(),
        "system": platform.system(),
        "cpu_count": os.cpu_count(),
        "board": board_model(),
        "python": platform.python_version(),
        "hostname": platform.node(),
        "load_avg": _load_avg(),
    }


def _load_avg():
    """1/5/15-minute load averages: latency measured on a busy board is not the board's latency."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None
