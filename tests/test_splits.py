"""Calibration and validation images never overlap, whatever folders or globs they come from."""

from __future__ import annotations

import pytest

from edgeseg.host.errors import UsageError
from edgeseg.host.splits import gather_frames

from models_util import nuclei_folder


def _gather(calib, val, count=8):
    logs = []
    calib_frames, val_frames, info = gather_frames(calib=str(calib), val=str(val),
                                                   calib_count=count, need_calib=True,
                                                   log=logs.append)
    return calib_frames, val_frames, info, logs


def test_val_images_inside_calib_are_not_calibrated(tmp_path):
    folder = nuclei_folder(tmp_path / "imgs", 8, 32)
    names = sorted(p.name for p in folder.iterdir())
    val = tmp_path / "val"
    val.mkdir()
    for name in names[:3]:  # the same pixels under another path
        (val / name).write_bytes((folder / name).read_bytes())
    calib_frames, val_frames, info, logs = _gather(folder, val)
    assert len(val_frames) == 3 and len(calib_frames) == 5
    assert {f.name for f in calib_frames}.isdisjoint({f.name for f in val_frames})
    assert info["dropped_from_calib"] == 3 and info["calibration_images"] == 5
    assert any("3 --calib image(s) are also --val images" in w for w in info["warnings"])
    assert any("fewer than 16" in w for w in info["warnings"])  # both warnings kept
    assert any("also --val images" in m for m in logs)


def test_a_glob_over_part_of_the_calib_folder_is_kept_apart(tmp_path):
    folder = nuclei_folder(tmp_path / "imgs", 6, 32)
    first = sorted(p.stem for p in folder.iterdir())[0]
    calib_frames, val_frames, info, _ = _gather(folder, folder / (first + "*.png"))
    assert len(val_frames) == 1 and len(calib_frames) == 5
    assert info["dropped_from_calib"] == 1


def test_disjoint_sources_drop_nothing(tmp_path):
    calib = nuclei_folder(tmp_path / "calib", 4, 32, seed=1)
    val = nuclei_folder(tmp_path / "val", 2, 32, seed=2)
    calib_frames, _, info, _ = _gather(calib, val)
    assert len(calib_frames) == 4 and "dropped_from_calib" not in info


def test_calib_entirely_inside_val_is_refused(tmp_path):
    folder = nuclei_folder(tmp_path / "imgs", 3, 32)
    val = tmp_path / "val"
    val.mkdir()
    for path in folder.iterdir():
        (val / path.name).write_bytes(path.read_bytes())
    (val / "extra.png").write_bytes(next(folder.iterdir()).read_bytes())
    with pytest.raises(UsageError) as err:
        _gather(folder, val)
    assert "Every --calib image is also a --val image" in str(err.value)
