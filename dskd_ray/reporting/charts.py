"""What both HTML pages draw with: the palette, `Chart` (an x/y chart drawn with Pillow, no
plotting dependency) that the evaluation report's ROC, PRO and score charts and the scoring-run
gallery's histogram are drawn on, and the heat map's colour bar."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dskd_ray.reporting.visualize import colorize

NORMAL_COLOUR = (31, 119, 180)
ANOMALOUS_COLOUR = (214, 39, 40)
THRESHOLD_COLOUR = (40, 40, 40)
CHANCE_COLOUR = (150, 150, 150)
CALIBRATION_COLOUR = (44, 160, 44)


@lru_cache(maxsize=16)
def _font(px: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=px)  # Pillow ≥ 10.1 with FreeType: a scalable font
    except TypeError:  # pragma: no cover - older Pillow: the small bitmap font
        return ImageFont.load_default()


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About `n` round tick values covering [lo, hi] (1, 2, 2.5 or 5 × a power of ten apart)."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / max(n, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = min((m * power for m in (1, 2, 2.5, 5, 10)), key=lambda st: abs((hi - lo) / st - n))
    first, last = math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9)
    return [round(i * step, 12) + 0.0 for i in range(first, last + 1)]


def _tick_label(v: float, step: float) -> str:
    decimals = max(0, -math.floor(math.log10(step) + 1e-9)) if step > 0 else 2
    if step > 0 and round(step, decimals) != round(step, decimals + 1):
        decimals += 1  # 0.25 steps need two decimals, not one
    return f"{v:.{decimals}f}"


class Chart:
    """An x/y chart drawn with Pillow at `scale`× its layout size (shown at 1×, so it stays sharp).

    Coordinates passed to the drawing methods are data values; the axes, grid, tick labels, axis
    labels and title are drawn by the constructor.
    """

    def __init__(
        self,
        title: str,
        xlabel: str,
        ylabel: str,
        xlim: tuple[float, float],
        ylim: tuple[float, float],
        xticks: Sequence[float] | None = None,
        yticks: Sequence[float] | None = None,
        size: tuple[int, int] = (420, 340),
        scale: int = 2,
    ) -> None:
        self.scale = s = scale
        self.size = size
        self.xlim, self.ylim = xlim, ylim
        width, height = size
        self.image = Image.new("RGB", (width * s, height * s), "white")
        self.draw = ImageDraw.Draw(self.image, "RGBA")
        # The plot box, in layout pixels: room for tick labels left and below, the title above.
        self.box = (62, 34, width - 16, height - 52)
        x0, y0, x1, y1 = (v * s for v in self.box)
        xticks = list(xticks) if xticks is not None else nice_ticks(*xlim)
        yticks = list(yticks) if yticks is not None else nice_ticks(*ylim)
        tick_font, label_font = _font(12 * s), _font(13 * s)
        grid = (228, 228, 228)
        xstep = xticks[1] - xticks[0] if len(xticks) > 1 else 0.0
        ystep = yticks[1] - yticks[0] if len(yticks) > 1 else 0.0
        for t in xticks:
            px, _ = self._px(t, ylim[0])
            self.draw.line([(px, y0), (px, y1)], fill=grid, width=s)
            self.draw.line([(px, y1), (px, y1 + 5 * s)], fill="black", width=s)
            self.draw.text(
                (px, y1 + 7 * s), _tick_label(t, xstep), fill="black", font=tick_font, anchor="ma"
            )
        for t in yticks:
            _, py = self._px(xlim[0], t)
            self.draw.line([(x0, py), (x1, py)], fill=grid, width=s)
            self.draw.line([(x0 - 5 * s, py), (x0, py)], fill="black", width=s)
            self.draw.text(
                (x0 - 8 * s, py), _tick_label(t, ystep), fill="black", font=tick_font, anchor="rm"
            )
        self.draw.rectangle([x0, y0, x1, y1], outline="black", width=s)
        self.draw.text(
            ((x0 + x1) / 2, (height - 8) * s), xlabel, fill="black", font=label_font, anchor="md"
        )
        self.draw.text(
            (width * s / 2, 10 * s), title, fill="black", font=_font(14 * s), anchor="ma"
        )
        # The y label, rotated: drawn on its own strip, turned, pasted left of the tick labels.
        strip_w = int(self.draw.textlength(ylabel, font=label_font)) + 4 * s
        strip = Image.new("RGB", (strip_w, 18 * s), "white")
        ImageDraw.Draw(strip).text(
            (strip_w / 2, 9 * s), ylabel, fill="black", font=label_font, anchor="mm"
        )
        strip = strip.rotate(90, expand=True)
        self.image.paste(strip, (4 * s, int((y0 + y1) / 2 - strip.height / 2)))

    def _px(self, x: float, y: float) -> tuple[float, float]:
        (bx0, by0, bx1, by1), s = self.box, self.scale
        fx = (x - self.xlim[0]) / (self.xlim[1] - self.xlim[0])
        fy = (y - self.ylim[0]) / (self.ylim[1] - self.ylim[0])
        return (bx0 + fx * (bx1 - bx0)) * s, (by1 - fy * (by1 - by0)) * s

    def line(
        self,
        xs: Sequence[float],
        ys: Sequence[float],
        colour: tuple[int, ...],
        width: int = 2,
        dashed: bool = False,
    ) -> None:
        points = [self._px(float(x), float(y)) for x, y in zip(xs, ys, strict=True)]
        if len(points) < 2:
            return
        if not dashed:
            self.draw.line(points, fill=colour, width=width * self.scale, joint="curve")
            return
        dash = 6.0 * self.scale
        for (ax, ay), (bx, by) in zip(points[:-1], points[1:], strict=True):
            length = math.hypot(bx - ax, by - ay)
            for start in np.arange(0.0, length, 2 * dash):
                a, b = start / length, min(start + dash, length) / length
                self.draw.line(
                    [
                        (ax + a * (bx - ax), ay + a * (by - ay)),
                        (ax + b * (bx - ax), ay + b * (by - ay)),
                    ],
                    fill=colour,
                    width=width * self.scale,
                )

    def dot(self, x: float, y: float, colour: tuple[int, ...], radius: int = 5) -> None:
        px, py = self._px(x, y)
        r = radius * self.scale
        self.draw.ellipse(
            [px - r, py - r, px + r, py + r], fill=colour, outline="white", width=self.scale
        )

    def bars(
        self, edges: np.ndarray, heights: np.ndarray, colour: tuple[int, int, int], alpha: int = 110
    ) -> None:
        for left, right, h in zip(edges[:-1], edges[1:], heights, strict=True):
            if h <= 0:
                continue
            (ax, ay), (bx, by) = self._px(left, h), self._px(right, self.ylim[0])
            self.draw.rectangle(
                [ax, ay, bx, by], fill=(*colour, alpha), outline=colour, width=self.scale
            )

    def vline(self, x: float, colour: tuple[int, ...], dashed: bool = True) -> None:
        self.line([x, x], [self.ylim[0], self.ylim[1]], colour, width=2, dashed=dashed)

    def legend(
        self, entries: Sequence[tuple[str, tuple[int, ...], str]], corner: str = "br"
    ) -> None:
        """entries: (label, colour, kind) with kind "line", "dash", "dot" or "box"."""
        s, font = self.scale, _font(12 * self.scale)
        rows = 18 * s
        text_w = max(int(self.draw.textlength(label, font=font)) for label, _, _ in entries)
        w, h = text_w + 40 * s, rows * len(entries) + 8 * s
        bx0, by0, bx1, by1 = (v * s for v in self.box)
        left = bx1 - w - 8 * s if corner[1] == "r" else bx0 + 8 * s
        top = by1 - h - 8 * s if corner[0] == "b" else by0 + 8 * s
        self.draw.rectangle(
            [left, top, left + w, top + h],
            fill=(255, 255, 255, 255),
            outline=(160, 160, 160),
            width=s,
        )
        for i, (label, colour, kind) in enumerate(entries):
            cy = top + 4 * s + rows * i + rows / 2
            sx = left + 8 * s
            if kind == "dot":
                self.draw.ellipse([sx + 6 * s, cy - 5 * s, sx + 16 * s, cy + 5 * s], fill=colour)
            elif kind == "box":
                self.draw.rectangle(
                    [sx + 2 * s, cy - 5 * s, sx + 20 * s, cy + 5 * s],
                    fill=(*colour[:3], 110),
                    outline=colour,
                    width=s,
                )
            elif kind == "dash":
                for a in (0, 12):
                    self.draw.line(
                        [(sx + a * s, cy), (sx + (a + 8) * s, cy)], fill=colour, width=2 * s
                    )
            else:
                self.draw.line([(sx, cy), (sx + 22 * s, cy)], fill=colour, width=2 * s)
            self.draw.text((sx + 28 * s, cy), label, fill="black", font=font, anchor="lm")

    def save(self, path: Path) -> None:
        self.image.save(path, optimize=True)


def histogram_edges(values: np.ndarray, marks: Sequence[float], bins: int) -> np.ndarray:
    """Edges of `bins` equal bins over `values` and the lines drawn over them (`marks`: a
    threshold), with a 3% margin each side."""
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
    lo, hi = min([lo, *marks]), max([hi, *marks])
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    pad = 0.03 * (hi - lo)
    return np.linspace(lo - pad, hi + pad, bins + 1)


def histogram_chart(
    title: str, x_label: str, y_label: str, edges: np.ndarray, top: int, size: tuple[int, int]
) -> Chart:
    """An empty chart for bars of counts over `edges`, the tallest `top` high."""
    ytop = max(top, 1) / 0.7  # headroom: the bars keep out of the legend's corner
    # Whole counts only; 0 is always a tick, so some remain.
    yticks = [t for t in nice_ticks(0, ytop, 5) if float(t).is_integer()]
    return Chart(
        title,
        x_label,
        y_label,
        (float(edges[0]), float(edges[-1])),
        (0.0, max(ytop, yticks[-1])),
        yticks=yticks,
        size=size,
    )


def finish_histogram(
    chart: Chart, entries: list[tuple[str, tuple[int, ...], str]], threshold: float | None
) -> Chart:
    """The threshold as a dashed line, then the legend in the corner the bars keep out of."""
    if threshold is not None:
        chart.vline(threshold, THRESHOLD_COLOUR)
        entries.append((f"threshold {threshold:.4g}", THRESHOLD_COLOUR, "dash"))
    chart.legend(entries, corner="tr")
    return chart


def colour_bar(width: int = 360, scale: int = 2) -> Image.Image:
    """The heat map's colour ramp, labelled in units of the threshold."""
    s = scale
    bar_h, text_h = 14 * s, 18 * s
    img = Image.new("RGB", (width * s, bar_h + text_h), "white")
    ramp = colorize(np.linspace(0.0, 1.0, width * s)[None, :].repeat(bar_h, axis=0))
    img.paste(Image.fromarray(ramp), (0, 0))
    draw = ImageDraw.Draw(img)
    font = _font(12 * s)
    for frac, label, anchor in (
        (0.0, "0", "la"),
        (0.5, "threshold", "ma"),
        (1.0, "twice the threshold", "ra"),
    ):
        draw.text(
            (frac * (width * s - 1), bar_h + 3 * s), label, fill="black", font=font, anchor=anchor
        )
    return img
