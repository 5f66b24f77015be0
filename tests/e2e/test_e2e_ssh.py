"""Deploy and profile through a ~/.ssh/config alias; the masks fetched back from the agent equal
the masks the same model gives on the host."""

from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgeseg.device.postprocess import mask_image, masks_from_logits
from edgeseg.device.preprocess import preprocess
from edgeseg.device.runner import Runner
from edgeseg.host.deploy import deploy
from edgeseg.host.profile import profile
from edgeseg.host.targets import open_target


def _balanced(model: Path, frames_dir: Path, out: Path) -> Path:
    """A copy of ``model`` whose threshold sits at its median logit on these frames, so that the
    masks are about half foreground (a random net's masks are otherwise all one value)."""
    import onnx

    runner = Runner(str(model))
    logits = [runner.run(preprocess(np.asarray(Image.open(p).convert("RGB")), runner.contract))
              for p in sorted(frames_dir.glob("*.png"))]
    median = float(np.median(np.concatenate([x.ravel() for x in logits])))
    proto = onnx.load(str(model))
    for prop in proto.metadata_props:
        if prop.key == "edgeseg.contract":
            contract = json.loads(prop.value)
            contract["threshold"] = 1.0 / (1.0 + math.exp(-median))
            prop.value = json.dumps(contract)
    onnx.save(proto, str(out))
    return out


def _host_masks(model: Path, frames_dir: Path) -> dict:
    runner = Runner(str(model))
    out = {}
    for png in sorted(frames_dir.glob("*.png")):
        image = np.asarray(Image.open(png).convert("RGB"))
        logits = runner.run(preprocess(image, runner.contract))
        masks = masks_from_logits(logits[0], runner.contract, image.shape[:2])
        out[png.name] = mask_image(masks) * np.uint8(255)
    return out


@pytest.mark.ssh
def test_deploy_profile_over_ssh_alias(ssh_alias, tiny_onnx, frames_dir, tmp_path):
    model = _balanced(tiny_onnx, frames_dir, tmp_path / "balanced.onnx")
    install = tmp_path / "device-home" / ".edgeseg"
    with open_target(ssh_alias) as target:
        dep = deploy(target=target, model_path=model, install_dir=str(install),
                     python=sys.executable)
        rep = profile(target=target, source=str(frames_dir), frames=8, warmup=0,
                      install_dir=str(install), python=sys.executable,
                      fetch_masks=tmp_path / "masks")
    assert dep["target"] == rep["target"] == ssh_alias
    assert rep["frames"] == 8 and rep["model"] == dep["remote_path"]
    assert rep["model_sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    assert Path(rep["report_path"]).is_file()  # same machine: the device's file is visible here
    expected = _host_masks(model, frames_dir)
    assert 0.2 < np.mean([(m > 0).mean() for m in expected.values()]) < 0.8
    fetched = {p.name: np.asarray(Image.open(p)) for p in sorted((tmp_path / "masks").iterdir())}
    assert sorted(fetched) == sorted(expected) and len(fetched) == 8
    for name, mask in expected.items():
        assert fetched[name].shape == (64, 64)
        assert np.mean(fetched[name] == mask) > 0.99, name  # thread count may flip a pixel
