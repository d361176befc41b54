"""The teacher's memory (docs/design.md §2): fitting the bank, the nearest-neighbour map, its
calibration and fusion, the checkpoint's bank, and the options that choose it.

Tiny settings: a random ResNet18 teacher, 64² textures (the map arithmetic does not depend on
the teacher's quality). The paths that score (Ray, ONNX, tiling) are in test_memory_paths.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import memory_config, write_textures
from dskd_ray.config import DSKDConfig
from dskd_ray.errors import CheckpointError, ConfigError
from dskd_ray.model import anomaly_map
from dskd_ray.model.anomaly_map import gaussian_blur, memory_distances, memory_features
from dskd_ray.model.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
from dskd_ray.model.inputs import images_to_tensor
from dskd_ray.model.network import DSKD
from dskd_ray.training.loop import add_memory, plan_training, train
from dskd_ray.training.memory import greedy_coreset, random_subsample, select_bank

# --- the search ----------------------------------------------------------------------------------


@pytest.mark.parametrize("chunked", [False, True])
def test_the_distance_map_equals_a_brute_force_search(
    chunked: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if chunked:  # a bank searched in several chunks, the last one short
        monkeypatch.setattr(anomaly_map, "SEARCH_ELEMENTS", 256 * 6 * 7)
    gen = torch.Generator().manual_seed(0)
    patches = torch.randn(3, 24, 6, 7, generator=gen) * 3 + 10  # far from 0: centring matters
    bank = torch.randn(1000, 24, generator=gen) * 3 + 10
    bank[17] = patches[1, :, 2, 3]  # one patch is in the bank: its distance is 0
    got = memory_distances(patches, bank)
    queries = patches.permute(0, 2, 3, 1).reshape(-1, 24).double()
    want = torch.cdist(queries, bank.double()).amin(dim=1).reshape(3, 6, 7)
    assert got.shape == (3, 6, 7)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-3)
    assert got[1, 2, 3] < 1e-2


def test_an_empty_bank_is_refused() -> None:
    with pytest.raises(ValueError, match="empty"):
        memory_distances(torch.rand(1, 4, 2, 2), torch.zeros(0, 4))


def test_the_memory_map_is_the_recipe_computed_by_hand(tiny_config: DSKDConfig) -> None:
    """A memory-only model's map: teacher strides 8 and 16, 3×3 mean (zero padding counted),
    stride 16 upsampled, concatenated; distance to the nearest bank row (cdist); standardised,
    upsampled, blurred, the per-pixel baseline subtracted; the score its maximum."""
    config = tiny_config.replace(students="none", memory="knn")
    model = DSKD(config).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model.memory.bank = torch.rand(50, 128 + 256, generator=gen)
        model.memory.spread.fill_(0.7)
        model.pixel_baseline.uniform_(0.0, 5.0, generator=gen)
    x = torch.rand(2, 3, 64, 64, generator=gen)
    maps, scores = model.predict(x)

    _, f8, f16 = model.teacher(model.normalize(x))
    f8 = F.avg_pool2d(f8, 3, 1, 1, count_include_pad=True)
    f16 = F.interpolate(F.avg_pool2d(f16, 3, 1, 1), size=(8, 8), mode="bilinear")
    patches = torch.cat([f8, f16], 1).permute(0, 2, 3, 1).reshape(-1, 384).double()
    distance = torch.cdist(patches, model.memory.bank.double()).amin(1).reshape(2, 1, 8, 8)
    up = F.interpolate(distance.float() / 0.7, size=(64, 64), mode="bilinear").squeeze(1)
    want = (gaussian_blur(up, 4.0) - model.pixel_baseline).clamp_min(0)
    torch.testing.assert_close(maps, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(scores, want.flatten(1).amax(1))


# --- picking the bank ----------------------------------------------------------------------------


def _clusters(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A clustered toy set: one crowded cluster and 15 small ones (rare normal patterns)."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [2000] + [10] * 15
    centres = torch.randn(len(sizes), 32, generator=gen) * 10
    labels = torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])
    points = centres[labels] + 0.3 * torch.randn(len(labels), 32, generator=gen)
    return points, labels


def test_a_coreset_covers_the_patches_better_than_a_random_bank_of_its_size() -> None:
    points, labels = _clusters()
    coreset = greedy_coreset(points, 32, seed=0)
    assert len(set(coreset.tolist())) == 32
    # Every rare pattern is in the coreset; a random bank of the same size misses most.
    assert set(labels[coreset].tolist()) == set(range(16))

    def farthest(bank: torch.Tensor) -> float:
        return float(torch.cdist(points, bank).amin(dim=1).max())

    coreset_radius = farthest(points[coreset])
    for seed in range(5):
        random_bank = points[random_subsample(len(points), 32, seed)]
        assert coreset_radius < 0.5 * farthest(random_bank)
    assert coreset_radius < 3.0  # every point is near a pick: within its cluster's spread


def test_banks_are_deterministic_per_seed_and_differ_between_seeds() -> None:
    points, _ = _clusters(1)
    for sampling in ("coreset", "random"):
        a = select_bank(points, 40, sampling, seed=3)
        assert torch.equal(a, select_bank(points, 40, sampling, seed=3))
        assert not torch.equal(a, select_bank(points, 40, sampling, seed=4))
        assert a.shape == (40, 32)
        assert select_bank(points, 10_000, sampling, seed=3).shape == points.shape  # all of them


def test_the_coreset_projects_wide_patches_and_still_covers() -> None:
    points, labels = _clusters(2)
    wide = torch.cat([points, points], dim=1) @ torch.randn(64, 300)  # 300 > PROJECTION_DIMS
    coreset = greedy_coreset(wide, 32, seed=0)
    assert set(labels[coreset].tolist()) == set(range(16))


# --- fitting and calibrating, on one process ---------------------------------------------------


def test_a_memory_only_model_trains_nothing_and_keeps_training_patches(
    textures: Path, tmp_path: Path
) -> None:
    config = memory_config(students="none")
    result = train(config, str(textures), str(tmp_path / "m.pt"), device="cpu")
    ckpt = load_checkpoint(tmp_path / "m.pt")
    assert result.history == [] and ckpt.training["complete"]
    assert not any(k.startswith(("encoder_student", "decoder_student")) for k in ckpt.state_dict)
    bank = ckpt.state_dict["memory.bank"]
    assert bank.shape == (150, 384)
    assert ckpt.meta["memory"]["bank"] == 150 and ckpt.meta["memory"]["candidates"] == 8 * 64
    # Bank rows are training patches, exactly: the model keeps what it saw.
    model = ckpt.build_model()
    images = plan_training(str(textures), config).train_uris
    from dskd_ray.io.data import load_images

    decoded, _, _ = load_images(images, 64)
    with torch.no_grad():
        patches = memory_features(model.teacher(model.normalize(images_to_tensor(decoded, "cpu"))))
    patches = patches.permute(0, 2, 3, 1).reshape(-1, 384)
    assert float(torch.cdist(bank.double(), patches.double()).amin(dim=1).max()) < 1e-4
    # Its threshold is the held-out images' scores' quantile, like every model's.
    assert ckpt.threshold is not None and len(ckpt.threshold.normal_scores) == 2
    assert float(model.memory.spread) != 1.0 and float(model.memory.gain) == 1.0


def test_the_memory_is_put_on_a_students_scale_on_held_out_images(
    textures: Path, tmp_path: Path
) -> None:
    """The fused default: after calibration the memory's member spreads on the held-out normal
    images as much as the students' members do on average, so none drowns the others."""
    config = memory_config()
    ckpt = train(config, str(textures), str(tmp_path / "m.pt"), device="cpu").checkpoint
    model = ckpt.build_model()
    from dskd_ray.io.data import load_images

    holdout, _, _ = load_images(plan_training(str(textures), config).holdout_uris, 64)
    with torch.no_grad():
        members = model.members(images_to_tensor(holdout, "cpu"))
    assert len(members) == 3  # se, sd, memory
    spreads = [float(m.double().std(unbiased=False)) for m in members]
    assert spreads[2] == pytest.approx((spreads[0] + spreads[1]) / 2, rel=1e-4)
    assert float(model.memory.gain) != 1.0


