"""What SOMP, SGMP (and the baselines built like them) share: their options, magnitude scores of unit groups
and the budgeted selection of their `allocation`, both from the method toolkit (methods/_importance.py,
methods/_allocate.py). Spec: docs/specs/gohsp_vtrans_baselines.md §4.1."""
from __future__ import annotations

import math
from typing import Literal

from pydantic import Field

from bench.errors import BenchError
from bench.options import OptionsModel
from bench.structure import Structure
from methods import _allocate as allocate
from methods import _importance as importance

ALLOCATIONS = ("per_type", "per_layer", "global", "gohsp")


class BudgetOptions(OptionsModel):
    """The budget keys of every method that scores units and keeps the best at SOMP's budget (somp, sgmp, taylor,
    random, wanda_sp): which unit kinds, and how p is spread over them."""

    unit_kinds: list[Literal["head", "head_dim", "ffn", "hidden"]] = Field(
        ["head", "ffn"], min_length=1,
        description="unit kinds to prune ([head, ffn]: GOHSP's structure; [head_dim, ffn]: UPop's units)")
    allocation: Literal["per_type", "per_layer", "global", "gohsp"] = Field(
        "per_type", description="per_type: one ranking per kind, p of its params; per_layer: p of every group; "
                                "global: one ranking, scores / sqrt(params per unit); gohsp: GOHSP's unit budgets")
    head_budget: Literal["per_block", "global"] = Field(
        "per_block", description="allocation gohsp: heads removed per block, or one ranking across blocks")
    attn_split: Literal["geometric", "heads_only"] = Field(
        "geometric", description="allocation gohsp: heads and head-dims keep sqrt(1-q) each, or heads only")
    ffn_budget: Literal["global", "per_layer"] = Field(
        "global", description="allocation gohsp: one ranking of all FFN neurons, or the same count per layer")


class MagnitudeOptions(BudgetOptions):
    """The card's `method_options.somp` / `method_options.sgmp` block."""

    norm: Literal["l1", "l2"] = Field("l2", description="norm of the weights a unit owns, its score")


def unit_scores(model, structure: Structure, norm: str = "l2") -> dict:
    """Per group: the norm of all the weights each unit owns, concatenated over its slices
    (methods._importance.magnitude)."""
    return importance.magnitude(model, structure, norm)


def select_units(structure: Structure, scores: dict, p: float, allocation: str = "per_type",
                 already_removed: dict | None = None) -> dict:
    """Keep-masks that remove the lowest-scoring units until a fraction `p` of the parameters is gone.

    per_type  : one global ranking per unit kind across all layers; each kind loses p of its params.
    per_layer : every group loses p of its params.
    global    : one ranking over all kinds, scores divided by sqrt(params per unit) (docs/specs/gohsp_vtrans_baselines.md §4.1).
    The best unit of every group is never removed (min_keep). `already_removed` units stay removed
    (SGMP: no regrowth) and count toward the budget. The count picked is the one whose removed params
    are closest to the target, so the achieved ratio is within one unit of the requested one."""
    if allocation not in ALLOCATIONS:
        raise BenchError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    if allocation == "gohsp":
        raise BenchError("allocation 'gohsp' needs the model's total params: use select_for_method()")
    if allocation == "global":   # one ranking over all kinds: scores per sqrt(params per unit)
        scores = {g.name: scores[g.name].double() / math.sqrt(max(1, g.params_per_unit)) for g in structure}
    pool = {"per_type": "kind", "per_layer": "layer", "global": "global"}[allocation]
    # stable_protect False: the min_keep rule's tie-break of this selector's first version (torch's default sort)
    return allocate.select(structure, scores, allocate.Fraction(p), pool=pool, removed=already_removed,
                           stable_protect=False)


def select_for_method(ctx, structure: Structure, scores: dict, p: float, allocation: str,
                      already_removed: dict | None = None) -> dict:
    """SOMP/SGMP selection: the magnitude allocations above, or `gohsp` (GOHSP's per-kind unit budgets,
    p being a fraction of the model's total params, so the baselines keep the same structure counts)."""
    if allocation == "gohsp":
        total = sum(p_.numel() for p_ in ctx.model.parameters())
        o = ctx.options
        return allocate.select_at_budgets(structure, scores, p, total, head_budget=o.head_budget,
                                          attn_split=o.attn_split, ffn_budget=o.ffn_budget,
                                          already_removed=already_removed)
    return select_units(structure, scores, p, allocation, already_removed=already_removed)


def method_structure(ctx) -> Structure:
    """The structure of the option `unit_kinds` (ctx.options: a MagnitudeOptions)."""
    return ctx.adapter.structure(ctx.model, list(ctx.options.unit_kinds))
