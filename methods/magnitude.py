"""What SOMP, SGMP (and later GOHSP's baselines) share: magnitude scores of unit groups and budgeted
selection. Spec: shared/specs/gohsp_vtrans_baselines.md §4.1."""
from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

from bench.errors import BenchError
from bench.options import OptionsModel
from bench.structure import Structure

ALLOCATIONS = ("per_type", "per_layer", "global", "gohsp")


class MagnitudeOptions(OptionsModel):
    """The card's `method_options.somp` / `method_options.sgmp` block."""

    unit_kinds: list[Literal["head", "head_dim", "ffn", "hidden"]] = Field(
        ["head", "ffn"], min_length=1,
        description="unit kinds to prune ([head, ffn]: GOHSP's structure; [head_dim, ffn]: UPop's units)")
    allocation: Literal["per_type", "per_layer", "global", "gohsp"] = Field(
        "per_type", description="per_type: one ranking per kind, p of its params; per_layer: p of every group; "
                                "global: one ranking, scores / sqrt(params per unit); gohsp: GOHSP's unit budgets")
    norm: Literal["l1", "l2"] = Field("l2", description="norm of the weights a unit owns, its score")
    head_budget: Literal["per_block", "global"] = Field(
        "per_block", description="allocation gohsp: heads removed per block, or one ranking across blocks")
    attn_split: Literal["geometric", "heads_only"] = Field(
        "geometric", description="allocation gohsp: heads and head-dims keep sqrt(1-q) each, or heads only")
    ffn_budget: Literal["global", "per_layer"] = Field(
        "global", description="allocation gohsp: one ranking of all FFN neurons, or the same count per layer")


@torch.no_grad()
def unit_scores(model, structure: Structure, norm: str = "l2") -> dict:
    """Per group: the norm of all the weights each unit owns, concatenated over its slices."""
    if norm not in ("l1", "l2"):
        raise BenchError(f"norm must be 'l1' or 'l2', got {norm!r}")
    params = dict(model.named_parameters())
    out = {}
    for g in structure:
        acc = torch.zeros(g.size, dtype=torch.float64)
        for s in g.slices:
            t = params[s.param].detach().to("cpu", torch.float64)
            t = t.movedim(s.dim, 0).reshape(*s.view, -1)          # (view..., rest)
            t = t.movedim(s.axis, 0).reshape(g.size, -1)          # (units, everything else)
            acc += t.abs().sum(1) if norm == "l1" else t.pow(2).sum(1)
        out[g.name] = acc if norm == "l1" else acc.sqrt()
    return out


def select_units(structure: Structure, scores: dict, p: float, allocation: str = "per_type",
                 already_removed: dict | None = None) -> dict:
    """Keep-masks that remove the lowest-scoring units until a fraction `p` of the parameters is gone.

    per_type  : one global ranking per unit kind across all layers; each kind loses p of its params.
    per_layer : every group loses p of its params.
    global    : one ranking over all kinds, scores divided by sqrt(params per unit) (spec §4.1).
    The best unit of every group is never removed (min_keep). `already_removed` units stay removed
    (SGMP: no regrowth) and count toward the budget. The count picked is the one whose removed params
    are closest to the target, so the achieved ratio is within one unit of the requested one."""
    if allocation not in ALLOCATIONS:
        raise BenchError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    if allocation == "gohsp":
        raise BenchError("allocation 'gohsp' needs the model's total params: use select_for_method()")
    already_removed = already_removed or {}
    if allocation == "per_type":
        pools = [[g for g in structure if g.kind == k] for k in structure.kinds()]
    elif allocation == "per_layer":
        pools = [[g] for g in structure]
    else:
        pools = [list(structure)]
    keep = {g.name: torch.ones(g.size, dtype=torch.bool) for g in structure}
    for pool in pools:
        total = sum(g.size * g.params_per_unit for g in pool)
        target = p * total
        fixed, cand = 0, []   # removed already; candidates (score, params, group, index)
        for g in pool:
            gone = already_removed.get(g.name)
            gone = torch.zeros(g.size, dtype=torch.bool) if gone is None else gone.bool()
            s = scores[g.name].double()
            if allocation == "global":
                s = s / math.sqrt(max(1, g.params_per_unit))
            order = torch.argsort(s, descending=True)
            protected = set(order[: g.min_keep].tolist())
            for i in range(g.size):
                if gone[i]:
                    keep[g.name][i] = False
                    fixed += g.params_per_unit
                elif i not in protected:
                    cand.append((float(s[i]), g.params_per_unit, g.name, i))
        cand.sort(key=lambda c: c[0])
        removed, best_k, best_err = fixed, 0, abs(target - fixed)
        for k, c in enumerate(cand, 1):
            removed += c[1]
            if abs(target - removed) < best_err:
                best_k, best_err = k, abs(target - removed)
            if removed > target:
                break
        for c in cand[:best_k]:
            keep[c[2]][c[3]] = False
    return keep


def select_for_method(ctx, structure: Structure, scores: dict, p: float, allocation: str,
                      already_removed: dict | None = None) -> dict:
    """SOMP/SGMP selection: the magnitude allocations above, or `gohsp` (GOHSP's per-kind unit budgets,
    p being a fraction of the model's total params, so the baselines keep the same structure counts)."""
    if allocation == "gohsp":
        from methods.gohsp import select_at_budgets
        total = sum(p_.numel() for p_ in ctx.model.parameters())
        o = ctx.options
        return select_at_budgets(structure, scores, p, total, head_budget=o.head_budget, attn_split=o.attn_split,
                                 ffn_budget=o.ffn_budget, already_removed=already_removed)
    return select_units(structure, scores, p, allocation, already_removed=already_removed)


def method_structure(ctx) -> Structure:
    """The structure of the option `unit_kinds` (ctx.options: a MagnitudeOptions), also set as ctx.structure."""
    kinds = list(ctx.options.unit_kinds)
    st = ctx.adapter.structure(ctx.model, kinds)
    ctx.structure = st
    return st
