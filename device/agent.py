"""The agent loop: frames in, masks out, every stage timed."""

from __future__ import annotations

import os
import sys
import time
from typing import Optional

from . import __version__
from .errors import SourceError, UsageError
from .files import file_sha256, write_json
from .metrics import STAGES, device_info, rss_mb, summarize
from .outputs import NullSink, open_sink
from .postprocess import masks_from_logits
from .preprocess import input_size_for, preprocess
from .runner import Runner
from .sources import open_source


def _writable_folder(folder: str, option: str) -> None:
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise UsageError("Cannot create the folder {} for {}: {}.".format(
            folder, option, exc.strerror or exc), "Pass a path in a folder you can write to.")
    if not os.access(folder, os.W_OK):
        raise UsageError("The folder {} for {} is not writable.".format(folder, option),
                         "Pass a path in a folder you can write to.")


def _process(frame, runner, contract, sink):
    """Run one frame through preprocess / inference / postprocess; returns stage times in ms."""
    t0 = time.perf_counter()
    batch = preprocess(frame.image, contract)
    t1 = time.perf_counter()
    logits = runner.run(batch)
    t2 = time.perf_counter()
    masks = masks_from_logits(logits[0], contract, frame.image.shape[:2])
    t3 = time.perf_counter()
    sink.write(frame, masks)
    return {"preprocess": (t1 - t0) * 1e3, "inference": (t2 - t1) * 1e3,
            "postprocess": (t3 - t2) * 1e3}


def _read(source):
    t0 = time.perf_counter()
    frame = source.read()
    return frame, (time.perf_counter() - t0) * 1e3


def run_agent(*, model: str, source: str, frames: int, warmup: int = 5,
              report: Optional[str] = None, save_masks: Optional[str] = None, loop: bool = True,
              threads: Optional[int] = None, providers=None, log=None) -> dict:
    """Run ``warmup`` unmeasured frames then ``frames`` measured ones; returns (and writes) the report."""
    if frames < 1 or warmup < 0:
        raise UsageError("--frames must be >= 1 and --warmup >= 0 (got {} and {}).".format(
            frames, warmup), "Pass a positive frame count.")
    log = log or (lambda msg: print(msg, file=sys.stderr))
    if report:
        _writable_folder(os.path.dirname(os.path.abspath(os.path.expanduser(report))), "--report")
    runner = Runner(model, providers=providers, threads=threads)
    contract = runner.contract
    if runner.export_failures:
        log("edgeseg-agent: warning: this model failed validation when it was exported ({}); "
            "its masks may be wrong".format("; ".join(runner.export_failures)))
    sink = open_sink(save_masks)
    times = {stage: [] for stage in STAGES}
    ages = []
    with open_source(source, loop=loop) as src:
        for i in range(warmup):
            frame, _ = _read(src)
            if frame is None:
                raise SourceError("The source {} ended during warm-up (after {} frames).".format(
                    source, i), "Use a longer source or fewer --warmup frames.")
            _process(frame, runner, contract, NullSink())
        log("edgeseg-agent: warm-up done ({} frames), measuring {} frames".format(warmup, frames))
        wall0 = time.perf_counter()
        last_frame = None
        for _ in range(frames):
            frame, read_ms = _read(src)
            if frame is None:
                break
            stage = _process(frame, runner, contract, sink)
            stage["read"] = read_ms
            stage["total"] = read_ms + stage["preprocess"] + stage["inference"] + stage["postprocess"]
            ages.append((time.monotonic() - frame.t_capture) * 1e3)
            for key, value in stage.items():
                times[key].append(value)
            last_frame = frame
        wall = time.perf_counter() - wall0
        loops = getattr(src, "loops", 0)
        source_frames = src.len_hint
    measured = len(times["total"])
    if measured == 0:
        raise SourceError("The source {} gave no frames to measure.".format(source),
                          "Check the source; without --no-loop a short clip is started over.")
    if measured < frames:
        log("edgeseg-agent: warning: the source ended after {} of {} measured frames".format(
            measured, frames))
    result = {
        "frames": measured,
        "frames_requested": frames,
        "warmup": warmup,
        "fps": round(measured / wall, 3) if wall > 0 else None,
        "wall_s": round(wall, 3),
        "latency_ms": {stage: summarize(times[stage]) for stage in STAGES},
        "frame_age_ms": summarize(ages),
        "providers": runner.providers,
        "requested_providers": runner.requested_providers,
        "provider_fallback": runner.fell_back,
        "onnxruntime": runner.onnxruntime_version,
        "session_ms": round(runner.session_ms, 3),
        "device": device_info(),
        "rss_mb": rss_mb(),
        "model": os.path.abspath(model),
        "model_sha256": file_sha256(model),
        "precision": contract.precision,
        "export_failures": runner.export_failures,
        "input_size": list(input_size_for(last_frame.image.shape[:2], contract)),
        "frame_size": list(last_frame.image.shape[:2]),
        "source": source,
        "source_frames": source_frames,
        "loops": loops,
        "threads": threads,
        "masks_saved": getattr(sink, "written", 0),
        "edgeseg_agent": __version__,
    }
    if report:
        write_json(report, result)
    return result
