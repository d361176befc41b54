"""How big the scoring pipeline may be on this cluster (`plan_pool`: actors, their CPUs
and GPUs, decode tasks) and the connection to Ray (`ensure_ray`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from dskd_ray.config import ScoringOptions
from dskd_ray.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class PoolPlan:
    """How the scoring actors and the CPU tasks share the cluster (see `plan_pool`)."""

    device: str  # "cuda" or "cpu", inside each actor
    max_actors: int
    actor_cpus: float
    actor_gpus: float
    threads: int  # torch threads per actor
    task_cpus: float = 1.0  # read + decode tasks
    write_cpus: float = 0.5  # map-writing tasks: mostly waiting on storage


def plan_pool(resources: dict[str, float], options: ScoringOptions) -> PoolPlan:
    """Size the actor pool from the cluster's resources, never a fixed number.

    On 2 CPUs a pool that claims every CPU leaves none for the read tasks and hangs silently
    (docs/design.md §7). So CPU actors together claim at most a quarter of the CPU slots, and the
    torch threads (which do the work) are set inside each actor, not by its claim.
    """
    cpus = max(1.0, float(resources.get("CPU", 1)))
    gpus = int(resources.get("GPU", 0))
    if options.device.startswith("cuda") and gpus == 0:
        raise ConfigError(f"--device {options.device} asked for, but the Ray cluster has no GPUs")
    if options.device not in ("auto", "cpu") and not options.device.startswith("cuda"):
        raise ConfigError(f"--device must be auto, cpu or cuda, not {options.device!r}")
    task_cpus = 1.0
    # The onnxruntime backend runs on CPUs (its CUDA provider is a different wheel); "auto"
    # takes the GPUs with torch.
    if gpus and options.device != "cpu" and options.backend != "onnxruntime":
        actors = min(options.actors or gpus, gpus)
        # One GPU per actor; its CPU claim never blocks the decode tasks that feed it.
        actor_cpus = min(1.0, cpus / (4 * actors))
        return PoolPlan("cuda", actors, _not_fusable(actor_cpus, task_cpus), 1.0, 1, task_cpus)
    threads = options.actor_threads or max(1, min(4, int(cpus)))
    actors = options.actors or max(1, round(cpus * 0.75 / threads))
    actor_cpus = min(float(threads), cpus / (4 * actors))
    return PoolPlan("cpu", actors, _not_fusable(actor_cpus, task_cpus), 0.0, threads, task_cpus)


def _not_fusable(actor_cpus: float, task_cpus: float) -> float:
    # Ray Data fuses a task map into the next actor map when their resource claims are equal,
    # which would move decoding into the scoring actor; a different claim keeps them apart.
    actor_cpus = max(0.25, round(actor_cpus * 4) / 4)
    return actor_cpus - 0.25 if actor_cpus == task_cpus else actor_cpus


def ensure_ray(address: str | None = None) -> None:
    """Connect to `address` (or RAY_ADDRESS, or a new local Ray) unless already connected."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address, configure_logging=False)
