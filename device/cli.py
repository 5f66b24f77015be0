"""edgeseg-agent: the on-device command line (Python 3.8+, no torch/onnx/fabric)."""

from __future__ import annotations

import argparse
import json
import platform
import sys

from . import __version__
from .errors import EdgesegError

# Package import name -> (distribution to install, minimum version, needed for)
REQUIREMENTS = {
    "numpy": ("numpy", (1, 19), "all"),
    "onnxruntime": ("onnxruntime", (1, 10), "all"),
    "PIL": ("pillow", (8, 0), "all"),
    "cv2": ("opencv-python-headless", (4, 5), "video files and cameras"),
}


def _version_tuple(text):
    parts = []
    for piece in str(text).split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def check_environment() -> dict:
    """Which of the agent's packages this Python has, and whether they are new enough."""
    packages, missing, too_old = {}, [], []
    for module, (dist, minimum, needed_for) in REQUIREMENTS.items():
        try:
            mod = __import__(module)
            version = getattr(mod, "__version__", "unknown")
        except Exception:  # a broken install counts as missing
            version = None
        packages[module] = version
        if needed_for != "all":
            continue
        if version is None:
            missing.append(dist)
        elif version != "unknown" and _version_tuple(version) < minimum:
            too_old.append("{}>={}".format(dist, ".".join(map(str, minimum))))
    return {
        "ok": not missing and not too_old,
        "python": platform.python_version(),
        "executable": sys.executable,
        "packages": packages,
        "missing": missing,
        "too_old": too_old,
        "agent": __version__,
    }


def _parser():
    parser = argparse.ArgumentParser(prog="edgeseg-agent", description=__doc__)
    parser.add_argument("--version", action="version", version="edgeseg-agent " + __version__)
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="segment frames from a source and measure latency")
    run.add_argument("--model", required=True, help="ONNX model exported by 'edgeseg export'")
    run.add_argument("--source", required=True,
                     help="video file, image, folder of images, glob, or file:// URI")
    run.add_argument("--frames", type=int, default=100, help="measured frames (default 100)")
    run.add_argument("--warmup", type=int, default=5, help="unmeasured warm-up frames (default 5)")
    run.add_argument("--report", help="write the JSON report here")
    run.add_argument("--save-masks", metavar="DIR", help="write one mask PNG per measured frame")
    run.add_argument("--threads", type=int, help="onnxruntime intra-op threads")
    run.add_argument("--providers", help="comma list, e.g. cuda,cpu (default: CUDA if present, CPU)")
    run.add_argument("--no-loop", dest="loop", action="store_false",
                     help="stop at the end of a file source instead of starting it over")
    run.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    check = sub.add_parser("check", help="check that this Python has what the agent needs")
    check.add_argument("--json", action="store_true")
    return parser


def _cmd_run(args) -> int:
    from .agent import run_agent

    providers = [p for p in args.providers.split(",") if p] if args.providers else None
    report = run_agent(model=args.model, source=args.source, frames=args.frames,
                       warmup=args.warmup, report=args.report, save_masks=args.save_masks,
                       loop=args.loop, threads=args.threads, providers=providers)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        total = report["latency_ms"]["total"]
        print("{} frames, {:.2f} FPS, total p50 {:.1f} ms, p95 {:.1f} ms, providers {}".format(
            report["frames"], report["fps"], total["p50"], total["p95"],
            ",".join(report["providers"])))
    return 0


def _cmd_check(args) -> int:
    result = check_environment()
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        for name, version in sorted(result["packages"].items()):
            print("{:12s} {}".format(name, version or "MISSING"))
        if not result["ok"]:
            print("missing: " + ", ".join(result["missing"] + result["too_old"]))
    return 0 if result["ok"] else 3


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help(sys.stderr)
        return 2
    try:
        return _cmd_run(args) if args.command == "run" else _cmd_check(args)
    except EdgesegError as exc:
        print("edgeseg-agent: error: {}".format(exc), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("edgeseg-agent: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
