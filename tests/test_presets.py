"""Preprocessing presets: the agent reproduces pytorch-nested-unet's input pipeline exactly.

The reference below is that repository's pipeline written out by hand (cv2.imread -> albumentations
Resize (cv2.INTER_LINEAR) -> albumentations Normalize() on 0..255 BGR values -> ``/ 255`` in its
Dataset -> CHW), applied to the real nuclei image; the agent gets the same PNG through its own
source and its own preprocessing, with the contract read back from an exported model.
"""

from __future__ import annotations

import sys

import cv2
import numpy as np
import pytest
from PIL import Image

from edgeseg.device.contract import PRESETS, Contract
from edgeseg.device.preprocess import preprocess
from edgeseg.device.runner import Runner
from edgeseg.device.sources import open_source
from edgeseg.host.convert import convert
from edgeseg.host.errors import UsageError

from models_util import nuclei_arrays, nuclei_folder, random_net, write_checkpoint

H, W = 96, 128  # not the image's aspect ratio, and a strong downscale from 512x512


@pytest.fixture(scope="module")
def colour_png(tmp_path_factory):
    """The real nuclei image with a different tone curve per channel, saved as an RGB PNG."""
    image, _ = nuclei_arrays()
    img = image.astype(np.int32)
    rgb = np.stack([255 - img, np.clip(img // 2 + 60, 0, 255), img], axis=2).astype(np.uint8)
    path = tmp_path_factory.mktemp("png") / "nuclei.png"
    Image.fromarray(rgb).save(path)
    return path


def nested_unet_reference(path, height, width):
    """pytorch-nested-unet's dataset.py + albumentations, written out independently."""
    img = cv2.imread(str(path))  # BGR uint8
    img = cv2.resize(img, (width, height), interpolation=cv2.INTER_LINEAR)  # albu.Resize default
    mean = np.array([0.485, 0.456, 0.406], dtype=np.float32) * 255.0  # albu.Normalize defaults,
    std = np.array([0.229, 0.224, 0.225], dtype=np.float32) * 255.0  # max_pixel_value=255
    img = (img.astype(np.float32) - mean) / std
    img = img.astype("float32") / 255  # dataset.py divides by 255 once more
    return img.transpose(2, 0, 1)


@pytest.fixture(scope="module")
def exported_contract(tmp_path_factory):
    """The contract as the agent reads it from a model exported with the preset."""
    root = tmp_path_factory.mktemp("preset")
    ckpt = write_checkpoint(root / "ckpt", random_net("unet", seed=31), arch="UNet", size=32)
    val = nuclei_folder(root / "val", 2, 64, seed=3)
    report = convert(checkpoint=ckpt, out_dir=root / "out", size=[H, W], precisions=("fp32",),
                     val=str(val), preset="pytorch-nested-unet", log=lambda m: None)
    assert report["ok"], report["artifacts"][0]["failures"]
    return Runner(report["artifacts"][0]["path"], providers=["cpu"]).contract


def _agent_input(path, contract):
    with open_source(str(path)) as source:
        frame = source.read()
    return preprocess(frame.image, contract)[0]


def test_contract_carries_the_preset(exported_contract):
    assert exported_contract.preset == "pytorch-nested-unet"
    assert exported_contract.color_order == "BGR" and exported_contract.resize == "cv2-linear"
    assert exported_contract.input_size == [H, W]


def test_pytorch_nested_unet_preset_matches_the_repository_pipeline(colour_png,
                                                                    exported_contract):
    want = nested_unet_reference(colour_png, H, W)
    got = _agent_input(colour_png, exported_contract)
    assert got.shape == want.shape == (3, H, W)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    # The default preset (RGB, Pillow resize, one /255) is far from it: the preset matters.
    default = _agent_input(colour_png, Contract(input_size=[H, W]))
    assert np.abs(default - want).max() > 1.0


def test_preset_without_opencv_is_within_one_grey_level(colour_png, exported_contract,
                                                        monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)  # a device without OpenCV
    got = _agent_input(colour_png, exported_contract)
    want = nested_unet_reference(colour_png, H, W)
    one_level = 1.0 / (255.0 * 0.224 * 255.0) * 1.01  # the smallest std, one grey level
    assert 0 < np.abs(got - want).max() <= one_level  # > 0: numpy's formula, not OpenCV, ran


def test_preset_refuses_single_channel_models(tmp_path):
    ckpt = write_checkpoint(tmp_path / "ckpt", random_net("unet", seed=1, channels=1),
                            arch="UNet", size=32, channels=1)
    with pytest.raises(UsageError, match="3-channel BGR"):
        convert(checkpoint=ckpt, out_dir=tmp_path / "out", precisions=("fp32",), val=str(tmp_path),
                preset="pytorch-nested-unet", log=lambda m: None)


def test_unknown_preset_is_refused(tmp_path):
    with pytest.raises(UsageError, match="Unknown --preset"):
        convert(checkpoint=tmp_path / "x.pth", out_dir=tmp_path / "out", precisions=("fp32",),
                val="x", preset="imagenet-bgr", log=lambda m: None)
    assert set(PRESETS) == {"default", "pytorch-nested-unet"}
