"""``report.html``: one self-contained page per scan — counts, a score histogram, the flagged gallery.

No external CSS, scripts or fonts, so it opens from a file share or an air-gapped PC; the histogram is
inline SVG drawn here; overlays are linked relatively (``heatmaps/...png``), so the folder can move as
a whole. Every file name is HTML-escaped (and URL-quoted in links): names come from the scanned folder
and must never become markup.
"""

from __future__ import annotations

import heapq
import html
import math
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from imaging_ad.scan.store import writing

_NORMAL_COLOUR = "#4c78a8"
_FLAGGED_COLOUR = "#e45756"


@dataclass
class ReportData:
    """What the report shows, gathered from the rows in one streaming pass (bounded memory)."""

    n_rows: int = 0
    n_flagged: int = 0
    n_errors: int = 0
    n_out_of_domain: int = 0  # scored, but unlike the training images: no verdict counted
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0))
    flagged: list[dict[str, Any]] = field(default_factory=list)  # highest scores first, at most the limit
    outside: list[dict[str, Any]] = field(
        default_factory=list
    )  # out of domain: farthest first, at most the limit
    errors: list[dict[str, Any]] = field(default_factory=list)  # first ``error_limit`` by path
    error_codes: Counter = field(default_factory=Counter)

    @classmethod
    def collect(
        cls, rows: Iterable[dict[str, Any]], gallery_limit: int = 500, error_limit: int = 500
    ) -> ReportData:
        data = cls()
        scores: list[float] = []
        heap: list[tuple[float, int, dict[str, Any]]] = []
        outside: list[tuple[float, int, dict[str, Any]]] = []
        shown = ("path", "score", "normalized_score", "domain_score", "heatmap", "width", "height")
        for n, row in enumerate(rows):
            data.n_rows += 1
            if row.get("error"):
                data.n_errors += 1
                data.error_codes[row.get("error_code") or "error"] += 1
                if len(data.errors) < error_limit:
                    data.errors.append(_slim(row, ("path", "error", "error_code")))
                continue
            score = row.get("score")
            if score is None:
                continue
            scores.append(float(score))
            if row.get("out_of_domain"):
                data.n_out_of_domain += 1
                _keep_top(
                    outside, (float(row.get("domain_score") or 0.0), -n, _slim(row, shown)), gallery_limit
                )
            elif row.get("is_anomaly"):
                data.n_flagged += 1
                _keep_top(heap, (float(score), -n, _slim(row, shown)), gallery_limit)
        data.scores = np.asarray(scores, dtype=np.float64)
        data.flagged = [entry for _, _, entry in sorted(heap, key=lambda e: (-e[0], -e[1]))]
        data.outside = [entry for _, _, entry in sorted(outside, key=lambda e: (-e[0], -e[1]))]
        return data


def _keep_top(heap: list, entry: tuple, limit: int) -> None:
    """Keep the ``limit`` largest entries in a min-heap (bounded memory whatever the number of rows)."""
    if len(heap) < limit:
        heapq.heappush(heap, entry)
    elif limit > 0:
        heapq.heappushpop(heap, entry)


def write_report(
    path: str | os.PathLike,
    data: ReportData,
    *,
    input_dir: Path,
    model: Path,
    fingerprint: str,
    threshold: float,
    heatmaps: str,
) -> Path:
    """Render the page and write it atomically (a viewer never sees half a report)."""
    path = Path(path)
    page = render_report(
        data,
        input_dir=input_dir,
        model=model,
        fingerprint=fingerprint,
        threshold=threshold,
        heatmaps=heatmaps,
    )
    tmp = path.with_name(path.name + ".partial")
    with writing(tmp):  # a full disk names the file and leaves no half page behind
        tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    return path


