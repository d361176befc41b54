"""What committed scoring runs found: per-run figures and the most anomalous images.

`summarize_runs` is what `dskd results` prints. It reads the rows of the chosen runs the way
`read_results` does (committed runs only, the part files their manifests name), so its counts
are those of `read_results(output)` filtered to a run. Only `listed` and `skipped` come from the
manifest: an image skipped as already scored leaves no row. A run of several models (`dskd
score --models`) has figures per route: its manifest names each route, its model and its
drift, and its rows say their route. No Ray here.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass, field
from datetime import date, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dskd_ray.errors import DataError
from dskd_ray.io.storage import exists, printable, storage_errors
from dskd_ray.nightly.drift import ScoreDrift
from dskd_ray.nightly.results import (
    RESULT_SCHEMA,
    CommittedRun,
    DamagedManifest,
    DamagedRunError,
    read_run_part,
    run_partition,
    scan_runs,
)

QUANTILES = {"p50": 50.0, "p90": 90.0, "p99": 99.0}
TOP_COLUMNS = [
    "run_id", "model_id", "route", "image_uri", "score", "threshold", "is_anomalous", "map_uri",
]  # fmt: skip


@dataclass
class RunFigures:
    """One committed run, counted from its rows (and `listed` / `skipped` from its manifest)."""

    run_id: str
    date: str  # YYYY-MM-DD (UTC) the run started
    model_id: str | None
    input: str | None
    listed: int | None  # images found under the input (manifest)
    skipped: int | None  # already scored by this model, so no row (manifest)
    rows: int
    scored: int  # status "ok"
    errors: int  # status "error"
    gone: int  # status "gone"
    anomalous: int  # scored and over the threshold
    anomalous_rate: float | None  # anomalous / scored; None without a threshold or scores
    threshold: float | None
    scores: dict[str, float | None] = field(default_factory=dict)  # min, p50, p90, p99, max
    errors_by_reason: dict[str, int] = field(default_factory=dict)
    drift: dict[str, Any] | None = None  # the manifest's drift record (dskd_ray.nightly.drift)
    damaged: str | None = None  # why its rows could not be read (then its counts are 0)
    # A run of several models has figures per route (None: its images in no route); a run of
    # one --model has one, with `per_route` False.
    route: str | None = None
    per_route: bool = False

    @property
    def route_shown(self) -> str:
        if not self.per_route:
            return "—"
        return "(none)" if self.route is None else printable(self.route)

    @property
    def drift_warning(self) -> str | None:
        return ScoreDrift.from_dict(self.drift).warning() if self.drift else None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "drift_warning": self.drift_warning}

    @property
    def where(self) -> str:
        """The run, and its route in a run of several models: what a warning names."""
        return f"{self.run_id} route {self.route_shown}" if self.per_route else self.run_id


@dataclass
class ResultsSummary:
    output: str
    runs: list[RunFigures]
    top: pa.Table  # TOP_COLUMNS, highest score first
    none_because: str = ""  # with no run chosen: why, when there are runs (--since)

    def to_json(self) -> str:
        top = [{k: _plain(v) for k, v in row.items()} for row in self.top.to_pylist()]
        body = {"output": self.output, "runs": [r.to_dict() for r in self.runs], "top": top}
        return json.dumps(body, indent=2, default=_plain) + "\n"


def error_reason(error: str | None) -> str:
    """The kind of failure, without the details that differ from file to file.

    Error texts read "<kind>: <details>" ("corrupt or truncated image: …", "cannot read: …").
    """
    text = (error or "unknown").strip()
    return text.split(": ", 1)[0] or "unknown"


def parse_day(text: str) -> date:
    """YYYY-MM-DD, or ValueError with the reason."""
    return datetime.strptime(text, "%Y-%m-%d").date()


def run_day(run_id: str) -> str:
    return run_partition(run_id).split("date=", 1)[1].split("/", 1)[0]


def select_runs(
    output: str, run: str | None = None, since: date | None = None
) -> list[CommittedRun]:
    """The committed runs under `output`, oldest first: all, one (`run`), or from a day on."""
    return _select(output, run, since)[0]


def _select(
    output: str, run: str | None, since: date | None
) -> tuple[list[CommittedRun], list[DamagedManifest]]:
    """`select_runs`, with the damaged manifests chosen the same way beside them."""
    with storage_errors(output):
        if not exists(output):
            raise DataError(f"{output} does not exist: no scoring run has written there")
    runs, damaged = scan_runs(output)
    if run is not None:
        chosen = [r for r in runs if r.run_id == run]
        broken = [d for d in damaged if d.run_id == run]
        if not chosen and not broken:
            last = ", ".join(r.run_id for r in runs[-3:]) or "none"
            raise DataError(f"no committed run {run} under {output} (latest: {last})")
        return chosen, broken
    if since is not None:
        runs = [r for r in runs if run_day(r.run_id) >= since.isoformat()]
        damaged = [d for d in damaged if (_day_or_none(d.run_id) or "~") >= since.isoformat()]
    return runs, damaged


def _none_since(output: str, since: date) -> str:
    """Why --since chose nothing, when runs exist: the latest one's day."""
    runs, _ = scan_runs(output)
    if not runs:
        return ""
    last = runs[-1].run_id
    return f" started on {since.isoformat()} or later (the latest, {last}, started {run_day(last)})"


