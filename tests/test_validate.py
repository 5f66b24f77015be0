"""validate_artifact: ONNX (real onnxruntime) vs PyTorch on real nuclei crops."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeseg.device.contract import Contract
from edgeseg.device.postprocess import masks_from_logits
from edgeseg.device.preprocess import preprocess
from edgeseg.device.runner import Runner
from edgeseg.host.errors import UsageError
from edgeseg.host.export import export_onnx
from edgeseg.host.quantize import quantize_int8
from edgeseg.host.validate import Parity, validate_artifact

from models_util import crop_origins, logits_of, nuclei_arrays, nuclei_frames, random_net, \
    trained_unet

SIZE = 32


def _export(path, model, size=SIZE, num_classes=1):
    contract = Contract(input_size=[size, size], arch="unet", num_classes=num_classes,
                        class_names=["c{}".format(i) for i in range(num_classes)])
    export_onnx(model=model, path=str(path), size_hw=(size, size), opset=17, contract=contract,
                input_channels=3)
    return path, contract


@pytest.fixture(scope="module")
def matched(tmp_path_factory):
    model = random_net("unet", seed=5)
    path, _ = _export(tmp_path_factory.mktemp("v") / "m.onnx", model)
    return path, model


def test_fp32_parity_passes_for_the_exported_model(matched):
    path, model = matched
    parity = validate_artifact(onnx_path=str(path), torch_model=model,
                               frames=nuclei_frames(5, 48), precision="fp32")
    assert isinstance(parity, Parity)
    assert parity.ok, parity.failures
    assert parity.images == 5 and parity.failures == []
    assert parity.max_abs_err <= 1e-3 and parity.mean_abs_err <= parity.max_abs_err
    assert parity.mask_iou >= 0.999 and parity.pixel_agreement >= 0.999
    assert parity.gt_iou is None and parity.torch_gt_iou is None  # no ground truth given


def test_parity_fails_against_a_different_torch_model(matched):
    path, _ = matched
    other = random_net("unet", seed=6)
    parity = validate_artifact(onnx_path=str(path), torch_model=other,
                               frames=nuclei_frames(3, SIZE), precision="fp32")
    assert parity.ok is False
    assert parity.images == 3
    assert parity.max_abs_err > 1e-3
    assert any("max |logit difference|" in f for f in parity.failures)


def test_threshold_overrides_apply(matched):
    path, model = matched
    parity = validate_artifact(onnx_path=str(path), torch_model=model,
                               frames=nuclei_frames(2, SIZE), precision="fp32",
                               thresholds={"max_abs_err": -1.0})
    assert not parity.ok and len(parity.failures) == 1


def test_logits_shape_mismatch_is_a_failure_not_an_exception(tmp_path):
    path, _ = _export(tmp_path / "two.onnx", random_net("unet", seed=7, num_classes=2),
                      num_classes=2)
    parity = validate_artifact(onnx_path=str(path), torch_model=random_net("unet", seed=7),
                               frames=nuclei_frames(2, SIZE), precision="fp32")
    assert not parity.ok and parity.images == 0
    assert any("shape" in f for f in parity.failures)


def test_both_masks_empty_counts_as_full_agreement(tmp_path):
    model = random_net("unet", seed=8)
    with torch.no_grad():
        model.final.bias.fill_(-1e4)  # every logit far below the sigmoid cut
    path, _ = _export(tmp_path / "empty.onnx", model)
    parity = validate_artifact(onnx_path=str(path), torch_model=model,
                               frames=nuclei_frames(2, SIZE), precision="fp32",
                               thresholds={"max_abs_err": 1.0})
    assert parity.mask_iou == 1.0 and parity.pixel_agreement == 1.0 and parity.ok


def test_unknown_precision_is_refused(matched):
    path, model = matched
    with pytest.raises(UsageError):
        validate_artifact(onnx_path=str(path), torch_model=model, frames=nuclei_frames(1, SIZE),
                          precision="int4")


@pytest.mark.slow
def test_int8_of_a_trained_net_meets_the_mask_iou_threshold(tmp_path):
    model = trained_unet()
    fp32, contract = _export(tmp_path / "model.fp32.onnx", model, size=64)
    int8 = tmp_path / "model.int8.onnx"
    quantize_int8(fp32_path=str(fp32), out_path=str(int8), frames=nuclei_frames(32, 64, seed=1),
                  contract=contract, log=lambda m: None)
    frames = nuclei_frames(16, 64, seed=2)
    fp = validate_artifact(onnx_path=str(fp32), torch_model=model, frames=frames,
                           precision="fp32")
    q = validate_artifact(onnx_path=str(int8), torch_model=model, frames=frames, precision="int8")
    assert fp.ok, fp.failures
    assert q.ok, q.failures
    assert q.mask_iou >= 0.98
    assert q.max_abs_err > fp.max_abs_err  # it really is a different (quantized) graph
    batch = np.concatenate([preprocess(f.image, contract) for f in frames])
    foreground = float((logits_of(model, batch) > 0).mean())
    assert 0.05 < foreground < 0.6  # real masks, so the IoU measures something


def _truth_crops(count, size, seed=0):
    """The real expert mask under each crop of ``nuclei_frames(count, size, seed=seed)``."""
    _, truth = nuclei_arrays()
    return [truth[y:y + size, x:x + size][None]
            for y, x in crop_origins(count, size, seed=seed)]


def _centred(model, frames, contract):
    """Shift the final bias to the median logit so the masks are partly foreground."""
    batch = np.concatenate([preprocess(f.image, contract) for f in frames])
    with torch.no_grad():
        model.final.bias -= torch.from_numpy(np.median(logits_of(model, batch), axis=(0, 2, 3)))
    return model


def _pooled_iou(preds, truths):
    inter = sum(int(np.logical_and(p, t).sum()) for p, t in zip(preds, truths))
    union = sum(int(np.logical_or(p, t).sum()) for p, t in zip(preds, truths))
    return inter / union


def test_gt_iou_is_the_pooled_iou_against_the_real_expert_masks(tmp_path):
    frames, truths = nuclei_frames(6, 48, seed=3), _truth_crops(6, 48, seed=3)
    contract = Contract(input_size=[SIZE, SIZE])
    model = _centred(random_net("unet", seed=11), frames, contract)
    path, _ = _export(tmp_path / "m.onnx", model)
    parity = validate_artifact(onnx_path=str(path), torch_model=model, frames=frames,
                               precision="fp32", gt_masks=truths)
    runner = Runner(str(path), providers=["cpu"])
    preds = [masks_from_logits(runner.run(preprocess(f.image, runner.contract))[0],
                               runner.contract, f.image.shape[:2]) for f in frames]
    expected = _pooled_iou(preds, truths)
    assert 0.0 < expected < 1.0
    assert parity.gt_iou == pytest.approx(expected, abs=1e-12)
    assert parity.torch_gt_iou == pytest.approx(expected, abs=0.01)
    assert parity.ok  # ground truth alone never fails an artifact
    assert parity.to_dict()["gt_iou"] == parity.gt_iou


def test_gt_iou_of_several_classes_averages_the_classes_present(tmp_path):
    frames = nuclei_frames(4, SIZE, seed=4)
    contract = Contract(input_size=[SIZE, SIZE], num_classes=3, class_names=["a", "b", "c"])
    model = _centred(random_net("unet", seed=12, num_classes=3), frames, contract)
    path, _ = _export(tmp_path / "m3.onnx", model, num_classes=3)
    runner = Runner(str(path), providers=["cpu"])
    preds = [masks_from_logits(runner.run(preprocess(f.image, runner.contract))[0],
                               runner.contract, f.image.shape[:2]) for f in frames]
    truth = [np.stack([p[0], ~p[1], np.zeros_like(p[2])]) for p in preds]  # IoU 1, 0, absent
    parity = validate_artifact(onnx_path=str(path), torch_model=model, frames=frames,
                               precision="fp32", gt_masks=truth)
    third = _pooled_iou([p[2:] for p in preds], [t[2:] for t in truth])  # 0 unless class 2 empty
    present = [1.0, 0.0] + ([third] if any(p[2].any() for p in preds) else [])
    assert parity.gt_iou == pytest.approx(np.mean(present))


def test_gt_iou_drop_limit_fails_an_artifact_worse_than_pytorch(matched):
    path, model = matched
    frames = nuclei_frames(3, SIZE, seed=5)
    runner = Runner(str(path), providers=["cpu"])
    inverse = [~masks_from_logits(runner.run(preprocess(f.image, runner.contract))[0],
                                  runner.contract, f.image.shape[:2]) for f in frames]
    parity = validate_artifact(onnx_path=str(path), torch_model=model, frames=frames,
                               precision="fp32", gt_masks=inverse,
                               thresholds={"max_gt_iou_drop": -0.5})
    assert parity.gt_iou == 0.0 and parity.torch_gt_iou <= 0.01
    assert not parity.ok and any("ground truth" in f for f in parity.failures)


def test_ground_truth_count_and_shape_are_checked(matched):
    path, model = matched
    frames = nuclei_frames(2, SIZE)
    with pytest.raises(UsageError) as err:
        validate_artifact(onnx_path=str(path), torch_model=model, frames=frames,
                          precision="fp32", gt_masks=_truth_crops(1, SIZE))
    assert "1 ground-truth masks for 2" in err.value.message
    with pytest.raises(UsageError) as err:
        validate_artifact(onnx_path=str(path), torch_model=model, frames=frames,
                          precision="fp32", gt_masks=_truth_crops(2, SIZE + 8))
    assert "(1, 40, 40)" in err.value.message and "(1, 32, 32)" in err.value.message
