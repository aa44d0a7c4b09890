"""Executing planned runs: per-run locks, one-run workers, and local / subprocess / SLURM runners.

Locks keep two runners off one run; an unfinished run resumes from its checkpoints; every
runner records each run's state in SWEEP/status.json; a run of several processes (nodes ×
tasks per node) is trained by all of them, on process 0's decision (docs/experiments.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import getpass
import os
import re
import select
import shlex
import signal
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import jax
import ml_collections
import numpy as np

from lm.config import ConfigError, fail, positive
from lm.files import (
    FileError,
    RunLock,
    config_from_json,
    file_lock,
    read_json,
    run_dir,
    temporary_path,
    write_json_atomic,
)

if TYPE_CHECKING:
    import submitit  # imported where used: its import reconfigures logging (closing handlers)

TRAIN, DONE, LOCKED = "train", "skipped (done)", "skipped (locked by another runner)"
VERDICTS = (TRAIN, DONE, LOCKED)  # process 0's decision, sent to the other processes by index
STATUS = "status.json"
EXIT_FAILED, EXIT_PREEMPTED = 1, 75  # a worker's exit status (75 as lm.train's: run it again)


def read_result(sweep_dir: Path, name: str) -> dict | None:
    """A run's result.json; None when it is missing or damaged (that run is simply not done)."""
    try:
        return read_json(run_dir(sweep_dir, name) / "result.json", dict, ("status",))
    except FileError:
        return None


def is_done(sweep_dir: Path, name: str) -> bool:
    """Finished for good: completed, or diverged (rerunning a diverged run diverges again)."""
    result = read_result(sweep_dir, name)
    return result is not None and result["status"] in ("completed", "diverged")


def load_planned(sweep_dir: Path, name: str) -> ml_collections.ConfigDict:
    path = Path(sweep_dir) / "plan.json"
    runs = read_json(path, dict, ("runs",))["runs"]
    if not isinstance(runs, list):
        raise FileError(f"{path}: 'runs' is not a list")
    entry = next((r for r in runs if isinstance(r, dict) and r.get("name") == name), None)
    if entry is None:
        raise FileError(f"{path}: no run named {name!r}")
    if not isinstance(entry.get("config"), dict):
        raise FileError(f"{path}: run {name!r} has no config")
    return config_from_json(entry["config"])


def read_status(sweep_dir: Path) -> dict[str, dict]:
    """Run name -> its last recorded state (SWEEP/status.json; empty before the first runner)."""
    path = Path(sweep_dir) / STATUS
    return read_json(path, dict, ("runs",))["runs"] if path.exists() else {}


def record(sweep_dir: Path, name: str, state: str, **info) -> None:
    """Set one run's entry of SWEEP/status.json: state (submitted, requeued, completed, diverged,
    failed, preempted, skipped), its job and why; atomic, and locked against a second runner."""
    path = Path(sweep_dir) / STATUS
    with file_lock(path):
        runs = read_status(sweep_dir)
        runs[name] = {"state": state, "time": time.strftime("%Y-%m-%d %H:%M:%S"), **info}
        write_json_atomic(path, {"runs": runs})


def record_result(sweep_dir: Path, name: str, status: str, **info) -> None:
    """Record what a runner's call of `run_one` said, with the error of a failed run."""
    if status == DONE:
        status = (read_result(sweep_dir, name) or {}).get("status", "completed")
    elif status == LOCKED:
        status, info["reason"] = "skipped", "locked by another runner"
    elif status == "failed" and "reason" not in info:
        info["reason"] = (read_result(sweep_dir, name) or {}).get("error", "no result.json")
    record(sweep_dir, name, status, **info)


