"""The one-shot demo (`dskd demo`): demo data → a model per category → evaluation → metrics and
the evaluation report."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

from dskd_ray.config import DEMO_CONFIG, DSKDConfig
from dskd_ray.demo.data import DEMO_CATEGORIES, make_demo_data
from dskd_ray.evaluation.evaluate import evaluate_category, summarize
from dskd_ray.evaluation.report import Report
from dskd_ray.inference.scoring import Scorer
from dskd_ray.io.data import discover_categories
from dskd_ray.training.epoch import ProgressCallback
from dskd_ray.training.loop import train

log = logging.getLogger(__name__)


@dataclass
class DemoRun:
    data: Path
    data_made: bool  # False: the demo data was already there
    models: Path
    metrics_path: Path
    table: dict[str, dict[str, float | None]]
    report: Path  # index.html: curves, histograms, the worst false alarms and misses


def ensure_demo_data(directory: Path) -> tuple[Path, bool]:
    """(`directory`/data, whether it was made now): the demo data, made unless already there."""
    data_dir = directory / "data"
    if all((data_dir / c / "train").is_dir() for c in DEMO_CATEGORIES):
        return data_dir, False
    make_demo_data(data_dir, overwrite=True)
    return data_dir, True


def run_demo(
    directory: Path,
    config: DSKDConfig = DEMO_CONFIG,
    device: str = "auto",
    progress: Callable[[str], AbstractContextManager[ProgressCallback | None]] | None = None,
) -> DemoRun:
    """Make (or reuse) the demo data under `directory`/data, train `directory`/models/<c>.pt
    for each category, evaluate each, and write `directory`/metrics.json and the evaluation
    report, `directory`/report/index.html (what `dskd evaluate --report` writes).

    `progress(category)` gives a context manager whose value is each training's progress
    callback (the CLI's progress bar).
    """
    report = Report(directory / "report", title="dskd demo: evaluation report")
    data_dir, made = ensure_demo_data(directory)
    results = []
    for category in discover_categories(str(data_dir)):
        ckpt = directory / "models" / f"{category.name}.pt"
        with (progress or (lambda _: nullcontext(None)))(category.name) as on_progress:
            result = train(config, category.root, str(ckpt), device=device, on_progress=on_progress)
        scorer = Scorer(result.checkpoint, device=device)
        evaluated = evaluate_category(scorer, category, keep_maps=True)
        report.add(evaluated, scorer.threshold, model=f"{ckpt} ({scorer.model_id})")
        evaluated.maps = evaluated.masks = None  # drawn: free them before the next category
        results.append(evaluated)
    table = summarize(results)
    metrics_path = directory / "metrics.json"
    metrics_path.write_text(json.dumps(table, indent=2) + "\n")
    page = report.write(table)
    return DemoRun(data_dir, made, directory / "models", metrics_path, table, page)
