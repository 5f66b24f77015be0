"""INT8 quantization: static QDQ with per-channel weights calibrated on real frames, or dynamic.

Calibration batches are made by the agent's own ``preprocess`` (see :mod:`.calibration`) so the
ranges match what the device feeds.  onnxruntime's quantizer is used as is, after its own
pre-processing step run with ONNX shape inference only: its symbolic shape inference fails on these
graphs ("Incomplete symbolic shape inference") and its optimisation step would save a graph
optimised for this machine's CPU and stamp onnxruntime-only domains into the opset imports.  The
result must be a plain standard-domain model: imports no node uses are dropped, anything
non-standard is refused, and every file is loaded and run in the agent's Runner before it is kept.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import os
import shutil
import sys
import tempfile
import time
from typing import Callable, List, Optional, Sequence

import numpy as np
import onnx
from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from edgeseg.device.contract import Contract
from edgeseg.device.preprocess import preprocess
from edgeseg.device.runner import Runner

from .calibration import (CHUNK, METHODS, TIED_OPS, CalibrationReader, Ranges,
                          calibrated_op_types, check_method, chunk_size, pinned_shapes,
                          plan_calibration, quantized_op_types, shape_of, shared_ranges,
                          timed_ranges)
from .errors import ExportError, UsageError
from .export import attach_metadata, check_standard, default_opset, first_line, save_atomic

__all__ = ["CHUNK", "METHODS", "MIN_PER_CHANNEL_OPSET", "CalibrationReader", "Ranges",
           "calibrate_int8", "chunk_size", "conv_share", "granularity", "prune_unused_domains",
           "quantize_dynamic_int8", "quantize_int8"]

MIN_PER_CHANNEL_OPSET = 13  # per-axis QuantizeLinear/DequantizeLinear
NOISE = ("pre-processing before quantization", "pre-process", "Please consider")
CONV_OPS = ("Conv",)  # what quantize_dynamic turns into ConvInteger
MATMUL_OPS = ("MatMul", "Gemm")
CONV_DOMINATED = 0.5  # share of multiply-adds in Conv above which dynamic INT8 is refused
# onnxruntime >= 1.2x reads calibrated ranges back from a file: calibrate once, quantize often
CACHE_SUPPORTED = "calibration_cache_path" in inspect.signature(quantize_static).parameters
PREPROCESS = {"symbolic_shape": "skipped (incomplete on these graphs)",
              "optimization": "skipped (would save a graph optimised for this CPU)",
              "onnx_shape_inference": True}


def prune_unused_domains(model_proto: onnx.ModelProto) -> List[str]:
    """Drop opset imports of domains no node uses; returns the dropped domain names."""
    used = {n.domain for n in model_proto.graph.node} | {"", "ai.onnx"}
    keep = [e for e in model_proto.opset_import if e.domain in used]
    dropped = [e.domain for e in model_proto.opset_import if e.domain not in used]
    del model_proto.opset_import[:]
    model_proto.opset_import.extend(keep)
    return dropped


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: List[str] = []

    def emit(self, record):
        text = record.getMessage().strip()
        if text and not any(n in text for n in NOISE) and text not in self.messages:
            self.messages.append(text)


@contextlib.contextmanager
def _captured_logging():
    """Route the quantizer's ``logging`` warnings into a list instead of the console."""
    root = logging.getLogger()
    handler, old_level = _Collect(), root.level
    saved = root.handlers[:]
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield handler.messages
    finally:
        root.handlers[:] = saved
        root.setLevel(old_level)


@contextlib.contextmanager
def _scratch(out_path: str):
    """A hidden temp folder beside ``out_path`` (same file system for the final rename), removed after."""
    folder = tempfile.mkdtemp(prefix=".quant-", dir=os.path.dirname(os.path.abspath(out_path)))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _check_opset(opset: int) -> None:
    if opset < MIN_PER_CHANNEL_OPSET:
        raise ExportError(
            "INT8 with per-channel weights needs opset >= {}, the model has opset {}.".format(
                MIN_PER_CHANNEL_OPSET, opset),
            "Export with --opset 13 or newer (17 is the default), or export fp32 only.")


