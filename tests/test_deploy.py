"""Agent packing, deploy and profile against the local target and a real sshd."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from sshd import sshd_server  # noqa: F401  (pytest fixture)

from edgeseg.host.agentpack import build_agent
from edgeseg.host.convert import mark_failed
from edgeseg.host.deploy import deploy, upload_verified, validate_model
from edgeseg.host.errors import DeployError, ModelError, TargetError
from edgeseg.host.profile import profile
from edgeseg.host.targets import open_target

PY = sys.executable


def _sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def ssh_target(sshd_server):
    with open_target(sshd_server.spec, identity=sshd_server.identity,
                     known_hosts=sshd_server.known_hosts) as target:
        yield target


@pytest.fixture
def not_onnx(tmp_path) -> Path:
    path = tmp_path / "model.onnx"
    path.write_text("this is a text file, not a model\n" * 20)
    return path


# -- agent zipapp ------------------------------------------------------------------------------

def test_agent_zipapp_is_deterministic_and_runs(tmp_path):
    a = build_agent(out_path=tmp_path / "a.pyz")
    b = build_agent(out_path=tmp_path / "b.pyz")
    assert a.read_bytes() == b.read_bytes()
    cached = build_agent()
    assert cached.parent == Path(os.environ["EDGESEG_CACHE_DIR"]) / "agent"
    assert cached.read_bytes() == a.read_bytes() and _sha(a)[:16] in cached.name
    names = zipfile.ZipFile(a).namelist()
    assert {"__main__.py", "edgeseg/__init__.py", "edgeseg/device/cli.py"} <= set(names)
    assert not [n for n in names if "host" in n or n.endswith(".pyc")]
    res = subprocess.run([PY, str(a), "check", "--json"], capture_output=True, text=True)
    assert res.returncode == 0 and json.loads(res.stdout)["ok"] is True


def test_agent_refuses_old_python_with_json(tmp_path):
    pyz = build_agent(out_path=tmp_path / "a.pyz")
    fake_old = ("import sys, runpy; sys.version_info = (3, 6, 9, 'final', 0); "
                "runpy.run_path(sys.argv[1], run_name='__main__')")
    res = subprocess.run([PY, "-c", fake_old, str(pyz)], capture_output=True, text=True)
    assert res.returncode == 3
    assert json.loads(res.stdout)["error"] == "python_too_old"
    assert "3.6.9" in res.stderr and "3.8" in res.stderr


# -- model validation --------------------------------------------------------------------------

def test_validate_model_refuses_non_onnx_and_missing_contract(tmp_path, not_onnx, tiny_onnx):
    import onnx

    assert validate_model(model_path=tiny_onnx).input_size == [64, 64]
    with pytest.raises(ModelError, match="not an ONNX model"):
        validate_model(model_path=not_onnx)
    (tmp_path / "rand.onnx").write_bytes(os.urandom(4096))
    with pytest.raises(ModelError):
        validate_model(model_path=tmp_path / "rand.onnx")
    bare = onnx.load(str(tiny_onnx))
    del bare.metadata_props[:]
    onnx.save(bare, str(tmp_path / "bare.onnx"))
    with pytest.raises(ModelError, match="no edgeseg contract"):
        validate_model(model_path=tmp_path / "bare.onnx")
    with pytest.raises(ModelError, match="does not exist"):
        validate_model(model_path=tmp_path / "nope.onnx")


# -- deploy over SSH ---------------------------------------------------------------------------

@pytest.mark.ssh
def test_deploy_refuses_non_onnx_before_touching_target(ssh_target, not_onnx, tmp_path):
    install = tmp_path / "inst"
    with pytest.raises(ModelError):
        deploy(target=ssh_target, model_path=not_onnx, install_dir=str(install), python=PY)
    assert not install.exists()


def test_deploy_refuses_a_model_that_failed_export_validation(tiny_onnx, tmp_path):
    failed = tmp_path / "model.int8.failed.onnx"
    failed.write_bytes(tiny_onnx.read_bytes())
    install = tmp_path / "inst"
    with open_target("local") as target, pytest.raises(ModelError) as err:
        deploy(target=target, model_path=failed, install_dir=str(install), python=PY)
    assert "failed validation" in str(err.value) and "export.json" in str(err.value)
    assert not install.exists()  # refused before anything reached the device


def test_a_renamed_copy_of_a_failed_model_is_still_refused(tiny_onnx, tmp_path):
    renamed = tmp_path / "renamed.onnx"
    renamed.write_bytes(tiny_onnx.read_bytes())
    mark_failed(str(renamed), failures=["mask IoU vs PyTorch 0.41 < 0.98"])
    install = tmp_path / "inst"
    with open_target("local") as target, pytest.raises(ModelError) as err:
        deploy(target=target, model_path=renamed, install_dir=str(install), python=PY)
    assert "failed validation" in str(err.value) and "0.41 < 0.98" in str(err.value)
    assert not install.exists()


def test_the_agent_warns_when_run_directly_on_a_failed_model(tiny_onnx, frames_dir, tmp_path):
    from edgeseg.device.agent import run_agent

    failed = tmp_path / "copy.onnx"
    failed.write_bytes(tiny_onnx.read_bytes())
    mark_failed(str(failed), failures=["max abs err 0.5 > 0.001"])
    logs = []
    report = run_agent(model=str(failed), source=str(frames_dir), frames=2, warmup=0,
                       log=logs.append)
    assert report["export_failures"] == ["max abs err 0.5 > 0.001"]
    assert any("failed validation" in m and "0.5 > 0.001" in m for m in logs)


@pytest.mark.ssh
def test_deploy_names_missing_python(ssh_target, tiny_onnx, tmp_path):
    install = tmp_path / "inst"
    with pytest.raises(TargetError, match="was not found on") as info:
        deploy(target=ssh_target, model_path=tiny_onnx, install_dir=str(install),
               python=str(tmp_path / "no-python3"))
    assert "--python" in str(info.value)
    assert not install.exists()


@pytest.mark.ssh
def test_deploy_names_missing_onnxruntime(ssh_target, tiny_onnx, tmp_path):
    empty = tmp_path / "emptyvenv"
    subprocess.run([PY, "-m", "venv", "--without-pip", str(empty)], check=True)
    install = tmp_path / "inst"
    with pytest.raises(TargetError, match="onnxruntime") as info:
        deploy(target=ssh_target, model_path=tiny_onnx, install_dir=str(install),
               python=str(empty / "bin" / "python"))
    text = str(info.value)
    assert ssh_target.name in text and "-m pip install numpy onnxruntime pillow" in text
    assert "Jetson" in text
    assert not (install / "models").exists() and not (install / "current.json").exists()


@pytest.mark.ssh
def test_deploy_verifies_and_switches_atomically(ssh_target, tiny_onnx, tmp_path):
    import onnx

    install = tmp_path / "inst"
    logs = []
    out = deploy(target=ssh_target, model_path=tiny_onnx, install_dir=str(install), python=PY,
                 log=logs.append)
    remote = install / "models" / "tiny.onnx"
    assert out["ok"] and out["remote_path"] == str(remote) and out["target"] == ssh_target.name
    assert out["model_sha256"] == _sha(remote) == _sha(tiny_onnx)
    assert out["agent_sha256"] == _sha(install / "agent.pyz") == _sha(build_agent())
    assert out["packages"]["onnxruntime"] and out["python"]
    current = json.loads((install / "current.json").read_text())
    assert current["model"] == "tiny.onnx" and current["sha256"] == out["model_sha256"]
    assert sorted(os.listdir(install / "models")) == ["tiny.onnx"]  # no temp files left
    assert not [n for n in os.listdir(install) if ".tmp-" in n]
    # A new model under the same name replaces the old one; the agent is not re-sent.
    proto = onnx.load(str(tiny_onnx))
    proto.doc_string = "version 2"
    other = tmp_path / "tiny.onnx"
    onnx.save(proto, str(other))
    assert _sha(other) != out["model_sha256"]
    logs.clear()
    again = deploy(target=ssh_target, model_path=other, install_dir=str(install), python=PY,
                   log=logs.append)
    assert _sha(remote) == _sha(other) == again["model_sha256"]
    assert any("up to date" in line for line in logs)
    assert json.loads((install / "current.json").read_text())["sha256"] == _sha(other)


@pytest.mark.ssh
def test_failed_verification_keeps_previous_file(ssh_target, tiny_onnx, tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    old = folder / "tiny.onnx"
    old.write_bytes(b"previous model bytes")
    with pytest.raises(DeployError, match="corrupt") as info:
        upload_verified(target=ssh_target, local_path=tiny_onnx, remote_path=str(old),
                        python=PY, sha256="0" * 64)
    assert "as before" in str(info.value)
    assert old.read_bytes() == b"previous model bytes"
    assert os.listdir(folder) == ["tiny.onnx"]  # the temp upload was removed


# -- profile -----------------------------------------------------------------------------------

def test_local_deploy_and_profile(tiny_onnx, frames_dir, tmp_path):
    install = tmp_path / "inst"
    with open_target("local") as target:
        out = deploy(target=target, model_path=tiny_onnx, install_dir=str(install), python=PY)
        assert out["target"] == "local" and _sha(out["remote_path"]) == _sha(tiny_onnx)
        rep = profile(target=target, source=str(frames_dir), frames=5, warmup=1,
                      install_dir=str(install), python=PY, threads=1,
                      fetch_masks=tmp_path / "masks")
    assert rep["target"] == "local" and rep["frames"] == 5
    assert rep["model_sha256"] == _sha(tiny_onnx)
    assert Path(rep["report_path"]).parent == install / "reports"
    assert json.loads(Path(rep["report_path"]).read_text())["frames"] == 5
    pngs = sorted(p.name for p in (tmp_path / "masks").iterdir())
    assert pngs == ["crop{:02d}.png".format(i) for i in range(1, 6)]  # crop00 was warm-up


def test_local_old_python_is_named(tiny_onnx, tmp_path):
    """A Python older than 3.8 (simulated) gets a clear TargetError, not a traceback."""
    fake = tmp_path / "python3.6"
    fake.write_text(
        "#!/bin/sh\ncase \"$1\" in -c) exec {py} \"$@\";; esac\n"
        "exec {py} -c 'import sys, runpy; sys.version_info = (3, 6, 9, \"final\", 0); "
        "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name=\"__main__\")' \"$@\"\n"
        .format(py=PY))
    fake.chmod(0o755)
    with pytest.raises(TargetError, match="version 3.6.9; the agent needs 3.8"):
        deploy(target=open_target("local"), model_path=tiny_onnx,
               install_dir=str(tmp_path / "inst"), python=str(fake))


def test_profile_without_deploy_says_so(tmp_path, frames_dir):
    with pytest.raises(TargetError, match="No model is deployed"):
        profile(target=open_target("local"), source=str(frames_dir), frames=2, warmup=0,
                install_dir=str(tmp_path / "inst"), python=PY)


@pytest.mark.ssh
def test_profile_reports_agent_error(ssh_target, tiny_onnx, tmp_path):
    install = str(tmp_path / "inst")
    deploy(target=ssh_target, model_path=tiny_onnx, install_dir=install, python=PY)
    with pytest.raises(TargetError, match="The agent failed on") as info:
        profile(target=ssh_target, source=str(tmp_path / "no-such-frames"), frames=2, warmup=0,
                install_dir=install, python=PY)
    assert "no-such-frames" in str(info.value)
    with pytest.raises(TargetError, match="not on"):
        profile(target=ssh_target, source=str(tmp_path), frames=2, warmup=0,
                install_dir=install, python=PY, model="other.onnx")
