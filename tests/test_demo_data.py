"""The demo data set: MVTec layout, determinism, masks that cover exactly the painted defects."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dskd_ray.demo.data import DEMO_CATEGORIES, DEMO_DEFECTS, make_demo_data, render_sample
from dskd_ray.errors import ConfigError

SMALL = {"n_train": 3, "n_test_good": 2, "n_test_defect_per_type": 2, "image_size": 64}


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _pngs(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.png"))


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    make_demo_data(root, seed=0, **SMALL)
    return root


def test_layout_is_mvtec(demo_root: Path) -> None:
    for category in DEMO_CATEGORIES:
        folder = demo_root / category
        assert [p.name for p in _pngs(folder / "train" / "good")] == [
            "000.png",
            "001.png",
            "002.png",
        ]
        assert len(_pngs(folder / "test" / "good")) == 2
        test_dirs = {p.name for p in (folder / "test").iterdir()}
        assert test_dirs == {"good", *DEMO_DEFECTS[category]}
        # Normal test images have no masks: MVTec has no ground_truth/good.
        assert {p.name for p in (folder / "ground_truth").iterdir()} == set(DEMO_DEFECTS[category])

        for image_path in [*_pngs(folder / "train" / "good"), *_pngs(folder / "test" / "good")]:
            with Image.open(image_path) as im:
                assert (im.mode, im.size) == ("RGB", (64, 64))

        for defect in DEMO_DEFECTS[category]:
            images = _pngs(folder / "test" / defect)
            masks = _pngs(folder / "ground_truth" / defect)
            assert len(images) == 2
            assert [m.name for m in masks] == [f"{p.stem}_mask.png" for p in images]
            for image_path, mask_path in zip(images, masks, strict=True):
                with Image.open(image_path) as im, Image.open(mask_path) as mk:
                    assert (im.mode, im.size) == ("RGB", (64, 64))
                    assert (mk.mode, mk.size) == ("L", (64, 64))
                    mask = np.asarray(mk)
                assert set(np.unique(mask)) <= {0, 255}
                assert (mask == 255).sum() >= 3, f"{mask_path} is (nearly) empty"


def test_returns_category_folders(tmp_path: Path) -> None:
    folders = make_demo_data(tmp_path, categories=["washer"], **SMALL)
    assert folders == {"washer": tmp_path / "washer"}
    assert [p.name for p in tmp_path.iterdir()] == ["washer"]  # no staging folder left behind


def test_same_seed_gives_identical_bytes(demo_root: Path, tmp_path: Path) -> None:
    make_demo_data(tmp_path, seed=0, **SMALL)
    assert _files(tmp_path) == _files(demo_root)


def test_a_category_does_not_depend_on_the_others(demo_root: Path, tmp_path: Path) -> None:
    make_demo_data(tmp_path, categories=["brushed_metal"], seed=0, **SMALL)
    assert _files(tmp_path / "brushed_metal") == _files(demo_root / "brushed_metal")


def test_different_seeds_and_images_differ(demo_root: Path, tmp_path: Path) -> None:
    make_demo_data(tmp_path, seed=1, **SMALL)
    for category in DEMO_CATEGORIES:
        first = demo_root / category / "train" / "good" / "000.png"
        assert (
            first.read_bytes() != (tmp_path / category / "train" / "good" / "000.png").read_bytes()
        )
        # Normal images vary among themselves, so the texture has to be learnt, not memorised.
        a = np.asarray(Image.open(first), dtype=np.float64)
        b = np.asarray(Image.open(first.with_name("001.png")), dtype=np.float64)
        assert np.abs(a - b).mean() > 3


def test_files_match_render_sample(demo_root: Path) -> None:
    sample = render_sample("woven", "stain", seed=0, index=1, image_size=64)
    on_disk = np.asarray(Image.open(demo_root / "woven" / "test" / "stain" / "001.png"))
    mask = np.asarray(Image.open(demo_root / "woven" / "ground_truth" / "stain" / "001_mask.png"))
    np.testing.assert_array_equal(on_disk, sample.image)
    np.testing.assert_array_equal(mask > 0, sample.mask)


@pytest.mark.parametrize(
    ("category", "defect"),
    [(c, d) for c in DEMO_CATEGORIES for d in DEMO_DEFECTS[c]],
)
def test_defect_is_painted_exactly_inside_its_mask(category: str, defect: str) -> None:
    for index in range(4):
        sample = render_sample(category, defect, seed=5, index=index, image_size=96)
        diff = np.abs(sample.image.astype(np.int16) - sample.reference.astype(np.int16)).max(axis=2)
        # Outside the mask the image is the defect-free one, pixel for pixel...
        assert not diff[~sample.mask].any()
        # ...and inside it the defect really changes the picture (not just a few stray pixels).
        assert (diff[sample.mask] > 0).mean() > 0.8
        assert diff[sample.mask].mean() > 4


def test_good_sample_has_empty_mask() -> None:
    sample = render_sample("washer", image_size=64)
    assert not sample.mask.any()
    np.testing.assert_array_equal(sample.image, sample.reference)


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    make_demo_data(tmp_path, categories=["woven"], **SMALL)
    before = _files(tmp_path)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        make_demo_data(tmp_path, categories=["woven"], seed=1, **SMALL)
    assert _files(tmp_path) == before


def test_checks_every_category_before_writing(tmp_path: Path) -> None:
    (tmp_path / "washer").mkdir()
    (tmp_path / "washer" / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        make_demo_data(tmp_path, **SMALL)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["washer"]


def test_overwrite_replaces_the_whole_category(tmp_path: Path) -> None:
    (tmp_path / "woven").mkdir()
    (tmp_path / "woven" / "stale.png").write_bytes(b"old")
    make_demo_data(tmp_path, categories=["woven"], overwrite=True, **SMALL)
    assert not (tmp_path / "woven" / "stale.png").exists()
    assert len(_pngs(tmp_path / "woven" / "train" / "good")) == 3


def test_an_empty_existing_folder_is_used(tmp_path: Path) -> None:
    (tmp_path / "woven").mkdir()
    make_demo_data(tmp_path, categories=["woven"], **SMALL)
    assert len(_pngs(tmp_path / "woven" / "train" / "good")) == 3


@pytest.mark.parametrize(
    "kwargs",
    [
        {"categories": ["carpet"]},
        {"seed": -1},
        {"image_size": 16},
        {"n_train": 0},
    ],
)
def test_rejects_bad_arguments(tmp_path: Path, kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        make_demo_data(tmp_path, **{**SMALL, **kwargs})
    assert not any(tmp_path.iterdir())


def test_small_defects_on_a_large_image_stay_small() -> None:
    """`defect_window` paints a defect as on a window of the image: at 512² with a 128 window it
    stays inside that window's size, and everything outside the mask is the normal image."""
    for category in ("brushed_metal", "woven"):
        big = render_sample(category, DEMO_DEFECTS[category][0], image_size=512, defect_window=128)
        ys, xs = np.nonzero(big.mask)
        assert big.mask.any() and np.ptp(ys) < 128 and np.ptp(xs) < 128
        np.testing.assert_array_equal(big.image[~big.mask], big.reference[~big.mask])
    with pytest.raises(ConfigError, match="textures"):
        render_sample("washer", "pit", image_size=512, defect_window=128)


def test_a_failed_write_leaves_no_half_written_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        make_demo_data(tmp_path, ["washer"], n_train=1, image_size=128, defect_window=64)
    assert list(tmp_path.iterdir()) == []
