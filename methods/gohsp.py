"""GOHSP: graph-based head ranking + optimisation-based (ADMM-style) soft pruning (Yin et al., AAAI 2023).

Re-implementation (`impl = "reimpl"`): no official code exists and only the abstract/introduction and a
summary (shared/seeds/001_85cb2094f7f2d80e.txt) could be read. The three-stage outline is the paper's;
every concrete choice inside a stage is a reconstruction (shared/specs/gohsp_vtrans_baselines.md §2.2)
and is a named option below, with the best-supported default.

Stage 1 - graph-based head ranking, one graph per transformer block. Each head's output on calibration
  batches (the attention-weighted values, (B, N, d_h)) is read by a forward pre-hook on the module whose
  weight the head group cuts along its *input* dimension (the output projection; found from the
  structure's slices, no module names). Edge weight w_ij (i != j) = similarity of heads i and j averaged
  over images; P = row-normalised w (no self-loops), optionally damped P <- (1-a)P + a/H; the stationary
  distribution pi = pi P by power iteration (checked against the leading left eigenvector); the heads with
  the lowest pi lose their mask (the "soft-pruning guideline": fixed for stage 2).
Stage 2 - ADMM soft pruning: task loss + rho/2 sum ||W - Z + U||_F^2 over every prunable tensor (qkv,
  proj, fc1, fc2 weights and the cut biases). Z = Pi_S(W + U): the stage-1 heads zeroed, the lowest
  group-norm FFN neurons (fc1 row + bias + fc2 column) zeroed, and, with attention columns on, the
  lowest group-norm head-dim columns of each block zeroed; U <- U + W - Z; rho <- min(gamma rho, rho_max).
  Z/U/rho update once per epoch (option `update_every`). The primal residual ||W - Z||_F / ||W||_F is
  logged per update in ctx.info["admm"]. Weights are never hard-zeroed in this stage.
Stage 3 - hard pruning: keep-masks = the support of Z (with reselect: Pi_S of the final W); the runner
  extracts and finetunes (finetune = True).

Sparsity: the card's p is the fraction of the TOTAL model parameters removed (spec §1.4). `gohsp_plan`
turns it into unit counts per block; the FFN count absorbs the rounding, so the removed params are within
half an FFN unit of p x total. SOMP/SGMP get the same counts through `select_at_budgets`.

Options (card `method_options.gohsp`) standing for unknown details [I = spec inference / NOT FOUND]:
  unit_kinds   : [head, head_dim, ffn] (default): heads, column sparsity inside the attention weights
                 (head-dim columns, shared by the heads of a block), columns of the MLP (neurons). The
                 seed says the three patterns co-exist ("some columns of MLPs and attention heads become
                 extremely small"); [head, ffn] drops the attention columns (spec §2.2 step 9 "optional").
  similarity   : abs_cosine (default, spec §2.2 step 3) | cosine_relu | correlation (|Pearson|) | rbf.
  damping      : 0.0 (default; the spec's chain has no teleport. With a symmetric w and no damping pi is
                 exactly the normalised weighted degree, spec §2.2 step 5) | a in (0, 1) (PageRank 0.15).
  ranking      : importance (default: keep the heads with the largest pi, as the abstract calls pi an
                 "importance") | redundancy (keep the smallest pi: ablation).
  head_budget  : per_block (default: every block loses the same number of heads, spec §2.2 step 7) |
                 global (one ranking of H*pi across blocks; each block keeps at least one head).
  attn_split   : geometric (default: heads and head-dims keep the same fraction sqrt(1-q) of a block's
                 attention, q = removed fraction of the prunable params) | heads_only (no head-dim columns).
                 The paper's "sparsity distribution" is NOT FOUND.
  ffn_budget   : global (default: one group-norm ranking of all neurons, like SOMP's per_type) | per_layer.
  dual         : true (default: scaled dual U, ADMM, as the spec's step 12; U is rescaled when rho
                 changes) | false (pure quadratic-penalty method with a growing coefficient, the seed's
                 wording "quadratic term whose coefficient controls its influence").
  reselect     : false (default: the support of Z (FFN / head-dim columns) is chosen once, by group norm
                 of the dense W at the start, heads by stage 1; the Z-step then zeroes that support of
                 W + U) | true (spec §2.2 step 12 literally: re-rank the columns of W + U at every Z-step).
                 With reselect true and the dual on, short schedules oscillate (the dual inflates W + U
                 of the units just pruned, so they are re-selected as kept and the residual grows):
                 measured on the micro model, hence the default.
  Calibration data: batches of the task's training split (size NOT FOUND: settings below).
Profile settings (card `profiles.<p>.gohsp`), all NOT FOUND in the paper:
  calib_batches (4), calib_batch_size (64), admm_epochs (E_admm) and lr (both required: the stage's budget
  has no default anywhere), batch_size (the finetune block's), weight_decay (0.05), min_lr (0),
  rho0 (1e-3, spec suggestion), rho_growth (1.5 per update, spec 1.3-2), rho_max (1.0),
  update_every (steps between Z/U updates; default one epoch), residual_stop (1e-3, spec step 13).
Both blocks are declared below (GOHSPOptions, GOHSPSettings).
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

from bench.api import Method
from bench.errors import BenchError
from bench.options import Fraction, NonNegFloat, OptionsModel, PositiveFloat, PositiveInt
from bench.registry import register_method
from bench.structure import Structure, param_masks

DEFAULT_KINDS = ("head", "head_dim", "ffn")
SIMILARITIES = ("abs_cosine", "cosine_relu", "correlation", "rbf")


class GOHSPOptions(OptionsModel):
    """The card's `method_options.gohsp` block: the reconstructed choices of each stage (module docstring)."""

    unit_kinds: list[Literal["head", "head_dim", "ffn"]] = Field(
        list(DEFAULT_KINDS), min_length=1,
        description="heads (required: the graph ranks them), head-dim columns, FFN neurons; [head, ffn] drops the columns")
    similarity: Literal["abs_cosine", "cosine_relu", "correlation", "rbf"] = Field(
        "abs_cosine", description="edge weight between two heads' outputs, averaged over images")
    damping: Fraction = Field(0.0, description="teleport a of the chain, P <- (1-a)P + a/H (0: none; PageRank: 0.15)")
    ranking: Literal["importance", "redundancy"] = Field(
        "importance", description="keep the heads with the largest stationary probability (importance) or the smallest")
    head_budget: Literal["per_block", "global"] = Field(
        "per_block", description="every block loses the same number of heads, or one ranking of H*pi across blocks")
    attn_split: Literal["geometric", "heads_only"] = Field(
        "geometric", description="heads and head-dims keep sqrt(1-q) of a block's attention each, or heads only")
    ffn_budget: Literal["global", "per_layer"] = Field(
        "global", description="one group-norm ranking of all FFN neurons, or the same count per layer")
    dual: bool = Field(True, description="scaled dual U (ADMM); false: quadratic penalty with a growing coefficient")
    reselect: bool = Field(False, description="re-rank the columns of W + U at every Z-step (else the support is fixed at the start)")


