"""A self-contained HTML evaluation report (`dskd evaluate … --report DIR`).

DIR/index.html shows the metrics table, per category the image-level ROC curve, the PRO curve up
to FPR 0.3 and a score histogram, and overlays of the test images the model got most wrong: the
normal images with the highest scores, the anomalous ones with the lowest, then a sample of the
rest. Every image is a PNG under DIR/<category>/ linked by a relative path, so the folder opens
from disk with no network. The charts are drawn with Pillow: no plotting dependency.

Memory: `Report.add` renders one category and keeps only its HTML, so a caller can drop that
category's maps before evaluating the next. Only the thumbnails shown are decoded again, at the
model's input size (at most `THUMB_SIZE`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from dskd_ray.evaluation import metrics
from dskd_ray.evaluation.evaluate import METRIC_KEYS, CategoryResult, summarize
from dskd_ray.io.data import decode_images
from dskd_ray.reporting.charts import (
    ANOMALOUS_COLOUR,
    CHANCE_COLOUR,
    NORMAL_COLOUR,
    THRESHOLD_COLOUR,
    Chart,
    colour_bar,
    finish_histogram,
    histogram_chart,
    histogram_edges,
)
from dskd_ray.reporting.html import escape, href, img, page, prepare_report_dir
from dskd_ray.reporting.visualize import mask_outline, overlay

log = logging.getLogger(__name__)

THUMB_SIZE = 256  # largest thumbnail panel side in pixels; smaller model inputs stay as they are

OUTLINE_COLOUR = (255, 0, 255)  # magenta: not in the heat ramp, seen on light and dark


# ----------------------------------------------------------------------------- charts


def roc_chart(labels: np.ndarray, scores: np.ndarray, threshold: float | None) -> Chart:
    """Image-level ROC curve, with the checkpoint threshold's operating point marked."""
    fpr, tpr = metrics.roc_curve(labels, scores)
    auroc = metrics.image_auroc(labels, scores)
    chart = Chart(
        f"Image ROC (AUROC {auroc:.3f})",
        "false positive rate (normal images flagged)",
        "true positive rate",
        (0.0, 1.0),
        (0.0, 1.0),
        xticks=np.linspace(0, 1, 6),
        yticks=np.linspace(0, 1, 6),
        size=(420, 360),
    )
    chart.line([0, 1], [0, 1], CHANCE_COLOUR, width=1, dashed=True)
    chart.line(fpr, tpr, ANOMALOUS_COLOUR, width=2)
    entries = [("ROC", ANOMALOUS_COLOUR, "line"), ("chance", CHANCE_COLOUR, "dash")]
    if threshold is not None:
        labels = np.asarray(labels, bool)
        flagged = metrics.is_anomalous(scores, threshold)
        chart.dot(float(flagged[~labels].mean()), float(flagged[labels].mean()), THRESHOLD_COLOUR)
        entries.append((f"threshold {threshold:.4g}", THRESHOLD_COLOUR, "dot"))
    chart.legend(entries, corner="br")
    return chart


def pro_chart(
    masks: np.ndarray, maps: np.ndarray, fpr_limit: float = metrics.PRO_FPR_LIMIT
) -> Chart:
    """Per-region-overlap curve up to `fpr_limit` (the AUPRO integration range)."""
    fpr, pro = metrics.pro_curve(masks, maps, fpr_limit)
    area = float(np.sum(np.diff(fpr) * (pro[1:] + pro[:-1])) / 2.0) / fpr_limit
    chart = Chart(
        f"PRO up to FPR {fpr_limit:g} (AUPRO {area:.3f})",
        "false positive rate (normal pixels)",
        "per-region overlap",
        (0.0, fpr_limit),
        (0.0, 1.0),
        yticks=np.linspace(0, 1, 6),
        size=(420, 360),
    )
    chart.line(fpr, pro, NORMAL_COLOUR, width=2)
    chart.legend([("PRO", NORMAL_COLOUR, "line")], corner="br")
    return chart


