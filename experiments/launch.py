"""Executing planned runs: per-run locks, one-run workers, and local / subprocess / SLURM runners.
Locks keep two runners off one run; an unfinished run resumes from its checkpoints (docs/experiments.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import ml_collections

from lm.files import RunLock, config_from_json, run_dir, write_json_atomic


def read_result(sweep_dir: Path, name: str) -> dict | None:
    path = run_dir(sweep_dir, name) / "result.json"
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def is_done(sweep_dir: Path, name: str) -> bool:
    """Finished for good: completed, or diverged (rerunning a diverged run diverges again)."""
    result = read_result(sweep_dir, name)
    return result is not None and result.get("status") in ("completed", "diverged")


def load_planned(sweep_dir: Path, name: str) -> ml_collections.ConfigDict:
    plan = json.loads((Path(sweep_dir) / "plan.json").read_text())
    entry = next((r for r in plan["runs"] if r["name"] == name), None)
    if entry is None:
        raise KeyError(f"{name} is not in {sweep_dir}/plan.json")
    return config_from_json(entry["config"])


def wait_for_trunk(config: ml_collections.ConfigDict, poll: float = 5.0) -> None:
    """A WSD branch starts once its trunk has saved the branch-point checkpoint."""
    trunk, step = Path(config.train.init_from), config.train.init_step
    announced = False
    while not (trunk / "checkpoints" / str(step)).is_dir():
        result = read_result(trunk.parent.parent, trunk.name)
        if result is not None and result.get("status") in ("completed", "diverged", "failed"):
            raise RuntimeError(f"trunk {trunk.name} ended ({result['status']}) without a "
                               f"checkpoint at step {step} to branch from")
        if not announced:
            print(f"waiting for {trunk.name} to reach step {step}", flush=True)
            announced = True
        time.sleep(poll)


def run_one(sweep_dir: str | Path, name: str) -> str:
    """Train one planned run unless it is done or locked, and say what happened; a failure is
    recorded in result.json (status `failed`) so the sweep goes on."""
    sweep_dir = Path(sweep_dir)
    if is_done(sweep_dir, name):
        return "skipped (done)"
    workdir = run_dir(sweep_dir, name)
    lock = RunLock(workdir)
    if not lock.acquire():
        return "skipped (locked by another runner)"
    try:
        if is_done(sweep_dir, name):  # finished while we waited for the lock
            return "skipped (done)"
        from lm.train import train

        config = load_planned(sweep_dir, name)
        if config.train.init_mode == "state" and config.train.init_from:
            wait_for_trunk(config)
        result = train(config, workdir)
        return result["status"]
    except Exception as e:  # noqa: BLE001 - any failure is recorded and the sweep goes on
        write_json_atomic(workdir / "result.json", {
            "status": "failed", "name": name, "error": f"{type(e).__name__}: {e}",
            "traceback": traceback.format_exc()})
        print(f"{name}: failed: {type(e).__name__}: {e}", flush=True)
        return "failed"
    finally:
        lock.release()


def run_local(sweep_dir: Path, names: Sequence[str], report: Callable[[], None]) -> None:
    """One run after another in this process (the CPU default)."""
    for name in names:
        print(f"{name}: {run_one(sweep_dir, name)}", flush=True)
        report()


def cpu_worker_env() -> dict[str, str]:
    """Single-threaded math per worker: for tiny models, one process per core beats shared threads."""
    flags = os.environ.get("XLA_FLAGS", "")
    return {"XLA_FLAGS": f"{flags} --xla_cpu_multi_thread_eigen=false".strip(),
            "OMP_NUM_THREADS": "1", "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}


def pin_to_core(slot: int) -> Callable[[], None] | None:
    """A preexec hook pinning a CPU worker to one core, so its runtime threads stop migrating and
    competing with the other workers' (the gain is in docs/experiments.md)."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    cores = sorted(os.sched_getaffinity(0))
    return lambda: os.sched_setaffinity(0, {cores[slot % len(cores)]})


def gpu_count() -> int:
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=True)
    except (FileNotFoundError, subprocess.CalledProcessError):
        return 0
    return len([line for line in out.stdout.splitlines() if line.startswith("GPU")])


def run_subprocesses(sweep_dir: Path, names: Sequence[str], workers: int,
                     report: Callable[..., None]) -> None:
    """A pool of worker processes: one per GPU (CUDA_VISIBLE_DEVICES), else single-threaded CPU."""
    gpus = gpu_count()
    slots = list(range(gpus)) if gpus else list(range(workers))
    queue, running = list(names), {}
    root = Path(__file__).resolve().parents[1]
    (Path(sweep_dir) / "runs").mkdir(parents=True, exist_ok=True)
    last_report, finished = time.time(), []
    while queue or running:
        while queue and len(running) < len(slots):
            slot = next(s for s in slots if s not in running.values())
            name = queue.pop(0)
            env = dict(os.environ, PYTHONPATH=f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
            env.update({"CUDA_VISIBLE_DEVICES": str(slot)} if gpus else cpu_worker_env())
            log = open(run_dir(sweep_dir, name).parent / f"{name}.log", "a")  # noqa: SIM115
            proc = subprocess.Popen([sys.executable, "-m", "experiments.launch", str(sweep_dir), name],
                                    env=env, stdout=log, stderr=subprocess.STDOUT,
                                    preexec_fn=None if gpus else pin_to_core(slot))
            running[proc] = slot
            proc.log, proc.run_name = log, name  # type: ignore[attr-defined]
        if finished or time.time() - last_report > 60:  # after refilling: the true running count
            report(started=[p.run_name for p in running])  # type: ignore[attr-defined]
            last_report = time.time()
        time.sleep(0.5)
        finished = [p for p in running if p.poll() is not None]
        for proc in finished:
            proc.log.close()  # type: ignore[attr-defined]
            del running[proc]


def run_slurm(sweep_dir: Path, names: Sequence[str], slurm: ml_collections.ConfigDict,
              cluster: str | None = None) -> None:
    """Submit runs through submitit: one job array (or one job per run); waits for them."""
    import submitit

    executor = submitit.AutoExecutor(folder=str(Path(sweep_dir) / "slurm"), cluster=cluster)
    params = {"timeout_min": slurm.time_min, "nodes": slurm.nodes,
              "tasks_per_node": max(1, slurm.gpus_per_node) if slurm.nodes > 1 else 1,
              "cpus_per_task": slurm.cpus_per_task}
    if executor.cluster == "slurm":
        params.update(slurm_partition=slurm.partition or None, gpus_per_node=slurm.gpus_per_node,
                      slurm_array_parallelism=slurm.array_parallelism)
    executor.update_parameters(**params)
    if slurm.array:
        jobs = executor.map_array(run_one, [str(sweep_dir)] * len(names), list(names))
    else:
        jobs = [executor.submit(run_one, str(sweep_dir), name) for name in names]
    print(f"submitted {len(jobs)} job(s): {', '.join(j.job_id for j in jobs[:5])}"
          f"{' ...' if len(jobs) > 5 else ''}", flush=True)
    for name, job in zip(names, jobs, strict=True):
        print(f"{name}: {job.result()}", flush=True)


def main(argv: list[str]) -> None:
    """Worker entry point: `python -m experiments.launch SWEEP_DIR RUN_NAME`."""
    if len(argv) != 3:
        sys.exit("usage: python -m experiments.launch SWEEP_DIR RUN_NAME")
    from lm.process import setup

    setup(distributed=True)
    status = run_one(argv[1], argv[2])
    print(f"{argv[2]}: {status}", flush=True)


if __name__ == "__main__":
    main(sys.argv)