class GOHSPSettings(OptionsModel):
    """A profile's `gohsp:` block: calibration and the ADMM schedule (none of it is in the paper)."""

    admm_epochs: NonNegFloat = Field(description="epochs of the ADMM soft-pruning stage (0: hard prune right away)")
    lr: PositiveFloat = Field(description="peak learning rate of the ADMM stage (cosine decay, no warm-up)")
    batch_size: PositiveInt | None = Field(None, description="batch size of the ADMM stage (null: the finetune "
                                                             "block's, else 64)")
    weight_decay: NonNegFloat = Field(0.05, description="AdamW weight decay of the ADMM stage")
    min_lr: NonNegFloat = Field(0.0, description="lr at the end of the ADMM stage's cosine decay")
    calib_batches: PositiveInt = Field(4, description="training batches whose head outputs build the head graphs")
    calib_batch_size: PositiveInt = Field(64, description="batch size of the calibration batches")
    rho0: PositiveFloat = Field(1e-3, description="initial ADMM penalty rho (spec suggestion)")
    rho_growth: PositiveFloat = Field(1.5, description="rho <- min(rho_growth x rho, rho_max) after every Z/U update")
    rho_max: PositiveFloat = Field(1.0, description="upper bound of rho")
    update_every: PositiveInt | None = Field(None, description="steps between Z/U updates (null: one epoch)")
    residual_stop: PositiveFloat = Field(1e-3, description="relative primal residual recorded as converged below this")


