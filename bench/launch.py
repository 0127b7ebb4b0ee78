"""Cells as jobs through submitit: `bench run --launcher slurm|local`.

One job per cell (a Slurm job array: `executor.batch()`), each running that one cell with `run_cell_once`
(the cell lock and the reuse of a finished record make a duplicate or requeued job harmless). A job is a
`CellJob`: a callable with a `checkpoint()` method, so submitit requeues it on pre-emption or time-out
(SIGUSR2 before the end of the allocation); the requeued job reruns the cell, and its training phases
resume from their training-state checkpoints under `cells/<hash>/train_state/` (bench.train_state), the dense
model's under `<cache>/dense/<model>-<hash>/train_state/`. The job ids are kept per cell in
`<output>/<table>/jobs.json` for `bench status`; the submitit files (pickles, logs) in `<output>/<table>/jobs/`.

- `slurm`: submitit's SlurmExecutor (sbatch/sacct of a Slurm cluster; the output, cache and data folders
  must be shared with the compute nodes);
- `local`: submitit's LocalExecutor, the same job path on this machine: at most `--workers` jobs compute at
  once (slots: `jobs/slots/slot-<i>.lock`), each with its GPU(s) or its share of the CPU threads; the others
  wait (`queued` in `bench status`).

`--gpus-per-cell G > 1` runs the cell data-parallel on its G GPUs of one node: the job calls
`bench.distributed.launch_cell(cell, paths, nproc_per_node=G, train_options=...)`, which starts torchrun
(`--standalone`, one process per GPU; G gloo processes on CPU) and returns the record rank 0 wrote.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.errors import BenchError

LAUNCHERS = ("local", "slurm")
WORD = {"pass": "PASSED", "fail": "FAILED", "error": "FAILED", "no_ref": "NO-REF"}   # as pytest reports cells
JOBS_VERSION = 1
LOCAL_TIMEOUT_MIN = 7 * 24 * 60           # the local executor's own time limit (its default is 2 minutes)
SLURM_DEFAULT_TIME_MIN = 24 * 60


@dataclass
class LaunchOptions:
    launcher: str
    gpus_per_cell: int = 1
    partition: str | None = None
    time_min: int | None = None
    account: str | None = None
    qos: str | None = None
    mem_gb: float | None = None
    cpus_per_gpu: int | None = None
    max_parallel: int | None = None       # local: jobs computing at once (default 1); slurm: array parallelism
    max_timeouts: int = 10                # requeues after a time-out before submitit gives up (pre-emptions: any)
    slurm_args: dict = field(default_factory=dict)   # more sbatch options: {"constraint": "a100"}


def parse_time(value) -> int:
    """Minutes from Slurm's time formats: MM, HH:MM, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS."""
    s = str(value).strip()
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", s)
    if not m or (m.group(1) is None and m.group(3) is None and ":" in s):
        raise BenchError(f"--time {value!r}: give HH:MM (e.g. 12:00), D-HH:MM or minutes")
    days, a, b, c = (int(x) if x is not None else None for x in m.groups())
    if days is None and b is None:        # MM
        minutes = a
    elif days is None:                    # HH:MM or HH:MM:SS
        minutes = a * 60 + b + (1 if c else 0)
    else:                                 # D-HH[:MM[:SS]]
        minutes = days * 1440 + a * 60 + (b or 0) + (1 if c else 0)
    if minutes <= 0:
        raise BenchError(f"--time {value!r}: the time limit must be positive")
    return minutes


def parse_slurm_args(items) -> dict:
    out = {}
    for it in items or []:
        key, sep, val = str(it).partition("=")
        if not sep or not key.strip():
            raise BenchError(f"--slurm-arg {it!r}: give KEY=VALUE (an sbatch option without its dashes, "
                             f"e.g. --slurm-arg constraint=a100)")
        out[key.strip().lstrip("-")] = val.strip()
    return out


