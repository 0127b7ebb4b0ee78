"""Measuring: parameters and MACs ("FLOPs" in the fvcore convention), and `eval_mode`.

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
"""
from __future__ import annotations

import contextlib
import math
from collections import Counter
from typing import Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten

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

    The inputs are the adapter's `example_inputs(batch_size, device)` (an image batch for the vision
    families); other architectures need `make_inputs(batch_size, device) -> tuple` (the card's dummy inputs).
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
