"""Evaluation on MVTec-layout test sets (docs/design.md §4): image/pixel AUROC, AUPRO, F1-max."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np

from dskd_ray.errors import DataError, ScoreError
from dskd_ray.evaluation import metrics
from dskd_ray.inference.scoring import BatchScorer, not_finite_reason
from dskd_ray.io.data import Category, decode_images, discover_categories, load_mask
from dskd_ray.io.storage import exists, is_dir, storage_errors
from dskd_ray.progress import PROGRESS, clock, eta

log = logging.getLogger(__name__)

METRIC_KEYS = ("image_auroc", "pixel_auroc", "aupro", "f1_max")


@dataclass
class CategoryResult:
    name: str
    image_auroc: float | None
    pixel_auroc: float | None
    aupro: float | None
    f1_max: float | None
    n_test: int
    n_anomalous: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    # Kept for reports: per-image scores, labels, paths, and maps/masks when asked for.
    scores: np.ndarray | None = None
    labels: np.ndarray | None = None
    paths: list[str] = field(default_factory=list)
    defect_types: list[str] = field(default_factory=list)
    # (N, H, W), or lists of (H, W) when the images' sizes differ (a tiled model)
    maps: np.ndarray | list[np.ndarray] | None = None
    masks: np.ndarray | list[np.ndarray] | None = None

    def metrics(self) -> dict[str, float | None]:
        return {k: getattr(self, k) for k in METRIC_KEYS}


def _finite_or_none(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def models_for(data: str, model: str) -> list[tuple[Category, str]]:
    """Pair each category under `data` with its checkpoint: a file, or DIR/<category>.pt."""
    categories = discover_categories(data)
    with storage_errors(model):
        is_folder = is_dir(model)
    if is_folder:
        pairs = []
        for c in categories:
            ckpt = f"{model.rstrip('/')}/{c.name}.pt"
            with storage_errors(ckpt):
                found = exists(ckpt)
            if not found:
                raise DataError(f"no checkpoint for category {c.name!r}: expected {ckpt}")
            pairs.append((c, ckpt))
        return pairs
    if len(categories) > 1:
        raise DataError(
            f"{data} holds {len(categories)} categories but --model is one checkpoint: pass one "
            "category folder, or a --model folder with <category>.pt for each"
        )
    return [(categories[0], model)]


def evaluate_category(
    scorer: BatchScorer, category: Category, keep_maps: bool = False, chunk: int = 64
) -> CategoryResult:
    """Score every test image of one category and compute its metrics."""
    if not category.test:
        raise DataError(f"{category.root} has no test/ images to evaluate on")
    size = scorer.decode_size  # None: a tiled model scores images at full resolution
    # Pixel metrics need a mask for every anomalous image; a data set without them gets nulls.
    with_masks = all(t.mask_path for t in category.test if t.label == 1) and any(
        t.label == 1 for t in category.test
    )
    scores, labels, paths, types, maps_kept, masks_kept = [], [], [], [], [], []
    skipped: list[tuple[str, str]] = []
    started = time.perf_counter()
    for start in range(0, len(category.test), chunk):
        items = category.test[start : start + chunk]
        images, kept, bad = decode_images([t.path for t in items], size)
        skipped += bad
        by_path = {t.path: t for t in items}
        result = scorer.score_images(images)
        broken = np.flatnonzero(~result.finite)
        if len(broken):
            # Metrics over NaN scores would be numbers that mean nothing: refuse them.
            raise ScoreError(
                f"{category.name}: model {scorer.model_id} gives a non-finite score on "
                f"{len(broken)} of {len(kept)} image(s), first {kept[broken[0]]}: "
                f"{not_finite_reason(float(result.scores[broken[0]]))}"
            )
        for i, uri in enumerate(kept):
            item = by_path[uri]
            scores.append(result.scores[i])
            labels.append(item.label)
            paths.append(uri)
            types.append(item.defect_type)
            if with_masks or keep_maps:
                # Compared at the map's size: the model's input, or the image's own (tiled).
                full = result.maps[i].astype(np.float32)
                maps_kept.append(full)
                masks_kept.append(load_mask(item.mask_path, full.shape))
        done, elapsed = start + len(items), time.perf_counter() - started
        PROGRESS.info(
            "%s: scored %d/%d test images, elapsed %s, ETA %s",
            category.name, done, len(category.test), clock(elapsed),
            eta(done, len(category.test), elapsed),
        )  # fmt: skip
    if skipped:
        log.warning(
            "%s: %d test image(s) could not be read and were left out", category.name, len(skipped)
        )
    s = np.asarray(scores, np.float64)
    y = np.asarray(labels, np.int64)
    both_classes = 0 < y.sum() < len(y)
    image_auroc = metrics.image_auroc(y, s) if both_classes else float("nan")
    f1 = metrics.f1_max(y, s) if both_classes else float("nan")
    pixel_auroc = aupro = float("nan")
    maps = masks = None
    if maps_kept and len({m.shape for m in maps_kept}) == 1:
        maps, masks = np.stack(maps_kept), np.stack(masks_kept)
    elif maps_kept:  # a tiled model's maps, each at its image's size
        maps, masks = maps_kept, masks_kept
    if with_masks and maps is not None and masks is not None and any(m.any() for m in masks):
        pixel_auroc = metrics.pixel_auroc(masks, maps)
        aupro = metrics.aupro(masks, maps, fpr_limit=metrics.PRO_FPR_LIMIT)
    return CategoryResult(
        name=category.name,
        image_auroc=_finite_or_none(image_auroc),
        pixel_auroc=_finite_or_none(pixel_auroc),
        aupro=_finite_or_none(aupro),
        f1_max=_finite_or_none(f1),
        n_test=len(y),
        n_anomalous=int(y.sum()),
        skipped=skipped,
        scores=s,
        labels=y,
        paths=paths,
        defect_types=types,
        maps=maps if keep_maps else None,
        masks=masks if keep_maps else None,
    )


def summarize(results: list[CategoryResult]) -> dict[str, dict[str, float | None]]:
    """{category: metrics, …, "mean": mean over categories of each metric that they all have}."""
    table: dict[str, dict[str, float | None]] = {r.name: r.metrics() for r in results}
    mean: dict[str, float | None] = {}
    for key in METRIC_KEYS:
        values = [r.metrics()[key] for r in results]
        present = [v for v in values if v is not None]
        mean[key] = float(np.mean(present)) if present and len(present) == len(values) else None
    table["mean"] = mean
    return table


def format_table(table: dict[str, dict[str, float | None]]) -> str:
    """A plain-text table: one row per category, then the mean."""
    header = ["category", "image AUROC", "pixel AUROC", "AUPRO", "F1-max"]
    rows = [
        [name] + ["—" if row[k] is None else f"{row[k]:.3f}" for k in METRIC_KEYS]
        for name, row in table.items()
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def fmt(r: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )

    lines = [fmt(header), "  ".join("-" * w for w in widths)]
    lines += [fmt(r) for r in rows[:-1]]
    lines += ["  ".join("-" * w for w in widths), fmt(rows[-1])]
    return "\n".join(lines)
