"""`python -m lm.smoke`: the whole command path on CPU (`--quick`), its refusal without an
accelerator, and the pieces it is built from."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from lm import smoke
from lm.config import validate
from lm.sizing import count_params

from .conftest import ROOT


def run_smoke(tmp_path, data_dir, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", LM_DATA_DIR=str(data_dir), PYTHONPATH=str(ROOT))
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, "-m", "lm.smoke", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_quick_runs_every_stage_on_cpu(tmp_path, data_dir):
    out = tmp_path / "smoke.json"
    t = time.perf_counter()
    proc = run_smoke(tmp_path, data_dir, "--quick", f"--out={out}", f"--work={tmp_path / 'work'}")
    wall = time.perf_counter() - t
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["smoke", "tests", "bench", "sweep", "report"], lines
    report = json.loads(out.read_text())
    assert report["ok"] and report["quick"] and report["failed_stages"] == []
    assert report["device"]["backend"] == "cpu" and report["device"]["jax"]
    assert 0 < report["wall_s"] <= wall
    stages = report["stages"]
    assert set(stages) == {"probe", "tests", "bench", "sweep"}
    assert all(r["wall_s"] > 0 and r["returncode"] == 0 for r in stages.values()), stages
    tests = stages["tests"]  # collected and skipped, not errors
    assert tests["status"] == "skipped" and tests["skipped"] >= 4
    assert tests["passed"] == tests["failed"] == tests["errors"] == 0
    bench = stages["bench"]
    assert bench["status"] == "passed" and set(bench["shapes"]) == {"gpt2_small", "20m"}
    for r in bench["shapes"].values():
        assert r["tokens_per_sec"] > 0 and r["step_ms"] > 0 and r["mfu_palm"] > 0 and r["compile_s"] > 0
        assert r["dtype"] == "bfloat16" and r["attention"] == "auto"
        assert r["target_applies"] is False and r["meets_target"] is None  # CPU, quick
    assert bench["shapes"]["gpt2_small"]["vocab_size"] == smoke.GPT2_VOCAB
    sweep = stages["sweep"]
    assert sweep["status"] == "passed" and sweep["runs_completed"] == len(sweep["runs"]) == 6
    assert set(sweep["fits"]) == {"approach1", "approach2", "approach3"}
    assert all("a" in f or "skipped" in f for f in sweep["fits"].values()), sweep["fits"]
    assert (tmp_path / "work" / "sweep.log").exists()


def test_cpu_without_quick_says_so_and_fails(tmp_path, data_dir):
    proc = run_smoke(tmp_path, data_dir, f"--out={tmp_path / 'smoke.json'}")
    assert proc.returncode == 2
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and "no GPU or TPU" in lines[0] and "--quick" in lines[0], lines
    assert not (tmp_path / "smoke.json").exists()


def test_benchmark_shapes_are_faithful():
    """GPT-2 small (124M, tied 50304 vocabulary) and ~20M parameters; both valid with cuDNN."""
    full = {s.name: smoke.bench_config(s, False, "cudnn", 64) for s in smoke.SHAPES}
    for c in full.values():
        validate(c, n_devices=8)
        assert c.model.dtype == "bfloat16" and c.data.seq_len == 1024
    gpt2 = full["gpt2_small"].model
    assert (gpt2.d_model, gpt2.n_layers, gpt2.n_heads) == (768, 12, 12)
    assert count_params(gpt2).total == pytest.approx(124e6, rel=0.01)
    assert count_params(full["20m"].model).total == pytest.approx(20e6, rel=0.1)


def test_a_stage_past_its_timeout_is_killed(tmp_path):
    t = time.perf_counter()
    child = smoke.Smoke(tmp_path).run("sleep", [sys.executable, "-c", "import time; time.sleep(60)"], 1)
    assert child.returncode is None and time.perf_counter() - t < 15
    assert child.record(1)["status"] == "timeout"


def test_junit_counts(tmp_path):
    xml = tmp_path / "t.xml"
    xml.write_text('<testsuites><testsuite tests="7" failures="1" errors="1" skipped="2"/></testsuites>')
    assert smoke.junit_counts(xml) == {"passed": 3, "failed": 1, "errors": 1, "skipped": 2}


def test_fit_summary_keeps_figures_and_skips():
    fits = {"approach1": {"skipped": "too few curves"},
            "approach2": {"a": 0.5, "b": 0.5, "a_ci": [0.4, 0.6], "budgets": [{"C": 1.0}] * 3},
            "approach3": {"alpha": 0.3, "warnings": ["w"], "samples": [[1, 2, 3]]}}
    assert smoke.fit_summary(fits) == {"approach1": {"skipped": "too few curves"},
                                       "approach2": {"a": 0.5, "b": 0.5, "a_ci": [0.4, 0.6]},
                                       "approach3": {"alpha": 0.3, "warnings": ["w"]}}
