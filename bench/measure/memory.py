"""Measuring: peak memory of one inference forward.

CUDA: the caching allocator's `max_memory_allocated`. CPU: the peak of live tensor bytes, tracked by
`LiveTensorTracker` (a `TorchDispatchMode`) on the storages the forward creates.
"""
from __future__ import annotations

import resource
import weakref

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from bench.measure.flops import _SKIP
from bench.measure.speed import _autocast, _resolve_precision

# ---------------------------------------------------------------------------------------------
# peak memory

def _storage_key(t: torch.Tensor):
    st = t.untyped_storage()
    return st, st.data_ptr(), st.nbytes()


def _unique_bytes(tensors) -> tuple[int, set]:
    ptrs, total = set(), 0
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.is_meta:
            continue
        _, ptr, nb = _storage_key(t)
        if ptr and ptr not in ptrs:
            ptrs.add(ptr)
            total += nb
    return total, ptrs


class LiveTensorTracker(TorchDispatchMode):
    """Tracks the bytes of tensor storages created while it is active, and their release.

    Every op output whose storage is new (not a view of, nor an in-place result on, a known storage) adds
    its storage's bytes; a `weakref.finalize` on the storage object (torch keeps one Python object per
    storage, so it dies exactly when the last tensor or view on the storage dies) subtracts them. Composite
    ops are decomposed inside the mode so that their intermediates (e.g. LayerNorm's mean/rstd) are seen.
    Scratch buffers that a kernel allocates and frees internally are not visible (a lower bound on them)."""

    def __init__(self, known_ptrs: set = frozenset()):
        super().__init__()
        self.known = set(known_ptrs)
        self.live: dict = {}
        self.current = 0
        self.peak = 0

    def _release(self, ptr: int) -> None:
        nb = self.live.pop(ptr, None)
        if nb is not None:
            self.current -= nb

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _SKIP:
            with self:
                r = func.decompose(*args, **kwargs)
            if r is not NotImplemented:
                return r
        out = func(*args, **kwargs)
        leaves, _ = tree_flatten(out)
        for t in leaves:
            if not isinstance(t, torch.Tensor) or t.is_meta:
                continue
            st, ptr, nb = _storage_key(t)
            if not ptr or ptr in self.known or ptr in self.live:
                continue
            self.live[ptr] = nb
            self.current += nb
            weakref.finalize(st, self._release, ptr).atexit = False
        self.peak = max(self.peak, self.current)
        return out


def peak_memory(model: nn.Module, inputs: tuple, device: str, precision: str = "auto") -> dict:
    """Peak memory of one inference forward (eval mode, inference_mode) in MiB.

    CUDA: `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats` (weights, inputs, activations
    and workspaces from the caching allocator); kind "cuda_max_allocated".
    CPU: the peak of live tensor bytes (kind "cpu_live_tensors"): the bytes of the parameter, buffer and
    input storages plus the largest sum of activation storages alive at once during the forward, tracked
    by `LiveTensorTracker`. Kernel-internal scratch memory and allocator overhead are not included.
    `precision` as in `throughput` ("auto": amp_fp16 on CUDA, fp32 on CPU)."""
    dev = torch.device(device)
    precision = _resolve_precision(precision, dev)
    if not isinstance(inputs, (tuple, list)):
        inputs = (inputs,)
    model.to(dev).eval()
    inputs = tuple(t.to(dev) if isinstance(t, torch.Tensor) else t for t in inputs)
    mib = 2 ** 20
    state = list(model.parameters()) + list(model.buffers())
    param_bytes, param_ptrs = _unique_bytes(state)
    input_bytes, input_ptrs = _unique_bytes(tree_flatten(inputs)[0])
    out = {"device": str(dev), "precision": precision, "params_mb": param_bytes / mib, "inputs_mb": input_bytes / mib}
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        with torch.inference_mode(), _autocast(dev, precision):
            y = model(*inputs)
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev)
        del y
        out.update(peak_mem_mb=peak / mib, activations_peak_mb=(peak - before) / mib, kind="cuda_max_allocated")
        return out
    tracker = LiveTensorTracker(param_ptrs | input_ptrs)
    with torch.inference_mode(), _autocast(dev, precision), tracker:
        y = model(*inputs)
    del y
    out.update(peak_mem_mb=(param_bytes + input_bytes + tracker.peak) / mib, activations_peak_mb=tracker.peak / mib,
               kind="cpu_live_tensors",
               max_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # process-wide, for context
    return out
