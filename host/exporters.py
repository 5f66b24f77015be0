"""The torch -> ONNX call itself: TorchScript or dynamo exporter, and what an opset cannot express.

Errors name the cause a user can act on: bilinear ``align_corners=True`` upsampling below opset 11,
an operator the opset lacks together with the lowest opset that has it, a missing ``onnxscript``
for the dynamo exporter.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import tempfile
import warnings
from typing import List, Optional, Sequence, Tuple

import onnx
import torch
from torch import nn

from .errors import ExportError, UsageError, short_reason

EXPORTERS = ("torchscript", "dynamo")
MIN_OPSET = 7
ALIGN_CORNERS_OPSET = 11  # Resize with coordinate_transformation_mode="align_corners"


def max_opset(exporter: str) -> int:
    from torch.onnx import _constants

    if exporter == "torchscript":
        return int(_constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET)
    return int(_constants.ONNX_MAX_OPSET)


def check_opset_request(*, opset: int, exporter: str) -> None:
    if exporter not in EXPORTERS:
        raise UsageError("Unknown exporter {!r}.".format(exporter),
                         "Use --exporter torchscript (default) or --exporter dynamo.")
    top = max_opset(exporter)
    if not MIN_OPSET <= int(opset) <= top:
        raise ExportError("Opset {} is outside what torch {}'s {} exporter writes ({}..{}).".format(
            opset, torch.__version__, exporter, MIN_OPSET, top),
            "Pick an opset in {}..{}, e.g. --opset 17.".format(max(11, MIN_OPSET), top))


def align_corners_layers(model: nn.Module) -> List[str]:
    """Names of the Upsample layers doing bilinear interpolation with ``align_corners=True``."""
    found = [name or type(model).__name__ for name, m in model.named_modules()
             if isinstance(m, nn.Upsample) and m.mode in ("bilinear", "bicubic", "trilinear")
             and m.align_corners]
    return [n[len("model."):] if n.startswith("model.") else n for n in found]  # edgeseg's wrapper


def _align_corners_error(opset: int, layers: Sequence[str]) -> ExportError:
    where = " (layer(s) {})".format(", ".join(layers[:4])) if layers else ""
    return ExportError(
        "Opset {} cannot express the model's bilinear upsampling with align_corners=True{}: "
        "before opset {} ONNX's Upsample has no align_corners mode, and exporting it anyway "
        "would silently shift every upsampled pixel.".format(opset, where, ALIGN_CORNERS_OPSET),
        "Use --opset {} or newer (17 is the default).".format(ALIGN_CORNERS_OPSET))


def check_model_opset(model: nn.Module, opset: int) -> None:
    """Refuse, before exporting, what this opset is known not to express for this model."""
    if int(opset) < ALIGN_CORNERS_OPSET:
        layers = align_corners_layers(model)
        if layers:
            raise _align_corners_error(int(opset), layers)


@contextlib.contextmanager
def quiet_fds():
    """Swallow what torch's C++ side writes to fds 1 and 2 (whole TorchScript graphs on errors),
    so that stdout stays clean for ``--json``; Python warnings are collected separately."""
    saved = []
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError):
            stream.flush()
    fds = (1, 2)  # what C++ writes to, whatever Python's sys.stdout is at the moment
    with tempfile.TemporaryFile() as sink, contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        try:
            for fd in fds:
                saved.append((fd, os.dup(fd)))
                os.dup2(sink.fileno(), fd)
            yield
        finally:
            for fd, copy in reversed(saved):
                os.dup2(copy, fd)
                os.close(copy)


def _torchscript(module, dummy, opset, input_names, output_names, dynamic_axes) -> bytes:
    buffer = io.BytesIO()
    torch.onnx.export(module, (dummy,), buffer, dynamo=False, opset_version=int(opset),
                      input_names=input_names, output_names=output_names,
                      dynamic_axes=dynamic_axes, do_constant_folding=True, export_params=True)
    return buffer.getvalue()


def _dynamo(module, dummy, opset, input_names, output_names, dynamic_axes) -> bytes:
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter's own dependency)
    except ImportError as exc:
        raise ExportError("--exporter dynamo needs the onnxscript package, which is not "
                          "installed.", "pip install onnxscript (the host extra installs it: "
                          "pip install 'edgeseg[host]'), or use --exporter torchscript.") from exc
    program = torch.onnx.export(module, (dummy,), dynamo=True, opset_version=int(opset),
                                input_names=input_names, output_names=output_names,
                                dynamic_axes=dynamic_axes, external_data=False,
                                optimize=True, verify=False, report=False)
    return program.model_proto.SerializeToString()


def _lowest_working_opset(run, opset: int, exporter: str) -> Optional[int]:
    for candidate in range(int(opset) + 1, max_opset(exporter) + 1):
        try:
            with quiet_fds(), torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                run(candidate)
            return candidate
        except Exception:  # any failure: this opset does not work either
            continue
    return None


def _translate(exc: Exception, *, opset: int, exporter: str, run, model) -> ExportError:
    text = str(exc)
    if "align_corners" in text and int(opset) < ALIGN_CORNERS_OPSET:
        return _align_corners_error(int(opset), align_corners_layers(model))
    match = re.search(r"operator '([\w:.]+)'", text)
    if match:
        op = match.group(1)
        added = re.search(r"added in version (\d+)", text)
        lowest = int(added.group(1)) if added else _lowest_working_opset(run, opset, exporter)
        hint = ("Use --opset {} or newer.".format(lowest) if lowest else
                "No opset up to {} expresses it with this torch; replace the operator in the "
                "model.".format(max_opset(exporter)))
        return ExportError("Opset {} cannot express the operator {} of this model{}.".format(
            opset, op, "; the lowest opset that can is {}".format(lowest) if lowest else ""), hint)
    first = short_reason((text.strip().splitlines() or [type(exc).__name__])[0], 300)
    return ExportError("torch.onnx.export ({} exporter, opset {}) failed: {}".format(
        exporter, opset, first),
        "Try another --opset (11..{}) or --exporter; check that the model runs on the example "
        "input.".format(max_opset(exporter)))


def run_export(*, module: nn.Module, dummy: torch.Tensor, opset: int, exporter: str,
               input_names: List[str], output_names: List[str],
               dynamic_axes: dict) -> Tuple[onnx.ModelProto, List[str]]:
    """Export in memory with the chosen exporter; returns (ModelProto, warnings seen)."""
    check_opset_request(opset=opset, exporter=exporter)
    check_model_opset(module, opset)
    fn = _torchscript if exporter == "torchscript" else _dynamo

    def run(version):
        return fn(module, dummy, version, input_names, output_names, dynamic_axes)

    try:
        with warnings.catch_warnings(record=True) as records, \
                quiet_fds(), torch.no_grad():
            warnings.simplefilter("always")
            data = run(opset)
    except ExportError:
        raise
    except Exception as exc:  # torch raises many types (SymbolicValueError, RuntimeError, ...)
        raise _translate(exc, opset=opset, exporter=exporter, run=run, model=module) from exc
    seen: List[str] = []
    for record in records:
        text = "{}: {}".format(record.category.__name__, record.message).strip()
        if text not in seen:
            seen.append(text)
    return onnx.load_from_string(data), seen
