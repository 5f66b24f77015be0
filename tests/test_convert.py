"""convert(): the whole export pipeline on real checkpoints, real crops, real onnxruntime."""

from __future__ import annotations

import hashlib
import json
import os

import onnx
import pytest

import edgeseg.host.tuning as tuning_mod
import edgeseg.host.validate as validate_mod
from edgeseg.device.contract import VALIDATION_KEY
from edgeseg.device.errors import EdgesegError
from edgeseg.device.runner import Runner
from edgeseg.host.convert import convert
from edgeseg.host.errors import ExportError, UsageError

from models_util import nuclei_folder, random_net, trained_unet, write_checkpoint

SIZE = 32


def quiet(message):
    pass


@pytest.fixture(scope="module")
def nested_ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    return write_checkpoint(folder, random_net("nested_unet", seed=11), size=SIZE)


@pytest.fixture(scope="module")
def calib_dir(tmp_path_factory):
    return nuclei_folder(tmp_path_factory.mktemp("calib"), 8, 48, seed=1)


@pytest.fixture(scope="module")
def val_dir(tmp_path_factory):
    return nuclei_folder(tmp_path_factory.mktemp("val"), 3, 48, seed=2)


def _sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_fp32_export_writes_checked_artifact_and_report(tmp_path, nested_ckpt, val_dir, capsys):
    out = tmp_path / "out"
    report = convert(checkpoint=nested_ckpt, out_dir=out, opset=11, precisions=("fp32",),
                     val=str(val_dir), log=quiet)
    assert capsys.readouterr().out == ""
    assert report["ok"] is True
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "model.fp32.onnx"]
    assert json.loads((out / "export.json").read_text()) == json.loads(json.dumps(report))
    (art,) = report["artifacts"]
    path = out / "model.fp32.onnx"
    assert art["precision"] == "fp32" and art["ok"] and art["path"] == str(path)
    assert art["bytes"] == path.stat().st_size and art["sha256"] == _sha(path)
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # like any file the user writes
    assert art["opset"] == 11 and art["failures"] == []
    assert art["parity"]["images"] == 3 and art["parity"]["max_abs_err"] <= 1e-3
    assert [(e.domain, e.version) for e in onnx.load(str(path)).opset_import] == [("", 11)]
    assert report["validation"] == {"source": "--val", "images": 3}
    assert set(report["versions"]) == {"torch", "onnx", "onnxruntime", "onnxsim", "onnxscript",
                                       "edgeseg"}
    assert report["contract"]["input_size"] == [SIZE, SIZE]  # from config.yml input_h/input_w
    assert report["checkpoint"]["matched_keys"] > 0
    assert report["simplify"]["simplified"] is True
    contract = Runner(str(path), providers=["cpu"]).contract
    assert contract.arch == "nested_unet" and contract.precision == "fp32"
    assert contract.versions == report["versions"]


def test_held_out_part_of_calib_validates_and_is_never_calibrated(tmp_path, nested_ckpt,
                                                                   calib_dir, monkeypatch):
    seen = {}
    real_quantize, real_validate = tuning_mod.quantize_int8, validate_mod.validate_artifact

    def quantize_spy(**kw):
        seen["calib"] = [f.name for f in kw["frames"]]
        return real_quantize(**kw)

    def validate_spy(**kw):
        seen.setdefault("val", set()).update(f.name for f in kw["frames"])
        return real_validate(**kw)

    monkeypatch.setattr(tuning_mod, "quantize_int8", quantize_spy)
    monkeypatch.setattr(validate_mod, "validate_artifact", validate_spy)
    report = convert(checkpoint=nested_ckpt, out_dir=tmp_path / "out", size=[SIZE, SIZE],
                     calib=str(calib_dir), calib_count=6, log=quiet)
    (warning,) = report["validation"].pop("warnings")
    assert report["validation"] == {"source": "held-out of --calib", "images": 2, "every": 4,
                                    "calibration_images": 6}
    assert "only 6 calibration images (fewer than 16)" in warning
    assert warning in report["warnings"]
    assert seen["val"] == {"crop03", "crop07"}
    assert len(seen["calib"]) == 6 and not set(seen["calib"]) & seen["val"]
    assert [a["precision"] for a in report["artifacts"]] == ["fp32", "int8"]
    assert all(a["parity"]["images"] == 2 for a in report["artifacts"])
    onnx_files = sorted(p.name for p in (tmp_path / "out").glob("*.onnx"))
    assert len(onnx_files) == 2 and all(name.startswith("model.") for name in onnx_files)


