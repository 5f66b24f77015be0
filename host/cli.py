"""edgeseg: export a PyTorch segmentation checkpoint to validated ONNX models, deploy them to a
device over SSH, and measure how fast they run there.

With ``--json`` stdout carries only JSON; progress and logs always go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys

from edgeseg.device import __version__

from .errors import EdgesegError, UsageError


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _emit(args, data: dict, text: str) -> None:
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        print(text)


def _precisions(value: str):
    from .artifacts import PRECISIONS

    items = [p.strip() for p in value.split(",") if p.strip()]
    bad = [p for p in items if p not in PRECISIONS]
    if bad or not items:
        raise UsageError("Unknown precision {!r} in --precision {}.".format(
            ",".join(bad), value), "Use a comma list of {}, e.g. --precision fp32,int8.".format(
                ", ".join(PRECISIONS)))
    return tuple(items)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("{!r} is not a number".format(text))
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError("must be at least 0 and below 1 (got {})".format(value))
    return value


def _size(value):
    if value is None:
        return None
    text = value.lower().replace("*", "x")
    try:
        parts = [int(p) for p in text.split("x")]
    except ValueError:
        raise UsageError("--size {} is not a size.".format(value), "Use H or HxW, e.g. 256 or 256x320.")
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) <= 0:
        raise UsageError("--size {} is not a size.".format(value), "Use H or HxW, e.g. 256 or 256x320.")
    return parts


def _count(minimum: int):
    """An argparse type: an integer of at least ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError("{!r} is not a whole number".format(text))
        if value < minimum:
            raise argparse.ArgumentTypeError("must be at least {} (got {})".format(minimum, value))
        return value
    return parse


def _add_target_options(p) -> None:
    p.add_argument("target", help="'local', [user@]host[:port], or a ~/.ssh/config alias")
    p.add_argument("--identity", help="private key file for SSH")
    p.add_argument("--known-hosts", help="known_hosts file (default ~/.ssh/known_hosts)")
    p.add_argument("--accept-new-host-key", action="store_true",
                   help="trust and record the host key of a host seen for the first time")
    p.add_argument("--install-dir", default="~/.edgeseg", help="where the agent and models live")
    p.add_argument("--python", help="the device's Python (default: python3 over SSH; on 'local' "
                   "the Python running edgeseg)")
    p.add_argument("--json", action="store_true", help="print only JSON on stdout")


def _parser():
    parser = argparse.ArgumentParser(prog="edgeseg", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version="edgeseg " + __version__)
    sub = parser.add_subparsers(dest="command")

    ex = sub.add_parser("export", help="checkpoint -> validated ONNX FP32 / INT8 models")
    ex.add_argument("checkpoint", help="model.pth (config.yml beside it is read automatically)")
    ex.add_argument("--out", required=True, help="output folder")
    ex.add_argument("--arch", help="nested_unet | unet (NestedUNet / UNet accepted), or "
                    "package.module:ClassName for any other architecture")
    ex.add_argument("--arch-kwargs", metavar="JSON", help="constructor arguments for --arch "
                    "package.module:ClassName, e.g. '{\"num_classes\": 2}'")
    ex.add_argument("--code-path", metavar="DIR", help="folder with the model's Python code "
                    "(for --arch module:Class or a trusted whole pickled model)")
    ex.add_argument("--trust-checkpoint", action="store_true", help="unpickle the file fully "
                    "(runs code from it): needed for a whole pickled model, torch.save(model)")
    ex.add_argument("--num-classes", type=_count(1))
    ex.add_argument("--input-channels", type=_count(1))
    ex.add_argument("--deep-supervision", action="store_true", default=None,
                    help="the checkpoint has the four deep-supervision heads (final1..final4)")
    ex.add_argument("--size", help="input H or HxW, multiples of 16 (default: config.yml, else 256)")
    ex.add_argument("--opset", type=int, help="ONNX opset (default 17, or the newest "
                    "--target-ort reads); the written model must have exactly this opset")
    ex.add_argument("--exporter", choices=("torchscript", "dynamo"), default="torchscript",
                    help="torch's ONNX exporter (dynamo needs onnxscript)")
    ex.add_argument("--all-heads", action="store_true", help="deep supervision: export every "
                    "head ('logits' = final head, then logits_head1...), not only the final one")
    ex.add_argument("--dynamic-hw", action="store_true", help="symbolic height and width "
                    "(checked against PyTorch at 256x256 and 320x480)")
    ex.add_argument("--activation", choices=("sigmoid", "softmax", "none"), default="sigmoid",
                    help="how the agent turns logits into masks (default sigmoid per class)")
    ex.add_argument("--preset", choices=("default", "pytorch-nested-unet"), default="default",
                    help="input preprocessing the agent applies (default: RGB, /255, ImageNet "
                    "mean/std; pytorch-nested-unet: that repository's cv2/albumentations pipeline)")
    ex.add_argument("--target-ort", metavar="VERSION", help="onnxruntime release on the device "
                    "(e.g. 1.11 on a Jetson Nano): check opset and IR version against it")
    ex.add_argument("--precision", default="fp32,int8", help="comma list of fp32, int8 (static "
                    "QDQ, calibrated), fp16 (for CUDA/TensorRT targets; slower on CPU), "
                    "int8-dynamic (refused for conv nets unless --force); default fp32,int8")
    ex.add_argument("--calib", help="calibration images: folder, glob or video file")
    ex.add_argument("--calib-count", type=_count(1), default=32,
                    help="calibration frames (default 32; a warning below 16)")
    ex.add_argument("--calibration", choices=("minmax", "entropy", "percentile", "auto"),
                    default="minmax", help="INT8 calibration method; auto tries each and keeps "
                    "the best mask IoU vs FP32 (default minmax)")
    ex.add_argument("--max-iou-drop", type=_fraction, default=0.01, help="largest INT8 mask-IoU "
                    "loss vs FP32 accepted; beyond it the worst nodes are kept in float "
                    "(default 0.01)")
    ex.add_argument("--force", action="store_true", help="build --precision int8-dynamic even "
                    "for a convolutional model (ConvInteger)")
    ex.add_argument("--val", help="validation images (default: a held-out part of --calib)")
    ex.add_argument("--val-masks", metavar="DIR", help="ground-truth masks for the --val images "
                    "(same file names, label > 0 = foreground): adds IoU vs ground truth")
    ex.add_argument("--threads", type=_count(1), help="onnxruntime threads when measuring "
                    "latency (default: every core; the same for every artifact)")
    ex.add_argument("--measure-runs", type=_count(3), default=20,
                    help="timed runs per artifact for the median latency (default 20)")
    ex.add_argument("--json", action="store_true", help="print only the JSON report on stdout")

    dp = sub.add_parser("deploy", help="push a model and the agent to a device, verified")
    _add_target_options(dp)
    dp.add_argument("model", help="an ONNX file written by 'edgeseg export'")

    pr = sub.add_parser("profile", help="run the deployed model on the device and report latency")
    _add_target_options(pr)
    pr.add_argument("--source", required=True, help="frames on the device: video, folder, glob, file://")
    pr.add_argument("--model", help="deployed model file name (default: the last deployed)")
    pr.add_argument("--frames", type=_count(1), default=100, help="measured frames (default 100)")
    pr.add_argument("--warmup", type=_count(0), default=10, help="warm-up frames (default 10)")
    pr.add_argument("--threads", type=_count(1), help="onnxruntime intra-op threads on the device")
    pr.add_argument("--save-masks", metavar="LOCAL_DIR", help="bring the masks of every frame back here")

    qs = sub.add_parser("quickstart", help="the whole path on this machine with bundled real data")
    qs.add_argument("--out", default="edgeseg-quickstart", help="work folder (default ./edgeseg-quickstart)")
    qs.add_argument("--frames", type=_count(1), default=40, help="measured frames per profile run")
    qs.add_argument("--json", action="store_true")
    return parser


