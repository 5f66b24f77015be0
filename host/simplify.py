"""onnxsim on the exported graph; on any onnxsim failure the unsimplified graph is kept.

A simplified graph must still be what edgeseg promises: the same opset, only the standard domain,
a symbolic batch dimension and the contract in ``metadata_props`` (re-attached if onnxsim dropped
it).  onnxsim's own bookkeeping keys (``onnxsim.*``) are not kept in the artifact.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Tuple

import onnx

from .errors import ExportError
from .export import check_standard, default_opset, first_line, metadata_of

CHECK_N = 3
CHECK_RTOL = 1e-3  # onnxsim's default 1e-4 rejects benign reorderings in deep nets
CHECK_ATOL = 1e-4
ONNXSIM_PREFIX = "onnxsim."


def _input_shapes(model_proto: onnx.ModelProto) -> dict:
    """Concrete test shapes for the random-input check: symbolic dims (the batch) become 1."""
    inits = {t.name for t in model_proto.graph.initializer}
    shapes = {}
    for value in model_proto.graph.input:
        if value.name not in inits:
            shapes[value.name] = [d.dim_value if d.dim_value > 0 else 1
                                  for d in value.type.tensor_type.shape.dim]
    return shapes


def _batch_is_symbolic(model_proto: onnx.ModelProto) -> bool:
    inits = {t.name for t in model_proto.graph.initializer}
    for value in model_proto.graph.input:
        if value.name not in inits:
            dims = value.type.tensor_type.shape.dim
            if not dims or not dims[0].dim_param:
                return False
    return True


def _run_onnxsim(model_proto: onnx.ModelProto) -> Tuple[onnx.ModelProto, bool]:
    import onnxsim

    copy = onnx.ModelProto()
    copy.CopyFrom(model_proto)
    with contextlib.redirect_stdout(sys.stderr):  # onnxsim prints "Checking 0/3..."
        return onnxsim.simplify(copy, check_n=CHECK_N, test_input_shapes=_input_shapes(copy),
                                check_rtol=CHECK_RTOL, check_atol=CHECK_ATOL, certify=False)


def _restore_metadata(simplified: onnx.ModelProto, original: onnx.ModelProto) -> bool:
    """Put back the original metadata_props exactly; True if onnxsim had lost any of them."""
    before = metadata_of(original)
    after = metadata_of(simplified)
    lost = any(after.get(k) != v for k, v in before.items())
    del simplified.metadata_props[:]
    for key, value in before.items():
        prop = simplified.metadata_props.add()
        prop.key, prop.value = key, value
    return lost


def simplify_model(*, model_proto: onnx.ModelProto) -> Tuple[onnx.ModelProto, dict]:
    """Returns (model, info); info = {simplified, message, nodes_before, nodes_after}."""
    opset = default_opset(model_proto)
    nodes_before = len(model_proto.graph.node)
    info = {"simplified": False, "message": "", "nodes_before": nodes_before,
            "nodes_after": nodes_before, "metadata_reattached": False}
    try:
        simplified, check_ok = _run_onnxsim(model_proto)
    except Exception as exc:  # onnxsim raises RuntimeError, ValueError, onnx errors, ...
        info["message"] = "onnxsim failed ({}: {}); kept the unsimplified graph.".format(
            type(exc).__name__, first_line(exc))
        return model_proto, info
    if not check_ok:
        info["message"] = ("onnxsim's check on random inputs found the simplified graph differs "
                           "from the exported one; kept the unsimplified graph.")
        return model_proto, info
    info["metadata_reattached"] = _restore_metadata(simplified, model_proto)
    try:
        check_standard(simplified, opset=opset, stage="onnxsim")
    except ExportError as exc:
        info["message"] = "{} Kept the unsimplified graph.".format(exc.message)
        return model_proto, info
    if not _batch_is_symbolic(simplified):
        info["message"] = "onnxsim fixed the batch dimension; kept the unsimplified graph."
        return model_proto, info
    info.update(simplified=True, nodes_after=len(simplified.graph.node),
                message="onnxsim {} -> {} nodes.".format(nodes_before, len(simplified.graph.node)))
    return simplified, info
