"""Frame -> input tensor, exactly as the contract in the model says.

The host's calibration and validation call these same functions, so the numbers measured on the
host are the numbers of the code that runs on the board.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np
from PIL import Image

from .contract import Contract

_RESAMPLE = {"bilinear": Image.BILINEAR, "nearest": Image.NEAREST, "bicubic": Image.BICUBIC}


def to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """Any greyscale / RGB / RGBA array (uint8 or uint16) -> HxWx3 uint8 RGB."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        if arr.dtype == np.uint16 and arr.max(initial=0) > 255:
            arr = (arr.astype(np.float32) * (255.0 / 65535.0)).round()
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    elif arr.ndim == 3 and arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[:, :, :3]
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError("expected a greyscale or RGB image, got shape {}".format(arr.shape))
    return np.ascontiguousarray(arr)


def input_size_for(frame_hw: Tuple[int, int], contract: Contract) -> Tuple[int, int]:
    """The (H, W) the network is fed for a frame of ``frame_hw``."""
    if not contract.dynamic_hw:
        return contract.height, contract.width
    # Dynamic models take any multiple of 16 (four 2x poolings): round the frame size down.
    h, w = frame_hw
    return max(16, h - h % 16), max(16, w - w % 16)


def _linear_axis(out_len: int, in_len: int):
    """OpenCV INTER_LINEAR sample positions: half-pixel centres, edges clamped, no antialiasing."""
    pos = (np.arange(out_len, dtype=np.float64) + 0.5) * (in_len / out_len) - 0.5
    low = np.floor(pos)
    frac = pos - low
    low = low.astype(np.int64)
    frac[low < 0] = 0.0
    low[low < 0] = 0
    top = low >= in_len - 1
    low[top], frac[top] = in_len - 1, 0.0
    return low, np.minimum(low + 1, in_len - 1), frac


def resize_cv2_linear(frame: np.ndarray, size_hw: Tuple[int, int]) -> np.ndarray:
    """``cv2.resize(frame, (w, h), interpolation=cv2.INTER_LINEAR)``: OpenCV when installed, else
    the same formula in numpy (OpenCV rounds its fixed-point weights: within one grey level)."""
    h, w = size_hw
    try:
        import cv2
    except ImportError:
        cv2 = None
    if cv2 is not None:
        return cv2.resize(np.ascontiguousarray(frame), (w, h), interpolation=cv2.INTER_LINEAR)
    y0, y1, fy = _linear_axis(h, frame.shape[0])
    x0, x1, fx = _linear_axis(w, frame.shape[1])
    src = frame.astype(np.float32)
    rows = src[y0] * (1 - fy)[:, None, None] + src[y1] * fy[:, None, None]
    out = rows[:, x0] * (1 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def resize_rgb(frame: np.ndarray, size_hw: Tuple[int, int], method: str = "bilinear") -> np.ndarray:
    """Resize an HxWx3 uint8 frame with Pillow (same library on host and device), or as
    OpenCV's INTER_LINEAR for ``cv2-linear`` (the pytorch-nested-unet preset)."""
    h, w = size_hw
    if frame.shape[0] == h and frame.shape[1] == w:
        return frame
    if method == "cv2-linear":
        return resize_cv2_linear(frame, size_hw)
    img = Image.fromarray(frame)
    return np.asarray(img.resize((w, h), _RESAMPLE.get(method, Image.BILINEAR)))


def normalize(frame: np.ndarray, contract: Contract) -> np.ndarray:
    """HxWx3 uint8 RGB (already at input size) -> CxHxW float32 as the network expects."""
    if contract.color_order == "GRAY":
        x = np.asarray(Image.fromarray(frame).convert("L"), dtype=np.float32)[:, :, None]
    elif contract.color_order == "BGR":
        x = frame[:, :, ::-1].astype(np.float32)
    else:
        x = frame.astype(np.float32)
    mean = np.asarray(contract.mean, dtype=np.float32)
    std = np.asarray(contract.std, dtype=np.float32)
    x = (x * np.float32(contract.scale) - mean) / std
    return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)


def preprocess(frame: np.ndarray, contract: Contract) -> np.ndarray:
    """HxWx3 uint8 RGB frame -> 1xCxHxW float32 batch for the model."""
    resized = resize_rgb(frame, input_size_for(frame.shape[:2], contract), contract.resize)
    return normalize(resized, contract)[None]
