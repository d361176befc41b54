"""ResNet teachers and encoder students from torchvision: the stage outputs at strides 4, 8, 16
(and 32: layer4, for the 8-16-32 pyramid)."""

from __future__ import annotations

import torch
from torch import nn

# torchvision is imported where a ResNet is built, not here: importing it takes longer than
# importing torch, and a run with another backbone (or none, as a dry run) needs none of it.

RESNET_CHANNELS: dict[str, tuple[int, int, int]] = {
    "resnet18": (64, 128, 256),
    "wide_resnet50_2": (256, 512, 1024),
}

# torchvision's official ImageNet weights for each backbone.
TORCHVISION_WEIGHTS: dict[str, str] = {
    "resnet18": "ResNet18_Weights.IMAGENET1K_V1",
    "wide_resnet50_2": "WideResNet50_2_Weights.IMAGENET1K_V1",
}

# Channels of layer1…layer4, the outputs at strides 4, 8, 16 and 32.
RESNET_STAGE_CHANNELS: dict[str, dict[int, int]] = {
    "resnet18": {4: 64, 8: 128, 16: 256, 32: 512},
    "wide_resnet50_2": {4: 256, 8: 512, 16: 1024, 32: 2048},
}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ResNetTrunk(nn.Module):
    """conv1 … layer3 of a torchvision ResNet (… layer4 when the pyramid reaches stride 32); the
    classifier is dropped."""

    def __init__(self, name: str, strides: tuple[int, ...] = (4, 8, 16)) -> None:
        from torchvision import models

        super().__init__()
        full = getattr(models, name)(weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = (
            full.conv1,
            full.bn1,
            full.relu,
            full.maxpool,
        )
        self.layer1, self.layer2, self.layer3 = full.layer1, full.layer2, full.layer3
        if 32 in strides:
            self.layer4 = full.layer4
        self.strides = tuple(strides)
        self.channels = tuple(RESNET_STAGE_CHANNELS[name][s] for s in strides)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        f4 = self.layer1(x)  # (B, C1, H/4, W/4)
        f8 = self.layer2(f4)  # (B, C2, H/8, W/8)
        f16 = self.layer3(f8)  # (B, C3, H/16, W/16)
        if self.strides == (4, 8, 16):
            return [f4, f8, f16]
        f32 = self.layer4(f16)  # (B, C4, H/32, W/32)
        levels = {4: f4, 8: f8, 16: f16, 32: f32}
        return [levels[s] for s in self.strides]


class ResNetStudent(nn.Module):
    """An encoder student of another architecture than its teacher (encoder_student="resnet"):
    a fresh ResNet18 trunk to the pyramid's deepest stride, each level read out by a 1×1 conv
    (with bias, no activation: it reaches signed teachers) to the teacher's channels there."""

    def __init__(self, channels: tuple[int, ...], strides: tuple[int, ...]) -> None:
        super().__init__()
        self.trunk = ResNetTrunk("resnet18", strides)
        self.heads = nn.ModuleList(
            nn.Conv2d(width, c, 1) for width, c in zip(self.trunk.channels, channels, strict=True)
        )
        self.channels = tuple(channels)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [head(f) for head, f in zip(self.heads, self.trunk(x), strict=True)]


def torchvision_imagenet_state_dict(name: str) -> dict[str, torch.Tensor]:
    """torchvision's official weights, from its cache or a download where the network allows."""
    from torchvision import models

    weights = models.get_weight(TORCHVISION_WEIGHTS[name])
    return weights.get_state_dict(progress=False, check_hash=True)
