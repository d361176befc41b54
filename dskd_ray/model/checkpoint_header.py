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
import math
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
# Every format this version reads, the current one last (`checkpoint.FORMAT`, `OLDER_FORMATS`).
READABLE_FORMATS = (*NETWORK_ONLY_IDS, FORMAT_PREFIX + "7")


def unreadable_format(uri: str, found: str) -> CheckpointError | None:
    """The one-line error for a checkpoint of a format this version does not read (a later
    one), as `load_checkpoint` words it; None for one it reads."""
    if found in READABLE_FORMATS:
        return None
    from dskd_ray import __version__

    return CheckpointError(
        f"{uri} is a {found!r} checkpoint; this dskd_ray {__version__} reads "
        f"{READABLE_FORMATS[-1]} and {', '.join(READABLE_FORMATS[:-1])}"
    )


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


def _real(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def check_threshold(uri: str, raw: Any) -> dict[str, Any] | None:
    """A stored threshold (as saved: a dict, or None), checked: a finite number and, for a
    quantile, the quantile of the held-out scores it was fitted on (what catches a damaged
    threshold in a file from before the model id covered it, and in a dry run, which reads no
    weights). A NaN would make every image normal; an exponent bit flipped, nearly every one.
    Returns it with its numbers as floats; CheckpointError in one line."""
    if raw is None:
        return None
    damaged = f"{uri} is corrupt: its threshold"
    advice = "copy it again or retrain"
    if not isinstance(raw, dict) or not _real(raw.get("value")):
        found = raw.get("value") if isinstance(raw, dict) else raw
        raise CheckpointError(f"{damaged} is {found!r}, not a finite number; {advice}")
    scores, quantile = raw.get("normal_scores", []), raw.get("quantile")
    if not isinstance(scores, list) or not all(_real(x) for x in scores):
        raise CheckpointError(f"{damaged}'s held-out scores are not finite numbers; {advice}")
    if quantile is not None and not (_real(quantile) and 0.0 <= quantile <= 1.0):
        raise CheckpointError(f"{damaged}'s quantile is {quantile!r}, not from 0 to 1; {advice}")
    if not isinstance(raw.get("method"), str):
        raise CheckpointError(f"{damaged}'s method is {raw.get('method')!r}; {advice}")
    value = float(raw["value"])
    if raw["method"] == "quantile" and quantile is not None and scores:
        import numpy as np  # only here: the header is read in processes that need no numpy

        expected = float(np.quantile(np.asarray(scores, np.float32), quantile))
        if not math.isclose(value, expected, rel_tol=1e-4, abs_tol=1e-9):
            raise CheckpointError(
                f"{damaged} {value:.6g} is not the {quantile:g} quantile of the held-out scores "
                f"it was fitted on ({expected:.6g}); {advice}"
            )
    return {
        "value": value, "method": raw["method"],
        "quantile": None if quantile is None else float(quantile),
        "normal_scores": [float(x) for x in scores],
    }  # fmt: skip


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
    threshold = check_threshold(uri, header.get("threshold"))
    stated = header["meta"].get("model_id")
    if not isinstance(stated, str):
        return None
    if header["format"] in NETWORK_ONLY_IDS:
        return model_identity(stated, threshold)
    network = header["meta"].get("network_id")
    if isinstance(network, str) and model_identity(network, threshold) != stated:
        raise CheckpointError(
            f"{uri} is corrupt: its threshold does not match its model id (stored {stated}, "
            f"recomputed {model_identity(network, threshold)}); copy it again or retrain"
        )
    return stated
