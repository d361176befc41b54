"""A night of several models (`dskd score --models`, `--routes`, a manifest's `model` column):
the real moto S3 server, the real local Ray, real Parquet and PNGs read back.

The S3 night runs twice on one output: five routes and a loose image (two good models, one a
tiled memory-only model; a model cut short, one whose weights no longer match its id, one of a
later format, a route folder with no model), then again after one model is replaced.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import s3fs
import torch
from fsspec.core import url_to_fs

from conftest import make_bucket, texture
from dskd_ray.config import DSKDConfig, ScoringOptions
from dskd_ray.errors import DataError
from dskd_ray.evaluation.metrics import is_anomalous
from dskd_ray.inference.scoring import Scorer
from dskd_ray.io.images import decode_image
from dskd_ray.io.map_png import decode_map_png
from dskd_ray.model.checkpoint import Threshold, make_checkpoint, save_checkpoint
from dskd_ray.model.network import DSKD
from dskd_ray.nightly.fleet import score_fleet
from dskd_ray.nightly.listing import LISTING_SCHEMA
from dskd_ray.nightly.results import committed_runs, read_results
from dskd_ray.nightly.routes import Router, Routing, read_routes

# --- models and images --------------------------------------------------------------------------


def make_model(path: Path, seed: int, **changes: object) -> str:
    """A tiny random-teacher checkpoint, calibrated: its threshold the median of 8 textures'
    scores, which it keeps as held-out scores (so a route gets a drift figure). Returns its id."""
    torch.manual_seed(seed)
    config = DSKDConfig(
        memory="none", backbone="resnet18", teacher_weights="random", image_size=64
    ).replace(**changes)
    model = DSKD(config)
    if config.memory == "knn":  # a bank of random patches: the memory's cost, not its quality
        with torch.no_grad():
            model.memory.bank = torch.rand(40, model.memory.channels)
    ckpt = make_checkpoint(model)
    rng = np.random.default_rng(seed)
    scorer = Scorer(ckpt, device="cpu")
    images = [decode_image(texture(rng), scorer.decode_size)[0] for _ in range(8)]
    scores = scorer.score_images(images).scores.astype(np.float32)
    ckpt.threshold = Threshold(float(np.quantile(scores, 0.5)), "quantile", 0.5, list(scores))
    save_checkpoint(ckpt, path)
    return ckpt.model_id


def tampered(good: Path, path: Path) -> None:
    """`good` with one weight changed and its stated ids kept: the header reads as a model, the
    weights do not match it (a bad copy)."""
    payload = torch.load(good, weights_only=True)
    key = next(k for k, v in payload["state_dict"].items() if v.is_floating_point())
    payload["state_dict"][key] = payload["state_dict"][key] + 1.0
    torch.save(payload, path)


def later_format(good: Path, path: Path) -> None:
    payload = torch.load(good, weights_only=True)
    torch.save({**payload, "format": "dskd_ray.checkpoint/99"}, path)


def reference(model: str, blobs: list[bytes]) -> tuple[np.ndarray, list[np.ndarray]]:
    """The scoring core on the same bytes: (scores, maps) (a tiled model's at full size)."""
    scorer = Scorer(model, device="cpu", batch_size=16)
    result = scorer.score_images([decode_image(b, scorer.decode_size)[0] for b in blobs])
    return result.scores, list(result.maps)


def check_scored(rows: list[dict], model: str, blobs: dict[str, bytes], model_id: str) -> None:
    """Each row scored by `model`: its id, threshold and verdict, its score and its map."""
    scorer = Scorer(model, device="cpu")
    scores, maps = reference(model, [blobs[r["image_uri"]] for r in rows])
    fs, _ = url_to_fs(rows[0]["map_uri"], skip_instance_cache=True, use_listings_cache=False)
    for row, score, amap in zip(rows, scores, maps, strict=True):
        assert row["status"] == "ok" and row["model_id"] == model_id, row
        assert row["threshold"] == scorer.threshold
        assert row["score"] == pytest.approx(float(score), rel=1e-4, abs=1e-5)
        assert row["is_anomalous"] == bool(
            is_anomalous(np.float32([row["score"]]), row["threshold"])[0]
        )
        stored = decode_map_png(fs.cat(row["map_uri"]), row["map_scale"])
        if not scorer.tiled:
            assert stored.shape == amap.shape
            assert np.abs(stored - amap).max() <= 0.51 * row["map_scale"] + 1e-5


# --- the S3 night -------------------------------------------------------------------------------

ROUTES = {"line_a": 6, "line_b": 4, "line_c": 2, "line_d": 2, "line_e": 2, "line_f": 2}


@pytest.fixture(scope="module")
def s3_night(s3_server: dict, ray_cluster, tmp_path_factory: pytest.TempPathFactory) -> dict:  # noqa: ANN001
    for bucket in ("fl-models", "fl-images", "fl-scores"):
        make_bucket(s3_server, bucket)
    fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    local = tmp_path_factory.mktemp("fleet-models")
    ids = {
        "line_a": make_model(local / "line_a.pt", 0),
        "line_b": make_model(local / "line_b.pt", 1, students="none", memory="knn", tiled=True),
    }
    (local / "line_c.pt").write_bytes((local / "line_a.pt").read_bytes()[:5000])  # cut short
    tampered(local / "line_a.pt", local / "line_e.pt")
    later_format(local / "line_a.pt", local / "line_f.pt")
    for name in ("line_a", "line_b", "line_c", "line_e", "line_f"):
        fs.put_file(str(local / f"{name}.pt"), f"fl-models/{name}.pt")
    rng = np.random.default_rng(5)
    files = {
        f"fl-images/{route}/cam{i % 2}/img_{i:02d}.png": texture(rng)
        for route, n in ROUTES.items()
        for i in range(n)
    }
    files["fl-images/loose.png"] = texture(rng)
    files["fl-images/line_a/cam0/corrupt.png"] = rng.bytes(500)
    fs.pipe(files)
    blobs = {f"s3://{k}": v for k, v in files.items()}
    out = "s3://fl-scores/night"
    routing = Routing(models="s3://fl-models")
    first = score_fleet("s3://fl-images", routing, out, ScoringOptions(batch_size=4))
    rows_first = read_results(out).to_pylist()
    # Line A gets a new model (another seed: another id): its route alone is scored again.
    ids["line_a_new"] = make_model(local / "line_a_new.pt", 2)
    fs.put_file(str(local / "line_a_new.pt"), "fl-models/line_a.pt")
    second = score_fleet("s3://fl-images", routing, out, ScoringOptions(batch_size=4))
    return {
        "out": out, "blobs": blobs, "ids": ids, "local": local, "first": first,
        "second": second, "rows_first": rows_first,
    }  # fmt: skip


def _by_uri(rows: list[dict]) -> dict[str, dict]:
    found: dict[str, dict] = {}
    for row in rows:
        assert row["image_uri"] not in found, f"two rows for {row['image_uri']}"
        found[row["image_uri"]] = row
    return found


def test_one_run_scores_every_route_with_its_model_and_says_why_for_the_rest(
    s3_night: dict,
) -> None:
    """Every listed image one row; each route's images scored by its own model (a ResNet18 at
    64² and a tiled memory-only model, in one actor pool) as the scoring core scores them; the
    routes whose model is cut short, tampered with or of a later format, the route folder with
    no model and the loose image: retryable error rows that say why. One commit."""
    blobs, ids, first = s3_night["blobs"], s3_night["ids"], s3_night["first"]
    rows = _by_uri(s3_night["rows_first"])
    assert sorted(rows) == sorted(blobs)
    [run] = [r for r in committed_runs(s3_night["out"]) if r.run_id == first.run_id]
    assert {r["run_id"] for r in rows.values()} == {run.run_id}
    route_of = {u: u.split("/")[3] if u.count("/") > 3 else None for u in blobs}
    for uri, row in rows.items():
        assert row["route"] == route_of[uri], (uri, row["route"])
    for route, model in (("line_a", "line_a"), ("line_b", "line_b")):
        scored = [r for u, r in rows.items() if route_of[u] == route and "corrupt" not in u]
        check_scored(scored, str(s3_night["local"] / f"{model}.pt"), blobs, ids[model])
    bad = rows["s3://fl-images/line_a/cam0/corrupt.png"]  # a bad image, not a bad model
    assert bad["status"] == "error" and "not a recognised image format" in bad["error"]
    assert bad["model_id"] == ids["line_a"] and not bad["retryable"]
    why = {
        "line_c": "model unusable: s3://fl-models/line_c.pt is not a dskd_ray checkpoint",
        "line_d": "no model: s3://fl-models/line_d.pt does not exist",
        "line_e": "model unusable: s3://fl-models/line_e.pt is corrupt: its weights do not match",
        "line_f": "model unusable: s3://fl-models/line_f.pt is a 'dskd_ray.checkpoint/99' checkpoint",
        None: "no model: the image is not in a route folder",
    }
    for uri, row in rows.items():
        if route_of[uri] in why:
            assert row["status"] == "error" and row["retryable"], row
            assert row["error"].startswith(why[route_of[uri]]), row["error"]
            assert row["model_id"] is None and row["score"] is None and row["map_uri"] is None
    # The manifest: every route, its model, counts and drift; the parts name their models.
    routes = {r["route"]: r for r in run.manifest["routes"]}
    assert set(routes) == set(why) | {"line_a", "line_b"}
    assert (routes["line_a"]["scored"], routes["line_a"]["errors"]) == (6, 1)
    assert routes["line_b"]["model_id"] == ids["line_b"] and routes["line_b"]["scored"] == 4
    assert routes["line_b"]["drift"]["calibration_images"] == 8
    assert routes["line_e"]["errors"] == 2 and routes["line_e"]["model_id"] is None
    assert run.model_id is None and {ids["line_a"], ids["line_b"]} <= set(run.model_ids or [])
    assert all(set(f["model_ids"]) <= set(run.model_ids) for f in run.manifest["files"])
    assert (first.scored, first.errors, first.listed) == (10, 10, len(blobs))


def test_a_replaced_model_scores_its_route_again_and_no_other(s3_night: dict) -> None:
    """Line A's model is replaced between the nights: its images (the corrupt one too: a new
    model may read it) are scored again by the new model; line B's are skipped; the images
    with no usable model get their error rows again (retryable: tried each night)."""
    out, ids, second = s3_night["out"], s3_night["ids"], s3_night["second"]
    rows = read_results(out).filter(pc.equal(read_results(out)["run_id"], second.run_id))
    rows = _by_uri(rows.to_pylist())
    a = [r for u, r in rows.items() if "/line_a/" in u and "corrupt" not in u]
    assert len(a) == 6
    check_scored(a, str(s3_night["local"] / "line_a_new.pt"), s3_night["blobs"],
                 ids["line_a_new"])  # fmt: skip
    assert not any("/line_b/" in u for u in rows)
    routes = {r.route: r for r in second.routes}
    assert (routes["line_b"].skipped, routes["line_b"].scored) == (4, 0)
    assert routes["line_a"].skipped == 0 and routes["line_a"].model_id == ids["line_a_new"]
    unrouted = [u for u in rows if "/line_a/" not in u]
    assert len(unrouted) == 2 + 2 + 2 + 2 + 1 and all(
        rows[u]["status"] == "error" for u in unrouted
    )
    # Each model's latest rows, and a route's whatever scored it.
    latest = read_results(out, latest=True, route="line_a")
    assert set(latest["model_id"].to_pylist()) == {ids["line_a"], ids["line_a_new"]}
    assert set(read_results(out, route="line_b")["model_id"].to_pylist()) == {ids["line_b"]}
    assert read_results(out, model_id=ids["line_b"]).num_rows == 4


def dskd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dskd_ray.cli", *args], capture_output=True, text=True, timeout=600
    )


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.routes: list[str] = []
        self._in_route = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.images.append(dict(attrs)["src"] or "")
        self._in_route = tag == "h2" and dict(attrs).get("class") == "route"

    def handle_data(self, data: str) -> None:
        if self._in_route:
            self.routes.append(data)
            self._in_route = False


