"""Detection quality: DSKD, its single students, its map rules, and a training-free reference.

For each category under the given MVTec-layout roots, for each seed:
- the kNN reference on the same frozen teacher (bench/knn_reference.py; no training);
- each training variant (DSKD, `se` ≈ STFPM, `sd` ≈ Reverse Distillation) trained once with the
  product's `train()`, then
  - scored through the product's own path (`Scorer` + `evaluate_category`: the checkpoint's
    calibrated default map), and
  - re-mapped under every map rule in RULES from the same pyramids (level statistics fitted on
    the held-out normal images, per-pixel baselines on training images, as `calibrate` does),
  - with diagnostics: image / pixel AUROC of each student's each level alone.
- the teacher's memory in the product (docs/design.md §2): `knn` (no student: the memory
  alone, fitted by `train()`), and `<variant>+knn` (the trained students of `<variant>`, kept in
  OUT/models, with the memory added by the product's `add_memory`: no second training),
  scored through the product's path, with the fusion alternatives as diagnostics. Bank size and
  sampling: the product's defaults, or `--memory-sizes` (patches, or "2%" of the training
  patches) and `--memory-samplings`, which name the method by them (`knn[random 2%]`).
Nothing is chosen on test images. Results go to OUT/results.json (resumable: runs already
there are kept) and OUT/results.md.

    python bench/quality.py /data/mtd --epochs 20 --seeds 0 1 2 --out bench/out/mtd

The memory alone, coreset against random at a few bank sizes (no training):

    python bench/quality.py /data/mtd --seeds 0 1 2 --variants knn --memory-sizes 1024 4096 2% \
        --memory-samplings coreset random --out bench/out/mtd

With `--tile SIZE` each variant is trained and scored on full-resolution SIZE² tiles instead
(method `<variant>-tileSIZE`, product path only: the diagnostics remap whole images), into the
same OUT, so the tables show both:

    python bench/quality.py /data/mtd --epochs 20 --seeds 0 --variants sd --tile 128 \
        --no-reference --out bench/out/mtd
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from knn_reference import knn_maps  # noqa: E402

from dskd_ray.config import MEMORY_SAMPLINGS, DSKDConfig  # noqa: E402
from dskd_ray.evaluation import metrics  # noqa: E402
from dskd_ray.evaluation.evaluate import METRIC_KEYS, evaluate_category  # noqa: E402
from dskd_ray.inference.scoring import Scorer, resolve_device  # noqa: E402
from dskd_ray.io.data import Category, discover_categories, load_images, load_mask  # noqa: E402
from dskd_ray.model.anomaly_map import (  # noqa: E402
    apply_baseline,
    baseline_from_mean,
    fuse_levels,
    gaussian_blur,
    image_score,
    level_maps,
    level_moments,
    level_statistics,
    member_maps,
    memory_member,
)
from dskd_ray.model.checkpoint import load_checkpoint  # noqa: E402
from dskd_ray.model.inputs import images_to_tensor
from dskd_ray.model.network import DSKD  # noqa: E402
from dskd_ray.training.loop import add_memory, plan_training, split_holdout, train  # noqa: E402

# Every trained model is kept in OUT/models, so a new map rule is measured with --remap, not
# by training again.

# name → config changes for training. `sd` alone reads the teacher's pyramid (there is no Se).
VARIANTS: dict[str, dict[str, Any]] = {
    # The students alone (memory none): the memory is a variant of its own, `<variant>+knn`.
    "dskd": {"students": "both", "df_input": "se", "memory": "none"},
    "dskd-df-teacher": {"students": "both", "df_input": "teacher", "memory": "none"},
    "se": {"students": "se", "memory": "none"},  # ≈ STFPM
    "sd": {"students": "sd", "df_input": "teacher", "memory": "none"},  # ≈ Reverse Distillation
    "knn": {"students": "none", "memory": "knn"},  # the teacher's memory alone: no training
}
# The students' switches (docs/design.md §1, §3), each alone on every set: `<set>-<switch>`.
# Each is measured on top of the default of its day: before 2026-12-06 that was the pixel loss.
SWITCHES: dict[str, dict[str, Any]] = {
    # Reverse Distillation's loss, the default since 2026-12-06 (so `dskd-flat` is `dskd`; the
    # name is kept for the older tables); `pixel` is the paper's loss, the default before.
    "flat": {"loss_form": "flat"},
    "pixel": {"loss_form": "pixel"},
    "flat-hm": {"loss_form": "flat", "hard_mining": 0.9},  # and Dinomaly's hard mining
    "hm": {"hard_mining": 0.9},
    "std-cos": {"feature_norm": "standardize"},  # EfficientAD's feature scale, cosine kept
    "std-l2": {"feature_norm": "standardize", "distance": "l2"},  # and its distance
    "l2": {"distance": "l2"},
    "denoise": {"denoise": 0.5},  # DeSTSeg-style synthetic defects in half of each batch
    "p8": {"pyramid": "8-16-32"},  # the levels the kNN reference reads, and one deeper
    "resnet": {"encoder_student": "resnet"},  # Se of another architecture than the teacher
    "sgd": {"optimizer": "sgd", "lr": 0.4, "weight_decay": 1e-3},  # STFPM's optimiser
}
# Switches that lifted MTD alone (flat, p8, denoise: +0.05 each at 10 epochs), together
# (`<student>-<a>-<b>`).
SWITCHES.update(
    {"-".join(parts): {k: v for part in parts for k, v in SWITCHES[part].items()}
     for parts in [("flat", "p8"), ("flat", "denoise"), ("p8", "denoise"),
                   ("flat", "p8", "denoise")]}
)  # fmt: skip
VARIANTS.update(
    {f"{name}-{switch}": {**VARIANTS[name], **changes}
     for name in ("dskd", "se", "sd") for switch, changes in SWITCHES.items()
     if not (name == "sd" and "encoder_student" in changes)}  # sd has no encoder student
)  # fmt: skip
# `<base>+knn`: the trained students of <base> (kept in OUT/models) with the memory added.
MEMORY_SUFFIX = "+knn"
VARIANTS.update(
    {f"{name}{MEMORY_SUFFIX}": {**changes, "memory": "knn"}
     for name, changes in list(VARIANTS.items()) if name != "knn"}
)  # fmt: skip
# name → (level_normalization, level_fusion, map_baseline, score_top_k): how the map is made
# from the same trained pyramids.
RULES: dict[str, tuple[str, str, str, int]] = {
    "raw sum": ("none", "sum", "none", 1),
    "raw sum ÷ pixel mean": ("none", "sum", "mean", 1),
    "raw sum − pixel mean": ("none", "sum", "subtract", 1),
    "raw product": ("none", "product", "none", 1),
    "÷ level mean, sum": ("mean", "sum", "none", 1),
    "standardised sum": ("standardize", "sum", "none", 1),
    "standardised sum − pixel mean": ("standardize", "sum", "subtract", 1),
    "raw sum, top-100": ("none", "sum", "none", 100),
    "standardised sum, top-100": ("standardize", "sum", "none", 100),
}
REFERENCE = "kNN reference (no training)"


def bank_size(size: str, category: Category, config: DSKDConfig) -> int:
    """A `--memory-sizes` entry in patches: itself, or "N%" of the training patches (the
    images `train` trains on, after the hold-out)."""
    if not size.endswith("%"):
        return int(size)
    images = len(plan_training(category.root, config).train_uris)
    return max(1, round(float(size[:-1]) / 100 * images * (config.image_size // 8) ** 2))


def rule_of(config: DSKDConfig) -> str:
    key = (config.level_normalization, config.level_fusion, config.map_baseline, config.score_top_k)
    return next((name for name, rule in RULES.items() if rule == key), str(key))


@dataclass
class Run:
    category: str
    seed: int
    method: str  # a VARIANTS name or REFERENCE
    epochs: int
    kind: str  # "product" (the checkpoint's own path), "rule", "student", "level", "reference"
    rule: str  # the map rule, or "<student> stride <s>" for a level
    metrics: dict[str, float | None]
    train_s: float = 0.0
    memory: dict | None = None  # the checkpoint's meta["memory"]: bank size, candidates, fit_s


@dataclass
class TestSet:
    images: np.ndarray  # (N, S, S, 3) uint8
    labels: np.ndarray  # (N,)
    masks: np.ndarray | None  # (N, S, S) bool, None without pixel labels


def load_test_set(category: Category, size: int) -> TestSet:
    images, kept, _ = load_images([t.path for t in category.test], size)
    by_path = {t.path: t for t in category.test}
    items = [by_path[u] for u in kept]
    labels = np.array([t.label for t in items], np.int64)
    with_masks = all(t.mask_path for t in items if t.label == 1)
    masks = np.stack([load_mask(t.mask_path, size) for t in items]) if with_masks else None
    return TestSet(images, labels, masks)


def score_metrics(
    test: TestSet, scores: np.ndarray, maps: np.ndarray | None, aupro: bool = True
) -> dict[str, float | None]:
    def finite(x: float) -> float | None:
        return float(x) if np.isfinite(x) else None

    out: dict[str, float | None] = {
        "image_auroc": finite(metrics.image_auroc(test.labels, scores)),
        "pixel_auroc": None,
        "aupro": None,
        "f1_max": finite(metrics.f1_max(test.labels, scores)),
    }
    if maps is not None and test.masks is not None and test.masks.any():
        out["pixel_auroc"] = finite(metrics.pixel_auroc(test.masks, maps))
        if aupro:
            out["aupro"] = finite(metrics.aupro(test.masks, maps, fpr_limit=0.3))
    return out


@torch.inference_mode()
def cached_levels(
    model: DSKD, images: np.ndarray, device: torch.device, batch_size: int = 16
) -> dict[str, list[torch.Tensor]]:
    """Every student's level maps (native size, CPU) for a stack of images."""
    chunks: list[dict[str, list[torch.Tensor]]] = []
    for start in range(0, len(images), batch_size):
        x = model.normalize(images_to_tensor(images[start : start + batch_size], device))
        levels = level_maps(model(x), model.config.distance)
        chunks.append({k: [m.cpu() for m in v] for k, v in levels.items()})
    return {name: [torch.cat([c[name][k] for c in chunks]) for k in range(3)] for name in chunks[0]}


