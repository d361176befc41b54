"""Checkpoints (docs/design.md §5): one file with weights, config, threshold and provenance.

Saved with torch.save and loaded with `weights_only=True`, so loading never runs pickled code.
Written atomically (`storage.write_object`): locally a temp file fsync'd and renamed into place;
on object storage a single PUT.
"""

from __future__ import annotations

import hashlib
import io
import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dskd_ray import __version__
from dskd_ray.config import DSKDConfig
from dskd_ray.errors import CheckpointError, StorageError
from dskd_ray.io.storage import describe_failure, exists, read_object, storage_errors, write_object
from dskd_ray.model.checkpoint_header import (
    NETWORK_ONLY_IDS,
    check_threshold,
    model_identity,
    unfinished,
)
from dskd_ray.model.network import DSKD

FORMAT = "dskd_ray.checkpoint/7"
# /6 → /7: the model id covers the threshold as well as the network (weights and config), so two
# checkpoints that would write different verdicts never share an id (docs/design.md §5). The
# network's own id is kept beside it (`meta["network_id"]`); an older file's stated id is that
# network id, verified as before, and its model id is composed from it and its threshold.
# /5 → /6: `memory_weight_fit` joined the config (the memory's weight picked after training
# from synthetic defects); a /5 file kept the weight it was given, which is "none". Not in the
# model id (like lr: the fitted weight, which is, says what the model computes).
# /4 → /5: the teacher's memory (`memory`, `memory_size`, `memory_sampling`; buffers under
# `memory.`) and `students="none"`, and the students' training and architecture switches
# (docs/design.md §1, §3) joined the config; a /4 file is a model without memory whose switches
# are at the values that were the only behaviour then.
# /3 → /4: tiling (`tiled`, `tile_overlap`) joined the config and the model id's fields.
# /2 → /3: the per-pixel baseline buffer `map_baseline` became `pixel_baseline` (the config's
# `map_baseline` names the rule, the buffer holds the fitted values).
# /1 → /2: per-level normalisation became (m − location) / spread (was m / scale, named
# `map_normalization` and `level_scales`); the image score gained `score_top_k`.
V1, V2, V3 = "dskd_ray.checkpoint/1", "dskd_ray.checkpoint/2", "dskd_ray.checkpoint/3"
V4, V5, V6 = "dskd_ray.checkpoint/4", "dskd_ray.checkpoint/5", "dskd_ray.checkpoint/6"
OLDER_FORMATS = (V1, V2, V3, V4, V5, V6)
V1_MODEL_ID_FIELDS = (
    "backbone", "students", "df_input", "level_fusion", "map_normalization", "image_size",
    "blur_sigma",
)  # fmt: skip
# The config fields that change what a model computes; with the weights, they make its id.
V3_MODEL_ID_FIELDS = (
    "backbone", "students", "df_input", "level_fusion", "level_normalization", "map_baseline",
    "image_size", "blur_sigma", "score_top_k",
)  # fmt: skip
V4_MODEL_ID_FIELDS = (*V3_MODEL_ID_FIELDS, "tiled", "tile_overlap")
# Training-only switches (loss form, hard mining, …) are in the config but not here: like lr,
# they change the weights, which the id hashes, not what given weights compute. The bank's size
# and sampling are not here either: the bank itself is in the weights.
MODEL_ID_FIELDS = (
    *V4_MODEL_ID_FIELDS, "memory", "memory_weight", "feature_norm", "distance", "pyramid",
    "encoder_student",
)  # fmt: skip
# What a /5 file was, in the field /6 added.
V5_DEFAULTS: dict[str, Any] = {"memory_weight_fit": "none"}
# What a /4 file was, in the fields /5 and /6 added: the values that reproduce its behaviour.
V4_DEFAULTS: dict[str, Any] = {
    "memory": "none", "loss_form": "pixel", "hard_mining": 0.0, "feature_norm": "none",
    "distance": "cosine", "denoise": 0.0, "pyramid": "4-8-16", "encoder_student": "teacher",
    "optimizer": "adam", **V5_DEFAULTS,
}  # fmt: skip