def calibrate_int8(*, fp32_path: str, frames: Sequence, contract: Contract,
                   log: Callable[[str], None], method: str = "minmax") -> Ranges:
    """Calibrate once: the activation ranges every later :func:`quantize_int8` can reuse.

    Not JSON: pass it as ``quantize_int8(..., ranges=...)``; its ``info`` and ``seconds`` are.
    """
    fp32, used, info, stride = _plan(fp32_path=fp32_path, frames=frames, method=method,
                                     contract=contract)
    reader = CalibrationReader(frames=used, contract=contract, input_name=fp32.graph.input[0].name)
    del fp32
    with _scratch(fp32_path) as scratch:
        source, _ = _preprocess(fp32_path=fp32_path, folder=scratch)
        return _calibrate(source=source, reader=reader, method=method, stride=stride,
                          folder=scratch, info=info, log=log)


def _calibrate(*, source: str, reader: CalibrationReader, method: str, stride: int, folder: str,
               info: dict, log: Callable[[str], None]) -> Ranges:
    log("Calibrating INT8 ({}) on {} frames{}...".format(
        method, len(reader), " ({} per chunk)".format(stride) if stride < len(reader) else ""))
    return timed_ranges(model_path=source, reader=reader, method=method, stride=stride,
                        op_types=calibrated_op_types(), folder=folder, info=info)


def _plan(*, fp32_path: str, frames: Sequence, method: str, contract: Contract):
    """(fp32 proto, frames used, calibration info, chunk stride) after the argument checks."""
    frames = list(frames)
    if not frames:
        raise UsageError("INT8 quantization got no calibration frames.",
                         "Pass --calib with a folder of images or a video from your real input.")
    check_method(method)
    fp32 = onnx.load(fp32_path)
    _check_opset(default_opset(fp32))
    used, info, extra = plan_calibration(frames=frames, method=method, model=fp32,
                                         contract=contract)
    return fp32, used, info, extra.get("CalibStridedMinMax", len(used))


def quantize_int8(*, fp32_path: str, out_path: str, frames: Sequence, contract: Contract,
                  log: Callable[[str], None], method: str = "minmax",
                  exclude_nodes: Sequence[str] = (), exclude_op_types: Sequence[str] = (),
                  share_scales: bool = True, ranges: Optional[Ranges] = None) -> dict:
    """Write ``out_path`` (atomically): the INT8 QDQ model calibrated on ``frames``.

    ``method``: minmax | entropy | percentile.  ``exclude_nodes`` (node names) and
    ``exclude_op_types`` stay in float (no QDQ around them).  ``share_scales``: tensors tied
    through Concat/Resize/MaxPool share one range where their ranges are alike
    (``info["shared_scales"]``).  ``ranges``: from :func:`calibrate_int8` on this model with this
    ``method``; then nothing is calibrated again (``frames`` only load-test the file).
    """
    fp32, used, info, stride = _plan(fp32_path=fp32_path, frames=frames, method=method,
                                     contract=contract)
    opset = default_opset(fp32)
    if ranges is not None:
        _check_ranges(ranges=ranges, method=method, model=fp32)
        info = dict(ranges.info)
    reader = CalibrationReader(frames=used, contract=contract, input_name=fp32.graph.input[0].name)
    t0 = time.perf_counter()
    with _scratch(out_path) as scratch:
        source, info["preprocess"] = _preprocess(fp32_path=fp32_path, folder=scratch)
        info["ranges"] = "reused" if ranges is not None and CACHE_SUPPORTED else "calibrated"
        if ranges is None and (share_scales or CACHE_SUPPORTED):
            ranges = _calibrate(source=source, reader=reader, method=method, stride=stride,
                                folder=scratch, info=info, log=log)
        elif ranges is None:
            log("Calibrating INT8 ({}) on {} frames...".format(method, len(used)))
        extra = {"CalibStridedMinMax": stride} if stride < len(used) else {}
        op_types = quantized_op_types(exclude_op_types)
        info["shared_scales"] = {"enabled": False}
        if share_scales:
            extra["TensorQuantOverrides"], info["shared_scales"] = shared_ranges(
                model=fp32, tensors=ranges.tensors, skip_nodes=exclude_nodes,
                skip_ops=[t for t in TIED_OPS if op_types is not None and t not in op_types])
            info["shared_scales"]["enabled"] = True
        del fp32
        model, warnings = _run_quantizer(
            source=source, raw_path=os.path.join(scratch, "raw.onnx"), reader=reader,
            method=method, extra=extra, exclude_nodes=list(exclude_nodes), op_types=op_types,
            ranges=ranges, scratch=scratch)
        if "capped_from" in info:
            warnings.append("{} calibration used {} of {} frames (activation memory cap)".format(
                method, info["calibration_frames"], info["capped_from"]))
        info.update(method=method, warnings=warnings)
        info = _finish(model=model, out_path=out_path, scratch=scratch, contract=contract,
                       precision="int8", opset=opset, batch=preprocess(used[0].image, contract),
                       info=info)
    info["seconds"] = round(time.perf_counter() - t0, 2)
    return info


