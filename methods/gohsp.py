"""GOHSP: graph-based head ranking + optimisation-based (ADMM-style) soft pruning (Yin et al., AAAI 2023).

Re-implementation (`impl = "reimpl"`): no official code exists and only the abstract/introduction and a
summary (shared/seeds/001_85cb2094f7f2d80e.txt) could be read. The three-stage outline is the paper's;
every concrete choice inside a stage is a reconstruction (docs/specs/gohsp_vtrans_baselines.md §2.2)
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
  logged per update in the result's info["admm"]. Weights are never hard-zeroed in this stage.
Stage 3 - hard pruning: keep-masks = the support of Z (with reselect: Pi_S of the final W); the runner
  extracts and finetunes (finetune = True).

Sparsity: the card's p is the fraction of the TOTAL model parameters removed (docs/specs/gohsp_vtrans_baselines.md §1.4). `gohsp_plan`
turns it into unit counts per block; the FFN count absorbs the rounding, so the removed params are within
half an FFN unit of p x total. SOMP/SGMP get the same counts through `select_at_budgets`.

Options (card `method_options.gohsp`) standing for unknown details [I = spec inference / NOT FOUND]:
  unit_kinds   : [head, head_dim, ffn] (default): heads, column sparsity inside the attention weights
                 (head-dim columns, shared by the heads of a block), columns of the MLP (neurons). The
                 seed says the three patterns co-exist ("some columns of MLPs and attention heads become
                 extremely small"); [head, ffn] drops the attention columns (docs/specs/gohsp_vtrans_baselines.md §2.2 step 9 "optional").
  similarity   : abs_cosine (default, docs/specs/gohsp_vtrans_baselines.md §2.2 step 3) | cosine_relu | correlation (|Pearson|) | rbf.
  damping      : 0.0 (default; the spec's chain has no teleport. With a symmetric w and no damping pi is
                 exactly the normalised weighted degree, docs/specs/gohsp_vtrans_baselines.md §2.2 step 5) | a in (0, 1) (PageRank 0.15).
  ranking      : importance (default: keep the heads with the largest pi, as the abstract calls pi an
                 "importance") | redundancy (keep the smallest pi: ablation).
  head_budget  : per_block (default: every block loses the same number of heads, docs/specs/gohsp_vtrans_baselines.md §2.2 step 7) |
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
                 W + U) | true (docs/specs/gohsp_vtrans_baselines.md §2.2 step 12 literally: re-rank the columns of W + U at every Z-step).
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

from bench.api import Method, PruneResult
from bench.errors import BenchError
from bench.options import Fraction, NonNegFloat, OptionsModel, PositiveFloat, PositiveInt
from bench.registry import register_method
from bench.structure import Structure, param_masks
from methods import _allocate as allocate
from methods import _importance as importance
from methods._allocate import gohsp_budgets, gohsp_plan, select_at_budgets   # noqa: F401  (re-exported)

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

# gohsp_plan, gohsp_budgets and select_at_budgets live in the toolkit (methods/_allocate.py), which SOMP/SGMP's
# `allocation: gohsp` shares; re-exported here under their names.


# ---------------------------------------------------------------------------------------------
# stage 1: per-head outputs via a hook derived from the structure

def _proj_slices(model, structure: Structure) -> list:
    """[(head group, slice)] for every slice through which a head group cuts a weight; the toolkit's hook keeps
    those along the dim the module contracts with its input (the output projection), whose input, viewed as
    slice.view on its last dim, is the per-head output."""
    pairs = importance.input_slices(model, structure, kinds=("head",))
    heads = {g.name for g, _ in pairs}
    missing = [g.name for g in structure if g.kind == "head" and g.name not in heads]
    if missing:
        raise BenchError(f"{missing[0]}: no slice cuts the input of an output projection; GOHSP's head ranking "
                         "needs the per-head outputs (the adapter should expose them)")
    return pairs


@torch.no_grad()
def collect_head_similarity(model, structure: Structure, batches, n_batches: int, device, kind: str,
                            task=None) -> dict:
    """(H, H) similarity per head group, averaged over the images of n_batches calibration batches, which run
    through the task's own loss (methods._importance.calibrate: the method never unpacks a batch)."""
    head_groups = [g for g in structure if g.kind == "head"]
    sums = {g.name: None for g in head_groups}
    count = {g.name: 0 for g in head_groups}

    def on_input(g, s, x, _in_dim):
        B, N = x.shape[0], x.shape[1]
        feats = x.reshape(B, N, *s.view).movedim(2 + s.axis, 1).reshape(B, s.view[s.axis], -1)
        sim = head_similarity(feats.cpu(), kind) * B
        sums[g.name] = sim if sums[g.name] is None else sums[g.name] + sim
        count[g.name] += B

    with importance.unit_input_hooks(model, _proj_slices(model, structure), on_input):
        importance.calibrate(model, task, batches, n_batches, device)
    missing = [k for k, v in sums.items() if v is None]
    if missing:
        raise BenchError(f"{missing[0]}: the calibration forward never reached its output projection")
    return {k: v / count[k] for k, v in sums.items()}


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
        keep = allocate.select(head_groups, scores, allocate.Count(plan["per_kind"].get("head", 0)), pool="global")
    else:
        keep = allocate.select(head_groups, scores, allocate.Count({g.name: plan["per_group"].get(g.name, 0)
                                                                    for g in head_groups}),
                               pool="layer", keep_at_least=None)
    return keep, info