def test_the_memory_weighs_its_share_and_the_students_share_the_rest(
    textures: Path, tmp_path: Path
) -> None:
    """The fused map is (1 − w) × the students' mean + w × the memory's member (before the blur
    and the baseline, both linear or applied after): w=½ by default, and the map follows w."""
    config = memory_config(map_baseline="none")
    model = train(config, str(textures), str(tmp_path / "m.pt"), device="cpu").checkpoint
    model = model.build_model()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        se, sd, memory = model.members(x)
        for w in (0.5, 0.2, 1.0):
            model.config = config.replace(map_baseline="none", memory_weight=w)
            maps, _ = model.predict(x)
            expected = gaussian_blur((1 - w) * (se + sd) / 2 + w * memory, config.blur_sigma)
            torch.testing.assert_close(maps, expected, rtol=1e-5, atol=1e-5)
    assert DSKDConfig().memory == "knn" and DSKDConfig().memory_weight == 0.5


def test_adding_the_memory_to_trained_students_equals_training_with_it(
    textures: Path, tmp_path: Path
) -> None:
    """What the quality bench does for `dskd+knn`: the kept students, the memory fitted and the
    model calibrated again, gives the model a run with the memory trains."""
    with_memory = train(
        memory_config(), str(textures), str(tmp_path / "a.pt"), device="cpu"
    ).checkpoint
    students = train(
        memory_config(memory="none"), str(textures), str(tmp_path / "b.pt"), device="cpu"
    ).checkpoint
    added = add_memory(
        students, str(textures), memory_config(), str(tmp_path / "c.pt"), device="cpu"
    )
    assert added.state_dict.keys() == with_memory.state_dict.keys()
    for key, value in with_memory.state_dict.items():
        torch.testing.assert_close(added.state_dict[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert added.threshold.value == pytest.approx(with_memory.threshold.value, rel=1e-5)
    assert load_checkpoint(tmp_path / "c.pt").model_id == added.model_id
    with pytest.raises(Exception, match="memory's fields only"):
        add_memory(students, str(textures), memory_config(lr=0.1), device="cpu")


@pytest.mark.parametrize("switches", [{"pyramid": "8-16-32"}, {"feature_norm": "standardize"}])
def test_the_memory_holds_the_raw_teachers_stride_8_and_16_whatever_the_students_distil(
    textures: Path, tmp_path: Path, switches: dict[str, str]
) -> None:
    """The students' switches change what they compare (a pyramid 8-16-32, standardised
    channels), never the memory: the bank is fitted from, and scoring searches with, the raw
    teacher's stride-8 and stride-16 patches. With every training patch in the bank, a training
    image's memory member is zero everywhere on the scoring path."""
    config = memory_config(memory_size=10_000, **switches)
    ckpt = train(config, str(textures), str(tmp_path / "m.pt"), device="cpu").checkpoint
    model = ckpt.build_model()
    assert ckpt.state_dict["memory.bank"].shape == (8 * 64, 384)  # every patch: 128 + 256 ch
    from dskd_ray.io.data import load_images

    decoded, _, _ = load_images(plan_training(str(textures), config).train_uris, 64)
    with torch.no_grad():
        members = model.members(images_to_tensor(decoded, "cpu"))
    # In the bank's units (the member is distance × scale): float32's ‖q‖² + ‖b‖² − 2q·b leaves
    # ~0.01 of a zero distance (the sqrt of a rounding error); a held-out image's patches are
    # farther by two orders on this random teacher.
    distance = members[-1] / model.memory.scale()
    holdout, _, _ = load_images(plan_training(str(textures), config).holdout_uris, 64)
    with torch.no_grad():
        other = model.members(images_to_tensor(holdout, "cpu"))[-1] / model.memory.scale()
    assert len(members) == 3
    assert float(distance.max()) < 0.02 and float(other.max()) > 50 * float(distance.max()), (
        float(distance.max()),
        float(other.max()),
    )


# --- the checkpoint's bank ----------------------------------------------------------------------


def _memory_checkpoint(tmp_path: Path, rows: int = 30) -> Path:
    model = DSKD(memory_config(students="none")).eval()
    model.memory.bank = torch.rand(rows, 384)
    path = tmp_path / "m.pt"
    save_checkpoint(make_checkpoint(model, training={"complete": True}), path)
    return path


def test_a_checkpoint_alone_rebuilds_the_bank_whatever_its_length(tmp_path: Path) -> None:
    for rows in (1, 30, 777):
        path = _memory_checkpoint(tmp_path, rows)
        model = load_checkpoint(path).build_model()
        assert model.memory.bank.shape == (rows, 384)
        torch.testing.assert_close(
            model.memory.bank, torch.load(path, weights_only=True)["state_dict"]["memory.bank"]
        )


@pytest.mark.parametrize(
    "damage",
    ["wrong width", "one dimension", "missing", "empty", "integers"],
)
def test_an_odd_bank_is_refused_in_one_line(tmp_path: Path, damage: str) -> None:
    ckpt = load_checkpoint(_memory_checkpoint(tmp_path))
    bank = ckpt.state_dict["memory.bank"]
    ckpt.state_dict["memory.bank"] = {
        "wrong width": bank[:, :100],
        "one dimension": bank.reshape(-1),
        "missing": None,
        "empty": bank[:0],
        "integers": bank.long(),
    }[damage]
    if ckpt.state_dict["memory.bank"] is None:
        del ckpt.state_dict["memory.bank"]
    with pytest.raises(CheckpointError) as refused:
        ckpt.build_model()
    assert "memory bank" in str(refused.value) and "\n" not in str(refused.value)


def test_a_truncated_bank_in_a_file_is_refused_as_corrupt(tmp_path: Path) -> None:
    path = _memory_checkpoint(tmp_path)
    payload = torch.load(path, weights_only=True)
    payload["state_dict"]["memory.bank"] = payload["state_dict"]["memory.bank"][:20]
    torch.save(payload, tmp_path / "cut.pt")
    with pytest.raises(CheckpointError, match="corrupt") as refused:
        load_checkpoint(tmp_path / "cut.pt")
    assert "\n" not in str(refused.value)


# --- the options --------------------------------------------------------------------------------


def test_a_model_needs_a_student_or_a_memory() -> None:
    with pytest.raises(ConfigError, match="--students none needs --memory knn"):
        DSKDConfig(students="none", memory="none")
    bad_settings = (
        {"memory": "faiss"}, {"memory_sampling": "kmeans"}, {"memory_size": 0},
        {"memory_weight": 1.5}, {"memory_weight": -0.1},
    )  # fmt: skip
    for bad in bad_settings:
        with pytest.raises(ConfigError):
            DSKDConfig(**bad)


def test_students_none_without_memory_is_one_line_from_the_cli(tmp_path: Path) -> None:
    write_textures(tmp_path / "normal", 2)
    done = subprocess.run(
        [sys.executable, "-m", "dskd_ray.cli", "train", str(tmp_path / "normal"),
         "--out", str(tmp_path / "m.pt"), "--students", "none", "--memory", "none"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "dskd: error: --students none needs --memory knn: a model needs a student or a memory"
    )
    assert not (tmp_path / "m.pt").exists()


def test_the_search_keeps_float32_digits_on_the_teachers_scale() -> None:
    """Normal patches lie close to the bank; without centring, ‖q‖² + ‖b‖² − 2q·b would lose
    their short distances to rounding (the export's parity depends on them)."""
    gen = torch.Generator().manual_seed(5)
    centre = torch.randn(152, generator=gen) * 40
    bank = centre + torch.randn(500, 152, generator=gen)
    patches = (centre + torch.randn(1, 7, 7, 152, generator=gen) * 0.05).permute(0, 3, 1, 2)
    got = memory_distances(patches, bank).double()
    want = torch.cdist(patches.permute(0, 2, 3, 1).reshape(-1, 152).double(), bank.double())
    want = want.amin(dim=1).reshape(1, 7, 7)
    assert float(((got - want).abs() / want).max()) < 1e-4
    assert np.isfinite(got.numpy()).all()
