"""--target-ort: opset and IR version fitted to (or refused for) the device's onnxruntime."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import onnx
import pytest

from edgeseg.device.contract import Contract
from edgeseg.host import ortcompat
from edgeseg.host.convert import convert
from edgeseg.host.errors import ExportError, UsageError
from edgeseg.host.export import export_proto

from models_util import nuclei_folder, random_net, write_checkpoint

SIZE = 32


def quiet(message):
    pass


def test_what_releases_read():
    assert ortcompat.reads("1.11") == (16, 8)  # the newest onnxruntime-gpu for the Jetson Nano
    assert ortcompat.reads("1.16.3") == (19, 9)  # the newest manylinux2014_aarch64 wheel
    assert ortcompat.reads("1.99") == ortcompat.reads("1.23")
    assert ortcompat.default_opset("1.11", 20) == 16
    assert ortcompat.default_opset(None, 20) == 17
    with pytest.raises(UsageError, match="older than the agent supports"):
        ortcompat.reads("1.8")
    with pytest.raises(UsageError, match="not an onnxruntime version"):
        ortcompat.reads("latest")


def test_opset_newer_than_the_target_reads_is_refused_naming_both(tmp_path):
    with pytest.raises(ExportError) as err:
        convert(checkpoint=tmp_path / "unused.pth", out_dir=tmp_path / "out", opset=17,
                target_ort="1.11", precisions=("fp32",), val="x", log=quiet)
    assert "--opset 17" in str(err.value) and "onnxruntime 1.11" in str(err.value)
    assert "opset 16" in str(err.value) and "--opset 16" in err.value.hint


def test_ir_version_is_lowered_when_safe_and_refused_otherwise():
    # The dynamo exporter stamps IR 10 even at opset 17; onnxruntime 1.16 reads IR 9 at most.
    proto, _ = export_proto(model=random_net("unet"), size_hw=(SIZE, SIZE), opset=17,
                            contract=Contract(input_size=[SIZE, SIZE]), input_channels=3,
                            exporter="dynamo")
    assert proto.ir_version == 10
    fixes = ortcompat.fit_target(proto, "1.16.3", what="the fp32 model")
    assert proto.ir_version == 9 and fixes == [
        "the fp32 model: IR version lowered from 10 to 9 for onnxruntime 1.16.3"]
    with pytest.raises(ExportError) as err:  # opset 17 is beyond what 1.11 reads
        ortcompat.fit_target(proto, "1.11", what="the fp32 model")
    assert "opset 17" in str(err.value) and "onnxruntime 1.11 reads opset 16" in str(err.value)
    proto.ir_version = 10
    proto.graph.initializer[0].data_type = onnx.TensorProto.FLOAT8E4M3FN  # an IR 9 type
    with pytest.raises(ExportError, match="needs ONNX IR version 9 .* reads IR version 8"):
        ortcompat.fit_target(proto, "1.13", what="the model")


def test_target_picks_the_default_opset_and_is_recorded(tmp_path):
    ckpt = write_checkpoint(tmp_path / "ckpt", random_net("unet", seed=2), arch="UNet", size=SIZE)
    val = nuclei_folder(tmp_path / "val", 2, 48, seed=6)
    report = convert(checkpoint=ckpt, out_dir=tmp_path / "out", precisions=("fp32",),
                     val=str(val), target_ort="1.11", log=quiet)
    assert report["ok"] and report["options"]["target_ort"] == "1.11"
    (art,) = report["artifacts"]
    assert art["opset"] == 16 and art["ir_version"] <= 8
    assert report["options"]["opset"] == 16


# --- the artifacts in a real onnxruntime 1.16.3 (numpy < 2), as on a 64-bit Arm board --------

AGENT_CHECK = """
import json, sys
import numpy, onnxruntime
results = {"onnxruntime": onnxruntime.__version__, "numpy": numpy.__version__, "models": {}}
for path in sys.argv[1:]:
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    shape = [d if isinstance(d, int) else (1 if i == 0 else 64)  # symbolic: batch 1, H/W 64
             for i, d in enumerate(session.get_inputs()[0].shape)]
    out = session.run(None, {session.get_inputs()[0].name: numpy.zeros(shape, numpy.float32)})
    results["models"][path] = [list(o.shape) for o in out]
print(json.dumps(results))
"""


def _ort116_python():
    """A venv with onnxruntime 1.16.3 and numpy < 2 from PyPI, cached with the test cache."""
    venv = os.path.join(os.environ["EDGESEG_CACHE_DIR"], "venv-ort-1.16.3")
    python = os.path.join(venv, "bin", "python")
    if not os.path.exists(os.path.join(venv, "ok")):
        subprocess.run([sys.executable, "-m", "venv", "--clear", venv], check=True)
        subprocess.run([python, "-m", "pip", "install", "-q", "onnxruntime==1.16.3", "numpy<2",
                        "pillow"], check=True)
        open(os.path.join(venv, "ok"), "w").close()
    return python


@pytest.mark.slow
def test_every_artifact_kind_loads_and_runs_in_onnxruntime_1_16(tmp_path):
    from edgeseg.host.agentpack import build_agent

    python = _ort116_python()
    calib = nuclei_folder(tmp_path / "calib", 8, 48, seed=1)
    val = nuclei_folder(tmp_path / "val", 2, 48, seed=2)
    kinds = {
        "unet-fp32-int8": dict(net=random_net("unet", seed=1), arch="UNet", precisions=("fp32", "int8")),
        "nested-all-heads": dict(net=random_net("nested_unet", seed=2, num_classes=2,
                                                deep_supervision=True),
                                 arch="NestedUNet", num_classes=2, deep_supervision=True,
                                 all_heads=True, activation="softmax"),
        "grey-dynamic": dict(net=random_net("unet", seed=3, channels=1), arch="UNet", channels=1,
                             dynamic_hw=True),
        "preset-dynamo": dict(net=random_net("unet", seed=4), arch="UNet",
                              preset="pytorch-nested-unet", exporter="dynamo"),
    }
    models = []
    for name, spec in kinds.items():
        ckpt = write_checkpoint(tmp_path / name, spec.pop("net"), arch=spec.pop("arch"), size=SIZE,
                                num_classes=spec.pop("num_classes", 1),
                                channels=spec.pop("channels", 3),
                                deep_supervision=spec.pop("deep_supervision", False))
        precisions = spec.pop("precisions", ("fp32",))
        report = convert(checkpoint=ckpt, out_dir=tmp_path / name / "out", precisions=precisions,
                         calib=str(calib), val=str(val), calib_count=6, target_ort="1.16.3",
                         log=quiet, **spec)
        assert report["ok"], (name, [a["failures"] for a in report["artifacts"]])
        for art in report["artifacts"]:
            assert art["opset"] == 17 and art["ir_version"] <= 9, (name, art)
            models.append(art["path"])
    assert len(models) == 5
    check = subprocess.run([python, "-c", AGENT_CHECK] + models, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    loaded = json.loads(check.stdout)
    assert loaded["onnxruntime"] == "1.16.3" and loaded["numpy"].startswith("1.")
    assert set(loaded["models"]) == set(models)
    pyz = build_agent(out_path=tmp_path / "agent.pyz")
    for model in models:
        report = tmp_path / "agent-report.json"
        run = subprocess.run([python, str(pyz), "run", "--model", model, "--source", str(val),
                              "--frames", "3", "--warmup", "1", "--report", str(report)],
                             capture_output=True, text=True)
        assert run.returncode == 0, (model, run.stderr)
        data = json.loads(report.read_text())
        assert data["frames"] == 3 and data["onnxruntime"] == "1.16.3", model
