"""Budgeted unit selection, the allocation half of a pruning method (after Torch-Pruning's pruner / importance
split): ONE selector, `select(groups, scores, budget, ...)`, for every method of the suite.

Convention: `scores[group]` is one importance per unit, HIGHER = kept first (pass -x for a criterion where
high means prune, e.g. UPop's mask gradients or VTrans's log alpha). Ties are broken by the groups' order and
then the unit index (stable), except where a method's historical rule is kept (`stable_protect=False`).

Budgets (what is removed from each pool):
  Fraction(p)          p of the pool's params (each unit costs its group's params_per_unit): the prefix of the
                       lowest units whose removed params are closest to p x total (SOMP / SGMP)
  Count(n)             n units of the pool, or {group: n} per group (GOHSP's unit counts, UPop's uniform
                       ablation)
  Weighted(p, w, rule) the weighted threshold of UPop: the rank position whose cumulative weight (w per unit of a
                       group) is closest to p x total weight; units below the threshold value are removed
                       ("official": the unit at the threshold is kept; "closest": it goes too)
  Size(size_fn, t)     the units are KEPT best first until size_fn(kept fractions) is closest to t, size_fn
                       being any (non-additive) model of the size (VTrans's params / MACs polynomial)
Pools (`pool=`): "kind" (one ranking per unit kind across layers), "layer" (every group alone), "global"
(one ranking over all groups), or a list of lists of groups.
Keep-at-least (`keep_at_least=`): "exclude" (default: every group's min_keep best units are never candidates),
"restore" (the budget is counted over all units, then a group's best-scoring selected units are kept back:
UPop's official rule), or None.
`removed={group: bool tensor}` units stay removed and count toward the budget (SGMP: no regrowth).

Also GOHSP's unit-count plan for a fraction of the TOTAL params (`gohsp_plan`, `select_at_budgets`), shared
by GOHSP and by SOMP/SGMP's `allocation: gohsp`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch

from bench.errors import BenchError
from bench.structure import Structure


@dataclass(frozen=True)
class Fraction:
    p: float


@dataclass(frozen=True)
class Count:
    n: int | dict


@dataclass(frozen=True)
class Weighted:
    p: float
    weights: dict                      # group name -> weight of one of its units
    rule: Literal["official", "closest"] = "official"


@dataclass(frozen=True)
class Size:
    size_fn: Callable[[dict], float]   # {group: kept fraction} -> size
    target: float
    fill: int = 5000                   # units past the boundary tried when the boundary unit is large


def pools_of(groups: list, pool) -> list:
    if pool == "kind":
        kinds = sorted({g.kind for g in groups})
        return [[g for g in groups if g.kind == k] for k in kinds]
    if pool == "layer":
        return [[g] for g in groups]
    if pool == "global":
        return [list(groups)]
    if isinstance(pool, (list, tuple)):
        return [list(p) for p in pool]
    raise BenchError(f"pool must be 'kind', 'layer', 'global' or a list of group lists, got {pool!r}")


def protected(score: torch.Tensor, n: int, stable: bool = True) -> set:
    """The keep-at-least rule: indices of the n best units of a group."""
    return set(torch.argsort(score, descending=True, stable=stable)[:n].tolist())


def select(groups, scores: dict, budget, *, pool="global", removed: dict | None = None,
           keep_at_least: Literal["exclude", "restore"] | None = "exclude", stable_protect: bool = True,
           info: dict | None = None) -> dict:
    """Keep-masks {group: bool (size,)} for `budget` (see the module docstring). `info`, if given, receives
    "protected": {group: bool mask} of the units the keep-at-least rule kept ("restore"), and "achieved" (Size)."""
    groups = list(groups)
    removed = {k: v.bool() for k, v in (removed or {}).items()}
    if isinstance(budget, Weighted):
        return _weighted(groups, scores, budget, keep_at_least, info)
    if isinstance(budget, Size):
        return _size(groups, scores, budget, keep_at_least, info)
    if not isinstance(budget, (Fraction, Count)):
        raise BenchError(f"unknown budget {budget!r}")
    keep = {g.name: torch.ones(g.size, dtype=torch.bool) for g in groups}
    for pl in pools_of(groups, pool):
        fixed, n_fixed, cand = 0, 0, []     # removed already (params, units); candidates (score, cost, group, i)
        for g in pl:
            s = scores[g.name].double()
            prot = protected(s, g.min_keep, stable_protect) if keep_at_least == "exclude" else set()
            gone = removed.get(g.name)
            for i in range(g.size):
                if gone is not None and bool(gone[i]):
                    keep[g.name][i] = False
                    fixed += g.params_per_unit
                    n_fixed += 1
                elif i not in prot:
                    cand.append((float(s[i]), getattr(g, "params_per_unit", 0), g.name, i))
        cand.sort(key=lambda c: c[0])
        if isinstance(budget, Count):
            n = budget.n if not isinstance(budget.n, dict) else sum(budget.n.get(g.name, 0) for g in pl)
            k = max(0, n - n_fixed)
        else:
            target = budget.p * sum(g.size * g.params_per_unit for g in pl)
            acc, k, best_err = fixed, 0, abs(target - fixed)
            for j, c in enumerate(cand, 1):
                acc += c[1]
                if abs(target - acc) < best_err:
                    k, best_err = j, abs(target - acc)
                if acc > target:
                    break
        for c in cand[:k]:
            keep[c[2]][c[3]] = False
    return keep


def _weighted(groups, scores, budget: Weighted, keep_at_least, info) -> dict:
    """UPop's unified weighted ranking (docs/specs/upop.md §3.3-3.5): threshold at the position closest to p x total weight."""
    names = [g.name for g in groups]
    vals = torch.cat([scores[n] for n in names])
    w = torch.cat([torch.full((scores[n].numel(),), budget.weights[n], dtype=torch.float64) for n in names])
    order = torch.argsort(vals, stable=True)
    cum = torch.cumsum(w[order], 0)
    idx = int(torch.argmin((cum - budget.p * w.sum()).abs()))
    threshold = vals[order][idx]
    keep, prot = {}, {}
    for n in names:
        v = scores[n]
        sel = v < threshold if budget.rule == "official" else v <= threshold
        prot[n] = sel & (v == v.max()) if keep_at_least == "restore" else torch.zeros_like(sel)
        keep[n] = ~(sel & ~prot[n])
    if info is not None:
        info["protected"] = prot
    return keep


