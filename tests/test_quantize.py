"""quantize_int8: real onnxruntime static QDQ quantization calibrated on real nuclei crops."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from edgeseg.device.contract import Contract
from edgeseg.device.preprocess import preprocess
from edgeseg.device.runner import Runner
from edgeseg.host.errors import ExportError, UsageError
from edgeseg.host.export import export_onnx
from edgeseg.host.quantize import (CalibrationReader, chunk_size, prune_unused_domains,
                                   quantize_int8)

from models_util import nuclei_frames, random_net

SIZE = 32


def _contract():
    return Contract(input_size=[SIZE, SIZE], arch="unet")


def _export(folder, opset=17):
    path = folder / "model.fp32.onnx"
    export_onnx(model=random_net("unet", seed=4), path=str(path), size_hw=(SIZE, SIZE),
                opset=opset, contract=_contract(), input_channels=3)
    return path


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    folder = tmp_path_factory.mktemp("q")
    fp32 = _export(folder)
    out = folder / "model.int8.onnx"
    logs = []
    info = quantize_int8(fp32_path=str(fp32), out_path=str(out), frames=nuclei_frames(12, 48),
                         contract=_contract(), log=logs.append)
    return folder, out, info, logs


def test_int8_model_uses_only_the_standard_domain(quantized):
    _, out, info, _ = quantized
    proto = onnx.load(str(out))
    assert {e.domain for e in proto.opset_import} <= {"", "ai.onnx"}
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}
    assert [e.version for e in proto.opset_import] == [17]
    onnx.checker.check_model(proto)
    assert info["opset"] == 17 and info["calibration_frames"] == 12 and info["chunk"] == 6


def test_int8_is_qdq_with_per_channel_weights(quantized):
    _, out, info, _ = quantized
    proto = onnx.load(str(out))
    ops = [n.op_type for n in proto.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops and "Conv" in ops
    assert "QLinearConv" not in ops  # QDQ format, not QOperator
    inits = {t.name: t for t in proto.graph.initializer}
    per_channel = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"
                   and n.input[1] in inits and len(inits[n.input[1]].dims) == 1
                   and inits[n.input[1]].dims[0] > 1]
    assert per_channel  # weight scales with one value per output channel
    weights = [inits[n.input[0]] for n in per_channel
               if n.input[0] in inits and len(inits[n.input[0]].dims) == 4]  # conv kernels
    assert weights and all(w.data_type == onnx.TensorProto.INT8 for w in weights)


def test_int8_contract_and_run_in_the_agent_runner(quantized):
    _, out, _, logs = quantized
    runner = Runner(str(out), providers=["cpu"])
    assert runner.contract.precision == "int8"
    assert runner.contract.input_size == [SIZE, SIZE]
    frames = nuclei_frames(2, SIZE, seed=9)
    batch = np.concatenate([preprocess(f.image, runner.contract) for f in frames])
    logits = runner.run(batch)
    assert logits.shape == (2, 1, SIZE, SIZE) and np.isfinite(logits).all()
    assert any("Calibrating" in line for line in logs)


def test_quantize_leaves_no_temporary_files(quantized):
    folder, _, _, _ = quantized
    assert sorted(p.name for p in folder.iterdir()) == ["model.fp32.onnx", "model.int8.onnx"]


def test_per_channel_below_opset_13_is_refused(tmp_path):
    fp32 = _export(tmp_path, opset=11)
    with pytest.raises(ExportError) as err:
        quantize_int8(fp32_path=str(fp32), out_path=str(tmp_path / "q.onnx"),
                      frames=nuclei_frames(2, SIZE), contract=_contract(), log=lambda m: None)
    assert "13" in str(err.value) and "11" in str(err.value)
    assert not (tmp_path / "q.onnx").exists()


def test_no_calibration_frames_is_refused(tmp_path):
    with pytest.raises(UsageError):
        quantize_int8(fp32_path=str(tmp_path / "missing.onnx"), out_path=str(tmp_path / "q.onnx"),
                      frames=[], contract=_contract(), log=lambda m: None)


def test_calibration_reader_feeds_the_agents_preprocessing():
    frames = nuclei_frames(6, 40)
    contract = _contract()
    reader = CalibrationReader(frames=frames, contract=contract, input_name="input")
    assert len(reader) == 6
    reader.set_range(start_index=2, end_index=4)
    fed = [reader.get_next(), reader.get_next(), reader.get_next()]
    assert fed[2] is None
    for item, frame in zip(fed[:2], frames[2:4]):
        assert list(item) == ["input"] and item["input"].shape == (1, 3, SIZE, SIZE)
        np.testing.assert_array_equal(item["input"], preprocess(frame.image, contract))


@pytest.mark.parametrize("count, stride", [(32, 8), (12, 6), (10, 5), (7, 7), (13, 1), (1, 1)])
def test_chunk_size_divides_the_frame_count(count, stride):
    assert chunk_size(count) == stride


def test_prune_unused_domains_drops_only_unused_imports():
    node = helper.make_node("Relu", ["x"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", 1, [1])],
                              [helper.make_tensor_value_info("y", 1, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    assert prune_unused_domains(model) == ["com.microsoft"]
    assert [(e.domain, e.version) for e in model.opset_import] == [("", 17)]
    model.graph.node.append(helper.make_node("FusedConv", ["x"], ["z"], domain="com.microsoft"))
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    assert prune_unused_domains(model) == []
