"""Deploy an exported model and the agent to a target, verified and atomic.

Layout on the target (``install_dir``, default ``~/.edgeseg``)::

    agent.pyz              the agent zipapp (edgeseg.device), same bytes as host/agentpack builds
    models/NAME.onnx       deployed models; uploads go to models/.NAME.tmp-XXXX, are checked with
                           sha256 on the device, then renamed over the old file (rename is atomic)
    current.json           {"model": NAME, "sha256": ..., "deployed_at": ...}
    reports/*.json         profile reports written by the agent
"""

from __future__ import annotations

import json
import os
import posixpath
import secrets
import shlex
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, List, Optional

from edgeseg.device.contract import Contract
from edgeseg.device.files import file_sha256
from edgeseg.device.runner import failures_recorded

from .agentpack import build_agent
from .errors import DeployError, EdgesegError, ModelError, TargetError

AGENT_NAME = "agent.pyz"
CURRENT_NAME = "current.json"
SHORT_TIMEOUT = 120  # mkdir, mv, hashing, the dependency check
DEVICE_PACKAGES = ["numpy", "onnxruntime", "pillow"]

# Runs on any Python (2.7 too), so a too-old interpreter still gets a clear answer later.
HASH_PY = ("import hashlib,sys\nh=hashlib.sha256()\nf=open(sys.argv[1],'rb')\nwhile True:\n"
           " b=f.read(1048576)\n if not b: break\n h.update(b)\nprint(h.hexdigest())")


FAILED_SUFFIX = ".failed.onnx"  # what edgeseg export names an artifact that failed parity


def _quiet(msg: str) -> None:
    pass


def validate_model(*, model_path) -> Contract:
    """The model's contract, or ModelError if the file is not an edgeseg ONNX model."""
    import onnx

    path = Path(model_path)
    if path.is_dir():
        raise ModelError("{} is a folder, not a model file.".format(path),
                         "Pass the .onnx file written by 'edgeseg export' (e.g. {}/model.int8.onnx)."
                         .format(path))
    if not path.is_file():
        raise ModelError("The model {} does not exist.".format(path),
                         "Pass the .onnx file written by 'edgeseg export'.")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises several types for a file that is not ONNX
        raise ModelError("{} is not an ONNX model ({}).".format(path, exc),
                         "Pass the .onnx file written by 'edgeseg export'.") from None
    if model.ir_version <= 0 or not model.graph.node:
        raise ModelError("{} is not an ONNX model (no graph in it).".format(path),
                         "Pass the .onnx file written by 'edgeseg export'.")
    metadata = {prop.key: prop.value for prop in model.metadata_props}
    failures = failures_recorded(metadata)
    if failures:
        raise _failed(path, "recorded in the file: " + "; ".join(failures))
    return Contract.from_metadata(metadata, source=str(path))


def _failed(path, why: str) -> ModelError:
    return ModelError("{} failed validation when it was exported ({}); it is not deployed."
                      .format(path, why),
                      "Deploy a model that passed (model.<precision>.onnx), or re-export: more "
                      "calibration images, --calibration auto, a looser --max-iou-drop.")


def python_not_found(*, target, python: str, detail: str) -> TargetError:
    return TargetError(
        "Python {!r} was not found on {} ({}).".format(python, target.name, detail.strip()[-200:]),
        "Install Python 3.8+ there (e.g. sudo apt install python3 python3-pip), or pass --python "
        "with the interpreter's full path on the device.")


def run_checked(*, target, cmd: List[str], timeout: float = SHORT_TIMEOUT, what: str):
    """Run a command that must succeed; DeployError with its stderr otherwise."""
    res = target.run(cmd, timeout=timeout)
    if not res.ok:
        raise DeployError("Could not {} on {}: {} (exit {}).".format(
            what, target.name, (res.stderr or res.stdout).strip()[-300:], res.exit_code),
            "Check permissions and free space under the install directory on the device.")
    return res


def remote_sha256(*, target, path: str, python: str) -> Optional[str]:
    """sha256 of a file computed ON the target with its own Python (None if it is missing)."""
    res = target.run([python, "-c", HASH_PY, path], timeout=SHORT_TIMEOUT)
    if res.exit_code in (126, 127):
        raise python_not_found(target=target, python=python, detail=res.stderr)
    return res.stdout.strip() if res.ok else None


def upload_verified(*, target, local_path, remote_path: str, python: str,
                    sha256: Optional[str] = None) -> str:
    """Upload to a temp name beside ``remote_path``, check sha256 on the device, then rename.

    On a mismatch the temp file is deleted and DeployError raised; ``remote_path`` is untouched.
    """
    expected = sha256 or file_sha256(local_path)
    folder, name = posixpath.split(remote_path)
    tmp = posixpath.join(folder, ".{}.tmp-{}".format(name, secrets.token_hex(4)))
    try:
        target.put(local_path, tmp)
        actual = remote_sha256(target=target, path=tmp, python=python)
        if actual != expected:
            raise DeployError(
                "The upload of {} to {}:{} is corrupt: sha256 on the device is {}, expected "
                "{}.".format(Path(local_path).name, target.name, remote_path, actual, expected),
                "Nothing was replaced ({} is as before). Retry; if it repeats, check the "
                "device's storage and free space (df -h).".format(remote_path))
        run_checked(target=target, cmd=["mv", "-f", tmp, remote_path], what="rename the upload")
    except BaseException:
        _remove_quiet(target, tmp)
        raise
    return expected


