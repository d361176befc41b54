"""What the exporter and the ONNX Runtime backend both know of a graph: its input and output
names, its metadata, and the session that runs it. No torch here: `runtime.py` scores with it
and never imports the exporter, `export.py` writes and checks with it."""

from __future__ import annotations

from dskd_ray.errors import DSKDError

METADATA = "dskd_ray."  # prefix of every metadata key this library writes
INPUT_NAME, OUTPUT_NAMES = "image", ("anomaly_map", "score")


class ExportError(DSKDError):
    """An export that cannot be done exactly; nothing was written."""


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "absent"


def _missing_onnx() -> list[str]:
    return [m for m in ("onnx", "onnxruntime", "onnxscript") if _version(m) == "absent"]


def onnx_installed() -> bool:
    """The onnx extra is installed: a graph can be exported and run."""
    return not _missing_onnx()


def _require_onnx() -> None:
    missing = _missing_onnx()
    if missing:
        raise ExportError(
            f"ONNX export and the onnxruntime backend need {', '.join(missing)}: "
            "pip install 'dskd_ray[onnx]'"
        )


def with_metadata(graph: bytes, metadata: dict[str, str]) -> bytes:
    import onnx

    proto = onnx.load_from_string(graph)
    del proto.metadata_props[:]
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    proto.doc_string = "dskd_ray anomaly scoring: image → anomaly_map, score"
    return proto.SerializeToString()


def read_metadata(graph: bytes | str) -> dict[str, str]:
    """The dskd_ray metadata of a serialised graph (bytes) or a graph file."""
    import onnx

    proto = onnx.load_from_string(graph) if isinstance(graph, bytes) else onnx.load(graph)
    return {
        p.key[len(METADATA) :]: p.value for p in proto.metadata_props if p.key.startswith(METADATA)
    }


def session_for(graph: bytes | str, threads: int | None = None):  # noqa: ANN201 - ort session
    """An ONNX Runtime CPU session for a serialised graph (bytes) or a graph file."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ExportError(
            "the onnxruntime backend needs onnxruntime: pip install 'dskd_ray[onnx]'"
        ) from e
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3  # warnings about unused initialisers are noise
    return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
