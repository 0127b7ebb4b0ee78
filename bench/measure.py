"""Measuring: parameters, MACs ("FLOPs" in the fvcore convention), throughput, peak memory, environment.

Conventions (DESIGN.md, "Measuring conventions"; anchors §2.4, §2.5):

- **MACs** are counted as fvcore counts them: one multiply-accumulate = 1 "FLOP"; linear, matmul, bmm and
  conv count their MACs, bias adds are free; both attention matmuls are counted, also when they run inside
  a fused `scaled_dot_product_attention` kernel (fvcore itself drops SDPA: it has no handler); LayerNorm,
  GroupNorm and InstanceNorm count `numel(input) * 5` with an affine weight and `* 4` without; BatchNorm
  counts `numel * 2` (affine) / `* 1` at inference and `* 5` / `* 4` in training mode; bilinear upsampling
  counts `4 * numel(output)`, nearest `1 * numel(output)`, adaptive average pooling `numel(input)`,
  grid_sample `4 * numel(output)`. Element-wise ops (add, GELU, softmax, scaling) are free, as in fvcore.
  Causal masks are ignored (the full L x S score matrix is counted), as fvcore and torch's counter do.
- The counter is a `TorchDispatchMode`, so it runs on the `meta` device: paper-size models are counted
  with no weights and no memory. It runs the model in eval mode under `torch.inference_mode()`, where
  composite ops (`aten.linear`, `aten.matmul`, `aten.layer_norm`, `aten.scaled_dot_product_attention`,
  `aten.adaptive_avg_pool2d`...) reach the mode before they are decomposed, which is the granularity of
  fvcore's JIT graph. Ops without a formula that can be decomposed (einsum, ...) are decomposed inside the
  mode and their parts counted; the low-level variants (addmm, bmm, native_layer_norm, every SDPA
  backend kernel, native_batch_norm...) have formulas too, so a caller that is only in `no_grad` (where
  autograd decomposes composites first) gets the same number.
- **Throughput** follows timm's `benchmark.py` (InferenceBenchmarkRunner): eval mode, inference_mode,
  synthetic inputs already on the device, untimed warm-up, timed iterations with a device sync after each
  step, samples/s per trial, median over trials; AMP fp16 on CUDA by default, fp32 on CPU; on CUDA an
  out-of-memory error halves the batch size and retries.
"""
from __future__ import annotations

import contextlib
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import weakref
from collections import Counter
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# The version of the measuring code (params, FLOPs, throughput, memory): part of every cell's record hash
# (bench.runner.code_version). Bump it when a change here alters a measured number.
MEASURE_VERSION = 1

aten = torch.ops.aten

__all__ = ["count_params", "count_macs", "arch_flops", "throughput", "peak_memory", "env_info", "MacCounter",
           "LiveTensorTracker"]


# ---------------------------------------------------------------------------------------------
# parameters

def count_params(model: nn.Module) -> int:
    """All parameters of `model`; a weight shared by several modules (tied embeddings) counts once.

    Works on `meta` models. Buffers (BN running stats, masks, fixed position tables) are not parameters
    and are not counted, as in timm's `param_count` and fvcore's `parameter_count`."""
    return int(sum(p.numel() for p in model.parameters()))   # parameters() yields a shared tensor once


# ---------------------------------------------------------------------------------------------
# MAC formulas (fvcore convention: 1 multiply-accumulate = 1)

def _bind(func, args, kwargs) -> dict:
    """Arguments of an aten call by their schema names (robust to overloads and keyword use)."""
    out = {}
    for i, a in enumerate(func._schema.arguments):
        if i < len(args):
            out[a.name] = args[i]
        elif kwargs and a.name in kwargs:
            out[a.name] = kwargs[a.name]
        else:
            out[a.name] = a.default_value if a.has_default_value() else None
    return out


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _numel(t) -> int:
    return int(math.prod(t.shape))


def _mm(func, args, kwargs, out):                 # mm(a, b), _scaled_mm(a, b, ...)
    a, b = args[0], args[1]
    return a.shape[0] * a.shape[1] * b.shape[1]


def _addmm(func, args, kwargs, out):              # addmm(bias, a, b): the bias add is free (fvcore)
    a, b = args[1], args[2]
    return a.shape[0] * a.shape[1] * b.shape[1]


def _bmm(func, args, kwargs, out):                # bmm(a, b): b*n*k*m
    return _numel(args[0]) * args[1].shape[-1]


def _baddbmm(func, args, kwargs, out):            # baddbmm/addbmm(c, a, b)
    return _numel(args[1]) * args[2].shape[-1]


def _mv(func, args, kwargs, out):                 # mv(a, v), dot(a, b): numel(a)
    return _numel(args[0])


def _addmv(func, args, kwargs, out):
    return _numel(args[1])