def take(levels: dict[str, list[torch.Tensor]], sl: slice) -> dict[str, list[torch.Tensor]]:
    return {name: [m[sl] for m in maps] for name, maps in levels.items()}


def rule_maps(
    levels: dict[str, list[torch.Tensor]],
    size: int,
    fusion: str,
    location: torch.Tensor | None,
    spread: torch.Tensor | None,
    sigma: float,
    baseline: torch.Tensor | None = None,
    top_k: int = 1,
    baseline_mode: str = "mean",
) -> tuple[np.ndarray, np.ndarray]:
    """The product's map arithmetic on cached levels, in chunks: (maps, scores)."""
    n = len(next(iter(levels.values()))[0])
    maps, scores = [], []
    for start in range(0, n, 64):
        fused = fuse_levels(
            take(levels, slice(start, start + 64)), (size, size), fusion, location, spread
        )
        m = apply_baseline(gaussian_blur(fused, sigma), baseline, baseline_mode)
        maps.append(m.numpy())
        scores.append(image_score(m, top_k).numpy())
    return np.concatenate(maps), np.concatenate(scores)


def evaluate_rules(
    model: DSKD,
    holdout: np.ndarray,
    train_images: np.ndarray,
    test: TestSet,
    device: torch.device,
    base: Run,
) -> list[Run]:
    """Every map rule and every single level, from one pass of the network per image."""
    cfg = model.config
    size, sigma = cfg.image_size, cfg.blur_sigma
    normal = cached_levels(model, holdout if len(holdout) else train_images, device)
    pick = np.unique(np.linspace(0, len(train_images) - 1, min(len(train_images), 256)).round())
    train_levels = cached_levels(model, train_images[pick.astype(int)], device)
    test_levels = cached_levels(model, test.images, device)
    moments = level_moments(normal)
    runs = []
    for name, (normalization, fusion, baseline_mode, top_k) in RULES.items():
        location, spread = level_statistics(moments, normalization)
        baseline = None
        if baseline_mode != "none":
            train_maps, _ = rule_maps(train_levels, size, fusion, location, spread, sigma)
            baseline = torch.from_numpy(train_maps).mean(dim=0)
            if baseline_mode == "mean":
                baseline = baseline_from_mean(baseline)
        maps, scores = rule_maps(
            test_levels, size, fusion, location, spread, sigma, baseline, top_k, baseline_mode
        )
        runs.append(
            dataclasses.replace(
                base, kind="rule", rule=name, metrics=score_metrics(test, scores, maps)
            )
        )
        logging.info("%s %s %s: %s", base.category, base.method, name, runs[-1].metrics)
    if len(test_levels) > 1:  # each student of a two-student model on its own
        for student in test_levels:
            for name in ("raw sum", "standardised sum"):
                normalization, fusion, _, top_k = RULES[name]
                location, spread = level_statistics(moments, normalization)
                one = {student: test_levels[student]}
                maps, scores = rule_maps(one, size, fusion, location, spread, sigma, None, top_k)
                runs.append(dataclasses.replace(
                    base, kind="student", rule=f"{student} alone, {name}",
                    metrics=score_metrics(test, scores, maps, aupro=False),
                ))  # fmt: skip
    for student, maps_k in test_levels.items():
        for k, stride in enumerate(cfg.strides):
            one = {student: [maps_k[k]]}
            up = F.interpolate(one[student][0].unsqueeze(1), size=(size, size), mode="bilinear")
            maps = gaussian_blur(up.squeeze(1), sigma).numpy()
            scores = maps.reshape(len(maps), -1).max(axis=1)
            runs.append(dataclasses.replace(
                base, kind="level", rule=f"{student} stride {stride}",
                metrics=score_metrics(test, scores, maps, aupro=False),
            ))  # fmt: skip
    return runs


