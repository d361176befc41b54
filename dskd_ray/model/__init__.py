"""The method, pure PyTorch: the network (`network.py`), its loss and anomaly map, the
backbones, checkpoints. No Ray here.

`from dskd_ray.model import DSKD` keeps working: the network's names resolve on first use,
so a module of this folder that needs no torch (checkpoint_header) imports none."""

from typing import Any

_NETWORK = (
    "BasicBlock",
    "DFEmbedding",
    "DSKD",
    "DecoderStudent",
    "DeconvBlock",
    "PatchMemory",
    "conv3x3",
)


def __getattr__(name: str) -> Any:
    if name in _NETWORK:
        from dskd_ray.model import network

        return getattr(network, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
