"""Calibration planning: MinMax chunks, histogram memory caps, the methods, real onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

from edgeseg.device.contract import Contract
from edgeseg.device.runner import Runner
from edgeseg.host import calibration
from edgeseg.host.calibration import (CalibrationReader, activation_bytes, check_method,
                                      plan_calibration, spread)
from edgeseg.host.errors import UsageError
from edgeseg.host.export import export_onnx
from edgeseg.host.quantize import PREPROCESS, quantize_int8

from models_util import nuclei_frames, random_net

SIZE = 32


def _contract():
    return Contract(input_size=[SIZE, SIZE], arch="unet")


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "model.fp32.onnx"
    export_onnx(model=random_net("unet", seed=2), path=str(path), size_hw=(SIZE, SIZE), opset=17,
                contract=_contract(), input_channels=3)
    return path


def _conv_relu(h="H", w="W"):
    """input 1x3xHxW -> Conv 3->4 (3x3, pad 1) -> Relu, with symbolic batch, height and width."""
    weight = helper.make_tensor("w", TensorProto.FLOAT, [4, 3, 3, 3], np.ones(108).tolist())
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, ["N", 3, h, w])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, ["N", 4, h, w])], initializer=[weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _scales(proto):
    """Activation scales and zero points by name (the calibrated ranges)."""
    weights = {n.input[0] for n in proto.graph.node if n.op_type == "QuantizeLinear"}
    return {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer
            if t.name.endswith(("_scale", "_zero_point")) and not t.dims and t.name not in weights}


def test_activation_bytes_at_the_contracts_size():
    model = _conv_relu()
    contract = Contract(input_size=[8, 16])
    assert activation_bytes(model=model, contract=contract) == 4 * 8 * 16 * (3 + 4 + 4)
    assert model.graph.input[0].type.tensor_type.shape.dim[2].dim_param == "H"  # not modified


def test_unknown_shapes_count_as_the_largest_tensor():
    model = _conv_relu()
    model.graph.node.append(helper.make_node("Custom", ["y"], ["z"], domain="x.custom"))
    model.opset_import.append(helper.make_opsetid("x.custom", 1))
    assert activation_bytes(model=model, contract=Contract(input_size=[8, 8])) == 4 * 64 * 15


def test_histogram_methods_are_capped_to_the_budget():
    frames = nuclei_frames(10, SIZE)
    model, contract = _conv_relu(), Contract(input_size=[8, 8])
    per_frame = 4 * 64 * 11
    used, info, extra = plan_calibration(frames=frames, method="entropy", model=model,
                                         contract=contract, budget=3 * per_frame + 1)
    assert [f.index for f in used] == [0, 4, 9]  # spread over the given frames
    assert info["calibration_frames"] == len(used) == 3 and info["capped_from"] == 10
    assert info["activation_bytes_per_frame"] == per_frame and extra == {}
    used, info, _ = plan_calibration(frames=frames, method="percentile", model=model,
                                     contract=contract, budget=1)
    assert len(used) == 1 and info["calibration_frames"] == 1  # at least one frame
    used, info, _ = plan_calibration(frames=frames, method="percentile", model=model,
                                     contract=contract, budget=10 ** 9)
    assert len(used) == 10 and "capped_from" not in info


def test_minmax_is_chunked_and_never_capped():
    used, info, extra = plan_calibration(frames=nuclei_frames(12, SIZE), method="minmax",
                                         model=_conv_relu(), contract=_contract(), budget=1)
    assert len(used) == 12 and info == {"calibration_frames": 12, "chunk": 6}
    assert extra == {"CalibStridedMinMax": 6}


def test_spread_keeps_first_and_last():
    assert spread(list(range(10)), 3) == [0, 4, 9]
    assert spread(list(range(10)), 1) == [0]
    assert spread(list(range(4)), 9) == [0, 1, 2, 3]


def test_unknown_method_is_refused():
    with pytest.raises(UsageError) as err:
        check_method("auto")
    assert "auto" in err.value.message and "entropy" in err.value.hint


def test_chunked_minmax_matches_one_pass(tmp_path, fp32):
    frames = nuclei_frames(12, 48, seed=3)
    info = quantize_int8(fp32_path=str(fp32), out_path=str(tmp_path / "chunked.onnx"),
                         frames=frames, contract=_contract(), log=lambda m: None,
                         share_scales=False)  # the ranges as calibrated, none shared
    assert info["chunk"] == 6 and info["calibration_frames"] == 12
    assert info["shared_scales"] == {"enabled": False}
    reader = CalibrationReader(frames=frames, contract=_contract())
    quantize_static(str(fp32), str(tmp_path / "onepass.onnx"), calibration_data_reader=reader,
                    quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    chunked = _scales(onnx.load(str(tmp_path / "chunked.onnx")))
    onepass = _scales(onnx.load(str(tmp_path / "onepass.onnx")))
    assert len(chunked) > 10 and sorted(chunked) == sorted(onepass)
    for name, value in onepass.items():
        np.testing.assert_allclose(chunked[name], value, rtol=1e-6, err_msg=name)


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_histogram_methods_give_loadable_models(tmp_path, fp32, method, capsys):
    out = tmp_path / "model.int8.onnx"
    info = quantize_int8(fp32_path=str(fp32), out_path=str(out), frames=nuclei_frames(4, 48),
                         contract=_contract(), log=lambda m: None, method=method)
    printed = capsys.readouterr()
    assert printed.out == ""  # onnxruntime's histogram progress goes to stderr (--json stdout)
    assert "histogram" in printed.err.lower() or "Number of tensors" in printed.err
    assert info["method"] == method and info["calibration_frames"] == 4
    assert "capped_from" not in info and info["preprocess"] == PREPROCESS
    assert info["granularity"]["weights"] == "per-channel" and info["domains"] == ["ai.onnx"]
    runner = Runner(str(out), providers=["cpu"])
    assert runner.contract.precision == "int8"
    logits = runner.run(np.zeros((1, 3, SIZE, SIZE), np.float32))
    assert logits.shape == (1, 1, SIZE, SIZE) and np.isfinite(logits).all()


def test_histogram_cap_through_quantize_int8(tmp_path, fp32, monkeypatch):
    per_frame = activation_bytes(model=onnx.load(str(fp32)), contract=_contract())
    monkeypatch.setattr(calibration, "HISTOGRAM_BUDGET", 2 * per_frame + 1)
    logs = []
    info = quantize_int8(fp32_path=str(fp32), out_path=str(tmp_path / "q.onnx"),
                         frames=nuclei_frames(6, 48), contract=_contract(), log=logs.append,
                         method="percentile")
    assert info["calibration_frames"] == 2 and info["capped_from"] == 6
    assert info["histogram_budget_bytes"] == 2 * per_frame + 1
    assert any("2 of 6 frames" in w for w in info["warnings"])
    assert any("on 2 frames" in line for line in logs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.onnx"]


def _ranges(spans):
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import TensorsData

    return TensorsData(CalibrationMethod.MinMax, {
        k: (np.array(lo, np.float32), np.array(hi, np.float32)) for k, (lo, hi) in spans.items()})


def _tied_model():
    """a, b -> Concat -> ab; c -> Resize -> cr; ab, cr -> Concat -> out (Resize scales as init)."""
    scales = helper.make_tensor("s", TensorProto.FLOAT, [4], [1, 1, 1, 1])
    nodes = [helper.make_node("Concat", ["a", "b"], ["ab"], axis=1, name="cat1"),
             helper.make_node("Resize", ["c", "", "s"], ["cr"], name="up"),
             helper.make_node("Concat", ["ab", "cr"], ["out"], axis=1, name="cat2")]
    graph = helper.make_graph(nodes, "g", [], [], initializer=[scales])
    return helper.make_model(graph)


def test_share_groups_join_only_alike_ranges():
    model = _tied_model()
    alike = _ranges({"a": (0, 1.0), "b": (0, 1.5), "ab": (0, 1.5), "c": (0, 1.2), "cr": (0, 1.2),
                     "out": (0, 1.5)})
    assert calibration.share_groups(model=model, tensors=alike) == [
        ["a", "ab", "b", "c", "cr", "out"]]
    wide = _ranges({"a": (0, 1.0), "b": (0, 1.5), "ab": (0, 1.5), "c": (0, 9.0), "cr": (0, 9.0),
                    "out": (0, 9.0)})
    groups = calibration.share_groups(model=model, tensors=wide)
    assert sorted(groups) == [["a", "ab", "b"], ["c", "cr"]]  # cat2: 9 > 2 x 1.0, kept apart
    assert calibration.share_groups(model=model, tensors=wide, max_spread=10) == [
        ["a", "ab", "b", "c", "cr", "out"]]
    assert calibration.share_groups(model=model, tensors=wide, skip_nodes=["cat1"],
                                    skip_ops=["Resize"], max_spread=10) == [["ab", "cr", "out"]]
    overrides, summary = calibration.shared_ranges(model=model, tensors=wide)
    assert summary == {"groups": 2, "tensors": 5, "concats": 1, "of_concats": 2,
                       "max_spread": 2.0}
    assert {float(overrides[k][0]["rmax"]) for k in ("a", "b", "ab")} == {1.5}
    assert float(overrides["c"][0]["rmin"]) == 0.0 and "out" not in overrides


def test_ranges_calibrated_once_are_reused(tmp_path, fp32):
    from edgeseg.host.quantize import CACHE_SUPPORTED, calibrate_int8

    frames = nuclei_frames(8, 48, seed=5)
    logs = []
    ranges = calibrate_int8(fp32_path=str(fp32), frames=frames, contract=_contract(),
                            log=logs.append)
    assert ranges.method == "minmax" and ranges.info == {"calibration_frames": 8, "chunk": 8}
    assert len(logs) == 1 and "Calibrating" in logs[0]
    assert [p.name for p in fp32.parent.iterdir()] == ["model.fp32.onnx"]  # scratch removed
    fresh = quantize_int8(fp32_path=str(fp32), out_path=str(tmp_path / "fresh.onnx"),
                          frames=frames, contract=_contract(), log=lambda m: None)
    reused = quantize_int8(fp32_path=str(fp32), out_path=str(tmp_path / "reused.onnx"),
                           frames=frames[:1], contract=_contract(), log=logs.append,
                           ranges=ranges)
    assert len(logs) == (1 if CACHE_SUPPORTED else 2)  # no second calibration
    assert reused["ranges"] == ("reused" if CACHE_SUPPORTED else "calibrated")
    assert reused["calibration_frames"] == 8 and reused["shared_scales"] == fresh["shared_scales"]
    a, b = _scales(onnx.load(str(tmp_path / "fresh.onnx"))), _scales(
        onnx.load(str(tmp_path / "reused.onnx")))
    assert len(a) > 10 and sorted(a) == sorted(b)
    for name, value in a.items():
        np.testing.assert_allclose(b[name], value, rtol=1e-6, err_msg=name)
    with pytest.raises(UsageError):
        quantize_int8(fp32_path=str(fp32), out_path=str(tmp_path / "x.onnx"), frames=frames,
                      contract=_contract(), log=lambda m: None, ranges=ranges, method="entropy")
