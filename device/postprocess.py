"""Logits -> masks at the frame's own size."""

from __future__ import annotations

from typing import Tuple

import numpy as np
from PIL import Image

from .contract import Contract


def masks_from_logits(logits: np.ndarray, contract: Contract,
                      frame_hw: Tuple[int, int]) -> np.ndarray:
    """CxHxW logits -> CxH'xW' bool masks at ``frame_hw`` (nearest-neighbour resize).

    sigmoid models: one independent mask per class (``sigmoid(x) > threshold`` evaluated as a cut on
    the raw logit, no exp needed); softmax / none with several classes: one-hot of the argmax.
    """
    if logits.ndim == 4:
        logits = logits[0]
    cut = contract.logit_threshold()
    if cut is not None:
        masks = logits > cut
    elif logits.shape[0] == 1:
        masks = logits > contract.threshold
    else:
        labels = logits.argmax(axis=0)
        masks = labels[None] == np.arange(logits.shape[0])[:, None, None]
    return resize_masks(masks, frame_hw)


def resize_masks(masks: np.ndarray, frame_hw: Tuple[int, int]) -> np.ndarray:
    h, w = frame_hw
    if masks.shape[1] == h and masks.shape[2] == w:
        return masks
    out = np.empty((masks.shape[0], h, w), dtype=bool)
    for c in range(masks.shape[0]):
        img = Image.fromarray(masks[c].astype(np.uint8) * 255)
        out[c] = np.asarray(img.resize((w, h), Image.NEAREST)) > 127
    return out


def mask_image(masks: np.ndarray) -> np.ndarray:
    """CxHxW bool -> HxW uint8 label image (0 background, c+1 for class c; later classes win)."""
    label = np.zeros(masks.shape[1:], dtype=np.uint8)
    for c in range(masks.shape[0]):
        label[masks[c]] = c + 1
    return label
