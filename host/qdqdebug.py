"""Which quantized activations hurt most: onnxruntime's ``qdq_loss_debug`` on FP32 vs QDQ models.

Both models are augmented to output their intermediate tensors, run on the same preprocessed frames,
matched tensor by tensor (``create_activation_matching``) and scored with
``compute_activation_error``: the cross-model error (``xmodel_err``) of each quantized activation,
pooled over the frames as a noise-to-signal ratio.  That error is accumulated: a late tensor carries
the noise of every quantization before it, so ranking by it alone keeps late layers float while the
noise comes from early ones (on a small UNet the reverse order met a budget the direct one missed).
Each tensor is therefore ranked by the noise it *adds*: its ratio minus the worst ratio among the
quantized tensors that feed it.  ``collect_activations`` keeps every tensor of every frame it is
given (a 256x256 NestedUNet gives over 0.5 GB per frame for the FP32 model, about twice that for
the QDQ model), so frames are fed one at a time and only per-tensor energy sums are kept between
them.
"""

from __future__ import annotations

import math
import os
from typing import Dict, List, Sequence, Tuple

import numpy as np
import onnx
from onnxruntime.quantization.qdq_loss_debug import (collect_activations,
                                                     compute_activation_error,
                                                     create_activation_matching,
                                                     modify_model_output_intermediate_tensors)

from edgeseg.device.contract import Contract

from .calibration import CalibrationReader

# The ranking only needs the order of tensors, which a few frames settle; each frame costs a full
# pass of two models that output every tensor, so time (not memory, see above) sets the count.
RANK_FRAMES = 4
# Ops onnxruntime's QDQ quantizer removes by moving their output's QDQ onto their producer
# (QDQRemovableActivation): keeping their output float means keeping the producer float as well.
REMOVABLE = ("Relu", "Clip")
QDQ_OPS = ["QuantizeLinear", "DequantizeLinear"]


def _energy(reference: Sequence[np.ndarray], other: Sequence[np.ndarray]) -> Tuple[float, float]:
    """(signal energy, noise energy): summed over frames, they give the pooled SQNR exactly."""
    ref = np.concatenate([np.ravel(a) for a in reference]).astype(np.float64)
    oth = np.concatenate([np.ravel(a) for a in other]).astype(np.float64)
    return float(np.sum(ref * ref)), float(np.sum((ref - oth) ** 2))


def _sqnr_db(signal: float, noise: float) -> float:
    eps = np.finfo(np.float64).tiny
    return 10.0 * (math.log10(max(signal, eps)) - math.log10(max(noise, eps)))


def rank_activations(*, fp32_path: str, int8_path: str, frames: Sequence, contract: Contract,
                     workdir: str) -> List[Tuple[str, float, float]]:
    """Quantized activation tensors, worst first: [(name, cross-model SQNR dB, added noise)].

    ``added noise``: the tensor's noise-to-signal ratio minus the largest one among the quantized
    tensors upstream of it (see the module text); the list is sorted by it, largest first.
    """
    sums = _error_sums(fp32_path=fp32_path, int8_path=int8_path, frames=frames,
                       contract=contract, workdir=workdir)
    ratio = {name: noise / max(signal, np.finfo(np.float64).tiny)
             for name, (signal, noise) in sums.items()}
    graph = onnx.load(fp32_path, load_external_data=False).graph
    added = {name: ratio[name] - max([ratio[u] for u in _upstream(name, graph, ratio)],
                                     default=0.0) for name in ratio}
    ranked = sorted(ratio, key=lambda n: (-added[n], n))
    return [(n, _sqnr_db(*sums[n]), added[n]) for n in ranked]


def _upstream(tensor: str, graph: onnx.GraphProto, scored: dict) -> List[str]:
    """The scored tensors nearest upstream of ``tensor`` (walking back through unscored ones)."""
    producers = {out: n for n in graph.node for out in n.output}
    found, seen, stack = [], {tensor}, [tensor]
    while stack:
        node = producers.get(stack.pop())
        for name in node.input if node is not None else ():
            if name in seen or not name:
                continue
            seen.add(name)
            (found if name in scored else stack).append(name)
    return found


def _error_sums(*, fp32_path: str, int8_path: str, frames: Sequence, contract: Contract,
                workdir: str) -> Dict[str, List[float]]:
    """{tensor: [signal energy, noise energy]} of the QDQ model against FP32, over ``frames``."""
    aug_fp32 = os.path.join(workdir, "augmented.fp32.onnx")
    aug_int8 = os.path.join(workdir, "augmented.int8.onnx")
    modify_model_output_intermediate_tensors(fp32_path, aug_fp32)
    # Only Q/DQ inputs and outputs of the QDQ model: the pre- and post-QDQ activations.
    modify_model_output_intermediate_tensors(int8_path, aug_int8, op_types_for_saving=QDQ_OPS)
    input_name = onnx.load(fp32_path, load_external_data=False).graph.input[0].name
    sums: Dict[str, List[float]] = {}
    try:
        for frame in frames:
            reader = CalibrationReader(frames=[frame], contract=contract, input_name=input_name)
            float_acts = collect_activations(aug_fp32, reader)
            reader.rewind()
            matched = create_activation_matching(collect_activations(aug_int8, reader), float_acts)
            del float_acts
            matched = {k: v for k, v in matched.items() if "float" in v}
            for name, err in compute_activation_error(matched, err_func=_energy).items():
                total = sums.setdefault(name, [0.0, 0.0])
                total[0] += err["xmodel_err"][0]
                total[1] += err["xmodel_err"][1]
            del matched
    finally:
        for path in (aug_fp32, aug_int8):
            if os.path.exists(path):
                os.unlink(path)
    return sums


def float_nodes_for(*, tensor: str, graph: onnx.GraphProto) -> List[str]:
    """Nodes to exclude so that ``tensor`` is never quantized.

    onnxruntime's QDQ quantizer quantizes a tensor when any of its consumers is quantized (the
    shared DequantizeLinear then feeds every consumer, excluded or not) and when its producer
    quantizes its own output (Conv does; a removable Relu hands its output QDQ to its producer).
    So: every consumer, the producer, and through Relu/Clip the producer's producer.
    """
    names = [n.name for n in graph.node if tensor in n.input]
    producers = {out: n for n in graph.node for out in n.output}
    node = producers.get(tensor)
    while node is not None:
        names.append(node.name)
        if node.op_type not in REMOVABLE:
            break
        node = producers.get(node.input[0])
    return [n for n in dict.fromkeys(names) if n]
