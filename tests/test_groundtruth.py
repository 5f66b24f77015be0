"""--val-masks: ground-truth label images matched to validation images by file stem."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from edgeseg.device.contract import Contract
from edgeseg.device.postprocess import mask_image, masks_from_logits
from edgeseg.device.preprocess import preprocess
from edgeseg.device.runner import Runner
from edgeseg.device.sources import sample_frames
from edgeseg.host.errors import UsageError
from edgeseg.host.export import export_onnx
from edgeseg.host.groundtruth import labels_to_masks, load_gt_masks
from edgeseg.host.validate import validate_artifact

from conftest import DATA
from models_util import random_net

SIZE = 48
ORIGINS = [(40, 30), (200, 100), (300, 400), (420, 250)]
ONE = Contract(input_size=[SIZE, SIZE])


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, nuclei):
    """Real nuclei crops (PNG) and their real expert-mask crops (0/255 PNG), same stems."""
    image, truth = nuclei
    root = tmp_path_factory.mktemp("gt")
    images, masks = root / "images", root / "masks"
    images.mkdir()
    masks.mkdir()
    for i, (y, x) in enumerate(ORIGINS):
        Image.fromarray(image[y:y + SIZE, x:x + SIZE]).save(images / "win{}.png".format(i))
        Image.fromarray(truth[y:y + SIZE, x:x + SIZE].astype(np.uint8) * 255).save(
            masks / "win{}.png".format(i))
    return images, masks, truth


def test_masks_match_the_expert_mask_crops(pairs):
    images, masks, truth = pairs
    frames = sample_frames(str(images), count=10)
    gt = load_gt_masks(folder=str(masks), frames=frames, contract=ONE, source=str(images))
    assert len(gt) == len(ORIGINS)
    for frame, mask in zip(frames, gt):
        y, x = ORIGINS[int(frame.name[3:])]
        assert mask.dtype == bool and mask.shape == (1, SIZE, SIZE)
        assert np.array_equal(mask[0], truth[y:y + SIZE, x:x + SIZE])
    assert 0 < np.mean([m.mean() for m in gt]) < 1  # real nuclei, not an empty mask


def test_instance_label_tiff_counts_as_foreground(tmp_path, nuclei):
    image, truth = nuclei
    labels = tifffile.imread(str(DATA / "mask2d.tif"))
    y, x = ORIGINS[1]
    crop = labels[y:y + SIZE, x:x + SIZE]
    assert crop.dtype == np.uint16 and len(np.unique(crop)) > 2  # several nucleus instances
    Image.fromarray(image[y:y + SIZE, x:x + SIZE]).save(tmp_path / "cell.png")
    (tmp_path / "m").mkdir()
    tifffile.imwrite(str(tmp_path / "m" / "cell.tif"), crop)
    gt = load_gt_masks(folder=str(tmp_path / "m"), frames=sample_frames(
        str(tmp_path / "cell.png"), count=1), contract=ONE)
    assert np.array_equal(gt[0][0], truth[y:y + SIZE, x:x + SIZE])


def test_ground_truth_equal_to_the_models_own_masks_scores_one(tmp_path, pairs):
    images, _, _ = pairs
    contract = Contract(input_size=[32, 32], arch="unet")
    frames = sample_frames(str(images), count=10)
    model = random_net("unet", seed=3)
    batch = np.concatenate([preprocess(f.image, contract) for f in frames])
    with torch.no_grad():  # move the sigmoid cut to the median logit: masks partly foreground
        model.final.bias -= float(model(torch.from_numpy(batch)).median())
    path = tmp_path / "m.onnx"
    export_onnx(model=model, path=str(path), size_hw=(32, 32), opset=17, contract=contract,
                input_channels=3)
    runner = Runner(str(path), providers=["cpu"])
    own = tmp_path / "own"
    own.mkdir()
    for frame in frames:  # written as the agent's --save-masks writes them
        masks = masks_from_logits(runner.run(preprocess(frame.image, runner.contract))[0],
                                  runner.contract, frame.image.shape[:2])
        Image.fromarray(mask_image(masks) * 255).save(own / "{}.png".format(frame.name))
    gt = load_gt_masks(folder=str(own), frames=frames, contract=runner.contract)
    assert any(m.any() for m in gt) and not all(m.all() for m in gt)
    parity = validate_artifact(onnx_path=str(path), torch_model=model, frames=frames,
                               precision="fp32", gt_masks=gt)
    assert parity.ok, parity.failures
    assert parity.gt_iou == 1.0
    assert parity.torch_gt_iou >= 0.99


def test_multi_class_conventions():
    labels = np.array([[0, 1], [2, 1]], np.uint8)
    soft = labels_to_masks(labels=labels, contract=Contract(num_classes=3, activation="softmax",
                                                            class_names=["a", "b", "c"]))
    assert soft.shape == (3, 2, 2)
    assert soft[0].tolist() == [[True, False], [False, False]]  # value = class index
    assert soft[2].tolist() == [[False, False], [True, False]]
    sig = labels_to_masks(labels=labels, contract=Contract(num_classes=2, activation="sigmoid",
                                                           class_names=["a", "b"]))
    assert sig.shape == (2, 2, 2)  # 0 = no class, k = class k-1 (like the agent's mask_image)
    assert sig[0].tolist() == [[False, True], [False, True]]
    assert sig[1].tolist() == [[False, False], [True, False]]
    with pytest.raises(UsageError) as err:
        labels_to_masks(labels=labels, contract=Contract(num_classes=2, activation="softmax",
                                                         class_names=["a", "b"]))
    assert "0..2" in err.value.message and "0..1" in err.value.message


def test_missing_folder(pairs, tmp_path):
    images, _, _ = pairs
    with pytest.raises(UsageError) as err:
        load_gt_masks(folder=str(tmp_path / "none"), frames=sample_frames(str(images), count=2),
                      contract=ONE)
    assert "not a folder" in err.value.message


def test_a_frame_without_a_mask_is_named(pairs, tmp_path):
    images, masks, _ = pairs
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "win0.png").write_bytes((masks / "win0.png").read_bytes())
    (partial / "other.png").write_bytes((masks / "win1.png").read_bytes())
    with pytest.raises(UsageError) as err:
        load_gt_masks(folder=str(partial), frames=sample_frames(str(images), count=10),
                      contract=ONE)
    assert "3 of the 4" in err.value.message and "win1, win2, win3" in err.value.message
    assert "same file stem" in err.value.hint


def test_mask_of_another_size_gives_both_sizes(pairs, tmp_path):
    images, _, truth = pairs
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    for i in range(len(ORIGINS)):
        Image.fromarray(truth[:SIZE, :SIZE + 4].astype(np.uint8)).save(
            wrong / "win{}.bmp".format(i))
    with pytest.raises(UsageError) as err:
        load_gt_masks(folder=str(wrong), frames=sample_frames(str(images), count=10), contract=ONE)
    assert "48x52" in err.value.message and "48x48" in err.value.message


def test_colour_masks_are_refused(pairs, tmp_path):
    images, _, _ = pairs
    colour = tmp_path / "colour"
    colour.mkdir()
    rgb = np.zeros((SIZE, SIZE, 3), np.uint8)
    rgb[:10, :, 0] = 255
    for i in range(len(ORIGINS)):
        Image.fromarray(rgb).save(colour / "win{}.png".format(i))
    with pytest.raises(UsageError) as err:
        load_gt_masks(folder=str(colour), frames=sample_frames(str(images), count=10), contract=ONE)
    assert "colour" in err.value.message


def test_video_frames_cannot_be_matched(pairs):
    _, masks, _ = pairs
    video = str(DATA / "vtest.avi")
    frames = sample_frames(video, count=2)
    for source in (None, video):
        with pytest.raises(UsageError) as err:
            load_gt_masks(folder=str(masks), frames=frames, contract=ONE, source=source)
        assert "video" in err.value.message and "image folder" in err.value.hint


def test_benchmark_windows_pair_each_image_with_its_expert_mask(tmp_path, nuclei):
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("bench_precision",
                                                  str(REPO / "scripts" / "bench_precision.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    folders = bench.write_windows(out_dir=tmp_path, calib_windows=3, val_stride=224, window=64)
    _, truth = nuclei
    frames = sample_frames(folders["val"], count=10)
    assert [f.name for f in frames] == ["val_y000", "val_y224", "val_y448"]
    gt = load_gt_masks(folder=folders["val_masks"], frames=frames,
                       contract=Contract(input_size=[64, 64]), source=folders["val"])
    for frame, mask in zip(frames, gt):
        y = int(frame.name[5:])
        assert np.array_equal(mask[0], truth[y:y + 64, 448:512])  # the held-out right edge
    assert len(sample_frames(folders["calib"], count=10)) == 3
