"""Multi-process start-up: `jax.distributed` when the environment or the flags ask for it."""

from __future__ import annotations

import os

import jax


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Join a multi-process job; returns False (and does nothing) for a single process.

    Explicit arguments win; otherwise a SLURM step with more than one task uses JAX's own
    cluster detection. CPU-only jobs use gloo collectives so tests run without accelerators.
    """
    explicit = coordinator_address is not None
    slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ
    if not (explicit or slurm):
        return False
    if os.environ.get("JAX_PLATFORMS", "") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    else:
        jax.distributed.initialize()
    return True