def score_histogram(labels: np.ndarray, scores: np.ndarray, threshold: float | None) -> Chart:
    """Image scores of normal and anomalous test images, with the threshold as a dashed line."""
    labels = np.asarray(labels, bool)
    scores = np.asarray(scores, np.float64)
    edges = histogram_edges(scores, [] if threshold is None else [threshold], 30)
    normal, _ = np.histogram(scores[~labels], edges)
    anomalous, _ = np.histogram(scores[labels], edges)
    top = max(int(normal.max(initial=0)), int(anomalous.max(initial=0)))
    chart = histogram_chart(
        "Image scores", "image score (max of the anomaly map)", "test images", edges, top,
        (420, 360),
    )  # fmt: skip
    entries = []
    if normal.any():
        chart.bars(edges, normal, NORMAL_COLOUR)
        entries.append((f"normal ({int((~labels).sum())})", NORMAL_COLOUR, "box"))
    if anomalous.any():
        chart.bars(edges, anomalous, ANOMALOUS_COLOUR)
        entries.append((f"anomalous ({int(labels.sum())})", ANOMALOUS_COLOUR, "box"))
    return finish_histogram(chart, entries, threshold)


# ----------------------------------------------------------------------------- thumbnails


@dataclass
class ThumbnailGroup:
    title: str
    note: str
    indices: list[int]  # into the category's test images, in display order


def select_thumbnails(
    labels: np.ndarray,
    scores: np.ndarray,
    n_worst: int = 8,
    n_sample: int = 24,
    threshold: float | None = None,
) -> list[ThumbnailGroup]:
    """The normal images with the highest scores, the anomalous ones with the lowest, then up to
    `n_sample` of the rest spread evenly over their ranking (highest score first). Groups are
    disjoint; with a threshold, the notes say how many of the worst are wrong calls at it."""
    labels = np.asarray(labels, bool)
    scores = np.asarray(scores, np.float64)
    order = np.argsort(-scores, kind="stable")  # highest score first
    worst_fp = [int(i) for i in order if not labels[i]][:n_worst]
    worst_fn = [int(i) for i in order[::-1] if labels[i]][:n_worst]
    shown = set(worst_fp) | set(worst_fn)
    rest = [int(i) for i in order if int(i) not in shown]
    if len(rest) > n_sample:
        picks = np.unique(np.linspace(0, len(rest) - 1, n_sample).round().astype(int))
        sample = [rest[p] for p in picks]
    else:
        sample = rest
    fp_note = "normal images with the highest scores, highest first"
    fn_note = "anomalous images with the lowest scores, lowest first"
    if threshold is not None:
        n_fp = int(metrics.is_anomalous(scores[worst_fp], threshold).sum())
        n_fn = int((~metrics.is_anomalous(scores[worst_fn], threshold)).sum())
        fp_note += f"; {n_fp} of these {len(worst_fp)} are above the threshold (false positives)"
        fn_note += f"; {n_fn} of these {len(worst_fn)} are at or below it (false negatives)"
    return [
        ThumbnailGroup("Worst false positives", fp_note, worst_fp),
        ThumbnailGroup("Worst false negatives", fn_note, worst_fn),
        ThumbnailGroup(
            "Other test images",
            f"{len(sample)} of the remaining {len(rest)}, spread evenly over their ranking, "
            "highest score first",
            sample,
        ),
    ]


def thumbnail(
    image: np.ndarray, amap: np.ndarray, mask: np.ndarray, threshold: float | None
) -> np.ndarray:
    """Two panels side by side: the image, and the anomaly map over it; both outline the mask
    with a two-pixel magenta line (its edge and the ring just outside it)."""
    height, width = image.shape[:2]
    scale = min(1.0, THUMB_SIZE / max(height, width))  # a tiled model's images keep their aspect
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if (width, height) != size:
        image = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
        amap = np.asarray(Image.fromarray(amap.astype(np.float32)).resize(size, Image.BILINEAR))
        mask = (
            np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.NEAREST))
            > 127
        )
    outline = _thick_outline(mask)
    plain = image.copy()
    plain[outline] = OUTLINE_COLOUR
    heat = overlay(image, amap, threshold, alpha=0.5)
    heat[outline] = OUTLINE_COLOUR
    gap = np.full((image.shape[0], 4, 3), 255, np.uint8)
    return np.concatenate([plain, gap, heat], axis=1)


