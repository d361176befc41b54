"""dskd_ray.evaluation.metrics against scikit-learn, hand-built cases and a slow reference AUPRO."""

from __future__ import annotations

import bisect
from collections import deque

import numpy as np
import pytest
from sklearn.metrics import f1_score, roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from dskd_ray.evaluation.metrics import (
    _label_components,
    aupro,
    f1_max,
    f1_optimal_threshold,
    image_auroc,
    is_anomalous,
    pixel_auroc,
    pro_curve,
    roc_curve,
)

# ----------------------------------------------------------------------------- slow references


def _bfs_components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of one (H, W) mask, each as a bool mask; deliberately naive."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    components = []
    for i in range(h):
        for j in range(w):
            if not mask[i, j] or seen[i, j]:
                continue
            component = np.zeros_like(mask, dtype=bool)
            queue = deque([(i, j)])
            seen[i, j] = True
            while queue:
                y, x = queue.popleft()
                component[y, x] = True
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        ny, nx = y + dy, x + dx
                        if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                            seen[ny, nx] = True
                            queue.append((ny, nx))
            components.append(component)
    return components


def _mvtec_trapezoid(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """The MVTec AD evaluation code's trapezoid(x, y, x_max)."""
    correction = 0.0
    if x_max not in x:
        ins = bisect.bisect(x.tolist(), x_max)
        y_interp = y[ins - 1] + (y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1])
        correction = 0.5 * (y_interp + y[ins - 1]) * (x_max - x[ins - 1])
    keep = x <= x_max
    x, y = x[keep], y[keep]
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction)


def _reference_aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float) -> float:
    """One pass over all pixels per distinct threshold: slow, and obviously the definition."""
    regions = []
    for n in range(len(masks)):
        for component in _bfs_components(masks[n]):
            region = np.zeros_like(masks)
            region[n] = component
            regions.append(region.ravel())
    membership = np.array(regions, dtype=float)  # (regions, pixels)
    normal = ~masks
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        above = maps >= t
        fprs.append((above & normal).sum() / normal.sum())
        overlap = membership @ above.ravel() / membership.sum(axis=1)
        pros.append(overlap.mean())
    return _mvtec_trapezoid(np.array(fprs), np.array(pros), fpr_limit) / fpr_limit


# ----------------------------------------------------------------------------- AUROC


@pytest.mark.parametrize("seed", range(5))
def test_image_auroc_matches_sklearn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.random(200) < 0.3
    scores = rng.integers(0, 6, size=200) + labels * rng.integers(0, 3, size=200)
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    as_ints = labels.astype(np.int64)
    assert image_auroc(as_ints, scores.astype(float)) == pytest.approx(
        roc_auc_score(as_ints, scores), abs=1e-12
    )


@pytest.mark.parametrize("seed", range(3))
def test_pixel_auroc_matches_sklearn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    masks = rng.random((4, 32, 32)) < 0.1
    maps = (np.round(rng.random((4, 32, 32)) * 20) + 5 * masks).astype(np.float32)
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-9)


def test_auroc_extremes() -> None:
    labels = np.array([0, 0, 1, 1])
    assert image_auroc(labels, np.array([0.1, 0.2, 0.3, 0.4])) == 1.0
    assert image_auroc(labels, np.array([0.4, 0.3, 0.2, 0.1])) == 0.0
    assert image_auroc(labels, np.ones(4)) == 0.5


def test_image_auroc_one_class_raises() -> None:
    with pytest.raises(ValueError, match="both normal"):
        image_auroc(np.zeros(5, dtype=bool), np.arange(5.0))
    with pytest.raises(ValueError, match="both normal"):
        image_auroc(np.ones(5, dtype=bool), np.arange(5.0))


def test_pixel_metrics_without_anomalous_pixels_are_nan() -> None:
    masks = np.zeros((2, 8, 8), dtype=bool)
    maps = np.random.default_rng(0).random((2, 8, 8))
    assert np.isnan(pixel_auroc(masks, maps))
    assert np.isnan(aupro(masks, maps))
    with pytest.raises(ValueError, match="anomalous and normal"):
        pro_curve(masks, maps)


