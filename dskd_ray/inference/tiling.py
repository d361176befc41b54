"""Tiling: an image larger than the model's input is cut into full-resolution tiles, each tile is
scored by the model, and the tile maps are stitched back into one map of the whole image
(docs/design.md §8). Pure numpy: the same code cuts and stitches for every backend.

Downscaling a 2048² image to 256² makes an 8-pixel defect one pixel wide, below what the
stride-16 features can see; a 256² tile keeps it 8 pixels wide.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# A stitched map written by `dskd score` is at most this a side: a 5 MP map as a 16-bit PNG is
# ~10 MB, most of it saying "normal". Larger maps are max-pooled by a whole factor, so the
# peak that made the score is kept.
MAP_MAX_SIDE = 1024


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles covering [0, length): every `tile - overlap` pixels, the last one
    flush with the end (so no tile hangs over the edge); one tile at 0 when length ≤ tile."""
    if length <= tile:
        return [0]
    step = tile - overlap
    starts = list(range(0, length - tile, step))
    starts.append(length - tile)
    return starts


@dataclass(frozen=True)
class TileGrid:
    """Where the tiles of one (height, width) image lie. An image smaller than a tile on a side
    is mirror-padded to the tile on that side, and its map cropped back."""

    height: int
    width: int
    tile: int
    overlap: int

    @property
    def ys(self) -> list[int]:
        return tile_starts(self.height, self.tile, self.overlap)

    @property
    def xs(self) -> list[int]:
        return tile_starts(self.width, self.tile, self.overlap)

    @property
    def count(self) -> int:
        return len(self.ys) * len(self.xs)

    def positions(self) -> list[tuple[int, int]]:
        return [(y, x) for y in self.ys for x in self.xs]


def cut(image: np.ndarray, tile: int, overlap: int) -> tuple[np.ndarray, TileGrid]:
    """(H, W, 3) uint8 → ((n, tile, tile, 3) uint8 tiles in raster order, their grid)."""
    height, width = image.shape[:2]
    grid = TileGrid(height, width, tile, overlap)
    pad_y, pad_x = max(0, tile - height), max(0, tile - width)
    if pad_y or pad_x:
        # Mirrored, not black: a black band would be the most anomalous thing in the tile.
        image = np.pad(image, ((0, pad_y), (0, pad_x), (0, 0)), mode="symmetric")
    tiles = np.empty((grid.count, tile, tile, 3), np.uint8)
    for i, (y, x) in enumerate(grid.positions()):
        tiles[i] = image[y : y + tile, x : x + tile]
    return tiles, grid


def _ramp(tile: int, overlap: int) -> np.ndarray:
    """(tile,) blending weight: 1 inside, falling linearly over the `overlap` pixels at each end.
    Never 0, so a pixel only one tile covers keeps that tile's value exactly."""
    if overlap <= 0:
        return np.ones(tile, np.float32)
    edge = np.minimum(np.arange(tile), np.arange(tile)[::-1]).astype(np.float32)
    return np.minimum(1.0, (edge + 1.0) / (overlap + 1.0)).astype(np.float32)


def stitch(maps: np.ndarray, grid: TileGrid) -> np.ndarray:
    """(n, tile, tile) tile maps → (height, width) float32 map of the whole image.

    Where tiles overlap, each pixel is the weighted mean of their values, each tile's weight
    falling towards its edges: tile borders are where padding inflates the discrepancy.
    """
    tile = grid.tile
    if maps.shape != (grid.count, tile, tile):
        raise ValueError(f"expected {(grid.count, tile, tile)} tile maps, got {maps.shape}")
    full_h, full_w = max(grid.height, tile), max(grid.width, tile)
    ramp = _ramp(tile, grid.overlap)
    weight = np.outer(ramp, ramp)
    total = np.zeros((full_h, full_w), np.float32)
    weights = np.zeros((full_h, full_w), np.float32)
    for m, (y, x) in zip(maps, grid.positions(), strict=True):
        total[y : y + tile, x : x + tile] += m * weight
        weights[y : y + tile, x : x + tile] += weight
    return (total / weights)[: grid.height, : grid.width]


def top_k_score(full_map: np.ndarray, top_k: int) -> float:
    """The image score of a stitched map: its max (top_k=1) or the mean of its top_k pixels —
    the rule `anomaly_map.image_score` applies to an untiled map."""
    flat = full_map.ravel()
    if top_k <= 1:
        return float(flat.max())
    k = min(top_k, flat.size)
    return float(np.partition(flat, flat.size - k)[flat.size - k :].mean(dtype=np.float32))


def bounded(full_map: np.ndarray, max_side: int = MAP_MAX_SIDE) -> np.ndarray:
    """The map at most `max_side` a side: max-pooled by the smallest whole factor that fits,
    so a one-pixel peak survives (an average would dilute it)."""
    h, w = full_map.shape
    factor = -(-max(h, w) // max_side)
    if factor <= 1:
        return full_map
    ph, pw = -(-h // factor) * factor, -(-w // factor) * factor
    padded = np.pad(full_map, ((0, ph - h), (0, pw - w)), mode="edge")
    return padded.reshape(ph // factor, factor, pw // factor, factor).max(axis=(1, 3))
