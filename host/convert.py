"""``edgeseg export``: checkpoint -> ONNX FP32 (simplified) and INT8, each checked against PyTorch.

Everything is built in a staging folder inside ``out_dir`` and moved into place at the end, so
``out_dir`` never holds a half-written model.  An artifact that fails parity is published as
``model.<precision>.failed.onnx`` only; ``export.json`` records what was written and why.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

from edgeseg.device import __version__
from edgeseg.device.files import file_sha256, write_json
from edgeseg.device.contract import ACTIVATIONS, IMAGENET_MEAN, IMAGENET_STD, PRESETS, Contract
from edgeseg.device.sources import sample_frames, uri_to_path

from . import ortcompat
from .dynamic import check_dynamic_hw
from .errors import ExportError, UsageError
from .export import check_size, export_proto, save_atomic
from .exporters import check_opset_request, max_opset
from .quantize import MIN_PER_CHANNEL_OPSET, quantize_int8
from .simplify import simplify_model
from .validate import validate_artifact

PRECISIONS = ("fp32", "int8")
DEFAULT_SIZE = 256
HOLDOUT_EVERY = 4  # without --val, every 4th calibration-source frame is held out for validation
VAL_COUNT = 16
REPORT_NAME = "export.json"
# The TorchScript exporter is chosen on purpose (see export.py); its deprecation notice is not news.
DELIBERATE = ("legacy TorchScript-based ONNX export", "The feature will be removed")


def artifact_name(precision: str, ok: bool = True) -> str:
    return "model.{}.onnx".format(precision) if ok else "model.{}.failed.onnx".format(precision)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def versions() -> dict:
    import onnx
    import onnxruntime
    import onnxsim
    import torch

    found = {"torch": torch.__version__, "onnx": onnx.__version__,
             "onnxruntime": onnxruntime.__version__,
             "onnxsim": str(onnxsim.__version__).lstrip("v"), "edgeseg": __version__}
    try:
        import onnxscript  # only the dynamo exporter uses it

        found["onnxscript"] = onnxscript.__version__
    except ImportError:
        found["onnxscript"] = None
    return found


def _check_request(*, precisions: Sequence[str], size, opset: int, calib, val) -> tuple:
    """Everything that can be refused before loading or exporting anything."""
    precisions = tuple(dict.fromkeys(precisions or ()))
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad or not precisions:
        raise UsageError("Unknown or missing precision: {}.".format(", ".join(bad) or "none"),
                         "Use fp32, int8 or both.")
    if size is not None:
        size = list(check_size(size if isinstance(size, (list, tuple)) else (size, size)))
    if "int8" in precisions and not calib:
        raise UsageError("INT8 needs real calibration images: pass --calib FOLDER_OR_VIDEO.",
                         "Use 30 or more images like those the device will see, "
                         "or --precision fp32.")
    if "int8" in precisions and int(opset) < MIN_PER_CHANNEL_OPSET:
        raise ExportError("INT8 with per-channel weights needs opset >= {}, but --opset {} was "
                          "requested.".format(MIN_PER_CHANNEL_OPSET, opset),
                          "Use --opset 13 or newer (17 is the default), or --precision fp32.")
    if not calib and not val:
        raise UsageError("Validation against PyTorch needs real images and none were given.",
                         "Pass --val FOLDER_OR_VIDEO (or --calib, whose held-out part is used).")
    return precisions, size


def _gather_frames(*, calib, val, calib_count: int, need_calib: bool, log) -> tuple:
    """(calibration frames, validation frames, validation info); never overlapping."""
    if calib_count < 1:
        raise UsageError("--calib-count must be at least 1 (got {}).".format(calib_count),
                         "Use 32 or more for a stable INT8 calibration.")
    calib_frames: List = []
    if val:
        val_frames = sample_frames(val, count=VAL_COUNT)
        if not val_frames:
            raise UsageError("--val {} gave no frames.".format(val),
                             "Point it at a folder of images or a video.")
        info = {"source": "--val", "images": len(val_frames)}
        if calib and need_calib and _same_source(calib, val):
            info["same_as_calib"] = True
            log("warning: --val is the same source as --calib; validation images were also "
                "used for calibration")
        if calib and need_calib:
            calib_frames = sample_frames(calib, count=calib_count)
    else:
        pool = sample_frames(calib, count=int(math.ceil(calib_count * HOLDOUT_EVERY /
                                                        (HOLDOUT_EVERY - 1))))
        if len(pool) < 2:
            raise UsageError("--calib {} gave {} frame(s); holding some out for validation needs "
                             "at least 2.".format(calib, len(pool)),
                             "Add images, or pass separate validation images with --val.")
        held = set(range(HOLDOUT_EVERY - 1, len(pool), HOLDOUT_EVERY)) or {len(pool) - 1}
        val_frames = [f for i, f in enumerate(pool) if i in held]
        calib_frames = [f for i, f in enumerate(pool) if i not in held][:calib_count]
        info = {"source": "held-out of --calib", "images": len(val_frames),
                "every": HOLDOUT_EVERY}
    if need_calib:
        if not calib_frames:
            raise UsageError("--calib {} gave no frames.".format(calib),
                             "Point it at a folder of images or a video.")
        info["calibration_images"] = len(calib_frames)
        log("{} calibration frames from {}, {} validation frames ({})".format(
            len(calib_frames), calib, len(val_frames), info["source"]))
    return calib_frames, val_frames, info


def _same_source(a: str, b: str) -> bool:
    return os.path.realpath(uri_to_path(a)) == os.path.realpath(uri_to_path(b))


@dataclass
class ExportOptions:
    """How the graph is written and what the agent is told (see ``edgeseg export --help``)."""

    opset: Optional[int] = None  # None: 17, or the newest target_ort reads if lower
    exporter: str = "torchscript"
    all_heads: bool = False
    dynamic_hw: bool = False
    activation: str = "sigmoid"
    preset: str = "default"
    target_ort: Optional[str] = None

    def resolve(self) -> "ExportOptions":
        """Checked options with the opset filled in; nothing is loaded yet."""
        check_opset_request(opset=self.opset or 17, exporter=self.exporter)
        if self.activation not in ACTIVATIONS:
            raise UsageError("Unknown --activation {!r}.".format(self.activation),
                             "Use sigmoid (one mask per class), softmax (one class per pixel) "
                             "or none.")
        if self.preset not in PRESETS:
            raise UsageError("Unknown --preset {!r}.".format(self.preset),
                             "Use one of: {}.".format(", ".join(PRESETS)))
        opset = self.opset or ortcompat.default_opset(self.target_ort, max_opset(self.exporter))
        ortcompat.check_opset(opset, self.target_ort)
        return dataclasses.replace(self, opset=int(opset))


def build_contract(*, loaded, size: Optional[list], arch: str, vers: dict,
                   options: Optional[ExportOptions] = None) -> Contract:
    """The contract: size, channels and classes from the checkpoint, the agent's defaults else."""
    options = options or ExportOptions()
    config = loaded.config or {}
    if size is None:
        h, w = config.get("input_h"), config.get("input_w")
        size = [int(h), int(w)] if h and w else [DEFAULT_SIZE, DEFAULT_SIZE]
        size = list(check_size(size))
    channels = int(config.get("input_channels", 3))
    classes = int(config.get("num_classes", 1))
    values = {"input_size": size, "channels": channels, "num_classes": classes, "arch": arch,
              "class_names": ["foreground"] if classes == 1 else
              ["class{}".format(i) for i in range(classes)],
              "edgeseg_version": __version__, "versions": dict(vers), "precision": "fp32"}
    values.update(PRESETS[options.preset], preset=options.preset,
                  activation=options.activation, dynamic_hw=bool(options.dynamic_hw))
    if channels == 1 and options.preset != "default":
        raise UsageError("--preset {} feeds 3-channel BGR images; this model takes {} "
                         "channel(s).".format(options.preset, channels),
                         "Use --preset default for single-channel (greyscale) models.")
    if channels == 1:  # greyscale: the luminance average of the ImageNet statistics
        values.update(color_order="GRAY", mean=[sum(IMAGENET_MEAN) / 3],
                      std=[sum(IMAGENET_STD) / 3])
    try:
        return Contract.from_dict(dict(Contract().to_dict(), **values))
    except Exception as exc:
        raise UsageError("The checkpoint's config gives an unusable contract: {}".format(exc),
                         "Fix config.yml (input_channels, num_classes, input_h/input_w).") from exc


