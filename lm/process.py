"""Process start-up shared by every entry point: quiet library logs, the persistent compilation
cache, the multi-process join (`jax.distributed`, which must come before JAX picks its backend),
then the host tuning of `lm.kernels` for that backend."""

from __future__ import annotations

import os

import jax


def setup(distributed: bool = False, coordinator_address: str | None = None,
          num_processes: int | None = None, process_id: int | None = None) -> None:
    """What every command-line entry point does first; `distributed` for those that train
    (lm.train, a sweep worker), which join a multi-process job when there is one."""
    from lm import kernels

    quiet_library_logs()
    compilation_cache()
    if distributed:
        initialize(coordinator_address, num_processes, process_id)
    kernels.configure_host()


def compilation_cache() -> None:
    """Keep XLA programs under lm's cache root (unless $JAX_COMPILATION_CACHE_DIR names another), so
    a resumed run, a seed replicate or a second analysis loads its program instead of compiling it."""
    from lm.files import cache_root

    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(cache_root() / "jax"))


def quiet_library_logs() -> None:
    """Keep the console to our own progress lines: library INFO chatter (Orbax saves, backend
    probing) goes, warnings and errors stay."""
    import logging

    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    for name in ("jax", "orbax", "absl"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Orbax warns on every read-only open, which is how evaluate/generate/fine-tune read runs.
    logging.getLogger("absl").addFilter(lambda record: not any(
        s in record.getMessage() for s in ("Given directory is read only", "read_only=True")))


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Join a multi-process job; returns False (and does nothing) for a single process.

    Explicit arguments win; otherwise a SLURM step with more than one task (one per GPU, from
    `srun`, `sbatch` or submitit) and a Cloud TPU VM (every worker of a slice runs the same
    command) use JAX's own cluster detection. CPU-only jobs use gloo collectives, so the
    multi-process tests run without accelerators.
    """
    explicit = coordinator_address is not None
    slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ
    if not (explicit or slurm or tpu_vm()):
        return False
    if os.environ.get("JAX_PLATFORMS", "") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    else:
        jax.distributed.initialize()
    return True


def tpu_vm() -> bool:
    """A Cloud TPU VM (libtpu installed, TPU chips present), where `jax.distributed.initialize()`
    finds the slice's workers by itself (one worker alone becomes a single process)."""
    import glob
    import importlib.util

    return (os.environ.get("JAX_PLATFORMS", "") in ("", "tpu") and importlib.util.find_spec("libtpu")
            is not None and bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")))
