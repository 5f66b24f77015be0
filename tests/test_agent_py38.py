"""The packed agent runs on Python 3.8 with the newest onnxruntime that Python 3.8 gets (1.19)."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess

import pytest


def _python38():
    """A working Python 3.8 interpreter (pyenv's shims exit 127 when 3.8 is not selected)."""
    candidates = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.8*/bin/python3.8")))
    candidates += sorted(glob.glob("/root/.pyenv/versions/3.8*/bin/python3.8"))
    candidates += ["/usr/bin/python3.8", shutil.which("python3.8") or ""]
    for path in filter(None, candidates):
        if os.path.isfile(path) and subprocess.run([path, "-c", "pass"]).returncode == 0:
            return path
    pytest.skip("no working Python 3.8 interpreter on this machine (pyenv or /usr/bin/python3.8)")


@pytest.fixture(scope="module")
def py38_env(tmp_path_factory):
    """A Python 3.8 virtual environment with numpy, onnxruntime and pillow from PyPI (no torch)."""
    venv = tmp_path_factory.mktemp("py38") / "venv"
    subprocess.run([_python38(), "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "numpy<2", "onnxruntime<1.20", "pillow"],
                   check=True)
    return py


@pytest.mark.slow
def test_agent_zipapp_runs_on_python38(py38_env, tiny_onnx, frames_dir, tmp_path):
    from edgeseg.host.agentpack import build_agent

    pyz = build_agent(out_path=tmp_path / "agent.pyz")
    check = subprocess.run([str(py38_env), str(pyz), "check", "--json"], capture_output=True,
                           text=True)
    info = json.loads(check.stdout)
    assert check.returncode == 0 and info["python"].startswith("3.8"), check.stderr
    assert info["packages"]["onnxruntime"].startswith("1.19")
    report = tmp_path / "report.json"
    run = subprocess.run([str(py38_env), str(pyz), "run", "--model", str(tiny_onnx), "--source",
                          str(frames_dir), "--frames", "12", "--warmup", "2", "--report", str(report)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    data = json.loads(report.read_text())
    assert data["frames"] == 12 and data["onnxruntime"].startswith("1.19")
    assert data["device"]["python"].startswith("3.8")