# name → how a memory model's members are weighed (diagnostics of the fusion; the first is the
# product's): each student's fused levels, and the memory's level standardised and scaled to a
# student's normal spread (its gain).
FUSIONS: dict[str, str] = {
    "members equal (product)": "equal",
    # The per-pixel baseline fitted on the students' part only (the memory member zero on the
    # training images, whose own patches the bank holds), then subtracted from the whole map.
    "members equal, baseline of the students' part": "equal-students-baseline",
    "memory ½, students' mean ½": "half",
    "memory ½, students' mean ½, baseline of the students' part": "half-students-baseline",
    "members equal, memory not scaled to a student": "unscaled",
    "students only": "students",
    "memory only": "memory",
    "memory only, no per-pixel baseline": "memory-raw",
    # bench/knn_reference.py's rule on the product's bank: the map blurred, no baseline, the
    # score the largest patch distance (before upsampling and blur).
    "memory only, the reference's rule": "memory-reference",
}
MEMORY_ONLY = ("memory", "memory-raw", "memory-reference")  # the ways of a model with no student


@torch.inference_mode()
def cached_inputs(
    model: DSKD, images: np.ndarray, device: torch.device, batch_size: int = 16
) -> tuple[dict[str, list[torch.Tensor]], torch.Tensor]:
    """Every student's level maps and the memory's distances (native size, CPU)."""
    assert model.memory is not None
    levels: dict[str, list[list[torch.Tensor]]] = {}
    distances = []
    for start in range(0, len(images), batch_size):
        x = model.normalize(images_to_tensor(images[start : start + batch_size], device))
        teacher, features = model.pyramids(x)
        for name, maps in level_maps(features, model.config.distance).items():
            levels.setdefault(name, [[], [], []])
            for k, m in enumerate(maps):
                levels[name][k].append(m.cpu())
        distances.append(model.memory.distances(teacher, model.config.strides).cpu())
    return {n: [torch.cat(v) for v in ks] for n, ks in levels.items()}, torch.cat(distances)


