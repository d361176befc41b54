"""The memory's weight picked from synthetic defects (docs/design.md §2, "The memory's weight"):
the member that sees the defects gets the weight, the checkpoint keeps it, every path scores
with it, and a weight given by hand or an older checkpoint's stays as it was."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import memory_config
from dskd_ray.config import DSKDConfig
from dskd_ray.errors import ConfigError
from dskd_ray.model.checkpoint import MODEL_ID_FIELDS, _content_hash, load_checkpoint
from dskd_ray.model.inputs import images_to_tensor
from dskd_ray.training.loop import train
from dskd_ray.training.memory_weight import WEIGHTS, fit_memory_weight, weight_key


class _Members(torch.nn.Module):
    """A model as fit_memory_weight sees it (members, config, memory), whose members are known:
    a detector of any change from the one normal image, or noise that ignores the image."""

    def __init__(self, reference: torch.Tensor, memory_sees: bool) -> None:
        super().__init__()
        self.config = DSKDConfig(image_size=64, blur_sigma=1.0, seed=3)
        self.memory = torch.nn.Identity()  # not None: the model has a memory
        self.reference, self.memory_sees = reference, memory_sees
        self.noise = torch.Generator().manual_seed(0)

    def members(self, x: torch.Tensor) -> list[torch.Tensor]:
        detector = (x - self.reference).abs().mean(dim=1)
        noise = [torch.rand(detector.shape, generator=self.noise) for _ in range(2)]
        if self.memory_sees:
            return [*noise, detector]
        return [detector, detector, noise[0]]


@pytest.mark.parametrize("memory_sees", [True, False])
def test_the_member_that_sees_synthetic_defects_gets_the_weight(memory_sees: bool) -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    normal = np.repeat(image[None], 6, axis=0)
    model = _Members(images_to_tensor(image[None], "cpu"), memory_sees)
    record = fit_memory_weight(model, normal, normal, torch.device("cpu"), batch_size=4)
    assert [row["weight"] for row in record["table"]] == list(WEIGHTS)
    # The most toward it that still finds every defect, and no further from ½: where several
    # weights separate them all, the one nearest ½ is kept.
    chosen = record["chosen"]
    assert chosen == model.config.memory_weight
    by_weight = {row["weight"]: row for row in record["table"]}
    assert by_weight[chosen]["image_auroc"] == 1.0 > by_weight[0.5]["image_auroc"]
    assert chosen > 0.5 if memory_sees else chosen < 0.5
    assert all(
        row["image_auroc"] < 1
        for row in record["table"]
        if abs(row["weight"] - 0.5) < abs(chosen - 0.5)
    )
    seen = by_weight[record["chosen"]]
    blind = by_weight[0.0 if memory_sees else 1.0]  # noise alone: about chance
    assert seen["pixel_auroc"] > 0.95 and blind["pixel_auroc"] < 0.7
    assert record["inputs"] == 6 and record["by"] == "synthetic defects"


def test_the_ranking_is_image_auroc_then_nearness_to_a_half_then_pixel_auroc() -> None:
    rows = [(0.9, 0.99, 0.2), (0.9, 0.80, 0.7), (0.9, 0.85, 0.3), (0.8, 0.99, 0.5)]
    assert max(rows, key=lambda r: weight_key(*r)) == (0.9, 0.85, 0.3)
    # Equal AUROCs computed with float noise tie, and ½'s neighbourhood wins.
    assert weight_key(0.9 + 1e-12, 0.99, 0.1) < weight_key(0.9, 0.8, 0.4)


def _config(**changes: object) -> DSKDConfig:
    # Half held out: the weight pick needs at least MIN_HELD_OUT images.
    return memory_config(**{"holdout_fraction": 0.5, **changes})


def test_training_keeps_the_picked_weight_and_its_table(textures: Path, tmp_path: Path) -> None:
    ckpt = train(_config(), str(textures), str(tmp_path / "m.pt"), device="cpu").checkpoint
    record = ckpt.meta["memory_weight"]
    assert ckpt.config.memory_weight == record["chosen"] in WEIGHTS
    assert ckpt.config.memory_weight_fit == "synthetic" and record["held_out"] == 5
    best = max(record["table"], key=lambda r: weight_key(r["image_auroc"], r["pixel_auroc"], r["weight"]))  # fmt: skip
    assert best["weight"] == record["chosen"]
    # The id names what the model computes: it hashes the picked weight, and loading verifies it.
    loaded = load_checkpoint(tmp_path / "m.pt")
    assert loaded.config == ckpt.config and loaded.model_id == ckpt.model_id
    # The baseline and threshold were fitted on maps of the picked weight: scoring the
    # held-out images again gives the threshold's normal scores.
    model = loaded.build_model()
    from dskd_ray.io.data import load_images
    from dskd_ray.training.dataset import plan_training

    holdout, _, _ = load_images(plan_training(str(textures), ckpt.config).holdout_uris, 64)
    _, scores = model.predict(images_to_tensor(holdout, "cpu"))
    np.testing.assert_allclose(
        sorted(scores.tolist()), sorted(ckpt.threshold.normal_scores), rtol=1e-5
    )


def test_a_weight_given_by_hand_is_kept(textures: Path, tmp_path: Path) -> None:
    config = _config(memory_weight=0.3, memory_weight_fit="none")
    ckpt = train(config, str(textures), str(tmp_path / "m.pt"), device="cpu").checkpoint
    assert ckpt.config.memory_weight == 0.3 and "memory_weight" not in ckpt.meta


@pytest.mark.parametrize("holdout_fraction", [0.0, 0.4])
def test_with_too_few_held_out_images_the_weight_stays_and_the_log_says_so(
    holdout_fraction: float, textures: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = _config(holdout_fraction=holdout_fraction)
    ckpt = train(config, str(textures), str(tmp_path / "m.pt"), device="cpu").checkpoint
    assert ckpt.config.memory_weight == 0.5 and "memory_weight" not in ckpt.meta
    held_out = round(10 * holdout_fraction)
    assert (
        f"{held_out} held-out normal image(s), too few to pick the memory's weight from "
        "(5 at least): it stays 0.5"
    ) in caplog.text


def test_a_format_5_checkpoint_keeps_its_weight_and_its_id(textures: Path, tmp_path: Path) -> None:
    """/5 was written before the pick: it loads as a fixed weight, and scores as before."""
    ckpt = train(_config(), str(textures), str(tmp_path / "m.pt"), device="cpu").checkpoint
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    config = {k: v for k, v in payload["config"].items() if k != "memory_weight_fit"}
    meta = json.loads(payload["meta"])
    assert meta["network_id"] == _content_hash(config, MODEL_ID_FIELDS, payload["state_dict"])
    meta["model_id"] = meta.pop("network_id")  # what a /5 file stated: the network's id
    v5 = {**payload, "format": "dskd_ray.checkpoint/5", "config": config, "meta": json.dumps(meta)}
    torch.save(v5, tmp_path / "v5.pt")
    old = load_checkpoint(tmp_path / "v5.pt")
    assert old.config.memory_weight_fit == "none" and old.model_id == ckpt.model_id
    assert old.config.memory_weight == ckpt.config.memory_weight


def test_an_unknown_weight_fit_is_refused() -> None:
    with pytest.raises(ConfigError, match="memory_weight_fit='best' is not one of synthetic, none"):
        DSKDConfig(memory_weight_fit="best")


def test_the_cli_takes_a_weight_or_auto_and_refuses_the_rest_in_one_line(
    textures: Path, tmp_path: Path
) -> None:
    train_ = [sys.executable, "-m", "dskd_ray.cli", "train", str(textures), "--teacher-weights",
              "random", "--image-size", "64", "--backbone", "resnet18", "--epochs", "1",
              "--memory-size", "150", "--holdout-fraction", "0.5"]  # fmt: skip
    fixed = subprocess.run([*train_, "--out", str(tmp_path / "a.pt"), "--memory-weight", "0.3"],
                           capture_output=True, text=True, timeout=600)  # fmt: skip
    assert fixed.returncode == 0, fixed.stderr
    config = load_checkpoint(tmp_path / "a.pt").config
    assert (config.memory_weight, config.memory_weight_fit) == (0.3, "none")
    for bad in ("1.5", "best", "nan"):
        refused = subprocess.run([*train_, "--out", str(tmp_path / "b.pt"), "--memory-weight", bad],
                                 capture_output=True, text=True, timeout=600)  # fmt: skip
        assert refused.returncode == 2 and refused.stderr.strip() == (  # a bad flag: exit 2
            f"dskd: error: Invalid value for '--memory-weight': '{bad}' must be a number from 0 "
            "to 1, or auto (see 'python -m dskd_ray.cli train --help')"
        )
    assert not (tmp_path / "b.pt").exists()
    auto = subprocess.run([*train_, "--out", str(tmp_path / "c.pt"), "--memory-weight", "auto"],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert auto.returncode == 0, auto.stderr
    picked = load_checkpoint(tmp_path / "c.pt").meta["memory_weight"]
    at = {row["weight"]: row["image_auroc"] for row in picked["table"]}
    assert (
        f"memory weight {picked['chosen']:g}, picked by synthetic defects in 5 held-out images "
        f"(image AUROC {at[picked['chosen']]:.3f}; {at[0.5]:.3f} at 0.5)"
    ) in auto.stdout.splitlines()
