"""Sharing one machine between cell processes (pytest-xdist workers, local submitit jobs): which GPU(s) a
worker gets, or its share of the CPU threads, and the default number of workers."""
from __future__ import annotations

import contextlib
import os

# `bench run` without --workers on GPUs or real data: serial (micro cells on CPU: `default_workers`)
DEFAULT_WORKERS = 1
WORKERS_ENV = "BENCH_WORKERS"   # the default of --workers when set (tests set 1)


def default_workers(cells: list, device: str) -> int:
    """`bench run` without --workers: $BENCH_WORKERS when set; else, for cells on CPU with synthetic data (the
    micro profile), one worker per core (at most one per cell): a CPU cell computes on one thread
    (`single_thread_on_cpu`), so N cores run N cells at once. Measured on the 2-core development machine, cold,
    quiet: the flagship upop_nlvr2 micro table (19 cells) took 780 s serial (2 threads) and 616 s with 2 workers.
    Anything else (GPUs, real data): 1, serial."""
    env = os.environ.get(WORKERS_ENV)
    if env:
        return max(1, int(env))
    if int(os.environ.get("WORLD_SIZE") or 1) > 1:   # under torchrun every rank runs the cells itself
        return DEFAULT_WORKERS
    if device != "cpu" or not cells or any(c.get("data_source") != "synthetic" for c in cells):
        return DEFAULT_WORKERS
    return max(1, min(cpu_cores(), len(cells)))


@contextlib.contextmanager
def single_thread_on_cpu(device: str):
    """A context in which torch computes on one intra-op thread when `device` is the CPU (else it changes
    nothing). A cell's result must not depend on the machine's core count: the order of a multi-threaded float
    reduction does, and the micro NLVR2 dense model (same code, seed and data) reached 65.75 dev accuracy with 2
    threads and 76.50 with 1. Parallelism on CPU comes from workers (one cell per core) instead."""
    import torch
    if str(device).split(":")[0] != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cpu_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def visible_gpus() -> list:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES entries (ids or UUIDs); [] without CUDA."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    import torch
    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def gpus_for(index: int, gpus: list, per_worker: int = 1) -> list:
    """The GPUs of worker `index`: `per_worker` consecutive ones, wrapping around (more workers than GPUs:
    they share)."""
    if not gpus:
        return []
    return [gpus[(index * per_worker + k) % len(gpus)] for k in range(max(1, per_worker))]


def pin_gpus(gpus: list) -> None:
    """CUDA_VISIBLE_DEVICES for this process: call it before anything initialises CUDA here."""
    import sys
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        import warnings
        warnings.warn("CUDA was initialised before this worker's GPU was chosen: CUDA_VISIBLE_DEVICES has no effect")
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)


def share_cpu(n_workers: int) -> int:
    """torch's intra-op threads for one of `n_workers` processes on this machine: cores // n (at least 1, and
    never more than OMP_NUM_THREADS / torch's current setting). Returns the number set."""
    import torch
    threads = max(1, min(torch.get_num_threads(), cpu_cores() // max(1, n_workers)))
    torch.set_num_threads(threads)
    return threads