def _remove_quiet(target, path: str) -> None:
    try:
        target.run(["rm", "-f", path], timeout=SHORT_TIMEOUT)
    except EdgesegError:
        pass


def ensure_agent(*, target, root: str, python: str, log: Callable[[str], None] = _quiet) -> str:
    """Make ``root/agent.pyz`` the agent this host would build; returns its sha256."""
    local = build_agent()
    sha = file_sha256(local)
    remote = posixpath.join(root, AGENT_NAME)
    if remote_sha256(target=target, path=remote, python=python) == sha:
        log("agent on {} is up to date ({})".format(target.name, sha[:12]))
        return sha
    run_checked(target=target, cmd=["mkdir", "-p", root], what="create " + root)
    log("uploading the agent to {}:{}".format(target.name, remote))
    return upload_verified(target=target, local_path=local, remote_path=remote, python=python,
                           sha256=sha)


def _last_json(text: str) -> Optional[dict]:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


def install_hint(*, python: str, missing: List[str]) -> str:
    packages = " ".join(shlex.quote(m) for m in missing)
    hint = ("Install them there in a virtual environment (Raspberry Pi OS and Debian refuse pip "
            "into the system Python): python3 -m venv ~/edgeseg-venv && ~/edgeseg-venv/bin/pip "
            "install {}, then pass --python ~/edgeseg-venv/bin/python; or {} -m pip install {} "
            "where that is allowed".format(packages, python, packages))
    if any(m.startswith("onnxruntime") for m in missing):
        hint += (" (on a Jetson, install NVIDIA's onnxruntime-gpu wheel for your JetPack instead "
                 "of onnxruntime)")
    return hint + "."


def check_agent(*, target, root: str, python: str) -> dict:
    """Run ``agent.pyz check --json`` on the target; TargetError naming anything missing."""
    res = target.run([python, posixpath.join(root, AGENT_NAME), "check", "--json"],
                     timeout=SHORT_TIMEOUT)
    if res.exit_code in (126, 127):
        raise python_not_found(target=target, python=python, detail=res.stderr)
    data = _last_json(res.stdout)
    if data is None:
        raise TargetError("The agent's dependency check failed on {} (exit {}): {}".format(
            target.name, res.exit_code, (res.stderr or res.stdout).strip()[-500:]),
            "Run '{} {}/agent.pyz check' on the device to see why.".format(python, root))
    if data.get("error") == "python_too_old":
        raise TargetError("Python {!r} on {} is version {}; the agent needs 3.8 or newer.".format(
            python, target.name, data.get("python")),
            "Install python3.8+ on the device and pass its path with --python.")
    if not data.get("ok"):
        missing = list(data.get("missing") or []) + list(data.get("too_old") or [])
        raise TargetError("{} cannot run the agent: Python {!r} ({}) lacks {}.".format(
            target.name, python, data.get("python"), ", ".join(missing) or "some packages"),
            install_hint(python=python, missing=missing or DEVICE_PACKAGES))
    return data


def write_current(*, target, root: str, record: dict, python: str) -> None:
    """Atomically replace ``root/current.json`` (verified upload + rename)."""
    with tempfile.TemporaryDirectory(prefix="edgeseg-") as tmp:
        path = os.path.join(tmp, CURRENT_NAME)
        with open(path, "w") as fh:
            json.dump(record, fh, indent=2, sort_keys=True)
            fh.write("\n")
        upload_verified(target=target, local_path=path,
                        remote_path=posixpath.join(root, CURRENT_NAME), python=python)


def deploy(*, target, model_path, install_dir: str = "~/.edgeseg", python: str = "python3",
           log: Callable[[str], None] = _quiet) -> dict:
    """Upload the agent and ``model_path`` to ``target`` and make it the current model."""
    log = log or _quiet
    name = Path(model_path).name
    if name.endswith(FAILED_SUFFIX):
        raise _failed(model_path, "its reasons are in the export.json beside it")
    contract = validate_model(model_path=model_path)
    model_sha = file_sha256(model_path)
    root = target.resolve(install_dir)
    agent_sha = ensure_agent(target=target, root=root, python=python, log=log)
    env = check_agent(target=target, root=root, python=python)
    log("{}: Python {}, onnxruntime {}".format(target.name, env.get("python"),
                                              env["packages"].get("onnxruntime")))
    models = posixpath.join(root, "models")
    remote_model = posixpath.join(models, name)
    if remote_sha256(target=target, path=remote_model, python=python) == model_sha:
        log("{} is already on {} (sha256 {})".format(name, target.name, model_sha[:12]))
    else:
        run_checked(target=target, cmd=["mkdir", "-p", models], what="create " + models)
        log("uploading {} ({:.1f} MB, {}, {}x{}) to {}:{}".format(
            name, Path(model_path).stat().st_size / 1e6, contract.precision, contract.height,
            contract.width, target.name, remote_model))
        upload_verified(target=target, local_path=model_path, remote_path=remote_model,
                        python=python, sha256=model_sha)
    deployed_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    write_current(target=target, root=root, python=python,
                  record={"model": name, "sha256": model_sha, "deployed_at": deployed_at})
    return {"ok": True, "target": target.name, "model": name, "model_sha256": model_sha,
            "remote_path": remote_model, "install_dir": root, "agent_sha256": agent_sha,
            "python": env.get("python"), "executable": env.get("executable"),
            "packages": env.get("packages"), "deployed_at": deployed_at}
