"""FP16 for GPU targets (CUDA / TensorRT, Jetson): onnxruntime's float16 converter, checked.

The conversion itself is ``onnxruntime.transformers.float16.convert_float_to_float16``; this module
only prepares the graph so that Resize keeps its ``roi`` and ``scales`` in float32, and checks the
result: float32 graph inputs and outputs (the agent feeds and reads float32), Resize roi/scales
float32, topologically sorted, standard domain only, ``onnx.checker``, and a session that runs a
real frame to finite logits before the file is moved into place.

On CPU FP16 is not faster (onnxruntime wraps most CPU kernels in Casts): ``cpu_warning`` words that
with measured numbers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
import uuid
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import onnx
from onnx import TensorProto

from edgeseg.device.contract import Contract
from edgeseg.device.preprocess import preprocess
from edgeseg.device.runner import Runner
from edgeseg.device.sources import Frame

from .errors import EdgesegError, ExportError, UsageError
from .export import attach_metadata, check_standard, default_opset, first_line, save_atomic

GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
RESIZE_ROI, RESIZE_SCALES = 1, 2
FP16_MAX = 65504.0
RANGE_FRAMES = 2  # real frames whose FP32 activations are checked against float16's range
REPORT_HINT = "Export fp32 or int8 for now, and report the model and versions."


def gpu_available() -> bool:
    """True when this onnxruntime has a CUDA or TensorRT execution provider."""
    import onnxruntime

    return any(p in onnxruntime.get_available_providers() for p in GPU_PROVIDERS)


def cpu_warning(*, fp32_ms: float, fp16_ms: float) -> str:
    """The warning printed when FP16 is built for a CPU target, with the measured latencies."""
    speedup = fp32_ms / fp16_ms if fp16_ms > 0 else float("nan")
    return ("FP16 on CPU: median {:.1f} ms vs FP32 {:.1f} ms (speed-up {:.2f}x, as in the "
            "table); FP16 is meant for CUDA/TensorRT targets (Jetson); use fp32 or int8 on CPU"
            .format(fp16_ms, fp32_ms, speedup))


def convert_fp16(*, fp32_path: str, out_path: str, contract: Contract,
                 log: Callable[[str], None], frames: Optional[Sequence] = None) -> dict:
    """Write ``out_path`` (atomically): the FP16 model with float32 inputs/outputs, load-tested.

    ``frames``: real frames (agent ``Frame`` objects); the first ``RANGE_FRAMES`` are checked
    for FP32 activations beyond float16's range and the first is run through the FP16 file
    (CUDA when this onnxruntime has it).  Without frames, a window of the bundled nuclei sample
    is used.  Returns a JSON-able info dict (see the lead's notes / the final report).
    """
    t0 = time.perf_counter()
    fp32 = _load(fp32_path)
    opset = default_opset(fp32)
    folder = _out_folder(out_path)
    probes = _probe_frames(frames)
    batches = [preprocess(f.image, contract) for f in probes]
    activations = _activation_range(fp32_path=fp32_path, batches=batches, folder=folder,
                                    input_name=fp32.graph.input[0].name)
    float_kept = {"io": {"tensors": _float_io(fp32),
                         "why": "keep_io_types: the agent feeds and reads float32"}}
    hoisted = _hoist_resize_constants(fp32)
    blocked = _resize_nodes_with_roi(fp32)
    log("Converting to FP16 (float32 inputs/outputs{})...".format(
        ", {} Resize node(s) with roi kept float32".format(len(blocked)) if blocked else ""))
    casts_before, warnings = _count(fp32, "Cast"), _saturated_weights(fp32)
    model = _convert(fp32, blocked)
    _sort(model)
    del model.metadata_props[:]
    fp16_contract = dataclasses.replace(contract, precision="fp16")
    attach_metadata(model, fp16_contract)
    check_standard(model, opset=opset, stage="FP16 conversion")
    float_kept.update(_check_float(model, hoisted=hoisted, blocked=blocked))
    info = {"opset": opset, "keep_io_types": True, "float_kept": float_kept,
            "cast_nodes": _count(model, "Cast") - casts_before,
            "fp16_initializers": sum(t.data_type == TensorProto.FLOAT16
                                     for t in model.graph.initializer),
            "activation_range": activations, "warnings": warnings}
    del fp32
    info.update(_write_tested(model=model, out_path=out_path, fp32_path=fp32_path,
                              folder=folder, frame=probes[0], batch=batches[0]))
    info["seconds"] = round(time.perf_counter() - t0, 2)
    return info


def _load(path: str) -> onnx.ModelProto:
    if not os.path.isfile(str(path)):
        raise UsageError("The FP32 model {} does not exist.".format(path),
                         "Export fp32 first (edgeseg export --precision fp32) and pass its path.")
    try:
        return onnx.load(str(path))
    except Exception as exc:  # protobuf DecodeError and friends
        raise ExportError("Cannot read the FP32 model {}: {}".format(path, first_line(exc)),
                          "Pass an ONNX file written by 'edgeseg export'.") from exc


def _float_io(model: onnx.ModelProto) -> List[str]:
    inits = {t.name for t in model.graph.initializer}
    return [v.name for v in list(model.graph.input) + list(model.graph.output)
            if v.name not in inits and v.type.tensor_type.elem_type == TensorProto.FLOAT]


def _count(model: onnx.ModelProto, op_type: str) -> int:
    return sum(n.op_type == op_type for n in model.graph.node)


def _resize_float_inputs(model: onnx.ModelProto):
    """(Resize node, input index, tensor name) for every non-empty roi / scales input."""
    for node in model.graph.node:
        if node.op_type == "Resize":
            for i in (RESIZE_ROI, RESIZE_SCALES):
                if len(node.input) > i and node.input[i]:
                    yield node, i, node.input[i]


def _hoist_resize_constants(model: onnx.ModelProto) -> List[str]:
    """Turn Constant nodes that feed only Resize roi/scales into float32 initializers.

    The converter rewrites every Constant node to float16 and would Cast scales back to float32
    (a round trip through float16); an initializer used only as Resize scales stays float32
    (onnxruntime's ALWAYS_FLOAT_INPUTS).  Returns the hoisted tensor names.
    """
    wanted = {name for _, _, name in _resize_float_inputs(model)}
    other_uses = {name for n in model.graph.node for i, name in enumerate(n.input)
                  if not (n.op_type == "Resize" and i in (RESIZE_ROI, RESIZE_SCALES))}
    hoisted, keep = [], []
    for node in model.graph.node:
        attrs = {a.name: a for a in node.attribute}
        if (node.op_type == "Constant" and node.output[0] in wanted and "value" in attrs
                and node.output[0] not in other_uses
                and attrs["value"].t.data_type == TensorProto.FLOAT):
            tensor = onnx.TensorProto()
            tensor.CopyFrom(attrs["value"].t)
            tensor.name = node.output[0]
            model.graph.initializer.append(tensor)
            hoisted.append(node.output[0])
        else:
            keep.append(node)
    if hoisted:
        del model.graph.node[:]
        model.graph.node.extend(keep)
        # a value_info left for an initializer would be rewritten to float16 by the converter
        infos = [v for v in model.graph.value_info if v.name not in set(hoisted)]
        del model.graph.value_info[:]
        model.graph.value_info.extend(infos)
    return hoisted


def _resize_nodes_with_roi(model: onnx.ModelProto) -> List[str]:
    """Resize nodes with a roi input: kept in float32 whole (roi is not an always-float input of
    the converter, and onnxruntime's kernels read roi as float).  Unnamed nodes get a name."""
    names = []
    for index, (node, i, _) in enumerate(_resize_float_inputs(model)):
        if i == RESIZE_ROI:
            if not node.name:
                node.name = "edgeseg_resize_{}".format(index)
            names.append(node.name)
    return names


def _convert(model: onnx.ModelProto, blocked: List[str]) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    converter_log = logging.getLogger("onnxruntime.transformers.float16")
    level = converter_log.level
    converter_log.setLevel(logging.ERROR)  # its "used by both fp32 and fp16" notes are not news
    try:
        return convert_float_to_float16(model, keep_io_types=True,
                                        op_block_list=list(DEFAULT_OP_BLOCK_LIST),
                                        node_block_list=list(blocked))
    except Exception as exc:  # the converter raises assorted types (ValueError, onnx errors...)
        raise ExportError("onnxruntime's float16 converter failed: {}".format(first_line(exc)),
                          REPORT_HINT) from exc
    finally:
        converter_log.setLevel(level)


def _sort(model: onnx.ModelProto) -> None:
    from onnxruntime.transformers.onnx_model import OnnxModel

    try:
        OnnxModel(model).topological_sort()
    except RuntimeError as exc:
        raise ExportError("The FP16 graph cannot be sorted topologically: {}".format(
            first_line(exc)), REPORT_HINT) from exc


def _elem_types(model: onnx.ModelProto) -> Dict[str, int]:
    """Element type of every tensor: initializers, graph inputs, and onnx shape inference."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    except Exception as exc:  # onnx raises InferenceError and others
        raise ExportError("The FP16 model's tensor types are inconsistent: {}".format(
            first_line(exc)), REPORT_HINT) from exc
    graph = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type
             for v in list(graph.input) + list(graph.value_info) + list(graph.output)}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    return types


def _check_float(model: onnx.ModelProto, *, hoisted: List[str], blocked: List[str]) -> dict:
    """Refuse unless graph I/O and every Resize roi/scales are float32 initializers/tensors that
    never passed through float16; returns the ``float_kept`` entries for Resize."""
    bad_io = [v.name for v in list(model.graph.input) + list(model.graph.output)
              if v.type.tensor_type.elem_type != TensorProto.FLOAT]
    if bad_io:
        raise ExportError("The FP16 model's inputs/outputs {} are not float32.".format(
            ", ".join(bad_io)), REPORT_HINT)
    types = _elem_types(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    kept = {"resize_scales": set(), "resize_roi": set()}
    for node, i, name in _resize_float_inputs(model):
        what = "roi" if i == RESIZE_ROI else "scales"
        via = producers.get(name)
        if types.get(name) != TensorProto.FLOAT or (via is not None and via.op_type == "Cast"):
            raise ExportError(
                "Resize {} gets its {} ('{}') {} after FP16 conversion; it must stay "
                "float32.".format(node.name or "(unnamed)", what, name,
                                  "as float16" if types.get(name) != TensorProto.FLOAT
                                  else "cast back from float16"),
                "Resize {} must be a float32 constant for FP16 (computed at run time it passes "
                "through float16); export with a fixed input size and scale factor, or use "
                "fp32/int8.".format(what))
        kept["resize_roi" if i == RESIZE_ROI else "resize_scales"].add(name)
    result = {"resize_scales": {"tensors": sorted(kept["resize_scales"]),
                                "hoisted_constants": sorted(hoisted),
                                "why": "Resize scales must be float32 (ONNX); Constant nodes "
                                       "feeding them became float32 initializers, which the "
                                       "converter keeps (ALWAYS_FLOAT_INPUTS), so they never "
                                       "pass through float16"}}
    if kept["resize_roi"] or blocked:
        result["resize_roi"] = {"tensors": sorted(kept["resize_roi"]), "nodes": sorted(blocked),
                                "why": "a Resize with a roi input runs in float32 "
                                       "(node_block_list): the converter would make roi "
                                       "float16, and onnxruntime reads roi as float"}
    return result


def _saturated_weights(model: onnx.ModelProto) -> List[str]:
    """Warn about float32 weights outside float16's range (the converter clips them)."""
    from onnx import numpy_helper

    names = [t.name for t in model.graph.initializer if t.data_type == TensorProto.FLOAT
             and np.abs(numpy_helper.to_array(t)).max(initial=0.0) > FP16_MAX]
    if not names:
        return []
    return ["{} weight tensor(s) exceed float16's range and were clipped to +-65504 (e.g. {})"
            .format(len(names), names[0])]


def _out_folder(out_path: str) -> str:
    folder = os.path.dirname(os.path.abspath(str(out_path)))
    if not os.path.isdir(folder):
        raise UsageError("The output folder {} does not exist.".format(folder),
                         "Create it or pass another output path.")
    return folder


def _probe_frames(frames: Optional[Sequence]) -> list:
    """Up to RANGE_FRAMES real frames; without any, a window of the bundled nuclei sample."""
    if frames:
        return list(frames)[:RANGE_FRAMES]
    from edgeseg.device.preprocess import to_rgb_uint8

    from .nuclei import load_nuclei

    image, _ = load_nuclei()
    return [Frame(to_rgb_uint8(image[:256, :256]), 0, "nuclei-sample")]


def _activation_range(*, fp32_path: str, batches: list, folder: str, input_name: str) -> dict:
    """Largest |activation| of the FP32 model on real frames; refuse beyond float16's range.

    A GPU computing in FP16 stores every activation as float16; onnxruntime on CPU computes most
    kernels in float32 and would hide an overflow, so the FP32 activations are checked instead
    (onnxruntime's qdq_loss_debug tools expose every intermediate tensor).
    """
    from onnxruntime.quantization.qdq_loss_debug import (collect_activations,
                                                         modify_model_output_intermediate_tensors)

    tmp = os.path.join(folder, ".fp16-range-{}-{}.onnx".format(os.getpid(), uuid.uuid4().hex[:8]))
    try:
        modify_model_output_intermediate_tensors(str(fp32_path), tmp)
        found = collect_activations(tmp, [{input_name: b} for b in batches])
    except Exception as exc:  # onnxruntime raises its own types
        raise ExportError("Cannot measure the FP32 model's activations: {}".format(
            first_line(exc)), REPORT_HINT) from exc
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    peak, where = 0.0, ""
    for name, arrays in found.items():
        for array in arrays:
            value = float(np.max(np.abs(array))) if array.size else 0.0
            value = value if np.isfinite(value) else float("inf")
            if value > peak:
                peak, where = value, name
    if peak > FP16_MAX:
        raise ExportError(
            "The FP32 model's activation '{}' reaches {:.4g} on real frames, beyond float16's "
            "range (65504): an FP16 model would produce inf/NaN there.".format(where, peak),
            "Use fp32 or int8 for this model.")
    return {"frames": len(batches), "abs_max": peak, "tensor": where}


def _write_tested(*, model: onnx.ModelProto, out_path: str, fp32_path: str, folder: str,
                  frame, batch: np.ndarray) -> dict:
    """Save to a temp name, run one real frame (GPU provider when present), then os.replace."""
    tmp = os.path.join(folder, ".fp16-test-{}-{}.onnx".format(os.getpid(), uuid.uuid4().hex[:8]))
    try:
        size = save_atomic(model, tmp)
        runner = Runner(tmp, providers=["cuda", "cpu"] if gpu_available() else ["cpu"])
        out = runner.run(batch)
        if out.dtype != np.float32 or not np.all(np.isfinite(out)):
            raise ExportError(
                "The FP16 model produces {} logits on frame {}.".format(
                    "non-float32" if out.dtype != np.float32 else "non-finite (inf/NaN)",
                    frame.name),
                "Activations overflow float16's range (65504); use fp32 or int8 for this model.")
        reference = Runner(str(fp32_path), providers=["cpu"]).run(batch)
        diff = float(np.max(np.abs(out.astype(np.float64) - reference))) if out.size else 0.0
        os.replace(tmp, str(out_path))
    except EdgesegError:
        raise
    except OSError as exc:
        raise ExportError("Cannot write {}: {}".format(out_path, exc),
                          "Pass an output path in a writable folder.") from exc
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    return {"bytes": size, "providers": list(runner.providers),
            "load_test": {"frame": frame.name, "max_abs_vs_fp32": diff}}
