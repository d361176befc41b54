"""Finding images: MVTec AD layout (docs/design.md §4) or a plain folder, local or s3://."""

from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass, field

import numpy as np

from dskd_ray.errors import DataError
from dskd_ray.inference import tiling
from dskd_ray.io.images import ImageDecodeError, decode_image, decode_mask, is_image_path
from dskd_ray.io.storage import (
    exists,
    find_files,
    is_dir,
    is_file,
    is_storage_failure,
    join_uri,
    list_folder,
    names_storage_failures,
    path_name,
    printable,
    read_object,
)

log = logging.getLogger(__name__)


@dataclass
class TestImage:
    path: str
    label: int  # 0 normal, 1 anomalous
    defect_type: str
    mask_path: str | None = None


@dataclass
class Category:
    """One category: normal training images and, in MVTec layout, labelled test images."""

    name: str
    root: str
    train: list[str]
    test: list[TestImage] = field(default_factory=list)

    @property
    def has_masks(self) -> bool:
        return any(t.mask_path for t in self.test if t.label == 1)


def _images_in(folder: str, recursive: bool = False) -> list[str]:
    paths = find_files(folder) if recursive else list_folder(folder)[0]
    return [p for p in paths if is_image_path(p)]


@names_storage_failures
def list_images(root: str, recursive: bool = True) -> list[str]:
    """All image files under `root` (local folder or s3:// prefix), sorted, as URIs."""
    if not exists(root):
        raise DataError(f"{root} does not exist")
    if is_file(root):
        return [root] if is_image_path(root) else []
    return _images_in(root, recursive)


def _is_category(uri: str) -> bool:
    return is_dir(join_uri(uri, "train"))


def _categories_in(root: str) -> list[str]:
    """The category folders directly under `root`. Hidden folders are not categories (a
    half-written `.name.partial-…`, `.ipynb_checkpoints`)."""
    return [
        folder
        for folder in list_folder(root)[1]
        if not path_name(folder).startswith(".") and _is_category(folder)
    ]


@names_storage_failures
def discover_categories(root: str) -> list[Category]:
    """Categories under an MVTec-layout root, or the root itself if it is one category."""
    if not exists(root):
        raise DataError(f"{root} does not exist")
    if _is_category(root):
        return [load_category(root)]
    found = _categories_in(root)
    if not found:
        raise DataError(
            f"{root} is not in MVTec AD layout: expected {root}/train/good/ (one category) "
            f"or {root}/<category>/train/good/ (several)"
        )
    return [load_category(c) for c in found]


@names_storage_failures
def load_category(root: str) -> Category:
    """One MVTec-layout category: train/good, test/<type>, ground_truth/<type>/<stem>_mask.*."""
    good = join_uri(root, "train", "good")
    if not is_dir(good):
        raise DataError(f"{root} has no train/good/ folder of normal images")
    train = _images_in(good)
    if not train:
        raise DataError(f"{root}/train/good/ holds no images ({', '.join(_ext_hint())})")
    test: list[TestImage] = []
    test_dir = join_uri(root, "test")
    if is_dir(test_dir):
        for type_dir in list_folder(test_dir)[1]:
            defect = posixpath.basename(type_dir)
            masks = _mask_index(join_uri(root, "ground_truth", defect))
            for img in _images_in(type_dir):
                stem = posixpath.splitext(posixpath.basename(img))[0]
                label = 0 if defect == "good" else 1
                test.append(TestImage(img, label, defect, masks.get(stem) if label else None))
    return Category(name=path_name(root), root=root, train=train, test=test)


def _mask_index(folder: str) -> dict[str, str]:
    if not is_dir(folder):
        return {}
    index = {}
    for p in _images_in(folder):
        stem = posixpath.splitext(posixpath.basename(p))[0]
        index[stem.removesuffix("_mask")] = p
    return index


def _ext_hint() -> list[str]:
    return ["png", "jpg", "bmp", "tif"]


@names_storage_failures
def training_images(root: str) -> tuple[str, list[str]]:
    """(name, normal image URIs) for training: one MVTec category or a plain folder of images."""
    if not exists(root):
        raise DataError(f"{root} does not exist")
    if _is_category(root):
        category = load_category(root)
        return category.name, category.train
    categories = [posixpath.basename(p) for p in _categories_in(root)]
    if categories:
        raise DataError(
            f"{root} holds {len(categories)} categories ({', '.join(categories)}); a model "
            f"learns one: train on {root.rstrip('/')}/{categories[0]} and so on"
        )
    images = list_images(root, recursive=True)
    if not images:
        raise DataError(
            f"{root} holds no images: expected a folder of normal images "
            f"({', '.join(_ext_hint())}) or an MVTec category with train/good/"
        )
    return path_name(root) or "images", images


def decode_images(
    uris: list[str], size: int | None
) -> tuple[list[np.ndarray], list[str], list[tuple[str, str]]]:
    """Decode many images to (H, W, 3) uint8 arrays — size×size, or full resolution when size
    is None — skipping unreadable ones.

    Returns (arrays, kept URIs, [(skipped URI, reason)]). Each skip is logged by name. Reads
    are retried on transient storage failures first (`storage.read_object`).
    """
    arrays, kept, skipped = [], [], []
    for uri in uris:
        try:
            rgb, _ = decode_image(read_object(uri), size)
        except Exception as e:
            if not isinstance(e, ImageDecodeError) and not is_storage_failure(e):
                raise
            log.warning("skipping unreadable image %s: %s", printable(uri), e)
            skipped.append((uri, str(e)))
            continue
        arrays.append(rgb)
        kept.append(uri)
    return arrays, kept, skipped


def load_images(uris: list[str], size: int) -> tuple[np.ndarray, list[str], list[tuple[str, str]]]:
    """`decode_images` at size×size, stacked to (N, size, size, 3) uint8."""
    arrays, kept, skipped = decode_images(uris, size)
    if not arrays:
        return np.zeros((0, size, size, 3), np.uint8), kept, skipped
    return np.stack(arrays), kept, skipped


def load_model_inputs(
    uris: list[str], size: int, tiled: bool, overlap: int
) -> tuple[np.ndarray, list[str], list[tuple[str, str]], np.ndarray]:
    """What a model trains on: the images at size×size, or, tiled, every full-resolution
    size×size tile of each (docs/design.md §8).

    Returns (rows (N, size, size, 3) uint8, kept URIs, skipped, owner): owner[i] is the index
    in kept of the image row i comes from.
    """
    if not tiled:
        images, kept, skipped = load_images(uris, size)
        return images, kept, skipped, np.arange(len(kept))
    tiles, owners, kept, skipped = [], [], [], []
    for uri in uris:  # one image at a time: only its tiles stay
        arrays, ok, bad = decode_images([uri], None)
        skipped += bad
        if arrays:
            cut, _ = tiling.cut(arrays[0], size, overlap)
            tiles.append(cut)
            owners.append(np.full(len(cut), len(kept)))
            kept += ok
    if not tiles:
        return np.zeros((0, size, size, 3), np.uint8), kept, skipped, np.zeros(0, np.int64)
    return np.concatenate(tiles), kept, skipped, np.concatenate(owners)


def load_mask(uri: str | None, size: int | tuple[int, int]) -> np.ndarray:
    """A test image's mask at size×size, or (height, width); all-false when it has none (a
    normal image)."""
    shape = (size, size) if isinstance(size, int) else size
    if uri is None:
        return np.zeros(shape, dtype=bool)
    return decode_mask(read_object(uri), shape)
