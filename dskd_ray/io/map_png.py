"""The anomaly-map file: a 16-bit greyscale PNG with its scale in a text chunk.

A map is quantised per image (its maximum becomes 65535), so the PNG shows the map's full
contrast in any viewer and keeps 16 bits of precision relative to the image's score; the float
map is the PNG's values times the scale, which the file carries itself (and each result row too).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, PngImagePlugin

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
