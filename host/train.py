"""Train the demo model: a real NestedUNet on the bundled nuclei image, in minutes on a laptop CPU.

Training sees random crops of the left three quarters of the image only; the right quarter is held
out and scored.  Inputs go through :func:`edgeseg.device.preprocess.normalize` with the default
contract, so the network is trained on exactly the preprocessing the agent applies on the device.
The result is saved as pytorch-nested-unet saves its models: ``model.pth`` (a plain state_dict) and
``config.yml``, plus ``train.json`` with the held-out IoU.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from edgeseg.device.contract import Contract
from edgeseg.device.preprocess import normalize, to_rgb_uint8

from .archs import NestedUNet
from .errors import UsageError
from .nuclei import IMAGE_FILE, MASK_FILE, data_dir, heldout_iou, load_nuclei, split_column

TRAIN_VERSION = "1"  # bump when the recipe changes: invalidates cached demo models
THREADS = 2
CHANNELS_LAST = torch.channels_last  # ~30 % faster convolutions on CPU; saved weights are plain
RECIPE = {"steps": 150, "batch_size": 8, "crop": 96, "lr": 3e-3, "min_lr": 1e-4,
          "bn_recalibration_batches": 8}


def print_to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _training_arrays():
    """Full image normalised as the agent would (CxHxW float32) and the mask (HxW float32)."""
    image, mask = load_nuclei()
    x = normalize(to_rgb_uint8(image), Contract())
    return x, mask.astype(np.float32)


def _sample_batch(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, *, x_limit: int,
                  crop: int, batch: int):
    """Random crops (left of ``x_limit`` only) with flips and 90-degree rotations."""
    xs, ys = [], []
    for _ in range(batch):
        top = int(rng.integers(0, x.shape[1] - crop + 1))
        left = int(rng.integers(0, x_limit - crop + 1))
        xi, yi = x[:, top:top + crop, left:left + crop], y[top:top + crop, left:left + crop]
        k = int(rng.integers(0, 4))
        xi, yi = np.rot90(xi, k, axes=(1, 2)), np.rot90(yi, k)
        if rng.random() < 0.5:
            xi, yi = xi[:, :, ::-1], yi[:, ::-1]
        xs.append(np.ascontiguousarray(xi))
        ys.append(np.ascontiguousarray(yi)[None])
    batch_x = torch.from_numpy(np.stack(xs)).contiguous(memory_format=CHANNELS_LAST)
    return batch_x, torch.from_numpy(np.stack(ys))


def bce_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """pytorch-nested-unet's BCEDiceLoss: 0.5 * BCE + (1 - soft dice)."""
    bce = F.binary_cross_entropy_with_logits(logits, target)
    prob = torch.sigmoid(logits).flatten(1)
    target = target.flatten(1)
    dice = (2.0 * (prob * target).sum(1) + 1e-5) / (prob.sum(1) + target.sum(1) + 1e-5)
    return 0.5 * bce + (1.0 - dice.mean())


def predict_mask(*, model: torch.nn.Module, image: np.ndarray) -> np.ndarray:
    """Foreground mask (sigmoid > 0.5) of a whole greyscale/RGB image, one forward pass."""
    x = torch.from_numpy(normalize(to_rgb_uint8(image), Contract()))[None]
    model.eval()
    with torch.no_grad():
        out = model(x)
    if isinstance(out, (list, tuple)):
        out = out[-1]
    return (out[0, 0] > 0).numpy()


def score_heldout(*, model: torch.nn.Module) -> float:
    """Foreground IoU of ``model`` on the held-out right quarter of the sample."""
    image, mask = load_nuclei()
    return heldout_iou(predict_mask(model=model, image=image), mask, split_column(image.shape[1]))


def _recalibrate_bn(model, batches, log) -> None:
    """Recompute BatchNorm running statistics with the final weights (cumulative average)."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        for xb in batches:
            model(xb)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 0.1
    log("recalibrated BatchNorm statistics on {} batches".format(len(batches)))


def _fit(model, *, steps: int, seed: int, log: Callable[[str], None]) -> None:
    r = RECIPE
    x, y = _training_arrays()
    x_limit = split_column(x.shape[2])
    rng = np.random.default_rng(seed)
    model.to(memory_format=CHANNELS_LAST)
    opt = torch.optim.Adam(model.parameters(), lr=r["lr"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1), eta_min=r["min_lr"])
    model.train()
    start = time.monotonic()
    for step in range(1, steps + 1):
        xb, yb = _sample_batch(rng, x, y, x_limit=x_limit, crop=r["crop"], batch=r["batch_size"])
        loss = bce_dice_loss(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step == 1 or step % 10 == 0 or step == steps:
            log("step {}/{}  loss {:.4f}  {:.0f}s".format(step, steps, loss.item(),
                                                          time.monotonic() - start))
    n_bn = min(r["bn_recalibration_batches"], steps)
    _recalibrate_bn(model, [_sample_batch(rng, x, y, x_limit=x_limit, crop=r["crop"],
                                          batch=r["batch_size"])[0] for _ in range(n_bn)], log)
    model.to(memory_format=torch.contiguous_format)


def _config(*, steps: int) -> dict:
    """config.yml in pytorch-nested-unet's format."""
    r = RECIPE
    return {"name": "nuclei_NestedUNet_woDS", "arch": "NestedUNet", "deep_supervision": False,
            "input_channels": 3, "num_classes": 1, "input_h": r["crop"], "input_w": r["crop"],
            "dataset": "stardist_img2d_left3q", "epochs": 1, "steps": steps,
            "batch_size": r["batch_size"], "loss": "BCEDiceLoss", "optimizer": "Adam",
            "lr": r["lr"], "weight_decay": 0.0, "scheduler": "CosineAnnealingLR",
            "min_lr": r["min_lr"]}


