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


def precision_rows(report: dict) -> tuple:
    """(headers, rows) of the precision report; see :func:`precision_table`."""
    arts = report["artifacts"]
    base = report.get("reference_fp32_ms") or next(
        (_median(a) for a in arts if a["precision"] == "fp32" and _median(a)), None)
    rows = []
    for art in arts:
        m, p = art.get("measure") or {}, art.get("parity") or {}
        median, size = _median(art), art.get("bytes")
        speedup = art.get("speedup_vs_fp32")
        if speedup is None and base and median:
            speedup = round(base / median, 2)
        rows.append([art["precision"], "ok" if art.get("ok") else "FAILED",
                     round(size / 1e6, 2) if size is not None else None, median, speedup,
                     m.get("peak_rss_mb"), m.get("session_mb"), p.get("mask_iou"),
                     p.get("max_abs_err"), p.get("gt_iou")])
    headers = ["precision", "status", "MB", "median ms", "speed-up", "peak MB", "session MB",
               "IoU vs PyTorch", "max abs err", "IoU vs GT"]
    return headers, rows


def precision_table(report: dict) -> str:
    """The precision report: one row per artifact of an export.json-like ``report``.

    Reads ``art["measure"]`` (``measure.measure_artifact``: median latency and peak memory of a
    process running the model alone, same thread count for all) and ``art["parity"]`` (mask IoU
    and max abs error vs PyTorch, ``gt_iou`` vs ground truth with ``--val-masks``, else "-").
    Speed-up: ``art["speedup_vs_fp32"]``, else ``report["reference_fp32_ms"]`` or the fp32 row's
    median over this row's median.
    """
    headers, rows = precision_rows(report)
    text = table(headers, rows, align_left=2)
    threads = {(a.get("measure") or {}).get("threads") for a in report["artifacts"]} - {None}
    if threads:
        text += ("\nmedian ms: after warm-up, {} thread(s); peak MB: a process running the model "
                 "alone; session MB: the session's share of it".format(
                     ", ".join(str(t) for t in sorted(threads))))
    return text


def markdown_table(headers: Sequence[str], rows: List[Sequence]) -> str:
    """The same cells as :func:`table`, as a GitHub Markdown table."""
    lines = ["| " + " | ".join(str(h) for h in headers) + " |",
             "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(_fmt(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _median(art: dict):
    return (art.get("measure") or {}).get("median_ms")