def _size(groups, scores, budget: Size, keep_at_least, info) -> dict:
    """VTrans's exact budget: keep the best units first (every group its min_keep best; sublayer gates, kind
    "layer", may all go) until the size is closest to the target; when the unit at the boundary is large, the
    next `fill` units in rank order that still fit below the target may be kept instead, if that lands closer."""
    size_fn, target, fill = budget.size_fn, budget.target, budget.fill
    forced, cand = {}, []
    for gi, g in enumerate(groups):
        s = scores[g.name].detach().double().cpu().view(-1)
        order = torch.argsort(s, descending=True, stable=True)
        n_force = 0 if (g.kind == "layer" or keep_at_least is None) else min(g.min_keep, g.size)
        forced[g.name] = order[:n_force]
        for i in order[n_force:].tolist():
            cand.append((-float(s[i]), gi, i))
    cand.sort(key=lambda c: (c[0], c[1], c[2]))
    gid = torch.tensor([c[1] for c in cand], dtype=torch.long)
    base = torch.tensor([len(forced[g.name]) for g in groups], dtype=torch.float64)
    sizes = torch.tensor([g.size for g in groups], dtype=torch.float64)

    def size_at(k):
        cnt = base + torch.bincount(gid[:k], minlength=len(groups)).double()
        return float(size_fn({g.name: float(cnt[i] / sizes[i]) for i, g in enumerate(groups)}))

    lo, hi = 0, len(cand)
    while lo < hi:                          # smallest prefix k with size >= target (len(cand) if none)
        mid = (lo + hi) // 2
        if size_at(mid) >= target:
            hi = mid
        else:
            lo = mid + 1
    chosen, best = list(range(lo)), size_at(lo)
    if best != target and lo > 0 and fill > 0:
        # the prefix one unit shorter stays below the target; the following units in rank order that still
        # fit are added (a boundary unit may be large, e.g. a hidden dim); the closer of the two wins
        cnt = base + torch.bincount(gid[:lo - 1], minlength=len(groups)).double()
        extra, cur = [], size_at(lo - 1)
        for j in range(lo - 1, min(len(cand), lo - 1 + fill)):
            cnt[gid[j]] += 1
            s_new = float(size_fn({g.name: float(cnt[i] / sizes[i]) for i, g in enumerate(groups)}))
            if s_new <= target:
                extra.append(j)
                cur = s_new
            else:
                cnt[gid[j]] -= 1
        if abs(cur - target) < abs(best - target):
            chosen, best = list(range(lo - 1)) + extra, cur
    keep = {g.name: torch.zeros(g.size, dtype=torch.bool) for g in groups}
    for g in groups:
        keep[g.name][forced[g.name]] = True
    for j in chosen:
        _, gi, i = cand[j]
        keep[groups[gi].name][i] = True
    if info is not None:
        info["achieved"] = best
    return keep