# ---------------------------------------------------------------------------------------------
# Markov chain on a head graph

def transition_matrix(w: torch.Tensor, damping: float = 0.0) -> torch.Tensor:
    """Row-stochastic P from non-negative edge weights w (diagonal ignored: no self-loops); a row with no
    weight jumps uniformly. Damping a: P <- (1 - a) P + a / H (PageRank teleport)."""
    w = w.double().clone()
    H = w.shape[0]
    if (w < 0).any():
        raise BenchError("head-graph edge weights must be non-negative")
    w.fill_diagonal_(0.0)
    rows = w.sum(1, keepdim=True)
    P = torch.where(rows > 0, w / rows.clamp_min(1e-300), torch.full_like(w, 1.0 / H))
    if damping:
        P = (1 - damping) * P + damping / H
    return P


def stationary_distribution(P: torch.Tensor, tol: float = 1e-12, max_iter: int = 100000) -> tuple:
    """pi with pi = pi P, sum pi = 1, by power iteration from the uniform vector until ||Δ||_1 < tol.
    A periodic chain (which never converges) is averaged (Cesàro mean). Returns (pi, iterations)."""
    P = P.double()
    H = P.shape[0]
    pi = torch.full((H,), 1.0 / H, dtype=torch.float64)
    for it in range(1, max_iter + 1):
        nxt = pi @ P
        if float((nxt - pi).abs().sum()) < tol:
            return nxt / nxt.sum(), it
        pi = nxt
    # not converged (periodic): Cesàro average over a further window
    acc = torch.zeros_like(pi)
    for _ in range(H * 100):
        pi = pi @ P
        acc += pi
    return acc / acc.sum(), max_iter


def eigen_stationary(P: torch.Tensor) -> torch.Tensor:
    """The leading left eigenvector of P (eigenvalue 1), normalised to sum 1: the check for power iteration."""
    vals, vecs = torch.linalg.eig(P.double().T)
    i = int(torch.argmin((vals - 1).abs()))
    v = vecs[:, i].real
    return v / v.sum()


def head_similarity(feats: torch.Tensor, kind: str = "abs_cosine") -> torch.Tensor:
    """(B, H, F) per-image head signals -> (H, H) non-negative similarity averaged over the B images."""
    x = feats.double()
    if kind in ("abs_cosine", "cosine_relu", "correlation"):
        if kind == "correlation":
            x = x - x.mean(-1, keepdim=True)
        x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        s = x @ x.transpose(1, 2)
        s = s.clamp_min(0) if kind == "cosine_relu" else s.abs()
        return s.mean(0)
    if kind == "rbf":
        d2 = torch.cdist(x, x).pow(2)                             # (B, H, H)
        off = d2[:, ~torch.eye(x.shape[1], dtype=torch.bool)]
        scale = off.median(dim=-1).values.clamp_min(1e-12).view(-1, 1, 1)
        return torch.exp(-d2 / scale).mean(0)
    raise BenchError(f"gohsp similarity must be one of {SIMILARITIES}, got {kind!r}")


def head_scores(sim: torch.Tensor, damping: float = 0.0) -> dict:
    P = transition_matrix(sim, damping)
    pi, iters = stationary_distribution(P)
    eig = eigen_stationary(P)
    return {"pi": pi, "iters": iters, "eig_gap": float((pi - eig).abs().max())}


# ---------------------------------------------------------------------------------------------
# budgets: p of the TOTAL params -> unit counts per group

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


def _spread(total: int, caps: list) -> list:
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
    attn_split and ffn_budget as the options of that name (GOHSPOptions).

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
        for h, n in zip(heads, _spread(A, [h.size - h.min_keep for h in heads])):
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
            counts = _spread(n, [g.size - g.min_keep for g in ffn])
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


