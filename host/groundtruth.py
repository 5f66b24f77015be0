"""Ground-truth masks for the validation images (``--val-masks DIR``).

Each validation image ``<stem>.<ext>`` has its mask in ``DIR/<stem>.png`` (or ``.tif``, ``.tiff``,
``.bmp``): a label image of the same height and width as the image, read as it is stored (8- or
16-bit, no scaling).  The label values mean:

- one class (``num_classes == 1``): any value > 0 is foreground, 0 is background.  Instance label
  images (every nucleus its own number, like ``examples/data/mask2d.tif``) and 0/255 PNGs both work.
- several classes with ``softmax`` (or ``none``) activation: the value is the class index, so
  channel ``c`` is ``label == c`` (0 is class 0, usually background; values must be < num_classes).
- several classes with ``sigmoid`` activation (independent masks): 0 is no class, value ``k > 0`` is
  class ``k - 1``, so channel ``c`` is ``label == c + 1`` (values must be <= num_classes).  This is
  the label image the agent itself writes with ``--save-masks`` (``postprocess.mask_image``).

The result for each frame is a ``CxHxW`` bool array at the frame's size, the same form as the
agent's ``masks_from_logits`` output, so it can be compared pixel for pixel.
"""

from __future__ import annotations

import os
import re
from typing import List, Optional, Sequence

import numpy as np

from edgeseg.device.contract import Contract
from edgeseg.device.sources import VIDEO_EXTS, uri_to_path

from .errors import UsageError

MASK_EXTS = (".png", ".tif", ".tiff", ".bmp")
VIDEO_FRAME_NAME = re.compile(r"^frame\d{6}$")  # names device/sources.py gives video frames
SHOW = 5  # missing names listed in an error


def load_gt_masks(*, folder, frames: Sequence, contract: Contract,
                  source: Optional[str] = None) -> List[np.ndarray]:
    """One ``CxHxW`` bool mask per frame, read from ``folder/<frame.name>.<png|tif|tiff|bmp>``.

    ``source`` is the URI the frames came from (``--val``); a video there is refused up front, since
    its frames have no file names to match masks by.
    """
    folder = os.path.expanduser(str(folder))
    if source is not None and uri_to_path(str(source)).lower().endswith(VIDEO_EXTS):
        raise _video_error(folder)
    if not os.path.isdir(folder):
        raise UsageError("--val-masks {} is not a folder.".format(folder),
                         "Pass the folder that holds one mask image per validation image, "
                         "named like the images (same file stems).")
    files = _index(folder)
    missing = [f.name for f in frames if f.name not in files]
    if missing:
        if len(missing) == len(frames) and all(VIDEO_FRAME_NAME.match(n) for n in missing):
            raise _video_error(folder)
        raise UsageError("--val-masks {} has no mask for {} of the {} validation images: {}{}."
                         .format(folder, len(missing), len(frames), ", ".join(missing[:SHOW]),
                                 ", ..." if len(missing) > SHOW else ""),
                         "Name each mask like its image (same file stem, e.g. img01.jpg -> "
                         "img01.png) with one of: " + ", ".join(MASK_EXTS) + ".")
    return [_masks_for(path=files[f.name], frame=f, contract=contract) for f in frames]


def _video_error(folder: str) -> UsageError:
    return UsageError("--val-masks {} cannot be matched to frames of a video.".format(folder),
                      "--val-masks needs the validation images (--val) to be an image folder or "
                      "glob whose file stems match the mask files; extract the frames to images.")


def _index(folder: str) -> dict:
    """stem -> path of the first mask file with that stem (extensions in MASK_EXTS order)."""
    found = {}
    names = sorted(os.listdir(folder),
                   key=lambda n: MASK_EXTS.index(os.path.splitext(n)[1].lower())
                   if os.path.splitext(n)[1].lower() in MASK_EXTS else len(MASK_EXTS))
    for name in names:
        stem, ext = os.path.splitext(name)
        if ext.lower() in MASK_EXTS and stem not in found:
            found[stem] = os.path.join(folder, name)
    return found


def read_label_image(path: str) -> np.ndarray:
    """A mask file as an HxW integer label array (values as stored)."""
    try:
        if path.lower().endswith((".tif", ".tiff")):
            import tifffile

            array = np.asarray(tifffile.imread(path))
        else:
            from PIL import Image

            with Image.open(path) as img:
                array = np.asarray(img)
    except Exception as exc:  # Pillow / tifffile raise many types for a damaged file
        raise UsageError("Cannot read the mask {}: {}.".format(path, exc),
                         "Save masks as PNG, TIFF or BMP label images.") from None
    return _to_2d(array, path)


def _to_2d(array: np.ndarray, path: str) -> np.ndarray:
    array = np.squeeze(array)
    if array.ndim == 3 and array.shape[-1] in (2, 4):  # grey+alpha / RGBA: the alpha is not a label
        array = array[..., :-1]
    if array.ndim == 3 and array.shape[-1] in (1, 3):
        if not all(np.array_equal(array[..., 0], array[..., i]) for i in range(array.shape[-1])):
            raise UsageError("The mask {} is a colour image.".format(path),
                             "Save masks as single-channel label images (0 background, class "
                             "or instance numbers as pixel values).")
        array = array[..., 0]
    if array.ndim != 2:
        raise UsageError("The mask {} has shape {}, not an HxW image.".format(path, array.shape),
                         "Save one single-channel label image per validation image.")
    if array.dtype == bool:
        return array.astype(np.uint8)
    if not np.issubdtype(array.dtype, np.integer):
        if not np.array_equal(array, np.round(array)):
            raise UsageError("The mask {} holds non-integer values.".format(path),
                             "Save label images with integer pixel values.")
        array = array.astype(np.int64)
    return array


def labels_to_masks(*, labels: np.ndarray, contract: Contract,
                    path: str = "the mask") -> np.ndarray:
    """HxW label image -> CxHxW bool masks following the conventions in the module docstring."""
    classes = int(contract.num_classes)
    if classes <= 1:
        return (labels > 0)[None]
    offset = 1 if contract.activation == "sigmoid" else 0
    top = classes - 1 + offset
    if labels.min() < 0 or labels.max() > top:
        raise UsageError("The mask {} has label values {}..{}; a {}-class {} model takes 0..{}."
                         .format(path, labels.min(), labels.max(), classes, contract.activation,
                                 top),
                         "With sigmoid, 0 is background and k is class k-1; with softmax, the "
                         "value is the class index.")
    return labels[None] == (np.arange(classes) + offset)[:, None, None]


def _masks_for(*, path: str, frame, contract: Contract) -> np.ndarray:
    labels = read_label_image(path)
    frame_hw = tuple(frame.image.shape[:2])
    if tuple(labels.shape) != frame_hw:
        raise UsageError("The mask {} is {}x{} (HxW) but its image {} is {}x{}.".format(
            path, labels.shape[0], labels.shape[1], frame.name, frame_hw[0], frame_hw[1]),
            "Each mask must have exactly its image's height and width.")
    return labels_to_masks(labels=labels, contract=contract, path=path)


__all__ = ["load_gt_masks", "labels_to_masks", "read_label_image", "MASK_EXTS"]