def test_failed_parity_is_published_only_under_the_failed_name(tmp_path, nested_ckpt, val_dir,
                                                               monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.fp32.onnx").write_bytes(b"stale model of an earlier export")
    (out / "export.json").write_text('{"ok": true}')
    real_validate = validate_mod.validate_artifact
    other = random_net("nested_unet", seed=99)

    def against_another_model(**kw):  # the ONNX no longer matches the torch model it is judged by
        return real_validate(**dict(kw, torch_model=other))

    monkeypatch.setattr(validate_mod, "validate_artifact", against_another_model)
    report = convert(checkpoint=nested_ckpt, out_dir=out, precisions=("fp32",), val=str(val_dir),
                     log=quiet)
    assert report["ok"] is False
    (art,) = report["artifacts"]
    assert art["ok"] is False and art["failures"]
    assert art["path"] == str(out / "model.fp32.failed.onnx")
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "model.fp32.failed.onnx",
                                                     "previous"]
    assert json.loads((out / "export.json").read_text())["ok"] is False
    # the earlier good model is not lost: it moved aside with the report that described it
    (kept,) = (out / "previous").iterdir()
    assert report["previous"] == {"folder": str(kept), "files": ["model.fp32.onnx", "export.json"]}
    assert (kept / "model.fp32.onnx").read_bytes() == b"stale model of an earlier export"
    assert json.loads((kept / "export.json").read_text()) == {"ok": True}
    assert any("earlier export" in w and str(kept) in w for w in report["warnings"])
    # the failure travels inside the file: a renamed copy still says it failed, and why
    meta = {p.key: p.value for p in onnx.load(str(out / "model.fp32.failed.onnx")).metadata_props}
    stamp = json.loads(meta[VALIDATION_KEY])
    assert stamp == {"ok": False, "failures": art["failures"]}
    assert _sha(out / "model.fp32.failed.onnx") == art["sha256"]


def test_reexport_moves_the_earlier_models_aside_and_clears_dead_staging(tmp_path, nested_ckpt,
                                                                         val_dir):
    out = tmp_path / "out"
    out.mkdir()
    dead = out / ".export-999999999-abc"  # left by an export that was killed (no such pid)
    live = out / ".export-{}-xyz".format(os.getpid())  # an export still running
    for folder in (dead, live):
        folder.mkdir()
        (folder / "model.fp32.onnx").write_bytes(b"half-written")
    first = convert(checkpoint=nested_ckpt, out_dir=out, precisions=("fp32",), val=str(val_dir),
                    log=quiet)
    assert not dead.exists() and live.exists()
    assert "previous" not in first and not (out / "previous").exists()
    second = convert(checkpoint=nested_ckpt, out_dir=out, precisions=("fp32",),
                     val=str(val_dir), log=quiet)
    (kept,) = (out / "previous").iterdir()  # same precision again: the earlier one is kept
    assert second["previous"]["files"] == ["model.fp32.onnx", "export.json"]
    assert _sha(kept / "model.fp32.onnx") == first["artifacts"][0]["sha256"]
    assert json.loads((kept / "export.json").read_text())["artifacts"][0]["sha256"] == \
        first["artifacts"][0]["sha256"]
    assert _sha(out / "model.fp32.onnx") == second["artifacts"][0]["sha256"]