def _lowest(scores: torch.Tensor, n: int, forced: torch.Tensor | None = None) -> torch.Tensor:
    """Keep-mask that removes the n lowest-scoring units (forced-removed ones first)."""
    s = scores.double().clone()
    if forced is not None:
        s[forced] = -math.inf
    keep = torch.ones(s.numel(), dtype=torch.bool)
    if n > 0:
        keep[torch.argsort(s, stable=True)[:n]] = False
    return keep


def select_at_budgets(structure: Structure, scores: dict, p_total: float, total_params: int, *,
                      head_budget: str = "per_block", attn_split: str = "geometric", ffn_budget: str = "global",
                      already_removed: dict | None = None) -> dict:
    """Keep-masks with GOHSP's unit counts, choosing the lowest `scores` (e.g. magnitudes): the helper
    SOMP/SGMP call for `allocation: gohsp`. Heads: per block (or one global ranking of the scores with
    `head_budget: global`); head-dims: per block; FFN: one global ranking (or per layer). Units in
    `already_removed` stay removed (SGMP: no regrowth)."""
    plan = gohsp_plan(structure, p_total, total_params, attn_split, ffn_budget)
    gone = {k: v.bool() for k, v in (already_removed or {}).items()}
    keep = {}
    groups = list(structure)
    head_groups = [g for g in groups if g.kind == "head"]
    if head_budget == "global" and head_groups:
        keep.update(_global_lowest(head_groups, {g.name: scores[g.name] for g in head_groups},
                                   plan["per_kind"].get("head", 0), gone))
    for g in groups:
        if g.name in keep:
            continue
        if g.kind == "ffn" and plan["per_group"].get(g.name) is None:
            continue
        n = max(plan["per_group"].get(g.name, 0), int(gone[g.name].sum()) if g.name in gone else 0)
        keep[g.name] = _lowest(scores[g.name], n, gone.get(g.name))
    ffn = [g for g in groups if g.kind == "ffn" and g.name not in keep]
    if ffn:
        keep.update(_global_lowest(ffn, {g.name: scores[g.name] for g in ffn}, plan["per_kind"]["ffn"], gone))
    return keep


def _global_lowest(groups, scores: dict, n: int, gone: dict) -> dict:
    """Remove the n lowest units over all `groups` together, each group keeping min_keep units."""
    cand = []
    keep = {}
    n_forced = 0
    for g in groups:
        keep[g.name] = torch.ones(g.size, dtype=torch.bool)
        s = scores[g.name].double()
        order = torch.argsort(s, descending=True, stable=True)
        protected = set(order[: g.min_keep].tolist())
        f = gone.get(g.name)
        for i in range(g.size):
            if f is not None and bool(f[i]):
                keep[g.name][i] = False
                n_forced += 1
            elif i not in protected:
                cand.append((float(s[i]), g.name, i))
    cand.sort(key=lambda c: c[0])
    for _, name, i in cand[: max(0, n - n_forced)]:
        keep[name][i] = False
    return keep


# ---------------------------------------------------------------------------------------------
# stage 1: per-head outputs via a hook derived from the structure

def _proj_slice(group):
    """The slice through which a head group cuts the *input* dim of a 2-D weight (the output projection):
    that module's input, viewed as s.view on its last dim, is the per-head output."""
    for s in group.slices:
        if s.dim == 1 and s.param.endswith(".weight") and len(s.view) == 2 and s.axis == 0:
            return s
    raise BenchError(f"{group.name}: no slice cuts the input of an output projection; GOHSP's head ranking "
                     "needs the per-head outputs (the adapter should expose them)")


@torch.no_grad()
def collect_head_similarity(model, structure: Structure, batches, n_batches: int, device, kind: str) -> dict:
    """(H, H) similarity per head group, averaged over the images of n_batches calibration batches."""
    head_groups = [g for g in structure if g.kind == "head"]
    sums = {g.name: None for g in head_groups}
    count = {"n": 0}
    handles = []
    for g in head_groups:
        s = _proj_slice(g)
        mod = model.get_submodule(s.param.rpartition(".")[0])

        def hook(_m, inp, g=g, s=s):
            x = inp[0]
            B, N = x.shape[0], x.shape[1]
            feats = x.reshape(B, N, *s.view).permute(0, 2, 1, 3).reshape(B, s.view[0], -1)
            sim = head_similarity(feats.cpu(), kind) * B
            sums[g.name] = sim if sums[g.name] is None else sums[g.name] + sim
        handles.append(mod.register_forward_pre_hook(hook))
    was = model.training
    model.eval()
    try:
        for _ in range(n_batches):
            x, _y = next(batches)
            model(x.to(device))
            count["n"] += x.shape[0]
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return {k: v / count["n"] for k, v in sums.items()}