def _day_or_none(run_id: str) -> str | None:
    """The day a run id says it started, or None for a file named like no run id ("~" sorts
    after every day, so --since shows it whatever the day)."""
    try:
        return run_day(run_id)
    except (IndexError, ValueError):
        return None


def read_run_rows(
    output: str, runs: list[CommittedRun], columns: list[str] | None = None
) -> pa.Table:
    """The rows of `runs` (RESULT_SCHEMA columns), read from the parts their manifests name."""
    names = list(columns) if columns else list(RESULT_SCHEMA.names)
    schema = pa.schema([RESULT_SCHEMA.field(c) for c in names])
    tables = []
    with storage_errors(output):
        for run in runs:
            tables += [read_run_part(output, run.run_id, f, schema) for f in run.files]
    return pa.concat_tables(tables) if tables else schema.empty_table()


def route_parts(run: CommittedRun, rows: pa.Table) -> list[tuple[dict[str, Any] | None, pa.Table]]:
    """A run's rows by route, each with its manifest entry (route, model, listed, skipped,
    drift); a run of one model: [(None, rows)]."""
    entries = run.manifest.get("routes")
    if not isinstance(entries, list):
        return [(None, rows)]
    entries = [e for e in entries if isinstance(e, dict)]
    named = {e.get("route") for e in entries}
    others = pc.unique(rows["route"]).to_pylist() if "route" in rows.column_names else []
    entries += [{"route": r} for r in others if r not in named]  # rows a manifest does not name
    parts = []
    for entry in entries:
        name = entry.get("route")
        if "route" not in rows.column_names:
            mine = rows.slice(0, 0) if name is not None else rows
        elif name is None:
            mine = rows.filter(pc.is_null(rows["route"]))
        else:
            mine = rows.filter(pc.fill_null(pc.equal(rows["route"], name), False))
        parts.append((entry, mine))
    return parts


def run_figures(
    run: CommittedRun, rows: pa.Table, route: dict[str, Any] | None = None
) -> RunFigures:
    """The figures of one run from its rows (all RESULT_SCHEMA columns of that run), or of one
    of its routes (`route`: its manifest entry, with `rows` that route's)."""
    summary = run.manifest.get("summary") or {}
    if route is not None:  # a route's own counts and drift
        summary = route
    status = rows["status"].to_pylist()
    ok = rows.filter(pc.equal(rows["status"], "ok"))
    scores = ok["score"].to_numpy(zero_copy_only=False).astype(np.float64)
    scores = scores[np.isfinite(scores)]
    thresholds = pc.unique(ok["threshold"].drop_null()).to_pylist() if ok.num_rows else []
    anomalous = int(pc.sum(pc.fill_null(ok["is_anomalous"], False)).as_py() or 0)
    has_flags = ok.num_rows > 0 and ok["is_anomalous"].null_count < ok.num_rows
    reasons: dict[str, int] = {}
    for text, s in zip(rows["error"].to_pylist(), status, strict=True):
        if s == "error":
            reason = error_reason(text)
            reasons[reason] = reasons.get(reason, 0) + 1
    figures: dict[str, float | None] = {"min": None, **dict.fromkeys(QUANTILES), "max": None}
    if scores.size:
        figures["min"], figures["max"] = float(scores.min()), float(scores.max())
        for name, q in QUANTILES.items():
            figures[name] = float(np.percentile(scores, q))
    return RunFigures(
        run_id=run.run_id,
        date=run_day(run.run_id),
        model_id=run.model_id if route is None else route.get("model_id"),
        input=run.manifest.get("input"),
        listed=summary.get("listed"),
        skipped=summary.get("skipped"),
        rows=rows.num_rows,
        scored=status.count("ok"),
        errors=status.count("error"),
        gone=status.count("gone"),
        anomalous=anomalous,
        anomalous_rate=anomalous / ok.num_rows if has_flags else None,
        threshold=thresholds[0] if len(thresholds) == 1 else None,
        scores=figures,
        errors_by_reason=dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))),
        drift=run.manifest.get("drift") if route is None else route.get("drift"),
        route=None if route is None else route.get("route"),
        per_route=route is not None,
    )


