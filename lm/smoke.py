"""Accelerator smoke test: `python -m lm.smoke [--out smoke.json] [--quick] [--work DIR]`.

One command for a machine with a GPU or TPU and the project installed, within 8 minutes:

1. `tests`: the tests marked `accelerator` (`pytest -m accelerator`; they skip on CPU);
2. `bench`: train-step throughput of a GPT-2-small shape (d=768, L=12, H=12, T=1024, tied
   vocabulary of 50304, bf16, cuDNN attention where it applies, else JAX's choice, recorded)
   and a ~20M-parameter byte-level shape, with MFU (PaLM formula) against the H100/H200
   targets of 45 % and 25 % (checked on those devices only);
3. `sweep`: the 2-budget × 3-size IsoFLOP sweep `configs/isoflop/micro.py`, trained and
   analysed end to end by `python -m experiments.isoflop` (fitted exponents recorded);
4. one JSON report (`--out`) with the device, versions and every stage's status, timings and
   figures; one summary line per stage on the console.

Every stage runs in its own process under a timeout (this process never opens the
accelerator, which a TPU allows only one process to hold), so a crash or hang is recorded and
the next stage still runs. Exit status: 0 when every stage passed and every applicable MFU
target was met, 1 otherwise, 2 on a machine without a GPU or TPU (unless `--quick`).

`--quick` runs the same stages at tiny sizes (tiny shapes, a few steps, `micro.py:quick`): on
CPU it checks the whole command path in a minute or two, which is what tests/test_smoke.py
does. Logs of every stage stay in `--work` (default: a new temporary directory).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from lm.files import write_json_atomic

ROOT = Path(__file__).resolve().parents[1]  # holds lm/, configs/, experiments/ (and tests/)
BUDGET_S = 480.0  # the whole command
TIMEOUT_S = {"probe": 90.0, "tests": 150.0, "bench": 210.0, "sweep": 270.0}
MIN_STAGE_S = 10.0  # a stage the budget leaves less than this is not started (a failure)
TARGET_DEVICES = ("h100", "h200")  # where the MFU targets apply
GPT2_VOCAB = 50304  # GPT-2's 50257 padded to a multiple of 64


@dataclasses.dataclass(frozen=True)
class BenchShape:
    """One benchmarked shape: `d,L,H,T,B` with B per device, its vocabulary and MFU target."""

    name: str
    shape: str
    quick_shape: str
    vocab_size: int
    mfu_target: float
    tied_embeddings: bool = True


SHAPES = (
    BenchShape("gpt2_small", "768,12,12,1024,32", "64,2,2,32,2", GPT2_VOCAB, 0.45),
    BenchShape("20m", "512,6,8,1024,64", "32,2,2,32,2", 257, 0.25),
)


# ---------------------------------------------------------------- child processes


def probe(out: str) -> None:
    """Child: the device and versions, written as JSON to `out`."""
    import platform

    import jax
    import jaxlib

    d = jax.devices()[0]
    try:
        platform_version = d.client.platform_version
    except AttributeError:
        platform_version = ""
    write_json_atomic(out, {
        "backend": jax.default_backend(), "device_kind": d.device_kind,
        "device_count": jax.device_count(), "local_device_count": jax.local_device_count(),
        "process_count": jax.process_count(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
        "platform_version": platform_version, "python": platform.python_version(),
        "host": platform.node()})


def bench_config(s: BenchShape, quick: bool, attention: str, batch: int):
    """The benchmark config of shape `s` in bf16 with a global batch of `batch` sequences."""
    from lm.bench import shape_config
    from lm.config import BYTE_VOCAB_SIZE, defaults

    d, n_layers, heads, seq, _ = (s.quick_shape if quick else s.shape).split(",")
    c = shape_config(defaults(), f"{d},{n_layers},{heads},{seq},{batch}")
    c.model.dtype, c.model.attention = "bfloat16", attention
    c.model.vocab_size, c.model.tied_embeddings = s.vocab_size, s.tied_embeddings
    if s.vocab_size != BYTE_VOCAB_SIZE:
        # The benchmark feeds random ids and builds no data: the tokenizer settings only tell
        # validation which vocabulary size to expect.
        c.data.tokenizer, c.data.sp_vocab_size = "sentencepiece", s.vocab_size
    return c


def _out_of_memory(e: Exception) -> bool:
    text = str(e)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def bench_one(s: BenchShape, quick: bool) -> dict[str, Any]:
    """Benchmark one shape: cuDNN attention on GPU (falling back to "auto", recorded), and half
    the batch after an out-of-memory error, down to one sequence per device."""
    import jax

    from lm.bench import benchmark

    steps, warmup = (2, 1) if quick else (20, 5)
    devices = jax.device_count()
    attention = "cudnn" if jax.default_backend() == "gpu" else "auto"
    batch = int((s.quick_shape if quick else s.shape).split(",")[-1])
    notes: dict[str, Any] = {"attention_requested": attention}
    while True:
        gc.collect()  # a failed attempt's buffers go before the next one allocates
        c = bench_config(s, quick, attention, batch * devices)
        try:
            r = benchmark(c, steps=steps, warmup=warmup)
            break
        except Exception as e:  # noqa: BLE001 - recorded; the fallbacks below or the caller decide
            if _out_of_memory(e) and batch > 1:
                notes.setdefault("out_of_memory_at_batch", []).append(batch * devices)
                batch //= 2
            elif attention == "cudnn" and not _out_of_memory(e):
                notes["attention_fallback"] = f"{type(e).__name__}: {str(e)[:500]}"
                attention = "auto"
            else:
                raise
    kind = str(r["device"]).lower()
    applies = any(t in kind for t in TARGET_DEVICES) and not quick
    return {**r, **notes, "attention": attention, "vocab_size": s.vocab_size,
            "tied_embeddings": s.tied_embeddings, "steps": steps, "warmup": warmup,
            "mfu_target": s.mfu_target, "target_applies": applies,
            "meets_target": (r["mfu_palm"] >= s.mfu_target) if applies else None}


def run_benchmarks(quick: bool, out: str) -> None:
    """Child: every shape in turn; `out` is rewritten after each, so a timeout keeps the rest."""
    from lm.process import setup

    setup()
    results: dict[str, Any] = {}
    for s in SHAPES:
        t = time.perf_counter()
        try:
            results[s.name] = bench_one(s, quick)
        except Exception as e:  # noqa: BLE001 - one shape's failure is reported, the next still runs
            results[s.name] = {"error": f"{type(e).__name__}: {str(e)[:2000]}"}
        results[s.name]["wall_s"] = time.perf_counter() - t
        write_json_atomic(out, results)


# ---------------------------------------------------------------- stages


@dataclasses.dataclass
class Child:
    """How a child process ended: exit code (None: killed at the timeout), time, output tail."""

    returncode: int | None
    wall_s: float
    tail: str

    def record(self, timeout: float) -> dict[str, Any]:
        """The stage record's common part; status "timeout" when it was killed."""
        out: dict[str, Any] = {"wall_s": round(self.wall_s, 2), "returncode": self.returncode,
                               "timeout_s": round(timeout), "tail": self.tail}
        if self.returncode is None:
            out["status"] = "timeout"
        return out