def _cmd_export(args) -> int:
    from .convert import convert
    from .report import precision_table
    from .userarch import parse_kwargs

    report = convert(checkpoint=args.checkpoint, out_dir=args.out, arch=args.arch,
                     num_classes=args.num_classes, input_channels=args.input_channels,
                     deep_supervision=args.deep_supervision, size=_size(args.size),
                     opset=args.opset, precisions=_precisions(args.precision),
                     calib=args.calib, val=args.val, calib_count=args.calib_count,
                     val_masks=args.val_masks, calibration=args.calibration,
                     max_iou_drop=args.max_iou_drop, force=args.force, threads=args.threads,
                     measure_runs=args.measure_runs,
                     trust=args.trust_checkpoint, code_path=args.code_path,
                     arch_kwargs=parse_kwargs(args.arch_kwargs), exporter=args.exporter,
                     all_heads=args.all_heads, dynamic_hw=args.dynamic_hw,
                     activation=args.activation, preset=args.preset, target_ort=args.target_ort,
                     log=log)
    _emit(args, report, precision_table(report) + "\n\nreport: {}".format(
        os.path.join(args.out, "export.json")))
    return 0 if report["ok"] else 1


def _target(args):
    from .targets import open_target

    if args.python is None:
        args.python = sys.executable if args.target == "local" else "python3"
    return open_target(args.target, identity=args.identity, known_hosts=args.known_hosts,
                       accept_new_host_key=args.accept_new_host_key, log=log)


def _cmd_deploy(args) -> int:
    from .deploy import deploy

    with _target(args) as target:
        result = deploy(target=target, model_path=args.model, install_dir=args.install_dir,
                        python=args.python, log=log)
    _emit(args, result, "deployed {} to {}:{} (sha256 {} verified on the device)".format(
        args.model, result["target"], result["remote_path"], result["model_sha256"][:16]))
    return 0


def _cmd_profile(args) -> int:
    from .profile import profile
    from .report import latency_table

    with _target(args) as target:
        report = profile(target=target, source=args.source, frames=args.frames, warmup=args.warmup,
                         install_dir=args.install_dir, python=args.python, model=args.model,
                         threads=args.threads, fetch_masks=args.save_masks, log=log)
    _emit(args, report, latency_table(report))
    return 0


def _cmd_quickstart(args) -> int:
    from .quickstart import quickstart, summary_text

    result = quickstart(out_dir=args.out, frames=args.frames, log=log)
    _emit(args, result, summary_text(result))
    return 0 if result["ok"] else 1


COMMANDS = {"export": _cmd_export, "deploy": _cmd_deploy, "profile": _cmd_profile,
            "quickstart": _cmd_quickstart}


def _terminated(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help(sys.stderr)
        return 2
    # kill/TERM unwinds like Ctrl-C, so staging folders and temp files are removed on the way out
    with contextlib.suppress(ValueError):  # only the main thread may set handlers
        signal.signal(signal.SIGTERM, _terminated)
    try:
        return COMMANDS[args.command](args)
    except EdgesegError as exc:
        log("edgeseg: error: {}".format(exc))
        return exc.exit_code
    except OSError as exc:  # a path the user gave that cannot be read or written
        log("edgeseg: error: {}{}. Check the path and its permissions.".format(
            exc.strerror or exc, ": " + str(exc.filename) if exc.filename else ""))
        return 1
    except KeyboardInterrupt:
        log("edgeseg: interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
