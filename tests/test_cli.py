"""The `dskd` command as a user runs it: a real subprocess, real files."""

import csv
import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

from conftest import write_textures

# A random teacher at 64² for one epoch: seconds, enough to exercise the command paths.
TINY_TRAIN = [
    "--teacher-weights",
    "random",
    "--image-size",
    "64",
    "--epochs",
    "1",
    "--batch-size",
    "4",
]


def dskd(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dskd_ray.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
    )


def test_bad_flag_is_one_line_not_a_traceback() -> None:
    result = dskd("train", "somewhere", "--out", "m.pt", "--bogus")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "No such option: --bogus" in result.stderr and "Traceback" not in result.stderr


def test_bad_option_value_is_one_line(tmp_path: Path) -> None:
    write_textures(tmp_path / "imgs", 3)
    result = dskd(
        "train", str(tmp_path / "imgs"), "--out", str(tmp_path / "m.pt"), "--backbone", "vgg99"
    )
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "dskd: error: backbone='vgg99' is not one of resnet18, wide_resnet50_2, efficientnet_lite0"
    )


def test_empty_folder_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = dskd("train", str(tmp_path / "empty"), "--out", str(tmp_path / "m.pt"))
    assert result.returncode == 1
    assert "holds no images" in result.stderr and "Traceback" not in result.stderr


def test_train_evaluate_predict_round_trip(tmp_path: Path) -> None:
    cat = tmp_path / "data" / "tex"
    write_textures(cat / "train" / "good", 8)
    write_textures(cat / "test" / "good", 2, seed=5)
    bad = write_textures(cat / "test" / "spot", 2, seed=6)
    (cat / "ground_truth" / "spot").mkdir(parents=True)
    for p in bad:
        Image.new("L", (64, 64), 0).save(cat / "ground_truth" / "spot" / f"{p.stem}_mask.png")
        mask = Image.open(cat / "ground_truth" / "spot" / f"{p.stem}_mask.png")
        mask.paste(255, (20, 20, 30, 30))
        mask.save(cat / "ground_truth" / "spot" / f"{p.stem}_mask.png")
        img = Image.open(p).convert("RGB")
        img.paste((0, 0, 0), (20, 20, 30, 30))
        img.save(p)
    model = tmp_path / "m.pt"
    result = dskd("train", str(cat), "--out", str(model), *TINY_TRAIN)
    assert result.returncode == 0, result.stderr
    assert "checkpoint:" in result.stdout and model.exists()

    result = dskd("evaluate", str(cat), "--model", str(model), "--json", str(tmp_path / "m.json"))
    assert result.returncode == 0, result.stderr
    table = json.loads((tmp_path / "m.json").read_text())
    assert set(table) == {"tex", "mean"}
    assert set(table["mean"]) == {"image_auroc", "pixel_auroc", "aupro", "f1_max"}
    assert all(isinstance(v, float) for v in table["tex"].values())
    assert "image AUROC" in result.stdout

    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG garbage")
    result = dskd(
        "predict",
        str(bad[0]),
        str(tmp_path / "corrupt.png"),
        "--model",
        str(model),
        "--out",
        str(tmp_path / "pred"),
    )
    assert result.returncode == 1  # one image failed: said, and the other still scored
    assert "corrupt.png" in result.stderr and "Traceback" not in result.stderr
    with open(tmp_path / "pred" / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    assert [Path(r["image"]).name for r in rows] == [bad[0].name, "corrupt.png"]
    assert float(rows[0]["score"]) > 0 and rows[1]["error"]
    overlay = Image.open(rows[0]["overlay"])
    assert overlay.size == (64, 64) and overlay.mode == "RGB"


def test_evaluate_without_masks_gives_null_pixel_metrics(tmp_path: Path) -> None:
    cat = tmp_path / "tex"
    write_textures(cat / "train" / "good", 6)
    write_textures(cat / "test" / "good", 2, seed=5)
    write_textures(cat / "test" / "odd", 2, seed=9)
    model = tmp_path / "m.pt"
    assert dskd("train", str(cat), "--out", str(model), *TINY_TRAIN).returncode == 0
    result = dskd("evaluate", str(cat), "--model", str(model), "--json", str(tmp_path / "m.json"))
    assert result.returncode == 0, result.stderr
    row = json.loads((tmp_path / "m.json").read_text())["tex"]
    assert row["pixel_auroc"] is None and row["aupro"] is None
    assert isinstance(row["image_auroc"], float) and isinstance(row["f1_max"], float)


def test_bad_precision_is_one_line_before_anything_runs(tmp_path: Path) -> None:
    write_textures(tmp_path / "imgs", 2)
    result = dskd(
        "score", str(tmp_path / "imgs"), "--model", str(tmp_path / "absent.pt"),
        "--out", str(tmp_path / "out"), "--precision", "fp16",
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip() == "dskd: error: --precision 'fp16' is not one of fp32, bf16"
    assert not (tmp_path / "out").exists()
