"""Frame sources opened by URI through one factory (like jetson-utils ``videoSource``).

Supported now: an image file, a folder of images (sorted by name), a glob pattern, a video file
(OpenCV, optional dependency), each as a plain path or a ``file://`` URI.  Every frame carries its
capture timestamp so the agent can report frame age.
"""

from __future__ import annotations

import glob
import os
import time
from typing import Iterator, List, Optional
from urllib.parse import unquote, urlparse

import numpy as np
from PIL import Image

from .errors import SourceError
from .preprocess import to_rgb_uint8

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
VIDEO_EXTS = (".avi", ".mp4", ".mkv", ".mov", ".m4v", ".webm", ".mpg", ".mpeg", ".h264")


class Frame:
    """One frame: HxWx3 uint8 RGB ``image``, its ``index`` in the source, a ``name``, capture time."""

    __slots__ = ("image", "index", "name", "t_capture")

    def __init__(self, image, index, name, t_capture=None):
        self.image = image
        self.index = index
        self.name = name
        self.t_capture = time.monotonic() if t_capture is None else t_capture


class FrameSource:
    """Base class: ``read()`` returns the next Frame or None at the end."""

    uri = ""
    len_hint = None  # type: Optional[int]

    def read(self) -> Optional[Frame]:
        raise NotImplementedError

    def rewind(self) -> bool:
        """Start over from the first frame; False if the source cannot (live cameras)."""
        return False

    def close(self) -> None:
        pass

    def __iter__(self) -> Iterator[Frame]:
        while True:
            frame = self.read()
            if frame is None:
                return
            yield frame

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_image(path: str) -> np.ndarray:
    """Read any image file Pillow understands (8/16-bit grey, RGB, RGBA) as HxWx3 uint8 RGB."""
    try:
        with Image.open(path) as img:
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(img)
            else:
                arr = np.asarray(img.convert("RGB"))
    except (OSError, ValueError) as exc:
        raise SourceError("Cannot read image {}: {}.".format(path, exc),
                          "Check that the file is a readable image (PNG, JPEG, TIFF, BMP).")
    return to_rgb_uint8(arr)


class ImageListSource(FrameSource):
    """A fixed list of image files, read in order."""

    def __init__(self, uri: str, paths: List[str]):
        self.uri = uri
        self.paths = paths
        self.len_hint = len(paths)
        self._pos = 0

    def read(self) -> Optional[Frame]:
        if self._pos >= len(self.paths):
            return None
        path = self.paths[self._pos]
        image = read_image(path)
        frame = Frame(image, self._pos, os.path.splitext(os.path.basename(path))[0])
        self._pos += 1
        return frame

    def rewind(self) -> bool:
        self._pos = 0
        return True


