"""Before/after report of ``onnxcomp compress``: terminal summary and a self-contained HTML page.

The HTML page has no external resources (inline CSS, inline SVG plots drawn here, no scripts), so
it opens offline and can be attached to a ticket: before/after table, per-stage changes, fidelity
per output and per layer (worst first), latency distributions, and weight histograms before/after
clustering.
"""

from __future__ import annotations

import html
import math
from typing import Any

__all__ = ["render_terminal", "render_html", "summary_rows", "kernel_summary"]


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"  # pragma: no cover


def _fmt_db(x: float | None) -> str:
    if x is None:
        return "-"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.2f}"


def summary_rows(report: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(quantity, before, after, change) rows shared by the terminal and HTML views."""
    before, after = report["before"], report["after"]
    def ratio(key: str) -> str:
        return f"{after[key] / before[key]:.3f}x" if before.get(key) else "-"

    on_disk = "file size on disk" if after.get("file") else "serialized size"
    rows = [(on_disk, _fmt_bytes(before["bytes"]), _fmt_bytes(after["bytes"]), ratio("bytes"))]
    if "weight_elements" in before:
        rows.append(("weight elements", f"{before['weight_elements']:,}", f"{after['weight_elements']:,}",
                     ratio("weight_elements")))
        rows.append(("quantization parameters", f"{before['quant_params']:,}", f"{after['quant_params']:,}",
                     f"{after['quant_params'] - before['quant_params']:+,}"))
    else:
        rows.append(("parameters", f"{before['parameters']:,}", f"{after['parameters']:,}", ratio("parameters")))
    rows.append(("weight bytes", _fmt_bytes(before["parameter_bytes"]), _fmt_bytes(after["parameter_bytes"]),
                 ratio("parameter_bytes")))
    rows.append(("nodes", str(before["nodes"]), str(after["nodes"]), f"{after['nodes'] - before['nodes']:+d}"))
    measure = report.get("measure") or {}
    latency = measure.get("latency")
    if latency:
        b, a = latency
        lo, hi = a["ratio_ci95"]
        rows.append(("latency median", f"{b['median_ms']:.3f} ms", f"{a['median_ms']:.3f} ms",
                     f"{a['ratio_to_first']:.3f}x [{lo:.3f}, {hi:.3f}]"))
        rows.append(("latency p90", f"{b['p90_ms']:.3f} ms", f"{a['p90_ms']:.3f} ms", "-"))
    fidelity = measure.get("fidelity")
    if fidelity:
        acc = fidelity.get("accuracy") or {}
        if acc:
            rows.append(("accuracy", f"{100 * acc['reference']:.2f}%", f"{100 * acc['candidate']:.2f}%",
                         f"{100 * (acc['candidate'] - acc['reference']):+.2f} points"))
        judged = _judged_outputs(report)
        for out in fidelity["outputs"]:
            decision = _decision_figure(out, judged)
            if out.get("label_agreement") is not None:  # decided classes: no noise figures of class indices
                rows.append((f"output {out['name']}", "reference", "-", decision))
                continue
            extra = f", {decision}" if decision else ""
            rows.append((f"output {out['name']}", "reference", f"SQNR {_fmt_db(out['sqnr_db'])} dB",
                         f"cosine {out['cosine']:.5f}{extra}"))
    return rows


def _judged_outputs(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The held-out check's row of each output (onnxcomp.check), by name; empty without a check."""
    return {row["name"]: row for row in (report.get("check") or {}).get("outputs", []) if "name" in row}


def _decision_figure(out: dict[str, Any], judged: dict[str, dict[str, Any]]) -> str | None:
    """The figure of the decisions an output carries, read as the check reads that output (its
    *kind*: the check's judgement, else the measure stage's, judged alike): top-1 agreement only
    for class scores (:func:`onnxcomp.check.reads_top1`); for another kind with a decision figure
    (decoded sequences, probability maps, detections) the check's figure; none for plain values
    (box coordinates, embeddings), whose cosine and SQNR are the figures."""
    from onnxcomp.check import REPORTED, RULES, reads_top1

    row = judged.get(out["name"]) or {}
    kind = row.get("kind") or out.get("kind")
    agree = out.get("top1_agreement")
    if kind is None:  # a report from before output kinds were recorded
        return f"top-1 agreement {100 * agree:.2f}%" if agree is not None else None
    rule = RULES.get(kind)
    if reads_top1(kind) and agree is not None:
        return f"top-1 agreement {100 * agree:.2f}%"
    if out.get("label_agreement") is not None:
        return f"label agreement {100 * out['label_agreement']:.2f}%"
    if rule is not None and rule.figure not in REPORTED and row.get(rule.figure) is not None:
        return f"{rule.text(row[rule.figure])} (held-out check)"
    return None


def kernel_summary(ort: dict[str, Any]) -> str:
    """What onnxruntime runs, from :func:`onnxcomp.quant.verify.fusion_report`: int8 kernels,
    weight-only kernels (named with their weight bits, not as int8) and the float compute left."""
    weight_only = ort.get("weight_only_by_op") or {}
    int8 = {op: n for op, n in ort["int8_by_op"].items() if op not in weight_only}
    def kernels(n: int) -> str:
        return "kernel" if n == 1 else "kernels"

    count = sum(int8.values())
    parts = [f"{count} int8 {kernels(count)}" + (": " + ", ".join(f"{op} x{n}" for op, n in int8.items())
                                                   if int8 else "")]
    for op, n in weight_only.items():
        bits = "/".join(f"int{b}" for b in (ort.get("weight_only_bits") or {}).get(op, [])) or "low-bit"
        parts.append(f"{n} {bits}-weight {kernels(n)}: {op} x{n}")
    left = ", ".join(f"{op} x{n}" for op, n in ort["float_by_op"].items()) or "none"
    return "; ".join(parts) + f"; float compute left: {left}"


def render_terminal(console, report: dict[str, Any]) -> None:
    """Print the summary with rich."""
    from rich.markup import escape as esc
    from rich.table import Table

    recipe = report["recipe"]
    for note in report.get("notes", []):
        console.print(f"[yellow]note:[/yellow] {esc(note)}")
    table = Table(title=f"recipe {esc(recipe['name'])}: before / after", title_justify="left")
    for col in ("", "before", "after", "change"):
        table.add_column(col, justify="left" if col == "" else "right")
    for row in summary_rows(report):
        table.add_row(*map(esc, row))
    console.print(table)
    for stage in report["stages"]:
        console.print(f"[bold]{stage['stage']}[/bold] ({stage['seconds']:.2f} s): {esc(_stage_line(stage))}")
    measure = report.get("measure") or {}
    if measure.get("fidelity_not_measured"):
        console.print(f"fidelity not measured on {esc(measure['data'])}: {esc(measure['fidelity_not_measured'])}")
    elif measure.get("data"):
        console.print(f"fidelity measured on {esc(measure['data'])}")
    layers = (measure.get("fidelity") or {}).get("layers") or []
    finite = [layer for layer in layers if not math.isinf(layer["sqnr_db"])]
    if finite:
        worst = ", ".join(f"{layer['name']} {_fmt_db(layer['sqnr_db'])} dB" for layer in finite[:3])
        console.print(f"worst layers: {esc(worst)}")


def _chosen(tensor: dict[str, Any]) -> dict[str, Any]:
    """A clustered tensor's candidate at its chosen width (keys are ints, or strings from JSON)."""
    c = tensor["candidates"]
    return c[tensor["bits"]] if tensor["bits"] in c else c[str(tensor["bits"])]


def width_counts(allocation: dict[str, Any]) -> str:
    """``2 bits x 10, 3 bits x 5, ...``: the tensors per codebook width of a cluster allocation."""
    return ", ".join(f"{b} bits x {n}" for b, n in allocation["tensors_per_width"].items())


def _stage_line(stage: dict[str, Any]) -> str:
    s = stage["stats"]
    name = stage["stage"]
    if name == "cleanup":
        return f"{s['nodes_before']} -> {s['nodes_after']} nodes, {s['batchnorm_fused']} BatchNorm fused"
    if name == "quantize":
        ort = s.get("onnxruntime") or {}
        parts = [f"mode {s.get('mode')}"]
        if "int8_nodes" in s:
            parts.append(f"{s['int8_nodes']} int8 nodes planned")
        if ort:
            parts.append(f"onnxruntime runs {kernel_summary(ort)}")
        if s.get("skipped"):
            parts.append(f"{len(s['skipped'])} left in float")
        lat = (s.get("fallback") or {}).get("latency") or {}
        if lat.get("int8_pays") is False:
            lo, hi = lat["float_to_int8_ci95"]
            parts.append(f"int8 does not pay on this CPU (float's latency ratio to int8 [{lo:.2f}, {hi:.2f}]): "
                         "the model stays float")
        elif s.get("fallback"):
            parts.append(f"budget judged on {s['fallback']['eval_samples']} sample(s) of {s['fallback']['eval_data']}")
        return ", ".join(parts)
    if name == "cluster":
        t = s["totals"]
        alloc = s.get("allocation")
        clusters = (f"widths per tensor {width_counts(alloc)} ({alloc['bits_per_weight']:.2f} bits per weight, "
                    f"budget {alloc['bits_per_weight_target']:g})" if alloc else f"{s['clusters']} clusters")
        return (f"{len(s['tensors'])} tensors, {clusters}, weights {_fmt_bytes(t['bytes_before'])} -> "
                f"{_fmt_bytes(t['bytes_after'])} ({_fmt_bytes(t['entropy_bytes'])} entropy-coded)")
    if name == "sparsity":
        t = s["totals"]
        text = f"{t['tensors']} tensors, {t['zeros']:,} of {t['elements']:,} weights zero ({t['sparsity']:.1%})"
        refit = sum(1 for layer in s.get("layers", ()) if layer.get("refit"))
        return text + (f", {refit} layer(s) refit by least squares" if refit else "")
    if name == "prune":
        b, a = s["before"], s["after"]
        text = (f"{s['channels_removed']} channels removed, parameters {b['parameters']:,} -> {a['parameters']:,}, "
                f"MACs/sample {b['macs']:,} -> {a['macs']:,}")
        if s.get("macs_free_dimensions"):
            text += f" (free dimensions {', '.join(s['macs_free_dimensions'])} counted as 1)"
        rec = s.get("reconstruction")
        if rec:
            text += (f", least-squares refit: calibration SQNR {rec['calibration_output_sqnr_db_before']:.1f} -> "
                     f"{rec['calibration_output_sqnr_db_after']:.1f} dB")
        target = s.get("target")
        if target:
            text += f", {target['kind']} {target['final_ratio']:.3f} of the original (target {target['target']:g})"
            combined = target.get("combined_damage") or {}
            if combined.get("backed_off"):
                text += (f": the combined cut failed on the fitting data ({combined.get('why')}) and was backed off "
                         f"to damage {combined['measured_damage']:.3g}, target not reached")
        return text
    if name == "verify":
        return ", ".join(f"{k}: {v}" for k, v in s.items())
    return ""


# ---------------------------------------------------------------------------------------------
# HTML

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem;max-width:1100px;color:#222}
h1{font-size:1.5rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ccc;padding:.25rem .6rem;font-size:.9rem}
th{background:#f3f3f3}td.n{text-align:right;font-variant-numeric:tabular-nums}
.note{background:#fff7d6;padding:.4rem .6rem;border-left:4px solid #e0b000}
.ok{color:#1e7d32;font-weight:600}.bad{color:#b71c1c;font-weight:600}
svg text{font-size:11px;font-family:inherit}
"""


def _table(headers: list[str], rows: list[list[str]], numeric: frozenset[int] | None = None) -> str:
    """An HTML table; columns in ``numeric`` (default: all but the first) are right-aligned."""
    numeric = frozenset(range(1, len(headers))) if numeric is None else numeric
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(
            f"<td class='n'>{html.escape(str(c))}</td>" if i in numeric else f"<td>{html.escape(str(c))}</td>"
            for i, c in enumerate(row)
        ) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _bar_chart(labels: list[str], values: list[float], title: str, unit: str, width: int = 900) -> str:
    """Horizontal bars (one per label)."""
    if not values:
        return ""
    bar_h, left = 16, 320
    height = bar_h * len(values) + 40
    finite = [v for v in values if math.isfinite(v)]
    vmax = max(finite) if finite else 1.0
    vmax = vmax if vmax > 0 else 1.0
    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' role='img' aria-label='{html.escape(title)}'>",
             f"<text x='0' y='14' font-weight='bold'>{html.escape(title)}</text>"]
    for i, (label, v) in enumerate(zip(labels, values)):
        y = 24 + i * bar_h
        shown = v if math.isfinite(v) else vmax
        w = max(1.0, (width - left - 80) * max(shown, 0.0) / vmax)
        color = "#c0392b" if math.isfinite(v) and v < 20 else ("#e67e22" if math.isfinite(v) and v < 30 else "#2e86c1")
        parts.append(f"<text x='{left - 6}' y='{y + 12}' text-anchor='end'>{html.escape(label[-48:])}</text>")
        parts.append(f"<rect x='{left}' y='{y + 2}' width='{w:.1f}' height='{bar_h - 4}' fill='{color}'/>")
        parts.append(f"<text x='{left + w + 4:.1f}' y='{y + 12}'>{_fmt_db(v)} {unit}</text>")
    parts.append("</svg>")
    return "".join(parts)


def _histograms(series: list[tuple[str, list[float], str]], edges: list[float], title: str,
                width: int = 440, height: int = 180) -> str:
    """Overlaid step histograms sharing bin ``edges``."""
    top = max((max(v) for _, v, _ in series if v), default=1) or 1
    x0, x1 = edges[0], edges[-1]
    span = (x1 - x0) or 1.0
    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height + 36}' role='img' aria-label='{html.escape(title)}'>",
             f"<text x='0' y='14' font-weight='bold'>{html.escape(title[:60])}</text>"]
    for k, (name, counts, color) in enumerate(series):
        points = []
        for i, c in enumerate(counts):
            xa = (edges[i] - x0) / span * width
            xb = (edges[i + 1] - x0) / span * width
            y = 20 + height - (c / top) * height
            points.append(f"{xa:.1f},{y:.1f} {xb:.1f},{y:.1f}")
        parts.append(f"<polyline fill='none' stroke='{color}' stroke-width='1.5' points='{' '.join(points)}'/>")
        parts.append(f"<text x='{width - 8}' y='{34 + 14 * k}' fill='{color}' text-anchor='end'>{html.escape(name)}</text>")
    parts.append(f"<text x='0' y='{height + 34}'>{x0:.3g}</text><text x='{width - 40}' y='{height + 34}'>{x1:.3g}</text>")
    parts.append("</svg>")
    return "".join(parts)


def _latency_plot(rows: list[dict[str, Any]]) -> str:
    times = [t for r in rows for t in r.get("times_ms", [])]
    if not times:
        return ""
    # Up to the slowest p99: a few scheduler hiccups would otherwise squeeze the distribution.
    lo, hi = min(times), max(r["p99_ms"] for r in rows)
    if hi <= lo:
        hi = lo + 1e-3
    bins = 40
    edges = [lo + (hi - lo) * i / bins for i in range(bins + 1)]
    series = []
    for r, color in zip(rows, ("#7f8c8d", "#2e86c1", "#27ae60")):
        counts = [0] * bins
        for t in r.get("times_ms", []):
            if t <= hi:
                counts[min(int((t - lo) / (hi - lo) * bins), bins - 1)] += 1
        series.append((f"{r['name']} (median {r['median_ms']:.3f} ms)", counts, color))
    return _histograms(series, edges, "latency per run (ms), interleaved, up to the slowest p99", width=700)


def render_html(report: dict[str, Any]) -> str:
    """A self-contained HTML page for a compress report."""
    recipe = report["recipe"]
    out = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>onnxcomp report: {html.escape(recipe['name'])}</title><style>{_CSS}</style></head><body>",
        f"<h1>onnxcomp compress: recipe <code>{html.escape(recipe['name'])}</code></h1>",
        f"<p>{html.escape(recipe.get('description', ''))}</p>",
    ]
    if report.get("model"):
        out.append(f"<p>model: <code>{html.escape(str(report['model']))}</code> &rarr; "
                   f"<code>{html.escape(str(report.get('output', '')))}</code></p>")
    for note in report.get("notes", []):
        out.append(f"<p class='note'>{html.escape(note)}</p>")
    out.append("<h2>Before / after</h2>")
    out.append(_table(["", "before", "after", "change"], [list(r) for r in summary_rows(report)]))
    out.append("<h2>Stages</h2>")
    out.append(_table(["stage", "seconds", "what changed"],
                      [[s["stage"], f"{s['seconds']:.2f}", _stage_line(s)] for s in report["stages"]], numeric=frozenset({1})))
    measure = report.get("measure") or {}
    latency = measure.get("latency")
    if latency:
        out.append("<h2>Latency</h2>")
        out.append(_table(["model", "median ms", "p90 ms", "p99 ms", "runs", "ratio [95% CI]", "session s"], [
            [r["name"], f"{r['median_ms']:.3f}", f"{r['p90_ms']:.3f}", f"{r['p99_ms']:.3f}", str(r["runs"]),
             "1" if r["ratio_to_first"] is None else f"{r['ratio_to_first']:.3f} [{r['ratio_ci95'][0]:.3f}, {r['ratio_ci95'][1]:.3f}]",
             f"{r['session_creation_s']:.3f}"] for r in latency]))
        out.append(_latency_plot(latency))
    fidelity = measure.get("fidelity")
    if fidelity:
        out.append(f"<h2>Fidelity on {html.escape(str(measure.get('data')))}, {fidelity['samples']} samples</h2>")
        judged = _judged_outputs(report)
        out.append(_table(["output", "SQNR dB", "cosine", "max abs", "decisions (as the check reads it)",
                           "worst channel"], [
            [o["name"], _fmt_db(o["sqnr_db"]), f"{o['cosine']:.6f}", f"{o['max_abs']:.4g}",
             _decision_figure(o, judged) or "-",
             "-" if o["worst_channel"] is None else f"#{o['worst_channel']['index']}: {_fmt_db(o['worst_channel']['sqnr_db'])} dB"]
            for o in fidelity["outputs"]]))
        layers = [layer for layer in fidelity.get("layers", []) if not math.isinf(layer["sqnr_db"])]
        if layers:
            shown = layers[:40]
            out.append(_bar_chart([layer["name"] for layer in shown], [layer["sqnr_db"] for layer in shown],
                                  f"per-layer SQNR, worst first ({len(layers)} tensors differ)", "dB"))
    check = report.get("check")
    if check:
        from onnxcomp.check import verdict_line

        out.append("<h2>Held-out check</h2>")
        out.append(f"<p class='{'ok' if check['met'] else 'bad'}'>{html.escape(verdict_line(check))}</p>")
        for note in ("empty_note", "kind_note", "resolution_note"):
            if check.get(note):
                out.append(f"<p class='note'>{html.escape(check[note])}</p>")
    for stage in report["stages"]:
        if stage["stage"] == "cluster" and stage["stats"].get("tensors"):
            out.append("<h2>Weights before / after clustering</h2><div>")
            tensors = sorted(stage["stats"]["tensors"].items(), key=lambda kv: -kv[1]["elements"])[:6]
            for name, t in tensors:
                h = t.get("histogram")
                if h:
                    out.append(_histograms([("before", h["before"], "#7f8c8d"), ("after", h["after"], "#c0392b")],
                                           h["edges"], f"{name} ({t['distinct_values']} values)"))
            out.append("</div>")
            widths = [(name, t) for name, t in stage["stats"]["tensors"].items() if "bits" in t]
            if widths:
                out.append("<h2>Codebook width per tensor (bits_per_weight)</h2>")
                out.append(_table(["tensor", "elements", "bits", "error (chosen)"],
                                  [[name, f"{t['elements']:,}", str(t["bits"]),
                                    f"{_chosen(t)['error']:.3g}"] for name, t in widths],
                                  frozenset({1, 2, 3})))
    from onnxcomp.recipe import recipe_toml

    out.append("<h2>Recipe</h2><pre>" + html.escape(recipe_toml(recipe)) + "</pre>")
    out.append("</body></html>")
    return "\n".join(out)

