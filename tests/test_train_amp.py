"""The GPU path's options of the shared epoch step (bf16 autocast, channels_last inputs),
exercised on CPU: CPU autocast supports bfloat16 too (slowly), so one small step runs here."""

from __future__ import annotations

import numpy as np
import torch

from dskd_ray.config import DSKDConfig
from dskd_ray.model.network import DSKD
from dskd_ray.training.loop import make_optimizer, run_epoch


def test_bf16_autocast_and_channels_last_step_trains_the_students_only(
    tiny_config: DSKDConfig,
) -> None:
    config = tiny_config.replace(students="se", batch_size=2)  # the cheapest student
    torch.manual_seed(0)
    model = DSKD(config).to(memory_format=torch.channels_last)
    teacher_before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    students_before = [p.clone() for p in model.student_parameters()]
    optimizer = make_optimizer(model, config)
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (2, 64, 64, 3), np.uint8))
    stats = run_epoch(
        model, optimizer, None, images, np.arange(2), config, torch.device("cpu"),
        autocast_dtype=torch.bfloat16, channels_last=True,
    )  # fmt: skip
    assert np.isfinite(stats.loss) and 0 < stats.loss < 6  # 3 levels × (1 − cos) ∈ [0, 6]
    after = model.student_parameters()
    assert any(not torch.equal(a, b) for a, b in zip(students_before, after, strict=True))
    assert all(p.dtype == torch.float32 for p in model.student_parameters())  # fp32 master weights
    for key, value in model.teacher.state_dict().items():
        assert torch.equal(value, teacher_before[key]), key
