"""Static INT8 quantization (QDQ, per-channel weights) calibrated on real frames.

Calibration batches are made by the agent's own ``preprocess`` so the ranges match what the device
feeds.  onnxruntime's quantizer is used as is, except: no ``quant_pre_process`` (its symbolic shape
inference fails on these graphs) and no graph optimised for this machine's CPU is ever saved.  The
result must be a plain standard-domain model: the ``com.microsoft`` import the quantizer adds is
dropped when no node uses it, and anything non-standard is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import time
from typing import Callable, List, Optional, Sequence

import numpy as np
import onnx
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                      QuantType, quantize_static)

from edgeseg.device.contract import Contract
from edgeseg.device.preprocess import preprocess
from edgeseg.device.runner import Runner

from .errors import ExportError, UsageError
from .export import attach_metadata, check_standard, default_opset, first_line, save_atomic

MIN_PER_CHANNEL_OPSET = 13  # per-axis QuantizeLinear/DequantizeLinear
CHUNK = 8  # calibration frames per CalibStridedMinMax chunk (bounds memory)
NOISE = ("pre-processing before quantization", "pre-process", "Please consider")


class CalibrationReader(CalibrationDataReader):
    """Feeds ``{input_name: 1xCxHxW float32}`` for each frame, preprocessed like on the device."""

    def __init__(self, *, frames: Sequence, contract: Contract, input_name: Optional[str] = None):
        self.frames = list(frames)
        self.contract = contract
        self.input_name = input_name or contract.input_name
        self._pos, self._end = 0, len(self.frames)

    def get_next(self) -> Optional[dict]:
        if self._pos >= self._end:
            return None
        frame = self.frames[self._pos]
        self._pos += 1
        return {self.input_name: preprocess(frame.image, self.contract)}

    def __len__(self) -> int:
        return len(self.frames)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._pos, self._end = start_index, min(end_index, len(self.frames))

    def rewind(self) -> None:
        self.set_range(0, len(self.frames))


def chunk_size(count: int, limit: int = CHUNK) -> int:
    """Largest stride <= ``limit`` dividing ``count`` (onnxruntime requires an exact division)."""
    return max(d for d in range(1, max(1, min(limit, count)) + 1) if count % d == 0)


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


def quantize_int8(*, fp32_path: str, out_path: str, frames: Sequence, contract: Contract,
                  log: Callable[[str], None], method: str = "minmax",
                  exclude_nodes: Sequence[str] = (), exclude_op_types: Sequence[str] = ()) -> dict:
    """Write ``out_path`` (atomically): the INT8 QDQ model calibrated on ``frames``.

    ``method``: minmax | entropy | percentile.  ``exclude_nodes`` (node names) and
    ``exclude_op_types`` stay in float (no QDQ around them).
    """
    frames = list(frames)
    if not frames:
        raise UsageError("INT8 quantization got no calibration frames.",
                         "Pass --calib with a folder of images or a video from your real input.")
    fp32 = onnx.load(fp32_path)
    opset = default_opset(fp32)
    if opset < MIN_PER_CHANNEL_OPSET:
        raise ExportError(
            "INT8 with per-channel weights needs opset >= {}, the model has opset {}.".format(
                MIN_PER_CHANNEL_OPSET, opset),
            "Export with --opset 13 or newer (17 is the default), or export fp32 only.")
    input_name = fp32.graph.input[0].name
    del fp32
    reader = CalibrationReader(frames=frames, contract=contract, input_name=input_name)
    stride = chunk_size(len(frames))
    log("Calibrating INT8 on {} frames ({} per chunk)...".format(len(frames), stride))
    t0 = time.perf_counter()
    model, quant_warnings = _run_quantizer(fp32_path=fp32_path, out_path=out_path, reader=reader,
                                           stride=stride, method=method,
                                           exclude_nodes=list(exclude_nodes),
                                           exclude_op_types=list(exclude_op_types))
    info = {"calibration_frames": len(frames), "chunk": stride,
            "seconds": round(time.perf_counter() - t0, 2), "warnings": quant_warnings}
    return _finish(model=model, out_path=out_path, contract=contract, opset=opset, frames=frames,
                   info=info)


METHODS = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
           "percentile": CalibrationMethod.Percentile}


def _run_quantizer(*, fp32_path: str, out_path: str, reader: CalibrationReader, stride: int,
                   method: str = "minmax", exclude_nodes=None, exclude_op_types=None):
    """onnxruntime's quantize_static into a temp file beside ``out_path``; (model, warnings)."""
    folder = os.path.dirname(os.path.abspath(out_path))
    raw_path = os.path.join(folder, ".quant-raw-{}.onnx".format(os.getpid()))
    op_types = None
    if exclude_op_types:
        from onnxruntime.quantization.registry import QDQRegistry

        op_types = [t for t in QDQRegistry if t not in set(exclude_op_types)]
    extra = {"CalibStridedMinMax": stride} if method == "minmax" else {}
    try:
        with _captured_logging() as quant_warnings:
            quantize_static(
                fp32_path, raw_path, calibration_data_reader=reader, quant_format=QuantFormat.QDQ,
                per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=METHODS[method], nodes_to_exclude=exclude_nodes or None,
                op_types_to_quantize=op_types, extra_options=extra)
        return onnx.load(raw_path), quant_warnings
    except Exception as exc:  # onnxruntime raises its own types (Fail, InvalidArgument, ...)
        raise ExportError("onnxruntime's quantizer failed: {}".format(first_line(exc)),
                          "Export fp32 only (--precision fp32) and report the model and "
                          "versions.") from exc
    finally:
        with contextlib.suppress(OSError):
            os.unlink(raw_path)


def _finish(*, model: onnx.ModelProto, out_path: str, contract: Contract, opset: int,
            frames: list, info: dict) -> dict:
    """Standard domain only, int8 contract, checker, then a load-and-run test before the rename."""
    info["dropped_domains"] = prune_unused_domains(model)
    del model.metadata_props[:]  # the quantizer's own keys (onnx.infer, ...) are not kept
    int8 = dataclasses.replace(contract, precision="int8")
    attach_metadata(model, int8)
    check_standard(model, opset=opset, stage="INT8 quantization")
    info["qdq_nodes"] = sum(n.op_type in ("QuantizeLinear", "DequantizeLinear")
                            for n in model.graph.node)
    if info["qdq_nodes"] == 0:
        raise ExportError("The quantizer left no QuantizeLinear/DequantizeLinear nodes.",
                          "Nothing was quantized; check the model's operators.")
    folder = os.path.dirname(os.path.abspath(out_path))
    test_path = os.path.join(folder, ".quant-test-{}.onnx".format(os.getpid()))
    try:
        info["bytes"] = save_atomic(model, test_path)
        _load_test(test_path, frames[0], int8)
        os.replace(test_path, out_path)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(test_path)
    info["opset"] = opset
    return info


def _load_test(path: str, frame, contract: Contract) -> None:
    """Load the file in onnxruntime (as the agent does) and run one real frame."""
    runner = Runner(path, providers=["cpu"])
    out = runner.run(preprocess(frame.image, contract))
    if not np.all(np.isfinite(out)):
        raise ExportError("The INT8 model produces non-finite logits on a calibration frame.",
                          "Calibrate on more representative images, or export fp32 only.")
