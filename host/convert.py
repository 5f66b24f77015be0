"""``edgeseg export``: checkpoint -> ONNX FP32 (simplified) and INT8, each checked against PyTorch.

Everything is built in a staging folder inside ``out_dir`` and moved into place at the end, so
``out_dir`` never holds a half-written model.  An artifact that fails parity is published as
``model.<precision>.failed.onnx`` only; ``export.json`` records what was written and why.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, List, Optional, Sequence

from edgeseg.device import __version__
from edgeseg.device.files import file_sha256, write_json
from edgeseg.device.contract import (ACTIVATIONS, IMAGENET_MEAN, IMAGENET_STD, PRESETS,
                                     VALIDATION_KEY, Contract)

from . import ortcompat
from .artifacts import (DEFAULT_PRECISIONS, PRECISIONS, QuantOptions, add_speedups, artifact_name,
                        assess, build_precision, fp16_cpu_warning)
from .dynamic import check_dynamic_hw
from .errors import ExportError, UsageError
from .export import check_size, export_proto, save_atomic
from .exporters import check_opset_request, max_opset
from .quantize import MIN_PER_CHANNEL_OPSET
from .simplify import simplify_model
from .splits import gather_frames

DEFAULT_SIZE = 256
REPORT_NAME = "export.json"
STAGING_PREFIX = ".export-"  # .export-<pid>-<random>: removed when that process is gone
# The TorchScript exporter is chosen on purpose (see export.py); its deprecation notice is not news.
DELIBERATE = ("legacy TorchScript-based ONNX export", "The feature will be removed")


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
                         "Use a comma list of: {}.".format(", ".join(PRECISIONS)))
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
        check_opset_request(opset=17 if self.opset is None else self.opset,
                            exporter=self.exporter)
        if self.activation not in ACTIVATIONS:
            raise UsageError("Unknown --activation {!r}.".format(self.activation),
                             "Use sigmoid (one mask per class), softmax (one class per pixel) "
                             "or none.")
        if self.preset not in PRESETS:
            raise UsageError("Unknown --preset {!r}.".format(self.preset),
                             "Use one of: {}.".format(", ".join(PRESETS)))
        opset = (ortcompat.default_opset(self.target_ort, max_opset(self.exporter))
                 if self.opset is None else self.opset)
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
    try:  # permission bits do not tell everything (read-only mounts, /proc, root squash)
        os.rmdir(tempfile.mkdtemp(prefix=".edgeseg-probe-", dir=parent))
    except OSError as exc:
        raise UsageError("Cannot create the output folder {}: creating a folder in {} failed "
                         "({}).".format(out_dir, parent, exc.strerror or exc),
                         "Pass --out a folder you can write to.") from None


def convert(*, checkpoint, out_dir, arch=None, num_classes=None, input_channels=None,
            deep_supervision=None, size=None, opset: Optional[int] = None,
            precisions=DEFAULT_PRECISIONS, calib=None, val=None, val_masks=None,
            calib_count: int = 32, calibration: str = "minmax", max_iou_drop: float = 0.01,
            force: bool = False, threads: Optional[int] = None, measure_runs: int = 20,
            trust: bool = False, code_path=None, arch_kwargs=None,
            exporter: str = "torchscript", all_heads: bool = False, dynamic_hw: bool = False,
            activation: str = "sigmoid", preset: str = "default", target_ort: Optional[str] = None,
            log: Optional[Callable[[str], None]] = None) -> dict:
    """Export, simplify, quantize and validate; returns (and writes) the export.json report."""
    from .checkpoint import load_checkpoint

    log = log or _stderr
    options = ExportOptions(opset=opset, exporter=exporter, all_heads=all_heads,
                            dynamic_hw=dynamic_hw, activation=activation, preset=preset,
                            target_ort=target_ort).resolve()
    quant = QuantOptions(calibration=calibration, max_iou_drop=max_iou_drop, force=force,
                         threads=threads, measure_runs=measure_runs).check()
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
    calib_frames, val_frames, val_info = gather_frames(
        calib=calib, val=val, calib_count=calib_count, need_calib="int8" in precisions, log=log)
    gt_masks = _ground_truth(val_masks=val_masks, val=val or calib, frames=val_frames,
                             contract=contract,
                             val_info=val_info)
    created = not os.path.exists(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    _stale_staging(out_dir)
    staging = tempfile.mkdtemp(prefix="{}{}-".format(STAGING_PREFIX, os.getpid()), dir=out_dir)
    try:
        report = _build(loaded=loaded, contract=contract, options=options, precisions=precisions,
                        calib_frames=calib_frames, val_frames=val_frames, gt_masks=gt_masks,
                        quant=quant, staging=staging, log=log)
        report.update(versions=vers, validation=val_info, contract=contract.to_dict(),
                      checkpoint=loaded.report, options=dataclasses.asdict(options),
                      quantization_options=dataclasses.asdict(quant))
        report["warnings"].extend(val_info.get("warnings", []))
        report["fixes"] = (loaded.report["fixes"] + ["inferred " + i for i in
                                                     loaded.report["inferred"]] + report["fixes"])
        if val_info.get("same_as_calib"):
            report["warnings"].append("--val is the same source as --calib: the validation "
                                      "images were also calibration images")
        _publish(report=report, staging=staging, out_dir=out_dir, log=log)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not os.listdir(out_dir):  # an export that stopped leaves no empty --out
            os.rmdir(out_dir)
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


def _fit_target(path: str, options: ExportOptions, precision: str) -> List[str]:
    if not options.target_ort:
        return []
    import onnx

    proto = onnx.load(path)
    fixes = ortcompat.fit_target(proto, options.target_ort, what="the {} model".format(precision))
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


def _ground_truth(*, val_masks, val, frames, contract: Contract, val_info: dict):
    """--val-masks: one ground-truth mask per validation frame (same file stems), or None."""
    if not val_masks:
        return None
    from .groundtruth import load_gt_masks

    masks = load_gt_masks(folder=str(val_masks), frames=frames, contract=contract, source=val)
    val_info["ground_truth"] = str(val_masks)
    return masks


def _build(*, loaded, contract: Contract, options: ExportOptions, precisions, calib_frames,
           val_frames, gt_masks, quant: QuantOptions, staging: str, log) -> dict:
    """Write and assess every artifact in ``staging``; returns the report (paths still staged)."""
    fp32_path = os.path.join(staging, artifact_name("fp32"))
    export_info = _export_fp32(loaded=loaded, contract=contract, options=options, path=fp32_path,
                               log=log)
    fixes = list(export_info["fixes"])
    warnings = [w for w in export_info["warnings"] if not any(d in w for d in DELIBERATE)]
    suppressed = [w for w in export_info["warnings"] if w not in warnings]
    built, infos = {"fp32": fp32_path}, {}
    for precision in precisions:
        if precision == "fp32":
            continue
        built[precision], infos[precision] = build_precision(
            precision=precision, fp32_path=fp32_path, staging=staging, calib_frames=calib_frames,
            val_frames=val_frames, contract=contract, quant=quant, log=log)
        warnings += infos[precision].pop("warnings", [])
        fixes += _fit_target(built[precision], options, precision)
    artifacts = []
    for precision in precisions:
        entry = assess(precision=precision, path=built[precision], info=infos.get(precision),
                       torch_model=loaded.model, val_frames=val_frames, gt_masks=gt_masks,
                       quant=quant, log=log)
        entry.update(_artifact_facts(built[precision]))
        if precision in infos:
            entry["quantization" if precision.startswith("int8") else "conversion"] = \
                infos[precision]
        artifacts.append(entry)
    reference = _reference_ms(artifacts=artifacts, fp32_path=fp32_path, val_frames=val_frames,
                              quant=quant)
    add_speedups(artifacts, reference_ms=reference)
    fp16_note = fp16_cpu_warning(artifacts, reference_ms=reference)
    warnings += [fp16_note] if fp16_note else []
    export = {k: export_info[k] for k in ("opset", "ir_version", "nodes", "inputs", "outputs",
                                          "exporter", "heads", "dynamic_hw")}
    export.update(dynamic_check=export_info.get("dynamic_check"),
                  expected_warnings=suppressed)  # torch's notice about the exporter edgeseg chose
    for warning in warnings:
        log("warning: " + warning)
    return {"ok": all(a["ok"] for a in artifacts), "artifacts": artifacts,
            "reference_fp32_ms": reference, "simplify": export_info["simplify"],
            "export": export, "fixes": fixes, "warnings": warnings}


def _reference_ms(*, artifacts: List[dict], fp32_path: str, val_frames, quant) -> float:
    """FP32's median latency: from its row, or measured alone when fp32 was not asked for."""
    rows = [a for a in artifacts if a["precision"] == "fp32"]
    if rows:
        return rows[0]["measure"]["median_ms"]
    from .artifacts import MEASURE_FRAMES
    from .measure import measure_artifact

    return measure_artifact(path=fp32_path, frames=list(val_frames)[:MEASURE_FRAMES],
                            threads=quant.thread_count, runs=quant.measure_runs)["median_ms"]