def _thick_outline(mask: np.ndarray) -> np.ndarray:
    m = mask.astype(bool)
    grown = m.copy()
    grown[1:, :] |= m[:-1, :]
    grown[:-1, :] |= m[1:, :]
    grown[:, 1:] |= m[:, :-1]
    grown[:, :-1] |= m[:, 1:]
    return mask_outline(m) | (grown & ~m)


def _outcome(label: int, score: float, threshold: float | None) -> tuple[str, str]:
    """(verdict text, CSS class): the threshold's call, and whether it was right."""
    if threshold is None:
        return "no threshold in the checkpoint", "unknown"
    flagged = bool(metrics.is_anomalous(np.asarray([score]), threshold)[0])
    verdict = "flagged anomalous" if flagged else "passed as normal"
    if flagged and label:
        return verdict, "tp"
    if flagged:
        return verdict + " (false positive)", "fp"
    if label:
        return verdict + " (false negative)", "fn"
    return verdict, "tn"


# ----------------------------------------------------------------------------- HTML

_CSS = """\
h1 { margin-bottom: 4px; } h2 { margin-top: 40px; border-bottom: 2px solid #ddd; }
h3 { margin: 24px 0 2px; } .note { color: #555; margin: 2px 0 10px; }
table.metrics { border-collapse: collapse; background: white; }
table.metrics th, table.metrics td { padding: 6px 12px; border-bottom: 1px solid #ddd; }
table.metrics td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.metrics tr.mean td { font-weight: 600; border-top: 2px solid #999; }
.charts { display: flex; flex-wrap: wrap; gap: 12px; align-items: flex-start; }
.charts img { background: white; border: 1px solid #ddd; }
.omitted { width: 420px; padding: 16px; border: 1px dashed #bbb; color: #555; box-sizing: border-box; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(300px, 1fr)); gap: 12px; }
figure { margin: 0; background: white; border: 1px solid #ddd; border-top: 5px solid #bbb;
  padding: 6px; }
figure img { width: 100%; height: auto; display: block; image-rendering: auto; }
figcaption { font-size: 13px; line-height: 1.4; margin-top: 4px; overflow-wrap: anywhere; }
figcaption .name { font-weight: 600; }
figure.fp, figure.fn { border-top-color: #d62728; } figure.tp, figure.tn { border-top-color: #2ca02c; }
.verdict.fp, .verdict.fn { color: #b01c1c; font-weight: 600; } .verdict.tp, .verdict.tn { color: #1d7a1d; }
.legend { display: flex; gap: 24px; align-items: center; flex-wrap: wrap; margin: 8px 0; }
.legend img { width: 360px; }
"""


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.3f}"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._")[:48] or "category"


@dataclass
class _Section:
    result: CategoryResult
    threshold: float | None
    anchor: str
    html: str


def _labels_and_scores(result: CategoryResult) -> tuple[np.ndarray, np.ndarray]:
    """(bool labels, float64 scores) of an evaluated category's test images."""
    return np.asarray(result.labels, bool), np.asarray(result.scores, np.float64)


