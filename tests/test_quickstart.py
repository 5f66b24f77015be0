"""`edgeseg quickstart`: the main job on built-in defaults, checked on its real outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeseg.host.quickstart import summary_text


@pytest.mark.slow
def test_quickstart_trains_exports_deploys_and_profiles(quickstart_run):
    result = quickstart_run
    assert result["ok"], result["export"]
    assert result["train"]["heldout_iou"] >= 0.8
    arts = {a["precision"]: a for a in result["export"]["artifacts"]}
    assert set(arts) == {"fp32", "int8"} and all(a["ok"] for a in arts.values())
    assert arts["fp32"]["parity"]["max_abs_err"] <= 1e-3
    assert arts["int8"]["parity"]["mask_iou"] >= 0.98
    assert result["export"]["validation"]["source"] == "--val"
    for prec in ("fp32", "int8"):
        assert result["live_mask_iou"][prec]["heldout_iou"] >= 0.8
        assert result["live_mask_iou"][prec]["coverage"] == 1.0
        for source in ("nuclei scan", "street video"):
            rep = result["profiles"]["{} {}".format(source, prec)]
            assert rep["frames"] >= 30 and rep["precision"] == prec
            assert rep["model_sha256"] == arts[prec]["sha256"]
            total = rep["latency_ms"]["total"]
            assert total["p50"] <= total["p95"] <= total["max"]
    street = result["profiles"]["street video int8"]
    assert street["frame_size"] == [576, 768] and street["input_size"] == [256, 256]
    for path in result["reports"].values():
        assert json.loads(Path(path).read_text())["frames"] >= 30


@pytest.mark.slow
def test_quickstart_summary_shows_both_latency_tables_and_iou(quickstart_run):
    text = summary_text(quickstart_run)
    assert "fp32 p50" in text and "int8 p50" in text
    assert "street video" in text and "nuclei scan" in text
    assert "live masks vs expert ground truth" in text
    assert str(Path(quickstart_run["reports"]["street video int8"])) in text
