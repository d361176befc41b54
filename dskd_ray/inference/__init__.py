"""Scoring a model: the scoring core every path calls, tiling, and predict (a few images to overlays)."""
