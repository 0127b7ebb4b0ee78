"""Locks that let many processes (pytest-xdist workers, two terminals, cluster jobs) share one output folder
and one cache: each cell is computed once, each dense model trained once.

- a **cell lock** `records/<hash>.lock` is held while the cell runs; a second process that reaches the same
  cell waits for it, then finds the finished record and reuses it (`run_cell_once`). Who holds it is written
  next to it (`records/<hash>.owner`, JSON: pid, host, xdist worker, job id, since) for `bench status`;
- a **dense lock** `<cache>/dense/<model>-<hash>.lock` is held while a dense model is trained (or finetuned)
  and written to the cache; the others wait, then load it.

The locks are `filelock.FileLock`s: fcntl/flock locks on Linux, which the kernel drops when the holding
process dies (even kill -9), so a lock file left behind by a dead process never blocks: it is only a file,
and the next process takes the lock at once. (A filesystem without flock makes filelock fall back to its
soft locks, which record the holder's pid and break the lock of a dead one.) On a cluster the output folder
must be on a file system with working locks across nodes (NFSv4, Lustre with `flock`, GPFS, BeeGFS).
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Callable

from filelock import FileLock, Timeout

WAIT_LOG_EVERY_S = 60.0


def job_id() -> str | None:
    """The id of the cluster / submitit job this process runs in, if any."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or env.get("SUBMITIT_LOCAL_JOB_ID")