def top_anomalies(rows: pa.Table, n: int, columns: list[str] | None = None) -> pa.Table:
    """The `n` scored rows with the highest scores (ties by URI); `columns`, TOP_COLUMNS."""
    ok = rows.filter(pc.equal(rows["status"], "ok")).select(columns or TOP_COLUMNS)
    return _highest(ok, n)


def _highest(table: pa.Table, n: int) -> pa.Table:
    ranked = table.sort_by([("score", "descending"), ("image_uri", "ascending")])
    return ranked.slice(0, max(0, n))


def summarize_runs(
    output: str,
    run: str | None = None,
    since: date | None = None,
    top: int = 0,
    route: str | None = None,
) -> ResultsSummary:
    """Figures of the chosen committed runs, oldest first (a run of several models: one per
    route), and their `top` most anomalous images; `route`: that route's alone."""
    runs, damaged_manifests = _select(output, run, since)
    figures, tops = [], []
    for committed in runs:
        try:
            rows = read_run_rows(output, [committed])
        except DamagedRunError as e:  # said beside the others' figures, not instead of them
            damaged = run_figures(committed, RESULT_SCHEMA.empty_table())
            damaged.damaged = str(e)
            figures.append(damaged)
            continue
        for entry, mine in route_parts(committed, rows):
            if route is not None and (entry is None or entry.get("route") != route):
                continue
            figures.append(run_figures(committed, mine, entry))
            if top:
                tops.append(top_anomalies(mine, top))  # each part's best n hold the best n
    for d in damaged_manifests:  # listed among the others, by run id
        figures.append(_damaged_figures(d))
    figures.sort(key=lambda f: f.run_id)  # stable: a run's routes keep their order
    empty = pa.schema([RESULT_SCHEMA.field(c) for c in TOP_COLUMNS]).empty_table()
    best = top_per_model(pa.concat_tables(tops), top) if tops else empty
    none_because = _none_since(output, since) if since is not None and not figures else ""
    if route is not None and not figures:
        none_because += f" with a route {printable(route)!r}"
    return ResultsSummary(output, figures, best, none_because)


def top_per_model(candidates: pa.Table, n: int) -> pa.Table:
    """Each model's `n` highest scores (each route's, of runs of several models), group after
    group, each image once per model (its row of the latest run among the candidates). Two
    models' scores are on scales of their own, so they are ranked apart; an image scored by two
    runs was listed twice."""
    latest = candidates.sort_by([("run_id", "descending")])
    seen: set[tuple[str | None, str]] = set()
    keep = []
    pairs = zip(latest["model_id"].to_pylist(), latest["image_uri"].to_pylist(), strict=True)
    for key in pairs:
        keep.append(key not in seen)
        seen.add(key)
    latest = latest.filter(pa.array(keep, pa.bool_()))
    routes = latest["route"].to_pylist() if "route" in latest.column_names else [None] * len(keep)
    groups = sorted(
        set(zip(routes, latest["model_id"].to_pylist(), strict=True)),
        key=lambda g: (g[0] is not None, g[0] or "", g[1] is None, g[1] or ""),
    )
    parts = []
    for group_route, model in groups:
        mine = np.array(
            [(r, m) == (group_route, model)
             for r, m in zip(routes, latest["model_id"].to_pylist(), strict=True)], bool,
        )  # fmt: skip
        parts.append(_highest(latest.filter(pa.array(mine)), n))
    return pa.concat_tables(parts) if parts else latest


def _damaged_figures(d: DamagedManifest) -> RunFigures:
    return RunFigures(
        run_id=d.run_id, date=_day_or_none(d.run_id) or "?", model_id=None, input=None,
        listed=None, skipped=None, rows=0, scored=0, errors=0, gone=0, anomalous=0,
        anomalous_rate=None, threshold=None, damaged=str(d),
    )  # fmt: skip