def rank_heads(structure: Structure, sims: dict, plan: dict, damping: float, ranking: str, budget: str) -> tuple:
    """Head keep-masks from the stationary distributions, and per-block diagnostics."""
    if ranking not in ("importance", "redundancy"):
        raise BenchError(f"gohsp ranking must be 'importance' or 'redundancy', got {ranking!r}")
    if budget not in ("per_block", "global"):
        raise BenchError(f"gohsp head_budget must be 'per_block' or 'global', got {budget!r}")
    head_groups = [g for g in structure if g.kind == "head"]
    info, scores = {}, {}
    for g in head_groups:
        r = head_scores(sims[g.name], damping)
        info[g.name] = {"pi": [round(float(v), 6) for v in r["pi"]], "power_iters": r["iters"],
                        "max_gap_vs_eigenvector": r["eig_gap"]}
        s = r["pi"] * g.size                       # 1 = uniform: comparable across blocks of any H
        scores[g.name] = s if ranking == "importance" else -s
    if budget == "global":
        keep = _global_lowest(head_groups, scores, plan["per_kind"].get("head", 0), {})
    else:
        keep = {g.name: _lowest(scores[g.name], plan["per_group"].get(g.name, 0)) for g in head_groups}
    return keep, info


# ---------------------------------------------------------------------------------------------
# stage 2: projection onto the structured-sparse set

class _Params:
    """Duck-typed stand-in for a model in `unit_scores`: named_parameters() over given tensors."""

    def __init__(self, tensors: dict):
        self.t = tensors

    def named_parameters(self):
        return iter(self.t.items())


def project(structure: Structure, tensors: dict, head_keep: dict, plan: dict) -> tuple:
    """Pi_S(tensors): keep-masks (stage-1 heads; head-dims per block and FFN neurons by group L2 norm of
    `tensors`, head-dim norms over the kept heads only) and the projected tensors (only the names of
    `tensors` that the structure cuts)."""
    from methods.magnitude import unit_scores

    keep = {}
    for g in structure:
        if g.kind == "head":
            keep[g.name] = head_keep[g.name].clone()
    full = structure.full_keep()
    hmask = param_masks(_Params(tensors), structure, {**full, **keep})
    masked = {k: v * hmask[k] if k in hmask else v for k, v in tensors.items()}
    scores = unit_scores(_Params(masked), Structure([g for g in structure if g.kind != "head"]))
    ffn = [g for g in structure if g.kind == "ffn"]
    for g in structure:
        if g.kind == "head_dim":
            keep[g.name] = _lowest(scores[g.name], plan["per_group"].get(g.name, 0))
        elif g.kind == "ffn" and plan["per_group"].get(g.name) is not None:
            keep[g.name] = _lowest(scores[g.name], plan["per_group"][g.name])
    todo = [g for g in ffn if g.name not in keep]
    if todo:
        keep.update(_global_lowest(todo, scores, plan["per_kind"]["ffn"], {}))
    masks = param_masks(_Params(tensors), structure, {**full, **keep})
    return keep, {k: tensors[k] * m for k, m in masks.items()}


