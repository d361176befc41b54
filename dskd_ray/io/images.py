"""Image bytes → RGB arrays the model takes. Every common format and mode; bad files raise clearly."""

from __future__ import annotations

import io
import re
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm",
)  # fmt: skip

# The one decompression limit, for every decode in this library (scoring, training, evaluation,
# predict, masks): an image whose header claims more pixels is refused before it is decoded.
# 20 000 × 20 000 is bigger than any inspection camera's frame.
MAX_PIXELS = 400_000_000
# Peak memory of a full-size `decode_image` per pixel, measured on 48 Mpx RGB PNG and JPEG: Pillow
# keeps 4 bytes a pixel, the RGB array 3 more (10.1 measured; 4.2 when resized to the model's
# size, 0.2 for a JPEG decoded at reduced scale). A 16-bit image takes ~26 (its float64 rescale).
DECODE_BYTES_PER_PIXEL = 10

# Pillow's own guard warns above MAX_IMAGE_PIXELS (89.5 Mpx by default) and refuses above twice
# that, in any code that opens an image. Raised to our limit, it only ever catches what we
# would refuse anyway (above 2 × MAX_PIXELS, before our check can run), so the limit above is
# the effective one everywhere; its warning, below our limit, is silenced where we decode.
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
_PILLOW_PIXELS = re.compile(r"\((\d+) pixels\)")


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


def too_large(pixels: int, size: tuple[int, int] | None = None) -> ImageDecodeError:
    """The error for an image over MAX_PIXELS, with what decoding it would have cost."""
    shown = f"{size[0]}×{size[1]} = " if size else ""
    gb = pixels * DECODE_BYTES_PER_PIXEL / 1e9
    return ImageDecodeError(
        f"image too large: {shown}{pixels:,} px is over the {MAX_PIXELS:,} px "
        f"decompression limit (decoding it would take ~{gb:.1f} GB of memory, more if 16-bit): "
        "refused as a possible decompression bomb"
    )


def open_image(data: bytes) -> Image.Image:
    """Pillow's lazy image (header read, pixels not yet decoded), refused over MAX_PIXELS.

    Every decode in this library opens its bytes here, so the limit is the same everywhere.
    """
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our check says it
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:  # over twice our limit: Pillow refused first
        found = _PILLOW_PIXELS.search(str(e))
        raise too_large(int(found.group(1)) if found else 2 * MAX_PIXELS + 1) from e
    except UnidentifiedImageError as e:
        raise ImageDecodeError("not a recognised image format") from e
    width, height = img.size
    if width * height > MAX_PIXELS:
        raise too_large(width * height, (width, height))
    return img


_ORIENTATION = 0x0112  # the EXIF tag
_TURNED = (5, 6, 7, 8)  # orientations that swap width and height


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation (1: as stored). A broken EXIF block is not a broken image."""
    try:
        value = img.getexif().get(_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - Pillow raises several kinds on malformed EXIF
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _upright(img: Image.Image, orientation: int) -> Image.Image:
    """The image as a viewer shows it: its EXIF orientation applied (a camera turned on its
    side writes the pixels as they fell and says so in EXIF). Every decode does this, so
    training, calibration, scoring, predict, tiling and masks all see the same pixels."""
    return img if orientation == 1 else ImageOps.exif_transpose(img)


def decode_image(data: bytes, size: int | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode `data` to (H, W, 3) uint8 RGB, upright (its EXIF orientation applied), resized to
    size×size if given.

    Returns the array and the original (width, height), upright. Raises ImageDecodeError for
    empty, truncated, corrupt, unsupported or oversized input (over MAX_PIXELS).
    """
    try:
        img = open_image(data)
        width, height = img.size
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if size is not None and img.format == "JPEG":
                # Let libjpeg decode at a reduced scale when the target is much smaller.
                img.draft("RGB", (size, size))
            img.load()
            # Read once the pixels are: a PNG's EXIF may follow them, and reading it first
            # would decode the image outside the checks above.
            orientation = _orientation(img)
            if orientation in _TURNED:
                width, height = height, width
            img = _to_rgb(_upright(img, orientation))
            if size is not None and img.size != (size, size):
                img = img.resize((size, size), Image.BILINEAR, reducing_gap=None)
            return np.asarray(img, dtype=np.uint8), (width, height)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as e:  # a frame or a plugin that re-checks
        raise too_large(2 * MAX_PIXELS + 1) from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageDecodeError(f"corrupt or truncated image: {e}") from e


def decode_mask(data: bytes, size: int | tuple[int, int]) -> np.ndarray:
    """Ground-truth mask → (size, size) or (height, width) bool, resized nearest (when its own
    size differs) and thresholded at half (docs/design.md §4)."""
    height, width = (size, size) if isinstance(size, int) else size
    img = open_image(data)
    img.load()
    img = _upright(img, _orientation(img)).convert("L")
    if img.size != (width, height):
        img = img.resize((width, height), Image.NEAREST)
    return np.asarray(img) > 127
