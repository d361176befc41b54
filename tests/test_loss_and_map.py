import math

import pytest
import torch
import torch.nn.functional as F

from dskd_ray.model.anomaly_map import (
    anomaly_map,
    fuse_levels,
    gaussian_blur,
    gaussian_kernel1d,
    image_score,
    level_maps,
    level_moments,
    level_statistics,
)
from dskd_ray.model.loss import EASY_GRADIENT_SCALE, distillation_loss


def test_loss_matches_hand_computation() -> None:
    # One pixel, two channels: T = (1, 0); S = (0, 1) → cos 0 → 1; S = (1, 1) → cos 1/√2.
    t = [torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)]
    se = [torch.tensor([0.0, 1.0]).view(1, 2, 1, 1)]
    sd = [torch.tensor([1.0, 1.0]).view(1, 2, 1, 1)]
    loss = distillation_loss(t, {"se": se, "sd": sd})
    assert loss.item() == pytest.approx(1.0 + (1 - 1 / math.sqrt(2)), abs=1e-6)


def test_loss_averages_over_pixels_and_sums_levels() -> None:
    t1 = torch.tensor([[1.0, 1.0], [0.0, 0.0]]).view(1, 2, 1, 2)  # pixels (1,0), (1,0)
    s1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 2, 1, 2)  # pixels (1,0), (0,1)
    t2 = torch.ones(1, 3, 2, 2)
    loss = distillation_loss([t1, t2], {"se": [s1, -t2]}, form="pixel")
    # Level 1: mean(0, 1) = 0.5; level 2: opposite vectors → 2 everywhere.
    assert loss.item() == pytest.approx(0.5 + 2.0, abs=1e-6)


