"""edgeseg export's precision options end to end through the command line: int8-dynamic refusal and
--force, fp16 with its CPU warning, --val-masks, the precision report, bad values."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from edgeseg.host.artifacts import _budget_failures

from models_util import write_checkpoint, trained_unet
from test_cli import assert_clear_error, edgeseg

SIZE = 48
ORIGINS = [(40, 30), (200, 100), (300, 400), (420, 250), (100, 330), (360, 60)]


@pytest.fixture(scope="module")
def trained_ckpt(tmp_path_factory) -> Path:
    """A briefly trained UNet (real, non-degenerate masks) saved like pytorch-nested-unet does."""
    return write_checkpoint(tmp_path_factory.mktemp("ckpt"), trained_unet(), arch="UNet",
                            size=SIZE)


@pytest.fixture(scope="module")
def val_pairs(tmp_path_factory, nuclei):
    """Real nuclei windows and their expert masks, same file stems."""
    image, truth = nuclei
    root = tmp_path_factory.mktemp("pairs")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    for i, (y, x) in enumerate(ORIGINS):
        Image.fromarray(image[y:y + SIZE, x:x + SIZE]).save(root / "images" / "w{}.png".format(i))
        Image.fromarray(truth[y:y + SIZE, x:x + SIZE].astype(np.uint8) * 255).save(
            root / "masks" / "w{}.png".format(i))
    return root / "images", root / "masks"


def test_int8_dynamic_is_refused_for_a_conv_net_naming_convinteger(trained_ckpt, val_pairs,
                                                                   tmp_path):
    images, _ = val_pairs
    out = edgeseg("export", trained_ckpt, "--out", tmp_path / "out", "--precision",
                  "int8-dynamic", "--val", images, "--json")
    assert out.returncode != 0 and out.stdout == ""
    assert "ConvInteger" in out.stderr and "--force" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "out").exists()  # the refused export leaves no empty --out behind


@pytest.mark.slow
def test_int8_dynamic_with_force_is_built_and_load_tested(trained_ckpt, val_pairs, tmp_path):
    images, _ = val_pairs
    out = edgeseg("export", trained_ckpt, "--out", tmp_path / "out", "--precision",
                  "int8-dynamic", "--force", "--val", images, "--measure-runs", "3", "--json")
    report = json.loads(out.stdout)
    (art,) = report["artifacts"]
    assert art["precision"] == "int8-dynamic" and art["quantization"]["forced"] is True
    ops = {n.op_type for n in onnx.load(art["path"]).graph.node}
    assert "ConvInteger" in ops
    assert art["measure"]["median_ms"] > 0 and art["speedup_vs_fp32"] > 0  # vs a measured fp32
    assert report["reference_fp32_ms"] > 0


@pytest.mark.slow
def test_fp16_with_ground_truth_gives_a_full_precision_report(trained_ckpt, val_pairs, tmp_path):
    images, masks = val_pairs
    out = edgeseg("export", trained_ckpt, "--out", tmp_path / "out", "--precision", "fp32,fp16",
                  "--val", images, "--val-masks", masks, "--measure-runs", "3", "--threads", "1",
                  "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    fp32, fp16 = report["artifacts"]
    assert fp16["precision"] == "fp16" and fp16["ok"] and fp16["conversion"]["keep_io_types"]
    for art in (fp32, fp16):
        assert art["measure"]["threads"] == 1 and art["measure"]["median_ms"] > 0
        assert art["measure"]["peak_rss_mb"] > 0
        assert 0.0 < art["parity"]["gt_iou"] <= 1.0  # real expert masks, real predictions
    assert fp32["speedup_vs_fp32"] == 1.0
    assert abs(fp16["parity"]["gt_iou"] - fp32["parity"]["gt_iou"]) < 0.02
    assert fp16["bytes"] < 0.6 * fp32["bytes"]
    from edgeseg.host.fp16 import gpu_available

    if not gpu_available():
        assert any("FP16 on CPU" in w for w in report["warnings"]), report["warnings"]
    text = edgeseg("export", trained_ckpt, "--out", tmp_path / "out2", "--precision", "fp32",
                   "--val", images, "--val-masks", masks, "--measure-runs", "3")
    assert text.returncode == 0
    assert "IoU vs GT" in text.stdout or "GT" in text.stdout


def test_val_masks_missing_for_an_image_is_a_clear_error(trained_ckpt, val_pairs, tmp_path):
    images, masks = val_pairs
    partial = tmp_path / "masks"
    partial.mkdir()
    (partial / "w0.png").write_bytes((masks / "w0.png").read_bytes())
    out = edgeseg("export", trained_ckpt, "--out", tmp_path / "out", "--precision", "fp32",
                  "--val", images, "--val-masks", partial)
    assert_clear_error(out, "w1", code=2)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args,words", [
    (["--max-iou-drop", "1.5"], ["--max-iou-drop", "below 1"]),
    (["--max-iou-drop", "x"], ["--max-iou-drop"]),
    (["--calibration", "kl"], ["--calibration"]),
    (["--measure-runs", "1"], ["--measure-runs"]),
    (["--precision", "int4"], ["int4", "fp16"]),
])
def test_bad_precision_options_are_refused(trained_ckpt, tmp_path, args, words):
    out = edgeseg("export", trained_ckpt, "--out", tmp_path / "out", "--val", tmp_path, *args)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    for word in words:
        assert word in out.stderr, out.stderr


def test_a_budget_that_did_not_hold_fails_the_artifact():
    info = {"budget": {"held": False, "iou_drop": 0.031, "max_iou_drop": 0.01,
                       "float_nodes": ["a", "b"]}}
    (failure,) = _budget_failures(info)
    assert "0.0310" in failure and "0.01" in failure and "2 node(s)" in failure
    assert _budget_failures({"budget": {"held": True, "max_iou_drop": 0.01}}) == []
    assert _budget_failures(None) == []
