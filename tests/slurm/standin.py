"""A stand-in SLURM for tests: `sbatch`, `srun`, `sacct`, `squeue`, `scancel` and `scontrol` on one
machine, enough of each for submitit's real SLURM code path (and our own) to run unchanged.

Put this folder on PATH and point $SLURM_STANDIN_DIR at an empty folder (its state: job records,
the scripts sbatch received, a log of submissions). `sbatch` records the script and returns at
once; a detached controller runs the job (each array task, at most `%N` at a time) with SLURM's
variables, and `srun` inside it starts nodes × tasks-per-node copies of its command with theirs
(SLURM_PROCID, SLURM_LOCALID, SLURM_NODEID, SLURM_NTASKS, SLURM_STEP_NODELIST, ...). `scancel
--signal=SIG` signals a job's tasks (USR2 is what SLURM sends at the time limit), a plain `scancel`
terminates it (SIGTERM, SIGKILL after a grace), `scontrol requeue` restarts it once it exits, and
`sacct`/`squeue` report the states SLURM would (PENDING, RUNNING, REQUEUED, COMPLETED, FAILED,
CANCELLED). Only standard-library Python.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

GRACE = 10.0  # seconds between SIGTERM (scancel, requeue) and SIGKILL
QUEUE_STATES = ("PENDING", "RUNNING", "REQUEUED", "COMPLETING")
HERE = Path(__file__).resolve().parent


def state_dir() -> Path:
    path = Path(os.environ["SLURM_STANDIN_DIR"])
    (path / "jobs").mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def locked():
    with open(state_dir() / "lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _path(key: str) -> Path:
    return state_dir() / "jobs" / f"{key}.json"


def read(key: str) -> dict:
    return json.loads(_path(key).read_text())


def write(rec: dict) -> None:
    tmp = _path(rec["key"]).with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(rec))
    os.replace(tmp, _path(rec["key"]))


def update(key: str, **changes) -> dict:
    with locked():
        rec = read(key)
        rec.update(changes)
        write(rec)
        return rec


def records() -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((state_dir() / "jobs").glob("*.json"))]


def matching(ids: list[str]) -> list[dict]:
    """Records named by job ids: an array (all its tasks), one task (A_i) or a plain job."""
    wanted = {i for item in ids for i in item.split(",") if i}
    return [r for r in records() if r["key"] in wanted or str(r["array"]) in wanted]


def _port_free(job_id: int) -> bool:
    """JAX's SLURM coordinator listens on a port derived from SLURM_JOB_ID: keep that port free."""
    with socket.socket() as s:
        try:
            s.bind(("", job_id % 4096 + 61440))
        except OSError:
            return False
    return True


def new_ids(n: int) -> list[int]:
    counter = state_dir() / "next_id"
    with locked():
        next_id = int(counter.read_text()) if counter.exists() else random.randrange(1000, 60000)
        ids = []
        while len(ids) < n:
            if _port_free(next_id):
                ids.append(next_id)
            next_id += 1
        counter.write_text(str(next_id))
    return ids


def options(lines: list[str]) -> dict[str, str]:
    """`#SBATCH --key=value` (or `--flag`) lines of a batch script."""
    out = {}
    for line in lines:
        if line.startswith("#SBATCH"):
            key, _, value = line.split(None, 1)[1].strip().lstrip("-").partition("=")
            out[key] = value.strip("'\"") if value else "true"
    return out


def expand(pattern: str, env: dict, task: int | str = 0) -> str:
    """sbatch/srun filename patterns: %A %a %j %t %n %N %s %x %u %%."""
    values = {"A": env.get("SLURM_ARRAY_JOB_ID", env["SLURM_JOB_ID"]),
              "a": env.get("SLURM_ARRAY_TASK_ID", "4294967294"), "j": env["SLURM_JOB_ID"],
              "t": str(task), "n": env.get("SLURM_NODEID", "0"),
              "N": env.get("SLURMD_NODENAME", "localhost"), "s": env.get("SLURM_STEP_ID", "batch"),
              "x": env.get("SLURM_JOB_NAME", ""), "u": getpass.getuser(), "%": "%"}
    return re.sub(r"%(.)", lambda m: values.get(m.group(1), m.group(0)), pattern)


def node_names(n: int) -> list[str]:
    return ["localhost"] + [f"127.0.0.{k + 1}" for k in range(1, n)]


