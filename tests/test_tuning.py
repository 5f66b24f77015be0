"""build_int8: calibration choice, Resize check and accuracy budget, with real onnxruntime.

A briefly trained UNet (real masks: a random net gives almost constant logits, so every mask IoU
would be 1.0 and nothing could fail) on real nuclei crops.
"""

from __future__ import annotations

import shutil

import onnx
import pytest

from edgeseg.device.contract import Contract
from edgeseg.host import qdqdebug, tuning
from edgeseg.host.errors import ExportError, UsageError
from edgeseg.host.export import export_onnx
from edgeseg.host.qdqdebug import float_nodes_for
from edgeseg.host.quantize import CACHE_SUPPORTED

from conftest import export_tiny
from models_util import nuclei_frames, trained_unet

SIZE = 48
CONTRACT = Contract(input_size=[SIZE, SIZE], arch="unet")
CALIB = nuclei_frames(8, SIZE)
VAL = nuclei_frames(4, SIZE, seed=1)


def _build(folder, **kwargs):
    kwargs.setdefault("method", "minmax")
    kwargs.setdefault("max_iou_drop", 1.0)
    kwargs.setdefault("log", lambda m: None)
    return tuning.build_int8(fp32_path=str(folder / "model.fp32.onnx"),
                             out_path=str(folder / "model.int8.onnx"), calib_frames=CALIB,
                             val_frames=VAL, contract=CONTRACT, **kwargs)


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    path = tmp_path_factory.mktemp("tuning") / "model.fp32.onnx"
    export_onnx(model=trained_unet(), path=str(path), size_hw=(SIZE, SIZE), opset=17,
                contract=CONTRACT, input_channels=3)
    return path


@pytest.fixture(scope="module")
def auto(fp32):
    return _build(fp32.parent, method="auto")


def _graph(path):
    graph = onnx.load(str(path)).graph
    producers = {out: n for n in graph.node for out in n.output}
    consumers = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return graph, producers, consumers


@pytest.mark.slow  # trains the shared UNet (about 20 s) when no other test has
def test_auto_tries_every_method_and_keeps_the_best_iou(auto, fp32):
    tried = auto["methods_tried"]
    assert [t["method"] for t in tried] == ["minmax", "entropy", "percentile"]
    ious = [t["iou_vs_fp32"] for t in tried]
    assert all(0.5 < iou <= 1.0 for iou in ious) and min(ious) < 1.0  # real, imperfect masks
    assert all(t["seconds"] > 0 and t["calibration_frames"] == len(CALIB) for t in tried)
    best = tried[ious.index(max(ious))]  # the first maximum: ties keep minmax
    assert auto["method"] == best["method"]
    assert auto["iou_vs_fp32"] == pytest.approx(best["iou_vs_fp32"], abs=1e-6)
    assert auto["tuning_seconds"] >= sum(t["seconds"] for t in tried)
    out = fp32.parent / "model.int8.onnx"
    again = tuning.compare_masks(a_path=str(fp32), b_path=str(out), frames=VAL)
    assert again["mask_iou"] == pytest.approx(best["iou_vs_fp32"], abs=1e-6)
    assert sorted(p.name for p in fp32.parent.iterdir()) == ["model.fp32.onnx", "model.int8.onnx"]


def test_a_budget_the_first_model_meets_takes_no_steps(auto):
    budget = auto["budget"]
    assert budget["held"] and budget["steps"] == [] and budget["float_nodes"] == []
    assert budget["iou_drop"] == pytest.approx(1.0 - auto["iou_vs_fp32"], abs=1e-6)
    assert "ranking" not in budget and auto["qdq_nodes"] > 0


def test_compare_masks_of_a_model_with_itself_and_with_int8(auto, fp32):
    same = tuning.compare_masks(a_path=str(fp32), b_path=str(fp32), frames=VAL)
    assert same == {"mask_iou": 1.0, "max_abs_err": 0.0}
    int8 = tuning.compare_masks(a_path=str(fp32), b_path=str(fp32.parent / "model.int8.onnx"),
                                frames=VAL, optimization_b="disable")
    assert int8["max_abs_err"] > 0 and 0.5 < int8["mask_iou"] < 1.0


def _resize_feeds_quantize(path) -> list:
    graph, _, consumers = _graph(path)
    return [any(c.op_type == "QuantizeLinear" for c in consumers.get(n.output[0], []))
            for n in graph.node if n.op_type == "Resize"]