def require_distributed(gpus_per_cell: int):
    """bench.distributed for a data-parallel cell (G > 1), else None (the cell runs in the job's process)."""
    if gpus_per_cell <= 1:
        return None
    import bench.distributed as dist
    return dist


def slurm_parameters(opts: LaunchOptions, table: str) -> dict:
    """What `bench run --launcher slurm` passes to submitit's SlurmExecutor.update_parameters: one task per
    cell on one node with G GPUs (the task starts the G data-parallel ranks itself), C CPUs per GPU, the
    time limit, and SIGUSR2 two minutes before it so the job is checkpointed and requeued."""
    g = max(0, int(opts.gpus_per_cell))
    params = {"job_name": f"bench-{table}", "time": opts.time_min or SLURM_DEFAULT_TIME_MIN, "nodes": 1,
              "ntasks_per_node": 1, "signal_delay_s": 120, "stderr_to_stdout": True}
    if g:
        params["gpus_per_node"] = g
    if opts.cpus_per_gpu:
        params["cpus_per_task"] = int(opts.cpus_per_gpu) * max(1, g)
    if opts.mem_gb:
        params["mem"] = f"{int(round(opts.mem_gb))}GB"
    for key in ("partition", "account", "qos"):
        if getattr(opts, key):
            params[key] = getattr(opts, key)
    if opts.max_parallel:
        params["array_parallelism"] = int(opts.max_parallel)
    if opts.slurm_args:
        params["additional_parameters"] = dict(opts.slurm_args)
    return params


def local_parameters(opts: LaunchOptions) -> dict:
    return {"timeout_min": opts.time_min or LOCAL_TIMEOUT_MIN, "tasks_per_node": 1, "signal_delay_s": 30}


def make_executor(opts: LaunchOptions, folder: Path, table: str):
    import submitit
    if opts.launcher == "slurm":
        try:
            ex = submitit.SlurmExecutor(folder=str(folder), max_num_timeout=opts.max_timeouts)
        except RuntimeError as e:
            raise BenchError(f"--launcher slurm: {e} (no `srun` on PATH); use --launcher local on this machine") from None
        ex.update_parameters(**slurm_parameters(opts, table))
        return ex
    if opts.launcher == "local":
        ex = submitit.LocalExecutor(folder=str(folder), max_num_timeout=opts.max_timeouts)
        ex.update_parameters(**local_parameters(opts))
        return ex
    from bench.errors import UnknownName
    raise UnknownName("launcher", opts.launcher, LAUNCHERS)


def _utc() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _job_log(msg: str) -> None:
    from bench.locks import job_id
    print(f"[job {job_id() or '?'}] {msg}", flush=True)


