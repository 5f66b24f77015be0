"""Shared fixtures: real sample frames and a small real edgeseg ONNX model."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "data"


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Every test gets its own HOME and cache: no test reads or writes the user's ~/.ssh or cache."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    if "EDGESEG_TEST_CACHE" in os.environ:
        monkeypatch.setenv("EDGESEG_CACHE_DIR", os.environ["EDGESEG_TEST_CACHE"])
    else:
        monkeypatch.setenv("EDGESEG_CACHE_DIR", str(_session_cache()))
    return home


_CACHE = {}


def _session_cache() -> Path:
    """One cache per test session (shared trained demo model), never the user's ~/.cache."""
    if "dir" not in _CACHE:
        import tempfile

        _CACHE["dir"] = Path(tempfile.mkdtemp(prefix="edgeseg-test-cache-"))
    return _CACHE["dir"]


@pytest.fixture(scope="session")
def nuclei():
    """The real nuclei image (uint8 HxW) and its ground-truth foreground mask (bool HxW)."""
    import tifffile

    image = tifffile.imread(DATA / "img2d.tif")
    mask = tifffile.imread(DATA / "mask2d.tif") > 0
    return image.astype(np.uint8), mask


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
    """Export a randomly initialised built-in net with an edgeseg contract, like the exporter does."""
    import onnx
    import torch

    from edgeseg.device.contract import Contract
    from edgeseg.host.archs import ARCHS

    torch.manual_seed(seed)
    model = ARCHS[arch](num_classes, channels).eval()
    buf = io.BytesIO()
    torch.onnx.export(model, (torch.randn(1, channels, size, size),), buf, dynamo=False,
                      opset_version=17, input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    proto = onnx.load_from_string(buf.getvalue())
    contract = Contract(input_size=[size, size], channels=channels, num_classes=num_classes,
                        class_names=["c{}".format(i) for i in range(num_classes)],
                        precision=precision, arch=arch)
    for key, value in contract.to_metadata().items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))
    return path


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory) -> Path:
    """A small real UNet (random weights) exported to ONNX with an edgeseg contract, 64x64 input."""
    return export_tiny(tmp_path_factory.mktemp("model") / "tiny.onnx")
