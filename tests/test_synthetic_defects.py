"""Synthetic defects for denoising students: where they go, what they leave alone, and that a
step's defects are a pure function of its key."""

import pytest
import torch

from dskd_ray.training.synthetic_defects import (
    defect_generator,
    perlin_masks,
    perlin_noise,
    rectangle_masks,
    synthesize_defects,
)

CPU = torch.device("cpu")


def batch(b: int = 8, size: int = 64) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.rand(b, 3, size, size) * 0.5 + 0.25


@pytest.mark.parametrize(
    ("share", "b", "corrupted"), [(0.5, 8, 4), (1.0, 8, 8), (0.25, 6, 2), (0.0, 8, 0)]
)
def test_defects_cover_the_intended_share_and_touch_nothing_else(
    share: float, b: int, corrupted: int
) -> None:
    images = batch(b)
    out, masks = synthesize_defects(images, share, defect_generator(0, 1, 1, 0, CPU))
    hit = masks.flatten(1).amax(dim=1) > 0
    assert int(hit.sum()) == corrupted  # round(share · B) images, each with a non-empty mask
    assert torch.equal(out[~hit], images[~hit])  # the others are the clean images
    outside = (masks == 0).unsqueeze(1).expand_as(images)
    assert torch.equal(out[outside], images[outside])  # and nothing outside a mask changes
    changed = (out != images).any(dim=1)  # (B, S, S)
    assert changed[hit].any(dim=(1, 2)).all()  # every corrupted image did change
    assert out.min() >= 0 and out.max() <= 1


def test_a_steps_defects_are_a_pure_function_of_seed_epoch_step_and_rank() -> None:
    images = batch()
    first = synthesize_defects(images, 0.5, defect_generator(3, 2, 7, 0, CPU))
    again = synthesize_defects(images, 0.5, defect_generator(3, 2, 7, 0, CPU))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    for key in [(3, 2, 8, 0), (3, 3, 7, 0), (4, 2, 7, 0), (3, 2, 7, 1)]:
        other = synthesize_defects(images, 0.5, defect_generator(*key, CPU))
        assert not torch.equal(first[1], other[1]), key


def test_perlin_noise_is_smooth_and_masks_are_blobs_of_a_plausible_size() -> None:
    generator = defect_generator(0, 0, 0, 0, CPU)
    noise = perlin_noise(4, 64, 4, 4, generator)
    assert noise.shape == (4, 64, 64) and noise.abs().max() <= 1.5
    assert (noise[:, :, 1:] - noise[:, :, :-1]).abs().max() < 0.3  # gradient noise, not white
    masks = perlin_masks(64, 64, generator)
    area = masks.mean(dim=(1, 2))
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    assert 0.01 < float(area.mean()) < 0.3
    rectangles = rectangle_masks(64, 64, generator).mean(dim=(1, 2))
    assert rectangles.min() >= 0.01 and rectangles.max() <= 0.16  # CutPaste's 2-15%, rounded
