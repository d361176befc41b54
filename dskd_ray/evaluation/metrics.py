"""Evaluation metrics: image and pixel AUROC, AUPRO, F1-max (docs/design.md §4).

Pure numpy, so the numbers can be computed anywhere the maps can be loaded. Every curve uses exact
thresholds (every distinct score) with ties handled the way scikit-learn and the MVTec AD reference
code handle them: tied scores form one step, and the trapezoid rule draws a straight line across it.

Conventions:
- ``labels`` / ``masks``: bool, or numbers that are all 0 or 1; 1 (True) means anomalous.
- ``scores`` / ``maps``: any real dtype, higher means more anomalous; NaN is rejected.
- A sample counts as predicted anomalous when ``score > threshold`` (:func:`is_anomalous`, the
  one convention of the whole library: a score equal to the threshold is normal). The curves
  step through every distinct score, so the convention changes no area.
- Pixel metrics (:func:`pixel_auroc`, :func:`aupro`) return NaN when the masks hold no anomalous
  pixel (or no normal one): a test set without ground-truth masks has no pixel score, which is not
  an error. :func:`image_auroc` raises instead, because a test split with one class is broken.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "aupro",
    "f1_max",
    "f1_optimal_threshold",
    "image_auroc",
    "is_anomalous",
    "pixel_auroc",
    "pro_curve",
    "roc_curve",
]


# ----------------------------------------------------------------------------- input checks


def _as_binary(labels: np.ndarray, name: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.dtype == bool:
        return labels
    # A float mask of 0.3s or a 0/255 PNG would silently mean something else after a bool cast.
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(
            f"{name} must be bool or contain only 0 and 1; found values "
            f"{np.unique(labels)[:5].tolist()}... (threshold soft masks with > 0.5 first)"
        )
    return labels.astype(bool)


def _as_scores(scores: np.ndarray, name: str) -> np.ndarray:
    scores = np.asarray(scores)
    if not np.issubdtype(scores.dtype, np.number) or np.iscomplexobj(scores):
        raise ValueError(f"{name} must be real numbers, got dtype {scores.dtype}")
    if np.issubdtype(scores.dtype, np.floating) and np.isnan(scores).any():
        raise ValueError(f"{name} contain NaN; check the model output before evaluating")
    return scores


def _check_pair(
    labels: np.ndarray, scores: np.ndarray, label_name: str, score_name: str
) -> tuple[np.ndarray, np.ndarray]:
    labels = _as_binary(labels, label_name)
    scores = _as_scores(scores, score_name)
    if labels.shape != scores.shape:
        raise ValueError(
            f"{label_name} and {score_name} must have the same shape, "
            f"got {labels.shape} and {scores.shape}"
        )
    return labels, scores


# ----------------------------------------------------------------------------- AUROC


def _auroc_from_split(positive: np.ndarray, negative: np.ndarray) -> float:
    """Mann-Whitney form of the ROC area, with a tie counted as half a win.

    This equals the trapezoid area under the exact ROC curve (what scikit-learn computes), but
    needs no argsort of the pooled pixels: only the two classes sorted separately, in their own
    dtype, which keeps 33 M pixels at a few hundred MB.
    """
    negative = np.sort(negative)
    positive = np.sort(positive)  # sorted queries make searchsorted cache-friendly
    below = np.searchsorted(negative, positive, side="left")
    below_or_tied = np.searchsorted(negative, positive, side="right")
    # Integer sums stay exact; the one division at the end is the only rounding.
    twice_wins = int(below.sum(dtype=np.int64)) + int(below_or_tied.sum(dtype=np.int64))
    return twice_wins / (2.0 * positive.size * negative.size)


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC of image scores; equals ``sklearn.metrics.roc_auc_score``.

    Raises ValueError when the labels hold only one class.
    """
    labels, scores = _check_pair(labels, scores, "labels", "scores")
    labels, scores = labels.ravel(), scores.ravel()
    n_anomalous = int(labels.sum())
    if n_anomalous in (0, labels.size):
        present = "anomalous (1)" if n_anomalous else "normal (0)"
        raise ValueError(
            f"image AUROC needs both normal (0) and anomalous (1) labels; all {labels.size} "
            f"are {present}. Evaluate on a test split that holds both."
        )
    return _auroc_from_split(scores[labels], scores[~labels])


def pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float:
    """ROC AUC over all pixels pooled; masks (N, H, W) bool, maps (N, H, W) float, or lists
    of (H, W) arrays of different sizes (a tiled model's full-resolution maps).

    Equals ``roc_auc_score(masks.ravel(), maps.ravel())``. Maps are compared in their own dtype
    (pass float32 to halve memory). Returns NaN when no pixel is anomalous or none is normal.
    """
    ragged = _ragged(masks, maps)
    if ragged is not None:  # different sizes: all pixels pooled, as for a stack
        masks = np.concatenate([m.ravel() for m in ragged[0]])
        maps = np.concatenate([s.ravel() for s in ragged[1]])
    masks, maps = _check_pair(masks, maps, "masks", "maps")
    positive = maps[masks]
    if positive.size in (0, masks.size):
        return float("nan")
    return _auroc_from_split(positive, maps[~masks])


# ----------------------------------------------------------------------------- exact curves


def _cumulative_at_thresholds(
    scores: np.ndarray, positive_weight: np.ndarray, negative_weight: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted positive and negative counts at ``score >= t`` for every distinct score t.

    Returns (thresholds descending, cumulative negative weight, cumulative positive weight), one
    entry per distinct score. One argsort; tied scores collapse to the last index of their run.
    """
    # Order within a run of ties is irrelevant: only run ends are kept.
    order = np.argsort(scores)[::-1]
    sorted_scores = scores[order]
    cum_negative = np.cumsum(negative_weight[order])
    cum_positive = np.cumsum(positive_weight[order])
    # != rather than np.diff: inf - inf is NaN and would split a run of tied infinities.
    run_ends = np.flatnonzero(sorted_scores[1:] != sorted_scores[:-1])
    last = np.append(run_ends, sorted_scores.size - 1)
    return sorted_scores[last], cum_negative[last], cum_positive[last]


def _tp_fp(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds descending, false positives, true positives) at ``score >= t``."""
    labels, scores = labels.ravel(), scores.ravel()
    return _cumulative_at_thresholds(scores, labels.astype(np.int64), (~labels).astype(np.int64))


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact ROC curve (fpr, tpr), one point per distinct score plus the origin.

    Matches ``sklearn.metrics.roc_curve(..., drop_intermediate=False)``. Any shape is accepted and
    flattened, so ``roc_curve(masks, maps)`` gives the pixel curve (one point per distinct pixel
    score: thin it before plotting millions of points).
    """
    labels, scores = _check_pair(labels, scores, "labels", "scores")
    n_anomalous = int(labels.sum())
    if n_anomalous in (0, labels.size):
        raise ValueError("an ROC curve needs both normal (0) and anomalous (1) labels")
    _, fp, tp = _tp_fp(labels, scores)
    fpr = np.concatenate(([0.0], fp / (labels.size - n_anomalous)))
    tpr = np.concatenate(([0.0], tp / n_anomalous))
    return fpr, tpr


# ----------------------------------------------------------------------------- F1


def _f1_per_threshold(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels, scores = _check_pair(labels, scores, "labels", "scores")
    n_anomalous = int(labels.sum())
    if n_anomalous == 0:
        raise ValueError("F1 needs at least one anomalous (1) label; F1 is undefined without one")
    thresholds, fp, tp = _tp_fp(labels, scores)
    # 2PR / (P + R) rewritten in counts: 2 TP / (2 TP + FP + FN), with FN = n_anomalous - TP.
    f1 = 2.0 * tp / (tp + fp + n_anomalous)
    return thresholds, f1


def _best_f1_index(f1: np.ndarray) -> int:
    # anomalib's F1Max takes argmax over ascending thresholds, i.e. the lowest threshold among
    # equal maxima; ours are descending, so take the last maximum.
    return int(f1.size - 1 - np.argmax(f1[::-1]))


def is_anomalous(scores: np.ndarray, threshold: float | np.ndarray | None) -> np.ndarray | None:
    """(N,) bool: each score above the threshold (one, or each row's own); None without one.

    Compared in float64, as a reader of a result row compares its float32 score with its
    float64 threshold: in float32 the threshold would round, and a score just above it could
    read as normal here and anomalous there."""
    if threshold is None:
        return None
    return np.asarray(scores, np.float64) > np.asarray(threshold, np.float64)


def f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    """Largest F1 over every way to cut the scores (anomalib's F1Max)."""
    _, f1 = _f1_per_threshold(labels, scores)
    return float(f1[_best_f1_index(f1)])


def f1_optimal_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """The threshold at which :func:`f1_max` is reached, for :func:`is_anomalous` (score > it).

    It is the float just below the lowest score flagged at the best cut (among cuts with equal
    F1 the lowest, as in anomalib). Needs at least one anomalous label (labelled anomalous
    validation images).
    """
    thresholds, f1 = _f1_per_threshold(labels, scores)
    return float(np.nextafter(float(thresholds[_best_f1_index(f1)]), -np.inf))


# ----------------------------------------------------------------------------- connected components


def _mask_runs(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Horizontal runs of True in (N, H, W) masks, in raster order.

    Returns (row, start, end) with row = n * H + h and end exclusive. Raster order means the
    pixels of ``masks[masks]`` are exactly the runs laid end to end.
    """
    n, h, w = masks.shape
    rows = masks.reshape(n * h, w)
    # Ground-truth masks are mostly empty; skipping empty rows makes labelling almost free.
    busy = np.flatnonzero(rows.any(axis=1))
    padded = np.zeros((busy.size, w + 2), dtype=np.int8)
    padded[:, 1:-1] = rows[busy]
    edges = np.diff(padded, axis=1)
    start_row, start = np.nonzero(edges == 1)
    _, end = np.nonzero(edges == -1)
    return busy[start_row], start, end


def _run_components(
    row: np.ndarray, start: np.ndarray, end: np.ndarray, height: int, width: int
) -> tuple[np.ndarray, int]:
    """8-connected component id (0-based, in raster order of first pixel) of each run."""
    n_runs = row.size
    if n_runs == 0:
        return np.zeros(0, dtype=np.int64), 0
    # Runs in the next row that touch run a (8-connectivity: columns may be off by one) form one
    # contiguous block of the sorted run list; keys make it findable by two searchsorted calls.
    stride = width + 2
    start_key = row * stride + start
    end_key = row * stride + end
    source = np.flatnonzero(row % height != height - 1)  # the last row of an image has no below
    below = (row[source] + 1) * stride
    first = np.searchsorted(end_key, below + start[source], side="left")
    stop = np.searchsorted(start_key, below + end[source], side="right")
    counts = np.maximum(stop - first, 0)
    a = np.repeat(source, counts)
    offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    b = np.repeat(first, counts) + offsets

    # Vectorised union-find: hook each larger root under the smaller one, then pointer-jump until
    # every run points at its root. parent[x] <= x always, so no cycles can form.
    parent = np.arange(n_runs)
    while a.size:
        root_a, root_b = parent[a], parent[b]
        differ = root_a != root_b
        a, b = a[differ], b[differ]  # merged edges stay merged; drop them
        if not a.size:
            break
        root_a, root_b = root_a[differ], root_b[differ]
        np.minimum.at(parent, np.maximum(root_a, root_b), np.minimum(root_a, root_b))
        while True:
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped
    _, component = np.unique(parent, return_inverse=True)
    return component, int(component.max()) + 1


def _label_components(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected labelling like ``scipy.ndimage.label(m, np.ones((3, 3)))``, per image.

    masks (N, H, W) bool → (labels (N, H, W) int64 with 0 = background and 1.. numbered in raster
    order across the whole batch, number of components). Components never span two images.
    """
    n, h, w = masks.shape
    row, start, end = _mask_runs(masks)
    component, count = _run_components(row, start, end, h, w)
    labels = np.zeros(masks.size, dtype=np.int64)
    labels[np.flatnonzero(masks)] = np.repeat(component + 1, end - start)
    return labels.reshape(n, h, w), count


# ----------------------------------------------------------------------------- PRO / AUPRO

PRO_FPR_LIMIT = 0.3  # AUPRO integrates PRO up to this false-positive rate (MVTec AD's choice)


def _check_fpr_limit(fpr_limit: float) -> float:
    fpr_limit = float(fpr_limit)
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    return fpr_limit


def _ragged(masks: Any, maps: Any) -> tuple[list[np.ndarray], list[np.ndarray]] | None:
    """Lists of (H, W) masks and maps whose sizes differ (a tiled model's full-resolution
    maps), each pair checked; None for anything that stacks."""
    if not isinstance(masks, (list, tuple)) or len({np.shape(m) for m in masks}) <= 1:
        return None
    if len(masks) != len(maps):
        raise ValueError(f"{len(masks)} masks for {len(maps)} maps")
    pairs = [_check_pair(m, s, "masks", "maps") for m, s in zip(masks, maps, strict=True)]
    if any(m.ndim != 2 for m, _ in pairs):
        raise ValueError("masks and maps of different sizes must each be (H, W)")
    return [m for m, _ in pairs], [s for _, s in pairs]


def _as_image_stack(
    masks: np.ndarray | list[np.ndarray], maps: np.ndarray | list[np.ndarray]
) -> tuple[np.ndarray, np.ndarray] | tuple[list[np.ndarray], list[np.ndarray]]:
    ragged = _ragged(masks, maps)
    if ragged is not None:
        return ragged
    masks, maps = _check_pair(np.asarray(masks), np.asarray(maps), "masks", "maps")
    if masks.ndim == 2:
        masks, maps = masks[None], maps[None]
    if masks.ndim != 3:
        raise ValueError(f"masks and maps must be (N, H, W) or (H, W), got shape {masks.shape}")
    return masks, maps


def _pro_parts(
    masks: np.ndarray, maps: np.ndarray
) -> tuple[np.ndarray, np.ndarray, int, np.ndarray]:
    """(anomalous pixels' scores, their weights, number of regions, normal pixels' scores) of
    (N, H, W) masks and maps."""
    n, h, w = masks.shape
    row, start, end = _mask_runs(masks)
    component, n_regions = _run_components(row, start, end, h, w)
    lengths = end - start
    region_size = np.bincount(component, weights=lengths, minlength=n_regions)
    # Each anomalous pixel carries 1 / (its region's size): summing those above a threshold and
    # dividing by the region count is the mean per-region overlap, so every region weighs the same.
    positive_weight = np.repeat(1.0 / region_size[component], lengths)
    return maps[masks], positive_weight, n_regions, maps[~masks]


def _pro_curve_unchecked(
    masks: np.ndarray | list[np.ndarray], maps: np.ndarray | list[np.ndarray], fpr_limit: float
) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(masks, list):  # images of different sizes: each labelled on its own
        parts = [_pro_parts(m[None], s[None]) for m, s in zip(masks, maps, strict=True)]
        positive_scores = np.concatenate([p[0] for p in parts])
        positive_weight = np.concatenate([p[1] for p in parts])
        n_regions = sum(p[2] for p in parts)
        negative_scores = np.concatenate([p[3] for p in parts])
    else:
        positive_scores, positive_weight, n_regions, negative_scores = _pro_parts(masks, maps)
    n_negative = negative_scores.size
    # Thresholds below the score of the k-th highest normal pixel only give points with
    # FPR >= k / n_negative >= fpr_limit, which the integral never reaches, so only the top
    # ~fpr_limit of the normal pixels get sorted. The + 1 guards against ceil() rounding down;
    # extra points are harmless.
    k = min(n_negative, int(np.ceil(fpr_limit * n_negative)) + 1)
    negative_scores.partition(n_negative - k)
    cutoff = negative_scores[n_negative - k]
    # A plain sort, not an argsort of all pixels: numpy's SIMD sort is ~10x faster than argsort.
    negative_scores = np.sort(negative_scores[negative_scores >= cutoff])[::-1]

    # The curve is a polyline through (FPR(t), PRO(t)) at every distinct score t. FPR moves only at
    # normal pixels' scores; in between PRO climbs straight up. So the exact polyline is, for each
    # distinct normal score s (a run of m tied normal pixels): a vertical rise to PRO(> s), then a
    # straight segment (the tie) to (FPR + m / n_negative, PRO(>= s)).
    run_last = np.append(
        np.flatnonzero(negative_scores[1:] != negative_scores[:-1]), negative_scores.size - 1
    )
    run_score = negative_scores[run_last]
    fpr_after = (run_last + 1) / n_negative
    fpr_before = np.concatenate(([0.0], fpr_after[:-1]))

    # PRO(> s) and PRO(>= s) for all runs at once: suffix sums of the anomalous pixels' weights in
    # score order. Only anomalous pixels are argsorted, and they are few.
    order = np.argsort(positive_scores)
    positive_scores = positive_scores[order]
    weight_from = np.append(np.cumsum(positive_weight[order][::-1])[::-1], 0.0)
    pro_above = weight_from[np.searchsorted(positive_scores, run_score, side="right")]
    pro_at = weight_from[np.searchsorted(positive_scores, run_score, side="left")]

    fpr = np.empty(2 * run_score.size + 1)
    pro = np.empty_like(fpr)
    fpr[0], pro[0] = 0.0, 0.0
    fpr[1::2], fpr[2::2] = fpr_before, fpr_after
    # Float sums of 1/size can overshoot 1 by an ulp; the MVTec reference clips the same way.
    pro[1::2] = np.minimum(pro_above / n_regions, 1.0)
    pro[2::2] = np.minimum(pro_at / n_regions, 1.0)
    # A run with no tied anomalous pixel repeats the previous vertex; drop the duplicates.
    changed = np.append(True, (np.diff(fpr) != 0) | (np.diff(pro) != 0))
    fpr, pro = fpr[changed], pro[changed]

    # Close the curve exactly at fpr_limit, interpolating linearly inside the crossing segment
    # (the MVTec reference's trapezoid(x_max=...)).
    inside = int(np.searchsorted(fpr, fpr_limit, side="right"))
    fpr, pro, next_fpr, next_pro = fpr[:inside], pro[:inside], fpr[inside:], pro[inside:]
    if fpr[-1] < fpr_limit and next_fpr.size:
        fraction = (fpr_limit - fpr[-1]) / (next_fpr[0] - fpr[-1])
        fpr = np.append(fpr, fpr_limit)
        pro = np.append(pro, pro[-1] + fraction * (next_pro[0] - pro[-1]))
    return fpr, pro


def pro_curve(
    masks: np.ndarray, maps: np.ndarray, fpr_limit: float = PRO_FPR_LIMIT
) -> tuple[np.ndarray, np.ndarray]:
    """Per-region-overlap curve (fpr, pro) from the origin up to exactly ``fpr_limit``.

    masks (N, H, W) bool and maps (N, H, W) float, or lists of (H, W) arrays of different
    sizes (each image labelled on its own). The vertices are those of the curve evaluated at
    every distinct score, less the ones in the middle of straight runs. PRO at a threshold
    is the mean, over all 8-connected ground-truth regions of all images, of the fraction of the
    region's pixels with ``map >= t``; FPR is the fraction of all normal pixels with ``map >= t``.
    Raises ValueError when the masks hold no anomalous pixel or no normal pixel.
    """
    fpr_limit = _check_fpr_limit(fpr_limit)
    masks, maps = _as_image_stack(masks, maps)
    n_anomalous = sum(int(m.sum()) for m in masks)
    if n_anomalous in (0, sum(m.size for m in masks)):
        raise ValueError("a PRO curve needs both anomalous and normal pixels in the masks")
    return _pro_curve_unchecked(masks, maps, fpr_limit)


def aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = PRO_FPR_LIMIT) -> float:
    """Area under the PRO curve up to ``fpr_limit``, divided by ``fpr_limit``: in [0, 1].

    The MVTec AD definition (anomalib ``AUPRO(fpr_limit=0.3)``), exact at every distinct score:
    one sort of the top ``fpr_limit`` of the normal pixels, one of the anomalous pixels.
    Returns NaN when the masks hold no anomalous pixel (or no normal pixel).
    """
    fpr_limit = _check_fpr_limit(fpr_limit)
    masks, maps = _as_image_stack(masks, maps)
    n_anomalous = sum(int(m.sum()) for m in masks)
    if n_anomalous in (0, sum(m.size for m in masks)):
        return float("nan")
    fpr, pro = _pro_curve_unchecked(masks, maps, fpr_limit)
    area = float(np.sum(np.diff(fpr) * (pro[1:] + pro[:-1])) / 2.0)
    return area / fpr_limit