def test_input_validation() -> None:
    with pytest.raises(ValueError, match="same shape"):
        image_auroc(np.array([0, 1]), np.array([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="NaN"):
        image_auroc(np.array([0, 1]), np.array([0.1, np.nan]))
    with pytest.raises(ValueError, match="only 0 and 1"):
        pixel_auroc(np.full((1, 2, 2), 255), np.zeros((1, 2, 2)))
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(np.ones((1, 2, 2), dtype=bool), np.zeros((1, 2, 2)), fpr_limit=0.0)


@pytest.mark.parametrize("seed", range(3))
def test_roc_curve_matches_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.random(100) < 0.4
    scores = rng.integers(0, 10, size=100).astype(float)
    fpr, tpr = roc_curve(labels, scores)
    sk_fpr, sk_tpr, _ = sk_roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)


# ----------------------------------------------------------------------------- F1


@pytest.mark.parametrize("seed", range(5))
def test_f1_max_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.random(80) < 0.3
    labels[0] = True
    scores = rng.integers(0, 15, size=80) + 3 * labels
    best = max(f1_score(labels, scores >= t) for t in np.unique(scores))
    assert f1_max(labels, scores) == pytest.approx(best, abs=1e-12)
    threshold = f1_optimal_threshold(labels, scores)
    assert np.nextafter(threshold, np.inf) in scores  # just below the lowest flagged score
    assert f1_score(labels, is_anomalous(scores, threshold)) == pytest.approx(best, abs=1e-12)


def test_f1_perfect_separation_and_errors() -> None:
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    assert f1_max(labels, scores) == 1.0
    assert f1_optimal_threshold(labels, scores) == np.nextafter(0.8, 0)
    assert is_anomalous(scores, f1_optimal_threshold(labels, scores)).tolist() == labels.tolist()
    assert is_anomalous(scores, 0.8).tolist() == [0, 0, 0, 0, 1]  # equal to it is normal
    assert is_anomalous(scores, None) is None
    with pytest.raises(ValueError, match="anomalous"):
        f1_max(np.zeros(3), np.arange(3.0))


# ----------------------------------------------------------------------------- labelling


@pytest.mark.parametrize("density", [0.0, 0.2, 0.45, 0.7, 1.0])
def test_labelling_matches_scipy(density: float) -> None:
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(int(density * 100))
    masks = rng.random((3, 20, 17)) < density
    labels, count = _label_components(masks)
    offset = 0
    for n in range(len(masks)):
        expected, expected_count = ndimage.label(masks[n], structure=np.ones((3, 3)))
        shifted = np.where(expected > 0, expected + offset, 0)
        np.testing.assert_array_equal(labels[n], shifted)
        offset += expected_count
    assert count == offset


def test_labelling_is_eight_connected_and_per_image() -> None:
    masks = np.zeros((2, 4, 4), dtype=bool)
    masks[0, 2, 1] = masks[0, 3, 2] = True  # diagonal neighbours: one region
    masks[1, 0, 2] = True  # directly below image 0's last row, but in another image
    masks[1, 3, 3] = True
    labels, count = _label_components(masks)
    assert count == 3
    assert labels[0, 2, 1] == labels[0, 3, 2] == 1
    assert labels[1, 0, 2] == 2
    assert labels[1, 3, 3] == 3


# ----------------------------------------------------------------------------- AUPRO


def _two_region_image() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One 8×16 image: region A (2×2) and region B (2×4), normal pixels scored 1..116."""
    masks = np.zeros((1, 8, 16), dtype=bool)
    region_a = np.zeros_like(masks)
    region_a[0, 0:2, 0:2] = True
    region_b = np.zeros_like(masks)
    region_b[0, 4:6, 8:12] = True
    masks = region_a | region_b
    maps = np.zeros(masks.shape)
    maps[~masks] = np.arange(1, (~masks).sum() + 1)
    return masks, maps, region_a, region_b


def test_aupro_perfect_map_is_one() -> None:
    masks, maps, _, _ = _two_region_image()
    maps[masks] = 1000.0
    assert aupro(masks, maps) == pytest.approx(1.0, abs=1e-12)


def test_aupro_inverted_map_is_zero() -> None:
    masks, maps, _, _ = _two_region_image()
    maps[masks] = -1.0
    assert aupro(masks, maps) == pytest.approx(0.0, abs=1e-12)


def test_aupro_one_region_caught_fully_the_other_half() -> None:
    masks, maps, region_a, region_b = _two_region_image()
    n_normal = (~masks).sum()  # 116, scored 1..116
    maps[region_a] = 1000.0
    b_pixels = np.flatnonzero(region_b)
    maps.flat[b_pixels[:4]] = 1000.0
    maps.flat[b_pixels[4:]] = 100.5  # caught once the 16 normals scored 101..116 are
    step = 16 / n_normal
    # PRO is (1 + 1/2) / 2 from FPR 0 up to the step, then 1.
    expected = (step * 0.75 + (0.3 - step) * 1.0) / 0.3
    assert aupro(masks, maps) == pytest.approx(expected, abs=1e-12)

    # Tied with the normal pixel scored 100: that point moves diagonally, trapezoid-style.
    maps.flat[b_pixels[4:]] = 100.0
    slope_area = (1 / n_normal) * (0.75 + 1.0) / 2
    expected = (step * 0.75 + slope_area + (0.3 - step - 1 / n_normal) * 1.0) / 0.3
    assert aupro(masks, maps) == pytest.approx(expected, abs=1e-12)


def test_aupro_weighs_regions_equally_not_pixels() -> None:
    masks = np.zeros((1, 20, 20), dtype=bool)
    masks[0, 2:8, 2:7] = True  # 30 pixels, found at once
    masks[0, 15, 15:17] = True  # 2 pixels, never found within the FPR limit
    maps = np.random.default_rng(0).uniform(1.0, 2.0, size=masks.shape)
    maps[0, 2:8, 2:7] = 10.0
    maps[0, 15, 15:17] = 0.0
    # Pixel-weighted overlap would be 30/32; per region it is (1 + 0) / 2.
    assert aupro(masks, maps) == pytest.approx(0.5, abs=1e-12)


def test_aupro_uses_eight_connectivity() -> None:
    masks = np.zeros((1, 6, 6), dtype=bool)
    masks[0, 1, 1] = masks[0, 2, 2] = True  # one diagonal region, half found
    masks[0, 4, 4] = True  # a second region, not found
    maps = np.full(masks.shape, 0.5)
    maps[0, 1, 1] = 1.0
    maps[0, 2, 2] = maps[0, 4, 4] = 0.0
    # 8-connected: regions {2 px: 1/2, 1 px: 0} → 1/4. Four-connected would give 1/3.
    assert aupro(masks, maps) == pytest.approx(0.25, abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("fpr_limit", [0.3, 0.05, 0.137, 1.0])
def test_aupro_matches_slow_reference(seed: int, fpr_limit: float) -> None:
    rng = np.random.default_rng(seed)
    masks = rng.random((3, 12, 11)) < 0.15
    masks[0, 3:6, 3:7] = True  # at least one larger region
    if seed % 2:
        maps = rng.integers(0, 12, size=masks.shape) + 4 * masks  # many ties
    else:
        maps = rng.random(masks.shape) + 0.4 * masks * rng.random(masks.shape)
    maps = maps.astype(np.float64)
    expected = _reference_aupro(masks, maps, fpr_limit)
    assert aupro(masks, maps, fpr_limit) == pytest.approx(expected, abs=1e-10)


def test_pro_curve_shape() -> None:
    rng = np.random.default_rng(1)
    masks = rng.random((2, 16, 16)) < 0.1
    maps = rng.random(masks.shape) + masks
    fpr, pro = pro_curve(masks, maps, fpr_limit=0.2)
    assert fpr[0] == 0.0 and pro[0] == 0.0
    assert fpr[-1] == pytest.approx(0.2)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= 0)
    assert np.all((pro >= 0) & (pro <= 1))
    area = np.sum(np.diff(fpr) * (pro[1:] + pro[:-1]) / 2) / 0.2
    assert aupro(masks, maps, fpr_limit=0.2) == pytest.approx(area, abs=1e-12)


def test_aupro_accepts_a_single_image() -> None:
    masks, maps, _, _ = _two_region_image()
    assert aupro(masks[0], maps[0]) == pytest.approx(aupro(masks, maps), abs=1e-15)