class Report:
    """Builds DIR/index.html one category at a time: `add` each result, then `write`."""

    def __init__(
        self,
        directory: str | Path,
        title: str = "DSKD evaluation report",
        n_worst: int = 8,
        n_sample: int = 24,
    ) -> None:
        self.directory = prepare_report_dir(directory)
        self.title = title
        self.n_worst, self.n_sample = n_worst, n_sample
        self.sections: list[_Section] = []

    def add(
        self, result: CategoryResult, threshold: float | None, model: str | None = None
    ) -> None:
        """Render one category's charts and thumbnails now; keep only its HTML.

        `result` must come from `evaluate_category(..., keep_maps=True)`.
        """
        if result.maps is None or result.masks is None or result.scores is None:
            raise ValueError(
                f"{result.name}: the report needs the anomaly maps; evaluate with keep_maps=True"
            )
        index = len(self.sections)
        folder = f"{index:02d}_{_slug(result.name)}"
        (self.directory / folder).mkdir(exist_ok=True)
        anchor = f"category-{index}"
        labels, scores = _labels_and_scores(result)
        parts = [f'<section id="{anchor}">', f"<h2>{escape(result.name)}</h2>"]
        facts = [
            f"{result.n_test} test images, {result.n_anomalous} anomalous",
            "threshold "
            + ("none (the checkpoint has none)" if threshold is None else f"{threshold:.4g}"),
        ]
        if threshold is not None:
            fp = int(metrics.is_anomalous(scores[~labels], threshold).sum())
            fn = int((~metrics.is_anomalous(scores[labels], threshold)).sum())
            facts.append(
                f"at it: {fp} of {int((~labels).sum())} normal images flagged, "
                f"{fn} of {int(labels.sum())} anomalous images missed"
            )
        if model:
            facts.append(f"model {model}")
        parts.append(f'<p class="note">{escape("; ".join(facts))}.</p>')
        if result.skipped:
            names = ", ".join(Path(uri).name for uri, _ in result.skipped[:10])
            more = f" and {len(result.skipped) - 10} more" if len(result.skipped) > 10 else ""
            parts.append(
                f'<p class="note">{len(result.skipped)} test image(s) could not be read and are '
                f"left out: {escape(names)}{escape(more)}.</p>"
            )
        parts.append(self._charts(result, threshold, folder))
        parts.append(self._thumbnails(result, threshold, folder))
        parts.append("</section>")
        self.sections.append(_Section(result, threshold, anchor, "\n".join(parts)))

    def _charts(self, result: CategoryResult, threshold: float | None, folder: str) -> str:
        labels, scores = _labels_and_scores(result)
        items = []
        if 0 < labels.sum() < len(labels):
            roc_chart(labels, scores, threshold).save(self.directory / folder / "roc.png")
            items.append(self._chart_img(f"{folder}/roc.png", f"Image ROC curve of {result.name}"))
        else:
            items.append(
                '<div class="omitted">ROC curve omitted: the test set needs both normal and '
                "anomalous images.</div>"
            )
        if result.aupro is not None:
            pro_chart(result.masks, result.maps).save(self.directory / folder / "pro.png")
            items.append(self._chart_img(f"{folder}/pro.png", f"PRO curve of {result.name}"))
        else:
            items.append(
                '<div class="omitted">PRO curve omitted: this data set has no ground-truth masks '
                "for its anomalous images, so there are no pixel metrics.</div>"
            )
        score_histogram(labels, scores, threshold).save(self.directory / folder / "scores.png")
        items.append(self._chart_img(f"{folder}/scores.png", f"Image scores of {result.name}"))
        return '<div class="charts">' + "\n".join(items) + "</div>"

    @staticmethod
    def _chart_img(path: str, alt: str) -> str:
        return img(path, alt, 420, 360)

    def _thumbnails(self, result: CategoryResult, threshold: float | None, folder: str) -> str:
        labels, scores = _labels_and_scores(result)
        # The images at their maps' size: the model's input, or (tiled) their own.
        size = None if isinstance(result.maps, list) else result.maps.shape[-1]
        groups = select_thumbnails(labels, scores, self.n_worst, self.n_sample, threshold)
        wanted = [i for g in groups for i in g.indices]
        images, kept, _ = decode_images([result.paths[i] for i in wanted], size)
        decoded = dict(zip(kept, images, strict=True))
        parts = []
        for group in groups:
            if not group.indices:
                continue
            parts.append(f'<h3>{escape(group.title)}</h3><p class="note">{escape(group.note)}.</p>')
            figures = []
            for i in group.indices:
                image = decoded.get(result.paths[i])
                if image is None:
                    log.warning("report: %s could not be read again; no thumbnail", result.paths[i])
                    continue
                name = f"{folder}/{i:05d}.png"
                Image.fromarray(thumbnail(image, result.maps[i], result.masks[i], threshold)).save(
                    self.directory / name
                )
                figures.append(self._figure(result, i, name, threshold))
            parts.append('<div class="grid">' + "\n".join(figures) + "</div>")
        return "\n".join(parts)

    @staticmethod
    def _figure(result: CategoryResult, i: int, src: str, threshold: float | None) -> str:
        path = result.paths[i]
        label = int(result.labels[i])
        score = float(result.scores[i])
        verdict, outcome = _outcome(label, score, threshold)
        truth = "normal" if not label else "anomalous"
        return (
            f'<figure class="{outcome}">'
            f'<a href="{href(src)}">{img(src, f"{Path(path).name}: image and anomaly map")}</a>'
            f'<figcaption><span class="name" title="{escape(path)}">{escape(Path(path).name)}</span>'
            f" · {escape(result.defect_types[i])} ({truth})<br>"
            f'score {score:.4g} · <span class="verdict {outcome}">{escape(verdict)}</span>'
            "</figcaption></figure>"
        )

    def write(self, table: dict[str, dict[str, float | None]] | None = None) -> Path:
        """Write index.html (and the colour bar) and return its path. `table` defaults to
        `summarize` of the added results."""
        results = [s.result for s in self.sections]
        table = table if table is not None else summarize(results)
        colour_bar().save(self.directory / "colour_bar.png")
        rows = []
        for section in self.sections:
            r, row = section.result, table.get(section.result.name, {})
            threshold = "—" if section.threshold is None else f"{section.threshold:.4g}"
            rows.append(
                f'<tr><td><a href="#{section.anchor}">{escape(r.name)}</a></td>'
                + "".join(f'<td class="num">{_fmt(row.get(k))}</td>' for k in METRIC_KEYS)
                + f'<td class="num">{r.n_test}</td><td class="num">{r.n_anomalous}</td>'
                f'<td class="num">{threshold}</td></tr>'
            )
        mean = table.get("mean", {})
        rows.append(
            '<tr class="mean"><td>mean</td>'
            + "".join(f'<td class="num">{_fmt(mean.get(k))}</td>' for k in METRIC_KEYS)
            + "<td></td><td></td><td></td></tr>"
        )
        body = [
            f"<h1>{escape(self.title)}</h1>",
            '<p class="note">Image AUROC and F1-max rank the test images by their score (the '
            f"maximum of the anomaly map); pixel AUROC and AUPRO (FPR ≤ {metrics.PRO_FPR_LIMIT:g}) "
            "compare the maps with the ground-truth masks. “—”: not defined for this data (no "
            "masks, or one class only); the mean is over categories that all have the metric.</p>",
            '<table class="metrics"><thead><tr><th>category</th><th>image AUROC</th>'
            "<th>pixel AUROC</th><th>AUPRO</th><th>F1-max</th><th>test images</th>"
            "<th>anomalous</th><th>threshold</th></tr></thead><tbody>",
            *rows,
            "</tbody></table>",
            '<div class="legend"><span>Each thumbnail: the test image (left) and its anomaly '
            "map over it (right), at the model's input size; the magenta outline is the "
            "ground-truth defect region. A red top edge marks a wrong call at the threshold, "
            'green a right one.</span><img src="colour_bar.png" width="360" height="32" '
            'alt="colour scale of the anomaly map, in units of the threshold"></div>',
            *(s.html for s in self.sections),
        ]
        path = self.directory / "index.html"
        path.write_text(page(self.title, _CSS, body), encoding="utf-8")
        return path


def write_report(
    results: Sequence[CategoryResult],
    directory: str | Path,
    thresholds: Sequence[float | None] | None = None,
    table: dict[str, dict[str, float | None]] | None = None,
) -> Path:
    """Write the report for results evaluated with keep_maps=True; returns DIR/index.html.

    `thresholds`: each category's checkpoint threshold (the verdict in the captions), or None.
    """
    report = Report(directory)
    thresholds = list(thresholds) if thresholds is not None else [None] * len(results)
    for result, threshold in zip(results, thresholds, strict=True):
        report.add(result, threshold)
    return report.write(table)
