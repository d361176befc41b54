"""The anomaly-map file: a 16-bit greyscale PNG with its scale in a text chunk, and its key.

A map is quantised per image (its maximum becomes 65535), so the PNG shows the map's full
contrast in any viewer and keeps 16 bits of precision relative to the image's score; the float
map is the PNG's values times the scale, which the file carries itself (and each result row too).
"""

from __future__ import annotations

import hashlib
import io
import posixpath
import re

import numpy as np
from PIL import Image, PngImagePlugin

from dskd_ray.io.storage import join_uri

MAP_SCALE_KEY = "dskd_ray:map_scale"
MAP_LEVELS = 65535


def quantize_map(anomaly_map: np.ndarray) -> tuple[np.ndarray, float]:
    """float map (H, W) → (uint16 map, scale) with map ≈ uint16 · scale, to within scale / 2."""
    m = np.clip(np.nan_to_num(anomaly_map.astype(np.float64), nan=0.0), 0.0, None)
    peak = float(m.max()) if m.size else 0.0
    scale = peak / MAP_LEVELS if peak > 0 else 1.0 / MAP_LEVELS
    return np.rint(m / scale).astype(np.uint16), scale


def encode_map_png(quantized: np.ndarray, scale: float) -> bytes:
    """A 16-bit greyscale PNG, its scale also stored in a text chunk so the file stands alone."""
    info = PngImagePlugin.PngInfo()
    info.add_text(MAP_SCALE_KEY, repr(float(scale)))
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(quantized, dtype=np.uint16)).save(
        buffer, format="PNG", pnginfo=info, compress_level=3
    )
    return buffer.getvalue()


def decode_map_png(data: bytes, scale: float | None = None) -> np.ndarray:
    """A map PNG → the float32 anomaly map (scale from the argument, else from the PNG)."""
    img = Image.open(io.BytesIO(data))
    if scale is None:
        scale = float(img.info[MAP_SCALE_KEY])
    return (np.asarray(img).astype(np.float64) * scale).astype(np.float32)


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_MAX_SEGMENT = 80


def _safe_segment(segment: str) -> str:
    segment = _UNSAFE.sub("_", segment)[:_MAX_SEGMENT]
    # "", "." and ".." would collapse or climb folders; leading dots would hide files.
    return "_" + segment.lstrip(".") if segment.startswith(".") or not segment else segment


def map_uri(
    maps_root: str, image_uri: str, image_version: str, model_id: str, run_id: str = ""
) -> str:
    """Where the anomaly map of (image, version, model[, run]) lives:
    maps_root/<model>/<path>.<hash>.png.

    The key mirrors the image's bucket and path (so a person finds it), each segment reduced to
    [A-Za-z0-9._-] with no "." or ".." segments (so no name escapes maps_root), and ends in a
    hash of the exact URI, version, model and run (so names that sanitise alike never collide,
    and neither a changed image nor a later run, --rescore included, ever overwrites the map a
    committed row points at).
    """
    bare = image_uri.split("://", 1)[-1]
    segments = [_safe_segment(s) for s in bare.split("/") if s not in ("", ".")]
    stem = posixpath.splitext(segments[-1])[0] if segments else "image"
    identity = f"{image_uri}\n{image_version}\n{model_id}" + (f"\n{run_id}" if run_id else "")
    digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
    folders = segments[:-1][-12:]  # bounded depth keeps keys under S3's 1024-byte limit
    name = f"{_safe_segment(stem)}.{digest}.png"
    return join_uri(maps_root, f"model={_safe_segment(model_id)}", *folders, name)
