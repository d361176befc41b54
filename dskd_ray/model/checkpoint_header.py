"""A checkpoint's header (format, model id) without torch: what a dry run needs.

A checkpoint is a `torch.save` archive: a zip whose `data.pkl` holds the dict of settings, with
each tensor a reference to a storage record of its own. `dskd score --dry-run` needs only the
model id, so it reads `data.pkl` alone (tens of KB, read by range from object storage) with an
unpickler that builds nothing: every tensor becomes a placeholder, any other class is refused,
so no code runs. No torch is imported and no weight is read (a load takes ~700 MB of imports
and the whole file). The id is the one the file states; `load_checkpoint` verifies it against
the weights, which a dry run, which writes nothing, does not need.

The model id itself is composed here (`model_identity`), since a dry run of an older file must
compose it from what that file states, without torch (docs/design.md §5).
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import pickle
import zipfile
from typing import Any

from dskd_ray.errors import CheckpointError
from dskd_ray.io import file_kind
from dskd_ray.io.storage import open_object, read_head, storage_errors

FORMAT_PREFIX = "dskd_ray.checkpoint/"
# The globals a checkpoint's data.pkl refers to: tensor rebuilders and storage types (stood in
# for by placeholders) and OrderedDict. Anything else is refused, as torch's weights_only does.
_TORCH_GLOBALS = {"_rebuild_tensor_v2", "_rebuild_parameter", "_rebuild_tensor"}


# Files before /7 state an id of the network alone (weights and config): the model id of such a
# file is composed from that and its threshold, as a /7 file's is.
NETWORK_ONLY_IDS = tuple(FORMAT_PREFIX + str(n) for n in range(1, 7))


def threshold_record(threshold: dict[str, Any] | None) -> dict[str, Any] | None:
    """What of a threshold (as stored) decides rows and the drift figure: every field the
    calibration wrote, the derived statistics left out."""
    if threshold is None:
        return None
    keep = ("value", "method", "quantile", "normal_scores")
    return {k: threshold.get(k) for k in keep}


def model_identity(network_id: str, threshold: dict[str, Any] | None) -> str:
    """The model id: the network's id (a hash of the weights and the config fields that change
    what they compute) joined with the threshold that turns a score into a verdict. Everything
    that decides a result row is inside it (docs/design.md §5)."""
    record = threshold_record(threshold)
    digest = hashlib.sha256(b"dskd_ray.model/7\0")
    digest.update(network_id.encode())
    digest.update(json.dumps(record, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def unfinished(uri: str | None, training: Any, epochs: Any) -> CheckpointError | None:
    """The one-line error for an interrupted training run's checkpoint (no memory bank, no
    calibration yet), where a finished one is needed; None for a finished one."""
    if not isinstance(training, dict) or training.get("complete"):
        return None
    where = f"{uri} is" if uri is not None else "this checkpoint is"
    return CheckpointError(
        f"{where} an unfinished training run (epoch {training.get('epoch', 0)} of {epochs}, "
        "not calibrated yet): finish it with the same `dskd train` command and --resume"
    )


def not_a_checkpoint(uri: str, head: bytes) -> CheckpointError | None:
    """The one-line error for a file that is not a PyTorch archive, or None if it is one."""
    if file_kind.is_torch_archive(head):
        return None
    kind = file_kind.describe(head, uri)
    looks = f"this looks like {kind}" if kind else "not a file PyTorch wrote"
    return CheckpointError(f"{uri} is not a dskd_ray checkpoint ({looks})")


class _Placeholder:
    """Stands for a tensor or a storage type: the header needs neither."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass


class _HeaderUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name in _TORCH_GLOBALS:
            return _Placeholder
        if module == "torch" and name.endswith("Storage"):
            return _Placeholder
        raise pickle.UnpicklingError(f"a checkpoint does not refer to {module}.{name}")

    def persistent_load(self, pid: Any) -> None:
        return None  # a tensor's storage record: not read


def read_header(uri: str) -> dict[str, Any]:
    """The checkpoint's settings with tensors as placeholders: `format`, `config`, `meta`
    (decoded), `threshold`… CheckpointError for a file that is not a checkpoint."""
    with storage_errors(uri):
        try:
            head = read_head(uri, file_kind.HEAD_BYTES)
        except FileNotFoundError as e:  # as load_checkpoint says it
            raise CheckpointError(f"checkpoint not found: {uri}") from e
        refused = not_a_checkpoint(uri, head)
        if refused is not None:
            raise refused
        try:
            with open_object(uri) as f, zipfile.ZipFile(f) as archive:
                [name] = [n for n in archive.namelist() if n.rsplit("/", 1)[-1] == "data.pkl"]
                data = archive.read(name)
        except (zipfile.BadZipFile, ValueError, KeyError) as e:
            raise CheckpointError(f"{uri} is not a dskd_ray checkpoint, or is corrupt") from e
    try:
        payload = _HeaderUnpickler(io.BytesIO(data)).load()
    except Exception as e:  # noqa: BLE001 - a truncated or foreign pickle
        raise CheckpointError(f"{uri} is not a dskd_ray checkpoint, or is corrupt") from e
    found = payload.get("format") if isinstance(payload, dict) else None
    if not isinstance(found, str) or not found.startswith(FORMAT_PREFIX):
        raise CheckpointError(f"{uri} is not a dskd_ray checkpoint (found format {found!r})")
    return {**payload, "meta": json.loads(payload.get("meta") or "{}")}


def read_model_id(uri: str) -> str | None:
    """The model id a checkpoint states (composed with its threshold for a file from before
    /7), or None when its header has none (files from before ids were stored: load it
    instead)."""
    header = read_header(uri)
    refused = unfinished(uri, header.get("training"), (header.get("config") or {}).get("epochs"))
    if refused is not None:
        raise refused
    stated = header["meta"].get("model_id")
    if not isinstance(stated, str):
        return None
    if header["format"] in NETWORK_ONLY_IDS:
        threshold = header.get("threshold")
        return model_identity(stated, threshold if isinstance(threshold, dict) else None)
    return stated
