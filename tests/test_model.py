import pytest
import torch

from dskd_ray.config import DSKDConfig
from dskd_ray.errors import ConfigError
from dskd_ray.model.network import DSKD


@pytest.mark.parametrize(
    ("backbone", "pyramid", "channels"),
    [
        ("resnet18", "4-8-16", (64, 128, 256)),
        ("wide_resnet50_2", "4-8-16", (256, 512, 1024)),
        ("efficientnet_lite0", "4-8-16", (24, 40, 112)),
        ("resnet18", "8-16-32", (128, 256, 512)),
        ("efficientnet_lite0", "8-16-32", (40, 112, 320)),
    ],
)
def test_pyramid_shapes_for_each_backbone(
    backbone: str, pyramid: str, channels: tuple[int, int, int]
) -> None:
    config = DSKDConfig(
        memory="none", backbone=backbone, teacher_weights="random", image_size=128, pyramid=pyramid
    )
    model = DSKD(config).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 128, 128))
    assert set(out) == {"teacher", "se", "sd"}
    for pyramid_out in out.values():
        shapes = [tuple(f.shape) for f in pyramid_out]
        assert shapes == [
            (1, c, 128 // s, 128 // s) for c, s in zip(channels, config.strides, strict=True)
        ]
    assert model.df_embedding is not None  # the code stays at 1/32 either way
    with torch.no_grad():
        code = model.df_embedding(out["teacher"])
    assert tuple(code.shape[-2:]) == (4, 4)


def test_the_default_pyramid_keeps_its_weights_names() -> None:
    """A checkpoint from before the pyramid switch must load: the default's keys are unchanged."""
    keys = set(
        DSKD(DSKDConfig(memory="none", teacher_weights="random", image_size=64)).state_dict()
    )
    assert {"decoder_student.stage16.0.conv1.weight", "decoder_student.stage4.1.bn2.bias"} <= keys
    assert not any(k.startswith(("teacher.layer4", "encoder_student.layer4")) for k in keys)
    deep = DSKD(
        DSKDConfig(memory="none", teacher_weights="random", image_size=64, pyramid="8-16-32")
    )
    assert "decoder_student.stage32.0.conv1.weight" in deep.state_dict()
    assert "teacher.layer4.1.bn2.weight" in deep.state_dict()


def test_resnet18_shapes_at_256_and_parameter_counts() -> None:
    model = DSKD(DSKDConfig(memory="none", teacher_weights="random"))
    assert model.df_embedding is not None
    with torch.no_grad():
        code = model.df_embedding(model.teacher(torch.randn(1, 3, 256, 256)))
    assert tuple(code.shape) == (1, 512, 8, 8)
    counts = [sum(p.numel() for p in m.parameters()) for m in model.student_modules()]
    # docs/design.md §3: Se / DF / Sd = 2.78 M / 11.68 M / 3.70 M for ResNet18.
    assert [round(c / 1e6, 2) for c in counts] == [2.78, 11.68, 3.70]


@pytest.mark.parametrize("students", ["both", "se", "sd"])
def test_students_switch_selects_parts(students: str) -> None:
    model = DSKD(
        DSKDConfig(memory="none", teacher_weights="random", students=students, image_size=64)
    )
    assert (model.encoder_student is not None) == (students in ("both", "se"))
    assert (model.decoder_student is not None) == (students in ("both", "sd"))
    out = model(torch.randn(2, 3, 64, 64))
    assert set(out) - {"teacher"} == ({"se", "sd"} if students == "both" else {students})


def test_df_input_switch_changes_what_feeds_decoder() -> None:
    torch.manual_seed(0)
    base = DSKDConfig(memory="none", teacher_weights="random", image_size=64)
    a = DSKD(base.replace(df_input="se"))
    b = DSKD(base.replace(df_input="teacher"))
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 64, 64)
    a.eval(), b.eval()
    with torch.no_grad():
        sd_a, sd_b = a(x)["sd"], b(x)["sd"]
    assert not torch.allclose(sd_a[0], sd_b[0])
    # With df_input=se, Sd's loss reaches Se's weights through DF; with teacher it cannot.
    a.train()
    a(x)["sd"][0].sum().backward()
    assert a.encoder_student is not None
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0 for p in a.encoder_student.parameters()
    )


