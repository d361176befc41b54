"""`dskd results`: its figures against read_results, the gallery in a real browser, and drift.

Real local Ray, the real moto S3 server, real Parquet read back, real Chromium: runs are scored
with `score_images` as the nightly job does, then `dskd results` runs as a user runs it.
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
import s3fs
import torch
from PIL import Image

from conftest import broken_files, good_files, make_bucket, texture, write_textures
from dskd_ray.config import DSKDConfig, ScoringOptions
from dskd_ray.inference.scoring import Scorer
from dskd_ray.io.images import decode_image
from dskd_ray.model.checkpoint import Threshold, make_checkpoint, save_checkpoint
from dskd_ray.model.network import DSKD
from dskd_ray.nightly.drift import MIN_NIGHT_IMAGES, ScoreDrift, score_drift
from dskd_ray.nightly.results import committed_runs, read_results
from dskd_ray.nightly.run import score_images
from dskd_ray.nightly.summary import error_reason

REPO = Path(__file__).resolve().parents[1]
CHECK_SCRIPT = REPO / "bench" / "check_report.sh"


def dskd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dskd_ray.cli", *args], capture_output=True, text=True, timeout=600
    )


def make_model(folder: Path) -> Path:
    """A tiny random-teacher checkpoint; its threshold is the median of 16 textures' scores,
    which it keeps as its held-out normal scores (so runs get a drift figure)."""
    torch.manual_seed(0)
    ckpt = make_checkpoint(
        DSKD(
            DSKDConfig(memory="none", backbone="resnet18", teacher_weights="random", image_size=64)
        )
    )
    rng = np.random.default_rng(7)
    images = np.stack([decode_image(texture(rng), 64)[0] for _ in range(16)])
    scores = Scorer(ckpt, device="cpu").score_batch(images).scores
    ckpt.threshold = Threshold(
        float(np.median(scores)), "quantile", 0.5, [float(s) for s in scores]
    )
    path = folder / "model.pt"
    save_checkpoint(ckpt, path)
    return path


def expected_figures(out: str, run_id: str) -> dict:
    """What read_results says about one run, computed here independently."""
    table = read_results(out)
    rows = table.filter(pc.equal(table["run_id"], run_id)).to_pylist()
    ok = [r for r in rows if r["status"] == "ok"]
    scores = np.array([r["score"] for r in ok], np.float64)
    reasons: dict[str, int] = {}
    for r in rows:
        if r["status"] == "error":
            reasons[error_reason(r["error"])] = reasons.get(error_reason(r["error"]), 0) + 1
    anomalous = sum(1 for r in ok if r["is_anomalous"])
    return {
        "rows": len(rows),
        "scored": len(ok),
        "errors": sum(1 for r in rows if r["status"] == "error"),
        "anomalous": anomalous,
        "anomalous_rate": anomalous / len(ok) if ok else None,
        "errors_by_reason": reasons,
        "p50": float(np.percentile(scores, 50)) if ok else None,
        "p99": float(np.percentile(scores, 99)) if ok else None,
        "max": float(scores.max()) if ok else None,
        "ok_rows": ok,
    }


def check_against_read_results(out: str, report: dict, runs: list) -> None:
    assert [r["run_id"] for r in report["runs"]] == [r.run_id for r in runs]
    for got, run in zip(report["runs"], runs, strict=True):
        want = expected_figures(out, run.run_id)
        for key in ("rows", "scored", "errors", "anomalous", "errors_by_reason"):
            assert got[key] == want[key], (key, got[key], want[key])
        assert got["listed"] == run.manifest["summary"]["listed"]
        if want["scored"]:
            assert got["anomalous_rate"] == pytest.approx(want["anomalous_rate"])
            for q in ("p50", "p99", "max"):
                assert got["scores"][q] == pytest.approx(want[q], rel=1e-6)
    all_ok = [r for run in runs for r in expected_figures(out, run.run_id)["ok_rows"]]
    ranked = sorted(all_ok, key=lambda r: (-r["score"], r["image_uri"]))[: len(report["top"])]
    assert [t["image_uri"] for t in report["top"]] == [r["image_uri"] for r in ranked]
    assert [t["map_uri"] for t in report["top"]] == [r["map_uri"] for r in ranked]
    assert [t["score"] for t in report["top"]] == pytest.approx([r["score"] for r in ranked])


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.images.append(dict(attrs)["src"] or "")

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def check_gallery(directory: Path, n_figures: int) -> str:
    """Every image on the page is a PNG beside it, and Chromium loads them all; returns the text."""
    page = _Page()
    page.feed((directory / "index.html").read_text(encoding="utf-8"))
    figures = [s for s in page.images if s.startswith("images/")]
    assert len(figures) == n_figures
    for src in page.images:
        with Image.open(directory / src) as img:
            assert img.format == "PNG" and img.width > 0
    result = subprocess.run(
        ["bash", str(CHECK_SCRIPT), str(directory)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == f"OK images={len(page.images)}"
    return "".join(page.text)


# --- S3 (moto) ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_runs(s3_server: dict, ray_cluster, tmp_path_factory: pytest.TempPathFactory) -> dict:  # noqa: ANN001
    """Two committed runs on S3: a night with good and broken images, then a few more images."""
    for bucket in ("rs-models", "rs-images", "rs-scores"):
        make_bucket(s3_server, bucket)
    fs = s3fs.S3FileSystem()
    model = make_model(tmp_path_factory.mktemp("model"))
    fs.put_file(str(model), "rs-models/m.pt")
    rng = np.random.default_rng(11)
    broken = {f"rs-images/{k}": b for k, (b, _) in broken_files(rng).items()}
    fs.pipe({**good_files(rng, 24, "rs-images/"), **broken})
    out = "s3://rs-scores/nightly"
    first = score_images(
        "s3://rs-images/", "s3://rs-models/m.pt", out, ScoringOptions(batch_size=8)
    )
    fs.pipe({f"rs-images/later/new_{i}.png": texture(rng) for i in range(3)})
    second = score_images(
        "s3://rs-images/", "s3://rs-models/m.pt", out, ScoringOptions(batch_size=8)
    )
    return {"out": out, "first": first, "second": second}


def test_results_on_s3_equal_read_results(s3_runs: dict) -> None:
    out = s3_runs["out"]
    result = dskd("results", out, "--json", "--top", "5")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    runs = committed_runs(out)
    assert len(runs) == 2
    check_against_read_results(out, report, runs)
    first, second = report["runs"]
    assert first["errors"] == 6 and sum(first["errors_by_reason"].values()) == 6
    assert "not a recognised image format" in first["errors_by_reason"]
    assert (second["scored"], second["skipped"]) == (3, s3_runs["first"].listed)
    assert first["drift"]["median_shift"] is not None and first["drift_warning"] is None
    assert "warning" not in result.stderr  # a normal night: no drift warning

    one = json.loads(dskd("results", out, "--json", "--run", second["run_id"]).stdout)
    assert [r["run_id"] for r in one["runs"]] == [second["run_id"]] and one["top"] == []

    table = dskd("results", out, "--top", "3")
    assert table.returncode == 0, table.stderr
    assert first["run_id"] in table.stdout and "not a recognised image format" in table.stdout
    assert report["top"][0]["image_uri"] in table.stdout

    rows = list(csv.DictReader(io.StringIO(dskd("results", out, "--csv").stdout)))
    assert [r["run_id"] for r in rows] == [first["run_id"], second["run_id"]]
    assert int(rows[0]["scored"]) == first["scored"]
    assert json.loads(rows[0]["errors_by_reason"]) == first["errors_by_reason"]
    top = list(csv.DictReader(io.StringIO(dskd("results", out, "--csv", "--top", "5").stdout)))
    assert [r["map_uri"] for r in top] == [t["map_uri"] for t in report["top"]]


def test_gallery_from_s3_loads_in_headless_chromium(s3_runs: dict, tmp_path: Path) -> None:
    out, run_id = s3_runs["out"], s3_runs["first"].run_id
    gallery = tmp_path / "gallery"
    result = dskd("results", out, "--run", run_id, "--top", "8", "--report", str(gallery))
    assert result.returncode == 0, result.stderr
    assert f"report: {gallery / 'index.html'}" in result.stdout
    text = check_gallery(gallery, 8)
    expected = expected_figures(out, run_id)
    best = sorted(expected["ok_rows"], key=lambda r: (-r["score"], r["image_uri"]))[:8]
    positions = [text.index(r["image_uri"]) for r in best]
    assert positions == sorted(positions)  # highest score first
    assert all(r["map_uri"] in text for r in best)
    for reason in expected["errors_by_reason"]:
        assert reason in text
    assert "Errors (6)" in text and "not readable" not in text
    # The right panel is the stored map over the image, not the image again.
    with Image.open(gallery / "images" / "0001.png") as img:
        panel = np.asarray(img.convert("RGB"))
    assert panel.shape == (64, 2 * 64 + 4, 3)
    assert np.abs(panel[:, :64].astype(int) - panel[:, 68:].astype(int)).mean() > 5


# --- local folders, bad flags --------------------------------------------------------------------


def test_results_on_a_local_output_and_a_gallery_with_a_deleted_image(
    ray_cluster,
    tmp_path: Path,  # noqa: ANN001
) -> None:
    model = make_model(tmp_path)
    images = tmp_path / "images"
    paths = write_textures(images / "cam0", 12)
    (images / "cam0" / "empty.png").write_bytes(b"")
    out = tmp_path / "scores"
    summary = score_images(str(images), str(model), str(out), ScoringOptions(batch_size=4))
    result = dskd("results", str(out), "--json", "--top", "4")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    check_against_read_results(str(out), report, committed_runs(str(out)))
    assert report["runs"][0]["errors_by_reason"] == {"empty file (0 bytes)": 1}

    worst = report["top"][0]["image_uri"]
    Path(worst).unlink()  # gone since the night: its map is still shown, and the page says so
    gallery = tmp_path / "gallery"
    result = dskd("results", str(out), "--report", str(gallery), "--top", "4")
    assert result.returncode == 0, result.stderr
    text = check_gallery(gallery, 4)
    assert f"Scoring run {summary.run_id}" in text and "image not readable now" in text
    assert len(paths) == summary.scored


def test_bad_flags_are_one_line(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    cases = [
        (["results", str(tmp_path / "empty"), "--since", "2026-13-40"], 2, "not a date"),
        (["results", str(tmp_path / "empty"), "--json", "--csv"], 2, "one of --json and --csv"),
        (["results", str(tmp_path / "empty"), "--top", "-1"], 2, "--top"),
        (["results", str(tmp_path / "typo")], 1, "does not exist"),
        (["results", str(tmp_path / "empty"), "--run", "20260101T000000Z-aaaaaa"], 1, "no committed run"),
    ]  # fmt: skip
    for args, code, words in cases:
        result = dskd(*args)
        assert result.returncode == code, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("dskd: error:") and words in lines[0], lines
    empty = dskd("results", str(tmp_path / "empty"))
    assert empty.returncode == 0 and "no committed runs" in empty.stdout


# --- damaged outputs and hostile names, without a scoring run ----------------------------------


def synthetic_run(out: Path, run_id: str, uris: list[str], model_id: str = "m-synthetic") -> None:
    """A committed run as `score_images` leaves it (parts, index, manifest), scores 1, 2, …"""
    import pyarrow as pa

    from dskd_ray.nightly.results import RESULT_SCHEMA, PartWriter, commit_run
    from dskd_ray.nightly.run_index import ModelIndex

    n = len(uris)
    columns = {c: pa.nulls(n, RESULT_SCHEMA.field(c).type) for c in RESULT_SCHEMA.names}
    columns |= {
        "image_uri": pa.array(uris), "image_version": pa.array(["v1"] * n),
        "score": pa.array([float(i + 1) for i in range(n)], pa.float32()),
        "threshold": pa.array([1.5] * n), "is_anomalous": pa.array([i > 0 for i in range(n)]),
        "map_uri": pa.array([f"{out}/maps/{i}.png" for i in range(n)]),
        "status": pa.array(["ok"] * n), "retryable": pa.array([False] * n),
        "model_id": pa.array([model_id] * n), "run_id": pa.array([run_id] * n),
    }  # fmt: skip
    table = pa.table(columns, schema=RESULT_SCHEMA)
    index = ModelIndex.load(str(out), model_id)
    writer = PartWriter(str(out), run_id)
    writer.write(table)
    files = writer.close()
    commit_run(str(out), run_id, files, model_id=model_id, summary={"listed": n, "skipped": 0})
    index.write(run_id, files)


def test_a_damaged_part_is_one_line_naming_it_and_the_other_runs_still_list(
    tmp_path: Path,
) -> None:
    """A committed run's Parquet part overwritten (bit rot, a bad copy) used to end `dskd
    results`, `--report` and `read_results` in a traceback."""
    from dskd_ray.errors import DataError

    out = tmp_path / "scores"
    good, bad = "20260101T000000Z-aaaaaa", "20260102T000000Z-bbbbbb"
    synthetic_run(out, good, ["/img/a.png", "/img/b.png"])
    synthetic_run(out, bad, ["/img/c.png"])
    [part] = (out / "results").glob(f"date=*/run={bad}/part-*.parquet")
    part.write_bytes(part.read_bytes()[:-40] + b"\0" * 40)  # the footer gone
    why = f"run {bad} is damaged: its result part {part} cannot be read as Parquet ("

    with pytest.raises(DataError) as e:
        read_results(str(out))
    assert str(e.value).startswith(why) and "\n" not in str(e.value)
    result = dskd("results", str(out))
    assert result.returncode == 1 and result.stderr.startswith(f"dskd: error: {why}")
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    lines = result.stdout.splitlines()
    [good_line] = [line for line in lines if line.startswith(good)]
    assert good_line.split()[3:6] == ["2", "2", "0"]  # listed, scored, errors: read as usual
    [bad_line] = [line for line in lines if line.startswith(bad)]
    assert bad_line.endswith("DAMAGED: its rows cannot be read (below)")
    assert any(line.startswith(f"damaged: {why}") for line in lines)
    report = json.loads(dskd("results", str(out), "--json").stdout)
    assert [r["damaged"] is None for r in report["runs"]] == [True, False]
    gallery = dskd("results", str(out), "--report", str(tmp_path / "gallery"))  # the latest run
    assert gallery.returncode == 1 and gallery.stderr.startswith(f"dskd: error: {why}")
    assert len(gallery.stderr.strip().splitlines()) == 1 and "Traceback" not in gallery.stderr


def test_a_damaged_manifest_is_reported_and_its_images_are_scored_again(tmp_path: Path) -> None:
    """A committed run's manifest cut to 300 bytes used to drop the run from `dskd results`
    with a warning (exit 0) while the next `dskd score` skipped its images as already scored:
    rows no reader could see, never scored again."""
    model = make_model(tmp_path)
    write_textures(tmp_path / "images", 30)
    out = tmp_path / "scores"
    first = score_images(str(tmp_path / "images"), str(model), str(out), ScoringOptions())
    manifest = out / "_manifests" / f"run={first.run_id}.json"
    manifest.write_bytes(manifest.read_bytes()[:300])

    why = f"run {first.run_id} is damaged: its manifest {manifest} is not valid JSON (300 bytes)"
    for attempt in ("before", "after"):
        result = dskd("results", str(out))
        assert result.returncode == 1, attempt
        assert result.stderr.startswith(f"dskd: error: {why}") and "Traceback" not in result.stderr
        [line] = [x for x in result.stdout.splitlines() if x.startswith(first.run_id)]
        assert line.endswith("DAMAGED: its rows cannot be read (below)")
        if attempt == "before":
            plan = dskd("score", str(tmp_path / "images"), "--model", str(model), "--out",
                        str(out), "--dry-run")  # fmt: skip
            assert plan.returncode == 0 and "skipped 0 (already scored)" in plan.stdout
            again = score_images(str(tmp_path / "images"), str(model), str(out), ScoringOptions())
            assert (again.scored, again.skipped) == (30, 0)
    table = read_results(str(out))
    assert table.num_rows == 30 and set(table["run_id"].to_pylist()) == {again.run_id}
    assert [r.run_id for r in committed_runs(str(out))] == [again.run_id]


def test_control_characters_in_names_never_reach_the_terminal(tmp_path: Path) -> None:
    """An ESC sequence in a file name used to recolour the terminal through `dskd results`,
    and a newline split a table row: shown escaped, as bytes that are not UTF-8 are. The
    rows keep the exact names (JSON escapes them its own way)."""
    out = tmp_path / "scores"
    red = "/img/\x1b[31mred\x1b[0m.png"
    names = [red, "/img/two\nlines.png", "/img/\u202egnp.exe"]
    synthetic_run(out, "20260101T000000Z-aaaaaa", names, model_id="m\x1b[2J")
    result = dskd("results", str(out), "--top", "3")
    assert result.returncode == 0, result.stderr
    assert not any(c in result.stdout for c in "\x1b\u202e"), result.stdout
    lines = result.stdout.splitlines()
    top = lines[lines.index(next(line for line in lines if line.strip().startswith("score"))) :]
    assert len(top) == 4  # a header and three images: no row split by the newline
    assert "/img/\\x1b[31mred\\x1b[0m.png" in top[3] and "/img/two\\x0alines.png" in top[2]
    assert "/img/\\u202egnp.exe" in top[1] and "m\\x1b[2J" in result.stdout
    assert sorted(read_results(str(out))["image_uri"].to_pylist()) == sorted(names)  # exact
    assert red in [r["image_uri"] for r in json.loads(dskd("results", str(out), "--json",
                                                            "--top", "3").stdout)["top"]]  # fmt: skip


# --- drift -------------------------------------------------------------------------------------


def test_drift_figure_is_the_median_shift_in_calibration_iqrs() -> None:
    calibration = [1.0, 2.0, 3.0, 4.0, 5.0]  # median 3, IQR 2
    drift = score_drift(np.full(20, 9.0), calibration, threshold=4.5)
    assert drift.median_shift == pytest.approx(3.0) and drift.above_threshold == 1.0
    assert drift.flagged and "3.00 calibration IQRs above" in drift.warning()
    # Printed as it decides: never rounded up to the warning's level without a warning.
    for shift, shown, flagged in [(-1.98, "-1.98", False), (1.999, "+1.99", False),
                                  (-2.0, "-2.00", True), (2.004, "+2.00", True)]:  # fmt: skip
        figure = ScoreDrift(shift, 20, 8)
        assert (figure.shown(), figure.flagged) == (shown, flagged)
    assert not score_drift(np.full(20, 3.5), calibration).flagged
    few = score_drift(np.full(MIN_NIGHT_IMAGES - 1, 9.0), calibration)
    assert few.median_shift == pytest.approx(3.0) and not few.flagged  # too few to say
    none = score_drift(np.full(20, 9.0), [1.0, 2.0])
    assert none.median_shift is None and "held-out" in none.why and not none.flagged


def test_a_brightened_night_is_flagged_and_a_normal_night_is_not(
    ray_cluster,
    tmp_path: Path,  # noqa: ANN001
) -> None:
    """End to end: a real teacher (the offline ImageNet Lite0), a model trained on demo
    brushed metal, two nights through `score_images`, the warning from `dskd results`."""
    from dskd_ray.demo.data import make_demo_data, render_sample
    from dskd_ray.training.loop import train

    size = 64
    make_demo_data(tmp_path / "data", categories=["brushed_metal"], n_train=24, n_test_good=1,
                   n_test_defect_per_type=1, image_size=size)  # fmt: skip
    config = DSKDConfig(backbone="efficientnet_lite0", teacher_weights="imagenet",
                        image_size=size, epochs=8, batch_size=4, holdout_fraction=0.34)  # fmt: skip
    model = tmp_path / "model.pt"
    train(config, str(tmp_path / "data" / "brushed_metal"), str(model), device="cpu")

    night = np.stack([
        render_sample("brushed_metal", seed=7, split="night", index=i, image_size=size).image
        for i in range(MIN_NIGHT_IMAGES + 6)
    ])  # fmt: skip
    brighter = np.clip(night.astype(np.float32) * 1.3, 0, 255).astype(np.uint8)  # a new lamp
    warnings = {}
    for name, images in {"normal": night, "bright": brighter}.items():
        folder = tmp_path / name
        folder.mkdir()
        for i, image in enumerate(images):
            Image.fromarray(image).save(folder / f"{i:03d}.png")
        out = tmp_path / f"scores-{name}"
        score_images(str(folder), str(model), str(out), ScoringOptions(batch_size=8))
        result = dskd("results", str(out), "--json")
        assert result.returncode == 0, result.stderr
        (run,) = json.loads(result.stdout)["runs"]
        assert run["scored"] == len(images) and run["drift"]["median_shift"] is not None
        warnings[name] = (run["drift"]["median_shift"], run["drift_warning"], result.stderr)
    shift, warning, stderr = warnings["normal"]
    assert warning is None and "warning" not in stderr, shift
    shift, warning, stderr = warnings["bright"]
    assert warning is not None and "calibration IQRs above" in warning, shift
    assert "dskd: warning:" in stderr