def _publish(*, report: dict, staging: str, out_dir: str, log) -> None:
    """Move the staged artifacts into ``out_dir``; export.json last.

    An export never deletes or overwrites an earlier one: its models and export.json move to
    ``previous/<UTC time>/`` first (so none of them can pass for this export's either).  A model
    that failed is stamped as such in its own metadata (``edgeseg.validation``), so a renamed copy
    is still refused by ``edgeseg deploy``.
    """
    old_report = os.path.join(out_dir, REPORT_NAME)
    earlier = [name for name in (artifact_name(p, ok) for p in PRECISIONS for ok in (True, False))
               if os.path.exists(os.path.join(out_dir, name))]
    if earlier or os.path.exists(old_report):
        _keep_previous(earlier=earlier, old_report=old_report, out_dir=out_dir, report=report,
                       log=log)
    for art in report["artifacts"]:
        name = artifact_name(art["precision"], art["ok"])
        final = os.path.join(out_dir, name)
        if not art["ok"]:
            mark_failed(art["staged"], failures=art["failures"])
        art.update(bytes=os.path.getsize(art["staged"]), sha256=file_sha256(art["staged"]),
                   path=final, file=name)
        os.replace(art.pop("staged"), final)
    write_json(old_report, report)


def mark_failed(path: str, *, failures: Sequence[str]) -> None:
    """Record in the model's ``metadata_props`` that it failed validation, and why."""
    import onnx

    proto = onnx.load(path)
    prop = proto.metadata_props.add()
    prop.key = VALIDATION_KEY
    prop.value = json.dumps({"ok": False, "failures": list(failures)})
    save_atomic(proto, path)


