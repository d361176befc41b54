"""The scoring core's fast path against the plain fp32 path."""

import numpy as np
import pytest

from dskd_ray.config import DSKDConfig
from dskd_ray.errors import ConfigError
from dskd_ray.inference.scoring import Scorer
from dskd_ray.model.checkpoint import make_checkpoint
from dskd_ray.model.network import DSKD


@pytest.mark.parametrize("students", ["both", "se", "sd"])
def test_channels_last_scores_like_the_plain_path(tiny_config: DSKDConfig, students: str) -> None:
    checkpoint = make_checkpoint(DSKD(tiny_config.replace(students=students)))
    images = np.random.default_rng(3).integers(0, 255, (5, 64, 64, 3), dtype=np.uint8)
    plain = Scorer(checkpoint, device="cpu", batch_size=2, channels_last=False)
    fast = Scorer(checkpoint, device="cpu", batch_size=2)
    assert fast.channels_last and not plain.channels_last
    a, b = plain.score_batch(images), fast.score_batch(images)
    np.testing.assert_allclose(b.scores, a.scores, atol=1e-3, rtol=0)
    np.testing.assert_allclose(b.maps, a.maps, atol=1e-3, rtol=0)
    # Not trivially equal: different images give different scores through the same path.
    assert np.ptp(a.scores) > 1e-3


def test_unknown_precision_is_a_clear_error(tiny_config: DSKDConfig) -> None:
    with pytest.raises(ConfigError, match="precision='fp16' is not one of fp32, bf16"):
        Scorer(make_checkpoint(DSKD(tiny_config)), device="cpu", precision="fp16")


def test_compiled_model_scores_like_the_plain_path(tiny_config: DSKDConfig) -> None:
    checkpoint = make_checkpoint(DSKD(tiny_config.replace(students="se")))
    images = np.random.default_rng(4).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)
    plain = Scorer(checkpoint, device="cpu", channels_last=False).score_batch(images)
    compiled = Scorer(checkpoint, device="cpu", compile=True).score_batch(images)
    np.testing.assert_allclose(compiled.scores, plain.scores, atol=1e-3, rtol=0)
