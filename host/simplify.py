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


def _input_shapes(model_proto: onnx.ModelProto, test_hw=None) -> dict:
    """Concrete test shapes for the random-input check: a symbolic batch becomes 1, a symbolic
    height/width (``--dynamic-hw``) the export size ``test_hw``."""
    inits = {t.name for t in model_proto.graph.initializer}
    shapes = {}
    for value in model_proto.graph.input:
        if value.name not in inits:
            dims = []
            for i, d in enumerate(value.type.tensor_type.shape.dim):
                fallback = int(test_hw[i - 2]) if test_hw and i in (2, 3) else 1
                dims.append(d.dim_value if d.dim_value > 0 else fallback)
            shapes[value.name] = dims
    return shapes


def _symbolic_dims(model_proto: onnx.ModelProto) -> list:
    """Per graph input, the positions of its symbolic dimensions."""
    inits = {t.name for t in model_proto.graph.initializer}
    return [[i for i, d in enumerate(v.type.tensor_type.shape.dim) if d.dim_param]
            for v in model_proto.graph.input if v.name not in inits]


def _batch_is_symbolic(model_proto: onnx.ModelProto) -> bool:
    return all(0 in dims for dims in _symbolic_dims(model_proto))


def _run_onnxsim(model_proto: onnx.ModelProto, test_hw=None) -> Tuple[onnx.ModelProto, bool]:
    import onnxsim

    copy = onnx.ModelProto()
    copy.CopyFrom(model_proto)
    with contextlib.redirect_stdout(sys.stderr):  # onnxsim prints "Checking 0/3..."
        return onnxsim.simplify(copy, check_n=CHECK_N,
                                test_input_shapes=_input_shapes(copy, test_hw),
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


def simplify_model(*, model_proto: onnx.ModelProto, test_hw=None) -> Tuple[onnx.ModelProto, dict]:
    """Returns (model, info); info = {simplified, message, nodes_before, nodes_after}.

    ``test_hw``: the (H, W) onnxsim checks a model with symbolic height/width at.
    """
    opset = default_opset(model_proto)
    nodes_before = len(model_proto.graph.node)
    info = {"simplified": False, "message": "", "nodes_before": nodes_before,
            "nodes_after": nodes_before, "metadata_reattached": False}
    try:
        simplified, check_ok = _run_onnxsim(model_proto, test_hw)
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
    if _symbolic_dims(simplified) != _symbolic_dims(model_proto):
        info["message"] = "onnxsim fixed a symbolic dimension; kept the unsimplified graph."
        return model_proto, info
    info.update(simplified=True, nodes_after=len(simplified.graph.node),
                message="onnxsim {} -> {} nodes.".format(nodes_before, len(simplified.graph.node)))
    return simplified, info
