"""Shared fixtures: small generated images and tiny configs, so tests run on 2 cores."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dskd_ray.config import DSKDConfig

torch.set_num_threads(2)


def write_textures(folder: Path, n: int, size: int = 64, seed: int = 0, fmt: str = "png") -> list[Path]:
    """n smooth random textures (normal images)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        phase = rng.uniform(0, 2 * np.pi, 3)
        img = np.stack(
            [0.5 + 0.3 * np.sin(2 * np.pi * 4 * (xx + yy) + p) for p in phase], axis=-1
        ) + rng.normal(0, 0.03, (size, size, 3))
        path = folder / f"{i:03d}.{fmt}"
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture
def tiny_config() -> DSKDConfig:
    return DSKDConfig(
        backbone="resnet18",
        teacher_weights="random",
        image_size=64,
        epochs=2,
        batch_size=4,
        holdout_fraction=0.25,
    )


@pytest.fixture
def normal_folder(tmp_path: Path) -> Path:
    write_textures(tmp_path / "normal", 8)
    return tmp_path / "normal"


@pytest.fixture(autouse=True)
def _quiet_random_teacher_warning(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dskd_ray")