def _matmul(func, args, kwargs, out):
    # numel(out) * k handles every matmul case (1-D, batched, broadcast). fvcore uses prod(a)*b[-1], which
    # agrees except when `a` is broadcast over b's batch dims (fvcore then undercounts).
    return _numel(_first(out)) * args[0].shape[-1]


def _linear(func, args, kwargs, out):             # linear(x, w, b): numel(out) * in_features
    return _numel(_first(out)) * args[1].shape[-1]


def _conv(transposed_arg: str | None = None, always_transposed: bool = False):
    def f(func, args, kwargs, out):
        x, w = args[0], args[1]
        transposed = always_transposed
        if transposed_arg is not None:
            transposed = bool(_bind(func, args, kwargs)[transposed_arg])
        y = _first(out)
        # fvcore conv_flop_count: batch * prod(w.shape) * prod(out spatial), or in spatial when transposed
        batched = x.dim() == w.dim()
        batch = x.shape[0] if batched else 1
        spatial = (x.shape[2:] if batched else x.shape[1:]) if transposed else \
                  (y.shape[2:] if batched else y.shape[1:])
        return batch * _numel(w) * int(math.prod(spatial))
    return f


def _sdpa(func, args, kwargs, out):
    # q (..., L, E), k (..., S, E), v (..., S, Ev): QK^T = B*L*S*E, AV = B*L*S*Ev with B = q's leading dims
    # (query heads; GQA's shared kv heads are broadcast). Causal masks are not discounted.
    q, k, v = args[0], args[1], args[2]
    L, E = q.shape[-2], q.shape[-1]
    S, Ev = k.shape[-2], v.shape[-1]
    return int(math.prod(q.shape[:-2])) * L * S * (E + Ev)


def _attn_forward_blhd(packet, cu_seqlens_arg: int):
    """Low-level `_flash_attention_forward` / `_efficient_attention_forward`: (B, L, H, D) layout.

    Dense inputs are counted here. Varlen/nested inputs (cumulative sequence lengths given) go to torch's
    own formula, halved. (torch's formula for dense `_efficient_attention_forward` reads the BLHD shape
    as BHLD, which miscounts or asserts when L != H; hence the dense case is done here.)"""
    def f(func, args, kwargs, out):
        q, k, v = args[0], args[1], args[2]
        if args[cu_seqlens_arg] is None and q.dim() == 4:
            B, L, H, E = q.shape
            return B * H * L * k.shape[1] * (E + v.shape[-1])
        from torch.utils.flop_counter import flop_registry
        return int(flop_registry[packet](*args, **(kwargs or {}), out_val=out)) // 2
    return f


def _norm(weight_arg: str):
    def f(func, args, kwargs, out):
        a = _bind(func, args, kwargs)
        x = next(iter(a.values()))
        return _numel(x) * (5 if a.get(weight_arg) is not None else 4)
    return f


def _batch_norm(training: bool | str):
    """fvcore batchnorm_flop_jit: training -> norm rule (5/4 * numel); inference -> (2 if affine else 1)."""
    def f(func, args, kwargs, out):
        a = _bind(func, args, kwargs)
        x = next(iter(a.values()))
        train = bool(a[training]) if isinstance(training, str) else training
        affine = a.get("weight") is not None
        if train:
            return _numel(x) * (5 if affine else 4)
        return _numel(x) * (2 if affine else 1)
    return f


def _out_numel(scale: int):
    def f(func, args, kwargs, out):
        return scale * _numel(_first(out))
    return f


def _in_numel(func, args, kwargs, out):
    return _numel(args[0])