def wait_for_trunk(config: ml_collections.ConfigDict, poll: float = 5.0) -> None:
    """A WSD branch starts once its trunk has saved the branch-point checkpoint."""
    trunk, step = Path(config.train.init_from), config.train.init_step
    announced = False
    while not (trunk / "checkpoints" / str(step)).is_dir():
        result = read_result(trunk.parent.parent, trunk.name)
        if result is not None and result["status"] in ("completed", "diverged", "failed"):
            raise RuntimeError(f"trunk {trunk.name} ended ({result['status']}) without a "
                               f"checkpoint at step {step} to branch from")
        if not announced:
            print(f"waiting for {trunk.name} to reach step {step}", flush=True)
            announced = True
        time.sleep(poll)


def claim(sweep_dir: Path, name: str, lock: RunLock) -> str:
    """Process 0's decision: TRAIN with the run's lock held, or why not."""
    if is_done(sweep_dir, name):
        return DONE
    if not lock.acquire():
        print(f"{name}: locked by {lock.holder()}", flush=True)
        return LOCKED
    if is_done(sweep_dir, name):  # finished while we waited for the lock
        lock.release()
        return DONE
    return TRAIN


def follow_process_0(verdict: str) -> str:
    """Process 0's verdict on every process of the run (they train it together or not at all)."""
    if jax.process_count() == 1:
        return verdict
    from jax.experimental import multihost_utils

    index = multihost_utils.broadcast_one_to_all(np.int32(VERDICTS.index(verdict) if verdict else 0))
    return VERDICTS[int(index)]


