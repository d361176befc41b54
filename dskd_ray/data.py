"""Moved to `dskd_ray.io.data` (issue 23). This old path stays for one release, then goes."""

import warnings

from dskd_ray.io.data import (
    Category,
    TestImage,
    decode_images,
    discover_categories,
    list_images,
    load_category,
    load_images,
    load_mask,
    load_model_inputs,
    training_images,
)

__all__ = [
    "Category",
    "TestImage",
    "decode_images",
    "discover_categories",
    "list_images",
    "load_category",
    "load_images",
    "load_mask",
    "load_model_inputs",
    "training_images",
]

warnings.warn(
    "dskd_ray.data moved to dskd_ray.io.data; the old path goes in the next release",
    DeprecationWarning,
    stacklevel=2,
)