def test_resize_check_keeps_resize_float_only_when_levels_disagree(auto, fp32, tmp_path):
    check = auto["resize_check"]  # default tolerance: rounding differences only
    assert check["agree"] and not check["resize_kept_float"]
    assert check["iou_all_vs_disable"] >= 0.999 and check["max_abs_err"] > 0
    feeds = _resize_feeds_quantize(fp32.parent / "model.int8.onnx")
    assert feeds and all(feeds)  # DQ -> Resize -> Q: the unit onnxruntime fuses
    (tmp_path / "model.fp32.onnx").write_bytes(fp32.read_bytes())
    info = _build(tmp_path, resize_tolerance={"mask_iou": 1.0, "max_rel_err": 0.0})
    check = info["resize_check"]
    assert not check["agree"] and check["resize_kept_float"] and "after" in check
    feeds = _resize_feeds_quantize(tmp_path / "model.int8.onnx")
    assert feeds and not any(feeds)  # every Resize computes in float


@pytest.mark.slow
def test_tight_budget_keeps_the_worst_activations_float_until_it_holds(auto, fp32, tmp_path):
    start_drop = 1.0 - auto["methods_tried"][0]["iou_vs_fp32"]  # minmax
    assert start_drop > 0
    # How far keeping tensors float can go on this model depends on the exact trained weights
    # (which differ slightly between CPUs), so the budget is taken from a first run whose budget
    # (0: a perfect match) no partly quantized model meets: it takes every step and records each.
    probe_dir = tmp_path / "probe"
    probe_dir.mkdir()
    (probe_dir / "model.fp32.onnx").write_bytes(fp32.read_bytes())
    probe = _build(probe_dir, max_iou_drop=0.0)["budget"]
    drops = [s["iou_drop"] for s in probe["steps"] if "iou_drop" in s]
    assert not probe["held"] and drops and probe["iou_drop"] == min(drops)
    tight = min(drops)  # the tightest budget a step meets
    assert tight < start_drop  # keeping the ranked tensors float does help
    first = next(i for i, d in enumerate(drops) if d <= tight)
    shutil.rmtree(probe_dir)
    (tmp_path / "model.fp32.onnx").write_bytes(fp32.read_bytes())
    logs = []
    info = _build(tmp_path, max_iou_drop=tight, log=logs.append)
    budget = info["budget"]
    assert budget["held"] and budget["iou_drop"] <= tight and budget["steps"]
    assert len(budget["steps"]) == first + 1  # stops at the first step that meets the budget
    keys = ("step", "float_tensors_added", "float_nodes_added", "iou_vs_fp32")
    assert [[s[k] for k in keys] for s in budget["steps"]] == \
        [[s[k] for k in keys] for s in probe["steps"][:first + 1]]  # same steps and IoU
    calibrations = [m for m in logs if m.startswith("Calibrating")]  # once, then re-quantize only
    assert len(calibrations) == (1 if CACHE_SUPPORTED else 1 + len(budget["steps"]))
    assert budget["start"]["iou_vs_fp32"] == pytest.approx(1.0 - start_drop, abs=1e-6)
    added = [r["added_noise"] for r in budget["ranking"]]
    assert added == sorted(added, reverse=True)  # the most noise added first
    assert all(r["sqnr_db"] > 0 for r in budget["ranking"])
    for i, step in enumerate(budget["steps"]):  # one step at a time: 1, 1, 2, 4 ... tensors
        assert len(step["float_tensors_added"]) == max(1, 2 ** (i - 1))
        assert step["float_nodes_added"] and step["median_ms"] > 0 and "iou_vs_fp32" in step
    assert budget["float_tensors"] == [t for s in budget["steps"] for t in s["float_tensors_added"]]
    assert budget["float_nodes"] == [n for s in budget["steps"] for n in s["float_nodes_added"]]
    assert info["iou_vs_fp32"] == pytest.approx(1.0 - budget["iou_drop"], abs=1e-6)
    _assert_float(tmp_path / "model.int8.onnx", budget)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.fp32.onnx", "model.int8.onnx"]


def _assert_float(path, budget) -> None:
    """In the file: float tensors are never quantized, float Convs have float weights."""
    graph, producers, consumers = _graph(path)
    inits = {t.name for t in graph.initializer}
    for tensor in budget["float_tensors"]:
        users = consumers.get(tensor, [])
        assert users and not any(u.op_type == "QuantizeLinear" for u in users), tensor
    convs = [n for n in graph.node if n.name in budget["float_nodes"] and n.op_type == "Conv"]
    assert convs
    for conv in convs:
        assert conv.input[1] in inits and conv.input[1] not in producers, conv.name
    quantized = [n for n in graph.node
                 if n.op_type == "Conv" and n.name not in budget["float_nodes"]]
    assert all(producers[n.input[1]].op_type == "DequantizeLinear" for n in quantized)