def _check_ranges(*, ranges: Ranges, method: str, model: onnx.ModelProto) -> None:
    names = {model.graph.input[0].name} | {o for n in model.graph.node for o in n.output}
    if ranges.method != method or not set(ranges.tensors.keys()) <= names:
        raise UsageError(
            "The calibrated ranges given do not belong to this model and method ({}).".format(
                method), "Calibrate with calibrate_int8 on the same FP32 file and method.")


def _preprocess(*, fp32_path: str, folder: str):
    """onnxruntime's quant_pre_process, shape inference only; (path to quantize, info)."""
    out = os.path.join(folder, "pre.onnx")
    info = dict(PREPROCESS)
    try:
        with _captured_logging():
            quant_pre_process(fp32_path, out, skip_optimization=True, skip_symbolic_shape=True,
                              skip_onnx_shape=False)
        return out, info
    except Exception as exc:  # onnxruntime/onnx raise their own types
        info.update(onnx_shape_inference=False,
                    failed="pre-processing failed ({}); quantized the model as exported".format(
                        first_line(exc)))
        return fp32_path, info


def _run_quantizer(*, source: str, raw_path: str, reader: CalibrationReader, method: str,
                   extra: dict, exclude_nodes: list, op_types: list, ranges: Optional[Ranges],
                   scratch: str):
    """onnxruntime's quantize_static into ``raw_path``; (model, warnings).

    With ``ranges`` and an onnxruntime that reads a calibration cache, the ranges go in through
    that cache and nothing is calibrated again; otherwise quantize_static calibrates on ``reader``.
    """
    cache = {}
    if ranges is not None and CACHE_SUPPORTED:
        from onnxruntime.quantization.calibrate import save_tensors_data

        cache["calibration_cache_path"] = os.path.join(scratch, "ranges.json")
        save_tensors_data(ranges.tensors, cache["calibration_cache_path"])
    try:
        with _captured_logging() as quant_warnings:
            quantize_static(
                source, raw_path, calibration_data_reader=reader, quant_format=QuantFormat.QDQ,
                per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=METHODS[method], nodes_to_exclude=exclude_nodes or None,
                op_types_to_quantize=op_types, extra_options=extra, **cache)
        return onnx.load(raw_path), list(quant_warnings)
    except Exception as exc:  # onnxruntime raises its own types (Fail, InvalidArgument, ...)
        raise ExportError("onnxruntime's quantizer failed: {}".format(first_line(exc)),
                          "Export fp32 only (--precision fp32) and report the model and "
                          "versions.") from exc