class CellJob:
    """One cell as a submitit job. Picklable: the cell's resolved config, the paths (absolute), the card
    folders (BENCH_TABLES) and the run's training options. `checkpoint()` makes submitit requeue it."""

    def __init__(self, cell: dict, paths: dict, env: dict, gpus_per_cell: int = 1, slots: dict | None = None,
                 train_options: dict | None = None):
        self.cell, self.paths, self.env = cell, paths, env
        self.gpus_per_cell, self.slots, self.train_options = gpus_per_cell, slots, train_options or {}
        self.attempt = 0

    def __call__(self) -> dict:
        os.environ.update(self.env)
        self.attempt += 1
        from bench.config import Paths
        from bench.locks import run_cell_once, slot
        from bench.runner import reuse_record
        paths = Paths(**{k: Path(v) for k, v in self.paths.items()})
        cell = self.cell
        if self.attempt > 1:
            _job_log(f"{cell['cell_id']}: attempt {self.attempt} (requeued): the cell resumes from its "
                     f"training-state checkpoints, if any")
        rec = reuse_record(paths.output, cell)
        if rec is not None:
            return self._result(rec, True)
        ctx = slot(Path(self.slots["folder"]), self.slots["n"]) if self.slots else contextlib.nullcontext(0)
        with ctx as index:
            if self.slots:   # local: this slot's GPU(s), or its share of the CPU threads
                from bench.workers import gpus_for, pin_gpus, share_cpu
                gpus = self.slots.get("gpus") or []
                if gpus and cell.get("device") == "cuda":
                    pin_gpus(gpus_for(index, gpus, max(1, self.gpus_per_cell)))
                else:
                    share_cpu(self.slots["n"])
            dist = require_distributed(self.gpus_per_cell)
            if dist is not None:   # data parallel on this job's G GPUs (G gloo processes on CPU)
                _job_log(f"{cell['table']}::{cell['cell_id']} ({cell['hash']}) on {socket.gethostname()}: torchrun "
                         f"--nproc_per_node {self.gpus_per_cell}")
                rec, reused = dist.launch_cell(cell, self.paths, nproc_per_node=self.gpus_per_cell,
                                               train_options=self.train_options)
                return self._result(rec, reused)
            from bench.runner import Session
            session = Session(paths, log=_job_log, **self.train_options)
            _job_log(f"{cell['table']}::{cell['cell_id']} ({cell['hash']}) on {socket.gethostname()}, pid {os.getpid()}")
            rec, reused = run_cell_once(cell, session)
        return self._result(rec, reused)

    def _result(self, rec: dict, reused: bool) -> dict:
        _job_log(f"{self.cell['cell_id']}: {rec['status']}" + (" (reused)" if reused else "")
                 + (f": {rec['reason']}" if rec.get("reason") else ""))
        return {"cell_id": self.cell["cell_id"], "hash": self.cell["hash"], "status": rec["status"],
                "reason": rec.get("reason"), "reused": reused}

    def checkpoint(self, *args, **kwargs):
        """Pre-empted or timed out: requeue this same job. Nothing to save here: the cell's training phases
        write their own checkpoints (when enabled) and a finished record is reused."""
        import submitit
        _job_log(f"{self.cell['cell_id']}: pre-empted or timed out: requeued")
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


# --------------------------------------------------------------------------------------------------------
# jobs.json

def jobs_path(output: Path, table: str) -> Path:
    from bench.records import table_dir
    return table_dir(output, table) / "jobs.json"


def read_jobs(output: Path, table: str) -> dict:
    """{hash: entry} of the latest job of every cell (entry: launcher, job_id, cell_id, hash, profile, device,
    host, folder, submitted_utc, gpus_per_cell, previous: earlier job ids)."""
    try:
        data = json.loads(jobs_path(output, table).read_text())
    except (OSError, ValueError):
        return {}
    return data.get("cells") or {}


def record_jobs(output: Path, table: str, entries: list) -> Path:
    """Add the new jobs to jobs.json (atomically, under a lock: two submissions may add at once)."""
    from bench.locks import held, lock_path_for
    from bench.structure import write_json_atomic
    path = jobs_path(output, table)
    with held(lock_path_for(path), "jobs.json"):
        cells = read_jobs(output, table)
        for e in entries:
            old = cells.get(e["hash"])
            prev = (old.get("previous") or []) + [f"{old['launcher']}:{old['job_id']}"] if old else []
            cells[e["hash"]] = {**e, "previous": prev}
        write_json_atomic(path, {"jobs_version": JOBS_VERSION, "table": table, "cells": cells})
    return path


# --------------------------------------------------------------------------------------------------------
# submit and wait

