"""Sharing one machine between cell processes (pytest-xdist workers, local submitit jobs): which GPU(s) a
worker gets, or its share of the CPU threads, and the default number of workers."""
from __future__ import annotations

import os

# The micro default of `bench run --workers` (measured on a 2-core machine, see README "Many cells"): one
# process. Two workers on two cores were not faster for the small cards: each worker pays the imports and
# the synthetic data set again, and both wait for the dense model that every other cell needs first.
DEFAULT_WORKERS = 1


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
