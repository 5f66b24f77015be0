"""The bundled real sample: one 512x512 nuclei image and its expert mask (``examples/data``).

The demo model is trained on the left three quarters of the image and scored on the held-out right
quarter; the quickstart slides windows over the whole image to imitate a microscope scan.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Tuple

import numpy as np

from .errors import EdgesegError

IMAGE_FILE = "img2d.tif"
MASK_FILE = "mask2d.tif"
HELDOUT_FRACTION = 0.25


def data_dir() -> Path:
    """The repository's ``examples/data`` folder, which holds the sample image and mask."""
    path = Path(__file__).resolve().parents[1] / "examples" / "data"
    missing = [name for name in (IMAGE_FILE, MASK_FILE) if not (path / name).is_file()]
    if missing:
        raise EdgesegError(
            "The sample data is missing: {} not found in {}.".format(", ".join(missing), path),
            "Run edgeseg from a checkout of the repository (pip install -e .), which ships "
            "examples/data/img2d.tif and mask2d.tif.")
    return path


def _read_tiff(path: Path) -> np.ndarray:
    import tifffile

    try:
        return np.asarray(tifffile.imread(str(path)))
    except Exception as exc:  # tifffile raises many types for a damaged file
        raise EdgesegError("Cannot read the sample TIFF {}: {}.".format(path, exc),
                           "Restore examples/data from the repository.") from exc


def load_nuclei() -> Tuple[np.ndarray, np.ndarray]:
    """The sample as (image uint8 HxW, foreground mask bool HxW)."""
    folder = data_dir()
    image = _read_tiff(folder / IMAGE_FILE)
    labels = _read_tiff(folder / MASK_FILE)
    if image.ndim != 2 or labels.shape != image.shape:
        raise EdgesegError(
            "The sample image {} and mask {} are not two matching 2-D arrays.".format(
                image.shape, labels.shape),
            "Restore examples/data from the repository.")
    if image.min(initial=0) < 0 or image.max(initial=0) > 255:
        raise EdgesegError(
            "The sample image has values {}..{}, outside 0..255; a plain cast to uint8 would "
            "change it.".format(image.min(), image.max()),
            "Restore examples/data/img2d.tif from the repository.")
    return image.astype(np.uint8), labels > 0


def split_column(width: int = 512) -> int:
    """First column of the held-out right quarter (384 for the 512-wide sample)."""
    return int(round(width * (1.0 - HELDOUT_FRACTION)))


def _starts(size: int, stride: int, length: int) -> List[int]:
    if length <= size:
        return [0]
    starts = list(range(0, length - size + 1, stride))
    if starts[-1] != length - size:
        starts.append(length - size)
    return starts


def scan_windows(*, size: int, stride: int, height: int, width: int) -> List[Tuple[int, int]]:
    """Top-left (y, x) of a raster of ``size`` windows covering the image, rows first.

    The last row and column are aligned to the bottom and right edges, so every pixel is covered.
    """
    if size <= 0 or stride <= 0:
        raise EdgesegError("Window size and stride must be positive (got {} and {}).".format(
            size, stride), "Pass a positive --size and --stride.")
    if size > height or size > width:
        raise EdgesegError("A {0}x{0} window does not fit a {1}x{2} image.".format(
            size, height, width), "Use a window no larger than the image.")
    return [(y, x) for y in _starts(size, stride, height) for x in _starts(size, stride, width)]


def heldout_iou(pred_mask_full: np.ndarray, gt_mask_full: np.ndarray, x0: int) -> float:
    """Foreground IoU of two full-size masks on columns ``x >= x0`` (1.0 when both are empty)."""
    pred = np.asarray(pred_mask_full).astype(bool)
    gt = np.asarray(gt_mask_full).astype(bool)
    if pred.shape != gt.shape:
        raise EdgesegError("Predicted mask {} and ground truth {} differ in shape.".format(
            pred.shape, gt.shape), "Resize the prediction to the image size before scoring.")
    pred, gt = pred[..., x0:], gt[..., x0:]
    union = np.logical_or(pred, gt).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(pred, gt).sum() / union)