@pytest.mark.slow
def test_trained_model_fp32_and_int8_both_pass(tmp_path):
    ckpt = write_checkpoint(tmp_path / "ckpt", trained_unet(), arch="UNet", size=64)
    calib = nuclei_folder(tmp_path / "calib", 32, 64, seed=1)
    val = nuclei_folder(tmp_path / "val", 12, 64, seed=2)
    logs = []
    report = convert(checkpoint=ckpt, out_dir=tmp_path / "out", calib=str(calib), val=str(val),
                     log=logs.append)
    assert report["ok"], [a["failures"] for a in report["artifacts"]]
    fp32, int8 = report["artifacts"]
    assert int8["parity"]["mask_iou"] >= 0.98 and fp32["parity"]["max_abs_err"] <= 1e-3
    assert int8["quantization"]["calibration_frames"] == 32
    assert int8["bytes"] < fp32["bytes"] / 2
    proto = onnx.load(int8["path"])
    assert {e.domain for e in proto.opset_import} <= {"", "ai.onnx"}
    assert Runner(int8["path"], providers=["cpu"]).contract.precision == "int8"
    assert any("validating int8" in line for line in logs)


def test_size_not_multiple_of_16_is_refused_before_any_work(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UsageError) as err:  # the checkpoint does not even exist: not loaded
        convert(checkpoint=tmp_path / "missing.pth", out_dir=out, size=[40, 40],
                precisions=("fp32",), val="unused", log=quiet)
    assert "16" in str(err.value)
    assert not out.exists()


def test_config_size_not_multiple_of_16_is_refused(tmp_path, val_dir):
    ckpt = write_checkpoint(tmp_path / "ckpt", random_net("unet", seed=1), arch="UNet", size=40)
    with pytest.raises(UsageError) as err:
        convert(checkpoint=ckpt, out_dir=tmp_path / "out", precisions=("fp32",),
                val=str(val_dir), log=quiet)
    assert "40x40" in str(err.value) and "--size" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_int8_without_calib_is_refused(tmp_path):
    with pytest.raises(UsageError) as err:
        convert(checkpoint=tmp_path / "missing.pth", out_dir=tmp_path / "out", val="x", log=quiet)
    assert "INT8 needs real calibration images: pass --calib FOLDER_OR_VIDEO" in str(err.value)


def test_int8_below_opset_13_is_refused_up_front(tmp_path):
    with pytest.raises(ExportError) as err:
        convert(checkpoint=tmp_path / "missing.pth", out_dir=tmp_path / "out", opset=11,
                calib="x", log=quiet)
    assert "13" in str(err.value)


def test_no_images_at_all_is_refused(tmp_path):
    with pytest.raises(UsageError) as err:
        convert(checkpoint=tmp_path / "missing.pth", out_dir=tmp_path / "out",
                precisions=("fp32",), log=quiet)
    assert "--val" in str(err.value)


def test_empty_calib_folder_is_a_clear_error(tmp_path, nested_ckpt):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    with pytest.raises(EdgesegError) as err:
        convert(checkpoint=nested_ckpt, out_dir=out, calib=str(empty), log=quiet)
    assert str(empty) in str(err.value) and "no images" in str(err.value)
    assert not out.exists() or not list(out.iterdir())


def test_single_calib_image_cannot_also_validate(tmp_path, nested_ckpt):
    one = nuclei_folder(tmp_path / "one", 1, 48)
    with pytest.raises(UsageError) as err:
        convert(checkpoint=nested_ckpt, out_dir=tmp_path / "out", calib=str(one), log=quiet)
    assert "--val" in str(err.value)


def test_unknown_precision_is_refused(tmp_path):
    with pytest.raises(UsageError):
        convert(checkpoint=tmp_path / "missing.pth", out_dir=tmp_path / "out",
                precisions=("int4",), val="x", log=quiet)


def test_val_same_as_calib_is_reported(tmp_path, nested_ckpt, calib_dir):
    report = convert(checkpoint=nested_ckpt, out_dir=tmp_path / "out", calib=str(calib_dir),
                     val=str(calib_dir), calib_count=4, log=quiet)
    assert report["validation"]["same_as_calib"] is True
    assert any("same source" in w for w in report["warnings"])