def run_one(sweep_dir: str | Path, name: str) -> str:
    """Train one planned run unless it is done or locked, and say what happened; a failure is
    recorded in result.json (status `failed`) so the sweep goes on. Every process of a
    multi-process run calls it: process 0 holds the lock, decides and writes the results."""
    sweep_dir = Path(sweep_dir)
    workdir = run_dir(sweep_dir, name)
    lock = RunLock(workdir)
    main = jax.process_index() == 0
    verdict = follow_process_0(claim(sweep_dir, name, lock) if main else "")
    if verdict != TRAIN:
        return verdict
    try:
        from lm.train import train

        config = load_planned(sweep_dir, name)
        if config.train.init_mode == "state" and config.train.init_from:
            wait_for_trunk(config)
        return train(config, workdir)["status"]
    except Exception as e:  # noqa: BLE001 - any failure is recorded and the sweep goes on
        if main:
            write_json_atomic(workdir / "result.json", {
                "status": "failed", "name": name, "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc()})
        print(f"{name}: failed: {type(e).__name__}: {e}", flush=True)
        return "failed"
    finally:
        if main:
            lock.release()


class Worker:
    """One planned run as a submitit job. Every task of the job joins the run (`lm.process`); a
    run that USR2 (the time limit) stopped at a step boundary, checkpointed, hands the signal on
    to submitit, whose handler calls `checkpoint` (this same call again) and requeues the job:
    submitit's checkpointable protocol (`submitit.helpers.Checkpointable` is this method)."""

    def checkpoint(self, *args: str):
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args)

    def __call__(self, sweep_dir: str, name: str) -> str:
        import submitit

        from lm.process import setup
        from lm.train import Preemption

        setup(distributed=True)
        status = run_one(sweep_dir, name)
        if (status == "preempted" and Preemption.received == signal.SIGUSR2
                and callable(signal.getsignal(signal.SIGUSR2))):
            try:
                signal.raise_signal(signal.SIGUSR2)  # process 0 requeues and exits here
            except submitit.core.utils.UncompletedJobError as e:  # requeued too often
                print(f"{name}: not requeued: {e}", flush=True)
        return status


def run_local(sweep_dir: Path, names: Sequence[str], report: Callable[[], None]) -> None:
    """One run after another in this process (the CPU default); a signal stops the sweep."""
    for name in names:
        status = run_one(sweep_dir, name)
        print(f"{name}: {status}", flush=True)
        record_result(sweep_dir, name, status)
        report()
        if status == "preempted":
            break


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


def run_log(sweep_dir: str | Path, name: str) -> Path:
    """SWEEP/runs/NAME.log: a run's console on the subprocess runner."""
    return run_dir(sweep_dir, name).parent / f"{name}.log"


@contextlib.contextmanager
def output_to(path: Path) -> Iterator[None]:
    """This process's stdout and stderr (the file descriptors: JAX's and C++ output too) appended
    to `path` for the block."""
    sys.stdout.flush(), sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(path, "a") as log:
        os.dup2(log.fileno(), 1), os.dup2(log.fileno(), 2)
    try:
        yield
    finally:
        sys.stdout.flush(), sys.stderr.flush()
        for fd, copy in zip((1, 2), saved, strict=True):
            os.dup2(copy, fd)
            os.close(copy)


def serve(sweep_dir: str, control: int) -> None:
    """A pooled worker: trains each run named on stdin (its console in runs/NAME.log) and writes
    the name to file descriptor `control` when it is over; it stops at the end of its input or
    after a run a signal stopped. One process for many runs spares each run the imports."""
    with os.fdopen(control, "w", buffering=1) as done:
        for line in sys.stdin:
            name = line.strip()
            with output_to(run_log(sweep_dir, name)):
                status = run_one(sweep_dir, name)
                print(f"{name}: {status}", flush=True)
            done.write(f"{name}\n")
            if status == "preempted":
                break


@dataclasses.dataclass
class PoolWorker:
    """A pooled worker process, the pipe it names its finished runs on, and the run it has."""

    proc: subprocess.Popen
    done: TextIO
    run: str | None = None

    def give(self, name: str) -> None:
        """Hand it the next run."""
        assert self.proc.stdin is not None
        self.run = name
        self.proc.stdin.write(f"{name}\n")
        self.proc.stdin.flush()

    def finish(self) -> tuple[str, int | None]:
        """The run it has just reported over, and its exit status if it died during it (EOF)."""
        name, self.run = self.run, None
        assert name is not None, "only a worker with a run reports"
        if self.done.readline():
            return name, None
        self.done.close()
        return name, self.proc.wait()

    def close(self) -> None:
        """End its input (it stops after the current run) and wait for it."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait()


def start_worker(sweep_dir: Path, slot: int, gpus: int) -> PoolWorker:
    """A pooled worker process for one slot: its own GPU (CUDA_VISIBLE_DEVICES), else one CPU
    core, single-threaded."""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env.update({"CUDA_VISIBLE_DEVICES": str(slot)} if gpus else cpu_worker_env())
    read, write = os.pipe()
    with warnings.catch_warnings():  # JAX warns at any fork; the child only pins itself, then execs
        warnings.filterwarnings("ignore", "os.fork", RuntimeWarning)
        proc = subprocess.Popen([sys.executable, "-m", "experiments.launch", "--serve", str(sweep_dir),
                                 str(write)], env=env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                text=True, pass_fds=(write,), preexec_fn=None if gpus else pin_to_core(slot))
    os.close(write)
    return PoolWorker(proc, os.fdopen(read))


def run_subprocesses(sweep_dir: Path, names: Sequence[str], workers: int,
                     report: Callable[..., None]) -> None:
    """A pool of worker processes, each training run after run: one per GPU, else one per
    `workers` CPU core. A worker that dies takes only its current run (recorded failed) and is
    replaced; a run a signal stopped ends the sweep, as on the local runner."""
    gpus = gpu_count()
    slots: dict[int, PoolWorker | None] = dict.fromkeys(range(gpus or max(1, workers)))
    queue = list(names)  # at least one slot above: never a pool that waits forever
    (Path(sweep_dir) / "runs").mkdir(parents=True, exist_ok=True)
    last_report, finished = time.time(), False
    try:
        while queue or any(w and w.run for w in slots.values()):
            for slot, worker in slots.items():
                if queue and (worker is None or worker.run is None):
                    worker = slots[slot] = worker or start_worker(sweep_dir, slot, gpus)
                    worker.give(queue.pop(0))
            busy = [w for w in slots.values() if w and w.run]
            if finished or time.time() - last_report > 60:  # after refilling: the true running count
                report(started=[w.run for w in busy])
                last_report = time.time()
            ready = select.select([w.done for w in busy], [], [], 0.5)[0]
            finished = bool(ready)
            for slot, worker in list(slots.items()):
                if worker and worker.done in ready:
                    name, died = worker.finish()
                    if died is not None:
                        slots[slot] = None
                    if record_pooled(sweep_dir, name, died):
                        queue.clear()
    finally:
        for worker in filter(None, slots.values()):
            worker.close()


def record_pooled(sweep_dir: Path, name: str, died: int | None) -> bool:
    """Record how a pooled run ended (`died`: its worker's exit status, if it died during it) and
    say whether a signal stopped it. A live worker without a result skipped the run: another
    runner holds it."""
    result = read_result(sweep_dir, name)
    if result is None and died is not None:
        record(sweep_dir, name, "failed", reason=f"worker exited with status {died} without a "
               f"result; log: {run_log(sweep_dir, name)}")
    elif result is not None:
        record_result(sweep_dir, name, result["status"])
    return result is not None and result["status"] == "preempted"


# SLURM through submitit ------------------------------------------------------------------------

MEM = re.compile(r"\d+([KMGT]B?)?", re.IGNORECASE)
OPTION = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
QUEUED = ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING",
          "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT")


def validate_slurm(slurm: ml_collections.ConfigDict) -> None:
    """The sweep's `slurm` section, before anything is planned or submitted."""
    positive(slurm, "slurm", ("time_min", "nodes", "cpus_per_task", "array_parallelism"))
    for name in ("gpus_per_node", "tasks_per_node"):
        value = slurm[name]
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            fail(f"slurm.{name}", value, "must be an integer >= 0"
                 + (" (0: one task per GPU on several nodes, else 1)" if name == "tasks_per_node" else ""))
    if slurm.mem and not MEM.fullmatch(slurm.mem):  # types: ConfigDict keeps each field's own
        fail("slurm.mem", slurm.mem, "'' (the partition's default) or sbatch's --mem size, e.g. '64G'")
    if not all(isinstance(line, str) for line in slurm.setup):
        fail("slurm.setup", slurm.setup, "must be shell lines (strings), e.g. ('module load cuda',)")
    for option in slurm.additional_parameters:
        if not isinstance(option, str) or not OPTION.fullmatch(option.partition("=")[0]):
            fail("slurm.additional_parameters", tuple(slurm.additional_parameters),
                 f"{option!r} is not an sbatch option: give 'name=value' or 'flag' strings, "
                 "e.g. ('reservation=big', 'exclusive')")


def tasks_per_node(slurm: ml_collections.ConfigDict) -> int:
    """Processes per node: `tasks_per_node`, else one per GPU on several nodes and one on one."""
    if slurm.tasks_per_node:
        return slurm.tasks_per_node
    return max(1, slurm.gpus_per_node) if slurm.nodes > 1 else 1


def sbatch_parameters(slurm: ml_collections.ConfigDict, job_name: str) -> dict:
    """submitit's SlurmExecutor parameters (its names for sbatch's options) of one run's job."""
    optional = {k: slurm[k] for k in ("partition", "account", "qos", "mem", "constraint",
                                       "gpus_per_node") if slurm[k]}
    extra = dict((k, v) if sep else (k, True) for k, sep, v in (
        o.partition("=") for o in slurm.additional_parameters))
    return {"job_name": job_name, "time": slurm.time_min, "nodes": slurm.nodes,
            "ntasks_per_node": tasks_per_node(slurm), "cpus_per_task": slurm.cpus_per_task,
            "array_parallelism": slurm.array_parallelism, "stderr_to_stdout": True, **optional,
            **({"setup": list(slurm.setup)} if slurm.setup else {}),
            **({"additional_parameters": extra} if extra else {})}


def sbatch_script(sweep_dir: Path, slurm: ml_collections.ConfigDict, job_name: str, runs: int) -> str:
    """The script `run_slurm` submits for `runs` runs: submitit's own text (no cluster needed)."""
    from submitit.slurm import slurm as submitit_slurm

    folder = (Path(sweep_dir) / "slurm").absolute()
    command = f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(folder))}"
    array = {"map_count": runs} if slurm.array and runs > 1 else {}
    return submitit_slurm._make_sbatch_string(command=command, folder=folder, **array,
                                              **sbatch_parameters(slurm, job_name))