def submit(cells: list, paths, opts: LaunchOptions, train_options: dict | None = None, log=print) -> list:
    """Submit one job per cell (cells already done are not submitted). Returns [(cell, job)]."""
    from bench.locks import cell_lock_path, is_locked
    from bench.records import table_dir
    from bench.runner import reuse_record
    from bench.workers import visible_gpus

    require_distributed(opts.gpus_per_cell)
    if not cells:
        return []
    table = cells[0]["table"]
    todo = []
    for cell in cells:
        rec = reuse_record(paths.output, cell)
        if rec is not None:
            log(f"{table}::{cell['cell_id']} {WORD.get(rec['status'], rec['status'])} (reused)")
            continue
        if is_locked(cell_lock_path(paths.output, table, cell["hash"])):
            log(f"{table}::{cell['cell_id']} is being computed by another process: its job will wait for it")
        todo.append(cell)
    if not todo:
        return []
    folder = table_dir(paths.output, table) / "jobs"
    # slurm: one folder per job (jobs/<id>/); local: flat (its controller would also create a literal "%j")
    job_folder = folder / "%j" if opts.launcher == "slurm" else folder
    executor = make_executor(opts, job_folder, table)
    abs_paths = {k: str(Path(getattr(paths, k)).expanduser().resolve())
                 for k in ("data_root", "checkpoints", "cache", "output")}
    env = {k: v for k, v in os.environ.items() if k == "BENCH_TABLES"}
    slots = None
    if opts.launcher == "local":
        n = max(1, int(opts.max_parallel or 1))
        slots = {"folder": str(folder / "slots"), "n": n,
                 "gpus": visible_gpus() if any(c.get("device") == "cuda" for c in todo) else []}
    jobs = []
    with executor.batch():
        for cell in todo:
            jobs.append(executor.submit(CellJob(cell, abs_paths, env, opts.gpus_per_cell, slots, train_options)))
    host = socket.gethostname()
    entries = [{"launcher": opts.launcher, "job_id": str(j.job_id), "cell_id": c["cell_id"], "hash": c["hash"],
                "profile": c["profile"], "device": c.get("device"), "host": host, "folder": str(job_folder),
                "submitted_utc": _utc(), "gpus_per_cell": opts.gpus_per_cell} for c, j in zip(todo, jobs)]
    where = record_jobs(paths.output, table, entries)
    for c, j in zip(todo, jobs):
        log(f"{table}::{c['cell_id']} submitted: {opts.launcher} job {j.job_id}")
    log(f"{len(jobs)} job(s) submitted ({opts.launcher}); job ids: {where}; logs: {folder}")
    return list(zip(todo, jobs))


def wait(submitted: list, log=print, poll_s: float = 1.0) -> int:
    """Wait for the jobs; print one line per cell as its job ends. Returns the number of cells that did not
    end well (a failed or error cell, or a job that ended without a result: killed, cancelled)."""
    pending = list(submitted)
    bad = 0
    while pending:
        still = []
        for cell, job in pending:
            if not job.done():
                still.append((cell, job))
                continue
            name = f"{cell['table']}::{cell['cell_id']}"
            try:
                res = job.result()
            except Exception as e:   # noqa: BLE001 - the job crashed, was killed or cancelled
                bad += 1
                last = [ln for ln in str(e).strip().splitlines() if ln.strip()]
                log(f"{name} FAILED (job {job.job_id} ended without a record: {last[-1] if last else type(e).__name__})")
                continue
            word = WORD.get(res["status"], res["status"])
            bad += res["status"] in ("fail", "error")
            log(f"{name} {word}" + (" (reused)" if res.get("reused") else "") + f" [job {job.job_id}]"
                + (f": {res['reason']}" if res.get("reason") and res["status"] in ("fail", "error") else ""))
        pending = still
        if pending:
            time.sleep(poll_s)
    return bad


def keyword_filter(cells: list, expr: str | None) -> list:
    """The cells a pytest `-k` expression selects (case-insensitive substrings of the cell id, its table and
    method, as pytest matches item names and markers)."""
    if not expr:
        return cells
    try:
        from _pytest.mark.expression import Expression
        compiled = Expression.compile(expr)
    except Exception as e:   # noqa: BLE001 - a syntax error in the expression
        raise BenchError(f"-k {expr!r}: {e}") from None
    out = []
    for c in cells:
        names = [c["cell_id"].lower(), c["table"].lower(), c["method"].lower()]
        if compiled.evaluate(lambda n, **kw: any(n.lower() in x for x in names)):
            out.append(c)
    return out
