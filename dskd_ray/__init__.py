"""dskd_ray: Dual-Student Knowledge Distillation anomaly detection, trained and scored with Ray."""

from dskd_ray.config import DSKDConfig

__all__ = ["DSKDConfig"]
__version__ = "0.1.0"
