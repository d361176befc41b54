"""A checkpoint's header (format, model id) without torch: what a dry run needs.

A checkpoint is a `torch.save` archive: a zip whose `data.pkl` holds the dict of settings, with
each tensor a reference to a storage record of its own. `dskd score --dry-run` needs only the
model id, so it reads `data.pkl` alone (tens of KB, read by range from object storage) with an
unpickler that builds nothing: every tensor becomes a placeholder, any other class is refused,
so no code runs. No torch is imported and no weight is read (a load takes ~700 MB of imports
and the whole file). The id is the one the file states; `load_checkpoint` verifies it against
the weights, which a dry run, which writes nothing, does not need.
"""

from __future__ import annotations

import collections
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
    """The model id a checkpoint states, or None when its header has none (files from before
    ids were stored: load it instead)."""
    model_id = read_header(uri)["meta"].get("model_id")
    return model_id if isinstance(model_id, str) else None
