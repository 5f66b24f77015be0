"""Shared fixtures: real sample frames and a small real edgeseg ONNX model."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "data"


# One cache per test session (the trained demo model, the packed agent), never the user's ~/.cache.
# EDGESEG_TEST_CACHE keeps it across runs when set (developers re-running the slow tests).
if os.environ.get("EDGESEG_TEST_CACHE"):
    os.environ["EDGESEG_CACHE_DIR"] = os.environ["EDGESEG_TEST_CACHE"]
else:
    os.environ["EDGESEG_CACHE_DIR"] = tempfile.mkdtemp(prefix="edgeseg-test-cache-")
    atexit.register(shutil.rmtree, os.environ["EDGESEG_CACHE_DIR"], True)


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Every test gets its own HOME: no test reads or writes the user's ~/.ssh or ~/.edgeseg."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    return home


@pytest.fixture(scope="session")
def nuclei():
    """The real nuclei image (uint8 HxW) and its ground-truth foreground mask (bool HxW)."""
    from edgeseg.host.nuclei import load_nuclei

    return load_nuclei()


@pytest.fixture(scope="session")
def frames_dir(tmp_path_factory, nuclei):
    """Eight 64x64 RGB PNG crops of the real nuclei image."""
    from PIL import Image

    image, _ = nuclei
    folder = tmp_path_factory.mktemp("frames")
    for i in range(8):
        y, x = 32 * (i // 4) + 100, 48 * (i % 4) + 20
        crop = np.repeat(image[y:y + 64, x:x + 64, None], 3, axis=2)
        Image.fromarray(crop).save(folder / "crop{:02d}.png".format(i))
    return folder


def export_tiny(path: Path, *, size=64, arch="unet", channels=3, num_classes=1, seed=0,
                precision="fp32") -> Path:
    """Export a randomly initialised built-in net with an edgeseg contract through the real exporter."""
    import torch

    from edgeseg.device.contract import Contract
    from edgeseg.host.archs import ARCHS
    from edgeseg.host.export import export_onnx

    torch.manual_seed(seed)
    model = ARCHS[arch](num_classes, channels).eval()
    contract = Contract(input_size=[size, size], channels=channels, num_classes=num_classes,
                        class_names=["c{}".format(i) for i in range(num_classes)],
                        precision=precision, arch=arch)
    export_onnx(model=model, path=str(path), size_hw=[size, size], opset=17, contract=contract,
                input_channels=channels)
    return path


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory) -> Path:
    """A small real UNet (random weights) exported to ONNX with an edgeseg contract, 64x64 input."""
    return export_tiny(tmp_path_factory.mktemp("model") / "tiny.onnx")


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory):
    """The whole quickstart (trained NestedUNet, FP32 + INT8 at 256x256, local profiles), run once."""
    from edgeseg.host.quickstart import quickstart

    out = tmp_path_factory.mktemp("quickstart")
    return quickstart(out_dir=str(out), frames=30, log=lambda msg: print(msg))
