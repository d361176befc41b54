"""ONNX export: the graph scores the demo data exactly like PyTorch, on its own and in Ray runs.

Real parts only: models trained on the demo data (the offline ImageNet teacher), the real
exporter, ONNX Runtime, a local Ray, Parquet and map PNGs read back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from dskd_ray.config import DSKDConfig, ScoringOptions
from dskd_ray.demo.data import make_demo_data
from dskd_ray.errors import ConfigError
from dskd_ray.inference.scoring import Scorer
from dskd_ray.io.data import list_images, load_images
from dskd_ray.io.map_png import decode_map_png
from dskd_ray.model.checkpoint import FORMAT, load_checkpoint
from dskd_ray.nightly.results import read_results
from dskd_ray.nightly.run import score_images
from dskd_ray.onnx import export
from dskd_ray.onnx.export import export_onnx
from dskd_ray.onnx.graph import ExportError, read_metadata
from dskd_ray.onnx.runtime import OnnxScorer
from dskd_ray.training.loop import train

SIZE = 64


@pytest.fixture(scope="module")
def demo_at(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201 - a function
    """size → the demo washer at that size, made once."""
    made: dict[int, Path] = {}

    def get(size: int) -> Path:
        if size not in made:
            root = tmp_path_factory.mktemp(f"demo{size}")
            make_demo_data(
                root, categories=["washer"], n_train=8, n_test_good=3,
                n_test_defect_per_type=1, image_size=size,
            )  # fmt: skip
            made[size] = root / "washer"
        return made[size]

    return get


@pytest.fixture(scope="module")
def demo(demo_at) -> Path:  # noqa: ANN001
    return demo_at(SIZE)


def demo_test_images(demo: Path, size: int) -> np.ndarray:
    images, kept, _ = load_images(list_images(str(demo / "test")), size)
    assert len(kept) >= 6  # normal images and one of each washer defect
    return images


@pytest.fixture(scope="module")
def test_images(demo: Path) -> np.ndarray:
    return demo_test_images(demo, SIZE)


@pytest.fixture(scope="module")
def trained(demo_at, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN001, ANN201
    """students, backbone, size, switches → a checkpoint trained for one epoch on the demo
    washer, made once."""
    folder = tmp_path_factory.mktemp("models")
    made: dict[tuple[str, str, int, str], Path] = {}

    def get(
        students: str, backbone: str = "efficientnet_lite0", size: int = SIZE, **switches: object
    ) -> Path:
        key = (students, backbone, size, json.dumps(switches, sort_keys=True))
        if key not in made:
            weights = "imagenet" if backbone == "efficientnet_lite0" else "random"
            config = DSKDConfig(
                backbone=backbone, teacher_weights=weights, students=students, image_size=size,
                epochs=1, batch_size=4, holdout_fraction=0.25, **switches,
            )  # fmt: skip
            path = folder / f"{students}-{backbone}-{len(made)}.pt"
            train(config, str(demo_at(size)), str(path), device="cpu")
            made[key] = path
        return made[key]

    return get


def assert_same_scoring(got, want, threshold: float) -> None:
    """The parity bar: each map within 1e-4 of its largest value, the scores within 1e-5 of the
    largest score, the same verdicts. Relative to the largest, not to each value: a score of a
    map minus its normal baseline sits at float32's noise floor there (PyTorch with and without
    channels_last differ by 4e-6 per score on these models)."""
    scale = np.abs(want.maps).max(axis=(1, 2), keepdims=True)
    assert (np.abs(got.maps - want.maps) <= 1e-4 * scale + 1e-12).all()
    assert np.abs(got.scores - want.scores).max() <= 1e-5 * np.abs(want.scores).max()
    np.testing.assert_array_equal(got.scores > threshold, want.scores > threshold)


@pytest.mark.parametrize(
    ("students", "backbone", "switches", "size"),
    [("both", "efficientnet_lite0", {}, SIZE), ("se", "efficientnet_lite0", {}, SIZE),
     ("sd", "efficientnet_lite0", {}, SIZE), ("both", "resnet18", {}, SIZE),
     # The students' switches that change the graph (docs/design.md §3).
     ("both", "efficientnet_lite0", {"feature_norm": "standardize", "distance": "l2"}, SIZE),
     # At 64² the stride-32 level is 2×2: its spread, fitted on 2 held-out images' 8 values,
     # came out 0.008 and scaled float32's noise ×20 in PyTorch itself (score error against
     # float64 7e-6; ONNX 1.1e-5, over the bar). At 128² (4×4): 1e-6 and 4e-6.
     ("both", "efficientnet_lite0", {"pyramid": "8-16-32", "encoder_student": "resnet"}, 128)],
)  # fmt: skip
def test_exported_graph_scores_the_demo_images_like_pytorch(
    trained,
    demo_at,  # noqa: ANN001
    tmp_path: Path,
    students: str,
    backbone: str,
    switches: dict,
    size: int,
) -> None:
    ckpt_path = trained(students, backbone, size, **switches)
    test_images = demo_test_images(demo_at(size), size)
    out = tmp_path / "model.onnx"
    result = export_onnx(str(ckpt_path), str(out), test_images)
    assert result.check.passed and result.check.images == len(test_images)

    checkpoint = load_checkpoint(str(ckpt_path))
    onnx.checker.check_model(str(out))  # a valid, self-contained file: no external data
    assert not list(tmp_path.glob("*.data"))
    meta = read_metadata(str(out))
    assert meta["model_id"] == checkpoint.model_id
    assert meta["checkpoint_format"] == FORMAT
    assert int(meta["image_size"]) == size
    assert json.loads(meta["threshold"]) == pytest.approx(checkpoint.threshold.value)
    assert json.loads(meta["config"])["students"] == students
    assert {k: json.loads(meta["config"])[k] for k in switches} == switches

    want = Scorer(checkpoint, device="cpu").score_batch(test_images)
    scorer = OnnxScorer(str(out), batch_size=5)  # other chunks than PyTorch's: N is dynamic
    got = scorer.score_batch(test_images)
    assert (scorer.model_id, scorer.threshold) == (checkpoint.model_id, checkpoint.threshold.value)
    assert_same_scoring(got, want, checkpoint.threshold.value)
    assert np.ptp(want.scores) > 0  # a trained model: the parity is not one of constants


def test_a_graph_that_does_not_match_is_refused_and_not_written(
    trained,
    test_images: np.ndarray,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ckpt_path = trained("sd")
    monkeypatch.setattr(export, "MAP_TOLERANCE", 0.0)  # float rounding now counts as a mismatch
    out = tmp_path / "model.onnx"
    with pytest.raises(
        ExportError, match=r"does not score like the model, not written: .*map error"
    ):
        export_onnx(str(ckpt_path), str(out), test_images)
    assert not out.exists() and not list(tmp_path.glob("*.onnx*"))


def test_export_cli_writes_and_says_what_it_checked(
    trained, demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt_path = trained("sd")
    monkeypatch.setenv("DSKD_RAY_CACHE", str(tmp_path / "cache"))  # for the subprocesses too
    model_bytes = ckpt_path.read_bytes()
    out = tmp_path / "exported" / "model.onnx"
    out.parent.mkdir()
    out.write_text("notes on line 3\n")  # a file that is not a graph, under the graph's name

    def export_to(target: str, *more: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "dskd_ray.cli", "export", str(ckpt_path), "--out", target,
             "--check-images", str(demo / "test"), *more],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip

    # The checkpoint itself, spelled another way: refused, whatever --force says.
    itself = f"{ckpt_path.parent}/../{ckpt_path.parent.name}/{ckpt_path.name}"
    refused = export_to(itself, "--force")
    assert refused.returncode == 1 and refused.stderr.strip() == (
        f"dskd: error: --out {itself} is the checkpoint {ckpt_path} itself: write the graph to "
        "a new file (model.onnx)"
    )
    assert ckpt_path.read_bytes() == model_bytes
    refused = export_to(str(out))
    assert refused.returncode == 1 and refused.stderr.strip() == (
        f"dskd: error: --out {out} exists and is not an ONNX graph (this looks like a text "
        "file): not overwritten; choose another --out, or add --force to replace it"
    )
    assert out.read_text() == "notes on line 3\n"

    done = export_to(str(out), "--force")
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}: model {load_checkpoint(str(ckpt_path)).model_id}" in done.stdout
    assert "verdicts identical" in done.stdout
    assert read_metadata(str(out))["model_id"] == load_checkpoint(str(ckpt_path)).model_id
    # The checked graph is also where `--backend onnxruntime` looks: its first run exports
    # nothing (an export now would fail this test).
    [cached] = (tmp_path / "cache" / "onnx").glob("*.onnx")
    assert cached.read_bytes() == out.read_bytes()

    def no_export(*args: object) -> None:
        raise AssertionError("exported again")

    monkeypatch.setattr(export, "export_graph", no_export)
    assert export.cached_graph(load_checkpoint(str(ckpt_path))) == out.read_bytes()

    missing = subprocess.run(
        [sys.executable, "-m", "dskd_ray.cli", "export", str(tmp_path / "nope.pt"), "--out",
         str(tmp_path / "x.onnx")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert missing.returncode == 1
    assert missing.stderr.startswith("dskd: error:") and len(missing.stderr.splitlines()) == 1


def test_an_export_replaces_a_graph_but_nothing_else_without_force(tmp_path: Path) -> None:
    """What `export_onnx` checks before spending a minute on an export."""
    ckpt = tmp_path / "m.pt"
    ckpt.write_bytes(b"PK\x03\x04 stands in for a checkpoint")
    graph = tmp_path / "old.onnx"
    graph.write_bytes(b"\x08\x0e\x12\x07pytorch:\x00")
    export.check_export_target(str(ckpt), str(graph))  # a graph: replaced without --force
    export.check_export_target(str(ckpt), str(tmp_path / "new.onnx"))
    others = {"copy.pt": (ckpt.read_bytes(), "a PyTorch file, a checkpoint perhaps"),
              "image.onnx": (b"\xff\xd8\xff\xe0", "a JPEG image")}  # fmt: skip
    for name, (data, kind) in others.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(
            ExportError, match=f"exists and is not an ONNX graph .this looks like {kind}"
        ):
            export.check_export_target(str(ckpt), str(tmp_path / name))
        export.check_export_target(str(ckpt), str(tmp_path / name), force=True)
    os.symlink(ckpt, tmp_path / "link.onnx")
    for itself in (str(tmp_path / "link.onnx"), f"{tmp_path}//./m.pt"):
        with pytest.raises(ExportError, match="is the checkpoint .* itself"):
            export.check_export_target(str(ckpt), itself, force=True)


def test_onnxruntime_backend_is_refused_with_pytorch_only_options() -> None:
    for bad in (
        ScoringOptions(backend="onnxruntime", compile=True),
        ScoringOptions(backend="onnxruntime", precision="bf16"),
        ScoringOptions(backend="onnxruntime", device="cuda"),
        ScoringOptions(backend="tensorrt"),
    ):
        with pytest.raises(ConfigError, match="--backend"):
            bad.validate()


def test_ray_run_on_onnxruntime_writes_the_rows_and_maps_of_a_pytorch_run(
    ray_cluster,
    trained,
    demo: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DSKD_RAY_CACHE", str(tmp_path / "cache"))
    model = trained("both")
    images = demo / "test"
    torch_run = score_images(
        str(images), str(model), str(tmp_path / "torch"), ScoringOptions(backend="torch")
    )
    onnx_run = score_images(
        str(images), str(model), str(tmp_path / "onnx"), ScoringOptions(backend="onnxruntime")
    )
    assert list(tmp_path.glob("cache/onnx/*.onnx"))  # exported once, reused by the next run
    assert (onnx_run.listed, onnx_run.scored, onnx_run.errors) == (
        torch_run.listed, torch_run.scored, 0,
    )  # fmt: skip
    assert onnx_run.model_id == torch_run.model_id

    key = "image_uri"
    want = read_results(str(tmp_path / "torch")).sort_by(key).to_pydict()
    got = read_results(str(tmp_path / "onnx")).sort_by(key).to_pydict()
    assert got[key] == want[key] and set(got["status"]) == {"ok"}
    scores = np.array(want["score"])
    assert np.abs(np.array(got["score"]) - scores).max() <= 1e-5 * np.abs(scores).max()
    assert got["is_anomalous"] == want["is_anomalous"]
    assert got["model_id"] == want["model_id"] and got["threshold"] == want["threshold"]
    for mine, theirs, scale in zip(got["map_uri"], want["map_uri"], want["map_scale"], strict=True):
        a = decode_map_png(Path(mine).read_bytes())
        b = decode_map_png(Path(theirs).read_bytes())
        assert np.abs(a - b).max() <= scale + 1e-4 * np.abs(b).max()  # one 16-bit step


def test_cli_scores_a_handful_in_process_on_onnxruntime_like_pytorch(
    trained, demo: Path, test_images: np.ndarray, tmp_path: Path
) -> None:
    """No Ray: `dskd score --backend onnxruntime` on a few images runs the graph in its own
    process and writes PyTorch's scores."""
    model = trained("both")
    out = tmp_path / "scores"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["DSKD_RAY_CACHE"] = str(tmp_path / "cache")
    done = subprocess.run(
        [sys.executable, "-m", "dskd_ray.cli", "score", str(demo / "test"), "--model",
         str(model), "--out", str(out), "--backend", "onnxruntime", "-v"],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "in this process" in done.stderr and "Started a local Ray" not in done.stderr
    n = len(test_images)
    assert f"listed {n}, scored {n}, errors 0" in done.stdout
    assert list((tmp_path / "cache" / "onnx").glob("*.onnx"))

    rows = read_results(str(out)).sort_by("image_uri").to_pydict()
    uris = sorted(list_images(str(demo / "test")))
    assert rows["image_uri"] == uris
    images, _, _ = load_images(uris, SIZE)
    checkpoint = load_checkpoint(str(model))
    want = Scorer(checkpoint, device="cpu").score_batch(images).scores
    got = np.array(rows["score"], np.float32)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    assert rows["is_anomalous"] == [bool(s > checkpoint.threshold.value) for s in got]
