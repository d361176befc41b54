"""The memory's weight on trained models: what the synthetic-defect pick chose against every
weight of the grid, on the held-out synthetic defects and on the real test set.

For each `CHECKPOINT=DATA` (a DSKD + memory checkpoint and the category it was trained on):
the members (each student's map, the memory's) on a baseline sample of training images, the
clean hold-out (the run's own split), the hold-out with synthetic defects (the product's
generator, `DRAWS` each) and the test set; then for each weight the fused map as the product
makes it (weighted sum, blur, per-pixel mean subtracted) and its image / pixel AUROC on both.
Shows whether the pick (image AUROC, then pixel AUROC, on synthetic defects) lands where the
test set would have put it. No training; about a minute per category on 2 CPU cores.

    python bench/memory_weight.py out.json "bench/out/mtd/models/mtd-dskd+knn-seed0-10ep.pt=/data/mtd"
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import load_test_set, score_metrics  # noqa: E402

from dskd_ray.evaluation import metrics  # noqa: E402
from dskd_ray.io.data import discover_categories, load_images  # noqa: E402
from dskd_ray.model.anomaly_map import gaussian_blur, image_score  # noqa: E402
from dskd_ray.model.checkpoint import load_checkpoint  # noqa: E402
from dskd_ray.model.inputs import images_to_tensor  # noqa: E402
from dskd_ray.training.calibration import baseline_sample  # noqa: E402
from dskd_ray.training.dataset import plan_training  # noqa: E402
from dskd_ray.training.memory_weight import DRAWS, WEIGHTS, weight_key  # noqa: E402
from dskd_ray.training.synthetic_defects import synthesize_defects  # noqa: E402

DEVICE = torch.device("cpu")


@torch.inference_mode()
def members(model, images, batch: int = 16) -> torch.Tensor:  # noqa: ANN001
    """(M, N, H, W): each member's map of every image."""
    out = []
    for start in range(0, len(images), batch):
        x = images[start : start + batch]
        x = x if torch.is_tensor(x) else images_to_tensor(np.asarray(x), DEVICE)
        out.append(torch.stack(model.members(x)))
    return torch.cat(out, dim=1)


def fused(m: torch.Tensor, w: float, sigma: float, base: torch.Tensor | None) -> torch.Tensor:
    coefficients = [(1 - w) / (len(m) - 1)] * (len(m) - 1) + [w]
    maps = gaussian_blur(sum(c * x for c, x in zip(coefficients, m, strict=True)), sigma)
    if base is not None:
        b = gaussian_blur(sum(c * x for c, x in zip(coefficients, base, strict=True)), sigma)
        maps = (maps - b.mean(0)).clamp_min(0)
    return maps


def category_of(data: str):  # noqa: ANN201
    root = Path(data)
    if (root / "test").is_dir():
        return discover_categories(data)[0]
    return next(c for c in discover_categories(str(root.parent)) if c.name == root.name)


def main(out: Path, specs: list[str]) -> None:
    rows = json.loads(out.read_text()) if out.exists() else []
    for spec in specs:
        path, data = spec.split("=", 1)
        checkpoint = load_checkpoint(path)
        model, cfg = checkpoint.build_model().to(DEVICE).eval(), checkpoint.config
        plan = plan_training(data, cfg)
        holdout, _, _ = load_images(plan.holdout_uris, cfg.image_size)
        pick = baseline_sample(len(plan.train_uris), 64)
        base_images, _, _ = load_images([plan.train_uris[i] for i in pick], cfg.image_size)
        test = load_test_set(category_of(data), cfg.image_size)
        clean = images_to_tensor(np.asarray(holdout), DEVICE)
        generator = torch.Generator().manual_seed(1234)
        drawn = [synthesize_defects(clean, 1.0, generator) for _ in range(DRAWS)]
        synthetic, masks = torch.cat([d[0] for d in drawn]), torch.cat([d[1] for d in drawn])
        base = members(model, base_images) if cfg.map_baseline != "none" else None
        mc, ms, mt = members(model, clean), members(model, synthetic), members(model, test.images)
        table = []
        for w in WEIGHTS:
            fc, fs, ft = (fused(m, w, cfg.blur_sigma, base) for m in (mc, ms, mt))
            sc, ss = image_score(fc, cfg.score_top_k), image_score(fs, cfg.score_top_k)
            labels = np.r_[np.zeros(len(sc)), np.ones(len(ss))]
            real = score_metrics(test, image_score(ft, cfg.score_top_k).numpy(), ft.numpy(), False)
            table.append({
                "model": Path(path).name, "w": w, "picked_in_product": cfg.memory_weight,
                "syn_image": float(metrics.image_auroc(labels, torch.cat([sc, ss]).numpy())),
                "syn_pixel": float(metrics.pixel_auroc(masks.numpy() > 0.5, fs.numpy())),
                "test_image": real["image_auroc"], "test_pixel": real["pixel_auroc"],
            })  # fmt: skip
        pick_row = max(table, key=lambda r: weight_key(r["syn_image"], r["syn_pixel"], r["w"]))
        half = next(r for r in table if r["w"] == 0.5)
        best = max(table, key=lambda r: r["test_image"])
        print(
            f"{Path(path).name}: ½ {half['test_image']:.3f} / {half['test_pixel']:.3f}; pick "
            f"w={pick_row['w']:.1f} {pick_row['test_image']:.3f} / {pick_row['test_pixel']:.3f}; "
            f"best in hindsight w={best['w']:.1f} {best['test_image']:.3f}", flush=True,
        )  # fmt: skip
        rows.extend(table)
        out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
