from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import memory_config, write_textures
from dskd_ray.config import DSKDConfig
from dskd_ray.errors import CheckpointError, DataError
from dskd_ray.inference.scoring import Scorer
from dskd_ray.model.checkpoint import load_checkpoint
from dskd_ray.model.inputs import images_to_tensor
from dskd_ray.model.loss import distillation_loss
from dskd_ray.model.network import DSKD
from dskd_ray.training.dataset import plan_training
from dskd_ray.training.loop import (
    FEATURE_STD_FLOOR,
    TeacherCache,
    fit,
    fit_feature_statistics,
    hard_mining_share,
    make_optimizer,
    split_holdout,
    train,
    train_step,
)
from dskd_ray.training.strategy import OneProcess
from dskd_ray.training.synthetic_defects import defect_generator, synthesize_defects


def test_teacher_weights_and_batchnorm_statistics_do_not_change(tiny_config: DSKDConfig) -> None:
    model = DSKD(tiny_config)
    before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    students_before = [p.clone() for p in model.student_parameters()]
    optimizer = make_optimizer(model, tiny_config)
    model.train()
    for _ in range(3):
        train_step(model, optimizer, torch.randn(4, 3, 64, 64) * 2 + 1, None, 1.0)
    for key, value in model.teacher.state_dict().items():
        assert torch.equal(value, before[key]), key  # running_mean/var included
    assert any(
        not torch.equal(a, b)
        for a, b in zip(students_before, model.student_parameters(), strict=True)
    )


@pytest.mark.parametrize(
    "switch",
    [
        {"students": "both", "df_input": "se"},
        {"students": "both", "df_input": "teacher"},
        {"students": "se"},
        {"students": "sd"},
        {"level_fusion": "product"},
        {"lr_schedule": "constant", "grad_clip": None},
    ],
)
def test_each_switch_trains_and_the_loss_falls(switch: dict, tiny_config: DSKDConfig) -> None:
    config = tiny_config.replace(**switch)
    torch.manual_seed(0)
    model = DSKD(config)
    optimizer = make_optimizer(model, config)
    model.train()
    x = torch.rand(4, 3, 64, 64)
    losses = [float(train_step(model, optimizer, x, None, config.grad_clip)) for _ in range(8)]
    assert losses[-1] < losses[0]


def test_sgd_is_stfpms_optimiser(tiny_config: DSKDConfig) -> None:
    config = tiny_config.replace(optimizer="sgd", lr=0.4, weight_decay=1e-3)
    optimizer = make_optimizer(DSKD(config), config)
    assert isinstance(optimizer, torch.optim.SGD)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.4, 0.9, 1e-3)
    assert isinstance(make_optimizer(DSKD(tiny_config), tiny_config), torch.optim.Adam)


def test_hard_mining_share_ramps_in_over_the_first_tenth_of_the_run(
    tiny_config: DSKDConfig,
) -> None:
    mined = tiny_config.replace(hard_mining=0.9)
    shares = [hard_mining_share(mined, step, 400) for step in (0, 20, 40, 41, 399)]
    assert shares == pytest.approx([0.0, 0.45, 0.9, 0.9, 0.9])
    assert hard_mining_share(tiny_config, 399, 400) == 0.0  # off by default


# Each of the students' switches (docs/design.md §1, §3) through the whole product path: the
# config reaches the checkpoint, and the trained model scores finite, non-constant maps.
STUDENT_SWITCHES = [
    {"loss_form": "pixel"},  # the paper's loss; flat is the default
    {"hard_mining": 0.9},
    {"loss_form": "pixel", "hard_mining": 0.9, "students": "sd", "df_input": "teacher"},
    {"feature_norm": "standardize"},
    {"distance": "l2"},
    {"feature_norm": "standardize", "distance": "l2", "students": "se"},
    {"denoise": 0.5},
    {"denoise": 1.0, "students": "sd", "df_input": "teacher"},
    {"pyramid": "8-16-32"},
    {"encoder_student": "resnet", "backbone": "efficientnet_lite0"},
    {"optimizer": "sgd", "lr": 0.4, "weight_decay": 1e-3},
]