@dataclasses.dataclass
class Smoke:
    """What the stages share: the work folder (logs, the sweep), the mode, the children's env."""

    work: Path
    quick: bool = False
    accelerator: bool = False
    fast_compile: bool = False  # CPU --quick: LLVM at -O0, compiles dominate the tiny runs

    def env(self) -> dict[str, str]:
        """This environment, with this checkout first on the path (children import what we do)."""
        env = {**os.environ,
               "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
        if self.fast_compile:
            env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()
        return env

    def run(self, name: str, cmd: list[str], timeout: float, tail_lines: int = 30) -> Child:
        """Run `cmd` from ROOT, output to `<work>/<name>.log`; at the timeout kill its process group."""
        log, t = self.work / f"{name}.log", time.perf_counter()
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env(), stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                rc: int | None = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                rc = None
                kill_group(proc)
        lines = log.read_text(errors="replace").splitlines()
        return Child(rc, time.perf_counter() - t, "\n".join(lines[-tail_lines:]))


def kill_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM to the child's process group (a sweep checkpoints on it), SIGKILL after `grace`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=grace)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def python_call(function: str, *args: Any) -> list[str]:
    """A command running `lm.smoke.<function>(*args)` in a fresh interpreter."""
    call = f"{function}({', '.join(repr(a) for a in args)})"
    return [sys.executable, "-c", f"from lm import smoke; smoke.{call}"]


def stage_probe(smoke: Smoke, timeout: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """(stage record, device info)."""
    out = smoke.work / "device.json"
    child = smoke.run("probe", python_call("probe", str(out)), timeout)
    record = child.record(timeout)
    if child.returncode == 0 and out.exists():
        return {**record, "status": "passed"}, json.loads(out.read_text())
    record.setdefault("status", "failed")
    return record, {}


def junit_counts(path: Path) -> dict[str, int]:
    """passed / failed / errors / skipped from a pytest --junitxml file."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    return {"passed": total["tests"] - total["failures"] - total["errors"] - total["skipped"],
            "failed": total["failures"], "errors": total["errors"], "skipped": total["skipped"]}


def stage_tests(smoke: Smoke, timeout: float) -> dict[str, Any]:
    """`pytest -m accelerator` over the checkout's tests/ (absent from a wheel install); on CPU
    every test skips itself, on an accelerator a skip of them all is a failure."""
    tests = ROOT / "tests"
    if not tests.is_dir():
        return {"status": "skipped", "reason": f"no tests/ next to the lm package ({ROOT})"}
    xml = smoke.work / "tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-o", "addopts=", "-p", "no:cacheprovider",
           "-m", "accelerator", f"--junitxml={xml}", str(tests)]
    child = smoke.run("tests", cmd, timeout)
    record = child.record(timeout)
    if "status" in record:
        return record
    counts = junit_counts(xml) if xml.exists() else {}
    record.update(counts)
    if child.returncode != 0 or not counts:
        record["status"] = "failed"  # includes exit code 5: no test marked accelerator
    elif counts["passed"] == 0:
        record["status"] = "failed" if smoke.accelerator else "skipped"
    else:
        record["status"] = "passed"
    return record


def stage_bench(smoke: Smoke, timeout: float) -> dict[str, Any]:
    out = smoke.work / "bench.json"
    child = smoke.run("bench", python_call("run_benchmarks", smoke.quick, str(out)), timeout)
    record = child.record(timeout)
    shapes = json.loads(out.read_text()) if out.exists() else {}
    record["shapes"] = {s.name: shapes.get(s.name, {"error": "not run"}) for s in SHAPES}
    if "status" not in record:
        ok = child.returncode == 0 and all("error" not in r for r in record["shapes"].values())
        record["status"] = "passed" if ok else "failed"
    return record


def _small(v: Any) -> bool:
    """A fit value worth a report line: a number, a string, or an interval of two numbers."""
    if isinstance(v, int | float | str | bool) or v is None:
        return True
    return isinstance(v, list) and len(v) <= 2 and all(isinstance(x, int | float) or x is None for x in v)


def fit_summary(fits: dict[str, Any]) -> dict[str, Any]:
    """Per approach: its scalar results and intervals, warnings, or why it was skipped."""
    out = {}
    for name in ("approach1", "approach2", "approach3"):
        fit = fits.get(name) or {}
        out[name] = {k: v for k, v in fit.items() if _small(v) or k == "warnings"}
    return out


def stage_sweep(smoke: Smoke, timeout: float) -> dict[str, Any]:
    """The micro sweep through `python -m experiments.isoflop`; passes when every run completed."""
    sweep_dir = Path(tempfile.mkdtemp(prefix="sweep-", dir=smoke.work))
    config = ROOT / "configs" / "isoflop" / "micro.py"
    cmd = [sys.executable, "-m", "experiments.isoflop", f"--config={config}{':quick' if smoke.quick else ''}",
           f"--sweep_dir={sweep_dir}"]
    child = smoke.run("sweep", cmd, timeout)
    record = {**child.record(timeout), "sweep_dir": str(sweep_dir)}
    plan = sweep_dir / "plan.json"
    names = [r["name"] for r in json.loads(plan.read_text())["runs"]] if plan.exists() else []
    statuses = {}
    for name in names:
        result = sweep_dir / "runs" / name / "result.json"
        statuses[name] = json.loads(result.read_text()).get("status") if result.exists() else "missing"
    record["runs"] = statuses
    record["runs_completed"] = sum(s == "completed" for s in statuses.values())
    fits_path = sweep_dir / "fits.json"
    if fits_path.exists():
        record["fits"] = fit_summary(json.loads(fits_path.read_text()))
    if "status" not in record:
        ok = (child.returncode == 0 and names and record["runs_completed"] == len(names)
              and fits_path.exists())
        record["status"] = "passed" if ok else "failed"
    return record


# ---------------------------------------------------------------- summary lines


def _took(r: dict[str, Any]) -> str:
    return f" in {r['wall_s']:.0f}s" if "wall_s" in r else ""


def summary_tests(r: dict[str, Any]) -> str:
    if "passed" not in r:
        return f"tests: {r['status']}{_took(r)}" + (f" ({r['reason']})" if "reason" in r else "")
    return (f"tests: {r['status']}: {r['passed']} passed, {r['failed']} failed, {r['errors']} errors, "
            f"{r['skipped']} skipped{_took(r)}")


def summary_bench(r: dict[str, Any]) -> str:
    parts = []
    for name, s in r.get("shapes", {}).items():
        if "error" in s:
            parts.append(f"{name} error: {s['error'][:120]}")
            continue
        target = "" if s["meets_target"] is None else (
            f" ({'meets' if s['meets_target'] else 'BELOW'} target {s['mfu_target']:.0%})")
        parts.append(f"{name} {s['tokens_per_sec']:,.0f} tok/s, {s['step_ms']:.1f} ms/step, "
                     f"MFU {s['mfu_palm']:.1%}{target}, {s['attention']} attention")
    return f"bench: {r['status']}{_took(r)}: " + " | ".join(parts)


def _fmt_fit(name: str, fit: dict[str, Any]) -> str:
    if "a" in fit and "b" in fit:
        return f"{name} a={fit['a']:.3f} b={fit['b']:.3f}" + (" (unreliable)" if fit.get("warnings") else "")
    return f"{name} skipped" if "skipped" in fit else f"{name} —"


def summary_sweep(r: dict[str, Any]) -> str:
    fits = r.get("fits", {})
    text = ", ".join(_fmt_fit(n.replace("approach", "approach "), fits[n]) for n in fits)
    runs = f"{r.get('runs_completed', 0)}/{len(r.get('runs', {}))} runs completed"
    return f"sweep: {r['status']}{_took(r)}: {runs}" + (f"; {text}" if text else "")


# ---------------------------------------------------------------- main


def targets_missed(report: dict[str, Any]) -> list[str]:
    shapes = report["stages"].get("bench", {}).get("shapes", {})
    return [name for name, s in shapes.items() if s.get("meets_target") is False]


def main(argv: list[str] | None = None) -> None:
    """`python -m lm.smoke ARGV` (default: this process's arguments)."""
    from absl import flags

    from lm import cli
    from lm.config import ConfigError

    flags.DEFINE_string("out", "smoke.json", "the JSON report")
    flags.DEFINE_bool("quick", False, "tiny sizes: the whole command path in a minute or two, CPU included")
    flags.DEFINE_string("work", "", "logs and the sweep (default: a new temp dir)")

    def body() -> None:
        f = flags.FLAGS
        if not f.out:
            raise ConfigError("--out is empty: it names the JSON report to write")
        status = run_stages(f.out, f.quick, f.work, " ".join(["python -m lm.smoke", *args]))
        if status:
            sys.exit(status)

    args = sys.argv[1:] if argv is None else argv
    cli.run(body, ["lm.smoke", *args])


def run_stages(out: str, quick: bool, work_dir: str, command: str) -> int:
    """Every stage, the report at `out` and the exit status (0 passed, 1 failed, 2 no accelerator)."""
    start, started = time.perf_counter(), time.strftime("%Y-%m-%dT%H:%M:%S")
    work = Path(work_dir or tempfile.mkdtemp(prefix="lm-smoke-")).absolute()
    work.mkdir(parents=True, exist_ok=True)

    def left(stage: str) -> float:
        return min(TIMEOUT_S[stage], BUDGET_S - (time.perf_counter() - start))

    probe_record, device = stage_probe(Smoke(work), left("probe"))
    if not device:
        print(f"smoke: cannot start JAX here ({probe_record['status']}):\n{probe_record['tail']}")
        return 1
    accelerator = device["backend"] in ("gpu", "tpu")
    if not accelerator and not quick:
        print(f"smoke: no GPU or TPU here (JAX backend {device['backend']!r}); "
              "run with --quick to check the command path on CPU")
        if not work_dir:
            shutil.rmtree(work, ignore_errors=True)
        return 2
    print(f"smoke: {device['device_count']} × {device['device_kind']} ({device['backend']}), "
          f"jax {device['jax']}{', quick' if quick else ''}; logs in {work}", flush=True)
    report: dict[str, Any] = {
        "command": command, "quick": quick, "started": started, "budget_s": BUDGET_S, "work": str(work),
        "device": device, "stages": {"probe": probe_record}}
    smoke = Smoke(work, quick, accelerator, fast_compile=quick and not accelerator)
    stages = (("tests", stage_tests, summary_tests), ("bench", stage_bench, summary_bench),
              ("sweep", stage_sweep, summary_sweep))
    for name, run, summary in stages:
        timeout = left(name)
        if timeout < MIN_STAGE_S:
            record = {"status": "not_run", "reason": f"the {BUDGET_S:.0f}s budget is spent"}
        else:
            record = run(smoke, timeout)
        report["stages"][name] = record
        print(summary(record), flush=True)
    missed = targets_missed(report)
    failed = [n for n, r in report["stages"].items() if r["status"] not in ("passed", "skipped")]
    report.update(wall_s=round(time.perf_counter() - start, 1), failed_stages=failed,
                  targets_missed=missed, ok=not failed and not missed)
    write_json_atomic(out, report)
    verdict = "all stages passed" if report["ok"] else "FAILED: " + ", ".join(
        failed + [f"{m} below its MFU target" for m in missed])
    print(f"report: {out} ({verdict}; {report['wall_s']:.0f}s)")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    main()
