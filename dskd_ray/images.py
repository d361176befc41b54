"""Image bytes → RGB arrays the model takes. Every common format and mode; bad files raise clearly."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm",
)  # fmt: skip

# A decompression bomb is refused before it is decoded, well below Pillow's own limit
# (which only warns at 89 Mpx): 20 000 × 20 000 is bigger than any inspection camera.
MAX_PIXELS = 400_000_000


class ImageDecodeError(ValueError):
    """The bytes are not an image this library can read; the message says why."""


def is_image_path(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode → 8-bit RGB, keeping 16-bit and float images' full range visible."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16"):
            a = a / 257.0  # the full 16-bit range, not a clip at 255
        else:
            lo, hi = float(a.min()), float(a.max())
            a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
        img = Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Transparent pixels composite onto black, the usual background of a cut-out part.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img


def decode_image(data: bytes, size: int | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode `data` to (H, W, 3) uint8 RGB, resized to size×size if given.

    Returns the array and the original (width, height). Raises ImageDecodeError for empty,
    truncated, corrupt, unsupported or oversized input.
    """
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > MAX_PIXELS:
                raise ImageDecodeError(
                    f"image too large ({width}×{height} px > {MAX_PIXELS} px): refused as a "
                    "possible decompression bomb"
                )
            if size is not None and img.format == "JPEG":
                # Let libjpeg decode at a reduced scale when the target is much smaller.
                img.draft("RGB", (size, size))
            img.load()
            img = _to_rgb(img)
            if size is not None and img.size != (size, size):
                img = img.resize((size, size), Image.BILINEAR, reducing_gap=None)
            return np.asarray(img, dtype=np.uint8), (width, height)
    except ImageDecodeError:
        raise
    except UnidentifiedImageError as e:
        raise ImageDecodeError("not a recognised image format") from e
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(f"refused as a possible decompression bomb: {e}") from e
    except Image.DecompressionBombWarning as e:
        raise ImageDecodeError(f"refused as a possible decompression bomb: {e}") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageDecodeError(f"corrupt or truncated image: {e}") from e


def decode_mask(data: bytes, size: int) -> np.ndarray:
    """Ground-truth mask → (size, size) bool, resized nearest and thresholded at half (DESIGN §2)."""
    img = Image.open(io.BytesIO(data))
    img = img.convert("L") if img.mode not in ("1", "L") else img.convert("L")
    img = img.resize((size, size), Image.NEAREST)
    return np.asarray(img) > 127