def fusion_maps(
    model: DSKD,
    levels: dict[str, list[torch.Tensor]],
    distances: torch.Tensor,
    kind: str,
    baseline: torch.Tensor | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(maps, scores) of one FUSIONS way, from cached inputs, with the model's calibration."""
    cfg = model.config
    size = (cfg.image_size, cfg.image_size)
    location, spread = (t.cpu() for t in model.level_statistics())
    memory = model.memory
    assert memory is not None
    scale = memory.scale().cpu() if kind != "unscaled" else 1 / memory.spread.cpu()
    maps, scores = [], []
    for start in range(0, len(distances), 64):
        sl = slice(start, start + 64)
        students = member_maps(take(levels, sl), size, cfg.level_fusion, location, spread)
        mem = memory_member(distances[sl], size, scale)
        if kind.endswith("-without-memory"):  # what a students'-part baseline is the mean of
            mem = torch.zeros_like(mem)
            kind = kind.removesuffix("-without-memory")
        kind = kind.removesuffix("-students-baseline")
        if kind == "half":
            fused = 0.5 * torch.stack(students).mean(dim=0) + 0.5 * mem
        elif kind == "students":
            fused = torch.stack(students).mean(dim=0)
        elif kind.startswith("memory"):
            fused = mem
        else:
            fused = torch.stack([*students, mem]).mean(dim=0)
        m = apply_baseline(gaussian_blur(fused, cfg.blur_sigma), baseline, cfg.map_baseline)
        maps.append(m.numpy())
        if kind == "memory-reference":
            scores.append(distances[sl].flatten(1).amax(dim=1).numpy())
        else:
            scores.append(image_score(m, cfg.score_top_k).numpy())
    return np.concatenate(maps), np.concatenate(scores)


def evaluate_fusions(
    model: DSKD, train_images: np.ndarray, test: TestSet, device: torch.device, base: Run
) -> list[Run]:
    """Each FUSIONS way of a memory model with students, its per-pixel baseline refitted on the
    same training images the product's is (an even sample of at most 256)."""
    pick = np.unique(np.linspace(0, len(train_images) - 1, min(len(train_images), 256)).round())
    train_inputs = cached_inputs(model, train_images[pick.astype(int)], device)
    test_inputs = cached_inputs(model, test.images, device)
    runs = []
    for name, kind in FUSIONS.items():
        if not model.config.has_students and kind not in MEMORY_ONLY:
            continue
        baseline = None
        if model.config.map_baseline != "none" and kind not in ("memory-raw", "memory-reference"):
            fitted_on = f"{kind}-without-memory" if kind.endswith("-students-baseline") else kind
            train_maps, _ = fusion_maps(model, *train_inputs, fitted_on)
            baseline = torch.from_numpy(train_maps).mean(dim=0)
            if model.config.map_baseline == "mean":
                baseline = baseline_from_mean(baseline)
        maps, scores = fusion_maps(model, *test_inputs, kind, baseline)
        runs.append(dataclasses.replace(
            base, kind="fusion", rule=name, metrics=score_metrics(test, scores, maps),
        ))  # fmt: skip
        logging.info("%s %s %s: %s", base.category, base.method, name, runs[-1].metrics)
    return runs


def model_path(out: Path, category: str, variant: str, seed: int, epochs: int) -> Path:
    return out / "models" / f"{category}-{variant}-seed{seed}-{epochs}ep.pt"


def remap(
    checkpoint, category: Category, test: TestSet, device: torch.device, run: Run
) -> list[Run]:
    """Every map rule and level diagnostic of one trained model, on the hold-out `train` made."""
    config = checkpoint.config
    train_all, _, _ = load_images(category.train, config.image_size)
    train_idx, holdout_idx = split_holdout(len(train_all), config.holdout_fraction, config.seed)
    model = checkpoint.build_model().to(device)
    return evaluate_rules(model, train_all[holdout_idx], train_all[train_idx], test, device, run)


def mean_std(values: list[float | None]) -> str:
    present = [v for v in values if v is not None]
    if not present:
        return "—"
    if len(present) == 1:
        return f"{present[0]:.3f}"
    return f"{statistics.mean(present):.3f} ± {statistics.stdev(present):.3f}"


def table(runs: list[Run], keys: list[tuple[str, str, str]], columns: tuple[str, ...]) -> list[str]:
    """Rows (category, method, rule) → mean ± std over seeds of each metric column."""
    lines = []
    for category, method, rule in keys:
        group = [r for r in runs if (r.category, r.method, r.rule) == (category, method, rule)]
        if not group:
            continue
        epochs = "/".join(str(e) for e in sorted({r.epochs for r in group})) or "—"
        cells = [mean_std([r.metrics.get(k) for r in group]) for k in columns]
        lines.append(
            f"| {category} | {method} | {rule} | {epochs} | {len(group)} | {' | '.join(cells)} |"
        )
    return lines


def verdict(runs: list[Run], incumbent: str, method: str = "dskd") -> list[str]:
    """Image AUROC of every rule on every category against the incumbent default rule.

    The rule for a default (docs/design.md): at least as good on every set, where "as good"
    means a mean no lower than the incumbent's by more than the larger of the two seed stds.
    """
    categories = sorted({r.category for r in runs if r.method == method and r.kind == "rule"})
    if not categories:
        return ["(no trained DSKD model yet)"]

    def stats(category: str, rule: str) -> tuple[float, float] | None:
        values = [
            r.metrics["image_auroc"]
            for r in runs
            if (r.category, r.method, r.kind, r.rule) == (category, method, "rule", rule)
            and r.metrics["image_auroc"] is not None
        ]
        if not values:
            return None
        return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    lines = [
        f"DSKD image AUROC per category under each rule; ✓ = no worse than the incumbent "
        f"(**{incumbent}**) by more than the seeds' spread.",
        "",
        f"| rule | {' | '.join(categories)} | mean | ✓ on every set |",
        f"|---|{'---|' * len(categories)}---|---|",
    ]
    for rule in RULES:
        cells, means, ok = [], [], True
        for c in categories:
            mine, theirs = stats(c, rule), stats(c, incumbent)
            if mine is None or theirs is None:
                cells.append("—")
                ok = False
                continue
            passed = mine[0] >= theirs[0] - max(mine[1], theirs[1])
            ok &= passed
            means.append(mine[0])
            cells.append(f"{mine[0]:.3f}{' ✓' if passed else ''}")
        mean = f"{statistics.mean(means):.3f}" if means else "—"
        lines.append(f"| {rule} | {' | '.join(cells)} | {mean} | {'yes' if ok else 'no'} |")
    return lines


def markdown(runs: list[Run], header: str, incumbent: str | None = None) -> str:
    default_rule = rule_of(DSKDConfig())
    categories = sorted({r.category for r in runs})
    methods = [m for m in VARIANTS if any(r.method == m for r in runs)]
    methods += sorted({r.method for r in runs} - set(VARIANTS) - {REFERENCE})  # tiled
    metric_head = "image AUROC | pixel AUROC | AUPRO | F1-max"
    out = [header, f"Default map rule: **{default_rule}**. Mean ± std over seeds.", ""]

    out += ["### Summary: the default map rule and the training-free reference", ""]
    out += [
        f"| category | method | map | epochs | seeds | {metric_head} |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    keys = []
    for c in categories:
        keys.append((c, REFERENCE, "kNN"))
        keys += [(c, m, "product path") for m in methods]
        keys += [(c, m, default_rule) for m in methods]
    product = [dataclasses.replace(r, rule="product path") for r in runs if r.kind == "product"]
    rest = [r for r in runs if r.kind in ("rule", "reference")]
    out += table(product + rest, keys, METRIC_KEYS)

    out += ["", "### Which model may be the default", ""]
    out += model_verdict(runs, "dskd")

    out += ["", "### Which map rule may be the default", ""]
    out += verdict(runs, incumbent or default_rule)

    out += ["", "### Map rules on the same trained models", ""]
    out += [
        f"| category | method | map rule | epochs | seeds | {metric_head} |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    keys = [(c, m, rule) for c in categories for m in methods for rule in RULES]
    out += table([r for r in runs if r.kind == "rule"], keys, METRIC_KEYS)

    out += [
        "",
        "### Diagnostics: each student alone, and each student's each level alone (raw 1 − cos, blurred, max)",
        "",
    ]
    out += [
        "| category | method | level | epochs | seeds | image AUROC | pixel AUROC |",
        "|---|---|---|---|---|---|---|",
    ]
    levels = [f"{s} alone, {r}" for s in ("se", "sd") for r in ("raw sum", "standardised sum")]
    levels += [f"{s} stride {k}" for s in ("se", "sd") for k in (4, 8, 16, 32)]
    keys = [(c, m, lv) for c in categories for m in methods for lv in levels]
    diagnostics = [r for r in runs if r.kind in ("level", "student")]
    out += table(diagnostics, keys, ("image_auroc", "pixel_auroc"))

    memory = [r for r in runs if r.kind == "product" and r.memory]
    if memory:
        out += ["", "### The teacher's memory: bank and fit time", ""]
        out += [
            "| category | method | seeds | bank (patches) | of candidates | memory fit, s | "
            "fit + calibration, s |",
            "|---|---|---|---|---|---|---|",
        ]
        for c in categories:
            for m in sorted({r.method for r in memory if r.category == c}):
                group = [r for r in memory if (r.category, r.method) == (c, m)]
                banks = sorted({r.memory["bank"] for r in group})
                cands = sorted({r.memory["candidates"] for r in group})
                fit = mean_std([r.memory["fit_s"] for r in group])
                total = mean_std([r.train_s for r in group])
                out.append(
                    f"| {c} | {m} | {len(group)} | {'/'.join(map(str, banks))} | "
                    f"{'/'.join(map(str, cands))} | {fit} | {total} |"
                )
    fusion = [r for r in runs if r.kind == "fusion"]
    if fusion:
        out += ["", "### Fusion of the memory with the students (same models, diagnostics)", ""]
        out += [
            f"| category | method | fusion | epochs | seeds | {metric_head} |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        fused = sorted({r.method for r in fusion})
        keys = [(c, m, f) for c in categories for m in fused for f in FUSIONS]
        out += table(fusion, keys, METRIC_KEYS)
    return "\n".join(out) + "\n"


def model_verdict(runs: list[Run], incumbent: str) -> list[str]:
    """Image AUROC of every model (product path) on every category against the incumbent's:
    the rule for a default (docs/design.md §2), applied to models instead of map rules."""
    product = [r for r in runs if r.kind == "product" and r.metrics["image_auroc"] is not None]
    categories = sorted({r.category for r in product if r.method == incumbent})
    if not categories:
        return [f"(no {incumbent} model yet)"]

    def stats(category: str, method: str) -> tuple[float, float, int] | None:
        values = [
            r.metrics["image_auroc"]
            for r in product
            if (r.category, r.method) == (category, method)
        ]
        if not values:
            return None
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return statistics.mean(values), spread, len(values)

    lines = [
        f"Image AUROC (product path, mean ± std, seeds); ✓ = no worse than **{incumbent}** by "
        "more than the larger seed std.",
        "",
        f"| model | {' | '.join(categories)} | mean | ✓ on every set |",
        f"|---|{'---|' * len(categories)}---|---|",
    ]
    methods = [m for m in VARIANTS if any(r.method == m for r in product)]
    methods += sorted({r.method for r in product} - set(methods))
    for method in methods:
        cells, means, ok = [], [], True
        for c in categories:
            mine, theirs = stats(c, method), stats(c, incumbent)
            if mine is None or theirs is None:
                cells.append("—")
                ok = False
                continue
            passed = mine[0] >= theirs[0] - max(mine[1], theirs[1])
            ok &= passed
            means.append(mine[0])
            cells.append(f"{mine[0]:.3f} ± {mine[1]:.3f} ({mine[2]}){' ✓' if passed else ''}")
        mean = f"{statistics.mean(means):.3f}" if means else "—"
        lines.append(f"| {method} | {' | '.join(cells)} | {mean} | {'yes' if ok else 'no'} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("roots", nargs="+", help="MVTec-layout roots or categories")
    parser.add_argument("--out", default="bench/out/quality", help="folder for results.md / .json")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--variants", nargs="+", default=["dskd", "se", "sd"], choices=list(VARIANTS)
    )
    parser.add_argument(
        "--memory-sizes",
        nargs="+",
        help="bank sizes for the memory variants: patches, or N%% of the training patches "
        f"(default: the product's, {DSKDConfig.memory_size}); given, methods are named by them",
    )
    parser.add_argument(
        "--memory-samplings",
        nargs="+",
        choices=list(MEMORY_SAMPLINGS),
        help=f"default: the product's ({DSKDConfig.memory_sampling}); given, methods are named "
        "by them",
    )
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--teacher-weights", default="imagenet")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument(
        "--tile", type=int, help="train and score on full-resolution SIZE² tiles (method <v>-tileN)"
    )
    parser.add_argument("--tile-overlap", type=int, default=DSKDConfig.tile_overlap)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-reference", action="store_true", help="skip the kNN reference")
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite OUT/results.md from OUT/results.json"
    )
    parser.add_argument(
        "--incumbent",
        choices=list(RULES),
        help="the rule a candidate default is judged against (default: the current default)",
    )
    parser.add_argument(
        "--remap",
        action="store_true",
        help="recompute every map rule from the models kept in OUT/models (no training)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)
    base = DSKDConfig(
        backbone=args.backbone, teacher_weights=args.teacher_weights,
        image_size=args.tile or args.image_size, batch_size=args.batch_size, epochs=args.epochs,
        tiled=bool(args.tile), tile_overlap=args.tile_overlap if args.tile else 32,
    )  # fmt: skip
    results = out / "results.json"
    runs = [Run(**r) for r in json.loads(results.read_text())] if results.exists() else []
    header = (
        f"Backbone {args.backbone} ({args.teacher_weights}), {args.image_size}² squashed, batch "
        f"{args.batch_size}; {torch.get_num_threads()} CPU threads"
        f"{', CUDA' if device.type == 'cuda' else ''}.\n"
    )

    def save() -> None:
        results.write_text(json.dumps([vars(r) for r in runs], indent=1) + "\n")
        (out / "results.md").write_text(markdown(runs, header, args.incumbent))

    def done(category: str, seed: int, method: str, epochs: int) -> bool:
        return any(
            (r.category, r.seed, r.method, r.epochs) == (category, seed, method, epochs)
            for r in runs
        )

    if args.report_only:
        save()
        print((out / "results.md").read_text())
        return 0
    categories = [c for root in args.roots for c in discover_categories(root)]
    if args.remap:  # every rule again, from the kept models; nothing is trained
        for category in categories:
            test = load_test_set(category, args.image_size)
            for run in [r for r in runs if r.kind == "product" and r.category == category.name]:
                ckpt = model_path(out, run.category, run.method, run.seed, run.epochs)
                if not ckpt.exists():
                    logging.warning("%s: not kept, cannot remap", ckpt)
                    continue
                if run.memory:  # the rules remap the students' levels; see its fusion rows
                    continue
                same = (run.category, run.seed, run.method, run.epochs)
                runs = [
                    r for r in runs
                    if r.kind not in ("rule", "student", "level") or (r.category, r.seed, r.method, r.epochs) != same
                ]  # fmt: skip
                runs += remap(load_checkpoint(str(ckpt)), category, test, device, run)
                save()
        print((out / "results.md").read_text())
        return 0

    def product_run(
        category: Category, test: TestSet, checkpoint, method: str, seed: int, epochs: int,
        seconds: float,
    ) -> Run:  # fmt: skip
        product = evaluate_category(Scorer(checkpoint, device=args.device), category)
        run = Run(
            category.name, seed, method, epochs, "product", rule_of(checkpoint.config),
            product.metrics(), seconds, checkpoint.meta.get("memory"),
        )  # fmt: skip
        runs.append(run)
        logging.info(
            "%s %s seed %d product: %s (%.0f s)", category.name, method, seed, run.metrics, seconds
        )
        return run

    def trained(
        category: Category, test: TestSet, variant: str, seed: int, need_model: bool = False
    ) -> Path:
        """The kept model of a student variant, trained (and measured) unless measured already
        (and kept, when `need_model`)."""
        # A tiled model is its own method: its rows sit beside the untiled ones.
        method = f"{variant}-tile{args.tile}" if args.tile else variant
        ckpt = model_path(out, category.name, method, seed, args.epochs)
        if done(category.name, seed, method, args.epochs) and (ckpt.exists() or not need_model):
            return ckpt
        config = base.replace(seed=seed, **VARIANTS[variant])
        start = time.perf_counter()
        result = train(config, category.root, str(ckpt), device=args.device)
        train_s = time.perf_counter() - start
        runs[:] = [r for r in runs if (r.category, r.seed, r.method, r.epochs)
                   != (category.name, seed, method, args.epochs)]  # fmt: skip
        run = product_run(category, test, result.checkpoint, method, seed, args.epochs, train_s)
        if not args.tile:  # the diagnostics remap whole images at the model's size
            runs.extend(remap(result.checkpoint, category, test, device, run))
        save()
        return ckpt

    def with_memory(category: Category, test: TestSet, variant: str, seed: int) -> None:
        chosen = args.memory_sizes is not None or args.memory_samplings is not None
        sizes = args.memory_sizes or [str(DSKDConfig.memory_size)]
        for size, sampling in [
            (z, m) for z in sizes for m in args.memory_samplings or [DSKDConfig.memory_sampling]
        ]:
            # Named by the bank only when it was asked for: `knn` is the product's default.
            suffix = f"[{sampling} {size}]" if chosen else ""
            method = f"{variant}{suffix}"
            alone = variant == "knn"
            epochs = 0 if alone else args.epochs
            if done(category.name, seed, method, epochs):
                continue
            config = base.replace(seed=seed, **VARIANTS[variant], memory_sampling=sampling)
            config = config.replace(memory_size=bank_size(size, category, config))
            ckpt = model_path(out, category.name, method, seed, epochs)
            start = time.perf_counter()
            if alone:  # the product's own path: train() with no student fits the memory
                checkpoint = train(config, category.root, str(ckpt), device=args.device).checkpoint
            else:  # the kept students, the memory added: no second training
                students = load_checkpoint(
                    str(trained(category, test, variant.removesuffix(MEMORY_SUFFIX), seed, True))
                )
                checkpoint = add_memory(students, category.root, config, str(ckpt), args.device)
            run = product_run(
                category, test, checkpoint, method, seed, epochs, time.perf_counter() - start
            )
            if not args.tile:
                train_all, _, _ = load_images(category.train, config.image_size)
                train_idx, _ = split_holdout(len(train_all), config.holdout_fraction, seed)
                model = checkpoint.build_model().to(device)
                runs.extend(evaluate_fusions(model, train_all[train_idx], test, device, run))
            save()

    for category in categories:
        test = load_test_set(category, args.image_size)
        for seed in args.seeds:
            if not args.no_reference and not done(category.name, seed, REFERENCE, 0):
                teacher = DSKD(base.replace(students="se")).to(device).eval()
                train_all, _, _ = load_images(category.train, args.image_size)
                maps, scores = knn_maps(teacher, train_all, test.images, device, seed=seed)
                runs.append(
                    Run(
                        category.name,
                        seed,
                        REFERENCE,
                        0,
                        "reference",
                        "kNN",
                        score_metrics(test, scores, maps),
                    )
                )
                logging.info("%s reference: %s", category.name, runs[-1].metrics)
                save()
            for variant in args.variants:
                if VARIANTS[variant].get("memory") == "knn":
                    with_memory(category, test, variant, seed)
                else:
                    trained(category, test, variant, seed)
    save()
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
