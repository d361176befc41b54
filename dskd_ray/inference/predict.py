"""Score a few named images to a folder: an overlay PNG each and scores.csv (`dskd predict`).

An image that cannot be read or decoded, or that the model gives a non-finite score, is a row
with an error, not a failed run. No Ray here.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from dskd_ray.evaluation.metrics import is_anomalous
from dskd_ray.inference.scoring import Scorer, not_finite_reason
from dskd_ray.io.images import ImageDecodeError, decode_image
from dskd_ray.io.storage import describe_failure, is_storage_failure, printable, read_object
from dskd_ray.model.checkpoint import Checkpoint
from dskd_ray.reporting.visualize import overlay

# The image an overlay is drawn on is at most this a side: the overlay's float arithmetic takes
# ~60 bytes a pixel, 24 GB at the decompression limit.
OVERLAY_MAX_SIDE = 4096
CSV_FIELDS = ("image", "score", "is_anomalous", "overlay", "error")


@dataclass
class Prediction:
    image: str  # as given, bytes that are not UTF-8 and control characters escaped
    score: float | None = None
    is_anomalous: bool | None = None  # None: no threshold in the checkpoint, or no score
    overlay: str | None = None
    error: str | None = None

    def row(self) -> dict[str, str]:
        return {
            "image": self.image,
            "score": "" if self.score is None else f"{self.score:.6f}",
            "is_anomalous": "" if self.is_anomalous is None else str(self.is_anomalous).lower(),
            "overlay": self.overlay or "",
            "error": self.error or "",
        }


@dataclass
class Predictions:
    threshold: float | None
    csv_path: Path
    items: list[Prediction] = field(default_factory=list)

    @property
    def failures(self) -> int:
        return sum(1 for p in self.items if p.error is not None)


def predict_images(
    images: list[str],
    model: str | Checkpoint,
    out: Path,
    device: str = "auto",
    on_prediction: Callable[[Prediction], None] | None = None,
) -> Predictions:
    """Score each image (local path or s3:// URI); write `out`/<name>_overlay.png for each and
    `out`/scores.csv. `on_prediction` sees each one as it is made."""
    scorer = Scorer(model, device=device)
    out.mkdir(parents=True, exist_ok=True)
    result = Predictions(scorer.threshold, out / "scores.csv")
    names = _overlay_names([printable(uri) for uri in images])
    for uri, name in zip(images, names, strict=True):
        prediction = _predict_one(scorer, uri, out / f"{name}_overlay.png")
        result.items.append(prediction)
        if on_prediction is not None:
            on_prediction(prediction)
    with open(result.csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(p.row() for p in result.items)
    return result


def _overlay_names(shown: list[str]) -> list[str]:
    """File stems for the overlays: two inputs with the same file name keep both."""
    used: set[str] = set()
    names = []
    for image in shown:
        stem = name = Path(image).stem
        n = 1
        while name in used:
            n += 1
            name = f"{stem}_{n}"
        used.add(name)
        names.append(name)
    return names


def _predict_one(scorer: Scorer, uri: str, overlay_path: Path) -> Prediction:
    shown = printable(uri)  # bytes that are not UTF-8, control characters: escaped
    try:
        data = read_object(uri)
        # Decoded twice: at the model's size exactly as every other path decodes (JPEGs at a
        # reduced scale), and whole for the overlay; once, whole, for a tiled model.
        whole = decode_image(data, None)[0]
        rgb = whole if scorer.tiled else decode_image(data, scorer.image_size)[0]
        full = _overlay_base(whole)
    except ImageDecodeError as e:  # its message is whole, as in a scoring run's error row
        return Prediction(shown, error=printable(str(e)))
    except Exception as e:
        if not is_storage_failure(e):
            raise
        return Prediction(shown, error=printable(f"cannot read: {describe_failure(e)}"))
    scored = scorer.score_images([rgb])
    score = float(scored.scores[0])
    if not scored.finite[0]:  # never "nan normal": a broken model is an error
        return Prediction(shown, error=not_finite_reason(score))
    flags = is_anomalous(scored.scores, scorer.threshold)
    Image.fromarray(overlay(full, scored.maps[0], scorer.threshold)).save(overlay_path)
    return Prediction(
        shown, score, None if flags is None else bool(flags[0]), overlay=str(overlay_path)
    )


def _overlay_base(image: np.ndarray) -> np.ndarray:
    """The image an overlay is drawn on, at most OVERLAY_MAX_SIDE a side."""
    h, w = image.shape[:2]
    if max(h, w) <= OVERLAY_MAX_SIDE:
        return image
    small = Image.fromarray(image)
    small.thumbnail((OVERLAY_MAX_SIDE, OVERLAY_MAX_SIDE), Image.BILINEAR)
    return np.asarray(small)
