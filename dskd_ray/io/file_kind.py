"""What a file is, from its first bytes: so that a wrong file given as a checkpoint, or about to
be overwritten by an export, is named in one line ("this looks like an ONNX file") rather than
handed to a loader whose error text says nothing useful. No torch, no Ray here.
"""

from __future__ import annotations

HEAD_BYTES = 64  # enough to tell every kind below apart

_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"BM", "a BMP image"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"%PDF", "a PDF document"),
    (b"\x1f\x8b", "a gzip file"),
    (b"PAR1", "a Parquet file"),
)
# An ONNX ModelProto opens with ir_version (field 1, a varint: 0x08 and one byte) followed by
# one of its other fields (producer_name 0x12, producer_version 0x1a, domain 0x22,
# model_version 0x28, doc_string 0x32, graph 0x3a, opset_import 0x42, metadata_props 0x72).
_ONNX_SECOND_FIELD = frozenset(b"\x12\x1a\x22\x28\x32\x3a\x42\x72")


def looks_like_onnx(head: bytes, name: str = "") -> bool:
    """An ONNX graph, by its name or by the way a serialized ModelProto starts."""
    if name.lower().endswith(".onnx"):
        return True
    return len(head) >= 3 and head[0] == 0x08 and head[1] < 0x80 and head[2] in _ONNX_SECOND_FIELD


def is_torch_archive(head: bytes) -> bool:
    """A `torch.save` file (a zip archive: every dskd_ray checkpoint is one)."""
    return head.startswith(b"PK\x03\x04")


def describe(head: bytes, name: str = "") -> str:
    """ "an ONNX file", "a JPEG image", "a Python pickle", "JSON", … or "" when unknown."""
    if not head:
        return "an empty file"
    if looks_like_onnx(head, name):
        return "an ONNX file"
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "a WebP image"
    if is_torch_archive(head):
        return "a zip archive"
    if head[0] == 0x80 and 2 <= head[1] <= 5:  # pickle's PROTO opcode and protocol
        return "a Python pickle"
    if head.lstrip()[:1] in (b"{", b"["):
        return "JSON"
    return "a text file" if _is_text(head) else ""


def _is_text(head: bytes) -> bool:
    if b"\x00" in head:
        return False
    for cut in range(4):  # the head may end inside a multi-byte character
        try:
            head[: len(head) - cut].decode("utf-8")
            return True
        except UnicodeDecodeError:
            continue
    return False