def test_the_ranking_scores_the_noise_a_tensor_adds_over_its_quantized_inputs(fp32):
    graph = onnx.load(str(fp32)).graph
    scored = {"/model/conv0_0/relu/Relu_output_0": 0, "/model/conv0_0/relu_1/Relu_output_0": 0,
              "/model/pool/MaxPool_output_0": 0, "input": 0}
    # conv0_0: input -> conv1 -> relu -> conv2 -> relu_1 -> pool: each sees its nearest scored one
    assert qdqdebug._upstream("/model/conv0_0/relu/Relu_output_0", graph, scored) == ["input"]
    assert qdqdebug._upstream("/model/conv0_0/relu_1/Relu_output_0", graph, scored) == [
        "/model/conv0_0/relu/Relu_output_0"]
    assert qdqdebug._upstream("/model/pool/MaxPool_output_0", graph, scored) == [
        "/model/conv0_0/relu_1/Relu_output_0"]
    assert qdqdebug._upstream("input", graph, scored) == []


def test_float_nodes_for_a_relu_output_are_its_consumers_and_producers(fp32):
    graph = onnx.load(str(fp32)).graph
    tensor = "/model/conv0_0/relu/Relu_output_0"
    assert float_nodes_for(tensor=tensor, graph=graph) == [
        "/model/conv0_0/conv2/Conv", "/model/conv0_0/relu/Relu", "/model/conv0_0/conv1/Conv"]


def test_auto_lists_a_failing_method_and_goes_on(tmp_path, monkeypatch):
    fp32 = export_tiny(tmp_path / "model.fp32.onnx", size=32)
    real = tuning.quantize_int8

    def quantize(**kwargs):  # edgeseg's own wrapper fails; onnxruntime itself is real
        if kwargs["method"] == "entropy":
            raise ExportError("onnxruntime's quantizer failed: out of memory", "hint")
        return real(**kwargs)

    monkeypatch.setattr(tuning, "quantize_int8", quantize)
    contract = Contract(input_size=[32, 32], arch="unet")
    info = tuning.build_int8(fp32_path=str(fp32), out_path=str(tmp_path / "q.onnx"),
                             calib_frames=nuclei_frames(4, 32), val_frames=nuclei_frames(2, 32),
                             contract=contract, log=lambda m: None, method="auto")
    failed = [t for t in info["methods_tried"] if "error" in t]
    assert [t["method"] for t in failed] == ["entropy"] and "out of memory" in failed[0]["error"]
    assert [t["method"] for t in info["methods_tried"]] == ["minmax", "entropy", "percentile"]
    assert info["method"] in ("minmax", "percentile") and (tmp_path / "q.onnx").exists()


@pytest.mark.parametrize("kwargs", [{"method": "kl"}, {"val_frames": []},
                                    {"max_iou_drop": -0.1}])
def test_bad_requests_are_refused_before_any_work(tmp_path, kwargs):
    args = dict(fp32_path=str(tmp_path / "missing.onnx"), out_path=str(tmp_path / "q.onnx"),
                calib_frames=CALIB, val_frames=VAL, contract=CONTRACT, log=lambda m: None)
    args.update(kwargs)
    with pytest.raises(UsageError):
        tuning.build_int8(**args)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_auto_lists_the_memory_cap_of_each_histogram_method(fp32, tmp_path, monkeypatch):
    from edgeseg.host import calibration
    from edgeseg.host.calibration import activation_bytes

    per_frame = activation_bytes(model=onnx.load(str(fp32)), contract=CONTRACT)
    monkeypatch.setattr(calibration, "HISTOGRAM_BUDGET", 3 * per_frame + 1)
    (tmp_path / "model.fp32.onnx").write_bytes(fp32.read_bytes())
    tried = {t["method"]: t for t in _build(tmp_path, method="auto")["methods_tried"]}
    assert "capped_from" not in tried["minmax"] and tried["minmax"]["calibration_frames"] == 8
    for name in ("entropy", "percentile"):
        assert tried[name]["calibration_frames"] == 3 and tried[name]["capped_from"] == 8