def _finish(*, model: onnx.ModelProto, out_path: str, scratch: str, contract: Contract,
            precision: str, opset: int, batch: np.ndarray, info: dict) -> dict:
    """Standard domain only, contract, checker, then a load-and-run test before the rename."""
    info["dropped_domains"] = prune_unused_domains(model)
    del model.metadata_props[:]  # the quantizer's own keys (onnx.infer, ...) are not kept
    final = dataclasses.replace(contract, precision=precision)
    attach_metadata(model, final)
    check_standard(model, opset=opset, stage="INT8 quantization")
    info["domains"] = sorted({e.domain or "ai.onnx" for e in model.opset_import})
    if precision == "int8":
        info["qdq_nodes"] = sum(n.op_type in ("QuantizeLinear", "DequantizeLinear")
                                for n in model.graph.node)
        info["granularity"] = granularity(model)
        if info["qdq_nodes"] == 0:
            raise ExportError("The quantizer left no QuantizeLinear/DequantizeLinear nodes.",
                              "Nothing was quantized; check the model's operators.")
    test_path = os.path.join(scratch, "test.onnx")
    info["bytes"] = save_atomic(model, test_path)
    _load_test(test_path, batch, precision)
    os.replace(test_path, out_path)
    info["opset"] = opset
    return info


def _load_test(path: str, batch: np.ndarray, precision: str) -> None:
    """Load the file in onnxruntime (as the agent does) and run one batch."""
    out = Runner(path, providers=["cpu"]).run(batch)
    if not np.all(np.isfinite(out)):
        raise ExportError("The {} model produces non-finite logits.".format(precision),
                          "Calibrate on more representative images, or export fp32 only.")


def granularity(model: onnx.ModelProto) -> dict:
    """What the file holds: weight DequantizeLinear scales per channel (1-D) or per tensor (scalar)."""
    inits = {t.name: t for t in model.graph.initializer}
    counts = {"weights": [0, 0], "activations": [0, 0]}
    axes = set()
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        data = inits.get(node.input[0])
        if data is not None and data.data_type == onnx.TensorProto.INT32:
            continue  # biases follow their weights' granularity
        scale = inits.get(node.input[1])
        per_axis = scale is not None and len(scale.dims) == 1  # the spec: 1-D scale = per axis
        counts["weights" if data is not None else "activations"][0 if per_axis else 1] += 1
        if per_axis and data is not None:
            axes.update(a.i for a in node.attribute if a.name == "axis")
    weights, acts = counts["weights"], counts["activations"]
    return {"weights": _kind(*weights), "per_channel": weights[0], "per_tensor": weights[1],
            "axes": sorted(axes), "activations": _kind(*acts)}


def _kind(per_channel: int, per_tensor: int) -> str:
    if per_channel and per_tensor:
        return "mixed"
    return "per-channel" if per_channel else "per-tensor" if per_tensor else "none"


def conv_share(*, model: onnx.ModelProto, contract: Contract) -> dict:
    """Share of Conv among the multiply-adds of Conv/MatMul/Gemm (node counts if shapes are unknown)."""
    shapes = pinned_shapes(model=model, contract=contract)
    shapes.update({t.name: list(t.dims) for t in model.graph.initializer})
    macs = {"conv": 0, "matmul": 0}
    nodes = [n for n in model.graph.node if n.op_type in CONV_OPS + MATMUL_OPS]
    for node in nodes:
        kind = "conv" if node.op_type in CONV_OPS else "matmul"
        count = _macs(node, shapes)
        if count is None:
            conv = sum(n.op_type in CONV_OPS for n in nodes)
            return {"share": conv / max(1, len(nodes)), "basis": "nodes", "conv_nodes": conv,
                    "matmul_nodes": len(nodes) - conv}
        macs[kind] += count
    conv = sum(n.op_type in CONV_OPS for n in nodes)
    return {"share": macs["conv"] / max(1, sum(macs.values())), "basis": "multiply-adds",
            "conv_nodes": conv, "matmul_nodes": len(nodes) - conv, "macs": macs}


