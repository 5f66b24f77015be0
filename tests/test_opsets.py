"""Opset rules and the exporter choice: what an opset cannot express is refused by name."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

from edgeseg.device.contract import Contract
from edgeseg.device.runner import Runner
from edgeseg.host.errors import ExportError, UsageError
from edgeseg.host.export import export_onnx

from models_util import logits_of, random_net

SIZE = 32


def _export(model, tmp_path, opset, **options):
    path = tmp_path / "m.onnx"
    info = export_onnx(model=model, path=str(path), size_hw=(SIZE, SIZE), opset=opset,
                       contract=Contract(input_size=[SIZE, SIZE]), input_channels=3, **options)
    return path, info


class Interpolating(torch.nn.Module):
    """align_corners upsampling through the functional API (no nn.Upsample layer to spot)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 1, 3, padding=1)

    def forward(self, x):
        y = F.max_pool2d(self.conv(x), 2)
        return F.interpolate(y, scale_factor=2, mode="bilinear", align_corners=True)


THETA = torch.tensor([[[0.9, 0.1, 0.0], [-0.1, 0.9, 0.0]]])


class Sampling(torch.nn.Module):
    """grid_sample on a fixed grid: ONNX GridSample exists from opset 16."""

    def __init__(self):
        super().__init__()
        self.register_buffer("grid", F.affine_grid(THETA, [1, 1, SIZE, SIZE], align_corners=False))

    def forward(self, x):
        return F.grid_sample(x[:, :1], self.grid, align_corners=False)


class AffineSampling(torch.nn.Module):
    """affine_grid computed in the graph: ONNX AffineGrid exists from opset 20."""

    def forward(self, x):
        grid = F.affine_grid(THETA.expand(x.shape[0], 2, 3), [x.shape[0], 1, SIZE, SIZE],
                             align_corners=False)
        return F.grid_sample(x[:, :1], grid, align_corners=False)


@pytest.mark.parametrize("opset", [9, 10])
def test_align_corners_upsampling_below_opset_11_is_refused(tmp_path, opset):
    with pytest.raises(ExportError) as err:
        _export(random_net("unet"), tmp_path, opset)
    text = str(err.value)
    assert "align_corners=True" in text and "layer(s) up" in text and "opset 11" in text
    assert "--opset 11" in err.value.hint
    assert not list(tmp_path.iterdir())


def test_functional_align_corners_below_opset_11_is_refused(tmp_path):
    with pytest.raises(ExportError) as err:
        _export(Interpolating().eval(), tmp_path, 10)
    assert "align_corners=True" in str(err.value) and "--opset 11" in err.value.hint


def test_op_the_opset_cannot_express_names_it_and_the_lowest_opset(tmp_path):
    with pytest.raises(ExportError) as err:
        _export(Sampling().eval(), tmp_path, 15)
    assert "grid_sampler" in str(err.value) and "lowest opset that can is 16" in str(err.value)
    assert "--opset 16" in err.value.hint
    path, info = _export(Sampling().eval(), tmp_path, 16)  # and 16 does work
    assert info["opset"] == 16


def test_lowest_working_opset_is_found_when_torch_does_not_say(tmp_path, capfd):
    with pytest.raises(ExportError) as err:
        _export(AffineSampling().eval(), tmp_path, 16)
    assert "affine_grid_generator" in str(err.value)
    assert "lowest opset that can is 20" in str(err.value) and "--opset 20" in err.value.hint
    out, errout = capfd.readouterr()
    assert "Torch IR graph" not in out + errout  # torch's C++ graph dump does not reach the user


@pytest.mark.parametrize("opset", [5, 99])
def test_opsets_outside_the_exporters_range_are_refused(tmp_path, opset):
    with pytest.raises(ExportError, match="outside what torch"):
        _export(random_net("unet"), tmp_path, opset)


def test_unknown_exporter_is_refused(tmp_path):
    with pytest.raises(UsageError, match="Unknown exporter"):
        _export(random_net("unet"), tmp_path, 17, exporter="tf2onnx")


def test_dynamo_exporter_writes_the_requested_opset_and_matches_torch(tmp_path):
    model = random_net("unet", seed=4)
    path, info = _export(model, tmp_path, 18, exporter="dynamo")
    proto = onnx.load(str(path))
    assert info["exporter"] == "dynamo" and info["opset"] == 18
    assert [(e.domain, e.version) for e in proto.opset_import if e.domain in ("", "ai.onnx")] == \
        [("", 18)]
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    runner = Runner(str(path), providers=["cpu"])
    batch = np.random.default_rng(0).standard_normal((1, 3, SIZE, SIZE)).astype(np.float32)
    np.testing.assert_allclose(runner.run(batch), logits_of(model, batch), atol=1e-4)


def test_dynamo_exporter_that_writes_another_opset_fails_and_says_so(tmp_path):
    with pytest.raises(ExportError) as err:  # dynamo builds opset 18 and cannot go down to 11
        _export(random_net("unet"), tmp_path, 11, exporter="dynamo")
    assert "wrote opset 18, but opset 11 was requested" in str(err.value)
    assert not list(tmp_path.iterdir())


def test_dynamo_without_onnxscript_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(ExportError, match="needs the onnxscript package") as err:
        _export(random_net("unet"), tmp_path, 18, exporter="dynamo")
    assert "pip install onnxscript" in err.value.hint
