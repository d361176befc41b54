"""Finding images: MVTec AD layout (DESIGN §2) or a plain folder, on local disk or s3:// (fsspec)."""

from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass, field

import fsspec
import numpy as np
from fsspec.core import url_to_fs

from dskd_ray.errors import DataError
from dskd_ray.images import ImageDecodeError, decode_image, decode_mask, is_image_path
from dskd_ray.storage import names_storage_failures

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


def _fs(root: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = url_to_fs(root)
    return fs, path.rstrip("/")


def _uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path as the user would write it: s3://bucket/key for remote, plain for local."""
    return fs.unstrip_protocol(path) if not _is_local(fs) else path


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def _images_in(fs: fsspec.AbstractFileSystem, folder: str, recursive: bool = False) -> list[str]:
    if recursive:
        paths = fs.find(folder)
    else:
        paths = [p for p in fs.ls(folder, detail=False) if fs.isfile(p)]
    return sorted(p for p in paths if is_image_path(p))


@names_storage_failures
def list_images(root: str, recursive: bool = True) -> list[str]:
    """All image files under `root` (local folder or s3:// prefix), sorted, as URIs."""
    fs, path = _fs(root)
    if not fs.exists(path):
        raise DataError(f"{root} does not exist")
    if fs.isfile(path):
        return [root] if is_image_path(path) else []
    return [_uri(fs, p) for p in _images_in(fs, path, recursive)]


def _is_category(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    return fs.isdir(posixpath.join(path, "train"))


@names_storage_failures
def discover_categories(root: str) -> list[Category]:
    """Categories under an MVTec-layout root, or the root itself if it is one category."""
    fs, path = _fs(root)
    if not fs.exists(path):
        raise DataError(f"{root} does not exist")
    if _is_category(fs, path):
        return [load_category(root)]
    subdirs = sorted(p for p in fs.ls(path, detail=False) if fs.isdir(p))
    found = [_uri(fs, p) for p in subdirs if _is_category(fs, p)]
    if not found:
        raise DataError(
            f"{root} is not in MVTec AD layout: expected {root}/train/good/ (one category) "
            f"or {root}/<category>/train/good/ (several)"
        )
    return [load_category(c) for c in found]


@names_storage_failures
def load_category(root: str) -> Category:
    """One MVTec-layout category: train/good, test/<type>, ground_truth/<type>/<stem>_mask.*."""
    fs, path = _fs(root)
    name = posixpath.basename(path)
    good = posixpath.join(path, "train", "good")
    if not fs.isdir(good):
        raise DataError(f"{root} has no train/good/ folder of normal images")
    train = [_uri(fs, p) for p in _images_in(fs, good)]
    if not train:
        raise DataError(f"{root}/train/good/ holds no images ({', '.join(_ext_hint())})")
    test: list[TestImage] = []
    test_dir = posixpath.join(path, "test")
    if fs.isdir(test_dir):
        for type_dir in sorted(p for p in fs.ls(test_dir, detail=False) if fs.isdir(p)):
            defect = posixpath.basename(type_dir)
            masks = _mask_index(fs, posixpath.join(path, "ground_truth", defect))
            for img in _images_in(fs, type_dir):
                stem = posixpath.splitext(posixpath.basename(img))[0]
                label = 0 if defect == "good" else 1
                mask = masks.get(stem) if label else None
                test.append(TestImage(_uri(fs, img), label, defect, mask and _uri(fs, mask)))
    return Category(name=name, root=root, train=train, test=test)


def _mask_index(fs: fsspec.AbstractFileSystem, folder: str) -> dict[str, str]:
    if not fs.isdir(folder):
        return {}
    index = {}
    for p in _images_in(fs, folder):
        stem = posixpath.splitext(posixpath.basename(p))[0]
        index[stem.removesuffix("_mask")] = p
    return index


def _ext_hint() -> list[str]:
    return ["png", "jpg", "bmp", "tif"]


@names_storage_failures
def training_images(root: str) -> tuple[str, list[str]]:
    """(name, normal image URIs) for training: one MVTec category or a plain folder of images."""
    fs, path = _fs(root)
    if not fs.exists(path):
        raise DataError(f"{root} does not exist")
    if _is_category(fs, path):
        category = load_category(root)
        return category.name, category.train
    subdirs = [p for p in fs.ls(path, detail=False) if fs.isdir(p)]
    categories = sorted(posixpath.basename(p) for p in subdirs if _is_category(fs, p))
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
    return posixpath.basename(path) or "images", images


def read_bytes(uri: str) -> bytes:
    with fsspec.open(uri, "rb") as f:
        return f.read()


def load_images(uris: list[str], size: int) -> tuple[np.ndarray, list[str], list[tuple[str, str]]]:
    """Decode many images to (N, size, size, 3) uint8, skipping unreadable ones.

    Returns (images, kept URIs, [(skipped URI, reason)]). Each skip is logged by name.
    """
    arrays, kept, skipped = [], [], []
    for uri in uris:
        try:
            rgb, _ = decode_image(read_bytes(uri), size)
        except (ImageDecodeError, OSError) as e:
            log.warning("skipping unreadable image %s: %s", uri, e)
            skipped.append((uri, str(e)))
            continue
        arrays.append(rgb)
        kept.append(uri)
    if not arrays:
        return np.zeros((0, size, size, 3), np.uint8), kept, skipped
    return np.stack(arrays), kept, skipped


def load_mask(uri: str | None, size: int) -> np.ndarray:
    """A test image's mask at size×size; all-false when it has none (a normal image)."""
    if uri is None:
        return np.zeros((size, size), dtype=bool)
    return decode_mask(read_bytes(uri), size)
