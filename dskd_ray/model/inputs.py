"""What the network takes: uint8 (B, H, W, 3) RGB → float32 (B, 3, H, W) in [0, 1].

The one copy of that conversion. `images_to_tensor` is what PyTorch scoring and training feed
the model; `to_unit_nchw` is the same arithmetic in numpy for ONNX Runtime (float32 division by
255 either way, so both backends see bit-identical inputs).
"""

from __future__ import annotations

import numpy as np
import torch


def images_to_tensor(images: np.ndarray | torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """(B, H, W, 3) uint8 → (B, 3, H, W) float in [0, 1] on `device` (converted there: 4× less copy)."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    x = images.to(device, non_blocking=True)
    return x.permute(0, 3, 1, 2).float().div_(255.0)


def to_unit_nchw(images: np.ndarray) -> np.ndarray:
    """`images_to_tensor` in numpy: (B, H, W, 3) uint8 → contiguous (B, 3, H, W) float32 in [0, 1]."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(255)