def in_queue() -> dict[str, str]:
    """Job id -> state of this user's jobs in the SLURM queue (array tasks one by one)."""
    try:
        out = subprocess.run(["squeue", "--noheader", "--array", f"--user={getpass.getuser()}",
                              "--format=%i %T"], capture_output=True, text=True, check=True,
                             timeout=120).stdout
    except (OSError, subprocess.SubprocessError) as e:
        print(f"warning: squeue failed ({e}); runs queued by an earlier submission may be "
              "submitted again", flush=True)
        return {}
    return {job: state for job, state, *_ in (line.split() for line in out.splitlines()) if
            state in QUEUED}


def running_elsewhere(sweep_dir: Path, name: str) -> str:
    """Who holds the run's lock, '' when no live process does: a run to leave alone. Only looks
    (taking the lock to test it could turn away the runner about to claim the run)."""
    lock = RunLock(run_dir(sweep_dir, name))
    return lock.holder() if lock.held() else ""


def link_log(sweep_dir: Path, name: str, log: Path) -> None:
    """SWEEP/runs/NAME.log: the run's console (its process 0's), wherever the job writes it."""
    link = run_log(sweep_dir, name)
    tmp = temporary_path(link)
    os.symlink(log, tmp)
    os.replace(tmp, link)


def last_line(text: str) -> str:
    """The line that says what went wrong: a traceback's last."""
    parts = text.split("-" * 22)  # submitit's FailedJobError: head, traceback, where the logs are
    lines = [line.strip() for line in (parts[1] if len(parts) > 2 else text).splitlines()]
    return next((line for line in reversed(lines) if line), text.strip())


