"""Run the deployed model with the agent on a target and bring its latency report back."""

from __future__ import annotations

import json
import os
import posixpath
import shlex
import tempfile
from datetime import datetime
from typing import Callable, Optional

from .deploy import (AGENT_NAME, CURRENT_NAME, SHORT_TIMEOUT, _quiet, check_agent, ensure_agent,
                     run_checked)
from .errors import TargetError, UsageError


def agent_timeout(*, frames: int, warmup: int) -> float:
    """A generous cap so a stuck run cannot hang forever (10 s a frame on top of 10 minutes)."""
    return 600.0 + 10.0 * (max(frames, 0) + max(warmup, 0))


def _read_json(target, remote: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="edgeseg-") as tmp:
        local = os.path.join(tmp, posixpath.basename(remote))
        target.get(remote, local)
        with open(local) as fh:
            try:
                return json.load(fh)
            except ValueError as exc:
                raise TargetError("{}:{} is not valid JSON: {}.".format(target.name, remote, exc),
                                  "Deploy again to rewrite it.") from None


def _exists(target, path: str) -> bool:
    return target.run(["test", "-f", path], timeout=SHORT_TIMEOUT).ok


def _available(target, root: str) -> str:
    res = target.run(["ls", posixpath.join(root, "models")], timeout=SHORT_TIMEOUT)
    names = res.stdout.split() if res.ok else []
    return ", ".join(names) if names else "none"


def resolve_model(*, target, root: str, model: Optional[str]) -> str:
    """The model path on the target: current.json's model, models/NAME, or a device path."""
    if model is None:
        current = posixpath.join(root, CURRENT_NAME)
        if not _exists(target, current):
            raise TargetError("No model is deployed on {} under {} (no {}).".format(
                target.name, root, CURRENT_NAME),
                "Run 'edgeseg deploy' first, or pass --model.")
        model = _read_json(target, current).get("model", "")
    path = target.resolve(model) if "/" in model else posixpath.join(root, "models", model)
    if not _exists(target, path):
        raise TargetError("The model {} is not on {}.".format(path, target.name),
                          "Deployed models there: {}. Run 'edgeseg deploy' with it first.".format(
                              _available(target, root)))
    return path


def _agent_argv(*, python, root, model_path, source, frames, warmup, report, threads, masks):
    argv = [python, posixpath.join(root, AGENT_NAME), "run", "--model", model_path,
            "--source", source, "--frames", str(frames), "--warmup", str(warmup),
            "--report", report]
    if threads:
        argv += ["--threads", str(threads)]
    if masks:
        argv += ["--save-masks", masks]
    return argv


def _local_folder(path) -> None:
    """Create the local mask folder now, so a bad path fails before the device does any work."""
    try:
        os.makedirs(str(path), exist_ok=True)
    except OSError as exc:
        raise UsageError("Cannot create the local folder {} for the masks: {}.".format(
            path, exc.strerror or exc), "Pass --save-masks a folder you can write to.") from exc


def fetch_masks_dir(*, target, remote_dir: str, local_dir, log: Callable[[str], None]) -> int:
    """Copy every mask PNG of ``remote_dir`` into ``local_dir``; returns how many."""
    os.makedirs(local_dir, exist_ok=True)
    names = [n for n in target.listdir(remote_dir) if n.endswith(".png")]
    for name in names:
        target.get(posixpath.join(remote_dir, name), os.path.join(str(local_dir), name))
    log("fetched {} masks from {}:{} to {}".format(len(names), target.name, remote_dir, local_dir))
    return len(names)


def profile(*, target, source: str, frames: int = 100, warmup: int = 5,
            install_dir: str = "~/.edgeseg", python: str = "python3", model: Optional[str] = None,
            threads: Optional[int] = None, save_masks: Optional[str] = None, fetch_masks=None,
            timeout: Optional[float] = None, log: Callable[[str], None] = _quiet) -> dict:
    """Measure the deployed model on ``target`` with frames from ``source`` (a path there)."""
    log = log or _quiet
    if frames < 1 or warmup < 0:
        raise UsageError("--frames must be at least 1 and --warmup at least 0 (got {} and {}).".format(
            frames, warmup), "Pass e.g. --frames 100 --warmup 10.")
    if fetch_masks:
        _local_folder(fetch_masks)
    root = target.resolve(install_dir)
    ensure_agent(target=target, root=root, python=python, log=log)
    check_agent(target=target, root=root, python=python)
    model_path = resolve_model(target=target, root=root, model=model)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    reports = posixpath.join(root, "reports")
    run_checked(target=target, cmd=["mkdir", "-p", reports], what="create " + reports)
    report = posixpath.join(reports, stamp + ".json")
    masks = target.resolve(save_masks) if save_masks else (
        posixpath.join(root, "masks", stamp) if fetch_masks else None)
    argv = _agent_argv(python=python, root=root, model_path=model_path, source=source,
                       frames=frames, warmup=warmup, report=report, threads=threads, masks=masks)
    log("running on {}: {}".format(target.name, " ".join(shlex.quote(a) for a in argv)))
    res = target.run(argv, timeout=timeout or agent_timeout(frames=frames, warmup=warmup))
    if not res.ok:
        tail = (res.stderr.strip() or res.stdout.strip())[-1500:]
        raise TargetError("The agent failed on {} (exit {}): {}".format(
            target.name, res.exit_code, tail), "Fix what the agent reports, then run the command "
            "again.")
    result = _read_json(target, report)
    result.update({"target": target.name, "report_path": report})
    if masks:
        result["masks_dir"] = masks
    if fetch_masks:
        fetch_masks_dir(target=target, remote_dir=masks, local_dir=fetch_masks, log=log)
        result["masks_local"] = os.path.abspath(str(fetch_masks))
    return result
