"""A sweep as a picture: one self-contained HTML page with two SVG charts (no scripts, no
network): the primary metric against the step for every trial, and the trials' parameters
and result as parallel coordinates. ``raybatch sweep plot`` writes it; the functions that
draw each chart return SVG text, for any page that wants them."""

from __future__ import annotations

import html
import math
from typing import Any, Optional, Sequence

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")
W, H, PAD = 760, 360, 48


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def _scale(lo: float, hi: float, a: float, b: float):
    span = (hi - lo) or 1.0
    return lambda v: a + (v - lo) / span * (b - a)


def metric_chart(series: dict[str, list[tuple[float, float]]], metric: str, highlight: Optional[str] = None) -> str:
    """``series``: trial id -> [(step, value)]. A line per trial; the best one drawn last, thick."""
    points = [p for pts in series.values() for p in pts]
    if not points:
        return f'<svg width="{W}" height="60"><text x="10" y="30">no {html.escape(metric)} reported yet</text></svg>'
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    sx = _scale(min(xs), max(xs), PAD, W - PAD)
    sy = _scale(min(ys), max(ys), H - PAD, PAD)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">',
           f'<line x1="{PAD}" y1="{H - PAD}" x2="{W - PAD}" y2="{H - PAD}" stroke="#333"/>',
           f'<line x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{H - PAD}" stroke="#333"/>',
           f'<text x="{W / 2}" y="{H - 12}" text-anchor="middle">step</text>',
           f'<text x="12" y="{H / 2}" transform="rotate(-90 12 {H / 2})" text-anchor="middle">{html.escape(metric)}</text>']
    for v, y in ((min(ys), H - PAD), (max(ys), PAD)):
        out.append(f'<text x="{PAD - 4}" y="{y + 4}" text-anchor="end">{_fmt(v)}</text>')
    for v, x in ((min(xs), PAD), (max(xs), W - PAD)):
        out.append(f'<text x="{x}" y="{H - PAD + 14}" text-anchor="middle">{_fmt(v)}</text>')
    order = sorted(series, key=lambda t: t == highlight)
    for i, trial in enumerate(order):
        pts = sorted(series[trial])
        color = PALETTE[i % len(PALETTE)]
        width = 3 if trial == highlight else 1.2
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        out.append(f'<polyline fill="none" stroke="{color}" stroke-width="{width}" points="{path}">'
                   f'<title>{html.escape(trial)}</title></polyline>')
        if len(pts) == 1:
            out.append(f'<circle cx="{sx(pts[0][0]):.1f}" cy="{sy(pts[0][1]):.1f}" r="3" fill="{color}"/>')
        lx, ly = sx(pts[-1][0]), sy(pts[-1][1])
        out.append(f'<text x="{lx + 3:.1f}" y="{ly:.1f}" fill="{color}">{html.escape(trial.rsplit(".", 1)[-1])}</text>')
    out.append("</svg>")
    return "\n".join(out)


def parallel_coordinates(rows: Sequence[dict[str, Any]], params: Sequence[str], metric: str,
                         maximize: bool = True) -> str:
    """``rows``: {"id", "params": {...}, "value"}. One axis per parameter and one for the
    metric; one line per trial, coloured from worst (light) to best (dark)."""
    rows = [r for r in rows if r.get("params") is not None]
    axes = list(params) + [metric]
    if not rows or not axes:
        return f'<svg width="{W}" height="60"><text x="10" y="30">no trials yet</text></svg>'
    xs = {a: PAD + i * (W - 2 * PAD) / max(1, len(axes) - 1) for i, a in enumerate(axes)}

    def column(a: str) -> list[Any]:
        return [r["value"] if a == metric else r["params"].get(a) for r in rows]

    scales = {}
    for a in axes:
        vals = [v for v in column(a) if v is not None]
        numeric = vals and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals)
        if numeric:
            lo, hi = min(vals), max(vals)
            log = a != metric and lo > 0 and hi / lo >= 100  # orders of magnitude: a log axis
            if log:
                f = _scale(math.log10(lo), math.log10(hi), H - PAD, PAD)
                scales[a] = (lambda f: lambda v: f(math.log10(v)))(f), lo, hi, "log"
            else:
                scales[a] = _scale(lo, hi, H - PAD, PAD), lo, hi, "lin"
        else:
            cats = sorted({str(v) for v in vals})
            pos = {c: (H - PAD) - i * (H - 2 * PAD) / max(1, len(cats) - 1) for i, c in enumerate(cats)}
            scales[a] = (lambda pos: lambda v: pos.get(str(v), H - PAD))(pos), cats, None, "cat"
    values = [r["value"] for r in rows if r["value"] is not None]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">']
    for r in sorted(rows, key=lambda r: (r["value"] is None, r["value"] if maximize else -(r["value"] or 0))):
        if r["value"] is None:
            color = "#ccc"
        else:
            q = (r["value"] - lo) / ((hi - lo) or 1.0)
            q = q if maximize else 1 - q
            shade = int(220 - 180 * q)
            color = f"rgb({shade},{shade},{255 - int(60 * (1 - q))})"
        pts = []
        for a in axes:
            v = r["value"] if a == metric else r["params"].get(a)
            if v is None:
                continue
            pts.append(f"{xs[a]:.1f},{scales[a][0](v):.1f}")
        out.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{" ".join(pts)}">'
                   f'<title>{html.escape(str(r["id"]))}: {html.escape(metric)}={r["value"]}</title></polyline>')
    for a in axes:
        fn, lo_, hi_, kind = scales[a]
        out.append(f'<line x1="{xs[a]:.1f}" y1="{PAD}" x2="{xs[a]:.1f}" y2="{H - PAD}" stroke="#333"/>')
        out.append(f'<text x="{xs[a]:.1f}" y="{PAD - 14}" text-anchor="middle" font-weight="bold">'
                   f'{html.escape(a)}{" (log)" if kind == "log" else ""}</text>')
        if kind == "cat":
            for c in lo_:
                out.append(f'<text x="{xs[a] + 4:.1f}" y="{fn(c) + 4:.1f}">{html.escape(c)}</text>')
        else:
            out.append(f'<text x="{xs[a] + 4:.1f}" y="{H - PAD + 4}">{_fmt(lo_)}</text>')
            out.append(f'<text x="{xs[a] + 4:.1f}" y="{PAD + 4}">{_fmt(hi_)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def sweep_page(title: str, metric: str, maximize: bool, trials: Sequence[dict[str, Any]],
               series: dict[str, list[tuple[float, float]]]) -> str:
    """The whole page. ``trials``: {"id", "state", "params", "best"} best first."""
    params = sorted({k for t in trials for k in (t.get("params") or {})})
    best = next((t["id"] for t in trials if t.get("best") is not None), None)
    rows = [{"id": t["id"], "params": t.get("params"), "value": t.get("best")} for t in trials]
    caption = f"{len(trials)} trial(s); {metric} ({'higher' if maximize else 'lower'} is better)"
    if best:
        caption += f"; best: {best}"
    return "\n".join([
        "<!doctype html>", "<html><head><meta charset='utf-8'>", f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:24px}h2{font-size:15px;margin:20px 0 4px}</style>",
        "</head><body>", f"<h1>{html.escape(title)}</h1>", f"<p>{html.escape(caption)}</p>",
        f"<h2>{html.escape(metric)} per step, every trial</h2>", metric_chart(series, metric, highlight=best),
        "<h2>parameters and result, every trial</h2>", parallel_coordinates(rows, params, metric, maximize),
        "</body></html>",
    ])
