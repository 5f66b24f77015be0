"""INT8 that still segments like FP32: calibration choice, Resize check and an accuracy budget.

``build_int8`` wraps :func:`quantize_int8`: with ``method="auto"`` it calibrates with every method
and keeps the best mask IoU against the FP32 ONNX model on the validation frames; it checks the
result under the agent's graph optimisations against optimisations off (an onnxruntime fault
folds QDQ around linear Resize, microsoft/onnxruntime#21319) and keeps Resize in float when they
disagree; and when the mask IoU drops by more than ``max_iou_drop`` it keeps the worst activations
(ranked by ``qdq_loss_debug``) in float, one step at a time.  Every candidate lives in a hidden
folder beside ``out_path`` (removed at the end); only the kept model is moved onto ``out_path``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import numpy as np

from edgeseg.device.contract import Contract
from edgeseg.device.postprocess import masks_from_logits
from edgeseg.device.preprocess import preprocess
from edgeseg.device.runner import Runner

from .calibration import spread
from .errors import EdgesegError, ExportError, UsageError
from .measure import median_latency_ms
from .qdqdebug import RANK_FRAMES, float_nodes_for, rank_activations
from .quantize import CACHE_SUPPORTED, calibrate_int8, quantize_int8
from .validate import _Tally

METHODS = ("minmax", "entropy", "percentile")  # minmax first: it wins ties (fastest to calibrate)
# Agent level ("all": fused integer kernels, requantize once) vs "disable" (the reference float
# path: DequantizeLinear -> float op -> QuantizeLinear).  Same integer model, so they differ only by
# rounding (onnxruntime#32132: k quantization steps) -- on the demo NestedUNet 0.14 of a logit
# range of 19, under 1%, masks 99.97% equal -- while a Resize wrongly computed in int8 moves whole
# feature maps.  max_rel_err is the largest |logit difference| over the logit range of the
# "disable" run: 5% leaves over five times the rounding noise and still catches a shifted map.
RESIZE_TOLERANCE = {"mask_iou": 0.999, "max_rel_err": 0.05}
RESIZE_FRAMES = 4  # a kernel fault shows on any frame; "disable" runs about 3x slower than "all"


def _logits(*, path: str, frames: Sequence, optimization: str = "all") -> tuple:
    """([logits per frame], contract) of one ONNX model run by the agent's Runner."""
    runner = Runner(str(path), providers=["cpu"], optimization=optimization)
    return [runner.run(preprocess(f.image, runner.contract)) for f in frames], runner.contract


def _stats(*, logits_a: List[np.ndarray], logits_b: List[np.ndarray], frames: Sequence,
           contract: Contract) -> dict:
    """Pooled mask IoU (as host/validate.py), max |logit difference|, logit range of ``b``."""
    tally = _Tally()
    for a, b, frame in zip(logits_a, logits_b, frames):
        hw = frame.image.shape[:2]
        tally.add(a, b, masks_from_logits(a[0], contract, hw),
                  masks_from_logits(b[0], contract, hw))
    span = max(float(b.max()) for b in logits_b) - min(float(b.min()) for b in logits_b)
    return {"mask_iou": 1.0 if tally.union == 0 else tally.inter / tally.union,
            "max_abs_err": float(tally.max_abs), "logit_range": span}


def compare_masks(*, a_path: str, b_path: str, frames: Sequence, optimization_a: str = "all",
                  optimization_b: str = "all") -> dict:
    """Pooled mask IoU and max |logit difference| of two ONNX models on the same frames."""
    frames = list(frames)
    logits_a, contract = _logits(path=a_path, frames=frames, optimization=optimization_a)
    logits_b, _ = _logits(path=b_path, frames=frames, optimization=optimization_b)
    stats = _stats(logits_a=logits_a, logits_b=logits_b, frames=frames, contract=contract)
    return {"mask_iou": stats["mask_iou"], "max_abs_err": stats["max_abs_err"]}


