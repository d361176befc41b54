"""What the drift figure (`dskd_ray.nightly.drift`) gives on normal nights and on nights after a lighting
change, on the demo data: the measurement behind `WARN_SHIFT` (docs/design.md §6, Drift).

For each demo category's trained model (`dskd demo` writes them), a "night" is N normal images
the model never saw (rendered with another seed), scored with the product's `Scorer`:

  normal            as rendered
  normal + defects  the same with 10% of them replaced by defective images
  gain ×G           every pixel × G (a brighter lamp, a longer exposure), clipped
  offset +O         every pixel + O grey levels

It prints the median shift (in calibration IQRs) and, for comparison, the share of the night
over the threshold and the two-sample KS statistic against the calibration scores.

    python bench/drift.py dskd-demo/models --images 48
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from dskd_ray.demo.data import DEMO_CATEGORIES, DEMO_DEFECTS, render_sample
from dskd_ray.inference.scoring import Scorer
from dskd_ray.model.checkpoint import load_checkpoint
from dskd_ray.nightly.drift import score_drift


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    grid = np.sort(np.concatenate([a, b]))
    cdf_a = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    cdf_b = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.max(np.abs(cdf_a - cdf_b)))


def nights(category: str, n: int, seed: int, size: int) -> dict[str, np.ndarray]:
    normal = np.stack(
        [render_sample(category, seed=seed, split="night", index=i, image_size=size).image
         for i in range(n)]
    )  # fmt: skip
    defects = DEMO_DEFECTS[category]
    with_defects = normal.copy()
    for j in range(max(1, n // 10)):
        defect = defects[j % len(defects)]
        with_defects[j] = render_sample(
            category, defect, seed=seed, split="night", index=j, image_size=size
        ).image
    as_float = normal.astype(np.float32)
    made = {"normal": normal, "normal + 10% defects": with_defects}
    for gain in (1.05, 1.1, 1.2, 1.3):
        made[f"gain x{gain:g}"] = np.clip(as_float * gain, 0, 255).astype(np.uint8)
    made["gain x0.8"] = np.clip(as_float * 0.8, 0, 255).astype(np.uint8)
    for offset in (10, 25):
        made[f"offset +{offset}"] = np.clip(as_float + offset, 0, 255).astype(np.uint8)
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", type=Path, help="folder of <category>.pt (dskd demo's models/)")
    parser.add_argument("--images", type=int, default=48, help="images per night")
    parser.add_argument("--seed", type=int, default=101, help="render seed: not the training one")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    rows = []
    print(f"{'category':14} {'night':22} {'shift':>7} {'over thr':>8} {'KS':>5}")
    for category in DEMO_CATEGORIES:
        path = args.models / f"{category}.pt"
        if not path.exists():
            print(f"{category}: no {path}", file=sys.stderr)
            continue
        ckpt = load_checkpoint(path)
        scorer = Scorer(ckpt, device="cpu", batch_size=8)
        normal_scores = ckpt.threshold.normal_scores
        size = ckpt.config.image_size
        for name, images in nights(category, args.images, args.seed, size).items():
            scores = scorer.score_batch(images).scores
            drift = score_drift(scores, normal_scores, ckpt.threshold.value)
            ks = ks_statistic(np.asarray(scores, np.float64), np.asarray(normal_scores))
            rows.append({"category": category, "night": name, "ks": ks, **drift.to_dict()})
            print(
                f"{category:14} {name:22} {drift.median_shift:7.2f} "
                f"{drift.above_threshold:8.0%} {ks:5.2f}",
                flush=True,
            )
        print(
            f"{category:14} calibration: {len(normal_scores)} held-out scores, median "
            f"{drift.calibration_median:.4g}, IQR {drift.calibration_iqr:.4g}, threshold "
            f"{ckpt.threshold.value:.4g}"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