def outcome(job: submitit.Job) -> tuple[str, dict]:
    """(state, info) of a job that ended: what `run_one` returned, the error that escaped it, or
    the job's end (node failure, out of memory, scancel) when it left no result."""
    info = {"job": job.job_id}
    if not job.paths.result_pickle.exists() and job.state != "COMPLETED":
        return "failed", {**info, "reason": f"job {job.job_id} ended {job.state} without a "
                                            f"result; log: {job.paths.stdout}"}
    error = job.exception()
    if error is not None:
        return "failed", {**info, "reason": last_line(str(error))}
    return job.result(), info


def submit(sweep_dir: Path, names: Sequence[str], slurm: ml_collections.ConfigDict,
           job_name: str) -> dict[str, submitit.Job]:
    """Submit one job per run (a job array, or separate jobs); run name -> its task 0."""
    import submitit

    folder = Path(sweep_dir) / "slurm"
    try:
        executor = submitit.SlurmExecutor(folder=folder)
    except RuntimeError as e:  # no srun on PATH
        raise ConfigError(f"--runner=slurm: {e}") from None
    executor.update_parameters(**sbatch_parameters(slurm, job_name))
    args = [str(sweep_dir)] * len(names), list(names)
    jobs = (executor.map_array(Worker(), *args) if slurm.array else
            [executor.submit(Worker(), *a) for a in zip(*args, strict=True)])
    print(f"submitted {len(jobs)} job(s): {', '.join(j.job_id for j in jobs[:5])}"
          f"{' ...' if len(jobs) > 5 else ''}", flush=True)
    for name, job in zip(names, jobs, strict=True):
        record(sweep_dir, name, "submitted", job=job.job_id)
        link_log(sweep_dir, name, job.task(0).paths.stdout)
    return {name: job.task(0) for name, job in zip(names, jobs, strict=True)}