@dataclass
class _Job:
    """One build_int8 run: its inputs, scratch folder and the FP32 logits computed once."""

    fp32_path: str
    contract: Contract
    calib_frames: list
    val_frames: list
    workdir: str
    log: Callable[[str], None]
    threads: Optional[int] = None
    method: str = "minmax"
    exclude_op_types: tuple = ()
    reference: list = field(default_factory=list)
    scores: dict = field(default_factory=dict)  # path -> vs_fp32 result (candidates never change)
    ranges: dict = field(default_factory=dict)  # method -> Ranges, calibrated once per method

    def quantize(self, name: str, *, method: Optional[str] = None, exclude_nodes=(),
                 exclude_op_types: Optional[tuple] = None) -> tuple:
        """quantize_int8 into ``workdir/name.onnx``; (path, info).

        Each method is calibrated once (when onnxruntime can take ranges back, see
        ``CACHE_SUPPORTED``): later candidates (Resize in float, budget steps) only re-quantize.
        The first candidate of a method counts the calibration in its ``seconds``.
        """
        method = method or self.method
        first = method not in self.ranges
        if first and CACHE_SUPPORTED:
            self.ranges[method] = calibrate_int8(fp32_path=self.fp32_path,
                                                 frames=self.calib_frames, contract=self.contract,
                                                 log=self.log, method=method)
        ranges = self.ranges.get(method)
        path = os.path.join(self.workdir, name + ".onnx")
        info = quantize_int8(fp32_path=self.fp32_path, out_path=path, frames=self.calib_frames,
                             contract=self.contract, log=self.log, method=method,
                             exclude_nodes=tuple(exclude_nodes), ranges=ranges,
                             exclude_op_types=(self.exclude_op_types if exclude_op_types is None
                                               else exclude_op_types))
        if first and ranges is not None:
            info["seconds"] = round(info["seconds"] + ranges.seconds, 2)
        return path, info

    def vs_fp32(self, path: str) -> dict:
        """Mask IoU and max |logit difference| of ``path`` against the FP32 model (level "all")."""
        if path not in self.scores:
            if not self.reference:
                self.reference = _logits(path=self.fp32_path, frames=self.val_frames)[0]
            logits, _ = _logits(path=path, frames=self.val_frames)
            self.scores[path] = _stats(logits_a=self.reference, logits_b=logits,
                                       frames=self.val_frames, contract=self.contract)
        return self.scores[path]


def choose_method(*, job: _Job, method: str) -> tuple:
    """(path, info, methods_tried, method) of the best calibration method (or the one asked)."""
    tried, best = [], None
    for name in METHODS if method == "auto" else (method,):
        t0 = time.perf_counter()
        try:
            path, info = job.quantize("cand-" + name, method=name)
        except (EdgesegError, MemoryError) as exc:
            if method != "auto":
                raise
            tried.append({"method": name, "error": str(exc).splitlines()[0],
                          "seconds": round(time.perf_counter() - t0, 2)})
            job.log("calibration {} failed: {}".format(name, tried[-1]["error"]))
            continue
        iou = job.vs_fp32(path)["mask_iou"]
        tried.append({"method": name, "iou_vs_fp32": round(iou, 6), "seconds": info["seconds"],
                      "calibration_frames": info["calibration_frames"]})
        if "capped_from" in info:  # the histogram methods' memory cap, for every method tried
            tried[-1]["capped_from"] = info["capped_from"]
        job.log("calibration {}: mask IoU vs FP32 {:.4f} ({:.1f} s)".format(
            name, iou, info["seconds"]))
        if best is None or iou > best[2]:
            best = (path, info, iou, name)
    if best is None:
        raise ExportError("Every INT8 calibration method failed: {}.".format(
            "; ".join("{}: {}".format(t["method"], t["error"]) for t in tried)),
            "Export fp32 only (--precision fp32) and report the model and versions.")
    return best[0], best[1], tried, best[3]


def resize_check(*, path: str, frames: Sequence, tolerance: dict) -> dict:
    """The INT8 model under the agent's optimisation level ("all") vs optimisations off."""
    frames = list(frames)
    logits_all, contract = _logits(path=path, frames=frames, optimization="all")
    logits_off, _ = _logits(path=path, frames=frames, optimization="disable")
    stats = _stats(logits_a=logits_all, logits_b=logits_off, frames=frames, contract=contract)
    rel = stats["max_abs_err"] / stats["logit_range"] if stats["logit_range"] > 0 else 0.0
    agree = stats["mask_iou"] >= tolerance["mask_iou"] and rel <= tolerance["max_rel_err"]
    return {"iou_all_vs_disable": round(stats["mask_iou"], 6),
            "max_abs_err": round(stats["max_abs_err"], 6), "max_rel_err": round(rel, 6),
            "agree": bool(agree)}