def _build_formulas() -> dict:
    table = {
        # matmul family
        "mm": ("matmul", _mm), "_scaled_mm": ("matmul", _mm), "addmm": ("matmul", _addmm),
        "bmm": ("matmul", _bmm), "baddbmm": ("matmul", _baddbmm), "addbmm": ("matmul", _baddbmm),
        "mv": ("matmul", _mv), "dot": ("matmul", _mv), "vdot": ("matmul", _mv), "addmv": ("matmul", _addmv),
        "matmul": ("matmul", _matmul), "linear": ("matmul", _linear),
        # convolutions
        "convolution": ("conv", _conv("transposed")), "_convolution": ("conv", _conv("transposed")),
        "convolution_overrideable": ("conv", _conv("transposed")),
        "conv1d": ("conv", _conv()), "conv2d": ("conv", _conv()), "conv3d": ("conv", _conv()),
        "conv_transpose1d": ("conv", _conv(always_transposed=True)),
        "conv_transpose2d": ("conv", _conv(always_transposed=True)),
        "conv_transpose3d": ("conv", _conv(always_transposed=True)),
        "cudnn_convolution": ("conv", _conv()), "cudnn_convolution_transpose": ("conv", _conv(always_transposed=True)),
        "mkldnn_convolution": ("conv", _conv()), "_slow_conv2d_forward": ("conv", _conv()),
        "slow_conv3d_forward": ("conv", _conv()), "_nnpack_spatial_convolution": ("conv", _conv()),
        "slow_conv_dilated2d": ("conv", _conv()), "slow_conv_dilated3d": ("conv", _conv()),
        "slow_conv_transpose2d": ("conv", _conv(always_transposed=True)),
        "slow_conv_transpose3d": ("conv", _conv(always_transposed=True)),
        # attention: the composite op and every backend kernel it may dispatch to
        "scaled_dot_product_attention": ("attention", _sdpa),
        "_scaled_dot_product_attention_math": ("attention", _sdpa),
        "_scaled_dot_product_attention_math_for_mps": ("attention", _sdpa),
        "_scaled_dot_product_flash_attention": ("attention", _sdpa),
        "_scaled_dot_product_flash_attention_for_cpu": ("attention", _sdpa),
        "_scaled_dot_product_efficient_attention": ("attention", _sdpa),
        "_scaled_dot_product_cudnn_attention": ("attention", _sdpa),
        "_scaled_dot_product_fused_attention_overrideable": ("attention", _sdpa),
        # norms (fvcore: layer/group/instance norm = numel * (5 if affine else 4))
        "layer_norm": ("norm", _norm("weight")), "native_layer_norm": ("norm", _norm("weight")),
        "group_norm": ("norm", _norm("weight")), "native_group_norm": ("norm", _norm("weight")),
        "instance_norm": ("norm", _norm("weight")),
        "batch_norm": ("norm", _batch_norm("training")),
        "native_batch_norm": ("norm", _batch_norm("training")),
        "_native_batch_norm_legit": ("norm", _batch_norm("training")),
        "_native_batch_norm_legit_no_training": ("norm", _batch_norm(False)),
        "_batch_norm_with_update": ("norm", _batch_norm(True)),
        "_batch_norm_no_update": ("norm", _batch_norm(False)),
        "cudnn_batch_norm": ("norm", _batch_norm("training")),
        "miopen_batch_norm": ("norm", _batch_norm("training")),
        # resampling / pooling ops fvcore counts by default
        "upsample_nearest2d": ("resample", _out_numel(1)), "upsample_bilinear2d": ("resample", _out_numel(4)),
        "adaptive_avg_pool2d": ("resample", _in_numel), "_adaptive_avg_pool2d": ("resample", _in_numel),
        "grid_sampler": ("resample", _out_numel(4)), "grid_sampler_2d": ("resample", _out_numel(4)),
    }
    formulas = {}
    for name, (kind, fn) in table.items():
        packet = getattr(aten, name, None)
        if packet is not None:
            formulas[packet] = (kind, fn)
    for name, cu_arg in (("_flash_attention_forward", 3), ("_efficient_attention_forward", 4)):
        packet = getattr(aten, name, None)
        if packet is not None:
            formulas[packet] = ("attention", _attn_forward_blhd(packet, cu_arg))
    return formulas


_FORMULAS = _build_formulas()

# Ops the dispatch mode never needs to look into (shape queries).
_SKIP = {aten.size.default, aten.sym_size.default, aten.stride.default, aten.sym_stride.default,
         aten.numel.default, aten.sym_numel.default, aten.dim.default, aten.is_contiguous.default,
         aten.is_contiguous.memory_format, aten.storage_offset.default, aten.sym_storage_offset.default,
         torch.ops.prim.layout.default, torch.ops.prim.device.default}


class MacCounter(TorchDispatchMode):
    """Dispatch mode that sums MACs per aten op (fvcore convention). Use `count_macs` for models."""

    def __init__(self):
        super().__init__()
        self.by_op: Counter = Counter()
        self.by_kind: Counter = Counter()
        self.uncounted: Counter = Counter()

    @property
    def total(self) -> int:
        return int(sum(self.by_op.values()))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if isinstance(func, torch._ops.HigherOrderOperator):
            return NotImplemented
        if func in _SKIP:
            return func(*args, **kwargs)
        packet = func.overloadpacket
        entry = _FORMULAS.get(packet)
        if entry is None:
            # a composite op without a formula (einsum, bilinear, ...): count its parts
            with self:
                r = func.decompose(*args, **kwargs)
            if r is not NotImplemented:
                return r
            out = func(*args, **kwargs)
            if not func.is_view:
                self.uncounted[str(packet)] += 1
            return out
        out = func(*args, **kwargs)
        kind, fn = entry
        macs = int(fn(func, args, kwargs, out))
        self.by_op[str(packet)] += macs
        self.by_kind[kind] += macs
        return out


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Context: the model in eval mode; every module's own train/eval flag restored afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, t in flags:
            m.training = t


