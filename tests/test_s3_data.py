"""Training data, teacher weights and checkpoints on object storage (a real moto server)."""

from pathlib import Path

import s3fs
import torch

from conftest import make_bucket, write_textures
from dskd_ray.checkpoint import load_checkpoint
from dskd_ray.config import DSKDConfig
from dskd_ray.data import discover_categories, training_images
from dskd_ray.model import DSKD
from dskd_ray.train import train


def test_train_from_s3_and_write_checkpoint_to_s3(
    s3_server: dict, tmp_path: Path, tiny_config: DSKDConfig
) -> None:
    make_bucket(s3_server, "factory")
    fs = s3fs.S3FileSystem()
    local = tmp_path / "tile"
    write_textures(local / "train" / "good", 6)
    write_textures(local / "test" / "good", 2, seed=3)
    (local / "train" / "good" / "broken.png").write_bytes(b"not a png")
    fs.put(str(local), "factory/lines/tile", recursive=True)

    name, uris = training_images("s3://factory/lines/tile")
    assert name == "tile" and all(u.startswith("s3://factory/lines/tile/train/good/") for u in uris)
    [category] = discover_categories("s3://factory/lines")
    assert category.name == "tile" and len(category.test) == 2

    source = DSKD(tiny_config)
    torch.save(source.teacher.state_dict(), tmp_path / "teacher.pth")
    fs.put(str(tmp_path / "teacher.pth"), "factory/weights/teacher.pth")
    config = tiny_config.replace(teacher_weights="s3://factory/weights/teacher.pth", epochs=1)

    result = train(config, "s3://factory/lines/tile", "s3://factory/models/tile.pt")
    assert [Path(s).name for s, _ in result.skipped] == ["broken.png"]
    ckpt = load_checkpoint("s3://factory/models/tile.pt")
    assert ckpt.threshold is not None and ckpt.model_id == result.checkpoint.model_id
    teacher = ckpt.build_model().teacher.state_dict()
    for key, value in source.teacher.state_dict().items():
        assert torch.equal(teacher[key], value)


def test_training_from_s3_retries_a_read_that_fails_once(
    s3_server: dict, tmp_path: Path, tiny_config: DSKDConfig, monkeypatch
) -> None:
    """A connection reset on the first GET of one image (injected in the S3 client's read, on
    the moto server's bucket) is retried, not taken for an unreadable image."""
    make_bucket(s3_server, "flaky")
    fs = s3fs.S3FileSystem()
    for p in write_textures(tmp_path / "normal", 4):
        fs.put_file(str(p), f"flaky/normal/{p.name}")
    read = s3fs.S3FileSystem._cat_file
    failed: list[str] = []

    async def fails_once(self: s3fs.S3FileSystem, path: str, *args: object, **kw: object):  # noqa: ANN202
        if path.endswith("normal/001.png") and not failed:
            failed.append(path)
            raise ConnectionResetError(104, "Connection reset by peer (injected)")
        return await read(self, path, *args, **kw)

    monkeypatch.setattr(s3fs.S3FileSystem, "_cat_file", fails_once)
    # fsspec caches filesystem instances, and an instance binds its sync methods when it is
    # made: one made by an earlier test would never call the patched read.
    s3fs.S3FileSystem.clear_instance_cache()
    result = train(tiny_config.replace(epochs=1), "s3://flaky/normal", str(tmp_path / "m.pt"))
    assert failed == ["flaky/normal/001.png"]
    assert result.skipped == [] and result.n_train + result.n_holdout == 4
