"""Models with the teacher's memory through every path that scores: the memory alone
(`dskd train DATA --memory knn --students none`, through the CLI) and the students with it
(DSKD + kNN) train, evaluate, predict, score on Ray, export with parity, run on ONNX Runtime
and tile — each the same answer as `Scorer`'s.

Real parts: the demo washer at 64² and the offline Lite0 teacher, the real exporter and ONNX
Runtime, a local Ray (the session's), Parquet read back.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dskd_ray.config import DSKDConfig, ScoringOptions
from dskd_ray.demo.data import make_demo_data
from dskd_ray.evaluation.evaluate import evaluate_category
from dskd_ray.inference.predict import predict_images
from dskd_ray.inference.scoring import Scorer
from dskd_ray.io.data import decode_images, list_images, load_category, load_images
from dskd_ray.model.checkpoint import load_checkpoint
from dskd_ray.nightly.results import read_results
from dskd_ray.nightly.run import score_images
from dskd_ray.onnx.export import cached_graph, export_onnx
from dskd_ray.onnx.runtime import OnnxScorer
from dskd_ray.training.loop import plan_training, train

SIZE = 64
CLI = [sys.executable, "-m", "dskd_ray.cli"]


@pytest.fixture(scope="module")
def washer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    make_demo_data(
        root, categories=["washer"], n_train=8, n_test_good=3, n_test_defect_per_type=1,
        image_size=SIZE,
    )  # fmt: skip
    return root / "washer"


@pytest.fixture(scope="module")
def models(washer: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """ "knn": the memory alone, trained through the CLI; "dskd+knn": both students and the
    memory (one epoch), through the library."""
    folder = tmp_path_factory.mktemp("memory-models")
    knn = folder / "knn.pt"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(
        [*CLI, "train", str(washer), "--out", str(knn), "--students", "none", "--memory", "knn",
         "--memory-size", "200", "--backbone", "efficientnet_lite0", "--image-size", str(SIZE),
         "--batch-size", "4", "--holdout-fraction", "0.25", "--device", "cpu"],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"model {load_checkpoint(knn).model_id}" in done.stdout
    config = DSKDConfig(
        backbone="efficientnet_lite0", image_size=SIZE, epochs=1, batch_size=4,
        holdout_fraction=0.25, memory="knn", memory_size=200,
    )  # fmt: skip
    fused = folder / "dskd+knn.pt"
    train(config, str(washer), str(fused), device="cpu")
    return {"knn": knn, "dskd+knn": fused}


def assert_same_scoring(got_maps, got_scores, want_maps, want_scores, threshold: float) -> None:
    """The export's parity bar (docs/design.md §6), relative to the largest value."""
    for g, w in zip(got_maps, want_maps, strict=True):
        assert np.abs(g - w).max() <= 1e-4 * np.abs(w).max() + 1e-12
    assert np.abs(got_scores - want_scores).max() <= 1e-5 * np.abs(want_scores).max()
    np.testing.assert_array_equal(got_scores > threshold, want_scores > threshold)


