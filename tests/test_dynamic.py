"""--dynamic-hw: claimed only after ONNX and PyTorch agree at two sizes; the agent feeds any frame."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from edgeseg.device.agent import run_agent
from edgeseg.device.contract import Contract
from edgeseg.device.runner import Runner
from edgeseg.host.convert import convert
from edgeseg.host.dynamic import check_dynamic_hw
from edgeseg.host.errors import ExportError, UsageError
from edgeseg.host.export import export_proto

from models_util import nuclei_arrays, nuclei_folder, random_net, write_checkpoint

SIZE = 32


def quiet(message):
    pass


@pytest.fixture(scope="module")
def odd_frames(tmp_path_factory):
    """Real nuclei crops of 50x70 pixels: not a multiple of 16."""
    image, _ = nuclei_arrays()
    folder = tmp_path_factory.mktemp("odd")
    for i in range(3):
        crop = image[60 * i:60 * i + 50, 100:170]
        Image.fromarray(np.repeat(crop[:, :, None], 3, axis=2)).save(folder / "f{}.png".format(i))
    return folder


def test_dynamic_nested_unet_export_validates_and_runs_any_frame_size(tmp_path, odd_frames):
    model = random_net("nested_unet", seed=41)
    ckpt = write_checkpoint(tmp_path / "ckpt", model, size=SIZE)
    val = nuclei_folder(tmp_path / "val", 2, 48, seed=5)
    report = convert(checkpoint=ckpt, out_dir=tmp_path / "out", precisions=("fp32",),
                     val=str(val), dynamic_hw=True, log=quiet)
    assert report["ok"], report["artifacts"][0]["failures"]
    assert report["simplify"]["simplified"] is True, report["simplify"]
    check = report["export"]["dynamic_check"]
    assert check["checked_sizes"] == ["256x256", "320x480"]
    assert all(err <= 1e-3 for err in check["max_abs_err"].values())
    (art,) = report["artifacts"]
    assert art["inputs"] == [{"name": "input", "shape": ["batch", 3, "height", "width"]}]
    runner = Runner(art["path"], providers=["cpu"])
    assert runner.contract.dynamic_hw is True
    result = run_agent(model=art["path"], source=str(odd_frames), frames=3, warmup=1,
                       save_masks=str(tmp_path / "masks"), log=quiet)
    assert result["frame_size"] == [50, 70] and result["input_size"] == [48, 64]
    masks = sorted((tmp_path / "masks").glob("*.png"))
    assert len(masks) == 3 and np.asarray(Image.open(masks[0])).shape == (50, 70)


class ShapeBaked(torch.nn.Module):
    """Python arithmetic on the input width: the tracer bakes the export-time width in."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 1, 1)

    def forward(self, x):
        return self.conv(x) * float(x.shape[-1])


def test_dynamic_claim_is_refused_when_onnx_and_torch_disagree():
    model = ShapeBaked().eval()
    proto, _ = export_proto(model=model, size_hw=(SIZE, SIZE), opset=17,
                            contract=Contract(input_size=[SIZE, SIZE], dynamic_hw=True),
                            input_channels=3, dynamic_hw=True)
    with pytest.raises(ExportError, match="disagree at 256x256") as err:
        check_dynamic_hw(proto=proto, model=model, channels=3)
    assert "without --dynamic-hw" in err.value.hint


def test_dynamic_check_refuses_sizes_not_multiple_of_16():
    model = random_net("unet")
    proto, _ = export_proto(model=model, size_hw=(SIZE, SIZE), opset=17,
                            contract=Contract(input_size=[SIZE, SIZE]), input_channels=3,
                            dynamic_hw=True)
    with pytest.raises(UsageError, match="multiple of 16"):
        check_dynamic_hw(proto=proto, model=model, channels=3, sizes=[(64, 64), (250, 250)])


def test_dynamic_int8_calibrates_on_frames_of_different_sizes(tmp_path):
    image, _ = nuclei_arrays()
    calib = tmp_path / "calib"
    calib.mkdir()
    sizes = [(48, 48), (64, 80), (50, 70), (96, 64), (48, 48), (64, 64), (80, 48), (48, 96)]
    for i, (h, w) in enumerate(sizes):  # a user's folder: photos of several sizes
        crop = image[40 * i:40 * i + h, 30 * i:30 * i + w]
        Image.fromarray(np.repeat(crop[:, :, None], 3, axis=2)).save(calib / "c{}.png".format(i))
    ckpt = write_checkpoint(tmp_path / "ckpt", random_net("unet", seed=43), arch="UNet", size=SIZE)
    report = convert(checkpoint=ckpt, out_dir=tmp_path / "out", calib=str(calib), calib_count=6,
                     dynamic_hw=True, log=quiet)
    assert [a["precision"] for a in report["artifacts"]] == ["fp32", "int8"]
    assert all(a["parity"]["images"] == 2 for a in report["artifacts"])
    int8 = report["artifacts"][1]
    assert int8["inputs"][0]["shape"] == ["batch", 3, "height", "width"]
    assert Runner(int8["path"], providers=["cpu"]).contract.dynamic_hw is True