@register_method("gohsp")
class GOHSP(Method):
    name = "gohsp"
    impl = "reimpl"
    finetune = True
    settings_key = "gohsp"
    description = "graph-based head ranking (Markov stationary distribution) + ADMM soft pruning + hard prune"
    Options = GOHSPOptions
    Settings = GOHSPSettings

    def prune(self, ctx):
        o, s, ft = self.typed_blocks(ctx)
        kinds = list(o.unit_kinds)
        if "head" not in kinds:
            raise BenchError("gohsp needs the 'head' unit kind (its graph ranks heads)")
        st = ctx.adapter.structure(ctx.model, kinds)
        ctx.structure = st
        model = ctx.model.to(ctx.device)
        total_params = sum(p.numel() for p in model.parameters())
        plan = gohsp_plan(st, ctx.ratio.p, total_params, o.attn_split, o.ffn_budget)

        # stage 1: graph-based head ranking
        sim_kind = o.similarity
        batches = ctx.task.train_batches(s.calib_batch_size, ctx.seed + 7)
        sims = collect_head_similarity(model, st, batches, s.calib_batches, ctx.device, sim_kind)
        head_keep, graph_info = rank_heads(st, sims, plan, float(o.damping), o.ranking, o.head_budget)

        # stage 2: ADMM soft pruning
        params = dict(model.named_parameters())
        names = sorted(param_masks(model, st, st.full_keep()))
        W = {n: params[n] for n in names}
        keep, Z = project(st, {n: W[n].detach() for n in names}, head_keep, plan)
        U = {n: torch.zeros_like(W[n]) for n in names}
        state = {"rho": float(s.rho0)}
        growth, rho_max = float(s.rho_growth), float(s.rho_max)
        bs = s.batch_size if s.batch_size is not None else (ft.batch_size if ft is not None else 64)
        epochs = float(s.admm_epochs)
        every = s.update_every if s.update_every is not None else ctx.task.steps_per_epoch(bs)
        stop = float(s.residual_stop)
        history = []

        def residual():
            with torch.no_grad():
                num = math.sqrt(sum(float((W[n] - Z[n]).pow(2).sum()) for n in names))
                den = math.sqrt(sum(float(W[n].pow(2).sum()) for n in names))
            return num, num / max(den, 1e-30)

        r_abs, r_rel = residual()
        history.append({"step": 0, "rho": state["rho"], "primal_residual": r_abs, "primal_residual_rel": r_rel})

        def penalty():
            return 0.5 * state["rho"] * sum((W[n] - Z[n] + U[n]).pow(2).sum() for n in names)

        use_dual = o.dual
        reselect = o.reselect
        fixed = param_masks(model, st, keep)

        def on_step(step, total):
            if (step + 1) % every and step + 1 != total:
                return
            with torch.no_grad():
                V = {n: W[n].detach() + U[n] for n in names}
                if reselect:
                    k, z = project(st, V, head_keep, plan)
                    keep.update(k)
                else:
                    z = {n: V[n] * fixed[n] for n in names}
                Z.update(z)
                if use_dual:
                    for n in names:
                        U[n] += W[n].detach() - Z[n]
            a, r = residual()
            history.append({"step": step + 1, "rho": state["rho"], "primal_residual": a, "primal_residual_rel": r})
            new_rho = min(state["rho"] * growth, rho_max)
            with torch.no_grad():          # scaled dual U = y / rho: rescale when rho changes
                for n in names:
                    U[n] *= state["rho"] / new_rho
            state["rho"] = new_rho

        stats = None
        if epochs > 0:
            stats = ctx.train(model, epochs=epochs, lr=float(s.lr), batch_size=bs,
                              weight_decay=float(s.weight_decay), warmup_epochs=0,
                              min_lr=float(s.min_lr), on_step=on_step, extra_loss=penalty)

        # stage 3: hard prune = Pi_S(W)
        if reselect:
            final_keep, _ = project(st, {n: W[n].detach() for n in names}, head_keep, plan)
        else:
            final_keep = {k: v.clone() for k, v in keep.items()}
        ctx.info.update({
            "impl": "reimpl",
            "options": {"unit_kinds": st.kinds(), "similarity": sim_kind, "damping": float(o.damping),
                        "ranking": o.ranking, "head_budget": o.head_budget,
                        "attn_split": o.attn_split, "ffn_budget": o.ffn_budget},
            "budget": {"p_total": ctx.ratio.p, "total_params": total_params, "target_removed": plan["target"],
                       "planned_removed": plan["planned"], "q_prunable": plan["q"], "per_kind": plan["per_kind"]},
            "graph": graph_info,
            "admm": {"epochs": epochs, "update_every": every, "rho_growth": growth, "rho_max": rho_max,
                     "residual_below_stop": history[-1]["primal_residual_rel"] < stop,
                     "history": history, "train": stats},
        })
        return final_keep