@pytest.mark.parametrize("name", ["knn", "dskd+knn"])
def test_evaluate_predict_export_and_onnxruntime_agree(
    models: dict[str, Path], washer: Path, tmp_path: Path, name: str
) -> None:
    checkpoint = load_checkpoint(str(models[name]))
    assert checkpoint.config.memory == "knn"
    assert checkpoint.config.students == ("none" if name == "knn" else "both")
    assert checkpoint.state_dict["memory.bank"].shape == (200, 40 + 112)
    category = load_category(str(washer))
    scorer = Scorer(checkpoint, device="cpu")
    evaluated = evaluate_category(scorer, category, keep_maps=True)
    assert np.ptp(evaluated.scores) > 0 and evaluated.image_auroc is not None

    # `dskd evaluate` on the checkpoint file reports the library's figures.
    done = subprocess.run(
        [*CLI, "evaluate", str(washer), "--model", str(models[name]), "--json",
         str(tmp_path / "eval.json"), "--device", "cpu"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    table = json.loads((tmp_path / "eval.json").read_text())
    assert table["washer"]["image_auroc"] == pytest.approx(evaluated.image_auroc)
    assert table["washer"]["aupro"] == pytest.approx(evaluated.aupro, rel=1e-4)

    # `predict`: the same scores, image by image.
    predicted = predict_images(evaluated.paths, checkpoint, tmp_path / "pred", device="cpu")
    got = np.array([p.score for p in predicted.items], np.float32)
    np.testing.assert_allclose(got, evaluated.scores, rtol=1e-5)

    # The export, checked on the test images (the bank inside the graph), and its runtime.
    images, kept, _ = load_images(evaluated.paths, SIZE)
    assert kept == evaluated.paths
    result = export_onnx(str(models[name]), str(tmp_path / "m.onnx"), images)
    assert result.check.passed, result.check.format()
    onnx = evaluate_category(OnnxScorer(str(tmp_path / "m.onnx"), batch_size=3), category, True)
    threshold = checkpoint.threshold.value
    assert_same_scoring(onnx.maps, onnx.scores, evaluated.maps, evaluated.scores, threshold)
    assert onnx.image_auroc == evaluated.image_auroc


def test_ray_runs_write_the_scorers_rows(
    ray_cluster,  # noqa: ANN001
    models: dict[str, Path],
    washer: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The nightly job on Ray: the memory alone on ONNX Runtime, DSKD + kNN on PyTorch."""
    monkeypatch.setenv("DSKD_RAY_CACHE", str(tmp_path / "cache"))
    images = washer / "test"
    uris = sorted(list_images(str(images)))
    decoded, _, _ = load_images(uris, SIZE)
    for name, backend in (("knn", "onnxruntime"), ("dskd+knn", "torch")):
        checkpoint = load_checkpoint(str(models[name]))
        if backend == "onnxruntime":
            cached_graph(checkpoint)  # exported here, where it is timed less tightly
        out = tmp_path / name
        options = ScoringOptions(backend=backend, in_process_max=0, batch_size=4)
        summary = score_images(str(images), str(models[name]), str(out), options)
        assert (summary.scored, summary.errors) == (len(uris), 0)
        rows = read_results(str(out)).sort_by("image_uri").to_pydict()
        assert rows["image_uri"] == uris and set(rows["model_id"]) == {checkpoint.model_id}
        want = Scorer(checkpoint, device="cpu").score_batch(decoded).scores
        got = np.array(rows["score"], np.float32)
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), name
        assert rows["is_anomalous"] == [bool(s > checkpoint.threshold.value) for s in got]


# --- tiling ------------------------------------------------------------------------------------


def _texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width] / 64
    phase = rng.uniform(0, 2 * np.pi, 3)
    img = np.stack([0.5 + 0.3 * np.sin(2 * np.pi * 3 * (xx + yy) + p) for p in phase], -1)
    return (np.clip(img + rng.normal(0, 0.03, img.shape), 0, 1) * 255).astype(np.uint8)


def test_a_tiled_memory_model_keeps_every_tiles_patches_and_stitches_on_each_backend(
    tmp_path: Path,
) -> None:
    """`--tile` with the memory alone: the bank is fitted on full-resolution tiles; the
    threshold on stitched held-out maps; ONNX Runtime tiles and stitches like PyTorch."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "normal"
    folder.mkdir()
    for i in range(8):
        Image.fromarray(_texture(rng, 96, 160)).save(folder / f"{i}.png")
    config = DSKDConfig(
        backbone="resnet18", teacher_weights="random", image_size=64, tiled=True,
        tile_overlap=16, batch_size=4, holdout_fraction=0.25, students="none", memory="knn",
        memory_size=10_000,
    )  # fmt: skip
    ckpt = train(config, str(folder), str(tmp_path / "m.pt"), device="cpu").checkpoint
    # 6 training images of 96×160 in 64² tiles overlapping 16: 2 × 3 tiles, 8 × 8 patches each.
    assert ckpt.state_dict["memory.bank"].shape == (6 * 6 * 64, 384)
    scorer = Scorer(ckpt, device="cpu", batch_size=5)
    held, _, _ = decode_images(plan_training(str(folder), config).holdout_uris, None)
    assert held[0].shape == (96, 160, 3)
    np.testing.assert_allclose(
        scorer.score_images(held).scores, ckpt.threshold.normal_scores, rtol=1e-5
    )

    images = [_texture(rng, 100, 150), _texture(rng, 60, 250)]
    want = scorer.score_images(images)
    assert [m.shape for m in want.maps] == [(100, 150), (60, 250)]
    graph = export_onnx(ckpt, str(tmp_path / "m.onnx")).graph
    got = OnnxScorer(graph, batch_size=3).score_images(images)
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-5)
    for g, w in zip(got.maps, want.maps, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-4 * w.max())

    # `dskd predict` on a large image: one stitched map, its score the Scorer's.
    big = tmp_path / "big.png"
    Image.fromarray(images[0]).save(big)
    done = subprocess.run(
        [*CLI, "predict", str(big), "--model", str(tmp_path / "m.pt"), "--out",
         str(tmp_path / "pred")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    [row] = list(csv.DictReader((tmp_path / "pred" / "scores.csv").read_text().splitlines()))
    assert float(row["score"]) == pytest.approx(float(want.scores[0]), rel=1e-5)