def sbatch(args: list[str]) -> int:
    script = Path(args[-1])
    text = script.read_text()
    opts = options(text.splitlines())
    array = opts.get("array")
    count, parallel = 1, 1
    if array:
        m = re.fullmatch(r"0-(\d+)(?:%(\d+))?", array)
        count = int(m.group(1)) + 1
        parallel = int(m.group(2) or count)
    ids = new_ids(count + 1 if array else 1)
    main = ids[0]
    kept = state_dir() / "scripts" / f"{main}.sh"
    kept.parent.mkdir(exist_ok=True)
    kept.write_text(text)
    keys = [f"{main}_{i}" for i in range(count)] if array else [str(main)]
    with locked():
        for i, key in enumerate(keys):
            write({"key": key, "job_id": ids[i + 1] if array else main, "array": main if array else None,
                   "task": i if array else None, "name": opts.get("job-name", script.name),
                   "state": "PENDING", "starts": 0, "cancel": False, "requeue": False, "tasks": [],
                   "steps": 0, "nodes": int(opts.get("nodes", 1)), "exit": None})
        with open(state_dir() / "sbatch.jsonl", "a") as f:
            f.write(json.dumps({"job": main, "script": str(kept), "options": opts, "jobs": keys}) + "\n")
    log = open(state_dir() / "controller.log", "a")  # noqa: SIM115 - the controller's, detached
    subprocess.Popen([sys.executable, __file__, "_control", str(main), str(parallel), *keys],
                     stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
    print(f"Submitted batch job {main}")
    return 0


def control(args: list[str]) -> int:
    """The detached controller of one submission: runs its jobs (array tasks) to their end."""
    main, parallel, keys = args[0], int(args[1]), args[2:]
    script = state_dir() / "scripts" / f"{main}.sh"
    opts = options(script.read_text().splitlines())
    slots = threading.Semaphore(parallel)

    def run(key: str) -> None:
        with slots:
            while run_once(key, script, opts):
                pass

    threads = [threading.Thread(target=run, args=(k,)) for k in keys]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return 0


def run_once(key: str, script: Path, opts: dict) -> bool:
    """Run one job's batch script once; returns whether it was requeued (to run again)."""
    rec = read(key)
    if rec["cancel"]:
        update(key, state="CANCELLED")
        return False
    nodes = rec["nodes"]
    per_node = int(opts.get("ntasks-per-node", 1))
    names = node_names(nodes)
    env = dict(os.environ, SLURM_JOB_ID=str(rec["job_id"]), SLURM_JOBID=str(rec["job_id"]),
               SLURM_JOB_NAME=rec["name"], SLURM_JOB_NUM_NODES=str(nodes), SLURM_NNODES=str(nodes),
               SLURM_JOB_NODELIST=",".join(names), SLURM_NODELIST=",".join(names),
               SLURM_NTASKS_PER_NODE=str(per_node), SLURM_NTASKS=str(nodes * per_node),
               SLURM_CPUS_PER_TASK=opts.get("cpus-per-task", "1"), SLURMD_NODENAME=names[0],
               SLURM_SUBMIT_DIR=os.getcwd(), SLURM_RESTART_COUNT=str(rec["starts"]),
               SLURM_STANDIN_JOB=key)
    if rec["array"] is not None:
        env.update(SLURM_ARRAY_JOB_ID=str(rec["array"]), SLURM_ARRAY_TASK_ID=str(rec["task"]))
    out = open(expand(opts.get("output", "slurm-%j.out"), env), "a")  # noqa: SIM115
    err = open(expand(opts["error"], env), "a") if "error" in opts else out  # noqa: SIM115
    update(key, state="RUNNING", starts=rec["starts"] + 1, requeue=False, tasks=[])
    proc = subprocess.Popen(["bash", str(script)], env=env, stdout=out, stderr=err,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    update(key, batch=proc.pid)
    deadline = None
    while proc.poll() is None:
        rec = read(key)
        if (rec["cancel"] or rec["requeue"]) and deadline is None:
            deadline = time.time() + GRACE
            if rec["cancel"]:
                _signal_group(proc.pid, signal.SIGTERM)
        if deadline is not None and time.time() > deadline:
            _signal_group(proc.pid, signal.SIGKILL)
        time.sleep(0.1)
    out.close()
    err.close()
    rec = read(key)
    if rec["requeue"] and not rec["cancel"]:
        update(key, state="REQUEUED")
        return True
    state = "CANCELLED" if rec["cancel"] else "COMPLETED" if proc.returncode == 0 else "FAILED"
    update(key, state=state, exit=proc.returncode)
    return False


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def srun(args: list[str]) -> int:
    """Start the step's tasks with their SLURM variables, forward signals, wait for all."""
    valued = {"output": "o", "error": "e", "ntasks": "n", "nodes": "N", "ntasks-per-node": None,
              "job-name": "J", "cpus-per-task": "c", "gpus-per-node": None, "gres": None}
    short = {v: k for k, v in valued.items() if v}
    opts, i = {}, 0
    while i < len(args) and args[i].startswith("-"):
        arg = args[i].lstrip("-")
        key, eq, value = arg.partition("=")
        key = short.get(key, key) if not args[i].startswith("--") else key
        if key in valued and not eq:
            i += 1
            value = args[i]
        opts[key] = value
        i += 1
    command = args[i:]
    key = os.environ["SLURM_STANDIN_JOB"]
    nodes = int(opts.get("nodes", os.environ.get("SLURM_JOB_NUM_NODES", 1)))
    per_node = int(opts.get("ntasks-per-node", os.environ.get("SLURM_NTASKS_PER_NODE", 1)))
    ntasks = int(opts.get("ntasks", nodes * per_node))
    with locked():
        rec = read(key)
        step = rec["steps"]
        rec["steps"] += 1
        write(rec)
    names = node_names(nodes)
    procs = []
    for task in range(ntasks):
        env = dict(os.environ, SLURM_PROCID=str(task), SLURM_LOCALID=str(task % per_node),
                   SLURM_NODEID=str(task // per_node), SLURM_NTASKS=str(ntasks),
                   SLURM_NPROCS=str(ntasks), SLURM_STEP_NUM_TASKS=str(ntasks),
                   SLURM_STEP_NUM_NODES=str(nodes), SLURM_STEP_NODELIST=",".join(names),
                   SLURM_STEP_ID=str(step), SLURM_STEPID=str(step),
                   SLURMD_NODENAME=names[task // per_node])
        out = open(expand(opts["output"], env, task), "a") if "output" in opts else None  # noqa: SIM115
        err = open(expand(opts["error"], env, task), "a") if "error" in opts else out  # noqa: SIM115
        procs.append(subprocess.Popen(command, env=env, stdout=out, stderr=err))
    update(key, tasks=read(key)["tasks"] + [p.pid for p in procs])

    def forward(signum, frame):
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, forward)
    codes = [p.wait() for p in procs]
    bad = next((c for c in codes if c), 0)
    return 128 - bad if bad < 0 else bad


def sacct(args: list[str]) -> int:
    ids, fields, i = [], ["JobID", "State", "NodeList"], 0
    while i < len(args):
        arg = args[i]
        if arg in ("-j", "--jobs", "-o", "--format"):
            i += 1
            value = args[i]
        elif arg.startswith(("--jobs=", "--format=")):
            value = arg.split("=", 1)[1]
        else:
            i += 1
            continue
        if arg.startswith(("-j", "--jobs")):
            ids.append(value)
        else:
            fields = value.split(",")
        i += 1
    print("|".join(fields))
    for rec in matching(ids):
        values = {"JobID": rec["key"], "State": rec["state"], "JobName": rec["name"],
                  "NodeList": ",".join(node_names(rec["nodes"])),
                  "ExitCode": f"{rec['exit'] or 0}:0"}
        print("|".join(values.get(f, "") for f in fields))
    return 0


def squeue(args: list[str]) -> int:
    fmt, header, ids, names, i = "%i %T", True, [], [], 0
    while i < len(args):
        arg, value = args[i], None
        if "=" in arg:
            arg, value = arg.split("=", 1)
        elif arg in ("-o", "--format", "-j", "--jobs", "-u", "--user", "-n", "--name", "-t",
                     "--states"):
            i += 1
            value = args[i]
        if arg in ("-h", "--noheader"):
            header = False
        elif arg in ("-o", "--format"):
            fmt = value
        elif arg in ("-j", "--jobs"):
            ids.append(value)
        elif arg in ("-n", "--name"):
            names += value.split(",")
        i += 1
    recs = matching(ids) if ids else records()
    if header:
        print(fill(fmt, {"i": "JOBID", "T": "STATE", "j": "NAME", "A": "ARRAY_JOB_ID",
                         "a": "ARRAY_TASK_ID"}))
    for rec in recs:
        if rec["state"] in QUEUE_STATES and (not names or rec["name"] in names):
            print(fill(fmt, {"i": rec["key"], "T": rec["state"], "j": rec["name"],
                             "A": str(rec["array"] or rec["job_id"]),
                             "a": "N/A" if rec["task"] is None else str(rec["task"])}))
    return 0


def fill(fmt: str, values: dict[str, str]) -> str:
    """squeue's --format: %i, %T, ... replaced by their values."""
    return re.sub(r"%(.)", lambda m: values.get(m.group(1), m.group(0)), fmt)


def signal_number(name: str) -> int:
    return int(name) if name.isdigit() else getattr(signal, name if name.startswith("SIG") else
                                                    f"SIG{name}")


def scancel(args: list[str]) -> int:
    sig, ids, i = None, [], 0
    while i < len(args):
        arg = args[i]
        if arg in ("-s", "--signal"):
            i += 1
            sig = signal_number(args[i])
        elif arg.startswith("--signal="):
            sig = signal_number(arg.split("=", 1)[1])
        elif not arg.startswith("-"):
            ids.append(arg)
        i += 1
    for rec in matching(ids):
        if sig is None:
            update(rec["key"], cancel=True)
            continue
        for pid in rec["tasks"] or ([rec["batch"]] if "batch" in rec else []):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
    return 0


def scontrol(args: list[str]) -> int:
    if not args or args[0] != "requeue":
        print(f"scontrol (stand-in): only 'requeue' is supported, not {args}", file=sys.stderr)
        return 1
    for rec in matching(args[1:]):
        if rec["state"] != "RUNNING":
            print(f"scontrol: error: job {rec['key']} is not running", file=sys.stderr)
            return 1
        update(rec["key"], requeue=True)
    return 0


COMMANDS = {"sbatch": sbatch, "srun": srun, "sacct": sacct, "squeue": squeue, "scancel": scancel,
            "scontrol": scontrol, "_control": control}

if __name__ == "__main__":
    sys.exit(COMMANDS[sys.argv[1]](sys.argv[2:]))
