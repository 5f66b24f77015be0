"""Each precision's artifact, made from the FP32 model, and its row of the precision report.

Building (int8 static via :mod:`tuning`, int8-dynamic via :mod:`quantize`, fp16 via :mod:`fp16`) is
separate from assessing (parity with PyTorch via :mod:`validate`, latency and memory via
:mod:`measure`): every artifact is assessed the same way, on the same validation images and with
the same thread count.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

from .errors import UsageError

PRECISIONS = ("fp32", "int8", "int8-dynamic", "fp16")
DEFAULT_PRECISIONS = ("fp32", "int8")  # fp16 only on request: not faster on CPU targets
CALIBRATIONS = ("minmax", "entropy", "percentile", "auto")
MEASURE_FRAMES = 4


@dataclass
class QuantOptions:
    """How quantized artifacts are made and measured (see ``edgeseg export --help``)."""

    calibration: str = "minmax"
    max_iou_drop: float = 0.01
    force: bool = False
    threads: Optional[int] = None  # None: every core of this machine, the same for all artifacts
    measure_runs: int = 20

    def check(self) -> "QuantOptions":
        if self.calibration not in CALIBRATIONS:
            raise UsageError("Unknown --calibration {!r}.".format(self.calibration),
                             "Use one of: {}.".format(", ".join(CALIBRATIONS)))
        if not 0.0 <= float(self.max_iou_drop) < 1.0:
            raise UsageError("--max-iou-drop {} is not between 0 and 1.".format(self.max_iou_drop),
                             "Give the largest mask-IoU loss vs FP32 you accept, e.g. 0.01.")
        if self.threads is not None and int(self.threads) < 1:
            raise UsageError("--threads must be at least 1.", "Leave it out to use every core.")
        if int(self.measure_runs) < 3:
            raise UsageError("--measure-runs must be at least 3 (got {}).".format(
                self.measure_runs), "Use 20 (the default) for a stable median.")
        return self

    @property
    def thread_count(self) -> int:
        return int(self.threads or os.cpu_count() or 1)


def artifact_name(precision: str, ok: bool = True) -> str:
    return "model.{}.onnx".format(precision) if ok else "model.{}.failed.onnx".format(precision)


def build_precision(*, precision: str, fp32_path: str, staging: str, calib_frames: Sequence,
                    val_frames: Sequence, contract, quant: QuantOptions,
                    log: Callable[[str], None]) -> tuple:
    """Write the ``precision`` artifact into ``staging``; returns (path, info)."""
    path = os.path.join(staging, artifact_name(precision))
    if precision == "int8":
        from .tuning import build_int8

        info = build_int8(fp32_path=fp32_path, out_path=path, calib_frames=calib_frames,
                          val_frames=val_frames, contract=contract, log=log,
                          method=quant.calibration, max_iou_drop=quant.max_iou_drop,
                          threads=quant.thread_count)
    elif precision == "int8-dynamic":
        from .quantize import quantize_dynamic_int8

        info = quantize_dynamic_int8(fp32_path=fp32_path, out_path=path, contract=contract,
                                     log=log, force=quant.force,
                                     frames=list(calib_frames or val_frames)[:1])
    elif precision == "fp16":
        from .fp16 import convert_fp16

        info = convert_fp16(fp32_path=fp32_path, out_path=path, contract=contract, log=log,
                            frames=list(val_frames)[:1])
    else:
        raise UsageError("Unknown precision {!r}.".format(precision),
                         "Use one of: {}.".format(", ".join(PRECISIONS)))
    return path, info


def assess(*, precision: str, path: str, info: Optional[dict], torch_model, val_frames: Sequence,
           gt_masks, quant: QuantOptions, log: Callable[[str], None]) -> dict:
    """Parity with PyTorch (and ground truth), budget, latency and memory of one artifact."""
    from .measure import measure_artifact
    from .validate import validate_artifact

    log("validating {} on {} frames against PyTorch".format(precision, len(val_frames)))
    # FP16 is for GPUs: judged on CUDA when this onnxruntime has it (CPU computes it in float32)
    parity = validate_artifact(onnx_path=path, torch_model=torch_model, frames=val_frames,
                               precision=precision, gt_masks=gt_masks,
                               providers=None if precision == "fp16" else ("cpu",))
    failures = list(parity.failures) + _budget_failures(info)
    log("measuring {}: {} runs, {} threads".format(precision, quant.measure_runs,
                                                   quant.thread_count))
    measure = measure_artifact(path=path, frames=list(val_frames)[:MEASURE_FRAMES],
                               threads=quant.thread_count, runs=quant.measure_runs)
    for failure in failures:
        log("{}: FAILED: {}".format(precision, failure))
    return {"precision": precision, "staged": path, "ok": not failures, "failures": failures,
            "parity": parity.to_dict(), "measure": measure}


def _budget_failures(info: Optional[dict]) -> List[str]:
    budget = (info or {}).get("budget")
    if not budget or budget.get("held", True):
        return []
    return ["INT8 mask IoU drop vs FP32 {:.4f} exceeds --max-iou-drop {} even with {} node(s) "
            "kept in float".format(budget.get("iou_drop", float("nan")), budget["max_iou_drop"],
                                   len(budget.get("float_nodes", [])))]


def add_speedups(artifacts: List[dict], *, reference_ms: Optional[float]) -> None:
    """speed-up vs FP32 (median latency ratio) on every row."""
    for art in artifacts:
        ms = (art.get("measure") or {}).get("median_ms")
        art["speedup_vs_fp32"] = (round(reference_ms / ms, 3)
                                  if reference_ms and ms else None)


def fp16_cpu_warning(artifacts: List[dict], *, reference_ms: Optional[float]) -> Optional[str]:
    """The measured reason not to use FP16 here, when no GPU provider is available."""
    from .fp16 import cpu_warning, gpu_available

    rows = [a for a in artifacts if a["precision"] == "fp16"]
    if not rows or gpu_available() or not reference_ms:
        return None
    return cpu_warning(fp32_ms=reference_ms, fp16_ms=rows[0]["measure"]["median_ms"])