def render_report(
    data: ReportData, *, input_dir: Path, model: Path, fingerprint: str, threshold: float, heatmaps: str
) -> str:
    n_scored = data.n_rows - data.n_errors - data.n_out_of_domain
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cards = "".join(
        f'<div class="card {cls}"><div class="n">{value}</div><div>{_e(label)}</div></div>'
        for value, label, cls in (
            (data.n_rows, "files", ""),
            (n_scored - data.n_flagged, "normal", "normal"),
            (data.n_flagged, "flagged as anomalous", "flagged"),
            (
                data.n_out_of_domain,
                "outside the model's domain (score not meaningful)",
                "error" if data.n_out_of_domain else "",
            ),
            (data.n_errors, "unreadable", "error" if data.n_errors else ""),
        )
    )
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>Anomaly scan: {_e(_text(input_dir.name or str(input_dir)))}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>Anomaly scan of <code>{_e(_text(str(input_dir)))}</code></h1>",
        f'<p class="meta">Model <code>{_e(_text(model.name))}</code> (fingerprint <code>{_e(fingerprint[:16])}</code>) · '
        f"image threshold {threshold:.4g} (raw score) · overlays: {_e(heatmaps)} · generated {generated}</p>",
        f'<div class="cards">{cards}</div>',
        "<h2>Score distribution</h2>",
        histogram_svg(data.scores, threshold) if data.scores.size else "<p>No image could be scored.</p>",
        _gallery(data, heatmaps),
        _outside_gallery(data, heatmaps),
        _error_table(data),
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def histogram_svg(scores: np.ndarray, threshold: float, width: int = 760, height: int = 280) -> str:
    """Stacked histogram (normal / flagged) of image scores with the threshold as a dashed line."""
    scores = np.asarray(scores, dtype=np.float64)
    scores = scores[np.isfinite(scores)]
    lo = float(min(scores.min(), threshold))
    hi = float(max(scores.max(), threshold))
    if not hi > lo:
        lo, hi = lo - 0.5, hi + 0.5
    pad = (hi - lo) * 0.02
    lo, hi = lo - pad, hi + pad
    n_bins = int(np.clip(math.sqrt(scores.size) * 2, 10, 60))
    edges = np.linspace(lo, hi, n_bins + 1)
    normal, _ = np.histogram(scores[scores <= threshold], bins=edges)
    flagged, _ = np.histogram(scores[scores > threshold], bins=edges)
    left, right, top, bottom = 56, 16, 16, 44
    plot_w, plot_h = width - left - right, height - top - bottom
    peak = max(int((normal + flagged).max()), 1)

    def x_of(value: float) -> float:
        return left + (value - lo) / (hi - lo) * plot_w

    def y_of(count: float) -> float:
        return top + plot_h - count / peak * plot_h

    bars = []
    for i in range(n_bins):
        x0, x1 = x_of(edges[i]), x_of(edges[i + 1])
        base = 0
        for count, colour, label in (
            (normal[i], _NORMAL_COLOUR, "normal"),
            (flagged[i], _FLAGGED_COLOUR, "flagged"),
        ):
            if count:
                y = y_of(base + count)
                bars.append(
                    f'<rect x="{x0 + 0.5:.1f}" y="{y:.1f}" width="{max(x1 - x0 - 1, 0.5):.1f}" '
                    f'height="{y_of(base) - y:.1f}" fill="{colour}"><title>{int(count)} {label} '
                    f"with score in [{edges[i]:.4g}, {edges[i + 1]:.4g})</title></rect>"
                )
                base += count
    ticks = []
    for value in np.linspace(lo + pad, hi - pad, 5):
        x = x_of(value)
        ticks.append(
            f'<line x1="{x:.1f}" y1="{top + plot_h}" x2="{x:.1f}" y2="{top + plot_h + 5}" stroke="#555"/>'
            f'<text x="{x:.1f}" y="{top + plot_h + 18}" text-anchor="middle">{value:.3g}</text>'
        )
    for count in sorted({0, peak // 2, peak}):
        y = y_of(count)
        ticks.append(
            f'<line x1="{left - 5}" y1="{y:.1f}" x2="{left}" y2="{y:.1f}" stroke="#555"/>'
            f'<text x="{left - 8}" y="{y + 4:.1f}" text-anchor="end">{count}</text>'
        )
    tx = x_of(threshold)
    return (
        f'<svg class="hist" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="Histogram of image scores">'
        f"<title>{scores.size} image scores; threshold {threshold:.4g}</title>"
        + "".join(bars)
        + f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="#555"/>'
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="#555"/>'
        + "".join(ticks)
        + f'<line class="threshold" x1="{tx:.1f}" y1="{top - 4}" x2="{tx:.1f}" y2="{top + plot_h}" '
        f'stroke="#222" stroke-width="2" stroke-dasharray="6 4"/>'
        f'<text x="{tx + 4:.1f}" y="{top + 10}" text-anchor="start">threshold {threshold:.4g}</text>'
        f'<text x="{left + plot_w / 2:.1f}" y="{height - 6}" text-anchor="middle">image score</text>'
        f'<text x="14" y="{top + plot_h / 2:.1f}" text-anchor="middle" '
        f'transform="rotate(-90 14 {top + plot_h / 2:.1f})">images</text>'
        "</svg>"
        f'<p class="legend"><span style="background:{_NORMAL_COLOUR}"></span>normal '
        f'<span style="background:{_FLAGGED_COLOUR}"></span>flagged</p>'
    )


def _gallery(data: ReportData, heatmaps: str) -> str:
    shown = len(data.flagged)
    title = f"Flagged images ({data.n_flagged}, highest score first"
    title += f"; the top {shown} shown)" if shown < data.n_flagged else ")"
    if not data.flagged:
        return f"<h2>{_e(title)}</h2><p>No image was flagged.</p>"
    return f'<h2>{_e(title)}</h2><div class="gallery">{_figures(data.flagged, heatmaps, "flagged")}</div>'


def _outside_gallery(data: ReportData, heatmaps: str) -> str:
    """Images unlike the training images: no verdict, so a person should look at them."""
    if not data.outside:
        return ""
    shown = len(data.outside)
    title = (
        f"Outside the model's training domain ({data.n_out_of_domain}, least like the training images first"
    )
    title += f"; the first {shown} shown)" if shown < data.n_out_of_domain else ")"
    note = (
        "<p>Their scores are not meaningful: the model cannot say whether they are normal. Review them.</p>"
    )
    return (
        f'<h2>{_e(title)}</h2>{note}<div class="gallery outside">'
        f"{_figures(data.outside, heatmaps, 'outside')}</div>"
    )


def _figures(rows: list[dict[str, Any]], heatmaps: str, kind: str) -> str:
    figures = []
    for rank, row in enumerate(rows, 1):
        name = _e(_text(row["path"]))
        if kind == "outside":
            distance = row.get("domain_score")
            detail = (
                f"{distance:.3g}× the domain limit" if distance is not None else "unlike the training images"
            )
        else:
            detail = f"score {row['score']:.4g} · normalised {row['normalized_score']:.3f}"
        caption = (
            f'<figcaption><span class="rank">{rank}.</span> <span class="path">{name}</span><br>'
            f"{detail} · {row.get('width')}×{row.get('height')}</figcaption>"
        )
        if row.get("heatmap"):
            href = _e(_url(row["heatmap"]))
            picture = f'<a href="{href}"><img src="{href}" alt="{name}"></a>'
        else:
            why = "--heatmaps none" if heatmaps == "none" else "no overlay could be drawn"
            picture = f'<div class="noimg">no overlay ({_e(why)})</div>'
        figures.append(f'<figure class="{kind}">{picture}{caption}</figure>')
    return "".join(figures)


def _error_table(data: ReportData) -> str:
    if not data.n_errors:
        return ""
    codes = ", ".join(f"{_e(code)}: {count}" for code, count in data.error_codes.most_common())
    rows = "".join(
        f"<tr><td>{_e(_text(r['path']))}</td><td>{_e(r.get('error_code') or '')}</td>"
        f"<td>{_e(_text(r.get('error') or ''))}</td></tr>"
        for r in data.errors
    )
    more = (
        f"<p>… and {data.n_errors - len(data.errors)} more (see results.csv).</p>"
        if data.n_errors > len(data.errors)
        else ""
    )
    return (
        f"<h2>Unreadable files ({data.n_errors})</h2><p>{codes}</p>"
        f"<table><thead><tr><th>file</th><th>reason</th><th>detail</th></tr></thead>"
        f"<tbody>{rows}</tbody></table>{more}"
    )


def _slim(row: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: row.get(k) for k in keys}


def _text(value: str) -> str:
    """File names that are not valid UTF-8 (possible on Linux) shown with replacement characters."""
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _url(relative: str) -> str:
    """A relative path as a URL: every segment percent-encoded from the file name's real bytes."""
    return quote(os.fsencode(relative), safe="/")


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px; color: #222; }
h1 { font-size: 20px; margin: 0 0 4px; } h2 { font-size: 16px; margin: 28px 0 8px; }
code { font-size: 13px; } .meta { color: #555; margin: 0 0 16px; }
.cards { display: flex; gap: 12px; flex-wrap: wrap; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 10px 16px; min-width: 120px; }
.card .n { font-size: 24px; font-weight: 600; }
.card.flagged .n { color: #c0392b; } .card.normal .n { color: #2c5d8f; } .card.error .n { color: #8a6d00; }
.hist text { font-size: 11px; fill: #333; } .legend span { display: inline-block; width: 10px; height: 10px; margin: 0 4px 0 12px; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(220px, 1fr)); gap: 14px; }
figure { margin: 0; border: 1px solid #ddd; border-radius: 6px; padding: 8px; background: #fafafa; }
figure img { width: 100%; height: 220px; object-fit: contain; background: #111; display: block; }
figcaption { font-size: 12px; margin-top: 6px; } .path { word-break: break-all; } .rank { font-weight: 600; }
.noimg { height: 80px; display: flex; align-items: center; justify-content: center; color: #777; background: #eee; }
table { border-collapse: collapse; } td, th { border: 1px solid #ddd; padding: 4px 8px; text-align: left; font-size: 12px; }
"""
