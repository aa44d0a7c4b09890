"""The command lines as a user meets them: run from an empty directory with the installed package
(no PYTHONPATH), a bad flag is one `error:` line and exit status 1, before anything is loaded."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

GPU = Path(__file__).parents[1] / "configs/isoflop/gpu.py"


def run(cwd, module: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**env, "JAX_PLATFORMS": "cpu"})


@pytest.mark.parametrize("module, args, message", [
    ("lm.generate", ["--workdir=nowhere", "--prompt=a", "--temperature=-1"],
     "temperature = -1.0 is not allowed: must be a finite number >= 0 (0 is greedy)"),
    ("lm.generate", ["--workdir=nowhere", "--prompt=a", "--num_samples=0"],
     "num_samples = 0 is not allowed: must be a positive integer"),
    ("lm.evaluate", ["--workdir=nowhere", "--max_batches=-1"],
     "max_batches = -1 is not allowed: must be >= 0 (0: the run's data.eval_batches)"),
    ("lm.bench", ["--what=fit", "--steps=3"],
     "--steps does not apply to --what=fit; it is read by --what=data and --what=step"),
    ("lm.sizing", ["--targets=1e6,0"],
     "--targets=1e6,0 is not allowed: must be finite parameter counts >= 1"),
    ("lm.smoke", ["--out="], "--out is empty: it names the JSON report to write"),
    ("experiments.isoflop", [f"--config={GPU}", "--dry_run", "--config.data_tokens=1000000000"],
     "2 run(s) would make more than max_epochs = 4 passes over lm1b's 1,000,000,000 train tokens: "
     "C1e18-N2.3e7 (6.2), C1e18-N3.6e7 (4.0); use a larger dataset or smaller budgets, or raise "
     "config.max_epochs"),
    ("experiments.isoflop", ["--sweep_dir=", "--dry_run"],
     "--sweep_dir is empty: name the sweep directory, or leave the flag out for the config's "
     "(sweeps/tiny)"),
])
def test_a_bad_flag_is_one_line(tmp_path, module, args, message):
    proc = run(tmp_path, module, *args)
    assert (proc.returncode, proc.stdout, proc.stderr.splitlines()) == (1, "", [f"error: {message}"])


def test_sizing_prints_a_table():
    proc = run(os.getcwd(), "lm.sizing", "--targets=1e6,1e7", "--aspect_ratio=32", "--seq_len=256")
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0 and len(lines) == 3 and lines[1].split()[0] == "1.00e+06", proc.stderr


def test_the_default_sweep_plans_from_any_directory(tmp_path):
    """Before: `configs/...` and `experiments` were found only from the checkout. The default sweep
    tunes first, so before its fit a dry run shows the tuning plan."""
    proc = run(tmp_path, "experiments.isoflop", "--dry_run", "--flops_per_second=1e9",
               f"--sweep_dir={tmp_path / 'sweep'}")
    assert proc.returncode == 0, proc.stderr
    assert "T3e11-N8e4-lr3.2e-2" in proc.stdout and "the sweep plans from the tuning fit" in proc.stdout


@pytest.mark.parametrize("cache", ["", "elsewhere"])
def test_every_entry_point_keeps_its_programs_in_the_cache(tmp_path, cache):
    """The persistent compilation cache: $LM_CACHE_DIR/jax, unless $JAX_COMPILATION_CACHE_DIR says."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(LM_CACHE_DIR=str(tmp_path), **({"JAX_COMPILATION_CACHE_DIR": cache} if cache else {}))
    proc = subprocess.run([sys.executable, "-c", "import jax; from lm.process import setup; setup(); "
                           "print(jax.config.jax_compilation_cache_dir)"], capture_output=True, text=True,
                          env={**env, "JAX_PLATFORMS": "cpu"}, timeout=300)
    assert proc.stdout.strip() == (cache or str(tmp_path / "jax")), proc.stderr


def test_a_dry_run_this_machine_cannot_measure_still_plans(tmp_path):
    """The GPU study planned on a CPU: no minutes-long (or out-of-memory) measurement of a large
    model, one line saying so, and the plan."""
    proc = run(tmp_path, "experiments.isoflop", f"--config={GPU}", "--dry_run",
               f"--sweep_dir={tmp_path / 'sweep'}")
    assert proc.returncode == 0, proc.stderr
    data, first, *rest = proc.stdout.splitlines()
    assert data.startswith("data: lm1b's train split is not prepared here"), data  # its size unknown
    assert first.startswith("no time estimates: 6 steps of C1e17-") and first.endswith(
        "pass --flops_per_second for time estimates"), first
    assert rest[-1].startswith("35 runs, ") and "C1e18-N3.6e8" in proc.stdout