def _write_dir(out_dir: Path, files: dict) -> None:
    """Write ``files`` (name -> writer(path)) into a temp dir, then move it into place."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="." + out_dir.name + ".", dir=str(out_dir.parent)))
    try:
        for name, write in files.items():
            write(tmp / name)
        if not out_dir.exists():
            os.replace(str(tmp), str(out_dir))
            return
        for name in files:  # existing folder: replace our files one by one, each atomically
            os.replace(str(tmp / name), str(out_dir / name))
    finally:
        shutil.rmtree(str(tmp), ignore_errors=True)


def train_demo(*, out_dir, steps: Optional[int] = None, seed: int = 0,
               log: Callable[[str], None] = print_to_stderr) -> dict:
    """Train the demo NestedUNet into ``out_dir``; return what train.json records."""
    steps = RECIPE["steps"] if steps is None else int(steps)
    if steps < 1:
        raise UsageError("The number of training steps must be at least 1 (got {}).".format(steps),
                         "Pass --steps 1 or more, or leave it out for the default.")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError("{} exists and is not a folder.".format(out_dir),
                         "Pass --out a new or existing folder.")
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)  # the recipe is timed, and reproducible, on two cores
    try:
        torch.manual_seed(seed)
        model = NestedUNet(num_classes=1, input_channels=3, deep_supervision=False)
        log("training NestedUNet on the nuclei sample: {} steps, batch {}, crop {}, seed {}"
            .format(steps, RECIPE["batch_size"], RECIPE["crop"], seed))
        start = time.monotonic()
        _fit(model, steps=steps, seed=seed, log=log)
        seconds = time.monotonic() - start
        iou = score_heldout(model=model)
    finally:
        torch.set_num_threads(threads)
    log("held-out IoU (right quarter): {:.4f}  ({:.0f}s training)".format(iou, seconds))
    report = {"heldout_iou": round(iou, 6), "steps": steps, "seconds": round(seconds, 1),
              "seed": seed, "torch": torch.__version__, "threads": THREADS,
              "train_version": TRAIN_VERSION, "recipe": dict(RECIPE, steps=steps),
              "data_sha256": data_sha256()}
    config = _config(steps=steps)
    _write_dir(out_dir, {
        "model.pth": lambda p: torch.save(model.state_dict(), str(p)),
        "config.yml": lambda p: p.write_text(yaml.safe_dump(config, sort_keys=False)),
        "train.json": lambda p: p.write_text(json.dumps(report, indent=2) + "\n"),
    })
    log("saved {}".format(out_dir))
    return dict(report, out_dir=str(out_dir))


def data_sha256() -> str:
    """One digest of the sample image and mask."""
    digest = hashlib.sha256()
    for name in (IMAGE_FILE, MASK_FILE):
        digest.update((data_dir() / name).read_bytes())
    return digest.hexdigest()


def cache_key(*, steps: int, seed: int) -> str:
    params = {"recipe": dict(RECIPE, steps=steps), "seed": seed, "threads": THREADS,
              "version": TRAIN_VERSION, "data": data_sha256()}
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


def cache_root(cache_dir=None) -> Path:
    """``cache_dir``, else $EDGESEG_CACHE_DIR, else ~/.cache/edgeseg."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("EDGESEG_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "edgeseg"


@contextmanager
def _file_lock(path: Path):
    """An exclusive advisory lock, so two processes do not both train the same model."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(str(path), "a") as handle:
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks; at worst both train, writes stay atomic
            yield
            return
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _is_complete(folder: Path) -> bool:
    return all((folder / n).is_file() for n in ("model.pth", "config.yml", "train.json"))


def demo_checkpoint(*, cache_dir=None, steps: Optional[int] = None, seed: int = 0,
                    log: Callable[[str], None] = print_to_stderr) -> Path:
    """The trained demo model folder under ``<cache>/demo/<key>/``, training it only if missing."""
    steps = RECIPE["steps"] if steps is None else int(steps)
    folder = cache_root(cache_dir) / "demo" / cache_key(steps=steps, seed=seed)
    if _is_complete(folder):
        log("using cached demo model {}".format(folder))
        return folder
    with _file_lock(folder.with_name(folder.name + ".lock")):
        if _is_complete(folder):
            log("using cached demo model {} (trained by another process)".format(folder))
            return folder
        train_demo(out_dir=folder, steps=steps, seed=seed, log=log)
    return folder
