from pathlib import Path

import pytest
from PIL import Image

from conftest import write_textures
from dskd_ray.errors import DataError
from dskd_ray.io.data import discover_categories, load_images, training_images


def make_category(root: Path, n_train: int = 4) -> Path:
    write_textures(root / "train" / "good", n_train)
    write_textures(root / "test" / "good", 2, seed=1)
    write_textures(root / "test" / "scratch", 2, seed=2)
    (root / "ground_truth" / "scratch").mkdir(parents=True)
    for stem in ("000", "001"):
        Image.new("L", (64, 64), 255).save(root / "ground_truth" / "scratch" / f"{stem}_mask.png")
    return root


def test_mvtec_category_is_read_with_labels_and_masks(tmp_path: Path) -> None:
    make_category(tmp_path / "tile")
    [cat] = discover_categories(str(tmp_path / "tile"))
    assert cat.name == "tile" and len(cat.train) == 4
    labels = {(Path(t.path).parent.name, t.label) for t in cat.test}
    assert labels == {("good", 0), ("scratch", 1)}
    assert all(t.mask_path for t in cat.test if t.label == 1)
    assert all(t.mask_path is None for t in cat.test if t.label == 0)
    assert cat.has_masks


def test_root_with_several_categories(tmp_path: Path) -> None:
    make_category(tmp_path / "a")
    make_category(tmp_path / "b")
    make_category(tmp_path / ".b.partial-123")  # hidden: a half-written copy is no category
    assert [c.name for c in discover_categories(str(tmp_path))] == ["a", "b"]
    with pytest.raises(DataError, match="2 categories"):
        training_images(str(tmp_path))


def test_plain_folder_of_normal_images_trains(tmp_path: Path) -> None:
    write_textures(tmp_path / "imgs" / "nested", 3, fmt="jpg")
    name, uris = training_images(str(tmp_path / "imgs"))
    assert name == "imgs" and len(uris) == 3


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ("missing", "does not exist"),
        ("empty", "holds no images"),
        ("no_good", "train/good"),
        ("empty_good", "holds no images"),
    ],
)
def test_bad_layouts_name_what_is_missing(tmp_path: Path, layout: str, message: str) -> None:
    root = tmp_path / "data"
    if layout != "missing":
        root.mkdir()
    if layout == "no_good":
        (root / "train" / "bad").mkdir(parents=True)
    if layout == "empty_good":
        (root / "train" / "good").mkdir(parents=True)
    with pytest.raises(DataError, match=message):
        training_images(str(root))
    if layout in ("missing", "empty"):
        with pytest.raises(DataError):
            discover_categories(str(root))


def test_corrupt_training_image_is_skipped_with_a_warning_naming_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    paths = write_textures(tmp_path / "imgs", 3)
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    _, uris = training_images(str(tmp_path / "imgs"))
    images, kept, skipped = load_images(uris, 32)
    assert images.shape == (3, 32, 32, 3)
    assert kept == [str(p) for p in paths]
    assert [Path(s[0]).name for s in skipped] == ["broken.png"]
    assert "broken.png" in caplog.text