def _macs(node, shapes: dict) -> Optional[int]:
    """Multiply-adds of one Conv/MatMul/Gemm from its output and weight shapes; None if unknown."""
    def shape(name):
        found = shapes.get(name)
        return found if isinstance(found, list) else shape_of(found)

    out, weight = shape(node.output[0]), shape(node.input[1])
    if out is None or weight is None:
        return None
    if node.op_type in CONV_OPS:
        return int(np.prod(out)) * int(np.prod(weight[1:]))
    trans_b = any(a.name == "transB" and a.i for a in node.attribute)
    k = weight[-1] if trans_b or len(weight) == 1 else weight[-2]
    return int(np.prod(out)) * int(k)


def _refuse_conv_dominated(share: dict) -> None:
    raise ExportError(
        "Dynamic INT8 would turn this convolution network's Conv nodes ({:.0%} of its {}) into "
        "ConvInteger, which some onnxruntime builds cannot load (onnxruntime-gpu, older ARM "
        "builds) and which runs slower than FP32 on CPU.".format(share["share"], share["basis"]),
        "Use --precision int8 (static, calibrated on your images), or pass --force to build "
        "int8-dynamic anyway.")


def _run_dynamic(*, fp32_path: str, raw_path: str, weight_type: QuantType):
    """onnxruntime's quantize_dynamic into ``raw_path``; (model, warnings, integer op types)."""
    try:
        with _captured_logging() as warnings:
            quantize_dynamic(fp32_path, raw_path, weight_type=weight_type)
    except Exception as exc:  # onnxruntime raises its own types
        raise ExportError("onnxruntime's dynamic quantizer failed: {}".format(first_line(exc)),
                          "Use --precision int8 (static) or fp32.") from exc
    model = onnx.load(raw_path)
    integer_ops = sorted({n.op_type for n in model.graph.node if n.op_type.endswith("Integer")})
    if not integer_ops:
        raise ExportError("Dynamic quantization left no ConvInteger/MatMulInteger node.",
                          "Nothing was quantized; use --precision int8 (static) or fp32.")
    return model, list(warnings), integer_ops


def quantize_dynamic_int8(*, fp32_path: str, out_path: str, contract: Contract,
                          log: Callable[[str], None], force: bool = False,
                          frames: Optional[Sequence] = None) -> dict:
    """Write ``out_path``: dynamic INT8 (weights quantized, activations at run time).

    Refused for conv-dominated models unless ``force``.  The file is load-tested on the first of
    ``frames`` (or a zero batch when none are given) in the agent's Runner.
    """
    fp32 = onnx.load(fp32_path)
    opset = default_opset(fp32)
    share = conv_share(model=fp32, contract=contract)
    del fp32
    dominated = share["share"] > CONV_DOMINATED
    if dominated and not force:
        _refuse_conv_dominated(share)
    # ConvInteger with int8 weights has no CPU kernel in older onnxruntime (1.16: NOT_IMPLEMENTED)
    # and runs about 3x slower than with uint8 weights in 1.32.
    weight_type = QuantType.QUInt8 if share["conv_nodes"] else QuantType.QInt8
    log("Quantizing dynamic INT8 ({} weights)...".format(weight_type.name))
    t0 = time.perf_counter()
    frames = list(frames or [])
    batch = (preprocess(frames[0].image, contract) if frames else
             np.zeros((1, contract.channels, contract.height, contract.width), np.float32))
    with _scratch(out_path) as scratch:
        model, warnings, integer_ops = _run_dynamic(
            fp32_path=fp32_path, raw_path=os.path.join(scratch, "raw.onnx"),
            weight_type=weight_type)
        info = {"method": "dynamic", "weight_type": weight_type.name, "conv_share": share,
                "forced": bool(force and dominated), "warnings": warnings,
                "integer_ops": integer_ops, "load_test": "frame" if frames else "zeros"}
        info = _finish(model=model, out_path=out_path, scratch=scratch, contract=contract,
                       precision="int8-dynamic", opset=opset, batch=batch, info=info)
    info["seconds"] = round(time.perf_counter() - t0, 2)
    return info