@pytest.mark.parametrize("switch", STUDENT_SWITCHES, ids=lambda s: "-".join(map(str, s.values())))
def test_each_student_switch_trains_and_scores_finite_maps(
    switch: dict, tmp_path: Path, normal_folder: Path, tiny_config: DSKDConfig
) -> None:
    config = tiny_config.replace(**switch)
    result = train(config, str(normal_folder), str(tmp_path / "m.pt"), device="cpu")
    assert all(np.isfinite(h.loss) for h in result.history)
    checkpoint = load_checkpoint(tmp_path / "m.pt")
    assert {k: getattr(checkpoint.config, k) for k in switch} == switch
    if switch.get("feature_norm") == "standardize":  # fitted before training, kept
        assert not torch.equal(checkpoint.state_dict["feature_std2"], torch.ones(1, 256, 1, 1))
    images = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    scored = Scorer(checkpoint, device="cpu").score_batch(images)
    assert np.isfinite(scored.maps).all() and np.isfinite(scored.scores).all()
    assert np.ptp(scored.maps) > 0


@pytest.mark.parametrize("cached", [True, False])
def test_feature_statistics_are_the_teachers_per_channel_moments_on_training_images(
    cached: bool, tiny_config: DSKDConfig
) -> None:
    model = DSKD(tiny_config.replace(feature_norm="standardize"))
    images = torch.from_numpy(
        np.random.default_rng(0).integers(0, 256, (6, 64, 64, 3), dtype=np.uint8)
    )
    cpu = torch.device("cpu")
    cache = TeacherCache.build(model, images, cpu, 4) if cached else None
    fit_feature_statistics(model, images, cache, cpu, batch_size=4)
    with torch.no_grad():
        teacher = model.teacher_features(model.normalize(images_to_tensor(images.numpy(), cpu)))
    for level, (mean, std) in zip(teacher, model.feature_statistics(), strict=True):
        want_mean = level.double().mean(dim=(0, 2, 3))
        want_std = level.double().std(dim=(0, 2, 3), unbiased=False).clamp_min(FEATURE_STD_FLOOR)
        torch.testing.assert_close(mean.flatten().double(), want_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(std.flatten().double(), want_std, rtol=1e-5, atol=1e-6)
    # As compared, the teacher's training features are centred and of unit spread.
    standardised = model.comparable({"teacher": teacher})["teacher"]
    assert all(level.mean(dim=(0, 2, 3)).abs().max() < 1e-4 for level in standardised)


@pytest.mark.parametrize(("students", "df_input"), [("both", "se"), ("sd", "teacher")])
def test_denoising_students_see_the_defects_and_are_trained_towards_the_clean_teacher(
    students: str, df_input: str, tiny_config: DSKDConfig
) -> None:
    config = tiny_config.replace(students=students, df_input=df_input, denoise=1.0)
    torch.manual_seed(0)
    model = DSKD(config).eval()  # eval: BatchNorm gives the same outputs on every call
    clean = torch.rand(4, 3, 64, 64)
    noisy, masks = synthesize_defects(clean, 1.0, defect_generator(0, 1, 1, 0, torch.device("cpu")))
    assert (masks.flatten(1).amax(dim=1) > 0).all()
    x, corrupted = model.normalize(clean), model.normalize(noisy)
    with torch.no_grad():
        target, seen_by_teacher = model.teacher_features(x), model.teacher_features(corrupted)
        # What the decoder reads: Se's pyramid of the corrupted image, or the teacher's of it.
        reads = seen_by_teacher if df_input == "teacher" else target
        students_out = model.student_features(corrupted, reads)
        want = distillation_loss(target, students_out)
        wrong_target = distillation_loss(seen_by_teacher, students_out)
        wrong_input = distillation_loss(target, model.student_features(x, target))
    optimizer = torch.optim.SGD(model.student_parameters(), lr=0.0)
    got = train_step(model, optimizer, x, target, None, corrupted=corrupted)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    assert abs(got.item() - wrong_target.item()) > 1e-4  # not the corrupted image's features
    assert abs(got.item() - wrong_input.item()) > 1e-4  # and the students saw the defects


def test_holdout_split_is_deterministic_and_disjoint() -> None:
    a_train, a_hold = split_holdout(50, 0.1, seed=3)
    b_train, b_hold = split_holdout(50, 0.1, seed=3)
    assert np.array_equal(a_train, b_train) and np.array_equal(a_hold, b_hold)
    assert len(a_hold) == 5 and not set(a_train) & set(a_hold)
    assert len(set(a_train) | set(a_hold)) == 50


def test_train_writes_a_checkpoint_with_threshold_from_holdout(
    tmp_path: Path, normal_folder: Path, tiny_config: DSKDConfig
) -> None:
    out = tmp_path / "model.pt"
    result = train(tiny_config, str(normal_folder), str(out))
    assert result.n_train == 6 and result.n_holdout == 2
    ckpt = load_checkpoint(out)
    assert ckpt.threshold is not None
    scores = ckpt.threshold.normal_scores
    assert len(scores) == 2
    assert ckpt.threshold.value == pytest.approx(float(np.quantile(scores, 0.99)))
    assert ckpt.training is not None and ckpt.training["complete"]
    assert "optimizer" not in ckpt.training
    assert len(result.history) == 2


def test_resume_continues_from_the_last_epoch(
    tmp_path: Path, normal_folder: Path, tiny_config: DSKDConfig
) -> None:
    out = tmp_path / "model.pt"
    epochs_seen: list[int] = []

    class Crash(Exception):
        pass

    def crash_after_first(epoch: int, stats: object) -> None:
        epochs_seen.append(epoch)
        if epoch == 1:
            raise Crash

    config = tiny_config.replace(epochs=3)
    with pytest.raises(Crash):
        train(config, str(normal_folder), str(out), on_epoch=crash_after_first)
    # The crash came before epoch 1's save: nothing half-written, no checkpoint yet.
    assert not out.exists()

    def crash_at_second(epoch: int, stats: object) -> None:
        epochs_seen.append(epoch)
        if epoch == 3:
            raise Crash

    with pytest.raises(Crash):
        train(config, str(normal_folder), str(out), on_epoch=crash_at_second)
    assert load_checkpoint(out).training["epoch"] == 2
    epochs_seen.clear()
    result = train(
        config,
        str(normal_folder),
        str(out),
        resume=True,
        on_epoch=lambda e, s: epochs_seen.append(e),
    )
    assert epochs_seen == [3]
    assert len(result.history) == 3
    assert load_checkpoint(out).threshold is not None
    with pytest.raises(CheckpointError, match="finished"):
        train(config, str(normal_folder), str(out), resume=True)


class _StopInMemory(OneProcess):
    """A local run stopped while the memory is fitted, after the last epoch (as Ctrl-C just
    after the `memory:` line): the bank's gather is the first tensor gathered."""

    def all_gather(self, obj: object) -> list[object]:
        if isinstance(obj, torch.Tensor):
            raise KeyboardInterrupt
        return super().all_gather(obj)


def test_the_last_epoch_is_saved_before_the_memory_and_calibration(
    tmp_path: Path, normal_folder: Path
) -> None:
    """Stopped while the memory was fitted, a run used to leave no checkpoint at all."""
    config = memory_config(epochs=2)
    out = tmp_path / "model.pt"
    full = train(config, str(normal_folder), str(tmp_path / "full.pt")).checkpoint
    with pytest.raises(KeyboardInterrupt):
        images = plan_training(str(normal_folder), config)
        fit(config, images, _StopInMemory(str(out)), torch.device("cpu"))
    saved = load_checkpoint(out)
    assert saved.training["epoch"] == 2 and not saved.finished
    with pytest.raises(CheckpointError, match="unfinished training run .*--resume"):
        Scorer(str(out), device="cpu")
    resumed = train(config, str(normal_folder), str(out), resume=True).checkpoint
    assert resumed.finished and resumed.training["resumed_at"] == [2]
    assert resumed.model_id == full.model_id  # the same model as the uninterrupted run's


def test_resume_refuses_another_config_or_other_data(
    tmp_path: Path, normal_folder: Path, tiny_config: DSKDConfig
) -> None:
    """Resuming with other options, or on other images, used to exit 0 with the first config
    kept in silence and the next epochs trained on the other data."""
    config = tiny_config.replace(epochs=3)
    out = tmp_path / "model.pt"

    class Stop(Exception):
        pass

    def stop(epoch: int, stats: object) -> None:
        if epoch == 2:
            raise Stop

    with pytest.raises(Stop):
        train(config, str(normal_folder), str(out), on_epoch=stop)
    before = out.read_bytes()
    other = config.replace(image_size=128, students="se", backbone="efficientnet_lite0")
    with pytest.raises(CheckpointError, match="trained with") as refused:
        train(other, str(normal_folder), str(out), resume=True)
    for field in ("image_size=64", "students=both", "backbone=resnet18", "image_size=128"):
        assert field in str(refused.value)
    # Only the fields asked for are compared (the CLI's given options); epochs may grow.
    with pytest.raises(CheckpointError, match="students=both"):
        train(other, str(normal_folder), str(out), resume=True, asked=["students", "epochs"])
    write_textures(tmp_path / "elsewhere", 8, seed=5)
    with pytest.raises(DataError, match="not those the interrupted run trained on"):
        train(config, str(tmp_path / "elsewhere"), str(out), resume=True)
    assert out.read_bytes() == before  # refused before anything was written
    done = train(
        config.replace(epochs=4), str(normal_folder), str(out), resume=True, asked=["epochs"]
    )
    assert done.checkpoint.config.epochs == 4 and len(done.history) == 4


@pytest.mark.parametrize(
    "switches", [{}, {"denoise": 0.5, "hard_mining": 0.9, "feature_norm": "standardize"}]
)
def test_resumed_run_equals_uninterrupted_run(
    tmp_path: Path, normal_folder: Path, tiny_config: DSKDConfig, switches: dict
) -> None:
    config = tiny_config.replace(epochs=2, **switches)
    full = train(config, str(normal_folder), str(tmp_path / "full.pt")).checkpoint

    class Stop(Exception):
        pass

    def stop(epoch: int, stats: object) -> None:
        if epoch == 2:
            raise Stop

    with pytest.raises(Stop):
        train(config, str(normal_folder), str(tmp_path / "resumed.pt"), on_epoch=stop)
    resumed = train(
        config, str(normal_folder), str(tmp_path / "resumed.pt"), resume=True
    ).checkpoint
    for key in full.state_dict:
        assert torch.allclose(
            full.state_dict[key].float(), resumed.state_dict[key].float(), atol=1e-5
        ), key


def test_too_few_readable_images_is_a_clear_error(tmp_path: Path, tiny_config: DSKDConfig) -> None:
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(b"broken")
    with pytest.raises(DataError, match="readable"):
        train(tiny_config, str(tmp_path / "imgs"), str(tmp_path / "m.pt"))


@pytest.mark.parametrize("normalization", ["mean", "standardize"])
def test_level_normalization_fits_statistics_on_held_out_normal_images(
    tiny_config: DSKDConfig, normalization: str
) -> None:
    from dskd_ray.model.anomaly_map import level_maps
    from dskd_ray.model.inputs import images_to_tensor
    from dskd_ray.training.loop import calibrate

    config = tiny_config.replace(level_normalization=normalization, map_baseline="none")
    model = DSKD(config)
    rng = np.random.default_rng(0)
    train_images = rng.integers(0, 255, (3, 64, 64, 3), dtype=np.uint8)
    holdout = rng.integers(0, 255, (4, 64, 64, 3), dtype=np.uint8)
    threshold, _ = calibrate(model, train_images, holdout, config, torch.device("cpu"))
    assert threshold is not None
    location, spread = model.level_statistics()
    assert location is not None and spread is not None
    with torch.no_grad():
        features = model(model.normalize(images_to_tensor(holdout, torch.device("cpu"))))
    for row, name in enumerate(("se", "sd")):
        for k, m in enumerate(level_maps(features)[name]):
            z = (m - location[row, k]) / spread[row, k]
            if normalization == "mean":
                # Divided by its normal mean, each level averages one on the hold-out.
                assert location[row, k].item() == 0.0
                assert z.mean().item() == pytest.approx(1.0, rel=1e-4)
            else:
                # Standardised: std 1 over the hold-out's pixels; location stays 0 (a constant
                # shift of the sum would change nothing but the map's sign).
                assert location[row, k].item() == 0.0
                assert z.std(unbiased=False).item() == pytest.approx(1.0, rel=1e-3)
    assert DSKD(tiny_config.replace(level_normalization="none")).level_statistics() == (None, None)


def test_top_k_image_score_is_the_mean_of_the_k_highest_pixels() -> None:
    from dskd_ray.model.anomaly_map import image_score

    maps = torch.zeros(2, 8, 8)
    maps[0, 0, :4] = torch.tensor([4.0, 3.0, 2.0, 1.0])
    maps[1, 5, 5] = 7.0
    assert image_score(maps).tolist() == [4.0, 7.0]
    assert image_score(maps, top_k=2).tolist() == [3.5, 3.5]
    assert image_score(maps, top_k=4).tolist() == [2.5, 1.75]


def test_map_baseline_is_the_normal_mean_map_and_divides_it_out(tiny_config: DSKDConfig) -> None:
    from dskd_ray.model.inputs import images_to_tensor
    from dskd_ray.training.loop import calibrate

    tiny_config = tiny_config.replace(level_normalization="none", map_baseline="mean")
    model = DSKD(tiny_config).eval()
    assert model.baseline() is not None
    rng = np.random.default_rng(1)
    normal = rng.integers(0, 255, (6, 64, 64, 3), dtype=np.uint8)
    holdout = rng.integers(0, 255, (3, 64, 64, 3), dtype=np.uint8)
    x = images_to_tensor(normal, torch.device("cpu"))
    raw, _ = model.predict(x, remove_baseline=False)
    threshold, _ = calibrate(model, normal, holdout, tiny_config, torch.device("cpu"))
    mean = raw.mean(dim=0)
    floor = 0.1 * mean.mean()
    torch.testing.assert_close(model.pixel_baseline, mean.clamp_min(floor))
    divided, scores = model.predict(x)
    torch.testing.assert_close(divided, raw / model.pixel_baseline)
    assert torch.equal(scores, divided.flatten(1).amax(dim=1))
    # The threshold is on the divided maps of the hold-out, which the baseline did not see.
    held, held_scores = model.predict(images_to_tensor(holdout, torch.device("cpu")))
    assert threshold is not None
    assert threshold.normal_scores == pytest.approx(held_scores.tolist(), rel=1e-5)
    # "none" keeps the raw map whatever the buffer holds.
    model.config = tiny_config.replace(map_baseline="none")
    assert model.baseline() is None
    torch.testing.assert_close(model.predict(x)[0], raw)


def test_subtracted_baseline_is_the_raw_normal_mean_map(tiny_config: DSKDConfig) -> None:
    from dskd_ray.model.inputs import images_to_tensor
    from dskd_ray.training.loop import calibrate

    config = tiny_config.replace(level_normalization="standardize", map_baseline="subtract")
    model = DSKD(config).eval()
    rng = np.random.default_rng(2)
    normal = rng.integers(0, 255, (6, 64, 64, 3), dtype=np.uint8)
    holdout = rng.integers(0, 255, (3, 64, 64, 3), dtype=np.uint8)
    calibrate(model, normal, holdout, config, torch.device("cpu"))
    x = images_to_tensor(normal, torch.device("cpu"))
    before, _ = model.predict(x, remove_baseline=False)
    # A subtrahend needs no floor: the baseline is exactly the normal mean map.
    torch.testing.assert_close(model.pixel_baseline, before.mean(dim=0))
    after, scores = model.predict(x)
    # What is left is the excess over the usual discrepancy, cut at zero.
    torch.testing.assert_close(after, (before - model.pixel_baseline).clamp_min(0))
    assert after.min().item() == 0.0 and after.max().item() > 0.0
    assert torch.equal(scores, after.flatten(1).amax(dim=1))
