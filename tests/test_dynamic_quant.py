"""quantize_dynamic_int8: refused for convolution networks (ConvInteger) unless forced; real onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgeseg.device.contract import Contract
from edgeseg.device.preprocess import preprocess
from edgeseg.device.runner import Runner
from edgeseg.host.errors import ExportError
from edgeseg.host.export import save_atomic
from edgeseg.host.quantize import conv_share, quantize_dynamic_int8

from conftest import export_tiny
from models_util import nuclei_frames

SIZE = 32


def _contract(size=SIZE):
    return Contract(input_size=[size, size], arch="unet")


@pytest.fixture(scope="module")
def unet(tmp_path_factory):
    return export_tiny(tmp_path_factory.mktemp("dyn") / "model.fp32.onnx", size=SIZE, seed=5)


def _graph(*, conv: bool, size: int = 8) -> onnx.ModelProto:
    """x 1x3xSxS -> [Conv 3->3 3x3 pad 1] -> MatMul with an SxS weight (last axis)."""
    rng = np.random.default_rng(0)
    inits = [onnx.numpy_helper.from_array(rng.standard_normal((size, size)).astype(np.float32),
                                          "m")]
    nodes, first = [], "x"
    if conv:
        inits.append(onnx.numpy_helper.from_array(
            rng.standard_normal((3, 3, 3, 3)).astype(np.float32), "w"))
        nodes.append(helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]))
        first = "c"
    nodes.append(helper.make_node("MatMul", [first, "m"], ["logits"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, ["batch", 3, size, size])], [helper.make_tensor_value_info(
            "logits", TensorProto.FLOAT, ["batch", 3, size, size])], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_conv_share_counts_multiply_adds():
    share = conv_share(model=_graph(conv=True), contract=_contract(8))
    conv, matmul = 3 * 8 * 8 * 27, 3 * 8 * 8 * 8
    assert share["macs"] == {"conv": conv, "matmul": matmul}
    assert share["basis"] == "multiply-adds" and share["share"] == pytest.approx(
        conv / (conv + matmul))
    assert conv_share(model=_graph(conv=False), contract=_contract(8))["share"] == 0


def test_convolution_network_is_refused_naming_convinteger(tmp_path, unet):
    out = tmp_path / "model.int8-dynamic.onnx"
    with pytest.raises(ExportError) as err:
        quantize_dynamic_int8(fp32_path=str(unet), out_path=str(out), contract=_contract(),
                              log=lambda m: None)
    assert "ConvInteger" in err.value.message and "slower than FP32" in err.value.message
    assert "--precision int8" in err.value.hint and "--force" in err.value.hint
    assert list(tmp_path.iterdir()) == []


def test_forced_dynamic_model_loads_and_runs(tmp_path, unet):
    out = tmp_path / "model.int8-dynamic.onnx"
    frames = nuclei_frames(2, SIZE)
    logs = []
    info = quantize_dynamic_int8(fp32_path=str(unet), out_path=str(out), contract=_contract(),
                                 log=logs.append, force=True, frames=frames)
    assert info["forced"] and info["load_test"] == "frame" and info["conv_share"]["share"] > 0.99
    assert info["integer_ops"] == ["ConvInteger"] and info["weight_type"] == "QUInt8"
    assert info["domains"] == ["ai.onnx"] and info["opset"] == 17
    proto = onnx.load(str(out))
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}
    assert {e.domain for e in proto.opset_import} <= {"", "ai.onnx"}
    inits = {t.name: t for t in proto.graph.initializer}
    weights = [inits[n.input[1]] for n in proto.graph.node if n.op_type == "ConvInteger"]
    assert weights and all(w.data_type == TensorProto.UINT8 for w in weights)
    assert "Conv" not in {n.op_type for n in proto.graph.node}
    runner = Runner(str(out), providers=["cpu"])
    assert runner.contract.precision == "int8-dynamic"
    logits = runner.run(preprocess(frames[1].image, runner.contract))
    assert logits.shape == (1, 1, SIZE, SIZE) and np.isfinite(logits).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]
    assert any("dynamic" in line for line in logs)


def test_matmul_model_is_quantized_without_force(tmp_path):
    fp32 = tmp_path / "mm.onnx"
    save_atomic(_graph(conv=False), str(fp32))
    out = tmp_path / "mm.int8-dynamic.onnx"
    info = quantize_dynamic_int8(fp32_path=str(fp32), out_path=str(out), contract=_contract(8),
                                 log=lambda m: None)
    assert not info["forced"] and info["load_test"] == "zeros"
    assert info["integer_ops"] == ["MatMulInteger"] and info["weight_type"] == "QInt8"
    runner = Runner(str(out), providers=["cpu"])
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    want = x @ onnx.numpy_helper.to_array(_graph(conv=False).graph.initializer[0])
    np.testing.assert_allclose(runner.run(x), want, atol=0.1 * np.abs(want).max())