# ---------------------------------------------------------------------------------------------
# stage 2: projection onto the structured-sparse set

class _Params:
    """Duck-typed stand-in for a model in `param_masks`: named_parameters() over given tensors."""

    def __init__(self, tensors: dict):
        self.t = tensors

    def named_parameters(self):
        return iter(self.t.items())


def project(structure: Structure, tensors: dict, head_keep: dict, plan: dict) -> tuple:
    """Pi_S(tensors): keep-masks (stage-1 heads; head-dims per block and FFN neurons by group L2 norm of
    `tensors`, head-dim norms over the kept heads only) and the projected tensors (only the names of
    `tensors` that the structure cuts)."""
    keep = {}
    for g in structure:
        if g.kind == "head":
            keep[g.name] = head_keep[g.name].clone()
    full = structure.full_keep()
    hmask = param_masks(_Params(tensors), structure, {**full, **keep})
    masked = {k: v * hmask[k] if k in hmask else v for k, v in tensors.items()}
    scores = importance.magnitude(masked, Structure([g for g in structure if g.kind != "head"]))
    keep.update(allocate.select_planned(structure, scores, plan, kinds=("head_dim", "ffn")))
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

    @classmethod
    def compress_epochs(cls, settings) -> float:
        return float(settings.admm_epochs)

    def prune(self, ctx):
        o, s, ft = self.typed_blocks(ctx)
        kinds = list(o.unit_kinds)
        if "head" not in kinds:
            raise BenchError("gohsp needs the 'head' unit kind (its graph ranks heads)")
        st = ctx.adapter.structure(ctx.model, kinds)
        model = ctx.model.to(ctx.device)
        total_params = sum(p.numel() for p in model.parameters())
        plan = gohsp_plan(st, ctx.ratio.p, total_params, o.attn_split, o.ffn_budget)

        # stage 1: graph-based head ranking
        sim_kind = o.similarity
        batches = ctx.task.train_batches(s.calib_batch_size, ctx.seed + 7)
        sims = collect_head_similarity(model, st, batches, s.calib_batches, ctx.device, sim_kind, task=ctx.task)
        from bench import distributed as dist   # data parallel: the same statistics on every rank (no-op alone)
        sims = dist.average_tensors(sims)
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
        return PruneResult(final_keep, st, info={
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
