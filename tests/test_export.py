"""export_onnx / simplify_model: real torch export, real onnx checks, real onnxruntime runs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from edgeseg.device.contract import METADATA_KEY, Contract
from edgeseg.device.preprocess import preprocess
from edgeseg.device.runner import Runner
from edgeseg.host.errors import ExportError, UsageError
from edgeseg.host.export import check_size, export_onnx, export_proto
from edgeseg.host.simplify import simplify_model

from models_util import logits_of, nuclei_frames, random_net

SIZE = 32


def _contract(**kw):
    values = dict(input_size=[SIZE, SIZE], arch="nested_unet")
    values.update(kw)
    return Contract(**values)


@pytest.fixture(scope="module")
def nested():
    return random_net("nested_unet", seed=1)


@pytest.mark.parametrize("opset", [11, 17])
def test_written_opset_is_the_requested_one(tmp_path, nested, opset):
    path = tmp_path / "m.onnx"
    info = export_onnx(model=nested, path=str(path), size_hw=(SIZE, SIZE), opset=opset,
                       contract=_contract(), input_channels=3)
    proto = onnx.load(str(path))
    assert [(e.domain, e.version) for e in proto.opset_import] == [("", opset)]
    assert info["opset"] == opset
    assert info["inputs"] == [{"name": "input", "shape": ["batch", 3, SIZE, SIZE]}]
    assert info["outputs"][0]["name"] == "logits"
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # no external data, no temp file


def test_dynamic_batch_matches_torch_per_image(tmp_path, nested):
    path = tmp_path / "m.onnx"
    export_onnx(model=nested, path=str(path), size_hw=(SIZE, SIZE), opset=17,
                contract=_contract(), input_channels=3)
    runner = Runner(str(path), providers=["cpu"])
    frames = nuclei_frames(2, SIZE)
    batch = np.concatenate([preprocess(f.image, runner.contract) for f in frames])
    out = runner.run(batch)
    assert out.shape == (2, 1, SIZE, SIZE)
    np.testing.assert_allclose(out, logits_of(nested, batch), atol=1e-4)
    np.testing.assert_allclose(out[1:], runner.run(batch[1:]), atol=1e-5)


def test_metadata_round_trip_through_the_agent_runner(tmp_path, nested):
    contract = _contract(threshold=0.3, class_names=["nucleus"], versions={"torch": "x"})
    path = tmp_path / "m.onnx"
    export_onnx(model=nested, path=str(path), size_hw=(SIZE, SIZE), opset=17, contract=contract,
                input_channels=3)
    assert Runner(str(path), providers=["cpu"]).contract == contract
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert meta["edgeseg.precision"] == "fp32" and METADATA_KEY in meta


def test_deep_supervision_exports_the_last_head(tmp_path):
    model = random_net("nested_unet", seed=2, deep_supervision=True)
    path = tmp_path / "ds.onnx"
    info = export_onnx(model=model, path=str(path), size_hw=(SIZE, SIZE), opset=17,
                       contract=_contract(), input_channels=3)
    assert [o["name"] for o in info["outputs"]] == ["logits"]
    runner = Runner(str(path), providers=["cpu"])
    batch = preprocess(nuclei_frames(1, SIZE)[0].image, runner.contract)
    np.testing.assert_allclose(runner.run(batch), logits_of(model, batch), atol=1e-4)


def test_single_channel_input(tmp_path):
    model = random_net("unet", seed=3, channels=1)
    contract = _contract(channels=1, color_order="GRAY", mean=[0.45], std=[0.23], arch="unet")
    path = tmp_path / "gray.onnx"
    info = export_onnx(model=model, path=str(path), size_hw=(SIZE, SIZE), opset=17,
                       contract=contract, input_channels=1)
    assert info["inputs"][0]["shape"] == ["batch", 1, SIZE, SIZE]


@pytest.mark.parametrize("size", [(30, 32), (32, 40), (0, 32), (32,)])
def test_size_not_multiple_of_16_is_refused(tmp_path, nested, size):
    with pytest.raises(UsageError) as err:
        export_onnx(model=nested, path=str(tmp_path / "m.onnx"), size_hw=size, opset=17,
                    contract=_contract(), input_channels=3)
    assert "16" in str(err.value) or "HEIGHT" in str(err.value)
    assert not list(tmp_path.iterdir())


def test_check_size_accepts_multiples():
    assert check_size([64, 96]) == (64, 96)


def test_unsupported_opset_is_an_export_error(tmp_path, nested):
    with pytest.raises(ExportError) as err:
        export_onnx(model=nested, path=str(tmp_path / "m.onnx"), size_hw=(SIZE, SIZE), opset=99,
                    contract=_contract(), input_channels=3)
    assert "99" in str(err.value)
    assert not list(tmp_path.iterdir())


def test_export_keeps_stdout_clean_and_returns_warnings(capsys, nested):
    _, info = export_proto(model=nested, size_hw=(SIZE, SIZE), opset=17, contract=_contract(),
                           input_channels=3)
    assert capsys.readouterr().out == ""
    assert isinstance(info["warnings"], list)
    assert any("TorchScript" in w for w in info["warnings"])  # torch's notice, captured not printed


def test_simplify_keeps_opset_metadata_and_dynamic_batch(capsys, nested):
    proto, _ = export_proto(model=nested, size_hw=(SIZE, SIZE), opset=11, contract=_contract(),
                            input_channels=3)
    before = {p.key: p.value for p in proto.metadata_props}
    simple, info = simplify_model(model_proto=proto)
    assert capsys.readouterr().out == ""  # onnxsim's "Checking 0/3..." goes to stderr
    assert info["simplified"] is True, info
    assert info["nodes_after"] == len(simple.graph.node) <= info["nodes_before"]
    assert [(e.domain, e.version) for e in simple.opset_import] == [("", 11)]
    assert {p.key: p.value for p in simple.metadata_props} == before  # no onnxsim.* keys either
    assert simple.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_simplify_falls_back_when_onnxsim_raises(monkeypatch, nested):
    import onnxsim

    def broken(*args, **kwargs):
        raise RuntimeError("injected onnxsim failure")

    monkeypatch.setattr(onnxsim, "simplify", broken)
    proto, _ = export_proto(model=nested, size_hw=(SIZE, SIZE), opset=17, contract=_contract(),
                            input_channels=3)
    kept, info = simplify_model(model_proto=proto)
    assert kept is proto
    assert info["simplified"] is False
    assert "injected onnxsim failure" in info["message"] and "unsimplified" in info["message"]
    assert info["nodes_after"] == info["nodes_before"] == len(proto.graph.node)


def test_simplify_falls_back_when_onnxsim_check_fails(monkeypatch, nested):
    import onnxsim

    monkeypatch.setattr(onnxsim, "simplify", lambda model, **kw: (model, False))
    proto, _ = export_proto(model=nested, size_hw=(SIZE, SIZE), opset=17, contract=_contract(),
                            input_channels=3)
    kept, info = simplify_model(model_proto=proto)
    assert kept is proto and info["simplified"] is False and "differs" in info["message"]


def test_simplify_reattaches_metadata_onnxsim_dropped(monkeypatch, nested):
    import onnxsim

    real = onnxsim.simplify

    def dropping(model, **kw):
        out, ok = real(model, **kw)
        del out.metadata_props[:]
        return out, ok

    monkeypatch.setattr(onnxsim, "simplify", dropping)
    proto, _ = export_proto(model=nested, size_hw=(SIZE, SIZE), opset=17, contract=_contract(),
                            input_channels=3)
    simple, info = simplify_model(model_proto=proto)
    assert info["simplified"] and info["metadata_reattached"]
    assert METADATA_KEY in {p.key for p in simple.metadata_props}


def test_models_over_the_protobuf_limit_are_refused(tmp_path, nested, monkeypatch):
    import edgeseg.host.export as export_mod

    monkeypatch.setattr(export_mod, "PROTOBUF_LIMIT", 1 << 20)  # 1 MB stands in for 2 GB
    with pytest.raises(ExportError) as err:
        export_onnx(model=nested, path=str(tmp_path / "m.onnx"), size_hw=(SIZE, SIZE), opset=17,
                    contract=_contract(), input_channels=3)
    assert "2 GB" in str(err.value)
    assert not list(tmp_path.iterdir())


def test_non_standard_domains_are_refused():
    from onnx import helper

    from edgeseg.host.export import check_standard

    node = helper.make_node("FusedConv", ["x"], ["y"], domain="com.microsoft")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", 1, [1])],
                              [helper.make_tensor_value_info("y", 1, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    with pytest.raises(ExportError) as err:
        check_standard(model, opset=17, stage="test")
    assert "com.microsoft" in str(err.value)
