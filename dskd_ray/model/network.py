"""The DSKD network (docs/design.md §1): frozen teacher, encoder student Se, DF embedding,
decoder student Sd, the teacher's memory; and `DSKD.predict`, its anomaly maps and image
scores (§2).

Pure PyTorch: no Ray, no storage, no CLI. Shapes in comments are for a 256×256 input and ResNet18.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from dskd_ray.config import DSKDConfig
from dskd_ray.model.anomaly_map import (
    MEMORY_STRIDES,
    apply_baseline,
    fuse_members,
    image_score,
    level_maps,
    member_maps,
    member_weights,
    memory_distances,
    memory_features,
    memory_member,
)
from dskd_ray.model.backbones import (
    backbone_spec,
    build_encoder_student,
    build_trunk,
    load_teacher_weights,
)


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """ResNet's BasicBlock, with a 1×1 strided projection when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = conv3x3(cin, cout, stride), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = conv3x3(cout, cout), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class DeconvBlock(nn.Module):
    """Reverse Distillation's decoder block: stride-2 convs become ConvTranspose2d(k=2, s=2).

    `linear_output` drops the final ReLU so the block can reach signed teacher features.
    """

    def __init__(self, cin: int, cout: int, upsample: bool, linear_output: bool = False) -> None:
        super().__init__()
        if upsample:
            self.conv1: nn.Module = nn.ConvTranspose2d(cin, cout, 2, stride=2, bias=False)
        else:
            self.conv1 = conv3x3(cin, cout)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = conv3x3(cout, cout), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.linear_output = linear_output
        self.shortcut: nn.Module = nn.Identity()
        if upsample:
            self.shortcut = nn.Sequential(
                nn.ConvTranspose2d(cin, cout, 2, stride=2, bias=False), nn.BatchNorm2d(cout)
            )
        elif cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out)) + self.shortcut(x)
        return out if self.linear_output else self.relu(out)


