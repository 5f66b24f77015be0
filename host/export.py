"""PyTorch model -> one self-contained, standard-domain ONNX file carrying the edgeseg contract.

The TorchScript exporter is the default (``--exporter dynamo`` needs onnxscript and writes opset 18
or newer; see ``exporters.py``).  Whatever torch writes is checked afterwards: the opset asked for, only the standard ``ai.onnx`` domain, no
external data, and ``onnx.checker``.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from typing import Dict, List, Sequence, Tuple

import onnx
import torch
from torch import nn

from edgeseg.device.contract import Contract

from .errors import ExportError, UsageError, short_reason
from .exporters import run_export

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
STANDARD_DOMAINS = ("", "ai.onnx")
PROTOBUF_LIMIT = 2 ** 31 - 1  # one ONNX protobuf cannot exceed 2 GB
SIZE_MULTIPLE = 16  # four 2x poolings


class FinalOutput(nn.Module):
    """Exports one logits tensor: with deep supervision the last (deepest) head, as at inference."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return final_logits(self.model(x))


class AllHeads(nn.Module):
    """Exports every head of a deep-supervision model: the final head first, then the others."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        out = list(self.model(x))
        return tuple([out[-1]] + out[:-1])


def final_logits(output):
    """The logits a segmentation net is judged by: the last head when it returns several."""
    if isinstance(output, (list, tuple)):
        return output[-1]
    return output


def head_names(count: int) -> List[str]:
    """Output names for ``AllHeads``: ``logits`` (the final head), then ``logits_head1``..."""
    return [OUTPUT_NAME] + ["{}_head{}".format(OUTPUT_NAME, i) for i in range(1, count)]


def check_size(size_hw: Sequence[int]) -> Tuple[int, int]:
    """Refuse input sizes the network cannot take (not a positive multiple of 16)."""
    if len(size_hw) != 2:
        raise UsageError("The input size must be HEIGHT and WIDTH, got {!r}.".format(size_hw),
                         "Pass --size H W (or a single number for a square input).")
    h, w = int(size_hw[0]), int(size_hw[1])
    if h <= 0 or w <= 0 or h % SIZE_MULTIPLE or w % SIZE_MULTIPLE:
        raise UsageError(
            "The input size {}x{} is not a positive multiple of {} in both dimensions; the network "
            "halves the resolution four times, so other sizes break its skip connections.".format(
                h, w, SIZE_MULTIPLE),
            "Pass --size with multiples of 16, e.g. {}x{}.".format(
                max(16, h - h % 16), max(16, w - w % 16)))
    return h, w


def default_opset(model_proto: onnx.ModelProto) -> int:
    """The opset version of the standard domain (0 when the model imports none)."""
    for entry in model_proto.opset_import:
        if entry.domain in STANDARD_DOMAINS:
            return int(entry.version)
    return 0


def check_standard(model_proto: onnx.ModelProto, *, opset: int, stage: str) -> None:
    """Opset == ``opset``, only the standard domain, no external data, and ``onnx.checker``."""
    found = default_opset(model_proto)
    if found != opset:
        raise ExportError("{} wrote opset {}, but opset {} was requested.".format(
            stage, found, opset),
            "Pick an opset this exporter writes as asked: the dynamo exporter builds opset 18 "
            "and cannot convert every model down (use --opset 18 or newer with it), the "
            "TorchScript exporter writes 11..20 (--exporter torchscript --opset 17).")
    other = sorted({e.domain for e in model_proto.opset_import if e.domain not in STANDARD_DOMAINS}
                   | {n.domain for n in model_proto.graph.node if n.domain not in STANDARD_DOMAINS})
    if other:
        raise ExportError("{} produced operators outside the standard ONNX domain: {}.".format(
            stage, ", ".join(other)),
            "Such a model only runs on onnxruntime builds with those contrib ops; "
            "edgeseg refuses it.")
    external = [t.name for t in model_proto.graph.initializer
                if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise ExportError("{} stored {} tensors as external data (e.g. {}).".format(
            stage, len(external), external[0]), "edgeseg writes one self-contained .onnx file.")
    size = model_proto.ByteSize()
    if size > PROTOBUF_LIMIT:
        raise ExportError("{} produced a {:.1f} GB model, over protobuf's 2 GB limit.".format(
            stage, size / 1e9), "edgeseg exports single-file models only; use a smaller network.")
    try:
        onnx.checker.check_model(model_proto)
    except onnx.checker.ValidationError as exc:
        raise ExportError("{} produced an invalid ONNX model: {}".format(
            stage, first_line(exc)),
            "Try another --opset; report the model and versions if it persists.") from exc


def attach_metadata(model_proto: onnx.ModelProto, contract: Contract) -> None:
    """Write the contract (and a few plain keys) into ``metadata_props``, replacing old values."""
    entries = dict(contract.to_metadata())
    entries.update({"edgeseg.precision": contract.precision, "edgeseg.arch": contract.arch,
                    "edgeseg.version": contract.edgeseg_version})
    keep = [(p.key, p.value) for p in model_proto.metadata_props if p.key not in entries]
    del model_proto.metadata_props[:]
    for key, value in keep + sorted(entries.items()):
        prop = model_proto.metadata_props.add()
        prop.key, prop.value = key, value


def metadata_of(model_proto: onnx.ModelProto) -> Dict[str, str]:
    return {p.key: p.value for p in model_proto.metadata_props}


def io_info(model_proto: onnx.ModelProto) -> Dict[str, list]:
    """Names and shapes (symbolic dims by name) of the graph's inputs and outputs."""
    def shape(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    inits = {t.name for t in model_proto.graph.initializer}
    return {"inputs": [{"name": v.name, "shape": shape(v)}
                       for v in model_proto.graph.input if v.name not in inits],
            "outputs": [{"name": v.name, "shape": shape(v)} for v in model_proto.graph.output]}


def _parameter_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def _heads(model: nn.Module, dummy: torch.Tensor) -> int:
    """How many outputs the model returns (1 for a plain tensor)."""
    with torch.no_grad():
        out = model(dummy)
    return len(out) if isinstance(out, (list, tuple)) else 1


def export_proto(*, model: nn.Module, size_hw: Sequence[int], opset: int, contract: Contract,
                 input_channels: int, all_heads: bool = False, dynamic_hw: bool = False,
                 exporter: str = "torchscript") -> Tuple[onnx.ModelProto, dict]:
    """Export ``model`` in memory; returns the checked ModelProto (contract attached) and info.

    A deep-supervision model gives its final head as the single output ``logits``; with
    ``all_heads`` every head is an output (``logits`` first, then ``logits_head1``...).
    ``dynamic_hw`` makes height and width symbolic (checked by ``dynamic.check_dynamic_hw``).
    """
    h, w = check_size(size_hw)
    if _parameter_bytes(model) > PROTOBUF_LIMIT:
        raise ExportError("The model's weights exceed protobuf's 2 GB limit for one ONNX file.",
                          "edgeseg exports single-file models only; use a smaller network.")
    model.eval()
    dummy = torch.zeros(1, int(input_channels), h, w, dtype=torch.float32)
    count = _heads(model, dummy)
    fixes = []
    if count > 1 and all_heads:
        wrapped, outputs = AllHeads(model).eval(), head_names(count)
    else:
        wrapped, outputs = FinalOutput(model).eval(), [OUTPUT_NAME]
        if count > 1:
            fixes.append("deep supervision: exported the final head (output {} of {}) as "
                         "'logits'; {} auxiliary head(s) dropped (--all-heads keeps them)".format(
                             count, count, count - 1))
    axes = {0: "batch", 2: "height", 3: "width"} if dynamic_hw else {0: "batch"}
    proto, caught = run_export(module=wrapped, dummy=dummy, opset=int(opset), exporter=exporter,
                               input_names=[INPUT_NAME], output_names=outputs,
                               dynamic_axes={name: dict(axes) for name in [INPUT_NAME] + outputs})
    attach_metadata(proto, contract)
    check_standard(proto, opset=int(opset), stage="torch.onnx.export ({})".format(exporter))
    info = {"opset": default_opset(proto), "ir_version": int(proto.ir_version),
            "nodes": len(proto.graph.node), "warnings": caught, "exporter": exporter,
            "heads": {"model_outputs": count, "exported": outputs}, "fixes": fixes,
            "dynamic_hw": bool(dynamic_hw)}
    info.update(io_info(proto))
    return proto, info


def export_onnx(*, model: nn.Module, path: str, size_hw: Sequence[int], opset: int,
                contract: Contract, input_channels: int, **options) -> dict:
    """Export ``model`` to ``path`` (written atomically) and return what was written.

    ``options``: ``all_heads``, ``dynamic_hw``, ``exporter`` as for :func:`export_proto`.
    """
    proto, info = export_proto(model=model, size_hw=size_hw, opset=opset, contract=contract,
                               input_channels=input_channels, **options)
    info["bytes"] = save_atomic(proto, path)
    info["path"] = str(path)
    return info


def save_atomic(model_proto: onnx.ModelProto, path: str) -> int:
    """Serialise to a temp file beside ``path``, then ``os.replace``; returns the byte count."""
    data = model_proto.SerializeToString()
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, ".tmp-{}-{}.onnx".format(os.getpid(), uuid.uuid4().hex[:12]))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies, as for open()
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return len(data)


def first_line(exc: Exception) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    text = str(exc).strip()
    return short_reason(text.splitlines()[0], 300) if text else type(exc).__name__