def runner_identity() -> dict:
    """Who computes: written into every record (`runner`) and into the owner file of a held cell lock."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "worker": os.environ.get("PYTEST_XDIST_WORKER"),
            "job_id": job_id(), "launcher": os.environ.get("SUBMITIT_EXECUTOR") or ("xdist" if os.environ.get(
                "PYTEST_XDIST_WORKER") else None)}


def lock_path_for(target: Path) -> Path:
    """The lock file of a file or folder: `<target>.lock` next to it (`records/<hash>.json` -> `records/<hash>.lock`)."""
    target = Path(target)
    return target.with_suffix(".lock") if target.suffix == ".json" else target.with_name(target.name + ".lock")


def owner_path_for(lock: Path) -> Path:
    return Path(lock).with_suffix(".owner")


def is_locked(lock: Path) -> bool:
    """Whether a live process holds this lock now (a leftover lock file of a dead process is not held)."""
    lock = Path(lock)
    if not lock.exists():
        return False
    probe = FileLock(str(lock), thread_local=False)
    try:
        probe.acquire(blocking=False)
    except Timeout:
        return True
    except OSError:
        return False
    probe.release()
    return False


def read_owner(lock: Path) -> dict | None:
    try:
        return json.loads(owner_path_for(lock).read_text())
    except (OSError, ValueError):
        return None


def _describe(owner: dict | None) -> str:
    if not owner:
        return "another process"
    where = f"pid {owner.get('pid')} on {owner.get('host')}"
    extra = [f"worker {owner['worker']}" if owner.get("worker") else None,
             f"job {owner['job_id']}" if owner.get("job_id") else None]
    extra = [e for e in extra if e]
    return where + (f" ({', '.join(extra)})" if extra else "")


@contextlib.contextmanager
def held(lock: Path, what: str, log: Callable[[str], None] | None = None, write_owner: bool = False):
    """Hold `lock` for the block, waiting for it as long as it takes (the holder is named in the log, every
    minute). Yields the seconds waited. `write_owner`: write who holds it next to it while held."""
    lock = Path(lock)
    lock.parent.mkdir(parents=True, exist_ok=True)
    fl = FileLock(str(lock), thread_local=False)
    t0 = time.perf_counter()
    try:
        fl.acquire(blocking=False)
    except Timeout:
        if log:
            log(f"waiting for {what}: {_describe(read_owner(lock))} holds it")
        while True:
            try:
                fl.acquire(timeout=WAIT_LOG_EVERY_S)
                break
            except Timeout:
                if log:
                    log(f"still waiting for {what} ({time.perf_counter() - t0:.0f} s): "
                        f"{_describe(read_owner(lock))} holds it")
    waited = time.perf_counter() - t0
    owner = owner_path_for(lock)
    try:
        if write_owner:
            from bench.structure import write_json_atomic
            write_json_atomic(owner, {**runner_identity(), "what": what,
                                      "since_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        yield waited
    finally:
        if write_owner:
            with contextlib.suppress(OSError):
                owner.unlink()
        fl.release()


def cell_lock_path(output: Path, table: str, h: str) -> Path:
    from bench.records import record_path
    return lock_path_for(record_path(output, table, h))


def run_cell_once(cfg: dict, session, on_start: Callable[[], None] | None = None,
                  force: bool = False) -> tuple[dict, bool]:
    """The cell's record and whether it was reused: a finished record is reused; otherwise the cell lock is
    taken (waiting while another process computes the cell), the record is looked for again (the other
    process may have finished it meanwhile) and only then is the cell run (`on_start()` first). An `error`
    record is recomputed, and so is every cell with `force` (bench run --force)."""
    from bench import distributed as dist
    from bench.runner import reuse_record
    if dist.is_distributed():
        return _run_cell_once_distributed(cfg, session, on_start, force)
    output = session.paths.output
    rec = reuse_record(output, cfg, force)
    if rec is not None:
        return rec, True
    return _compute_under_lock(cfg, session, on_start, force)


def _compute_under_lock(cfg: dict, session, on_start, force: bool, tell=None) -> tuple[dict, bool]:
    """Hold the cell's lock, look for its record once more (another process may have finished it while this one
    waited; `tell(record or None)` passes what was found on, e.g. to the other ranks), else run the cell."""
    from bench.runner import reuse_record, run_cell
    output = session.paths.output
    lock = cell_lock_path(output, cfg["table"], cfg["hash"])
    with held(lock, f"cell {cfg['table']}::{cfg['cell_id']}", log=session.log, write_owner=True) as waited:
        rec = reuse_record(output, cfg, force)
        if tell is not None:
            tell(rec)
        if rec is not None:
            session.log(f"{cfg['cell_id']}: computed by another process while this one waited ({waited:.0f} s): reused")
            return rec, True
        if on_start is not None:
            on_start()
        return run_cell(cfg, session), False


def _run_cell_once_distributed(cfg: dict, session, on_start, force: bool = False) -> tuple[dict, bool]:
    """`run_cell_once` of a data-parallel run (torchrun): rank 0 alone looks for the record and holds the cell
    lock, and tells the others (a broadcast) whether to reuse its record or to run the cell with it."""
    from bench import distributed as dist
    from bench.runner import reuse_record, run_cell
    output = session.paths.output
    if not dist.is_main():
        rec = dist.broadcast_object(None)
        return (rec, True) if rec is not None else (run_cell(cfg, session), False)
    rec = reuse_record(output, cfg, force)
    if rec is not None:
        return dist.broadcast_object(rec), True
    return _compute_under_lock(cfg, session, on_start, force, tell=dist.broadcast_object)


def slot(folder: Path, n: int, poll_s: float = 0.5) -> "contextlib.AbstractContextManager[int]":
    """One of `n` slots (`<folder>/slot-<i>.lock`): at most n holders at once (local jobs share the machine).
    Yields the slot index (used to pick the job's GPU)."""
    return _slot(Path(folder), max(1, int(n)), poll_s)


@contextlib.contextmanager
def _slot(folder: Path, n: int, poll_s: float):
    folder.mkdir(parents=True, exist_ok=True)
    locks = [FileLock(str(folder / f"slot-{i}.lock"), thread_local=False) for i in range(n)]
    got = None
    while got is None:
        for i, fl in enumerate(locks):
            try:
                fl.acquire(blocking=False)
            except Timeout:
                continue
            got = i
            break
        else:
            time.sleep(poll_s)
    try:
        yield got
    finally:
        locks[got].release()