def _keep_previous(*, earlier: List[str], old_report: str, out_dir: str, report: dict,
                   log) -> None:
    """Move the ``earlier`` models and their export.json to previous/<time>/."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    keep = os.path.join(out_dir, "previous", stamp)
    suffix = 1
    while os.path.exists(keep):
        keep, suffix = os.path.join(out_dir, "previous", "{}-{}".format(stamp, suffix)), suffix + 1
    os.makedirs(keep)
    moved = list(earlier)
    if os.path.exists(old_report):
        os.replace(old_report, os.path.join(keep, REPORT_NAME))
        moved.append(REPORT_NAME)
    for name in earlier:
        os.replace(os.path.join(out_dir, name), os.path.join(keep, name))
    message = "moved the earlier export ({}) to {}".format(", ".join(moved), keep)
    report["warnings"].append(message)
    report["previous"] = {"folder": keep, "files": moved}
    log("note: " + message)


def _stale_staging(out_dir: str) -> None:
    """Remove staging folders of exports that were killed (their process is gone)."""
    for entry in os.scandir(out_dir):
        parts = entry.name.split("-")
        if (entry.is_dir() and entry.name.startswith(STAGING_PREFIX) and len(parts) > 2
                and parts[1].isdigit() and not _alive(int(parts[1]))):
            shutil.rmtree(entry.path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


__all__ = ["convert", "mark_failed", "artifact_name", "build_contract", "versions", "PRECISIONS"]
