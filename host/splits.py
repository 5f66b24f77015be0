"""Calibration and validation images: sampled through the agent's frame sources, never overlapping."""

from __future__ import annotations

import hashlib
import math
import os
from typing import Callable, List

import numpy as np

from edgeseg.device.sources import sample_frames, uri_to_path

from .errors import UsageError

HOLDOUT_EVERY = 4  # without --val, every 4th calibration-source frame is held out for validation
VAL_COUNT = 16
MIN_CALIB_WARN = 16  # fewer calibration images than this gives unstable activation ranges


def gather_frames(*, calib, val, calib_count: int, need_calib: bool,
                  log: Callable[[str], None]) -> tuple:
    """(calibration frames, validation frames, validation info); never overlapping."""
    if calib_count < 1:
        raise UsageError("--calib-count must be at least 1 (got {}).".format(calib_count),
                         "Use 32 or more for a stable INT8 calibration.")
    if val:
        calib_frames, val_frames, info = _separate_val(calib=calib, val=val,
                                                       calib_count=calib_count,
                                                       need_calib=need_calib, log=log)
    else:
        calib_frames, val_frames, info = _held_out(calib=calib, calib_count=calib_count)
    if need_calib:
        if not calib_frames:
            raise UsageError("--calib {} gave no frames.".format(calib),
                             "Point it at a folder of images or a video.")
        info["calibration_images"] = len(calib_frames)
        log("{} calibration frames from {}, {} validation frames ({})".format(
            len(calib_frames), calib, len(val_frames), info["source"]))
        if len(calib_frames) < MIN_CALIB_WARN:
            info.setdefault("warnings", []).append(
                "only {} calibration images (fewer than {}): INT8 activation ranges may not "
                "cover real inputs; give --calib more images like those the device will see"
                .format(len(calib_frames), MIN_CALIB_WARN))
            log("warning: " + info["warnings"][-1])
    return calib_frames, val_frames, info


def _separate_val(*, calib, val, calib_count: int, need_calib: bool, log) -> tuple:
    val_frames = sample_frames(val, count=VAL_COUNT)
    if not val_frames:
        raise UsageError("--val {} gave no frames.".format(val),
                         "Point it at a folder of images or a video.")
    info = {"source": "--val", "images": len(val_frames)}
    calib_frames: List = []
    if calib and need_calib:
        if same_source(calib, val):
            info["same_as_calib"] = True
            log("warning: --val is the same source as --calib; validation images were also "
                "used for calibration")
        calib_frames = sample_frames(calib, count=calib_count)
        if not info.get("same_as_calib"):
            calib_frames = _without_val(calib_frames=calib_frames, val_frames=val_frames,
                                        info=info, log=log)
    return calib_frames, val_frames, info


def _without_val(*, calib_frames: List, val_frames: List, info: dict, log) -> List:
    """Calibration frames minus any whose pixels equal a validation frame's (overlapping globs)."""
    seen = {_digest(f) for f in val_frames}
    kept = [f for f in calib_frames if _digest(f) not in seen]
    dropped = len(calib_frames) - len(kept)
    if dropped and not kept:
        raise UsageError("Every --calib image is also a --val image ({} of them); validation "
                         "images must not be calibration images.".format(dropped),
                         "Pass --val images that are not in --calib, or leave --val out to hold "
                         "out part of --calib.")
    if dropped:
        info["dropped_from_calib"] = dropped
        info.setdefault("warnings", []).append(
            "{} --calib image(s) are also --val images and were not used for calibration"
            .format(dropped))
        log("warning: " + info["warnings"][-1])
    return kept


def _digest(frame) -> str:
    image = np.ascontiguousarray(frame.image)
    return hashlib.sha256(str(image.shape).encode() + image.tobytes()).hexdigest()


def _held_out(*, calib, calib_count: int) -> tuple:
    pool = sample_frames(calib, count=int(math.ceil(calib_count * HOLDOUT_EVERY /
                                                    (HOLDOUT_EVERY - 1))))
    if len(pool) < 2:
        raise UsageError("--calib {} gave {} frame(s); holding some out for validation needs "
                         "at least 2.".format(calib, len(pool)),
                         "Add images, or pass separate validation images with --val.")
    held = set(range(HOLDOUT_EVERY - 1, len(pool), HOLDOUT_EVERY)) or {len(pool) - 1}
    val_frames = [f for i, f in enumerate(pool) if i in held]
    calib_frames = [f for i, f in enumerate(pool) if i not in held][:calib_count]
    return calib_frames, val_frames, {"source": "held-out of --calib", "images": len(val_frames),
                                      "every": HOLDOUT_EVERY}


def same_source(a: str, b: str) -> bool:
    return os.path.realpath(uri_to_path(a)) == os.path.realpath(uri_to_path(b))