def count_macs(model: nn.Module, inputs: tuple, kwargs: dict | None = None) -> dict:
    """MACs of one forward of `model(*inputs, **kwargs)`, fvcore convention (see the module docstring).

    Works on any device including `meta` (build the model under `with torch.device("meta")` and give meta
    inputs). The model runs in eval mode under `torch.inference_mode()`; its train/eval flags are restored.
    Returns {"macs": int, "by_op": {aten op: macs}, "by_kind": {matmul/conv/attention/norm/resample: macs},
    "uncounted_ops": {aten op: calls}} where `uncounted_ops` lists the non-view ops that were free by
    convention (add, gelu, softmax, ...) so that a reader can see what was left out."""
    if not isinstance(inputs, (tuple, list)):
        inputs = (inputs,)
    counter = MacCounter()
    with eval_mode(model), torch.inference_mode(), counter:
        model(*inputs, **(kwargs or {}))
    return {"macs": counter.total,
            "by_op": dict(sorted(counter.by_op.items(), key=lambda kv: -kv[1])),
            "by_kind": dict(sorted(counter.by_kind.items(), key=lambda kv: -kv[1])),
            "uncounted_ops": dict(sorted(counter.uncounted.items()))}


def input_spec(inputs) -> str:
    leaves, _ = tree_flatten(inputs)
    return "+".join("x".join(str(int(s)) for s in t.shape) for t in leaves if isinstance(t, torch.Tensor))


def arch_flops(arch: str, config_overrides: dict | None = None, batch_size: int = 1,
               make_inputs: Callable | None = None) -> dict:
    """Params and MACs of a registered architecture, counted on `meta` (no weights, no memory).

    The dummy input is `batch_size x in_chans x S x S` with S = config["img_size"]; architectures without
    an image size need `make_inputs(batch_size, device) -> tuple` (the card's dummy inputs).
    Returns {"arch", "params", "macs", "input_spec", "by_op", "by_kind"}."""
    from bench.registry import MODELS

    cls, cfg = MODELS.get(arch)
    cfg = {**cfg, **(config_overrides or {})}
    adapter = cls(arch, cfg)
    meta = torch.device("meta")
    with meta:
        model = adapter.build()
    inputs = make_inputs(batch_size, meta) if make_inputs else adapter.example_inputs(batch_size, meta)
    if not isinstance(inputs, (tuple, list)):
        inputs = (inputs,)
    res = count_macs(model, tuple(inputs))
    return {"arch": arch, "params": count_params(model), "macs": res["macs"], "input_spec": input_spec(inputs),
            "by_op": res["by_op"], "by_kind": res["by_kind"]}


def protocol_flops(arch: str, config: dict, forwards: Callable) -> dict:
    """Params and the MACs of each FLOPs protocol of a card, on `meta`: `forwards(device)` returns
    {label: (args, kwargs)} (the task's flops_forwards). Returns {"params", "protocols": {label: {macs, input_spec}}}."""
    from bench.registry import MODELS

    cls, _ = MODELS.get(arch)
    adapter = cls(arch, config)
    meta = torch.device("meta")
    with meta:
        model = adapter.build()
    out = {}
    for label, (args, kwargs) in forwards(meta).items():
        out[label] = {"macs": count_macs(model, args, kwargs)["macs"], "input_spec": input_spec((args, kwargs))}
    return {"arch": arch, "params": count_params(model), "protocols": out}


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


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpu_name()


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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


# ---------------------------------------------------------------------------------------------
# environment

def _version(dist: str):
    from importlib import metadata
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _module_version(name: str):
    try:
        mod = __import__(name)
    except Exception:  # noqa: BLE001 - absent or broken installs both mean "not usable"
        return None
    return getattr(mod, "__version__", None)


def _git(*args) -> str | None:
    root = Path(__file__).resolve().parents[1]
    try:
        r = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def env_info() -> dict:
    """Versions and hardware that a result depends on (written into every record)."""
    import timm

    cuda = torch.cuda.is_available()
    sha = _git("rev-parse", "HEAD")
    dirty = None
    if sha is not None:
        status = _git("status", "--porcelain", "--untracked-files=no")
        dirty = bool(status) if status is not None else None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "transformers": _version("transformers"),
        "open_clip": _version("open_clip_torch"),
        "fvcore": _version("fvcore"),
        "bench": _version("prune-bench"),
        "git_sha": sha,
        "git_dirty": dirty,
        "cuda_available": cuda,
        "cuda_version": torch.version.cuda,          # the CUDA torch was built with
        "cudnn_version": torch.backends.cudnn.version() if cuda else None,
        "device_name": torch.cuda.get_device_name(0) if cuda else _cpu_name(),
        "cpu_name": _cpu_name(),
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "executable": sys.executable,
        "pid_cpu_count": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    }