def test_flat_loss_is_reverse_distillations_cosine_of_whole_level_maps() -> None:
    torch.manual_seed(0)
    teacher = [torch.randn(3, 4, 5, 5), torch.randn(3, 6, 2, 2)]
    students = {name: [t + torch.randn_like(t) for t in teacher] for name in ("se", "sd")}

    def reference(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        # RD4AD's loss_function: 1 − cos of each sample's flattened map, mean over the batch.
        return torch.mean(1 - F.cosine_similarity(t.view(t.shape[0], -1), s.view(s.shape[0], -1)))

    want = sum(reference(t, s) for p in students.values() for t, s in zip(teacher, p, strict=True))
    got = distillation_loss(teacher, students, form="flat")
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    # Not the per-pixel mean: the two forms differ on the same features.
    assert abs(distillation_loss(teacher, students, form="pixel").item() - got.item()) > 1e-2
    assert distillation_loss(teacher, students).item() == got.item()  # flat is the default


@pytest.mark.parametrize("form", ["pixel", "flat"])
def test_hard_mining_scales_the_easy_positions_gradients_and_not_the_loss(form: str) -> None:
    torch.manual_seed(0)
    t = torch.randn(2, 8, 6, 6)
    s0 = t + torch.randn(2, 8, 6, 6) * torch.rand(2, 1, 6, 6)  # some positions easy, some hard

    def grad(share: float) -> tuple[torch.Tensor, torch.Tensor]:
        s = s0.clone().requires_grad_(True)
        loss = distillation_loss([t], {"se": [s]}, form=form, hard_share=share)
        loss.backward()
        return loss.detach(), s.grad

    plain_loss, plain = grad(0.0)
    mined_loss, mined = grad(0.75)
    assert mined_loss == plain_loss  # the value is the same; only the gradients change
    distance = 1 - F.cosine_similarity(t, s0, dim=1)  # (2, 6, 6)
    easy = distance <= distance.flatten().kthvalue(54).values  # 75% of 72 positions
    assert int(easy.sum()) == 54
    ratio = mined / plain  # (2, 8, 6, 6); every channel of a position scaled alike
    assert torch.allclose(ratio.permute(0, 2, 3, 1)[easy], torch.tensor(EASY_GRADIENT_SCALE))
    assert torch.allclose(ratio.permute(0, 2, 3, 1)[~easy], torch.tensor(1.0))


def test_l2_distance_is_the_mean_squared_difference_over_channels() -> None:
    t = torch.tensor([1.0, 2.0, 0.0]).view(1, 3, 1, 1)
    s = torch.tensor([0.0, 0.0, 3.0]).view(1, 3, 1, 1)
    levels = level_maps({"teacher": [t, 2 * t], "sd": [s, t]}, distance="l2")
    assert levels["sd"][0].item() == pytest.approx((1 + 4 + 9) / 3)
    assert levels["sd"][1].item() == pytest.approx((1 + 4 + 0) / 3)
    # The loss is the same quantity's mean; magnitude counts, where cosine would see 0 for 2t.
    loss = distillation_loss([2 * t], {"sd": [t]}, distance="l2")
    assert loss.item() == pytest.approx(5 / 3)
    # Over a flattened map the mean squared difference is the per-pixel mean: one loss.
    torch.manual_seed(0)
    tm, sm = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    pixel = distillation_loss([tm], {"sd": [sm]}, form="pixel", distance="l2")
    assert distillation_loss([tm], {"sd": [sm]}, form="flat", distance="l2").item() == pixel.item()
    assert pixel.item() == pytest.approx((tm - sm).pow(2).mean().item(), rel=1e-6)
    assert distillation_loss([2 * t], {"sd": [t]}).item() == pytest.approx(0.0, abs=1e-7)


def test_fuse_levels_upsamples_and_fuses_levels() -> None:
    t = [torch.ones(1, 2, 2, 2), torch.ones(1, 2, 1, 1)]
    s = [torch.ones(1, 2, 2, 2), torch.ones(1, 2, 1, 1)]
    s[0][0, :, 0, 0] = torch.tensor([1.0, -1.0])  # cos 0 at one pixel of level 1 → 1
    s[1][0] = -1  # level 2: opposite everywhere → 2
    levels = level_maps({"teacher": t, "se": s})
    summed = fuse_levels(levels, (4, 4), "sum")
    product = fuse_levels(levels, (4, 4), "product")
    assert summed.shape == (1, 4, 4)
    # Level 2 is a constant 2; level 1 upsampled bilinearly is 1 at its top-left corner pixel.
    assert summed[0, 0, 0].item() == pytest.approx(3.0)
    assert summed[0, 3, 3].item() == pytest.approx(2.0)
    assert product[0, 0, 0].item() == pytest.approx(2.0)
    assert product[0, 3, 3].item() == pytest.approx(0.0, abs=1e-6)


def test_fuse_levels_standardises_each_student_and_level_by_its_own_statistics() -> None:
    levels = {"se": [torch.full((1, 2, 2), 3.0), torch.full((1, 2, 2), 5.0)],
              "sd": [torch.full((1, 2, 2), 7.0), torch.full((1, 2, 2), 9.0)]}  # fmt: skip
    location = torch.tensor([[1.0, 2.0, 0.0], [3.0, 4.0, 0.0]])
    spread = torch.tensor([[2.0, 3.0, 1.0], [4.0, 5.0, 1.0]])
    fused = fuse_levels(levels, (2, 2), "sum", location, spread)
    # se: (3−1)/2 + (5−2)/3 = 2; sd: (7−3)/4 + (9−4)/5 = 2; mean 2.
    assert torch.allclose(fused, torch.full((1, 2, 2), 2.0))


def test_level_statistics_pool_every_pixel_of_every_batch() -> None:
    a = {"se": [torch.tensor([[[1.0, 3.0]]]), torch.zeros(1, 1, 1), torch.zeros(1, 1, 1)]}
    b = {"se": [torch.tensor([[[5.0, 7.0]]]), torch.zeros(1, 1, 1), torch.zeros(1, 1, 1)]}
    moments = level_moments(a) + level_moments(b)
    location, spread = level_statistics(moments, "standardize")
    values = torch.tensor([1.0, 3.0, 5.0, 7.0])
    assert location[0, 0].item() == 0.0  # a per-level shift only moves the fused map
    assert spread[0, 0].item() == pytest.approx(values.std(unbiased=False).item())
    # An absent student (sd) and a constant level keep a usable (0, 1) / floor.
    assert location[1].tolist() == [0.0, 0.0, 0.0] and spread[1].tolist() == [1.0, 1.0, 1.0]
    assert spread[0, 1].item() == pytest.approx(1e-6)
    location, spread = level_statistics(moments, "mean")
    assert location[0, 0].item() == 0.0 and spread[0, 0].item() == pytest.approx(4.0)
    location, spread = level_statistics(moments, "none")
    assert torch.equal(location, torch.zeros(2, 3)) and torch.equal(spread, torch.ones(2, 3))


def test_students_are_averaged_and_score_is_max() -> None:
    t = [torch.ones(1, 2, 4, 4)]
    same, opposite = [torch.ones(1, 2, 4, 4)], [-torch.ones(1, 2, 4, 4)]
    maps = anomaly_map({"teacher": t, "se": same, "sd": opposite}, (4, 4), sigma=0)
    assert torch.allclose(maps, torch.ones(1, 4, 4))  # mean of 0 and 2
    assert image_score(maps).tolist() == pytest.approx([1.0])


def test_gaussian_blur_is_sigma_4_kernel_33_and_preserves_mass() -> None:
    kernel = gaussian_kernel1d(4.0)
    assert kernel.numel() == 33
    assert kernel.sum().item() == pytest.approx(1.0)
    impulse = torch.zeros(1, 65, 65)
    impulse[0, 32, 32] = 1.0
    blurred = gaussian_blur(impulse, 4.0)
    assert blurred.sum().item() == pytest.approx(1.0, abs=1e-5)
    expected = kernel[16] * kernel[16]
    assert blurred[0, 32, 32].item() == pytest.approx(expected.item(), rel=1e-5)
    # Separable blur equals the 2-D Gaussian: check one off-centre value.
    assert blurred[0, 32 + 3, 32 - 5].item() == pytest.approx(
        (kernel[19] * kernel[11]).item(), rel=1e-5
    )
    constant = torch.full((2, 40, 40), 0.7)
    assert torch.allclose(gaussian_blur(constant, 4.0), constant, atol=1e-6)
