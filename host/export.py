"""PyTorch model -> one self-contained, standard-domain ONNX file carrying the edgeseg contract.

The TorchScript exporter is chosen explicitly (``dynamo=False``): torch's default dynamo exporter
needs onnxscript and turns an opset-11 request into opset 18 with external data.  Whatever torch
writes is checked afterwards: the opset asked for, only the standard ``ai.onnx`` domain, no
external data, and ``onnx.checker``.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import uuid
import warnings
from typing import Dict, List, Sequence, Tuple

import onnx
import torch
from torch import nn

from edgeseg.device.contract import Contract

from .errors import ExportError, UsageError, short_reason

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
STANDARD_DOMAINS = ("", "ai.onnx")
PROTOBUF_LIMIT = 2 ** 31 - 1  # one ONNX protobuf cannot exceed 2 GB
SIZE_MULTIPLE = 16  # four 2x poolings
MIN_OPSET = 11  # Resize with align_corners coordinates (bilinear upsampling of NestedUNet / UNet)
MAX_OPSET = getattr(torch.onnx._constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", 20)


class FinalOutput(nn.Module):
    """Exports one logits tensor: with deep supervision the last (deepest) head, as at inference."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return final_logits(self.model(x))


def final_logits(output):
    """The logits a segmentation net is judged by: the last head when it returns several."""
    if isinstance(output, (list, tuple)):
        return output[-1]
    return output


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
                          "Pick an opset this torch/onnx pair supports ({}..{}), e.g. --opset "
                          "17.".format(MIN_OPSET, MAX_OPSET))
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


@contextlib.contextmanager
def stdout_to_stderr():
    """Send file descriptor 1 to stderr: torch's C++ code prints graphs straight to stdout, which
    would break ``--json`` (stdout carries only JSON)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def check_opset(opset: int) -> int:
    """Refuse opsets the TorchScript exporter cannot write for these models, before any work."""
    opset = int(opset)
    if opset < MIN_OPSET:
        raise UsageError("--opset {} is too old: bilinear upsampling with align_corners=True (used "
                         "by NestedUNet and UNet) is only expressible with Resize from opset "
                         "{}.".format(opset, MIN_OPSET),
                         "Use --opset {} or newer (17 is the default).".format(MIN_OPSET))
    if opset > MAX_OPSET:
        raise UsageError("--opset {} is newer than torch {}'s TorchScript exporter writes (at most "
                         "{}).".format(opset, torch.__version__, MAX_OPSET),
                         "Use --opset {} or lower (17 is the default).".format(MAX_OPSET))
    return opset


def export_proto(*, model: nn.Module, size_hw: Sequence[int], opset: int, contract: Contract,
                 input_channels: int) -> Tuple[onnx.ModelProto, dict]:
    """Export ``model`` in memory; returns the checked ModelProto (contract attached) and info."""
    h, w = check_size(size_hw)
    if _parameter_bytes(model) > PROTOBUF_LIMIT:
        raise ExportError("The model's weights exceed protobuf's 2 GB limit for one ONNX file.",
                          "edgeseg exports single-file models only; use a smaller network.")
    wrapped = FinalOutput(model).eval()
    dummy = torch.zeros(1, int(input_channels), h, w, dtype=torch.float32)
    buffer = io.BytesIO()
    caught: List[str] = []
    try:
        with warnings.catch_warnings(record=True) as records, stdout_to_stderr(), torch.no_grad():
            warnings.simplefilter("always")
            torch.onnx.export(
                wrapped, (dummy,), buffer, dynamo=False, opset_version=int(opset),
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                do_constant_folding=True, export_params=True)
        caught = _unique("{}: {}".format(r.category.__name__, r.message) for r in records)
    except Exception as exc:  # torch raises many types (SymbolicValueError, RuntimeError, ...)
        raise ExportError("torch.onnx.export (TorchScript exporter, opset {}) failed: {}".format(
            opset, first_line(exc)),
            "Try another --opset ({}..{}); check that the model runs on a 1x{}x{}x{} input.".format(
                MIN_OPSET, MAX_OPSET, input_channels, h, w)) from exc
    proto = onnx.load_from_string(buffer.getvalue())
    attach_metadata(proto, contract)
    check_standard(proto, opset=int(opset), stage="torch.onnx.export")
    info = {"opset": default_opset(proto), "ir_version": int(proto.ir_version),
            "nodes": len(proto.graph.node), "warnings": caught}
    info.update(io_info(proto))
    return proto, info


def export_onnx(*, model: nn.Module, path: str, size_hw: Sequence[int], opset: int,
                contract: Contract, input_channels: int) -> dict:
    """Export ``model`` to ``path`` (written atomically) and return what was written."""
    proto, info = export_proto(model=model, size_hw=size_hw, opset=opset, contract=contract,
                               input_channels=input_channels)
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


def _unique(items) -> List[str]:
    seen: List[str] = []
    for item in items:
        text = str(item).strip()
        if text and text not in seen:
            seen.append(text)
    return seen
