"""``--target-ort VERSION``: make (or refuse) a model the device's onnxruntime release can read.

An onnxruntime release reads models up to one IR version and one opset of the standard domain
(its documented compatibility matrix, below).  A model whose IR version is newer than needed is
lowered when that is safe (the opset and every tensor type exist in the lower IR version);
anything else is refused naming both versions.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import onnx
from onnx import TensorProto, helper

from .errors import ExportError, UsageError

# onnxruntime release -> (newest standard-domain opset, newest IR version) it reads.
ORT_READS = {
    (1, 10): (15, 8), (1, 11): (16, 8), (1, 12): (17, 8), (1, 13): (17, 8), (1, 14): (18, 8),
    (1, 15): (19, 9), (1, 16): (19, 9), (1, 17): (20, 9), (1, 18): (21, 10), (1, 19): (21, 10),
    (1, 20): (21, 10), (1, 21): (22, 10), (1, 22): (23, 11), (1, 23): (23, 11),
}
DEFAULT_OPSET = 17
STANDARD_DOMAINS = ("", "ai.onnx")
# Tensor element types and the IR version that introduced them.
TYPE_IR = {TensorProto.FLOAT8E4M3FN: 9, TensorProto.FLOAT8E4M3FNUZ: 9, TensorProto.FLOAT8E5M2: 9,
           TensorProto.FLOAT8E5M2FNUZ: 9, TensorProto.UINT4: 10, TensorProto.INT4: 10}


def parse_version(text: str) -> Tuple[int, int]:
    try:
        parts = [int(p) for p in str(text).strip().split(".")[:2]]
    except ValueError:
        parts = []
    if len(parts) != 2:
        raise UsageError("--target-ort {} is not an onnxruntime version.".format(text),
                         "Pass MAJOR.MINOR[.PATCH], e.g. --target-ort 1.16.3.")
    return parts[0], parts[1]


def reads(version: str) -> Tuple[int, int]:
    """(max opset, max IR version) the onnxruntime release ``version`` reads."""
    key = parse_version(version)
    if key in ORT_READS:
        return ORT_READS[key]
    oldest, newest = min(ORT_READS), max(ORT_READS)
    if key < oldest:
        raise UsageError("onnxruntime {} is older than the agent supports (1.10).".format(version),
                         "Install onnxruntime 1.10 or newer on the device.")
    if key > newest:  # newer releases read at least what the newest known one reads
        return ORT_READS[newest]
    return ORT_READS[max(k for k in ORT_READS if k <= key)]


def default_opset(target: Optional[str], exporter_max: int) -> int:
    """The opset used when --opset is not given: 17, or the newest the target reads if lower."""
    opset = min(DEFAULT_OPSET, exporter_max)
    if target:
        opset = min(opset, reads(target)[0])
    return opset


def check_opset(opset: int, target: Optional[str]) -> None:
    if not target:
        return
    max_opset, _ = reads(target)
    if int(opset) > max_opset:
        raise ExportError("--opset {} is newer than onnxruntime {} reads (opset {} at most)."
                          .format(opset, target, max_opset),
                          "Use --opset {} or lower, or a newer onnxruntime on the device."
                          .format(max_opset))


def _lowest_ir_for_opset(opset: int) -> int:
    return min(row[1] for row in helper.VERSION_TABLE if row[2] >= opset)


def _types_used(proto: onnx.ModelProto) -> set:
    graph = proto.graph
    types = {t.data_type for t in graph.initializer}
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        types.add(value.type.tensor_type.elem_type)
    for node in graph.node:
        for attr in node.attribute:
            if attr.name == "to":
                types.add(attr.i)
            if attr.type == onnx.AttributeProto.TENSOR:
                types.add(attr.t.data_type)
    return types


def fit_target(proto: onnx.ModelProto, target: Optional[str], *, what: str) -> List[str]:
    """Check ``proto`` against ``target`` (in place: lowers the IR version when safe).

    Returns the fixes made; raises ExportError naming both versions when it cannot fit.
    """
    if not target:
        return []
    max_opset, max_ir = reads(target)
    for entry in proto.opset_import:
        if entry.domain in STANDARD_DOMAINS and entry.version > max_opset:
            raise ExportError("{} uses opset {}; onnxruntime {} reads opset {} at most.".format(
                what, entry.version, target, max_opset),
                "Export with --opset {} or lower.".format(max_opset))
        if entry.domain not in STANDARD_DOMAINS:
            raise ExportError("{} imports domain {!r}, which onnxruntime {} may not have.".format(
                what, entry.domain, target), "Export standard-domain operators only.")
    if proto.ir_version <= max_ir:
        return []
    opset = max(e.version for e in proto.opset_import if e.domain in STANDARD_DOMAINS)
    needed = max([_lowest_ir_for_opset(opset)] +
                 [TYPE_IR.get(t, 3) for t in _types_used(proto)])
    if needed > max_ir:
        raise ExportError("{} needs ONNX IR version {} (it has {}); onnxruntime {} reads IR "
                          "version {} at most.".format(what, needed, proto.ir_version, target,
                                                       max_ir),
                          "Export with a lower --opset, or use a newer onnxruntime on the device.")
    fix = "{}: IR version lowered from {} to {} for onnxruntime {}".format(
        what, proto.ir_version, max_ir, target)
    proto.ir_version = max_ir
    onnx.checker.check_model(proto)
    return [fix]