def _check_out_dir(out_dir: str) -> None:
    """Refuse an --out that can never be created, before any work (nothing is created yet)."""
    parent = out_dir
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise UsageError("Cannot create the output folder {}: {} is {}.".format(
            out_dir, parent, "not a folder" if not os.path.isdir(parent) else "not writable"),
            "Pass --out a folder you can write to.")


def convert(*, checkpoint, out_dir, arch=None, num_classes=None, input_channels=None,
            deep_supervision=None, size=None, opset: Optional[int] = None, precisions=PRECISIONS, calib=None, val=None,
            calib_count: int = 32, trust: bool = False, code_path=None, arch_kwargs=None,
            exporter: str = "torchscript", all_heads: bool = False, dynamic_hw: bool = False,
            activation: str = "sigmoid", preset: str = "default", target_ort: Optional[str] = None,
            log: Optional[Callable[[str], None]] = None) -> dict:
    """Export, simplify, quantize and validate; returns (and writes) the export.json report."""
    from .checkpoint import load_checkpoint

    log = log or _stderr
    options = ExportOptions(opset=opset, exporter=exporter, all_heads=all_heads,
                            dynamic_hw=dynamic_hw, activation=activation, preset=preset,
                            target_ort=target_ort).resolve()
    precisions, size = _check_request(precisions=precisions, size=size, opset=options.opset,
                                      calib=calib, val=val)
    out_dir = os.path.abspath(str(out_dir))
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UsageError("--out {} exists and is not a folder.".format(out_dir),
                         "Pass a new or existing folder.")
    _check_out_dir(out_dir)
    log("loading checkpoint {}".format(checkpoint))
    loaded = load_checkpoint(str(checkpoint), arch=arch, num_classes=num_classes,
                             input_channels=input_channels, deep_supervision=deep_supervision,
                             trust=trust, code_path=code_path,
                             arch_kwargs=arch_kwargs)
    for fix in loaded.report["fixes"] + ["inferred " + i for i in loaded.report["inferred"]]:
        log("checkpoint: " + fix)
    vers = versions()
    contract = build_contract(loaded=loaded, size=size, arch=loaded.arch, vers=vers,
                              options=options)
    calib_frames, val_frames, val_info = _gather_frames(
        calib=calib, val=val, calib_count=calib_count, need_calib="int8" in precisions, log=log)
    os.makedirs(out_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".export-", dir=out_dir)
    try:
        report = _build(loaded=loaded, contract=contract, options=options, precisions=precisions,
                        calib_frames=calib_frames, val_frames=val_frames, staging=staging, log=log)
        report.update(versions=vers, validation=val_info, contract=contract.to_dict(),
                      checkpoint=loaded.report, options=dataclasses.asdict(options))
        report["fixes"] = (loaded.report["fixes"] + ["inferred " + i for i in
                                                     loaded.report["inferred"]] + report["fixes"])
        if val_info.get("same_as_calib"):
            report["warnings"].append("--val is the same source as --calib: the validation "
                                      "images were also calibration images")
        _publish(report=report, staging=staging, out_dir=out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log("export {}: {}".format("ok" if report["ok"] else "FAILED parity",
                               os.path.join(out_dir, REPORT_NAME)))
    return report


def _export_fp32(*, loaded, contract: Contract, options: ExportOptions, path: str, log) -> dict:
    """Export, simplify, check --dynamic-hw and --target-ort, write ``path``; returns the info."""
    log("exporting {} {}x{} to ONNX opset {} ({} exporter{}{})".format(
        contract.arch, contract.height, contract.width, options.opset, options.exporter,
        ", every head" if options.all_heads else "", ", dynamic H/W" if options.dynamic_hw else ""))
    proto, info = export_proto(model=loaded.model, size_hw=contract.input_size,
                               opset=options.opset, contract=contract,
                               input_channels=contract.channels, all_heads=options.all_heads,
                               dynamic_hw=options.dynamic_hw, exporter=options.exporter)
    proto, info["simplify"] = simplify_model(model_proto=proto, test_hw=contract.input_size)
    log("simplify: " + info["simplify"]["message"])
    if options.dynamic_hw:
        info["dynamic_check"] = check_dynamic_hw(proto=proto, model=loaded.model,
                                                 channels=contract.channels)
        log("dynamic H/W: ONNX and PyTorch agree at {}".format(
            " and ".join(info["dynamic_check"]["checked_sizes"])))
    info["fixes"] += ortcompat.fit_target(proto, options.target_ort, what="the fp32 model")
    save_atomic(proto, path)
    return info


def _fit_int8(path: str, options: ExportOptions) -> List[str]:
    if not options.target_ort:
        return []
    import onnx

    proto = onnx.load(path)
    fixes = ortcompat.fit_target(proto, options.target_ort, what="the int8 model")
    if fixes:
        save_atomic(proto, path)
    return fixes


def _artifact_facts(path: str) -> dict:
    """What the written file really holds: opset, IR version, input/output names and shapes."""
    import onnx

    from .export import default_opset, io_info

    proto = onnx.load(path, load_external_data=False)
    facts = {"opset": default_opset(proto), "ir_version": int(proto.ir_version)}
    facts.update(io_info(proto))
    return facts


def _build(*, loaded, contract: Contract, options: ExportOptions, precisions, calib_frames,
           val_frames, staging: str, log) -> dict:
    """Write every artifact into ``staging``; returns the report (paths still in staging)."""
    built = {"fp32": os.path.join(staging, artifact_name("fp32"))}
    export_info = _export_fp32(loaded=loaded, contract=contract, options=options,
                               path=built["fp32"], log=log)
    fixes = list(export_info["fixes"])
    warnings = [w for w in export_info["warnings"] if not any(d in w for d in DELIBERATE)]
    suppressed = [w for w in export_info["warnings"] if w not in warnings]
    quant_info = None
    if "int8" in precisions:
        built["int8"] = os.path.join(staging, artifact_name("int8"))
        quant_info = quantize_int8(fp32_path=built["fp32"], out_path=built["int8"],
                                   frames=calib_frames, contract=contract, log=log)
        warnings += quant_info.pop("warnings", [])
        fixes += _fit_int8(built["int8"], options)
    artifacts = []
    for precision in precisions:
        log("validating {} on {} frames against PyTorch".format(precision, len(val_frames)))
        parity = validate_artifact(onnx_path=built[precision], torch_model=loaded.model,
                                   frames=val_frames, precision=precision)
        entry = {"precision": precision, "staged": built[precision], "ok": parity.ok,
                 "failures": list(parity.failures),
                 "parity": {k: getattr(parity, k) for k in ("max_abs_err", "mean_abs_err",
                                                             "mask_iou", "pixel_agreement",
                                                             "images")}}
        entry.update(_artifact_facts(built[precision]))
        if precision == "int8":
            entry["quantization"] = quant_info
        for failure in parity.failures:
            log("{}: parity FAILED: {}".format(precision, failure))
        artifacts.append(entry)
    export = {k: export_info[k] for k in ("opset", "ir_version", "nodes", "inputs", "outputs",
                                          "exporter", "heads", "dynamic_hw")}
    export.update(dynamic_check=export_info.get("dynamic_check"),
                  expected_warnings=suppressed)  # torch's notice about the exporter edgeseg chose
    for warning in warnings:
        log("warning: " + warning)
    return {"ok": all(a["ok"] for a in artifacts), "artifacts": artifacts,
            "simplify": export_info["simplify"], "export": export, "fixes": fixes,
            "warnings": warnings}


def _publish(*, report: dict, staging: str, out_dir: str) -> None:
    """Move the staged artifacts into ``out_dir``; remove stale models; export.json last."""
    old_report = os.path.join(out_dir, REPORT_NAME)
    if os.path.exists(old_report):
        os.unlink(old_report)
    written = set()
    for art in report["artifacts"]:
        name = artifact_name(art["precision"], art["ok"])
        final = os.path.join(out_dir, name)
        art.update(bytes=os.path.getsize(art["staged"]), sha256=file_sha256(art["staged"]),
                   path=final, file=name)
        os.replace(art.pop("staged"), final)
        written.add(name)
    for precision in PRECISIONS:  # models of an earlier export must not pass for this one's
        for ok in (True, False):
            name = artifact_name(precision, ok)
            if name not in written and os.path.exists(os.path.join(out_dir, name)):
                os.unlink(os.path.join(out_dir, name))
                report["warnings"].append("removed {} left by an earlier export".format(name))
    write_json(old_report, report)


__all__ = ["convert", "artifact_name", "build_contract", "versions"]