# --- formats ------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value.isoformat() if hasattr(value, "isoformat") else value


def _num(value: float | None, fmt: str = ".4g") -> str:
    return "—" if value is None else format(value, fmt)


def format_runs(summary: ResultsSummary) -> str:
    """A table for people: one line per run, then each run's errors by reason."""
    if not summary.runs:
        return f"no committed runs under {summary.output}{summary.none_because}"
    routed = any(r.per_route for r in summary.runs)  # a route column only where there are routes
    width = max([12] + [len(r.route_shown) for r in summary.runs]) if routed else 0
    head = (
        f"{'run':24} {'date':10} " + (f"{'route':{width}} " if routed else "")
        + f"{'model':16} {'listed':>7} {'scored':>7} {'errors':>6} "
        f"{'anomalous':>9} {'rate':>6} {'p50':>8} {'p90':>8} {'p99':>8} {'max':>8} {'drift':>6}"
    )  # fmt: skip
    lines = [head]
    for r in summary.runs:
        rate = "—" if r.anomalous_rate is None else f"{r.anomalous_rate:.1%}"
        shift = ScoreDrift.from_dict(r.drift).shown() if r.drift else "—"
        # Ids come from manifests, which anyone who can write OUTPUT can write: shown escaped.
        run, model = printable(r.run_id), printable(r.model_id or "—")
        route = f"{r.route_shown:{width}} " if routed else ""
        line = f"{run:24} {r.date:10} {route}{model:16} {_num(r.listed, 'd'):>7} "
        if r.damaged:  # no counts: its rows could not all be read
            lines.append(line + "DAMAGED: its rows cannot be read (below)")
            continue
        lines.append(
            f"{line}{r.scored:>7} {r.errors:>6} {r.anomalous:>9} {rate:>6} "
            f"{_num(r.scores.get('p50')):>8} {_num(r.scores.get('p90')):>8} "
            f"{_num(r.scores.get('p99')):>8} {_num(r.scores.get('max')):>8} "
            f"{shift:>6}"
        )
    for r in summary.runs:
        if r.errors_by_reason:
            reasons = "; ".join(f"{n} {why}" for why, n in r.errors_by_reason.items())
            where = f"{r.run_id} route {r.route_shown}" if r.per_route else r.run_id
            lines.append(printable(f"errors in {where}: {reasons}"))
        if r.damaged:
            lines.append(printable(f"damaged: {r.damaged}"))
    lines.append(
        "drift: the night's median score minus the calibration median, in calibration IQRs"
    )
    return "\n".join(lines)


def format_top(summary: ResultsSummary) -> str:
    lines = [f"{'score':>9} {'threshold':>9}  image  →  map  (run)"]
    groups = list(zip(summary.top["route"].to_pylist(), summary.top["model_id"].to_pylist(),
                      strict=True))  # fmt: skip
    several = len(set(groups)) > 1
    group: object = object()
    for row in summary.top.to_pylist():
        if several and (row["route"], row["model_id"]) != group:  # each model's own scale
            group = (row["route"], row["model_id"])
            where = f"route {row['route']}, " if row["route"] is not None else ""
            lines.append(printable(f"{where}model {row['model_id'] or '—'}:"))
        lines.append(
            f"{_num(row['score']):>9} {_num(row['threshold']):>9}  {printable(row['image_uri'])}"
            f"  →  {printable(row['map_uri'] or '—')}  ({printable(row['run_id'])})"
        )
    return "\n".join(lines)


RUN_CSV_COLUMNS = [
    "run_id", "date", "route", "model_id", "input", "listed", "skipped", "rows", "scored", "errors",
    "gone", "anomalous", "anomalous_rate", "threshold", "score_min", "score_p50", "score_p90",
    "score_p99", "score_max", "drift_median_shift", "drift_warning", "errors_by_reason",
    "damaged",
]  # fmt: skip


def runs_csv(summary: ResultsSummary) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, RUN_CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in summary.runs:
        row = {k: v for k, v in asdict(r).items() if k in RUN_CSV_COLUMNS}
        row |= {f"score_{k}": v for k, v in r.scores.items()}
        row["drift_median_shift"] = (r.drift or {}).get("median_shift")
        row["drift_warning"] = r.drift_warning or ""
        row["errors_by_reason"] = json.dumps(r.errors_by_reason)
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return buffer.getvalue()


def top_csv(summary: ResultsSummary) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, TOP_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in summary.top.to_pylist():
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return buffer.getvalue()
