"""``edgeseg quickstart``: the whole path on this machine with the bundled real data.

train (cached) -> export FP32 + INT8 -> validate -> deploy to ``local`` -> profile both models on a
"microscope scan" of the real nuclei image and on the real street video -> live-mask IoU against the
expert ground truth on the held-out quarter.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from edgeseg.device.files import write_json

from .errors import UsageError
from .report import compare_table, precision_table, table

SCAN = 256  # window and model input size: windows are fed at the image's native scale
CALIB_WINDOWS = 32


def _save_png(path: Path, gray: np.ndarray) -> None:
    Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2)).save(path)


def build_sources(*, out_dir: Path, log) -> dict:
    """Scan, calibration and validation frames cut from the real nuclei image (PNG folders)."""
    from .nuclei import load_nuclei, scan_windows, split_column

    image, truth = load_nuclei()
    height, width = image.shape
    x0 = split_column()
    folders = {name: out_dir / name for name in ("nuclei_scan", "nuclei_calib", "nuclei_val",
                                                 "nuclei_val_masks")}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    scan = scan_windows(size=SCAN, stride=64, height=height, width=width)
    for y, x in scan:
        _save_png(folders["nuclei_scan"] / "scan_y{:03d}_x{:03d}.png".format(y, x),
                  image[y:y + SCAN, x:x + SCAN])
    rng = np.random.default_rng(0)
    for i in range(CALIB_WINDOWS):  # calibration never sees the held-out quarter
        y, x = int(rng.integers(0, height - SCAN + 1)), int(rng.integers(0, x0 - SCAN + 1))
        _save_png(folders["nuclei_calib"] / "calib{:02d}.png".format(i), image[y:y + SCAN, x:x + SCAN])
    for y in range(0, height - SCAN + 1, 32):  # validation windows hold the held-out quarter
        x = width - SCAN
        _save_png(folders["nuclei_val"] / "val_y{:03d}.png".format(y), image[y:y + SCAN, x:x + SCAN])
        Image.fromarray(truth[y:y + SCAN, x:x + SCAN].astype(np.uint8) * 255).save(
            folders["nuclei_val_masks"] / "val_y{:03d}.png".format(y))  # expert ground truth
    manifest = {"window": SCAN, "windows": [[y, x] for y, x in scan], "heldout_x": x0}
    (folders["nuclei_scan"] / "scan.json").write_text(json.dumps(manifest))
    log("quickstart: {} scan frames, {} calibration and {} validation windows in {}".format(
        len(scan), CALIB_WINDOWS, len(list(folders["nuclei_val"].iterdir())), out_dir))
    return {k: str(v) for k, v in folders.items()}


def scan_iou(*, mask_dir: Path) -> dict:
    """Stitch the scan's live masks (majority vote where windows overlap) and score the held-out quarter."""
    from .nuclei import heldout_iou, load_nuclei, split_column

    _, truth = load_nuclei()
    votes = np.zeros(truth.shape, np.float32)
    counts = np.zeros(truth.shape, np.float32)
    used = 0
    for path in sorted(mask_dir.glob("scan_y*_x*.png")):
        y, x = int(path.stem[6:9]), int(path.stem[11:14])
        mask = np.asarray(Image.open(path)) > 127
        votes[y:y + mask.shape[0], x:x + mask.shape[1]] += mask
        counts[y:y + mask.shape[0], x:x + mask.shape[1]] += 1
        used += 1
    covered = counts > 0
    pred = np.zeros(truth.shape, bool)
    pred[covered] = votes[covered] / counts[covered] >= 0.5
    return {"heldout_iou": round(float(heldout_iou(pred, truth, split_column())), 4),
            "frames": used, "coverage": round(float(covered.mean()), 4)}


