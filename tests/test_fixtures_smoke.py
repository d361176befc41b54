import s3fs
from conftest import make_bucket


def test_s3_server_and_ray_start(s3_server: dict, ray_cluster) -> None:  # noqa: ANN001
    make_bucket(s3_server, "smoke")
    fs = s3fs.S3FileSystem()
    fs.pipe("smoke/a.txt", b"hello")
    assert fs.cat("smoke/a.txt") == b"hello"

    @ray_cluster.remote
    def read() -> bytes:
        return s3fs.S3FileSystem().cat("smoke/a.txt")

    assert ray_cluster.get(read.remote()) == b"hello"
