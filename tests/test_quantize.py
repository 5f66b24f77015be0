"""quantize_int8: real onnxruntime static QDQ quantization calibrated on real nuclei crops."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import helper
from onnxruntime.quantization.shape_inference import quant_pre_process

from edgeseg.device.contract import Contract
from edgeseg.device.preprocess import preprocess
from edgeseg.device.runner import Runner
from edgeseg.host.errors import ExportError, UsageError
from edgeseg.host.export import export_onnx
from edgeseg.host.quantize import (PREPROCESS, CalibrationReader, chunk_size, granularity,
                                   prune_unused_domains, quantize_int8)

from models_util import nuclei_frames, random_net

SIZE = 32


def _contract():
    return Contract(input_size=[SIZE, SIZE], arch="unet")


def _export(folder, opset=17, arch="unet"):
    path = folder / "model.fp32.onnx"
    export_onnx(model=random_net(arch, seed=4), path=str(path), size_hw=(SIZE, SIZE),
                opset=opset, contract=_contract(), input_channels=3)
    return path


def _quantize(folder, fp32, **options):
    out = folder / "model.int8.onnx"
    info = quantize_int8(fp32_path=str(fp32), out_path=str(out), frames=nuclei_frames(4, 48),
                         contract=_contract(), log=lambda m: None, **options)
    return onnx.load(str(out)), info


def _standard_only(proto):
    return ({e.domain for e in proto.opset_import} <= {"", "ai.onnx"}
            and {n.domain for n in proto.graph.node} <= {"", "ai.onnx"})


@pytest.fixture(scope="module")
def nested_fp32(tmp_path_factory):
    """A random 32x32 NestedUNet exported once for the tests below (copy it before writing beside)."""
    return _export(tmp_path_factory.mktemp("nested"), arch="nested_unet")


@pytest.fixture(scope="module")
def nested_int8(tmp_path_factory, nested_fp32):
    """The NestedUNet quantized with defaults, from an empty working directory."""
    folder = tmp_path_factory.mktemp("nested-int8")
    work = folder / "cwd"
    work.mkdir()
    fp32 = folder / "model.fp32.onnx"
    fp32.write_bytes(nested_fp32.read_bytes())
    old = os.getcwd()
    os.chdir(str(work))
    try:
        proto, info = _quantize(folder, fp32)
    finally:
        os.chdir(old)
    return folder, proto, info


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
    assert _standard_only(proto) and info["domains"] == ["ai.onnx"]
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


@pytest.mark.parametrize("opset", [11, 12])
def test_per_channel_below_opset_13_is_refused(tmp_path, opset):
    fp32 = _export(tmp_path, opset=opset)
    assert [e.version for e in onnx.load(str(fp32)).opset_import] == [opset]
    with pytest.raises(ExportError) as err:
        quantize_int8(fp32_path=str(fp32), out_path=str(tmp_path / "q.onnx"),
                      frames=nuclei_frames(2, SIZE), contract=_contract(), log=lambda m: None)
    assert "per-channel" in err.value.message and ">= 13" in err.value.message
    assert "opset {}".format(opset) in err.value.message and "--opset 13" in err.value.hint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.fp32.onnx"]


def test_granularity_reports_what_the_file_holds(quantized):
    _, out, info, _ = quantized
    proto = onnx.load(str(out))
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    gran = info["granularity"]
    assert gran == granularity(proto)
    assert gran["weights"] == "per-channel" and gran["activations"] == "per-tensor"
    assert gran["per_channel"] == len(convs) and gran["per_tensor"] == 0 and gran["axes"] == [0]


def test_granularity_tells_per_tensor_and_mixed_apart():
    scalar = helper.make_tensor("s", onnx.TensorProto.FLOAT, [], [0.1])
    vector = helper.make_tensor("v", onnx.TensorProto.FLOAT, [2], [0.1, 0.2])
    weight = helper.make_tensor("w", onnx.TensorProto.INT8, [2, 1], [1, 2])
    zero = helper.make_tensor("z", onnx.TensorProto.INT8, [], [0])
    zeros = helper.make_tensor("zz", onnx.TensorProto.INT8, [2], [0, 0])
    per_tensor = helper.make_node("DequantizeLinear", ["w", "s", "z"], ["a"])
    per_axis = helper.make_node("DequantizeLinear", ["w", "v", "zz"], ["b"], axis=0)
    graph = helper.make_graph([per_tensor], "g", [], [helper.make_tensor_value_info(
        "a", onnx.TensorProto.FLOAT, [2, 1])], initializer=[scalar, vector, weight, zero, zeros])
    assert granularity(helper.make_model(graph))["weights"] == "per-tensor"
    graph.node.append(per_axis)
    gran = granularity(helper.make_model(graph))
    assert (gran["weights"], gran["per_channel"], gran["per_tensor"]) == ("mixed", 1, 1)


def test_unknown_method_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError) as err:
        quantize_int8(fp32_path=str(tmp_path / "missing.onnx"), out_path=str(tmp_path / "q.onnx"),
                      frames=nuclei_frames(1, SIZE), contract=_contract(), log=lambda m: None,
                      method="kl")
    assert "kl" in err.value.message and "minmax" in err.value.hint


def _neighbours(proto):
    producer = {o: n for n in proto.graph.node for o in n.output}
    consumers = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return producer, consumers


def _sandwiched_resizes(proto):
    """Resize nodes with DequantizeLinear in and QuantizeLinear out (what onnxruntime folds)."""
    producer, consumers = _neighbours(proto)
    return [n.name for n in proto.graph.node if n.op_type == "Resize"
            and producer[n.input[0]].op_type == "DequantizeLinear"
            and any(c.op_type == "QuantizeLinear" for c in consumers.get(n.output[0], []))]


def test_excluded_op_types_stay_float(tmp_path, nested_fp32, nested_int8):
    resizes = [n.name for n in onnx.load(str(nested_fp32)).graph.node if n.op_type == "Resize"]
    assert sorted(_sandwiched_resizes(nested_int8[1])) == sorted(resizes)  # control: QDQ around
    proto, _ = _quantize(tmp_path, nested_fp32, exclude_op_types=["Resize"])
    _, consumers = _neighbours(proto)
    assert _sandwiched_resizes(proto) == []
    for node in (n for n in proto.graph.node if n.op_type == "Resize"):
        assert all(c.op_type != "QuantizeLinear" for c in consumers[node.output[0]])


def test_excluded_nodes_stay_float(tmp_path, quantized):
    fp32 = quantized[0] / "model.fp32.onnx"
    conv = [n for n in onnx.load(str(fp32)).graph.node if n.op_type == "Conv"][1]
    proto, info = _quantize(tmp_path, fp32, exclude_nodes=[conv.name])
    producer, consumers = _neighbours(proto)
    node = next(n for n in proto.graph.node if n.name == conv.name)
    inits = {t.name: t for t in proto.graph.initializer}
    assert inits[node.input[1]].data_type == onnx.TensorProto.FLOAT  # float weight, no DQ
    assert producer.get(node.input[1]) is None
    assert all(c.op_type != "QuantizeLinear" for c in consumers[node.output[0]])
    assert info["granularity"]["per_channel"] == sum(n.op_type == "Conv"
                                                     for n in proto.graph.node) - 1


def test_nested_unet_artifact_is_preprocessed_and_standard(nested_int8):
    folder, proto, info = nested_int8
    assert info["preprocess"] == PREPROCESS and "failed" not in info["preprocess"]
    assert _standard_only(proto) and [e.version for e in proto.opset_import] == [17]
    onnx.checker.check_model(proto)
    assert list((folder / "cwd").iterdir()) == []  # nothing left in the working directory
    assert sorted(p.name for p in folder.iterdir()) == ["cwd", "model.fp32.onnx",
                                                        "model.int8.onnx"]


def test_onnxruntime_preprocessing_canary(tmp_path, monkeypatch, nested_fp32):
    """Upstream behaviour edgeseg works around; skipped (not failed) once onnxruntime fixes it."""
    monkeypatch.chdir(tmp_path)  # the failing symbolic pass leaves sym_shape_infer_temp.onnx here
    fp32 = nested_fp32
    out = str(tmp_path / "pre.onnx")
    try:
        quant_pre_process(str(fp32), out)
    except Exception as exc:  # onnxruntime raises a bare Exception
        assert "Incomplete symbolic shape inference" in str(exc)
    else:
        pytest.skip("onnxruntime's default quant_pre_process now works on NestedUNet graphs")
    quant_pre_process(str(fp32), out, skip_symbolic_shape=True)
    stamped = {e.domain for e in onnx.load(out).opset_import} - {"", "ai.onnx"}
    if not stamped:
        pytest.skip("quant_pre_process no longer stamps onnxruntime-only domains")
    assert "com.microsoft.nchwc" in stamped


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


def _concat_params(proto):
    """Per Concat: [(scale, zero point) of each input's DequantizeLinear, then the output's Q]."""
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    producer, consumers = _neighbours(proto)

    def params(node):
        return float(inits[node.input[1]]), int(inits[node.input[2]])

    found = []
    for node in (n for n in proto.graph.node if n.op_type == "Concat"):
        ins = [params(producer[name]) for name in node.input]
        out = [params(c) for c in consumers[node.output[0]] if c.op_type == "QuantizeLinear"]
        found.append(ins + out)
    return found


def _copy_concats(proto):
    """Concats whose inputs and output all carry the same quantization parameters."""
    return sum(len(set(p)) == 1 for p in _concat_params(proto))


def test_concat_inputs_share_the_output_scale(tmp_path, nested_fp32, monkeypatch):
    from edgeseg.host import calibration

    monkeypatch.setattr(calibration, "SHARE_SPREAD", 1e9)  # share every tied tensor
    proto, info = _quantize(tmp_path, nested_fp32)
    concats = _concat_params(proto)
    assert len(concats) == 10 and all(len(p) >= 3 for p in concats)  # inputs + output found
    assert _copy_concats(proto) == 10
    assert info["shared_scales"]["concats"] == info["shared_scales"]["of_concats"] == 10
    assert info["shared_scales"]["groups"] == 1 and info["shared_scales"]["enabled"]
    assert _standard_only(proto)
    monkeypatch.setattr(calibration, "SHARE_SPREAD", 2.0)
    unshared, info = _quantize(tmp_path, nested_fp32, share_scales=False)
    assert _copy_concats(unshared) == 0 and info["shared_scales"] == {"enabled": False}


def test_default_sharing_is_what_info_reports(nested_int8):
    _, proto, info = nested_int8
    shared = info["shared_scales"]
    assert shared["enabled"] and shared["max_spread"] == 2.0 and shared["of_concats"] == 10
    assert _copy_concats(proto) == shared["concats"]
    assert shared["groups"] >= 1 and shared["tensors"] >= 2 * shared["groups"]