def test_the_morning_after_per_route_and_the_dry_run(s3_night: dict, tmp_path: Path) -> None:
    """`dskd results`: one line per route of each run, the top images each route's apart, a
    gallery section per route; `dskd score --models --dry-run`: the counts per route, every
    model's header checked, nothing written."""
    out, first = s3_night["out"], s3_night["first"]
    report = json.loads(dskd("results", out, "--json", "--top", "3").stdout)
    figures = [r for r in report["runs"] if r["run_id"] == first.run_id]
    assert [f["route"] for f in figures] == [r.route for r in first.routes]
    a = next(f for f in figures if f["route"] == "line_a")
    assert (a["listed"], a["scored"], a["errors"]) == (7, 6, 1) and a["drift"] is not None
    assert {t["route"] for t in report["top"]} == {"line_a", "line_b"}
    groups = {(t["route"], t["model_id"]) for t in report["top"]}
    assert len(groups) == 3  # line A's two models, line B's
    for group in groups:  # ranked within the route and model, on that model's scale
        mine = [t["score"] for t in report["top"] if (t["route"], t["model_id"]) == group]
        assert mine == sorted(mine, reverse=True) and len(mine) == 3
    table = dskd("results", out, "--route", "line_e")
    assert table.returncode == 0 and "line_e" in table.stdout and "line_a " not in table.stdout
    assert "2 model unusable" in table.stdout

    gallery = tmp_path / "gallery"
    done = dskd("results", out, "--run", first.run_id, "--top", "2", "--report", str(gallery))
    assert done.returncode == 0, done.stderr
    page = _Page()
    page.feed((gallery / "index.html").read_text())
    assert page.routes == [f"Route {r.route or '(none)'}" for r in first.routes]
    pictures = [s for s in page.images if s.startswith("images/")]
    assert len(pictures) == len(set(pictures)) == 4  # two per scored route
    assert all((gallery / s).is_file() for s in page.images)

    before = sorted(s3fs.S3FileSystem(skip_instance_cache=True).find("fl-scores"))
    dry = dskd("score", "s3://fl-images", "--models", "s3://fl-models", "--out", out, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    lines = dry.stdout.splitlines()
    assert lines[0].startswith(f"dry run: listed {len(s3_night['blobs'])} (")
    # Headers only: line E's header is sound (its weights are checked by the run itself).
    assert "skipped 11 (already scored), to score 2 (" in lines[0]
    assert "without a usable model 7," in lines[0]
    assert any(line.startswith("  route line_b: listed 4, skipped 4, to score 0") for line in lines)
    assert any("route line_f: listed 2: model unusable" in line for line in lines)
    assert "dskd: warning: route line_c: model unusable" in dry.stderr
    assert sorted(s3fs.S3FileSystem(skip_instance_cache=True).find("fl-scores")) == before


# --- routes by file, an actor killed; routes by a manifest's column ------------------------------


def _pids(pattern: str) -> list[int]:
    """Processes whose title (Ray sets it to the task or actor it runs) contains `pattern`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if title.startswith("ray::") and pattern in title:
                found.append(int(entry.name))
    return found


def test_routes_by_file_and_a_killed_actor_holding_two_models(ray_cluster, tmp_path: Path) -> None:  # noqa: ANN001
    """`dskd score --routes routes.yaml` on a layout not by route folders, two models of two
    input sizes (64² and 96²) in one actor pool, each actor keeping both
    (`--models-per-actor 2`); the scoring actor is SIGKILLed once maps of both models are
    written. Ray restarts it (it loads the models again, lazily) and the run commits every
    image exactly once, each with the model its pattern gives."""
    models = tmp_path / "models"
    models.mkdir()
    ids = {
        "press": make_model(models / "press.pt", 3),
        "paint": make_model(models / "paint.pt", 4, image_size=96),
    }
    rng = np.random.default_rng(9)
    blobs = {}
    # The second model's images are enough blocks that some are left when the kill lands.
    layout = [f"site/station-1/day{i % 3}/p{i:02d}.png" for i in range(8)]
    layout += [f"site/station-2/q{i:02d}.png" for i in range(16)]
    layout += ["site/station-2/deep/r00.png", "site/other/s00.png"]
    for name in layout:
        path = tmp_path / "images" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(texture(rng))
        blobs[str(path)] = path.read_bytes()
    routes = tmp_path / "routes.yaml"
    routes.write_text(
        "- {pattern: 'site/station-1', model: press}\n"
        "- {pattern: 'site/station-2/*.png', model: models/paint.pt, route: paint}\n"
    )
    out = tmp_path / "out"
    job = subprocess.Popen(
        [sys.executable, "-m", "dskd_ray.cli", "score", str(tmp_path / "images"), "--routes",
         str(routes), "--models", str(models), "--out", str(out), "--address",
         ray_cluster.get_runtime_context().gcs_address, "--batch-size", "4",
         "--models-per-actor", "2"],  # the actor keeps both models when the kill lands
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    killed: list[int] = []
    both = [out / "maps" / f"model={ids[r]}" for r in ("press", "paint")]
    deadline = time.time() + 900  # a guard against a hang, not a timing
    try:
        while not killed and job.poll() is None and time.time() < deadline:
            if all(m.is_dir() and any(m.rglob("*.png")) for m in both):
                for pid in _pids("MapBatches(ScoringActor)")[:1]:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            time.sleep(0.02)
        stdout, stderr = job.communicate(timeout=900)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    assert job.returncode == 0, stderr[-3000:]
    assert killed, f"no scoring actor was seen to kill:\n{stderr[-3000:]}"
    assert "route press: listed 8, scored 8, errors 0" in stdout, stdout
    rows = _by_uri(read_results(str(out)).to_pylist())
    assert sorted(rows) == sorted(blobs)  # every image exactly once
    for route, n in (("press", 8), ("paint", 16)):
        mine = [r for r in rows.values() if r["route"] == route]
        assert len(mine) == n
        check_scored(mine, str(models / f"{route}.pt"), blobs, ids[route])
    for name in ("site/station-2/deep/r00.png", "site/other/s00.png"):  # `*` stays in a folder
        row = rows[str(tmp_path / "images" / name)]
        assert row["route"] is None and row["error"].startswith("no model: no route in ")


def test_routes_by_a_manifest_column(ray_cluster, tmp_path: Path) -> None:  # noqa: ANN001
    """A manifest's `model` column: a name in --models, a checkpoint's path, a name with no
    checkpoint, and none (one row each way); the others' images scored by their model."""
    models = tmp_path / "models"
    models.mkdir()
    ids = {"m1": make_model(models / "m1.pt", 5), "m2": make_model(tmp_path / "m2.pt", 6)}
    rng = np.random.default_rng(10)
    blobs, manifest = {}, []
    for i, model in enumerate(["m1"] * 4 + [str(tmp_path / "m2.pt")] * 3 + ["nope", ""]):
        path = tmp_path / "images" / f"i{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(texture(rng))
        blobs[str(path)] = path.read_bytes()
        manifest.append((str(path), model))
    csv = tmp_path / "night.csv"
    csv.write_text("image_uri,model\n" + "".join(f"{u},{m}\n" for u, m in manifest))
    out = tmp_path / "out"
    summary = score_fleet(str(csv), Routing(models=str(models)), str(out),
                          ScoringOptions(batch_size=4))  # fmt: skip
    rows = _by_uri(read_results(str(out)).to_pylist())
    assert sorted(rows) == sorted(blobs)
    check_scored(
        [rows[u] for u, m in manifest if m == "m1"], str(models / "m1.pt"), blobs, ids["m1"]
    )
    m2 = [rows[u] for u, m in manifest if m.endswith("m2.pt")]
    check_scored(m2, str(tmp_path / "m2.pt"), blobs, ids["m2"])
    assert {r["route"] for r in m2} == {"m2"}
    nope, empty = rows[manifest[-2][0]], rows[manifest[-1][0]]
    assert nope["route"] == "nope" and nope["error"] == f"no model: {models}/nope.pt does not exist"
    assert empty["route"] is None and empty["error"].startswith("no model: the manifest's model")
    assert (summary.scored, summary.errors, summary.gone) == (7, 2, 0)


# --- routing, without Ray -------------------------------------------------------------------


def test_routes_files_and_what_they_refuse(tmp_path: Path) -> None:
    """CSV and YAML rules, first match wins, globs within a folder or across; a model name
    looked up in --models, a path beside the routes file; bad files refused in one line."""
    models = tmp_path / "models"
    models.mkdir()
    for name in ("a", "b"):
        (models / f"{name}.pt").write_bytes(b"x")
    (tmp_path / "r.csv").write_text(
        "pattern,model,route\ncam1/keep/**/*.png,b,\ncam1,a,\n**/*.jpg,elsewhere/c.pt,jpegs\n"
    )
    routing = read_routes(str(tmp_path / "r.csv"), str(models))
    assert [(r.route, r.model) for r in routing.rules] == [
        ("b", str(models / "b.pt")), ("a", str(models / "a.pt")),
        ("jpegs", str(tmp_path / "elsewhere" / "c.pt")),
    ]  # fmt: skip
    images = tmp_path / "in"
    uris = [str(images / p) for p in (
        "cam1/keep/x/1.png", "cam1/keep/2.png", "cam1/3.jpg", "cam10/4.png", "x/5.jpg", "6.jpg",
        "cam1/keep/7.bmp",
    )]  # fmt: skip
    router = Router(routing, str(images), manifest=False)
    got = [router.routes[c].name for c in router.codes(pa.array(uris))]
    assert got == ["b", "b", "a", None, "jpegs", "jpegs", "a"]

    (tmp_path / "r.yaml").write_text("cam2/*: a\n'cam3/[!x]*': b\n")
    yaml_rules = read_routes(str(tmp_path / "r.yaml"), str(models)).rules
    assert [(r.pattern, r.route) for r in yaml_rules] == [("cam2/*", "a"), ("cam3/[!x]*", "b")]
    refused = {
        "a.csv": ("pat,model\nx,a\n", "needs columns pattern and model"),
        "b.csv": ("pattern,model\nx,a\n", "is a name: give --models"),
        "c.csv": ("pattern,model,route\nx,/m/1.pt,r\ny,/m/2.pt,r\n", "already scored by /m/1.pt"),
        "d.yaml": ("[1, 2]\n", "expected pattern, model"),
        "e.txt": ("x,y\n", "name it .csv, .yaml or .yml"),
        "f.yaml": ("{}\n", "names no routes"),
    }
    for name, (text, words) in refused.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError, match=words):
            read_routes(str(tmp_path / name), None if name == "b.csv" else str(models))
    images.mkdir()
    with pytest.raises(DataError, match="holds no checkpoint"):
        Router(Routing(models=str(images)), str(images), manifest=False)
    with pytest.raises(DataError, match="is a path under INPUT, but INPUT is a manifest"):
        Router(routing, str(tmp_path / "m.csv"), manifest=True)


def test_cli_asks_for_one_way_to_name_models(tmp_path: Path) -> None:
    for args, words in (
        ([], "give --model (one checkpoint for every image), or --models / --routes"),
        (["--model", "m.pt", "--models", "ms"], "give it, or --models / --routes"),
    ):
        result = dskd("score", str(tmp_path), "--out", str(tmp_path / "out"), *args)
        assert result.returncode == 2 and words in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_a_listing_stays_the_listing_schema_with_a_model_column(tmp_path: Path) -> None:
    """The model column is kept apart from the listing's fixed columns (what every stage
    reads), and only when asked for: `--model` runs read a manifest as before."""
    from dskd_ray.nightly.listing import list_inputs, read_manifest

    (tmp_path / "m.csv").write_text("image_uri,model\n/a/x.png,m1\n/a/y.png,\n")
    plain = read_manifest(str(tmp_path / "m.csv"))
    assert plain.schema == LISTING_SCHEMA
    listing = list_inputs(str(tmp_path / "m.csv"), str(tmp_path / "out"), with_model=True)
    assert listing.table.schema == LISTING_SCHEMA
    assert listing.models is not None and listing.models.to_pylist() == ["m1", None]
