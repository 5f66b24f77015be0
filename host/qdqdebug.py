"""Which quantized activations hurt most: onnxruntime's ``qdq_loss_debug`` on FP32 vs QDQ models.

Both models are augmented to output their intermediate tensors, run on the same preprocessed frames,
matched tensor by tensor (``create_activation_matching``) and scored with
``compute_activation_error``: the cross-model SQNR (``xmodel_err``) of each quantized activation,
in dB (lower = worse).  ``collect_activations`` keeps every tensor of every frame it is given (a
256x256 NestedUNet gives over 0.5 GB per frame for the FP32 model, about twice that for the QDQ
model), so frames are fed one at a time and only per-tensor energy sums are kept between them.
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
    return 10.0 * math.log10(max(signal, eps) / max(noise, eps))


def rank_activations(*, fp32_path: str, int8_path: str, frames: Sequence, contract: Contract,
                     workdir: str) -> List[Tuple[str, float]]:
    """Quantized activation tensors, worst first: [(tensor name, cross-model SQNR in dB)]."""
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
    return sorted(((n, _sqnr_db(s, e)) for n, (s, e) in sums.items()), key=lambda t: t[1])


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
