"""Measuring: inference throughput (and batch-1 latency).

  autograd decomposes composites first) gets the same number.
- **Throughput** follows timm's `benchmark.py` (InferenceBenchmarkRunner): eval mode, inference_mode,
  synthetic inputs already on the device, untimed warm-up, timed iterations with a device sync after each
  step, samples/s per trial, median over trials; AMP fp16 on CUDA by default, fp32 on CPU; on CUDA an

Also here: the precision names and their autocast, the device sync, the out-of-memory test and retry
(shared with `bench.measure.memory`).
"""
from __future__ import annotations

import contextlib
import statistics
import time
from typing import Callable

import torch
from torch import nn

from bench.measure.env import _device_name

# ---------------------------------------------------------------------------------------------
# throughput (timm benchmark.py protocol)

_PRECISIONS = {"fp32": None, "amp_fp16": torch.float16, "amp_bf16": torch.bfloat16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type != "cpu":
        mod = getattr(torch, device.type, None)
        if mod is not None and hasattr(mod, "synchronize"):
            mod.synchronize()


def _autocast(device: torch.device, precision: str):
    dtype = _PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "amp_fp16" if device.type == "cuda" else "fp32"
    aliases = {"amp": "amp_fp16", "float32": "fp32", "amp_bfloat16": "amp_bf16"}
    precision = aliases.get(precision, precision)
    if precision not in _PRECISIONS:
        raise ValueError(f"precision {precision!r} not in {['auto', *_PRECISIONS]}")
    return precision


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    msg = str(e).lower()
    # the strings timm's check_batch_size_retry treats as batch-size related
    return isinstance(e, RuntimeError) and ("out of memory" in msg or "cudnn_status" in msg
                                            or "cublas_status_alloc_failed" in msg)


def _timed_steps(model, inputs, device, precision, n: int) -> list:
    """n forward steps, each followed by a device sync; returns per-step seconds."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        with _autocast(device, precision):
            model(*inputs)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def _run_trials(model, inputs, device, precision, batch_size, warmup, iters, trials):
    _timed_steps(model, inputs, device, precision, warmup)           # untimed warm-up
    sps, step_ms = [], []
    for _ in range(trials):
        _sync(device)
        t_start = time.perf_counter()
        steps = _timed_steps(model, inputs, device, precision, iters)
        elapsed = time.perf_counter() - t_start
        sps.append(batch_size * iters / elapsed)
        step_ms.extend(1000.0 * s for s in steps)
    return sps, step_ms


def _retry_on_oom(run: Callable, batch_size: int, retry: bool = True):
    """run(batch_size); on an out-of-memory error halve the batch size and try again (timm's _try_run with
    a halving decay). Returns (result, batch size used, [error messages of the failed tries])."""
    errors = []
    bs = batch_size
    while bs >= 1:
        try:
            return run(bs), bs, errors
        except Exception as e:  # noqa: BLE001 - only OOM-like errors are retried
            if not retry or not _is_oom(e):
                raise
            errors.append(f"batch {bs}: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        bs //= 2
    raise RuntimeError(f"out of memory even at batch size 1: {errors[-1] if errors else ''}")


def throughput(model: nn.Module, make_inputs: Callable, device: str, batch_size: int, precision: str = "auto",
               warmup: int = 10, iters: int = 40, trials: int = 3, threads: int | None = None) -> dict:
    """Inference samples/s following timm's benchmark.py (InferenceBenchmarkRunner).

    `model` is moved to `device` and put in eval mode (it stays there). `make_inputs(batch_size, device)`
    returns the positional inputs, created once per batch size outside the timed region. Each trial runs
    `iters` timed steps (forward + device sync); the reported number is the median over `trials` of
    batch_size * iters / elapsed. Precision "auto" = "amp_fp16" (autocast) on CUDA, "fp32" on CPU; also
    "fp32", "amp_fp16", "amp_bf16". On CUDA cudnn.benchmark is switched on (and restored), the TF32 state
    is recorded, and an out-of-memory error halves the batch size and retries (timm's decay); the batch
    size actually used is returned. Batch-1 latency (median ms of single synced steps) is measured too.
    `threads` sets torch's intra-op CPU threads for the measurement (restored afterwards); on a loaded
    machine fewer threads than cores avoids OpenMP barrier stalls (seen: 2 threads on 2 busy cores made a
    4 ms forward take 350 ms). The thread count used is always recorded."""
    dev = torch.device(device)
    precision = _resolve_precision(precision, dev)
    model.to(dev).eval()
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    result = {"device": str(dev), "device_name": _device_name(dev), "precision": precision,
              "requested_batch_size": batch_size, "iters": iters, "warmup": warmup, "trials": trials,
              "threads": torch.get_num_threads(), "tf32": None, "cudnn_benchmark": None}
    old_benchmark = torch.backends.cudnn.benchmark
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        result["cudnn_benchmark"] = True
        result["tf32"] = {"matmul": torch.backends.cuda.matmul.allow_tf32,
                          "cudnn": torch.backends.cudnn.allow_tf32,
                          "float32_matmul_precision": torch.get_float32_matmul_precision()}
    try:
        def run(bs):
            inputs = tuple(make_inputs(bs, dev))
            with torch.inference_mode():
                return _run_trials(model, inputs, dev, precision, bs, warmup, iters, trials)

        (sps, step_ms), bs, result["oom_errors"] = _retry_on_oom(run, batch_size, retry=dev.type == "cuda")
        result.update(throughput_sps=statistics.median(sps), trials_sps=sps, batch_size=bs,
                      step_ms=statistics.median(step_ms))
        # batch-1 latency
        inputs = tuple(make_inputs(1, dev))
        with torch.inference_mode():
            _timed_steps(model, inputs, dev, precision, warmup)
            lat = [1000.0 * t for _ in range(trials) for t in _timed_steps(model, inputs, dev, precision, iters)]
        result["latency_ms_bs1"] = statistics.median(lat)
    finally:
        if dev.type == "cuda":
            torch.backends.cudnn.benchmark = old_benchmark
        if threads is not None:
            torch.set_num_threads(old_threads)
    return result