# ---------------------------------------------------------------------------------------------
# GOHSP's budgets: p of the TOTAL params -> unit counts per group (GOHSP, and SOMP/SGMP `allocation: gohsp`)

def _attn_blocks(structure: Structure) -> list:
    """[(head group | None, head_dim group | None)] per attention module."""
    by_mod: dict = {}
    for g in structure:
        if g.kind in ("head", "head_dim"):
            by_mod.setdefault(g.module, {})[g.kind] = g
    return [(d.get("head"), d.get("head_dim")) for d in by_mod.values()]


def _pair_cost(h, d) -> float:
    """Params one (head, head-dim) pair owns: head ppu / d_h (= 4d+3 for timm's qkv with bias + proj)."""
    if h is not None and d is not None:
        return h.params_per_unit / d.size
    return None


def spread(total: int, caps: list) -> list:
    """Distribute `total` removals as evenly as possible over groups with the given caps."""
    n = len(caps)
    out = [0] * n
    left = total
    while left > 0:
        open_ = [i for i in range(n) if out[i] < caps[i]]
        if not open_:
            break
        share = max(1, left // len(open_))
        for i in open_:
            if left == 0:
                break
            k = min(share, caps[i] - out[i], left)
            out[i] += k
            left -= k
    return out


def gohsp_plan(structure: Structure, p_total: float, total_params: int, attn_split: str = "geometric",
               ffn_budget: str = "global") -> dict:
    """Unit counts that remove p_total x total_params (within half an FFN unit when FFN groups exist);
    attn_split and ffn_budget as the options of that name (methods.gohsp.GOHSPOptions).

    Returns {"per_group": {group: n removed}, "per_kind": {kind: n}, "target", "planned", "q"}; per_group
    head counts are the per-block split (the `global` head budget redistributes them but keeps the sum)."""
    split = attn_split
    if split not in ("geometric", "heads_only"):
        raise BenchError(f"gohsp attn_split must be 'geometric' or 'heads_only', got {split!r}")
    target = float(p_total) * float(total_params)
    blocks = _attn_blocks(structure)
    ffn = [g for g in structure if g.kind == "ffn"]
    attn_params = 0.0
    for h, d in blocks:
        g = h or d
        attn_params += g.size * g.params_per_unit
    prunable = attn_params + sum(g.size * g.params_per_unit for g in ffn)
    if prunable <= 0:
        raise BenchError("gohsp: the structure has no head, head_dim or ffn groups")
    q = target / prunable
    if not 0 <= q < 1:
        raise BenchError(f"gohsp: removing {p_total:.3f} of {total_params} params needs {q:.3f} of the prunable "
                         f"params ({prunable:.0f}); at most < 1 is possible")
    per_group: dict = {}
    removed = 0.0
    heads = [h for h, _ in blocks if h is not None]
    have_dims = any(d is not None for _, d in blocks) and split == "geometric"
    have_heads = bool(heads)
    keep_frac = math.sqrt(1 - q) if (have_dims and have_heads) else 1 - q
    if have_heads:
        A = int(round(sum(h.size for h in heads) * (1 - keep_frac)))
        for h, n in zip(heads, spread(A, [h.size - h.min_keep for h in heads])):
            per_group[h.name] = n
    for h, d in blocks:
        if d is not None:
            per_group[d.name] = min(d.size - d.min_keep, int(round(d.size * (1 - keep_frac)))) if have_dims else 0
    for h, d in blocks:
        a = per_group.get(h.name, 0) if h is not None else 0
        b = per_group.get(d.name, 0) if d is not None else 0
        if h is not None and d is not None:
            removed += _pair_cost(h, d) * (h.size * d.size - (h.size - a) * (d.size - b))
        elif h is not None:
            removed += a * h.params_per_unit
        else:
            removed += b * d.params_per_unit
    if ffn:
        ppu = sum(g.params_per_unit for g in ffn) / len(ffn)
        cap = sum(g.size - g.min_keep for g in ffn)
        n = max(0, min(cap, int(round((target - removed) / ppu))))
        if ffn_budget == "per_layer":
            counts = spread(n, [g.size - g.min_keep for g in ffn])
        else:
            counts = [None] * len(ffn)
        for g, c in zip(ffn, counts):
            per_group[g.name] = c
        per_group["_ffn_total"] = n
        removed += n * ppu
    per_kind: dict = {}
    for g in structure:
        if g.kind == "ffn":
            continue
        per_kind[g.kind] = per_kind.get(g.kind, 0) + per_group.get(g.name, 0)
    if ffn:
        per_kind["ffn"] = per_group.pop("_ffn_total")
    return {"per_group": per_group, "per_kind": per_kind, "target": target, "planned": removed, "q": q,
            "keep_frac": keep_frac}


def gohsp_budgets(structure: Structure, p_total: float, total_params: int, attn_split: str = "geometric",
                  ffn_budget: str = "global") -> dict:
    """{kind: number of units to remove} for p_total of the total params (what SOMP/SGMP need to run at
    GOHSP's budgets). head_dim counts are summed over blocks (each block loses the same number)."""
    return gohsp_plan(structure, p_total, total_params, attn_split, ffn_budget)["per_kind"]


def select_planned(structure: Structure, scores: dict, plan: dict, *, head_budget: str = "per_block",
                   kinds=None, removed: dict | None = None) -> dict:
    """Keep-masks with a gohsp_plan's unit counts, removing the lowest `scores`: heads per block (or one
    ranking across blocks, each keeping min_keep, with head_budget global), head-dims per block, FFN neurons in
    one ranking (or per layer, when the plan has per-layer FFN counts). Only the groups of `kinds` (all if
    None). Units in `removed` stay removed and count toward their group's number."""
    removed = {k: v.bool() for k, v in (removed or {}).items()}
    groups = [g for g in structure if kinds is None or g.kind in kinds]
    keep = {}
    heads = [g for g in groups if g.kind == "head"]
    if head_budget == "global" and heads:
        keep.update(select(heads, scores, Count(plan["per_kind"].get("head", 0)), pool="global", removed=removed))
    for g in groups:
        if g.name in keep or (g.kind == "ffn" and plan["per_group"].get(g.name) is None):
            continue
        n = max(plan["per_group"].get(g.name, 0), int(removed[g.name].sum()) if g.name in removed else 0)
        keep.update(select([g], scores, Count(n), keep_at_least=None, removed=removed))
    ffn = [g for g in groups if g.kind == "ffn" and g.name not in keep]
    if ffn:
        keep.update(select(ffn, scores, Count(plan["per_kind"]["ffn"]), pool="global", removed=removed))
    return keep


def select_at_budgets(structure: Structure, scores: dict, p_total: float, total_params: int, *,
                      head_budget: str = "per_block", attn_split: str = "geometric", ffn_budget: str = "global",
                      already_removed: dict | None = None) -> dict:
    """Keep-masks with GOHSP's unit counts for p_total of the total params, choosing the lowest `scores`
    (e.g. magnitudes): SOMP/SGMP's `allocation: gohsp`. Units in `already_removed` stay removed."""
    plan = gohsp_plan(structure, p_total, total_params, attn_split, ffn_budget)
    return select_planned(structure, scores, plan, head_budget=head_budget, removed=already_removed)
