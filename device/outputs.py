"""Where the agent's results go: nowhere (benchmarks) or mask files on disk."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from .errors import UsageError
from .postprocess import mask_image


class NullSink:
    """Discard results (pure latency measurement)."""

    def write(self, frame, masks) -> None:
        pass

    def close(self) -> None:
        pass


class MaskFileSink:
    """One PNG per frame, named after the frame: 0/255 for one class, label values 0..C otherwise."""

    def __init__(self, folder: str):
        self.folder = os.path.expanduser(folder)
        try:
            os.makedirs(self.folder, exist_ok=True)
        except OSError as exc:
            raise UsageError("Cannot create the mask folder {}: {}.".format(self.folder, exc),
                             "Pick a writable folder for --save-masks.")
        self.written = 0

    def write(self, frame, masks: np.ndarray) -> None:
        label = mask_image(masks)
        if masks.shape[0] == 1:
            label = label * np.uint8(255)
        path = os.path.join(self.folder, frame.name + ".png")
        tmp = path + ".tmp"
        Image.fromarray(label).save(tmp, format="PNG")
        os.replace(tmp, path)
        self.written += 1

    def close(self) -> None:
        pass


def open_sink(save_masks=None):
    return MaskFileSink(save_masks) if save_masks else NullSink()