def _resize_step(*, job: _Job, path: str, info: dict, tolerance: dict) -> tuple:
    """Run the Resize check; re-quantize with Resize in float when the two levels disagree."""
    frames = spread(job.val_frames, RESIZE_FRAMES)
    check = resize_check(path=path, frames=frames, tolerance=tolerance)
    check["resize_kept_float"] = False
    if check["agree"]:
        return path, info, check
    job.log("INT8 with graph optimisations disagrees with optimisations off (mask IoU {:.4f}, "
            "max |diff| {:.3g}): keeping Resize in float".format(check["iou_all_vs_disable"],
                                                                 check["max_abs_err"]))
    job.exclude_op_types = ("Resize",)
    path, info = job.quantize("resize-float")
    check["resize_kept_float"] = True
    after = resize_check(path=path, frames=frames, tolerance=tolerance)
    check["after"] = {k: after[k] for k in ("iou_all_vs_disable", "max_abs_err", "max_rel_err")}
    return path, info, check


def _check_args(*, method: str, val_frames: list, max_iou_drop: float) -> None:
    if method != "auto" and method not in METHODS:
        raise UsageError("Unknown calibration method {!r}.".format(method),
                         "Use one of: " + ", ".join(METHODS + ("auto",)) + ".")
    if not val_frames:
        raise UsageError("INT8 tuning needs validation frames to compare against FP32.",
                         "Pass --val with images like those the device will see.")
    if not 0.0 <= max_iou_drop <= 1.0:
        raise UsageError("--max-iou-drop must be between 0 and 1 (got {}).".format(max_iou_drop),
                         "The default is 0.01 (one point of mask IoU against FP32).")


def build_int8(*, fp32_path: str, out_path: str, calib_frames: Sequence, val_frames: Sequence,
               contract: Contract, log: Callable[[str], None], method: str = "minmax",
               max_iou_drop: float = 0.01, threads: Optional[int] = None,
               resize_tolerance: Optional[dict] = None) -> dict:
    """Write ``out_path`` (atomically): the INT8 model that meets the budget, or the best attempt.

    Returns the kept model's quantize_int8 info plus ``method``, ``methods_tried``,
    ``iou_vs_fp32``, ``max_abs_err_vs_fp32``, ``tuning_seconds`` (all of build_int8),
    ``resize_check`` and ``budget`` (``held`` False
    when no step met ``max_iou_drop``: the caller decides whether that is a failure).
    ``threads``: onnxruntime threads of every latency measurement of the budget steps.
    """
    t0, val_frames = time.perf_counter(), list(val_frames)
    _check_args(method=method, val_frames=val_frames, max_iou_drop=max_iou_drop)
    tolerance = dict(RESIZE_TOLERANCE, **(resize_tolerance or {}))
    workdir = tempfile.mkdtemp(prefix=".tuning-", dir=os.path.dirname(os.path.abspath(out_path)))
    try:
        job = _Job(fp32_path=fp32_path, contract=contract, calib_frames=list(calib_frames),
                   val_frames=val_frames, workdir=workdir, log=log, threads=threads)
        path, info, tried, job.method = choose_method(job=job, method=method)
        path, info, check = _resize_step(job=job, path=path, info=info, tolerance=tolerance)
        path, info, budget = budget_loop(job=job, path=path, info=info,
                                         max_iou_drop=max_iou_drop)
        final = job.vs_fp32(path)
        info.update(method=job.method, methods_tried=tried, resize_check=check, budget=budget,
                    iou_vs_fp32=round(final["mask_iou"], 6),
                    max_abs_err_vs_fp32=round(final["max_abs_err"], 6),
                    tuning_seconds=round(time.perf_counter() - t0, 2))
        os.replace(path, out_path)
        return info
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(workdir)