@dataclass
class Threshold:
    """Image threshold and the normal-score statistics it came from (docs/design.md §3).

    An image is anomalous when its score is above `value` (`metrics.is_anomalous`)."""

    value: float
    method: str  # "quantile" of held-out normal scores, or "f1" on labelled validation images
    quantile: float | None
    normal_scores: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        # Plain floats: what the model id hashes and a weights-only load reads back (a numpy
        # scalar would be neither).
        self.value = float(self.value)
        self.quantile = None if self.quantile is None else float(self.quantile)
        self.normal_scores = [float(s) for s in self.normal_scores]

    @property
    def mean(self) -> float:
        s = self.normal_scores
        return sum(s) / len(s) if s else float("nan")

    @property
    def std(self) -> float:
        s = self.normal_scores
        if len(s) < 2:
            return float("nan")
        m = self.mean
        return (sum((x - m) ** 2 for x in s) / (len(s) - 1)) ** 0.5

    def to_dict(self) -> dict[str, Any]:
        return {
            "value": self.value,
            "method": self.method,
            "quantile": self.quantile,
            "normal_scores": list(self.normal_scores),
            "normal_mean": self.mean,
            "normal_std": self.std,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Threshold:
        return cls(d["value"], d["method"], d.get("quantile"), list(d.get("normal_scores", [])))


@dataclass
class Checkpoint:
    config: DSKDConfig
    state_dict: dict[str, torch.Tensor]
    threshold: Threshold | None = None
    teacher_identity: str = "unknown"
    meta: dict[str, Any] = field(default_factory=dict)
    # Present while training is unfinished, for --resume: epoch, optimizer, scheduler.
    training: dict[str, Any] | None = None

    @property
    def network_id(self) -> str:
        """The hash of the weights and the config fields that change what they compute."""
        return self.meta.get("network_id") or compute_network_id(self.config, self.state_dict)

    @property
    def model_id(self) -> str:
        """The id every result row names: the network's, joined with the threshold (§5)."""
        return model_identity(self.network_id, self.threshold.to_dict() if self.threshold else None)

    @property
    def finished(self) -> bool:
        """Trained, with its memory fitted and calibrated: ready to score."""
        return self.training is None or bool(self.training.get("complete"))

    def require_finished(self, uri: str | Path | None = None) -> None:
        """One line for an interrupted run's checkpoint, where scoring needs a finished one."""
        refused = unfinished(
            str(uri) if uri is not None else None, self.training, self.config.epochs
        )
        if refused is not None:
            raise refused

    def build_model(self) -> DSKD:
        """The network with these weights, teacher included, in eval mode; no download needed.

        The memory bank's length comes from the state dict (it depends on the data); a bank
        that is not (N, channels) with N ≥ 1 in a finished checkpoint is refused in one line.
        """
        model = DSKD(self.config, load_weights=False)
        if model.memory is not None:
            self._check_bank(model.memory.channels)
        missing, unexpected = model.load_state_dict(self.state_dict, strict=False)
        if missing or unexpected:
            raise CheckpointError(
                f"checkpoint does not fit its own config: missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}"
            )
        model.teacher_identity = self.teacher_identity
        return model.eval()

    def _check_bank(self, channels: int) -> None:
        bank = self.state_dict.get("memory.bank")
        shape = tuple(bank.shape) if isinstance(bank, torch.Tensor) else None
        unfinished = self.training is not None and not self.training.get("complete")
        fits = (
            shape is not None
            and len(shape) == 2
            and shape[1] == channels
            and bank.is_floating_point()
            and (shape[0] >= 1 or unfinished)  # the bank is fitted after the last epoch
        )
        if not fits:
            raise CheckpointError(
                f"checkpoint's memory bank is {shape if shape is not None else 'missing'}, not "
                f"(N ≥ 1, {channels}) floats as its config (memory=knn, {self.config.backbone}) "
                "needs: the file is damaged; copy it again or retrain"
            )


def compute_network_id(config: DSKDConfig, state_dict: dict[str, torch.Tensor]) -> str:
    """Content hash of the weights and the model-defining config: same network, same id."""
    return _content_hash(config.to_dict(), MODEL_ID_FIELDS, state_dict)


def compute_model_id(
    config: DSKDConfig, state_dict: dict[str, torch.Tensor], threshold: Threshold | None
) -> str:
    """The model id: the network's id joined with the threshold (docs/design.md §5)."""
    record = threshold.to_dict() if threshold else None
    return model_identity(compute_network_id(config, state_dict), record)


def _content_hash(
    config: dict[str, Any], fields: tuple[str, ...], state_dict: dict[str, torch.Tensor]
) -> str:
    digest = hashlib.sha256()
    model_fields = {k: v for k, v in config.items() if k in fields}
    digest.update(json.dumps(model_fields, sort_keys=True).encode())
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous().reshape(-1)
        digest.update(key.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def library_versions() -> dict[str, str]:
    from importlib.metadata import version

    import numpy

    return {
        "dskd_ray": __version__,
        "torch": torch.__version__,
        "torchvision": version("torchvision"),  # not imported: that alone takes seconds
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }


def make_checkpoint(
    model: DSKD,
    threshold: Threshold | None = None,
    training: dict[str, Any] | None = None,
    extra_meta: dict[str, Any] | None = None,
) -> Checkpoint:
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    meta = {
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": library_versions(),
        **(extra_meta or {}),
    }
    meta["network_id"] = compute_network_id(model.config, state)
    ckpt = Checkpoint(model.config, state, threshold, model.teacher_identity, meta, training)
    meta["model_id"] = ckpt.model_id
    return ckpt


def save_checkpoint(ckpt: Checkpoint, uri: str | Path) -> None:
    payload = {
        "format": FORMAT,
        "config": ckpt.config.to_dict(),
        "state_dict": ckpt.state_dict,
        "threshold": ckpt.threshold.to_dict() if ckpt.threshold else None,
        "teacher_identity": ckpt.teacher_identity,
        # The ids as the file's content makes them now: a threshold set after the checkpoint
        # was made is in its id.
        "meta": json.dumps({**ckpt.meta, "network_id": ckpt.network_id, "model_id": ckpt.model_id}),
        "training": ckpt.training,
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    with storage_errors(str(uri)):
        write_object(str(uri), buffer.getvalue(), durable=True)


def load_checkpoint(uri: str | Path) -> Checkpoint:
    uri = str(uri)
    try:
        blob = read_object(uri)
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint not found: {uri}") from e
    except Exception as e:  # noqa: BLE001 - an unreachable store: one line, not a traceback
        raise StorageError(f"cannot read checkpoint {uri}: {describe_failure(e)}") from e
    payload = _torch_load(uri, blob)
    found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
    if not isinstance(found, str) or not found.startswith("dskd_ray.checkpoint/"):
        raise CheckpointError(f"{uri} is not a dskd_ray checkpoint (found format {found!r})")
    meta = json.loads(payload.get("meta") or "{}")
    if found != FORMAT and found not in OLDER_FORMATS:
        raise CheckpointError(
            f"{uri} is a {found!r} checkpoint; this dskd_ray {__version__} reads {FORMAT} "
            f"and {', '.join(OLDER_FORMATS)}"
        )
    threshold = _read_threshold(uri, payload.get("threshold"))
    # Verified as written (an older file's id is its network's, hashed with the fields that
    # version hashed), then renamed; the model id joins the threshold to the network's id.
    fields = {
        V1: V1_MODEL_ID_FIELDS, V2: V3_MODEL_ID_FIELDS, V3: V3_MODEL_ID_FIELDS,
        V4: V4_MODEL_ID_FIELDS,
    }.get(found, MODEL_ID_FIELDS)  # fmt: skip
    network_id = _content_hash(payload["config"], fields, payload["state_dict"])
    model_id = model_identity(network_id, threshold.to_dict() if threshold else None)
    if found in NETWORK_ONLY_IDS:
        _verify(uri, meta.get("model_id"), network_id, "weights")
    else:
        _verify(uri, meta.get("network_id"), network_id, "weights")
        _verify(uri, meta.get("model_id"), model_id, "threshold")
    meta = {**meta, "network_id": network_id, "model_id": model_id}
    if found == V1:
        payload = _upgrade_from_v1(payload)
    if payload["format"] == V2:
        payload = _upgrade_from_v2(payload)
    if payload["format"] == V3:
        payload = _upgrade_from_v3(payload)
    if payload["format"] == V4:
        payload = _upgrade_from_v4(payload)
    if payload["format"] == V5:
        payload = {**payload, "format": V6, "config": {**payload["config"], **V5_DEFAULTS}}
    config = DSKDConfig.from_dict(payload["config"])
    return Checkpoint(
        config=config,
        state_dict=payload["state_dict"],
        threshold=threshold,
        teacher_identity=payload.get("teacher_identity", "unknown"),
        meta=meta,
        training=payload.get("training"),
    )


def _torch_load(uri: str, blob: bytes) -> Any:
    """`torch.load(weights_only=True)` of a file that should be a checkpoint. A file that is
    not one (an ONNX graph, an image, JSON, a pickle) is named in one line; PyTorch's own text
    is not shown (-v has it in the traceback): it advises `weights_only=False`, which would run
    whatever code a pickle holds."""
    from dskd_ray.io import file_kind
    from dskd_ray.model.checkpoint_header import not_a_checkpoint

    refused = not_a_checkpoint(uri, blob[: file_kind.HEAD_BYTES])
    if refused is not None:
        raise refused
    try:
        return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a truncated archive, a pickle with code, …
        raise CheckpointError(
            f"{uri} is not a dskd_ray checkpoint, or is corrupt (PyTorch could not read it as "
            "weights and settings only)"
        ) from e


def _verify(uri: str, stored: Any, recomputed: str, what: str) -> None:
    """Refuse a file whose content is not what its stated id was made from.

    The id names the model in every result row and decides what incremental scoring skips, so
    a flipped bit in the weights or the threshold must not borrow the id of the good model it
    came from. `what`: "weights" (the network's id) or "threshold" (the model id over both).
    """
    if stored is None or recomputed == stored:
        return
    if what == "weights":
        mismatch = (
            f"its weights do not match the id they were saved with (network id stored {stored}"
        )
    else:
        mismatch = f"its threshold does not match its model id (stored {stored}"
    raise CheckpointError(
        f"{uri} is corrupt: {mismatch}, recomputed {recomputed}); copy it again or retrain"
    )


def _read_threshold(uri: str, raw: Any) -> Threshold | None:
    """The stored threshold, checked (`checkpoint_header.check_threshold`)."""
    checked = check_threshold(uri, raw)
    return Threshold.from_dict(checked) if checked is not None else None


def _upgrade_from_v1(payload: dict[str, Any]) -> dict[str, Any]:
    """A /1 checkpoint as /2: same weights, same maps and scores, new names."""
    config = dict(payload["config"])
    normalization = config.pop("map_normalization", "none")
    config["level_normalization"] = "mean" if normalization == "normal" else "none"
    state = dict(payload["state_dict"])
    scales = state.pop("level_scales", torch.ones(2, 3))
    state["level_location"] = torch.zeros_like(scales)
    state["level_spread"] = scales
    if "map_baseline" not in state:  # written before the per-pixel baseline existed
        config["map_baseline"] = "none"
        size = int(config.get("image_size", 256))
        state["map_baseline"] = torch.ones(size, size)
    return {**payload, "format": V2, "config": config, "state_dict": state}


def _upgrade_from_v2(payload: dict[str, Any]) -> dict[str, Any]:
    """A /2 checkpoint as /3: the baseline buffer renamed, nothing else."""
    state = dict(payload["state_dict"])
    state["pixel_baseline"] = state.pop("map_baseline")
    return {**payload, "format": V3, "state_dict": state}


def _upgrade_from_v3(payload: dict[str, Any]) -> dict[str, Any]:
    """A /3 checkpoint as /4: written before tiling, so an untiled model."""
    config = {**payload["config"], "tiled": False}
    return {**payload, "format": V4, "config": config}


def _upgrade_from_v4(payload: dict[str, Any]) -> dict[str, Any]:
    """A /4 checkpoint as today's: written before the teacher's memory and the students' switches,
    so a model without memory and each switch at the value that was the only behaviour then."""
    config = {**payload["config"], **V4_DEFAULTS}
    return {**payload, "format": FORMAT, "config": config}


def checkpoint_exists(uri: str | Path) -> bool:
    with storage_errors(str(uri)):
        return exists(str(uri))