def triage(sweep_dir: Path, names: Sequence[str]) -> tuple[dict[str, submitit.Job], list[str]]:
    """(jobs of an earlier submission still in the queue, by run; runs to submit): a run whose
    job is queued is waited for, one whose lock a live process holds is left alone."""
    import submitit

    status, queued = read_status(sweep_dir), in_queue()
    jobs, fresh = {}, []
    for name in names:
        job_id = status.get(name, {}).get("job")
        if job_id in queued:
            print(f"{name}: job {job_id} is {queued[job_id].lower()}: waiting for it", flush=True)
            jobs[name] = submitit.SlurmJob(folder=Path(sweep_dir) / "slurm", job_id=job_id)
        elif holder := running_elsewhere(sweep_dir, name):
            print(f"{name}: running elsewhere ({holder}): not submitted", flush=True)
        else:
            fresh.append(name)
    return jobs, fresh


def run_slurm(sweep_dir: Path, names: Sequence[str], slurm: ml_collections.ConfigDict,
              job_name: str, report: Callable[[], None], poll: float = 1.0) -> None:
    """Submit the runs that are neither queued (by an earlier submission) nor running elsewhere,
    and wait for every job, recording each run's state as it changes in status.json; a job that
    died, a requeue and a failure are recorded, never raised."""
    jobs, fresh = triage(sweep_dir, names)
    if fresh:
        jobs.update(submit(sweep_dir, fresh, slurm, job_name))
    since, last_report = time.time(), 0.0
    while jobs:
        changed = False
        for name, job in list(jobs.items()):
            if job.done():
                state, info = outcome(job)
                record_result(sweep_dir, name, state, **info)
                print(f"{name}: {state}" + (f": {info['reason']}" if "reason" in info else ""),
                      flush=True)
                del jobs[name]
                changed = True
            elif requeued(sweep_dir, name, since):
                record(sweep_dir, name, "requeued", job=job.job_id)
                print(f"{name}: preempted, requeued (job {job.job_id})", flush=True)
                changed = True
        if changed or time.time() - last_report > 60:
            report()
            last_report = time.time()
        time.sleep(poll)


def requeued(sweep_dir: Path, name: str, since: float) -> bool:
    """The run saved a preempted result since `since` while its job goes on: SLURM requeued it
    (once recorded, not again)."""
    path = run_dir(sweep_dir, name) / "result.json"
    result = read_result(sweep_dir, name)
    return (result is not None and result["status"] == "preempted" and path.stat().st_mtime > since
            and read_status(sweep_dir).get(name, {}).get("state") != "requeued")


def unfinished(sweep_dir: Path, names: Sequence[str]) -> tuple[list[str], list[str]]:
    """(runs not done, each with its state and why from status.json; runs another runner is
    still training), one line each."""
    status, stuck, busy = read_status(sweep_dir), [], []
    for name in names:
        if is_done(sweep_dir, name):
            continue
        if holder := running_elsewhere(sweep_dir, name):
            busy.append(f"{name}: running ({holder})")
        elif not is_done(sweep_dir, name):  # it may have finished a moment ago
            entry = status.get(name, {})
            why = "; ".join(f"{k} {entry[k]}" for k in ("job", "reason") if k in entry)
            stuck.append(f"{name}: {entry.get('state', 'not run')}" + (f" ({why})" if why else ""))
    return stuck, busy


def main(argv: list[str]) -> None:
    """Worker entry point: `python -m experiments.launch SWEEP_DIR RUN_NAME` (under `srun`, every
    task runs it; exit status 75 when a signal stopped the run, 1 when it failed), or the
    subprocess runner's pooled worker, `--serve SWEEP_DIR FD`."""
    from lm.process import setup

    if len(argv) == 4 and argv[1] == "--serve":
        setup()
        return serve(argv[2], int(argv[3]))
    if len(argv) != 3:
        sys.exit("usage: python -m experiments.launch SWEEP_DIR RUN_NAME")
    setup(distributed=True)
    status = run_one(argv[1], argv[2])
    print(f"{argv[2]}: {status}", flush=True)
    sys.exit({"preempted": EXIT_PREEMPTED, "failed": EXIT_FAILED}.get(status, 0))


if __name__ == "__main__":
    main(sys.argv)
