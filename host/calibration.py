"""Calibration data for static INT8: real frames through the agent's preprocessing, within memory.

onnxruntime's MinMax calibrator reduces every activation to a min and a max inside the session, so
its memory does not grow with the frame count; it is still fed in ``CalibStridedMinMax`` chunks.
The histogram calibrators (entropy, percentile) copy every intermediate output of every frame of a
``collect_data`` call to Python (a 256x256 NestedUNet: about 0.6 GB per frame), so their frame count
is capped to what fits in :data:`HISTOGRAM_BUDGET` bytes.

Ranges are calibrated once (:func:`calibrate_ranges`, onnxruntime's own calibrator) and can be
reused by every later quantization of the same model.  :func:`shared_ranges` gives tensors tied
through Concat, Resize and MaxPool one common range (passed to onnxruntime's quantizer as
``TensorQuantOverrides``), so a Concat whose inputs and output share their quantization
parameters runs as a plain copy instead of requantizing every input.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, create_calibrator

from edgeseg.device.contract import Contract
from edgeseg.device.preprocess import preprocess

from .errors import UsageError

CHUNK = 8  # calibration frames per CalibStridedMinMax chunk
HISTOGRAM_BUDGET = int(2.5 * 2 ** 30)  # bytes of activations a histogram calibrator may hold
METHODS = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
           "percentile": CalibrationMethod.Percentile}
HISTOGRAM_METHODS = ("entropy", "percentile")
FLOAT_TYPES = {onnx.TensorProto.FLOAT: 4, onnx.TensorProto.FLOAT16: 2}
# A tensor joins a shared range only while the shared range is at most this many times its own
# calibrated range: it loses at most one bit of its 8 (demo NestedUNet: all within 1.9x).
SHARE_SPREAD = 2.0
TIED_OPS = ("Concat", "Resize", "MaxPool")  # onnxruntime gives Resize/MaxPool out = in params


@dataclasses.dataclass
class Ranges:
    """Activation ranges calibrated once: onnxruntime's ``TensorsData`` and how they were made.

    ``info``: calibration_frames, chunk (and the histogram cap keys), JSON-able.
    """

    method: str
    tensors: object  # onnxruntime.quantization.calibrate.TensorsData
    info: dict
    seconds: float


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


def check_method(method: str) -> CalibrationMethod:
    """onnxruntime's CalibrationMethod for ``method``; UsageError for anything else."""
    if method not in METHODS:
        raise UsageError("Unknown calibration method {!r}.".format(method),
                         "Use one of: {} (auto is chosen by the tuner).".format(", ".join(METHODS)))
    return METHODS[method]


def pinned_shapes(*, model: onnx.ModelProto, contract: Contract) -> dict:
    """ONNX shape inference with the input pinned to 1xCxHxW of the contract: {name: TypeProto.Tensor}."""
    pinned = onnx.ModelProto()
    pinned.CopyFrom(model)
    dims = pinned.graph.input[0].type.tensor_type.shape.dim
    for dim, value in zip(dims, [1, contract.channels, contract.height, contract.width]):
        dim.Clear()
        dim.dim_value = value
    graph = onnx.shape_inference.infer_shapes(pinned).graph
    return {i.name: i.type.tensor_type for i in
            list(graph.input) + list(graph.value_info) + list(graph.output)}


def activation_bytes(*, model: onnx.ModelProto, contract: Contract) -> int:
    """Bytes of float tensors one frame produces (ONNX shape inference at the contract's size).

    A tensor whose shape stays unknown counts as large as the largest known one (an over-estimate).
    """
    known = pinned_shapes(model=model, contract=contract)
    inits = {t.name for t in model.graph.initializer}
    names = [model.graph.input[0].name] + [o for n in model.graph.node for o in n.output if o]
    sizes = [_tensor_bytes(known.get(name)) for name in dict.fromkeys(names)
             if name not in inits]
    largest = max([s for s in sizes if s is not None], default=0)
    return int(sum(largest if s is None else s for s in sizes))