class VideoFileSource(FrameSource):
    """A video file decoded with OpenCV."""

    def __init__(self, uri: str, path: str):
        cv2 = _import_cv2(path)
        self.uri = uri
        self.path = path
        self._cv2 = cv2
        self._cap = cv2.VideoCapture(path)
        if not self._cap.isOpened():
            raise SourceError("OpenCV cannot open the video {}.".format(path),
                              "Check the file and that this OpenCV build has the codec "
                              "(or convert the video to a folder of images).")
        count = int(self._cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        self.len_hint = count if count > 0 else None
        self._pos = 0

    def read(self) -> Optional[Frame]:
        ok, bgr = self._cap.read()
        if not ok or bgr is None:
            return None
        t = time.monotonic()
        frame = Frame(np.ascontiguousarray(bgr[:, :, ::-1]), self._pos,
                      "frame{:06d}".format(self._pos), t)
        self._pos += 1
        return frame

    def rewind(self) -> bool:
        self._cap.release()
        self._cap = self._cv2.VideoCapture(self.path)
        self._pos = 0
        return self._cap.isOpened()

    def seek(self, index: int) -> None:
        self._cap.set(self._cv2.CAP_PROP_POS_FRAMES, index)
        self._pos = index

    def close(self) -> None:
        self._cap.release()


class LoopingSource(FrameSource):
    """Wraps a finite source and starts it over at its end (for benchmarks longer than a clip)."""

    def __init__(self, inner: FrameSource):
        self.inner = inner
        self.uri = inner.uri
        self.len_hint = inner.len_hint
        self.loops = 0

    def read(self) -> Optional[Frame]:
        frame = self.inner.read()
        if frame is None and self.inner.rewind():
            self.loops += 1
            frame = self.inner.read()
        return frame

    def close(self) -> None:
        self.inner.close()


def _import_cv2(path: str):
    try:
        import cv2  # noqa: F401  (optional dependency)
    except ImportError:
        raise SourceError("Reading the video {} needs OpenCV, which is not installed.".format(path),
                          "Install opencv-python-headless into the Python that runs this (e.g. "
                          "~/edgeseg-venv/bin/pip install opencv-python-headless), or use a "
                          "folder of images as the source.")
    return cv2


def uri_to_path(uri: str) -> str:
    """``file:///abs/x`` -> ``/abs/x``; plain paths pass through (with ``~`` expanded)."""
    if uri.startswith("file://"):
        parsed = urlparse(uri)
        return unquote(parsed.path)
    scheme = urlparse(uri).scheme
    if scheme and len(scheme) > 1:
        raise SourceError("Unsupported source URI scheme '{}://' in {}.".format(scheme, uri),
                          "Use a video file, an image file, a folder of images, a glob pattern "
                          "or a file:// URI.")
    return os.path.expanduser(uri)


def _folder_images(folder: str) -> List[str]:
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTS))
    return [os.path.join(folder, n) for n in names]


def _open_path(uri: str, path: str) -> FrameSource:
    if any(ch in path for ch in "*?["):
        paths = sorted(p for p in glob.glob(path) if p.lower().endswith(IMAGE_EXTS))
        if not paths:
            raise SourceError("The pattern {} matches no image files.".format(path),
                              "Check the pattern; supported images: " + ", ".join(IMAGE_EXTS) + ".")
        return ImageListSource(uri, paths)
    if os.path.isdir(path):
        paths = _folder_images(path)
        if not paths:
            raise SourceError("The folder {} holds no images.".format(path),
                              "Put images (" + ", ".join(IMAGE_EXTS) + ") in it or pick another.")
        return ImageListSource(uri, paths)
    if not os.path.exists(path):
        raise SourceError("The source {} does not exist.".format(path),
                          "Give an existing video file, image, folder of images or glob pattern "
                          "(for 'edgeseg profile', a path on the device).")
    if path.lower().endswith(VIDEO_EXTS):
        return VideoFileSource(uri, path)
    if path.lower().endswith(IMAGE_EXTS):
        return ImageListSource(uri, [path])
    raise SourceError("Cannot tell what kind of source {} is.".format(path),
                      "Use a video (" + ", ".join(VIDEO_EXTS) + "), an image, or a folder of images.")


def open_source(uri: str, *, loop: bool = False) -> FrameSource:
    """Open a frame source from a URI or path; ``loop`` restarts finite sources at their end."""
    source = _open_path(uri, uri_to_path(uri))
    return LoopingSource(source) if loop else source


def sample_frames(uri: str, *, count: int) -> List[Frame]:
    """Up to ``count`` frames spread evenly over a finite source (calibration, validation)."""
    with open_source(uri) as source:
        total = source.len_hint
        if isinstance(source, ImageListSource):
            picks = _spread(total, count)
            return [Frame(read_image(source.paths[i]), i,
                          os.path.splitext(os.path.basename(source.paths[i]))[0]) for i in picks]
        if isinstance(source, VideoFileSource) and total:
            frames = []
            for i in _spread(total, count):
                source.seek(i)
                frame = source.read()
                if frame is not None:
                    frames.append(frame)
            return frames
        return [f for _, f in zip(range(count), source)]


def _spread(total: int, count: int) -> List[int]:
    if count >= total:
        return list(range(total))
    return sorted({int(round(i * (total - 1) / max(1, count - 1))) for i in range(count)})