def quickstart(*, out_dir="edgeseg-quickstart", frames: int = 40, log=None) -> dict:
    """Run the whole path locally; returns a summary with every artifact and report path."""
    from .convert import convert
    from .deploy import deploy
    from .nuclei import data_dir
    from .profile import profile
    from .targets import open_target
    from .train import demo_checkpoint

    log = log or (lambda msg: print(msg, file=sys.stderr))
    if frames < 1:
        raise UsageError("--frames must be at least 1 (got {}).".format(frames),
                         "Pass e.g. --frames 40.")
    out = Path(out_dir).resolve()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError("Cannot use {} as the quickstart folder: {}.".format(
            out, exc.strerror or exc), "Pass --out a new or existing folder.") from exc
    ckpt_dir = Path(demo_checkpoint(log=log))
    train_info = json.loads((ckpt_dir / "train.json").read_text())
    sources = build_sources(out_dir=out / "sources", log=log)
    # the demo's own models, rebuilt from the cached checkpoint on every run: an earlier run's are
    # replaced, not kept in models/previous/ as edgeseg export keeps a user's
    shutil.rmtree(out / "models", ignore_errors=True)
    export = convert(checkpoint=str(ckpt_dir / "model.pth"), out_dir=str(out / "models"),
                     size=[SCAN, SCAN], precisions=("fp32", "int8"), calib=sources["nuclei_calib"],
                     val=sources["nuclei_val"], val_masks=sources["nuclei_val_masks"], log=log)
    street = str(data_dir() / "vtest.avi")
    install_dir = str(out / "device")
    runs, ious = {}, {}
    with open_target("local") as target:
        for art in export["artifacts"]:
            if not art["ok"]:
                continue
            prec = art["precision"]
            deploy(target=target, model_path=art["path"], install_dir=install_dir,
                   python=sys.executable, log=log)
            masks = out / "masks" / prec
            scan_frames = max(frames, len(list(Path(sources["nuclei_scan"]).glob("*.png"))))
            runs[("nuclei scan", prec)] = profile(
                target=target, source=sources["nuclei_scan"], frames=scan_frames, warmup=3,
                install_dir=install_dir, python=sys.executable, model=Path(art["path"]).name,
                fetch_masks=str(masks), log=log)
            ious[prec] = scan_iou(mask_dir=masks)
            runs[("street video", prec)] = profile(
                target=target, source=street, frames=frames, warmup=5, install_dir=install_dir,
                python=sys.executable, model=Path(art["path"]).name, log=log)
    reports_dir = out / "reports"
    reports_dir.mkdir(exist_ok=True)
    report_files = {}
    for (src, prec), rep in runs.items():
        path = reports_dir / "{}.{}.json".format(src.replace(" ", "_"), prec)
        write_json(path, rep)
        report_files["{} {}".format(src, prec)] = str(path)
    return {
        "ok": bool(export["ok"]),
        "checkpoint": str(ckpt_dir),
        "train": train_info,
        "export": export,
        "live_mask_iou": ious,
        "profiles": {"{} {}".format(s, p): r for (s, p), r in runs.items()},
        "reports": report_files,
        "install_dir": install_dir,
        "out_dir": str(out),
    }


def summary_text(result: dict) -> str:
    """The human-readable summary quickstart prints."""
    parts = ["== precision report (parity vs PyTorch and expert ground truth on {} held-out "
             "windows; latency on this machine)".format(
                 result["export"]["artifacts"][0]["parity"]["images"]
                 if result["export"]["artifacts"] else 0),
             precision_table(result["export"])]
    for source in ("nuclei scan", "street video"):
        reps = {p: r for key, r in result["profiles"].items() for p in ("fp32", "int8")
                if key == "{} {}".format(source, p)}
        if reps:
            first = next(iter(reps.values()))
            load = first["device"].get("load_avg")
            parts.append("\n== latency on '{}' ({}x{} frames, {} measured, {} on {}{})".format(
                source, first["frame_size"][1], first["frame_size"][0], first["frames"],
                ",".join(first["providers"]), first["device"]["machine"],
                ", load average {}: other work on the machine inflates these".format(load[0])
                if load and load[0] > 0.5 * (first["device"].get("cpu_count") or 1) else ""))
            parts.append(compare_table(reps))
    rows = [[prec, v["heldout_iou"], v["frames"]] for prec, v in result["live_mask_iou"].items()]
    parts.append("\n== live masks vs expert ground truth (held-out right quarter of the nuclei image)")
    parts.append(table(["model", "IoU", "scan frames"], rows))
    parts.append("PyTorch held-out IoU at training: {}".format(result["train"].get("heldout_iou")))
    parts.append("\ncheckpoint: {}\nmodels:     {}\ndevice dir: {}".format(
        result["checkpoint"], Path(result["export"]["artifacts"][0]["path"]).parent
        if result["export"]["artifacts"] else "-", result["install_dir"]))
    for name, path in result["reports"].items():
        parts.append("report {:22s} {}".format(name + ":", path))
    return "\n".join(parts)