def shape_of(tensor) -> Optional[list]:
    """The static shape of a TypeProto.Tensor, or None when any dimension is unknown."""
    if tensor is None or not tensor.HasField("shape"):
        return None
    shape = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
    return None if None in shape else shape


def _tensor_bytes(tensor) -> Optional[int]:
    """Bytes of one float tensor, 0 for other types (not calibrated), None when unknown."""
    if tensor is not None and tensor.elem_type and tensor.elem_type not in FLOAT_TYPES:
        return 0
    shape = shape_of(tensor)
    if shape is None or not tensor.elem_type:
        return None
    return FLOAT_TYPES[tensor.elem_type] * int(np.prod(shape))


def spread(items: Sequence, count: int) -> list:
    """``count`` items spread evenly over ``items`` (first and last included)."""
    items = list(items)
    if count >= len(items):
        return items
    picks = np.linspace(0, len(items) - 1, num=count).round().astype(int)
    return [items[i] for i in picks]


def plan_calibration(*, frames: Sequence, method: str, model: onnx.ModelProto,
                     contract: Contract, budget: Optional[int] = None) -> Tuple[list, dict, dict]:
    """The frames to calibrate on, their info, and onnxruntime's ``extra_options``.

    MinMax: every frame, in ``CalibStridedMinMax`` chunks.  Histogram methods: at most
    ``budget // activation_bytes`` frames (at least 1), spread over the given ones, in one pass.
    """
    check_method(method)
    frames = list(frames)
    if method not in HISTOGRAM_METHODS:
        stride = chunk_size(len(frames))
        return frames, {"calibration_frames": len(frames), "chunk": stride}, {
            "CalibStridedMinMax": stride}
    budget = HISTOGRAM_BUDGET if budget is None else int(budget)
    per_frame = activation_bytes(model=model, contract=contract)
    cap = max(1, budget // max(1, per_frame))
    used = spread(frames, cap)
    info = {"calibration_frames": len(used), "chunk": len(used),
            "activation_bytes_per_frame": per_frame, "histogram_budget_bytes": budget}
    if len(used) < len(frames):
        info["capped_from"] = len(frames)
    return used, info, {}


def quantized_op_types(exclude_op_types: Sequence[str] = ()) -> Optional[List[str]]:
    """``op_types_to_quantize`` for quantize_static: None (its default) when nothing is excluded.

    With exclusions only its QDQ operators are kept, so Concat (a QOperator-only type) is not
    quantized either and an excluded Resize never sits between DequantizeLinear and QuantizeLinear.
    """
    from onnxruntime.quantization.registry import QDQRegistry

    if not exclude_op_types:
        return None
    return [t for t in QDQRegistry if t not in set(exclude_op_types)]


def calibrated_op_types() -> List[str]:
    """The op types quantize_static calibrates by default (QOperator and QDQ registries)."""
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return sorted(set(QLinearOpsRegistry) | set(QDQRegistry))


def calibrate_ranges(*, model_path: str, reader: CalibrationReader, method: str, stride: int,
                     op_types: Sequence[str], folder: str) -> object:
    """onnxruntime's calibrator on ``model_path``, fed in chunks of ``stride``: its TensorsData.

    The same calls as ``quantize_static`` makes (create_calibrator, collect_data per
    ``CalibStridedMinMax`` chunk, compute_data); the augmented model is written into ``folder``.
    """
    # The histogram calibrators print their progress; stdout is for --json alone.
    with contextlib.redirect_stdout(sys.stderr):
        calibrator = create_calibrator(
            model_path, list(op_types),
            augmented_model_path=os.path.join(folder, "augmented.onnx"),
            calibrate_method=check_method(method), providers=["CPUExecutionProvider"])
        try:
            for start in range(0, len(reader), max(1, stride)):
                reader.set_range(start_index=start, end_index=start + max(1, stride))
                calibrator.collect_data(reader)
            return calibrator.compute_data()
        finally:
            reader.rewind()
            del calibrator


def timed_ranges(*, method: str, info: dict, **kwargs) -> Ranges:
    """:func:`calibrate_ranges` wrapped in a :class:`Ranges` with its wall time."""
    t0 = time.perf_counter()
    tensors = calibrate_ranges(method=method, **kwargs)
    return Ranges(method=method, tensors=tensors, info=dict(info),
                  seconds=round(time.perf_counter() - t0, 2))


def _span(data) -> Tuple[float, float]:
    low, high = data.range_value
    return min(0.0, float(np.min(low))), max(0.0, float(np.max(high)))


def _tied(node, inits) -> List[str]:
    """Activation tensors whose quantization parameters ``node`` ties together."""
    if node.op_type == "Concat":
        names = list(node.input) + [node.output[0]]
    else:
        names = [node.input[0], node.output[0]]
    return [n for n in names if n and n not in inits]


def share_groups(*, model: onnx.ModelProto, tensors, skip_nodes: Sequence[str] = (),
                 skip_ops: Sequence[str] = (),
                 max_spread: Optional[float] = None) -> List[List[str]]:
    """Groups (2+ names) of calibrated tensors tied through Concat/Resize/MaxPool.

    Nodes are taken in graph order; a node's tensors join one group only when the union of
    their groups' ranges is at most ``max_spread`` (default :data:`SHARE_SPREAD`) times the
    narrowest member's own range.
    """
    max_spread = SHARE_SPREAD if max_spread is None else max_spread
    inits = {t.name for t in model.graph.initializer}
    parent: Dict[str, str] = {}
    spans = {name: _span(tensors[name]) for name in tensors}
    state = {name: (lo, hi, hi - lo) for name, (lo, hi) in spans.items()}  # root: lo, hi, narrow

    def find(name):
        while parent.get(name, name) != name:
            name = parent[name]
        return name

    for node in model.graph.node:
        if node.op_type not in TIED_OPS or node.op_type in skip_ops or node.name in skip_nodes:
            continue
        roots = list(dict.fromkeys(find(n) for n in _tied(node, inits) if n in state))
        if len(roots) < 2:
            continue
        lo = min(state[r][0] for r in roots)
        hi = max(state[r][1] for r in roots)
        narrow = min(state[r][2] for r in roots)
        if hi - lo > max_spread * narrow:
            continue
        for root in roots[1:]:
            parent[root] = roots[0]
        state[roots[0]] = (lo, hi, narrow)
    groups: Dict[str, List[str]] = {}
    for name in state:
        groups.setdefault(find(name), []).append(name)
    return [sorted(g) for g in groups.values() if len(g) > 1]


def shared_ranges(*, model: onnx.ModelProto, tensors, skip_nodes: Sequence[str] = (),
                  skip_ops: Sequence[str] = (),
                  max_spread: Optional[float] = None) -> Tuple[dict, dict]:
    """onnxruntime ``TensorQuantOverrides`` giving each group one range, and a summary of them."""
    max_spread = SHARE_SPREAD if max_spread is None else max_spread
    groups = share_groups(model=model, tensors=tensors, skip_nodes=skip_nodes,
                          skip_ops=skip_ops, max_spread=max_spread)
    overrides, member = {}, {}
    for index, group in enumerate(groups):
        lo = min(_span(tensors[n])[0] for n in group)
        hi = max(_span(tensors[n])[1] for n in group)
        for name in group:
            member[name] = index
            overrides[name] = [{"rmin": np.array(lo, np.float32),
                                "rmax": np.array(hi, np.float32)}]
    inits = {t.name for t in model.graph.initializer}
    concats = [n for n in model.graph.node if n.op_type == "Concat"]
    whole = sum(len({member.get(t) for t in _tied(n, inits)}) == 1
                and member.get(n.output[0]) is not None for n in concats)
    return overrides, {"groups": len(groups), "tensors": sum(len(g) for g in groups),
                       "concats": whole, "of_concats": len(concats), "max_spread": max_spread}