# Float tensors per step: 1, 2, 4, ... (each step doubles the set).  How many tensors a model needs
# in float is unknown and every step re-quantizes and re-measures, so doubling reaches any count n in
# about log2(n) + 1 steps, while a model that needs one or two float tensors pays only for those.
# Eight steps cover 128 tensors (a NestedUNet has about 60 quantized activations).
MAX_STEPS = 8
LATENCY = {"warmup": 2, "runs": 5}  # a few runs per step, same threads for every step


def _latency(*, job: _Job, path: str) -> float:
    return round(median_latency_ms(path=path, frames=job.val_frames[:3], threads=job.threads,
                                   **LATENCY), 2)


def budget_loop(*, job: _Job, path: str, info: dict, max_iou_drop: float) -> tuple:
    """Keep the worst activations in float until the mask IoU drop holds; (path, info, budget)."""
    iou = job.vs_fp32(path)["mask_iou"]
    budget = {"max_iou_drop": max_iou_drop, "held": 1.0 - iou <= max_iou_drop,
              "iou_drop": round(1.0 - iou, 6), "float_nodes": [], "float_tensors": [],
              "steps": []}
    if budget["held"]:
        return path, info, budget
    job.log("INT8 mask IoU vs FP32 {:.4f}: drop {:.4f} > {:.4f}, ranking activations by the "
            "quantization noise each adds".format(iou, 1.0 - iou, max_iou_drop))
    frames = spread(job.calib_frames, RANK_FRAMES)
    ranking = rank_activations(fp32_path=job.fp32_path, int8_path=path, frames=frames,
                               contract=job.contract, workdir=job.workdir)
    budget.update(ranking_frames=len(frames), ranking=[
        {"tensor": name, "sqnr_db": round(db, 2), "added_noise": float("{:.4g}".format(added))}
        for name, db, added in ranking[:16]],
        start={"iou_vs_fp32": round(iou, 6), "median_ms": _latency(job=job, path=path)})
    best = {"iou": iou, "path": path, "info": info, "nodes": [], "tensors": []}
    _steps(job=job, ranking=[name for name, _, _ in ranking], best=best, budget=budget)
    budget.update(held=1.0 - best["iou"] <= max_iou_drop, iou_drop=round(1.0 - best["iou"], 6),
                  float_nodes=best["nodes"], float_tensors=best["tensors"])
    return best["path"], best["info"], budget


def _steps(*, job: _Job, ranking: List[str], best: dict, budget: dict) -> None:
    """Up to MAX_STEPS re-quantizations with a doubling set of float tensors; updates ``best``."""
    import onnx

    graph = onnx.load(job.fp32_path, load_external_data=False).graph
    nodes, tensors = [], []
    for step in range(1, MAX_STEPS + 1):
        new_tensors = ranking[len(tensors):max(1, 2 * len(tensors))]
        added = [n for t in new_tensors for n in float_nodes_for(tensor=t, graph=graph)]
        added = [n for n in dict.fromkeys(added) if n not in nodes]
        if not added:
            break  # the ranking is exhausted
        nodes, tensors = nodes + added, tensors + new_tensors
        entry = {"step": step, "float_nodes_added": added, "float_tensors_added": new_tensors}
        budget["steps"].append(entry)
        t0 = time.perf_counter()
        try:
            path, info = job.quantize("step{}".format(step), exclude_nodes=nodes)
        except EdgesegError as exc:  # e.g. nothing left to quantize
            entry["error"] = str(exc).splitlines()[0]
            break
        iou = job.vs_fp32(path)["mask_iou"]
        entry.update(iou_vs_fp32=round(iou, 6), iou_drop=round(1.0 - iou, 6),
                     median_ms=_latency(job=job, path=path),
                     seconds=round(time.perf_counter() - t0, 2))
        job.log("budget step {}: {} float nodes, mask IoU vs FP32 {:.4f}, {:.1f} ms".format(
            step, len(nodes), iou, entry["median_ms"]))
        if iou > best["iou"]:
            best.update(iou=iou, path=path, info=info, nodes=list(nodes), tensors=list(tensors))
        if 1.0 - iou <= budget["max_iou_drop"]:
            break
