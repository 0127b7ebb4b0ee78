"""Unit importance, the criterion half of a pruning method (after Torch-Pruning's `importance.py`).

Every function works from the structure alone (a unit group's slices of its parameters), so no method names a
module:
  magnitude(...)            the l1 / l2 norm of all the weights a unit owns, over all its slices
  taylor(...)               first-order Taylor |w * dL/dw| summed over the weights a unit owns (needs .grad)
  unit_input_hooks(...)     ONE generic forward hook: every module whose weight a group cuts along its INPUT
                            dimension hands its input, viewed per unit, to a callback (GOHSP's per-head outputs,
                            Wanda's input norms, any activation statistic)
  input_sq_norms(...)       that hook accumulating the squared input of every weight the structure cuts
  wanda(...)                |W_ij| ||X_j|| (Sun et al. 2024) summed over the weights a unit owns
  calibrate(...)            runs calibration batches through the task's own loss (no grad, eval mode, buffers
                            such as momentum queues restored), so a method never unpacks a batch
Lower scores are removed first by methods/_allocate.py.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

from bench.errors import BenchError
from bench.structure import Structure


def _unit_rows(t: torch.Tensor, s, size: int) -> torch.Tensor:
    """The tensor `t` of slice `s` as (units, everything else)."""
    t = t.movedim(s.dim, 0).reshape(*s.view, -1)          # (view..., rest)
    return t.movedim(s.axis, 0).reshape(size, -1)         # (units, everything else)


def _tensors(model_or_tensors) -> dict:
    if isinstance(model_or_tensors, dict):
        return model_or_tensors
    return dict(model_or_tensors.named_parameters())


@torch.no_grad()
def magnitude(model_or_tensors, structure: Structure, norm: str = "l2") -> dict:
    """Per group: the norm of all the weights each unit owns, concatenated over its slices (float64, CPU).
    `model_or_tensors`: a model, or {parameter name: tensor} (e.g. GOHSP's W + U)."""
    if norm not in ("l1", "l2"):
        raise BenchError(f"norm must be 'l1' or 'l2', got {norm!r}")
    params = _tensors(model_or_tensors)
    out = {}
    for g in structure:
        acc = torch.zeros(g.size, dtype=torch.float64)
        for s in g.slices:
            t = _unit_rows(params[s.param].detach().to("cpu", torch.float64), s, g.size)
            acc += t.abs().sum(1) if norm == "l1" else t.pow(2).sum(1)
        out[g.name] = acc if norm == "l1" else acc.sqrt()
    return out


@torch.no_grad()
def per_unit_sum(model: nn.Module, structure: Structure, weight_fn) -> dict:
    """Per group: sum over the weights each unit owns of `weight_fn(param)` (a tensor of the param's shape, float64
    on CPU), skipping the params for which it returns None."""
    params = dict(model.named_parameters())
    out = {}
    for g in structure:
        acc = torch.zeros(g.size, dtype=torch.float64)
        for s in g.slices:
            t = weight_fn(params[s.param])
            if t is not None:
                acc += _unit_rows(t, s, g.size).sum(1)
        out[g.name] = acc
    return out


def taylor(model: nn.Module, structure: Structure) -> dict:
    """Per group: sum over the weights each unit owns of |w * grad| (first-order Taylor, Molchanov et al. 2019;
    Torch-Pruning's TaylorImportance), from the `.grad` the caller accumulated (a unit whose weights have no
    grad scores 0)."""
    return per_unit_sum(model, structure, lambda p: None if p.grad is None else (
        p.detach().to("cpu", torch.float64) * p.grad.detach().to("cpu", torch.float64)).abs())


def _module_of(model: nn.Module, param: str):
    mod_name, _, leaf = param.rpartition(".")
    return model.get_submodule(mod_name) if mod_name else model, leaf


def input_slices(model: nn.Module, structure: Structure, kinds=None) -> list:
    """[(group, slice)] for every slice that cuts a 2-D weight along a dimension its module contracts with
    the module's input (the columns of an output projection, fc2's input neurons, a hidden dim at every
    consumer). Which of a weight's two dims is its input is found on the first forward (see
    `unit_input_hooks`); here: every slice of a 2-D parameter."""
    params = dict(model.named_parameters())
    out = []
    for g in structure:
        if kinds is not None and g.kind not in kinds:
            continue
        for s in g.slices:
            if params[s.param].dim() == 2:
                out.append((g, s))
    return out


def _input_dim(weight: torch.Tensor, x: torch.Tensor, y, bias=None) -> int | None:
    """The dim of a 2-D `weight` that the module contracts with the last dim of its input `x` (nn.Linear:
    1, a transposed Conv1D: 0), or None if it takes no such input (an embedding, a norm). For a square
    weight the module's output on the first token (less its bias) decides."""
    if not torch.is_tensor(x) or not x.is_floating_point() or x.dim() < 1:
        return None
    n = x.shape[-1]
    dims = [d for d in (0, 1) if weight.shape[d] == n]
    if len(dims) == 1:
        return dims[0]
    if len(dims) != 2 or not torch.is_tensor(y) or y.shape[-1] != n:
        return None
    with torch.no_grad():
        x0 = x.reshape(-1, n)[:1].to(weight.dtype)
        y0 = y.reshape(-1, n)[:1].to(weight.dtype)
        if torch.is_tensor(bias) and bias.shape == (n,):
            y0 = y0 - bias.to(weight.dtype)
        err = [float((x0 @ weight.T - y0).abs().amax()), float((x0 @ weight - y0).abs().amax())]
    return 1 if err[0] <= err[1] else 0


@contextlib.contextmanager
def unit_input_hooks(model: nn.Module, pairs: list, callback: Callable, cuts: str = "input"):
    """While active, every forward of a module owning one of the (group, slice) pairs' weights calls
    `callback(group, slice, x, in_dim)` with the module's input x (..., in_features) and the dim `in_dim` of the
    slice's weight that the module contracts with x. cuts "input" (default): only for slices that cut that dim,
    i.e. x's last dim carries the slice's units as `slice.view` / `slice.axis`; "any": every slice of a module
    that takes a float input (the slice may cut the weight's output dim). One forward hook per module."""
    by_mod: dict = {}
    for g, s in pairs:
        mod, leaf = _module_of(model, s.param)
        by_mod.setdefault(id(mod), (mod, []))[1].append((g, s, leaf))
    handles = []
    decided: dict = {}

    for mod, items in by_mod.values():
        def hook(m, inp, out, items=items):
            if not inp:
                return
            x = inp[0]
            for g, s, leaf in items:
                key = (id(m), leaf)
                if key not in decided:
                    decided[key] = _input_dim(getattr(m, leaf), x, out, getattr(m, "bias", None))
                d = decided[key]
                if d is not None and (d == s.dim or cuts == "any"):
                    callback(g, s, x, d)
        handles.append(mod.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _preserved_buffers(model: nn.Module):
    """Buffers a forward may update (momentum queues and their pointers, running statistics) are restored."""
    saved = {n: b.detach().clone() for n, b in model.named_buffers()}
    try:
        yield
    finally:
        with torch.no_grad():
            for n, b in model.named_buffers():
                if n in saved and b.shape == saved[n].shape:
                    b.copy_(saved[n])


@torch.no_grad()
def calibrate(model: nn.Module, task, batches, n_batches: int, device) -> int:
    """Run `n_batches` of `batches` (e.g. task.train_batches(bs, seed)) through the task's loss in eval mode
    without gradients: the forward the hooks observe is the task's own, whatever its batch holds. Returns the
    number of batches run."""
    was = model.training
    model.eval()
    try:
        with _preserved_buffers(model):
            for _ in range(n_batches):
                task.loss(model, next(batches), device)
    finally:
        model.train(was)
    return n_batches


def input_sq_norms(model: nn.Module, structure: Structure, run: Callable[[], object], kinds=None) -> dict:
    """{parameter name: (input dim, sum over all calibration tokens of x^2 per input feature)} for every 2-D
    weight the structure cuts (along either dim) whose module takes a float input, while `run()` runs the
    calibration forwards. Its square root is the ||X_j||_2 of Wanda (Sun et al. 2024, eq. 1)."""
    sums: dict = {}
    first = {}
    for g, s in input_slices(model, structure, kinds):
        first.setdefault(s.param, (g, s))             # one statistic per weight, however many groups cut it

    def acc(g, s, x, in_dim):
        v = x.detach().reshape(-1, x.shape[-1]).to("cpu", torch.float64).pow(2).sum(0)
        sums[s.param] = (in_dim, v if s.param not in sums else sums[s.param][1] + v)

    with unit_input_hooks(model, list(first.values()), acc, cuts="any"):
        run()
    return sums


@torch.no_grad()
def wanda(model: nn.Module, structure: Structure, sq_norms: dict, norm: str = "l1") -> dict:
    """Per group: the Wanda scores |W_ij| ||X_j||_2 of every weight a unit owns (j: the weight's input
    feature; Sun et al. 2024, eq. 1), summed (l1) or as the root of the sum of squares (l2) over the unit's
    slices; slices of tensors without an input statistic (biases, norms, embedding tables) add nothing."""
    params = dict(model.named_parameters())
    out = {}
    for g in structure:
        acc = torch.zeros(g.size, dtype=torch.float64)
        for s in g.slices:
            if s.param not in sq_norms:
                continue
            in_dim, sq = sq_norms[s.param]
            w = params[s.param].detach().to("cpu", torch.float64).abs()
            shape = [1, 1]
            shape[in_dim] = -1
            t = _unit_rows(w * sq.sqrt().view(shape), s, g.size)
            acc += t.sum(1) if norm == "l1" else t.pow(2).sum(1)
        out[g.name] = acc if norm == "l1" else acc.sqrt()
    return out
