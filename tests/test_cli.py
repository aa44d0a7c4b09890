"""The command lines as a user meets them: run from an empty directory with the installed package
(no PYTHONPATH), a bad flag is one `error:` line and exit status 1, before anything is loaded."""

import os
import subprocess
import sys

import pytest


def run(cwd, module: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**env, "JAX_PLATFORMS": "cpu"})


@pytest.mark.parametrize("module, args, message", [
    ("lm.generate", ["--workdir=nowhere", "--prompt=a", "--temperature=-1"],
     "temperature = -1.0 is not allowed: must be a finite number >= 0 (0 is greedy)"),
    ("lm.evaluate", ["--workdir=nowhere", "--max_batches=-1"],
     "max_batches = -1 is not allowed: must be >= 0 (0: the run's data.eval_batches)"),
    ("lm.bench", ["--what=fit", "--steps=3"],
     "--steps does not apply to --what=fit; it is read by --what=data and --what=step"),
    ("lm.sizing", ["--targets=1e6,0"],
     "--targets=1e6,0 is not allowed: must be finite parameter counts >= 1"),
    ("lm.smoke", ["--out="], "--out is empty: it names the JSON report to write"),
])
def test_a_bad_flag_is_one_line(tmp_path, module, args, message):
    proc = run(tmp_path, module, *args)
    assert (proc.returncode, proc.stdout, proc.stderr.splitlines()) == (1, "", [f"error: {message}"])


def test_sizing_prints_a_table():
    proc = run(os.getcwd(), "lm.sizing", "--targets=1e6,1e7", "--aspect_ratio=32", "--seq_len=256")
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0 and len(lines) == 3 and lines[1].split()[0] == "1.00e+06", proc.stderr


def test_the_default_sweep_plans_from_any_directory(tmp_path):
    """Before: `configs/...` and `experiments` were found only from the checkout."""
    proc = run(tmp_path, "experiments.isoflop", "--dry_run", "--flops_per_second=1e9",
               f"--sweep_dir={tmp_path / 'sweep'}")
    assert proc.returncode == 0, proc.stderr
    assert "C3e12" in proc.stdout