def test_teacher_is_frozen_and_stays_in_eval_mode() -> None:
    model = DSKD(DSKDConfig(memory="none", teacher_weights="random", image_size=64))
    model.train()
    assert not model.teacher.training
    assert all(not p.requires_grad for p in model.teacher.parameters())
    teacher_ids = {id(p) for p in model.teacher.parameters()}
    assert not teacher_ids & {id(p) for p in model.student_parameters()}


def test_signed_backbone_decoder_can_output_negative_values() -> None:
    model = DSKD(
        DSKDConfig(
            memory="none", backbone="efficientnet_lite0", teacher_weights="random", image_size=64
        )
    )
    with torch.no_grad():
        sd = model(torch.randn(2, 3, 64, 64))["sd"]
    assert all((level < 0).any() for level in sd)
    resnet = DSKD(DSKDConfig(memory="none", teacher_weights="random", image_size=64))
    with torch.no_grad():
        assert all((level >= 0).all() for level in resnet(torch.randn(2, 3, 64, 64))["sd"])


@pytest.mark.parametrize(
    "change",
    [
        {"backbone": "vgg"},
        {"students": "three"},
        {"df_input": "x"},
        {"level_fusion": "max"},
        {"image_size": 100},
        {"loss_form": "mean"},
        {"hard_mining": 1.0},
        {"feature_norm": "whiten"},
        {"distance": "l1"},
        {"pyramid": "16-32-64"},
        {"encoder_student": "vit"},
        {"optimizer": "lbfgs"},
        {"weight_decay": -1.0},
        {"encoder_student": "resnet", "students": "sd"},
    ],
)
def test_bad_config_values_are_clear_errors(change: dict) -> None:
    with pytest.raises(ConfigError, match=next(iter(change))):
        DSKDConfig(**change)


def test_config_round_trips_through_a_dict() -> None:
    cfg = DSKDConfig(backbone="efficientnet_lite0", students="sd", betas=(0.9, 0.99))
    assert DSKDConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown"):
        DSKDConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_standardized_features_are_compared_alike_in_loss_and_map() -> None:
    torch.manual_seed(0)
    config = DSKDConfig(
        memory="none", teacher_weights="random", image_size=64, feature_norm="standardize"
    )
    model = DSKD(config).eval()
    plain = DSKD(config.replace(feature_norm="none")).eval()
    plain.load_state_dict(model.state_dict(), strict=False)
    statistics = model.feature_statistics()
    assert len(statistics) == 3 and "feature_mean0" in model.state_dict()
    assert "feature_mean0" not in plain.state_dict()  # the default model's weights are as before
    for mean, std in statistics:
        mean.uniform_(-1, 1), std.uniform_(0.5, 2)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got, raw = model(x), plain(x)
    for name in raw:  # the teacher's and both students' pyramids, each by the teacher's stats
        for g, r, (mean, std) in zip(got[name], raw[name], statistics, strict=True):
            torch.testing.assert_close(g, (r - mean) / std)


@pytest.mark.parametrize("pyramid", ["4-8-16", "8-16-32"])
def test_a_resnet_encoder_student_gives_the_teachers_pyramid_shapes(pyramid: str) -> None:
    config = DSKDConfig(
        memory="none",
        backbone="efficientnet_lite0",
        teacher_weights="random",
        image_size=64,
        pyramid=pyramid,
    )
    model = DSKD(config.replace(encoder_student="resnet"))
    assert any(isinstance(m, torch.nn.Conv2d) and m.kernel_size == (7, 7)
               for m in model.encoder_student.modules())  # ResNet's stem, not Lite's  # fmt: skip
    with torch.no_grad():
        out = model.eval()(torch.randn(2, 3, 64, 64))
    assert [f.shape for f in out["se"]] == [f.shape for f in out["teacher"]]
    assert all((f < 0).any() for f in out["se"])  # a linear read-out reaches signed teachers
    # Sd's loss still reaches the new Se through DF (df_input=se).
    model.train()
    model(torch.randn(2, 3, 64, 64))["sd"][0].sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0
               for p in model.encoder_student.parameters())  # fmt: skip
