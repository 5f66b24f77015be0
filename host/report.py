"""Readable tables for export, deploy and profile results (stdout stays JSON-only with --json)."""

from __future__ import annotations

from typing import Dict, List, Sequence

from edgeseg.device.metrics import STAGES


def table(headers: Sequence[str], rows: List[Sequence], *, align_left: int = 1) -> str:
    """A plain fixed-width text table; the first ``align_left`` columns are left-aligned."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row):
        parts = [c.ljust(w) if i < align_left else c.rjust(w)
                 for i, (c, w) in enumerate(zip(row, widths))]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]])


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if abs(value) >= 100:
            return "{:.1f}".format(value)
        if value == 0 or abs(value) >= 1e-3:
            return "{:.4g}".format(value)
        return "{:.2e}".format(value)
    return str(value)


def latency_table(report: dict) -> str:
    """Per-stage percentiles of one agent report."""
    rows = []
    for stage in STAGES:
        s = report["latency_ms"][stage]
        rows.append([stage, s["p50"], s["p90"], s["p95"], s["p99"], s["mean"], s["max"]])
    load = (report.get("device") or {}).get("load_avg")
    head = ("{target}: {frames} frames ({warmup} warm-up), {fps:.2f} FPS, {prov}, onnxruntime {ort}"
            "{load}").format(
        target=report.get("target", "?"), frames=report["frames"], warmup=report["warmup"],
        fps=report["fps"] or 0.0, prov=",".join(report["providers"]), ort=report["onnxruntime"],
        load=", load average {}".format(load[0]) if load else "")
    return head + "\n" + table(["stage (ms)", "p50", "p90", "p95", "p99", "mean", "max"], rows)


def compare_table(reports: Dict[str, dict]) -> str:
    """Side-by-side p50 / p95 per stage and FPS for several reports (e.g. fp32 vs int8)."""
    names = list(reports)
    headers = ["stage (ms)"] + ["{} p50".format(n) for n in names] + ["{} p95".format(n) for n in names]
    rows = []
    for stage in STAGES:
        rows.append([stage] + [reports[n]["latency_ms"][stage]["p50"] for n in names]
                    + [reports[n]["latency_ms"][stage]["p95"] for n in names])
    rows.append(["FPS"] + [reports[n]["fps"] for n in names] + [None for _ in names])
    if len(names) == 2:
        a, b = (reports[n]["latency_ms"]["inference"]["p50"] for n in names)
        rows.append(["speed-up (inference p50)", None, round(a / b, 2) if b else None, None, None])
    return table(headers, rows)


def export_table(report: dict) -> str:
    """One row per artifact with its parity against PyTorch."""
    rows = []
    for art in report["artifacts"]:
        p = art.get("parity") or {}
        rows.append([art["precision"], "ok" if art["ok"] else "FAILED",
                     round(art["bytes"] / 1e6, 2), art.get("opset"), p.get("max_abs_err"),
                     p.get("mean_abs_err"), p.get("mask_iou"), p.get("pixel_agreement"),
                     p.get("images")])
    return table(["precision", "status", "MB", "opset", "max abs err", "mean abs err",
                  "mask IoU", "pixel agree", "images"], rows, align_left=2)
