"""Detection quality: DSKD against its single-student baselines and its own switches.

For each category under an MVTec-layout root, trains and evaluates every variant with the same
teacher, epochs and seeds, then writes a Markdown table and JSON. Two comparisons:
- equal epochs: every variant gets --epochs;
- equal wall time: each variant gets as many epochs as fit in the time DSKD (`both`) took,
  from its own measured seconds per epoch (two students cost more per epoch than one).
Every trained model is scored twice: with the map divided by its per-pixel mean on normal
training images (`map_baseline=mean`, the default) and with the raw map (`none`), so the table
shows what that division does to the same weights.
Nothing is chosen on test images: thresholds come from held-out normal training images.

    python bench/quality.py ../shared/data/mtd --epochs 10 --seeds 0 1 2 --out bench/out/mtd
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from dskd_ray.config import DSKDConfig
from dskd_ray.data import discover_categories
from dskd_ray.evaluate import METRIC_KEYS, evaluate_category
from dskd_ray.scoring import Scorer
from dskd_ray.train import train

# name → config changes. `both/se` is DSKD as DESIGN §1 specifies it; `sd` alone always reads the
# teacher's pyramid (there is no Se to read), so it is the Reverse-Distillation-like baseline.
VARIANTS: dict[str, dict[str, str]] = {
    "dskd (both, df=se)": {"students": "both", "df_input": "se"},
    "dskd (both, df=teacher)": {"students": "both", "df_input": "teacher"},
    "dskd (both, df=se, product)": {
        "students": "both",
        "df_input": "se",
        "level_fusion": "product",
    },
    "dskd (both, df=se, normalised)": {
        "students": "both",
        "df_input": "se",
        "map_normalization": "normal",
    },
    "dskd (both, df=teacher, normalised)": {
        "students": "both",
        "df_input": "teacher",
        "map_normalization": "normal",
    },  # fmt: skip
    "se only (≈STFPM)": {"students": "se"},
    "sd only (≈RD)": {"students": "sd", "df_input": "teacher"},
}
REFERENCE = "dskd (both, df=se)"


@dataclass
class Run:
    variant: str
    category: str
    seed: int
    epochs: int
    mode: str  # "equal-epochs" or "equal-time"
    map_baseline: str  # "mean" (map ÷ its normal mean per pixel) or "none" (raw map)
    metrics: dict[str, float | None]
    train_s: float
    s_per_epoch: float
    score_ips: float


def run_one(
    base: DSKDConfig,
    variant: str,
    category,
    seed: int,
    epochs: int,
    mode: str,
    workdir: Path,
    device: str,
) -> list[Run]:
    """Train one model, then score it with and without the per-pixel map baseline."""
    config = base.replace(seed=seed, epochs=epochs, **VARIANTS[variant])
    ckpt = workdir / f"{category.name}-{abs(hash((variant, seed, mode))) % 10**8}.pt"
    start = time.perf_counter()
    result = train(config, category.root, str(ckpt), device=device)
    train_s = time.perf_counter() - start
    ckpt.unlink(missing_ok=True)
    runs = []
    for baseline in ("mean", "none"):
        checkpoint = result.checkpoint
        checkpoint = replace(checkpoint, config=checkpoint.config.replace(map_baseline=baseline))
        scorer = Scorer(checkpoint, device=device)
        start = time.perf_counter()
        evaluated = evaluate_category(scorer, category)
        score_s = time.perf_counter() - start
        runs.append(Run(
            variant, category.name, seed, epochs, mode, baseline, evaluated.metrics(), train_s,
            train_s / epochs, evaluated.n_test / score_s,
        ))  # fmt: skip
        logging.info("%s", runs[-1])
    return runs


def mean_std(values: list[float | None]) -> str:
    present = [v for v in values if v is not None]
    if not present:
        return "—"
    if len(present) == 1:
        return f"{present[0]:.3f}"
    return f"{statistics.mean(present):.3f} ± {statistics.stdev(present):.3f}"


def markdown(runs: list[Run], mode: str) -> str:
    rows = [r for r in runs if r.mode == mode]
    lines = [
        "| variant | map | category | epochs | seeds | image AUROC | pixel AUROC | AUPRO | F1-max | train s (fastest) | score img/s (best) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    keys = sorted(
        {(r.variant, r.map_baseline, r.category) for r in rows},
        key=lambda k: (k[2], k[1] != "mean", list(VARIANTS).index(k[0])),
    )
    for variant, baseline, category in keys:
        group = [
            r for r in rows
            if (r.variant, r.map_baseline, r.category) == (variant, baseline, category)
        ]  # fmt: skip
        cells = [mean_std([r.metrics[k] for r in group]) for k in METRIC_KEYS]
        epochs = sorted({r.epochs for r in group})
        lines.append(
            f"| {variant} | {'÷ normal mean' if baseline == 'mean' else 'raw'} | {category} | "
            f"{'/'.join(map(str, epochs))} | {len(group)} | {' | '.join(cells)} | "
            f"{min(r.train_s for r in group):.0f} | {max(r.score_ips for r in group):.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("root", help="MVTec-layout root (or one category)")
    parser.add_argument(
        "--out", default="bench/out/quality", help="folder for results.md / results.json"
    )
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--teacher-weights", default="imagenet")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--no-equal-time", action="store_true", help="skip the equal-wall-time runs"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the runs already in OUT/results.json and add only the missing ones",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = DSKDConfig(
        backbone=args.backbone, teacher_weights=args.teacher_weights,
        image_size=args.image_size, batch_size=args.batch_size,
    )  # fmt: skip
    runs: list[Run] = []
    if args.resume and (out / "results.json").exists():
        runs = [Run(**r) for r in json.loads((out / "results.json").read_text())]
        logging.info("resuming: %d runs already in %s", len(runs), out / "results.json")

    def done(variant: str, category: str, seed: int, mode: str, epochs: int | None = None) -> bool:
        return any(
            (r.variant, r.category, r.seed, r.mode) == (variant, category, seed, mode)
            and (epochs is None or r.epochs == epochs)
            for r in runs
        )

    def save() -> None:
        (out / "results.json").write_text(json.dumps([vars(r) for r in runs], indent=2) + "\n")
        header = (
            f"Backbone {args.backbone} ({args.teacher_weights}), {args.image_size}², batch "
            f"{args.batch_size}; {torch.get_num_threads()} CPU threads"
            f"{', CUDA' if torch.cuda.is_available() else ''}. Mean ± std over seeds.\n"
        )
        text = f"{header}\n### Equal epochs ({args.epochs})\n\n{markdown(runs, 'equal-epochs')}\n"
        if any(r.mode == "equal-time" for r in runs):
            text += (
                f"\n### Equal wall time (DSKD's fastest {args.epochs}-epoch training)\n\n"
                f"{markdown(runs, 'equal-time')}\n"
            )
        (out / "results.md").write_text(text)

    for category in discover_categories(args.root):
        for seed in args.seeds:
            for variant in args.variants:
                if done(variant, category.name, seed, "equal-epochs", args.epochs):
                    continue
                runs += run_one(
                    base, variant, category, seed, args.epochs, "equal-epochs", out, args.device
                )
                save()
        if args.no_equal_time or REFERENCE not in args.variants:
            continue
        # Minima, not means: on a shared machine a run can only be slowed down by others.
        budget = min(
            r.train_s
            for r in runs
            if (r.variant, r.category, r.mode) == (REFERENCE, category.name, "equal-epochs")
        )
        for seed in args.seeds:
            for variant in args.variants:
                same = [
                    r for r in runs
                    if (r.variant, r.category, r.seed, r.mode) == (variant, category.name, seed, "equal-epochs")
                ]  # fmt: skip
                if done(variant, category.name, seed, "equal-time"):
                    continue
                if variant == REFERENCE:
                    runs += [Run(**{**vars(r), "mode": "equal-time"}) for r in same]
                    continue
                per_epoch = min(
                    r.s_per_epoch
                    for r in runs
                    if (r.variant, r.category, r.mode) == (variant, category.name, "equal-epochs")
                )
                epochs = max(1, round(budget / per_epoch))
                if epochs == args.epochs:  # the same run as its equal-epochs one
                    runs += [Run(**{**vars(r), "mode": "equal-time"}) for r in same]
                    continue
                runs += run_one(
                    base, variant, category, seed, epochs, "equal-time", out, args.device
                )
                save()
    save()
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
