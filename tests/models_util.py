"""Helpers for the export/quantize/validate/convert tests: real nuclei crops and small real nets."""

from __future__ import annotations

from pathlib import Path
from typing import List

import numpy as np
import torch
import yaml
from PIL import Image

from edgeseg.device.contract import Contract
from edgeseg.device.preprocess import normalize, to_rgb_uint8
from edgeseg.device.sources import Frame
from edgeseg.host.archs import ARCHS
from edgeseg.host.nuclei import load_nuclei

REPO = Path(__file__).resolve().parents[1]


def nuclei_arrays():
    """The real nuclei image (uint8) and its foreground mask, read by the project's own loader."""
    return load_nuclei()


def crop_origins(count: int, size: int, *, seed: int = 0, x_max: int = 512) -> List[tuple]:
    rng = np.random.default_rng(seed)
    return [(int(rng.integers(0, 512 - size + 1)), int(rng.integers(0, x_max - size + 1)))
            for _ in range(count)]


def nuclei_frames(count: int, size: int, *, seed: int = 0) -> List[Frame]:
    """``count`` RGB crops of the real nuclei image, as the agent's Frame objects."""
    image, _ = nuclei_arrays()
    return [Frame(to_rgb_uint8(image[y:y + size, x:x + size]), i, "crop{:02d}".format(i))
            for i, (y, x) in enumerate(crop_origins(count, size, seed=seed))]


def nuclei_folder(folder: Path, count: int, size: int, *, seed: int = 0) -> Path:
    """A folder of ``count`` PNG crops of the real nuclei image."""
    folder.mkdir(parents=True, exist_ok=True)
    for frame in nuclei_frames(count, size, seed=seed):
        Image.fromarray(frame.image).save(folder / "{}.png".format(frame.name))
    return folder


def random_net(arch: str = "unet", *, seed: int = 0, num_classes: int = 1, channels: int = 3,
               deep_supervision: bool = False) -> torch.nn.Module:
    torch.manual_seed(seed)
    return ARCHS[arch](num_classes, channels, deep_supervision=deep_supervision).eval()


def train_unet(*, steps: int = 40, crop: int = 64, seed: int = 0) -> torch.nn.Module:
    """A UNet trained briefly on the left three quarters of the nuclei image (meaningful masks)."""
    image, mask = nuclei_arrays()
    x = torch.from_numpy(normalize(to_rgb_uint8(image), Contract()))
    y = torch.from_numpy(mask.astype(np.float32))[None]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on small shared CPUs one thread is much faster than two contending
    try:
        model = random_net("unet", seed=seed).train()
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        rng = np.random.default_rng(seed)

        def batch(n=4):
            origins = [(int(rng.integers(0, 512 - crop)), int(rng.integers(0, 384 - crop)))
                       for _ in range(n)]
            return (torch.stack([x[:, a:a + crop, b:b + crop] for a, b in origins]),
                    torch.stack([y[:, a:a + crop, b:b + crop] for a, b in origins]))

        for _ in range(steps):
            xb, yb = batch()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
        for m in model.modules():  # BatchNorm statistics of the final weights
            if isinstance(m, torch.nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None
        with torch.no_grad():
            for _ in range(4):
                model(batch(8)[0])
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def write_checkpoint(folder: Path, model: torch.nn.Module, *, arch: str = "NestedUNet",
                     size: int = 32, num_classes: int = 1, channels: int = 3,
                     deep_supervision: bool = False) -> Path:
    """model.pth (plain state_dict) + config.yml, as pytorch-nested-unet saves them."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), str(folder / "model.pth"))
    config = {"name": "test", "arch": arch, "deep_supervision": deep_supervision,
              "input_channels": channels, "num_classes": num_classes, "input_h": size,
              "input_w": size}
    (folder / "config.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    return folder / "model.pth"


def logits_of(model: torch.nn.Module, batch: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model(torch.from_numpy(batch))
    if isinstance(out, (list, tuple)):
        out = out[-1]
    return out.numpy()


_TRAINED = {}


def trained_unet() -> torch.nn.Module:
    """One briefly trained UNet per test process (about 20 s on two CPU cores)."""
    if "unet" not in _TRAINED:
        _TRAINED["unet"] = train_unet()
    return _TRAINED["unet"]
