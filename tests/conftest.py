"""Shared test helpers: tiny configs and a runner for code that needs its own JAX process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from configs.train import get_config
from lm.kernels import configure_host

configure_host()  # as every entry point does on CPU: the step's temporaries stay mapped
ROOT = Path(__file__).resolve().parents[1]
CACHE = "JAX_COMPILATION_CACHE_DIR"
CACHE_KEY = pytest.StashKey[str]()


def pytest_configure(config: pytest.Config) -> None:
    """One persistent XLA compilation cache per session, for this process and (through the
    environment) the workers and every process the tests start: each program compiles once,
    not once per process that runs it (a resumed or rerun run, a second worker's fixture)."""
    import jax

    if CACHE not in os.environ:
        os.environ[CACHE] = config.stash[CACHE_KEY] = tempfile.mkdtemp(prefix="lm-test-xla-")
        os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # tiny models compile fast
    jax.config.update("jax_compilation_cache_dir", os.environ[CACHE])
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", 1)))


def pytest_unconfigure(config: pytest.Config) -> None:
    if CACHE_KEY in config.stash:
        shutil.rmtree(config.stash[CACHE_KEY], ignore_errors=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked slow first (stable: otherwise in collection order), so on two workers the
    longest ones start at once instead of ending the run alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def run_python(code: str, devices: int = 1, timeout: float = 300, cwd: Path = ROOT,
               env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter with `devices` virtual CPU devices; fail on error."""
    full_env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                    JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), **(env or {}))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        pytest.fail(f"subprocess failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def tiny_model():
    """A two-layer byte-level model small enough for per-test compilation."""
    from configs.train import model_config

    m = model_config()
    m.d_model, m.n_layers, m.n_heads, m.d_ff = 32, 2, 2, 64
    m.kernels = "xla"  # the accelerator path; the CPU kernels are held to it in test_model.py
    return m


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """One data dir per test session: corpora and token caches are built once."""
    return tmp_path_factory.mktemp("data")


STEPS = 300


def data_config(data_dir, **overrides):
    """A tiny data config (seq_len 32, batch 8) with `overrides` for config.data."""
    c = get_config()
    c.data.data_dir = str(data_dir)
    c.data.seq_len, c.data.batch_size, c.data.eval_batches = 32, 8, 2
    c.data.update(overrides)
    return c


def make_config(data_dir: Path):
    """The tiny byte-level model every training test starts from."""
    c = get_config()
    c.model.d_model, c.model.n_layers, c.model.n_heads, c.model.d_ff = 32, 2, 2, 64
    c.model.kernels = "xla"  # what GPUs and TPUs run
    c.data.data_dir = str(data_dir)
    c.data.seq_len, c.data.batch_size, c.data.eval_batches = 32, 8, 2
    c.train.steps, c.train.log_every, c.train.eval_every, c.train.checkpoint_every = STEPS, 10, 100, 50
    c.optim.peak_lr = 1e-2
    return c


@pytest.fixture
def config(data_dir):
    return make_config(data_dir)


@pytest.fixture(scope="session")
def reference(data_dir, tmp_path_factory):
    """The uninterrupted run every resume test compares against (trained once per session)."""
    from lm.train import train

    workdir = tmp_path_factory.mktemp("reference")
    result = train(make_config(data_dir), workdir)
    return workdir, result