class DFEmbedding(nn.Module):
    """Deep-feature embedding: fuse the three pyramid levels into one compact 1/32 code.

    Level 1 is strided down twice and level 2 once, to level 3's shape; the concatenation
    goes through a ResNet stage of two BasicBlocks. For the 4-8-16 pyramid the stage's first
    block has stride 2 and doubles the channels (code 2·C3 at 1/32); for 8-16-32 level 3 is
    already at 1/32, so the stage keeps the size (no 1/64 code, which would need image sizes in
    multiples of 64) and the code has C3 channels, as wide as the deepest level.
    """

    def __init__(self, channels: tuple[int, int, int], strided: bool = True) -> None:
        super().__init__()
        c1, c2, c3 = channels

        def down(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(conv3x3(cin, cout, 2), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.level1 = nn.Sequential(down(c1, c2), down(c2, c3))
        self.level2 = down(c2, c3)
        code = 2 * c3 if strided else c3
        self.stage = nn.Sequential(
            BasicBlock(3 * c3, code, stride=2 if strided else 1), BasicBlock(code, code)
        )
        self.out_channels = code

    def forward(self, pyramid: list[torch.Tensor]) -> torch.Tensor:
        f1, f2, f3 = pyramid
        fused = torch.cat([self.level1(f1), self.level2(f2), f3], dim=1)  # (B, 768, 16, 16)
        return self.stage(fused)  # (B, 512, 8, 8)


class DecoderStudent(nn.Module):
    """Sd: a reverse trunk from the 1/32 code back up to the teacher's three levels.

    Its stages are named by the stride they end at (stage16, stage8, stage4 for the default
    pyramid). The deepest stage upsamples the code ×2 unless the code is at that level's size
    already (the 8-16-32 pyramid).
    """

    def __init__(
        self,
        channels: tuple[int, int, int],
        in_channels: int,
        signed: bool,
        strides: tuple[int, int, int] = (4, 8, 16),
    ) -> None:
        super().__init__()
        c1, c2, c3 = channels

        def stage(cin: int, cout: int, upsample: bool = True) -> nn.Sequential:
            return nn.Sequential(
                DeconvBlock(cin, cout, upsample=upsample),
                DeconvBlock(cout, cout, upsample=False, linear_output=signed),
            )

        s1, s2, s3 = strides
        self.names = (f"stage{s3}", f"stage{s2}", f"stage{s1}")  # deepest first
        setattr(self, self.names[0], stage(in_channels, c3, upsample=s3 < 32))
        setattr(self, self.names[1], stage(c3, c2))
        setattr(self, self.names[2], stage(c2, c1))
        self.signed = signed

    def forward(self, code: torch.Tensor) -> list[torch.Tensor]:
        deep, middle, shallow = (getattr(self, name) for name in self.names)
        f3 = deep(code)  # (B, 256, 16, 16)
        # A signed level ends linear; the next stage still wants a rectified input.
        f2 = middle(torch.relu(f3) if self.signed else f3)  # (B, 128, 32, 32)
        f1 = shallow(torch.relu(f2) if self.signed else f2)  # (B, 64, 64, 64)
        return [f1, f2, f3]


class PatchMemory(nn.Module):
    """The teacher's memory: a bank of normal teacher patches (`anomaly_map.memory_features`)
    and the two numbers that put its distance map beside the students' maps (docs/design.md
    §2). All buffers, fitted after training (`train.fit_memory`, `train.calibrate`).

    The bank's length depends on the data, so loading a state dict takes the stored bank's
    length; its width must be this teacher's.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("bank", torch.zeros(0, channels))  # (N, C8 + C16)
        # The distance map's normal spread (as each student level's, config.level_normalization)
        # and the gain that gives the standardised map a student's normal spread.
        self.register_buffer("spread", torch.ones(()))
        self.register_buffer("gain", torch.ones(()))

    @property
    def channels(self) -> int:
        return self.bank.shape[1]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        bank = state_dict.get(prefix + "bank")
        if isinstance(bank, torch.Tensor) and bank.ndim == 2 and bank.shape[1] == self.channels:
            self.bank = torch.empty_like(bank, device=self.bank.device, dtype=self.bank.dtype)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def distances(self, teacher: list[torch.Tensor], strides: tuple[int, ...]) -> torch.Tensor:
        """(B, H/8, W/8): each patch's distance to its nearest bank patch."""
        return memory_distances(memory_features(teacher, strides), self.bank.float())

    def scale(self) -> torch.Tensor:
        return self.gain / self.spread


class DSKD(nn.Module):
    """Teacher plus one or two students (or none) and, optionally, the teacher's memory.
    `forward` returns the pyramids to compare.

    Output: {"teacher": [T1, T2, T3], "se": [...], "sd": [...]} with only the active students.
    """

    def __init__(self, config: DSKDConfig, load_weights: bool = True) -> None:
        super().__init__()
        self.config = config
        spec = backbone_spec(config.backbone, config.strides)
        self.spec = spec
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)
        # Per student (rows se, sd) and level: where each level map sits and how far it spreads
        # on normal images, fitted after training (config.level_normalization); the map fuses
        # (m − location) / spread. 0 and 1 until fitted.
        self.register_buffer("level_location", torch.zeros(2, 3))
        self.register_buffer("level_spread", torch.ones(2, 3))
        # The final map's per-pixel mean on normal training images, divided out
        # (config.map_baseline="mean") or subtracted ("subtract"); fitted after training.
        size = config.image_size
        self.register_buffer("pixel_baseline", torch.ones(size, size))

        if config.feature_norm == "standardize":
            # Per level, each teacher channel's mean and std over the training images' features,
            # fitted once before training (train.fit_feature_statistics); 0 and 1 until then.
            for k, channels in enumerate(spec.channels):
                self.register_buffer(f"feature_mean{k}", torch.zeros(1, channels, 1, 1))
                self.register_buffer(f"feature_std{k}", torch.ones(1, channels, 1, 1))

        self.teacher = build_trunk(config.backbone, student=False, strides=config.strides)
        self.teacher_identity = "unloaded"
        if load_weights:
            self.teacher_identity = load_teacher_weights(
                self.teacher, config.backbone, config.teacher_weights
            )
        self.teacher.requires_grad_(False)
        self.teacher.eval()

        self.memory = (
            PatchMemory(sum(spec.channels[config.strides.index(s)] for s in MEMORY_STRIDES))
            if config.has_memory
            else None
        )
        self.encoder_student = (
            build_encoder_student(config.encoder_student, config.backbone, config.strides)
            if config.uses_encoder_student
            else None
        )
        self.df_embedding: DFEmbedding | None = None
        self.decoder_student: DecoderStudent | None = None
        if config.uses_decoder_student:
            # The 1/32 code: strided down from a stride-16 level 3, level 3's own size else.
            self.df_embedding = DFEmbedding(spec.channels, strided=config.strides[-1] < 32)
            self.decoder_student = DecoderStudent(
                spec.channels, self.df_embedding.out_channels, spec.signed, config.strides
            )

    def train(self, mode: bool = True) -> DSKD:
        super().train(mode)
        self.teacher.eval()  # BatchNorm statistics stay fixed whatever the caller does
        return self

    def student_modules(self) -> list[nn.Module]:
        parts = [self.encoder_student, self.df_embedding, self.decoder_student]
        return [p for p in parts if p is not None]

    def student_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.student_modules() for p in m.parameters()]

    def level_statistics(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(location, spread) for the anomaly map, or (None, None) for raw level maps."""
        if self.config.level_normalization == "none":
            return None, None
        return self.level_location, self.level_spread

    def baseline(self) -> torch.Tensor | None:
        """The per-pixel divisor of the anomaly map, or None when maps are not divided."""
        return None if self.config.map_baseline == "none" else self.pixel_baseline

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """RGB in [0, 1] → the backbone's own input normalisation."""
        return (images - self.mean) / self.std

    def teacher_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Teacher pyramid of a normalised batch; cacheable, since the teacher never changes."""
        with torch.no_grad():
            return self.teacher(x)

    def feature_statistics(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(mean, std)] per level, each (1, C_k, 1, 1); empty unless feature_norm=standardize."""
        if self.config.feature_norm != "standardize":
            return []
        return [
            (getattr(self, f"feature_mean{k}"), getattr(self, f"feature_std{k}"))
            for k in range(len(self.spec.channels))
        ]

    def comparable(self, features: dict[str, list[torch.Tensor]]) -> dict[str, list[torch.Tensor]]:
        """The pyramids as the loss and the map compare them: unchanged, or, with
        feature_norm=standardize, every one (teacher's and students' alike) in float32 units of
        the teacher's per-channel training statistics (docs/design.md §3)."""
        statistics = self.feature_statistics()
        if not statistics:
            return features
        return {
            name: [(f.float() - m) / s for f, (m, s) in zip(pyramid, statistics, strict=True)]
            for name, pyramid in features.items()
        }

    def student_features(
        self, x: torch.Tensor, teacher: list[torch.Tensor]
    ) -> dict[str, list[torch.Tensor]]:
        out: dict[str, list[torch.Tensor]] = {}
        se = self.encoder_student(x) if self.encoder_student is not None else None
        if se is not None:
            out["se"] = se
        if self.decoder_student is not None and self.df_embedding is not None:
            # df_input="se": Sd's loss trains Se through DF, so the students interact.
            source = se if (self.config.df_input == "se" and se is not None) else teacher
            out["sd"] = self.decoder_student(self.df_embedding(source))
        return out

    def forward(self, x: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        """x: normalised images (B, 3, H, W) → the pyramids as compared (`comparable`)."""
        return self.pyramids(x)[1]

    def pyramids(self, x: torch.Tensor) -> tuple[list[torch.Tensor], dict[str, list[torch.Tensor]]]:
        """The teacher's raw pyramid (what the memory holds) and every pyramid as compared."""
        teacher = self.teacher_features(x)
        return teacher, self.comparable({"teacher": teacher, **self.student_features(x, teacher)})

    @torch.inference_mode()
    def predict(
        self,
        images: torch.Tensor,
        remove_baseline: bool = True,
        autocast_dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """RGB in [0, 1], (B, 3, H, W) → anomaly maps (B, H, W) and image scores (B,).

        The one inference function: scoring, calibration and evaluation call it. Call it in
        eval mode (`Checkpoint.build_model` gives that). `remove_baseline=False` gives the map
        before the per-pixel baseline (to fit that baseline); `autocast_dtype` runs the
        networks, not the map arithmetic, under autocast.
        """
        return self.maps_and_scores(images, remove_baseline, autocast_dtype)

    def maps_and_scores(
        self,
        images: torch.Tensor,
        remove_baseline: bool = True,
        autocast_dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`predict` without its inference mode: what an export traces (dskd_ray.onnx.export)."""
        cfg = self.config
        members = self.members(images, autocast_dtype)
        weights = None
        if self.memory is not None:
            weights = member_weights(len(members) - 1, cfg.memory_weight)
        maps = fuse_members(members, cfg.blur_sigma, weights=weights)
        maps = apply_baseline(maps, self.baseline() if remove_baseline else None, cfg.map_baseline)
        return maps, image_score(maps, cfg.score_top_k)

    def members(
        self, images: torch.Tensor, autocast_dtype: torch.dtype | None = None
    ) -> list[torch.Tensor]:
        """RGB in [0, 1] → [(B, H, W)]: each student's fused levels, then the memory's level
        (docs/design.md §2, step 2), before they are averaged."""
        amp = (
            torch.autocast(images.device.type, dtype=autocast_dtype)
            if autocast_dtype is not None
            else contextlib.nullcontext()
        )
        x = self.normalize(images)
        with amp:
            teacher, features = self.pyramids(x)
        location, spread = self.level_statistics()
        cfg = self.config
        size = tuple(images.shape[-2:])
        members = member_maps(
            level_maps(features, cfg.distance), size, cfg.level_fusion, location, spread
        )
        if self.memory is not None:
            # The raw teacher, as the bank holds it (not `comparable`'s standardised one), and
            # outside autocast: the search's ‖q‖² + ‖b‖² − 2q·b needs float32's digits.
            distances = self.memory.distances(teacher, cfg.strides)
            members.append(memory_member(distances, size, self.memory.scale()))
        return members
