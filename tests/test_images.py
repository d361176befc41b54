import io

import numpy as np
import pytest
from PIL import Image

from conftest import png_claiming
from dskd_ray.io.images import MAX_PIXELS, ImageDecodeError, decode_image, decode_mask


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [("RGB", "JPEG"), ("RGB", "PNG"), ("L", "PNG"), ("RGBA", "PNG"), ("RGB", "BMP"), ("RGB", "TIFF"),
     ("L", "TIFF"), ("P", "PNG"), ("I;16", "PNG"), ("I;16", "TIFF")],
)  # fmt: skip
def test_every_common_format_and_mode_becomes_rgb(mode: str, fmt: str) -> None:
    rng = np.random.default_rng(0)
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65535, (40, 50), dtype=np.uint16))
    else:
        img = Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).convert(mode)
    rgb, (w, h) = decode_image(_encode(img, fmt), size=32)
    assert rgb.shape == (32, 32, 3) and rgb.dtype == np.uint8
    assert (w, h) == (50, 40)


def test_sixteen_bit_keeps_its_range() -> None:
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (8, 1))
    rgb, _ = decode_image(_encode(Image.fromarray(ramp), "PNG"))
    assert rgb[0, 0, 0] == 0 and rgb[0, -1, 0] == 255
    assert len(np.unique(rgb[0, :, 0])) > 50  # not clipped to a few values


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"not an image at all", "not a recognised"),
    ],
)
def test_bad_bytes_raise_clear_errors(data: bytes, reason: str) -> None:
    with pytest.raises(ImageDecodeError, match=reason):
        decode_image(data, 32)


def test_truncated_image_is_an_error() -> None:
    data = _encode(Image.new("RGB", (200, 200), (10, 200, 30)), "PNG")
    big = _encode(
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), np.uint8)), "JPEG"
    )
    for blob in (data[: len(data) // 2], big[: len(big) // 3]):
        with pytest.raises(ImageDecodeError):
            decode_image(blob, 32)


def test_decompression_bomb_is_refused_before_decoding() -> None:
    with pytest.raises(ImageDecodeError, match="bomb"):
        decode_image(png_claiming(60_000, 60_000), 32)


def test_one_decompression_limit_in_pixels_with_a_memory_estimate() -> None:
    # Over Pillow's default 89.5 Mpx guard but under ours: not refused as a bomb (the bytes are
    # a fake header, so it fails as truncated instead, after the size check let it through).
    with pytest.raises(ImageDecodeError) as under:
        decode_image(png_claiming(10_000, 10_000), 32)
    assert "bomb" not in str(under.value) and "truncated" in str(under.value)
    # Just over ours, and far over (where Pillow's own raised guard speaks first): the same words.
    over = 20_001 * 20_000
    assert over > MAX_PIXELS
    for width, height in ((20_001, 20_000), (60_000, 60_000)):
        with pytest.raises(ImageDecodeError, match="decompression limit") as refused:
            decode_image(png_claiming(width, height), 32)
        message = str(refused.value)
        assert f"{width * height:,} px" in message and "GB of memory" in message
    with pytest.raises(ImageDecodeError, match="decompression limit"):
        decode_mask(png_claiming(20_001, 20_000), 32)  # masks take the same path


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_orientation_is_applied_the_same_way_in_every_decode(fmt: str) -> None:
    """A camera on its side stores 120×80 pixels and EXIF orientation 6 (turn 90° clockwise):
    the image a viewer shows, 80×120, is what every decode gives (the model's size too)."""
    pixels = np.zeros((80, 120, 3), np.uint8)
    pixels[:, :60] = (250, 20, 20)  # the stored left half red: the shown top half
    stored = Image.fromarray(pixels)
    exif = stored.getexif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    stored.save(buf, format=fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))
    data = buf.getvalue()
    upright, (w, h) = decode_image(data)
    assert (w, h) == (80, 120) and upright.shape == (120, 80, 3)
    assert upright[:50, :, 0].mean() > 200 and upright[70:, :, 0].mean() < 60  # red on top
    small, size = decode_image(data, size=32)
    assert size == (80, 120) and small[:12, :, 0].mean() > 200 and small[20:, :, 0].mean() < 60
    mask = decode_mask(data, (120, 80))  # a mask carries its orientation the same way
    assert mask.shape == (120, 80)
    if fmt == "JPEG":  # a broken EXIF block is not a broken image: decoded as stored
        broken = data.replace(b"Exif\x00\x00MM", b"Exif\x00\x00XX", 1)
        assert broken != data
        assert decode_image(broken)[0].shape == (80, 120, 3)
