"""The morning-after gallery of one scoring run (`dskd results OUTPUT --report DIR`).

DIR/index.html shows the run's figures and drift, the histogram of its scores against the
threshold (and the calibration median), its N most anomalous images with their stored maps
overlaid, and its error rows grouped by reason; for a run of several models (`dskd score
--models`), all of that once per route, each with its own model's threshold and scale. Images and maps are read from where the rows
say (local paths or s3://) through `storage`; every picture on the page is a PNG under DIR linked
by a relative path, so the folder opens from disk with no network (`bench/check_report.sh DIR`
checks it in headless Chromium). No Ray here.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from dskd_ray.errors import DataError
from dskd_ray.io.images import decode_image
from dskd_ray.io.map_png import decode_map_png
from dskd_ray.io.storage import describe_failure, read_object
from dskd_ray.nightly.drift import ScoreDrift
from dskd_ray.nightly.results import CommittedRun
from dskd_ray.nightly.summary import (
    TOP_COLUMNS,
    RunFigures,
    error_reason,
    read_run_rows,
    route_parts,
    run_figures,
    select_runs,
    top_anomalies,
)
from dskd_ray.reporting import charts
from dskd_ray.reporting.html import escape, href, img, page, prepare_report_dir
from dskd_ray.reporting.visualize import colorize, display_scale, overlay

log = logging.getLogger(__name__)

NIGHT_COLOUR = charts.NORMAL_COLOUR  # the night's images are mostly normal ones
EXAMPLES_PER_REASON = 5
IO_THREADS = 8


@dataclass
class _Shown:
    rank: int
    row: dict
    picture: np.ndarray | None  # image | map over it, or the map alone
    note: str  # what could not be read, if anything


def choose_run(output: str, run: str | None = None, since: date | None = None) -> CommittedRun:
    """The run to show: `run`, else the latest chosen run that wrote rows (an empty night, all
    images already scored, has nothing to show)."""
    runs = select_runs(output, run, since)
    if run is not None:
        return runs[0]
    with_rows = [r for r in runs if sum(f.get("rows", 0) for f in r.manifest.get("files", []))]
    if not with_rows:
        raise DataError(f"no committed run under {output} has rows to show")
    return with_rows[-1]


def _picture(row: dict, threshold: float | None) -> tuple[np.ndarray | None, str]:
    """(image | map over it), or the map alone when the image cannot be read; None and why when
    the map cannot be read."""
    try:
        amap = decode_map_png(read_object(row["map_uri"]), row["map_scale"])
    except Exception as e:  # noqa: BLE001 - one missing map must not lose the page
        return None, f"map not readable: {describe_failure(e)}"
    size = amap.shape[0]
    try:
        image, _ = decode_image(read_object(row["image_uri"]), size)
    except Exception as e:  # noqa: BLE001 - deleted or changed since: show the map alone
        return colorize(display_scale(amap, threshold)), f"image not readable now: {e}"
    gap = np.full((size, 4, 3), 255, np.uint8)
    return np.concatenate([image, gap, overlay(image, amap, threshold, alpha=0.5)], axis=1), ""


def _histogram(
    scores: np.ndarray, threshold: float | None, drift: ScoreDrift | None
) -> charts.Chart:
    marks = [v for v in (threshold, drift.calibration_median if drift else None) if v is not None]
    edges = charts.histogram_edges(scores, marks, 40)
    counts, _ = np.histogram(scores, edges)
    chart = charts.histogram_chart(
        "Image scores of the run", "image score (max of the anomaly map)", "images", edges,
        int(counts.max(initial=0)), (560, 360),
    )  # fmt: skip
    chart.bars(edges, counts, NIGHT_COLOUR)
    entries = [(f"this run ({scores.size})", NIGHT_COLOUR, "box")]
    if drift is not None and drift.calibration_median is not None:
        chart.vline(drift.calibration_median, charts.CALIBRATION_COLOUR)
        entries.append(
            (
                f"held-out normal median {drift.calibration_median:.4g}",
                charts.CALIBRATION_COLOUR,
                "dash",
            )
        )
    return charts.finish_histogram(chart, entries, threshold)


def _facts(f: RunFigures) -> str:
    rate = "—" if f.anomalous_rate is None else f"{f.anomalous_rate:.1%}"
    items = [
        ("date (UTC)", f.date),
        ("model", f.model_id or "—"),
        ("input", f.input or "—"),
        ("listed", f.listed if f.listed is not None else "—"),
        ("skipped (already scored)", f.skipped if f.skipped is not None else "—"),
        ("scored", f.scored),
        ("errors", f.errors),
        ("gone", f.gone),
        ("anomalous", f"{f.anomalous} ({rate})"),
        ("threshold", "—" if f.threshold is None else f"{f.threshold:.4g}"),
        *((f"score {k}", "—" if v is None else f"{v:.4g}") for k, v in f.scores.items()),
    ]
    rows = "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in items)
    return f'<table class="facts">{rows}</table>'


def _drift(drift: ScoreDrift | None) -> str:
    if drift is None:
        return '<p class="note">This run has no drift record (scored before drift was kept).</p>'
    if drift.median_shift is None:
        return (
            f'<p class="note">Drift: no figure ({escape(drift.why or "nothing to compare")}).</p>'
        )
    text = (
        f"Drift: the run's median score {drift.night_median:.4g} is {drift.shown()} "
        f"calibration IQRs from the held-out normal median {drift.calibration_median:.4g} "
        f"(IQR {drift.calibration_iqr:.4g}, {drift.calibration_images} held-out images; "
        f"{drift.night_images} scored tonight)."
    )
    warning = drift.warning()
    if warning:
        return (
            f'<p class="warning">Warning: {escape(warning)}.</p><p class="note">{escape(text)}</p>'
        )
    return f'<p class="note">{escape(text)}</p>'


def _figure(shown: _Shown, src: str | None, threshold: float | None) -> str:
    row = shown.row
    name = row["image_uri"].rstrip("/").rsplit("/", 1)[-1]
    flagged = row["is_anomalous"]
    verdict = {True: "over the threshold", False: "at or below the threshold"}.get(
        flagged, "no threshold"
    )
    picture = (
        f'<a href="{href(src)}">{img(src, f"{name}: image and anomaly map")}</a>' if src else ""
    )
    note = f'<br><span class="missing">{escape(shown.note)}</span>' if shown.note else ""
    return (
        f'<figure class="{"flagged" if flagged else "passed"}">{picture}<figcaption>'
        f'<span class="name">#{shown.rank} {escape(name)}</span> · score {row["score"]:.4g} · '
        f"{escape(verdict)}<br>"
        f'<span class="uri">image {escape(row["image_uri"])}</span><br>'
        f'<span class="uri">map {escape(row["map_uri"])}</span>{note}</figcaption></figure>'
    )


def _errors(rows: list[dict]) -> str:
    if not rows:
        return '<p class="note">No error rows in this run.</p>'
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(error_reason(row["error"]), []).append(row)
    body = []
    for reason, members in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        retry = sum(1 for r in members if r["retryable"])
        examples = "".join(
            f'<li><span class="uri">{escape(r["image_uri"])}</span>: {escape(r["error"])}</li>'
            for r in members[:EXAMPLES_PER_REASON]
        )
        more = len(members) - EXAMPLES_PER_REASON
        if more > 0:
            examples += f"<li>… and {more} more</li>"
        body.append(
            f'<tr><td>{escape(reason)}</td><td class="num">{len(members)}</td>'
            f'<td class="num">{retry}</td><td><ul>{examples}</ul></td></tr>'
        )
    return (
        '<table class="errors"><thead><tr><th>reason</th><th>rows</th>'
        "<th>retried next run</th><th>examples</th></tr></thead><tbody>"
        + "".join(body)
        + "</tbody></table>"
    )


_CSS = """\
h2 { margin-top: 36px; border-bottom: 2px solid #ddd; } .note { color: #555; }
h2.route { border-bottom: 4px solid #888; } h3 { margin-top: 24px; }
.warning { background: #fde8e8; border-left: 6px solid #d62728; padding: 8px 12px; font-weight: 600; }
table { border-collapse: collapse; background: white; }
th, td { padding: 4px 10px; border-bottom: 1px solid #ddd; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(320px, 1fr)); gap: 12px; }
figure { margin: 0; background: white; border: 1px solid #ddd; border-top: 5px solid #bbb; padding: 6px; }
figure.flagged { border-top-color: #d62728; } figure.passed { border-top-color: #2ca02c; }
figure img { width: 100%; height: auto; display: block; }
figcaption { font-size: 13px; line-height: 1.4; margin-top: 4px; overflow-wrap: anywhere; }
.name { font-weight: 600; } .uri { color: #555; font-size: 12px; } .missing { color: #b01c1c; }
.legend img { width: 360px; } ul { margin: 0; padding-left: 18px; }
"""


def write_gallery(
    output: str,
    directory: str | Path,
    run: str | None = None,
    top: int = 24,
    since: date | None = None,
    route: str | None = None,
) -> Path:
    """Write DIR/index.html for one committed run under `output` (with `route`, that route's
    section alone); returns its path."""
    chosen = choose_run(output, run, since)
    rows = read_run_rows(output, [chosen])
    parts = route_parts(chosen, rows)
    if route is not None:
        parts = [(e, r) for e, r in parts if e is not None and e.get("route") == route]
        if not parts:
            raise DataError(f"run {chosen.run_id} has no route {route!r}")
    directory = prepare_report_dir(directory, not_inside=output)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    charts.colour_bar().save(directory / "colour_bar.png")
    title = f"Scoring run {chosen.run_id}"
    body = [
        f"<h1>{escape(title)}</h1>",
        f'<p class="note">Committed results under {escape(output)}.</p>',
    ]
    shown = 0
    for number, (entry, mine) in enumerate(parts):
        figures = run_figures(chosen, mine, entry)
        if entry is not None:  # a section per route, each on its own model's scale
            body.append(f'<h2 class="route">Route {escape(figures.route_shown)}</h2>')
        histogram = "scores.png" if entry is None else f"scores-{number:03d}.png"
        section, count = _section(figures, mine, directory, top, shown, histogram)
        body += section
        shown += count
    path = directory / "index.html"
    path.write_text(page(title, _CSS, body), encoding="utf-8")
    log.info("gallery of run %s: %s", chosen.run_id, path)
    return path


def _section(
    figures: RunFigures, rows: pa.Table, directory: Path, top: int, ranked: int, histogram: str
) -> tuple[list[str], int]:
    """The HTML of one run (or one route of it): figures, drift, histogram, top images, errors;
    and how many images it shows (their files are numbered on from `ranked`)."""
    drift = ScoreDrift.from_dict(figures.drift) if figures.drift else None
    best = top_anomalies(rows, top, [*TOP_COLUMNS, "map_scale"]).to_pylist()
    with ThreadPoolExecutor(IO_THREADS) as pool:
        pictures = list(pool.map(lambda r: _picture(r, figures.threshold), best))
    shown = [
        _Shown(i + 1, r, p, n) for i, (r, (p, n)) in enumerate(zip(best, pictures, strict=True))
    ]
    figures_html = []
    for item in shown:
        src = None
        if item.picture is not None:
            src = f"images/{ranked + item.rank:04d}.png"
            Image.fromarray(item.picture).save(directory / src)
        figures_html.append(_figure(item, src, figures.threshold))

    ok = rows.filter(pc.equal(rows["status"], "ok"))
    scores = ok["score"].to_numpy(zero_copy_only=False).astype(np.float64)
    _histogram(scores[np.isfinite(scores)], figures.threshold, drift).save(directory / histogram)
    errors = rows.filter(pc.equal(rows["status"], "error")).select(
        ["image_uri", "error", "retryable"]
    )
    # A route's section: its headings one level down, under the route's own.
    h = "h3" if figures.per_route else "h2"
    body = [
        _facts(figures),
        _drift(drift),
        f"<{h}>Scores</{h}>",
        img(histogram, "histogram of the run's image scores", 560, 360),
        f"<{h}>The {len(shown)} most anomalous images</{h}>",
        '<p class="legend">Each: the image (left) and its stored anomaly map over it (right), '
        "at the model's input size; a red top edge: over the threshold. "
        + img("colour_bar.png", "colour scale of the map, in units of the threshold", 360, 32)
        + "</p>",
        '<div class="grid">' + "\n".join(figures_html) + "</div>",
        f"<{h}>Errors ({errors.num_rows})</{h}>",
        _errors(errors.to_pylist()),
    ]
    return body, len(shown)
