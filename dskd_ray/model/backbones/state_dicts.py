"""How a state dict fails to fit a network: the one check both teacher loaders make before they
load, so each can say what is wrong in its own words instead of torch's."""

from __future__ import annotations

from collections.abc import Mapping

import torch


def fit_problems(
    own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]
) -> tuple[list[str], list[tuple[str, tuple[int, ...], tuple[int, ...]]]]:
    """The network's keys (`own`) missing from `state`, and those present with another shape:
    (key, shape in `state`, shape in the network)."""
    missing = [k for k in own if k not in state]
    mismatched = [
        (k, tuple(state[k].shape), tuple(v.shape))
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    return missing, mismatched
