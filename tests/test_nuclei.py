"""The bundled nuclei sample, the scan raster and the held-out IoU."""

import numpy as np
import pytest

from edgeseg.host import nuclei
from edgeseg.host.errors import EdgesegError
from edgeseg.host.nuclei import data_dir, heldout_iou, load_nuclei, scan_windows, split_column


def test_data_dir_holds_the_sample():
    folder = data_dir()
    assert (folder / "img2d.tif").is_file() and (folder / "mask2d.tif").is_file()


def test_load_nuclei_is_exact_and_real():
    import tifffile

    image, mask = load_nuclei()
    assert image.shape == mask.shape == (512, 512)
    assert image.dtype == np.uint8 and mask.dtype == bool
    raw = tifffile.imread(str(data_dir() / "img2d.tif"))
    assert np.array_equal(image.astype(raw.dtype), raw)  # the cast lost nothing
    assert 0.15 < mask.mean() < 0.25  # about 20 % foreground
    # nuclei are brighter than the background
    assert image[mask].mean() > 2 * image[~mask].mean()


def test_missing_data_dir_is_a_clear_error(monkeypatch, tmp_path):
    fake = tmp_path / "host" / "nuclei.py"
    fake.parent.mkdir()
    fake.write_text("")
    monkeypatch.setattr(nuclei, "__file__", str(fake))
    with pytest.raises(EdgesegError, match="sample data is missing") as info:
        data_dir()
    assert "examples/data" in info.value.hint


def test_out_of_range_image_is_refused(monkeypatch, tmp_path):
    import tifffile

    monkeypatch.setattr(nuclei, "data_dir", lambda: tmp_path)
    tifffile.imwrite(str(tmp_path / "img2d.tif"), np.full((8, 8), 300, np.uint16))
    tifffile.imwrite(str(tmp_path / "mask2d.tif"), np.zeros((8, 8), np.uint16))
    with pytest.raises(EdgesegError, match="outside 0..255"):
        load_nuclei()


def test_split_column():
    assert split_column() == 384
    assert split_column(100) == 75


def test_scan_windows_cover_the_image_edge_aligned():
    windows = scan_windows(size=96, stride=64, height=512, width=512)
    xs = sorted({x for _, x in windows})
    assert xs == [0, 64, 128, 192, 256, 320, 384, 416]
    assert windows[0] == (0, 0) and windows[1] == (0, 64)  # rows first
    assert windows[-1] == (416, 416)
    covered = np.zeros((512, 512), bool)
    for y, x in windows:
        covered[y:y + 96, x:x + 96] = True
    assert covered.all()


def test_scan_windows_exact_fit_and_whole_image():
    assert scan_windows(size=128, stride=128, height=256, width=384) == [
        (0, 0), (0, 128), (0, 256), (128, 0), (128, 128), (128, 256)]
    assert scan_windows(size=64, stride=10, height=64, width=64) == [(0, 0)]


@pytest.mark.parametrize("kwargs", [dict(size=0, stride=8), dict(size=8, stride=0),
                                    dict(size=600, stride=8)])
def test_scan_windows_bad_arguments(kwargs):
    with pytest.raises(EdgesegError):
        scan_windows(height=512, width=512, **kwargs)


def test_heldout_iou_scores_only_the_right_part():
    gt = np.zeros((4, 8), bool)
    gt[:, 6:] = True
    pred = gt.copy()
    pred[:, :6] = True  # wrong, but left of x0: ignored
    assert heldout_iou(pred, gt, 6) == 1.0
    pred[:2, 7] = False  # 2 of 8 foreground pixels lost
    assert heldout_iou(pred, gt, 6) == pytest.approx(6 / 8)
    assert heldout_iou(pred, gt, 0) == pytest.approx(6 / 32)  # 24 wrong on the left
    assert heldout_iou(np.zeros_like(gt), np.zeros_like(gt), 4) == 1.0


def test_heldout_iou_shape_mismatch():
    with pytest.raises(EdgesegError, match="differ in shape"):
        heldout_iou(np.zeros((4, 4), bool), np.zeros((4, 5), bool), 2)
