"""VTrans (Dutta, Gupta, Agarwal, arXiv 2406.05276, 2024): pruning every structural component of a
Transformer (the hidden/embedding width, attention heads, FFN neurons and whole sublayers) with masks
trained under the Variational Information Bottleneck, to a given size (or FLOPs) budget. A RE-IMPLEMENTATION
(impl "reimpl"): only the abstract and secondary sources could be read; the mechanics follow
docs/specs/gohsp_vtrans_baselines.md §3 (VIBNet, the same authors' TVA-Prune code, CoFi), and every
guess is an option below with its default.

Registered methods
  vtrans         masks + weights trained with distillation from the dense model (phase 1), hard pruning to
                 the exact budget, the mask means folded into the weights, then the runner's finetune
                 (phase 2) of the kept weights.
  fast_vtrans    the same on a fixed random 3 % of the training examples (phase 1 only; `subset`).
  faster_vtrans  only the VIB masks (and the Lagrange multipliers) are trained; the weights stay frozen,
                 and by default no weight finetune follows ("exclusive fine-tuning of VIB masks").
Every cell records the compression wall time (method_info.compression_s; the runner adds timings.prune_s).

Mechanics (docs/specs/gohsp_vtrans_baselines.md §3.2-§3.7)
  * per unit j of every masked structure: mean mu_j ~ N(1, 0.01) and log-variance l_j ~ N(-9, 0.01);
    training masks z = mu + eps * exp(l / 2), eps ~ N(0, 1) drawn per token (TVA-Prune) or per step;
  * KL term per structure: kl_factor * mult_kind * 1/2 sum_j log(1 + mu_j^2 / sigma_j^2);
  * keep rule: log alpha_j = l_j - log(mu_j^2 + 1e-8) < threshold (0), i.e. mu^2 / sigma^2 > 1;
  * soft keep probability p_j = sigmoid(-k log alpha_j) (k = 10) gives the expected size: for every
    parameter, its size times the product of the expected kept fractions of the groups that cut it
    (`SizeModel`, generic over the structure; a whole-sublayer gate multiplies the parameters it owns);
  * Lagrangian (CoFi): lambda1 (s - t) + lambda2 (s - t)^2 with s the expected sparsity and t the target
    ramped linearly from 0 over the warm-up; lambda1, lambda2 start at 0 and follow gradient ASCENT;
  * distillation from the dense model (a frozen copy): alpha_ce * KL(teacher/T || student/T) * T^2 on the
    logits (MSE for a 1-output regression head) + alpha_layer * MSE(teacher hidden states, W student hidden
    states) with a learned linear W per the CoFi/TVA layer distillation (fixed one-to-one layer map),
    plus the task loss (task_loss_weight);
  * hard pruning: the units are ranked by log alpha and the smallest prefix whose size is closest to the
    target is kept (exact budget within one unit); the keep rule's own size is recorded next to it;
  * the mask means of the kept units are folded into the neighbouring weights (adapter.fold_unit_masks),
    the masks removed, and the runner extracts the smaller model.

Options (card `method_options.<name>`), each a guess of the spec made explicit:
  unit_kinds          [hidden, head, ffn, layer]: all structures of the abstract (layer masks = one scalar VIB
                      gate per attention and per FFN sublayer, as CoFi's head_layer/mlp masks; docs/specs/gohsp_vtrans_baselines.md §3.3 [I])
  mu_init, logvar_init  [1.0, 0.01], [-9.0, 0.01] (mean, std: VIBNet / TVA-Prune)
  threshold           0.0 (keep iff log(sigma^2/mu^2) < 0)
  sharpness           10.0 (k of the soft keep probability; TVA-Prune)
  kl_factor           1e-6 (VIBNet / TVA-Prune)
  kl_mult             {hidden: tva, head: 256, ffn: 1, layer: 1}; "tva" = emb_mult + 2 x (number of layers):
                      TVA-Prune counts the hidden KL once per attention and once per MLP plus emb_mult times
  emb_mult            30 (TVA-Prune argument default)
  kl_normalise        false (true: each structure's KL divided by its unit count, the 1/r_i of the review)
  noise               per_token (TVA-Prune: one eps per token and unit) | per_step (one eps per unit and step)
  constraint          params (the card's ratio) | flops (MACs at `flops_seq_len`, default the task's length)
  ratio_basis         total (p = fraction of ALL parameters removed: VTrans counts the embeddings) | prunable
  distill             logits+hidden (default, CoFi/TVA) | logits | hidden | none
  alpha_layer, alpha_ce, temperature   0.9, 0.01, 2.0 (TVA-Prune argument defaults)
  task_loss_weight    1.0: the task loss is kept next to the distillation terms (the spec's "optionally the
                      task CE"). CoFi's 0 (distillation replaces the task loss) works with its alpha_ce 0.1-0.5;
                      with TVA-Prune's alpha_ce 0.01 the predictions are barely constrained (micro GPT-2 at 40%:
                      perplexity 30 instead of 4.7 before finetuning)
  layer_transform_init  identity (the student starts as the teacher's copy, so W = I makes the layer loss 0
                      at step 0; CoFi's Linear keeps torch's default init: "default")
  train_weights       true (vtrans, fast_vtrans: CoFi updates the weights while pruning) | false (faster)
  subset              null (vtrans, faster_vtrans) | 0.03 (fast_vtrans): fraction of training examples,
                      uniformly random, fixed by `subset_seed` (0); applies to phase 1 only
  exact_budget        true (re-rank by log alpha to the exact target) | false (keep rule only)
  weight_finetune     true (vtrans, fast_vtrans: the runner finetunes the extracted model) | false (faster)
  selection           none (the final masks) | val (TVA-Prune: every `select_every` steps with the expected
                      sparsity within [t-0.008, t+0.001], evaluate the hard-pruned model on the task's `val`
                      split and keep the best masks; needs a task with a held-out val split)
  max_grad_norm       1.0 (the transformers Trainer default TVA-Prune keeps), over the VIB parameters, the
                      multipliers and the trained weights and W together, as TVA-Prune's training/trainer_vib.py
                      clips model.parameters(), which hold its z_mu, z_logD, lambda_1 and lambda_2
Profile settings (card `profiles.<p>.<name>`): epochs (phase 1), batch_size, lr (weights), weight_decay,
vib_lr (default 0.05, 0.1 for p > 0.5), reg_lr (0.1), lagrangian_warmup (fraction of phase-1 steps over
which the target ramps up; default 0.1, 0.2 for p > 0.6, TVA-Prune's 0.1/0.2 epoch of its one epoch),
log_every; and any option above, which then overrides the card's option for that profile only (the
micro profile raises kl_factor so that the masks reach the pruning boundary within ~150 steps, where
the paper-scale runs have thousands).
Scale: phase 1 is one phase of the runner's training loop (bench.training.train through ctx.train, named after
the method), so it has the card's precision (setting `precision`: auto = bf16 autocast on CUDA, fp32 on CPU),
gradient accumulation (`--micro-batch N|auto`: the masks are sampled per micro-batch, the KL and the Lagrangian
added once per step), data parallelism under torchrun (the gradients of the VIB parameters, the multipliers, W
and the weights averaged over the ranks; each rank draws its own mask noise and dropout, as it holds its own
samples; the runner checks the keep-masks identical on every rank), `--sharding fsdp` (the student trains
sharded, and the teacher, a frozen fp32 copy of the dense model, is sharded too: forwards only), resumable
checkpoints (the VIB masks, both optimizers, the multipliers, W, the history and the selection saved with the
weights) and the progress line. With frozen weights (faster_vtrans) the teacher is the student itself without
its masks: the same outputs as a frozen copy, without a second model in memory (and nothing to shard).
Deviations: phase 2 is the runner's finetune (task loss, masks folded) where the reviews describe
fine-tuning of the weights AND masks with distillation; GLUE/GPT-2 hyper-parameters are NOT FOUND.
"""
from __future__ import annotations

import copy
import time
from typing import Annotated, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, create_model
from torch import nn

from bench.api import Method, PruneResult, TaskAdapter
from bench.errors import BenchError
from bench.options import Fraction, NonNegFloat, NonNegInt, OptionsModel, PositiveFloat, PositiveInt
from bench.registry import register_method
from methods import _allocate as allocate

MASK_KINDS = ("hidden", "head", "ffn", "layer")
MaskKind = Literal["hidden", "head", "ffn", "layer"]
KL_MULT = {"hidden": "tva", "head": 256.0, "ffn": 1.0, "layer": 1.0}   # kinds a card's kl_mult leaves out get these
Pair = Annotated[list[float], Field(min_length=2, max_length=2)]


class VTransOptions(OptionsModel):
    """The card's `method_options.vtrans` block (fast_vtrans / faster_vtrans: the same keys, their own defaults)."""

    unit_kinds: list[MaskKind] = Field(list(MASK_KINDS), min_length=1,
                                       description="structures with VIB masks (layer: one gate per attention / FFN sublayer)")
    mu_init: Pair = Field([1.0, 0.01], description="[mean, std] of the initial mask means (VIBNet / TVA-Prune)")
    logvar_init: Pair = Field([-9.0, 0.01], description="[mean, std] of the initial mask log-variances")
    threshold: float = Field(0.0, description="keep rule: a unit is kept iff log(sigma^2 / mu^2) < threshold")
    sharpness: PositiveFloat = Field(10.0, description="k of the soft keep probability sigmoid(-k log alpha) (TVA-Prune)")
    kl_factor: NonNegFloat = Field(1e-6, description="weight of the KL term (VIBNet / TVA-Prune)")
    kl_mult: dict[MaskKind, NonNegFloat | Literal["tva"]] = Field(
        dict(KL_MULT), description="KL multiplier per kind (kinds left out: hidden tva, head 256, ffn 1, layer 1); "
                                   "tva = emb_mult + 2 x layers")
    emb_mult: NonNegFloat = Field(30.0, description="emb_mult of the tva hidden multiplier (TVA-Prune argument default)")
    kl_normalise: bool = Field(False, description="divide each structure's KL by its unit count")
    noise: Literal["per_token", "per_step"] = Field("per_token", description="one eps per token and unit (TVA-Prune) or per unit and step")
    constraint: Literal["params", "flops"] = Field("params", description="the budget: the card's ratio of params, or of MACs")
    flops_seq_len: PositiveInt | None = Field(None, description="constraint flops: tokens per sequence (null: the task's length)")
    ratio_basis: Literal["total", "prunable"] = Field("total", description="p is a fraction of ALL params (VTrans counts "
                                                                           "the embeddings) or of the prunable ones")
    distill: Literal["logits+hidden", "logits", "hidden", "none"] = Field(
        "logits+hidden", description="distillation from the dense model in phase 1 (CoFi / TVA-Prune: logits+hidden)")
    alpha_layer: NonNegFloat = Field(0.9, description="weight of the hidden-state distillation (TVA-Prune default)")
    alpha_ce: NonNegFloat = Field(0.01, description="weight of the logit distillation (TVA-Prune default)")
    temperature: PositiveFloat = Field(2.0, description="temperature of the logit distillation")
    task_loss_weight: NonNegFloat = Field(1.0, description="weight of the task loss next to the distillation terms")
    layer_transform_init: Literal["identity", "default"] = Field(
        "identity", description="init of the learned hidden-state map W (identity, or torch's default as CoFi)")
    train_weights: bool = Field(True, description="phase 1 also updates the weights (false: only the masks, Faster-VTrans)")
    subset: Annotated[float, Field(gt=0, le=1)] | None = Field(
        None, description="fraction of the training examples phase 1 uses, fixed by subset_seed (null: all)")
    subset_seed: NonNegInt = Field(0, description="seed of the random subset")
    exact_budget: bool = Field(True, description="re-rank by log alpha to the exact target (false: the keep rule only)")
    weight_finetune: bool = Field(True, description="the runner finetunes the extracted model afterwards")
    selection: Literal["none", "val"] = Field("none", description="none: the final masks; val: the best masks on the "
                                                                  "task's val split near the target (TVA-Prune)")
    select_every: PositiveInt = Field(50, description="selection val: steps between evaluations")
    max_grad_norm: NonNegFloat = Field(1.0, description="gradient clipping norm of phase 1 (0: none)")


class FastVTransOptions(VTransOptions):
    subset: Annotated[float, Field(gt=0, le=1)] | None = Field(
        0.03, description="fraction of the training examples phase 1 uses, fixed by subset_seed (Fast-VTrans: 3%)")


class FasterVTransOptions(VTransOptions):
    train_weights: bool = Field(False, description="phase 1 also updates the weights (Faster-VTrans: only the masks)")
    weight_finetune: bool = Field(False, description="the runner finetunes the extracted model afterwards "
                                                     "(Faster-VTrans: no)")


class _Phase1Settings(OptionsModel):
    epochs: NonNegFloat = Field(description="epochs of phase 1 (mask and weight training)")
    batch_size: PositiveInt = Field(description="batch size of phase 1")
    lr: PositiveFloat = Field(2e-5, description="peak lr of the weights (linear decay, no warm-up)")
    weight_decay: NonNegFloat = Field(0.0, description="AdamW weight decay of the weights")
    vib_lr: PositiveFloat | None = Field(None, description="lr of the VIB masks (null: 0.05, 0.1 for p > 0.5)")
    reg_lr: PositiveFloat = Field(0.1, description="lr of the Lagrange multipliers (gradient ascent)")
    lagrangian_warmup: Fraction | None = Field(
        None, description="fraction of phase 1 over which the target ramps up from 0 (null: 0.1, 0.2 for p > 0.6)")
    log_every: NonNegInt = Field(0, description="print the phase-1 loss every N steps (0: quiet)")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="phase 1's precision, as the recipe key (auto: bf16 autocast on CUDA, fp32 on CPU); fp16 "
                            "is refused: its GradScaler would leave the VIB masks' gradients scaled")

    # added after VTrans cells were recorded: at its default it stays out of the cell's hash (OptionsModel.to_dict)
    HASH_STABLE_KEYS: ClassVar[tuple] = ("precision",)


def _settings_with_overrides(options: type) -> type:
    """The profile block: phase-1 settings plus every option as an override for that profile only (null: the
    card's option), e.g. a larger kl_factor on the micro profile."""
    fields = {}
    for k, f in options.model_fields.items():
        ann = Annotated[(f.annotation, *f.metadata)] if f.metadata else f.annotation
        fields[k] = (ann | None, Field(None, description=f"override of the option {k} for this profile (null: the "
                                                         f"card's): {f.description}"))
    return create_model("VTransSettings", __base__=_Phase1Settings, __module__=__name__,
                        __doc__="A profile's `vtrans:` (`fast_vtrans:`, `faster_vtrans:`) block.", **fields)


VTransSettings = _settings_with_overrides(VTransOptions)


# ------------------------------------------------------------------------------------------------
# VIB pieces (pure functions; tests check them on known values)

def log_alpha(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log(sigma^2 / mu^2) = logvar - log(mu^2 + 1e-8) (VIBNet / TVA-Prune)."""
    return logvar - torch.log(mu.pow(2) + 1e-8)


def keep_rule(mu, logvar, threshold: float = 0.0) -> torch.Tensor:
    """Hard keep mask: log alpha < threshold, i.e. signal-to-noise mu^2/sigma^2 > exp(-threshold)."""
    return log_alpha(mu, logvar) < threshold


def vib_kl(mu, logvar) -> torch.Tensor:
    """KL of one structure after optimising the prior's variance: 1/2 sum log(1 + mu^2 / sigma^2)."""
    return 0.5 * torch.log1p(mu.pow(2) * torch.exp(-logvar)).sum()


def soft_keep(mu, logvar, sharpness: float = 10.0) -> torch.Tensor:
    """Differentiable keep probability sigmoid(-k log alpha) (TVA-Prune's expected-size proxy)."""
    return torch.sigmoid(-sharpness * log_alpha(mu, logvar))


class VIBMasks(nn.Module):
    """mu and log sigma^2 per unit of every group (names sanitised for the ParameterDict)."""

    def __init__(self, structure, mu_init=(1.0, 0.01), logvar_init=(-9.0, 0.01), device="cpu", generator=None):
        super().__init__()
        self.names = [g.name for g in structure]
        self.key = {n: f"g{i}" for i, n in enumerate(self.names)}
        self.mu = nn.ParameterDict()
        self.logvar = nn.ParameterDict()
        for g in structure:
            k = self.key[g.name]
            self.mu[k] = nn.Parameter(mu_init[0] + mu_init[1] * torch.randn(g.size, generator=generator))
            self.logvar[k] = nn.Parameter(logvar_init[0] + logvar_init[1] * torch.randn(g.size, generator=generator))
        self.to(device)

    def m(self, name):
        return self.mu[self.key[name]]

    def lv(self, name):
        return self.logvar[self.key[name]]

    def sample(self, name, lead_shape=()) -> torch.Tensor:
        mu, lv = self.m(name), self.lv(name)
        eps = torch.randn(*lead_shape, mu.numel(), device=mu.device, dtype=mu.dtype)
        return mu + eps * torch.exp(0.5 * lv)


# ------------------------------------------------------------------------------------------------
# expected / exact size from the structure (generic: methods never see module names)

class SizeModel:
    """Model size as a function of per-group kept fractions.

    For every parameter: numel x prod over the groups that cut it (one factor per cut dim) of the group's
    kept fraction x prod of the sublayer gates that own it. Exact for 0/1 keep-masks (the params the
    extracted model has); with soft keep probabilities it is the expected size (independent units)."""

    def __init__(self, model: nn.Module, structure, basis: str = "total"):
        if basis not in ("total", "prunable"):
            raise BenchError(f"vtrans ratio_basis must be 'total' or 'prunable', got {basis!r}")
        canon, numel = {}, {}
        first = {}
        for n, p in model.named_parameters(remove_duplicate=False):
            canon[n] = first.setdefault(id(p), n)
            numel[canon[n]] = p.numel()
        factors: dict = {}
        for g in structure:
            if g.kind == "layer":
                if not g.params:
                    raise BenchError(f"{g.name}: a layer group must list the parameters it owns (UnitGroup.params)")
                for n in g.params:
                    factors.setdefault(canon[n], set()).add((g.name, "gate", -1))
            else:
                for s in g.slices:
                    factors.setdefault(canon[s.param], set()).add((g.name, "frac", s.dim))
        self.factors = {n: sorted(f) for n, f in factors.items()}
        self.numel = numel
        self.total = sum(numel.values())
        self.untouched = sum(v for n, v in numel.items() if n not in factors)
        self.basis = basis
        self.prunable = self.total - self.untouched
        self.sizes = {g.name: g.size for g in structure}

    def size(self, frac: dict):
        """Kept parameters given frac[group] = kept fraction (tensor or float; a gate: 0..1)."""
        out = self.untouched
        for n, fs in self.factors.items():
            v = self.numel[n]
            for g, _, _ in fs:
                v = v * frac[g]
            out = out + v
        return out

    def denominator(self) -> int:
        return self.total if self.basis == "total" else self.prunable

    def sparsity(self, frac: dict):
        """Removed fraction of the basis (total or prunable params)."""
        return (self.total - self.size(frac)) / self.denominator()

    def target_size(self, p: float) -> float:
        return self.total - p * self.denominator()


class FlopsModel:
    """MACs of one sequence of n tokens as a function of kept fractions (docs/specs/gohsp_vtrans_baselines.md §3.4 FLOPs variant):
    n x kept numel of every 2-D weight that is not an embedding table (plus a tied output embedding), and
    2 n^2 x (kept query width) for the attention scores and context of every layer with a head group.
    Norms are left out, and a pooler/classifier that sees one token is counted per token (it cannot be
    told apart without module names): a small overestimate for sequence classifiers."""

    def __init__(self, model, structure, n: int, geometry):
        self.sm = SizeModel(model, structure, "total")
        mods = dict(model.named_modules())
        emb = set()
        for name, mod in mods.items():
            if isinstance(mod, nn.Embedding):
                emb.add(f"{name}.weight" if name else "weight")
        out_emb = getattr(model, "get_output_embeddings", lambda: None)()
        tied = None
        if out_emb is not None:
            for name, prm in model.named_parameters():
                if prm is out_emb.weight and name in emb:
                    tied = name
        params = dict(model.named_parameters())
        self.weights = [name for name, prm in params.items() if prm.dim() == 2 and (name not in emb or name == tied)]
        self.n = int(n)
        self.q_width = geometry.heads * geometry.head_dim
        names = {g.name for g in structure}
        self.heads = [(g.name, f"{g.name.rsplit(':', 1)[0]}:layer") for g in structure if g.kind == "head"]
        self.heads = [(h, lay if lay in names else None) for h, lay in self.heads]
        self.n_layers = geometry.layers

    def macs(self, frac: dict):
        total = 0.0
        for w in self.weights:
            v = self.sm.numel[w]
            for g, _, _ in self.sm.factors.get(w, []):
                v = v * frac[g]
            total = total + self.n * v
        att = 2 * self.n ** 2 * self.q_width
        if self.heads:
            for h, lay in self.heads:
                total = total + att * frac[h] * (frac[lay] if lay else 1.0)
        else:
            total = total + att * self.n_layers
        return total

    def dense(self):
        return float(self.macs({g: 1.0 for g in self.sm.sizes}))

    def sparsity(self, frac):
        return 1 - self.macs(frac) / self.dense()


def fractions(probs: dict, structure) -> dict:
    """Per group: the expected kept fraction (mean keep probability; a layer gate: its probability)."""
    return {g.name: probs[g.name].mean() if g.kind != "layer" else probs[g.name].view(-1)[0] for g in structure}


def exact_selection(structure, scores: dict, size_fn, target: float, fill: int = 5000) -> tuple:
    """Keep-masks from one ranking of all units by `scores` (lower = keep first): every group keeps its
    min_keep best units (sublayer gates may all go), then the prefix of the ranking whose size (size_fn of
    the kept fractions) is closest to `target` is kept; when the unit at the boundary is large, the next
    `fill` units in rank order that still fit below the target may be kept instead, if that lands closer.
    Returns (keep, achieved size)."""
    # the toolkit's size budget; its scores are "higher = kept", so log alpha goes in negated
    info: dict = {}
    neg = {g.name: -scores[g.name].detach().double().cpu().view(-1) for g in structure}
    keep = allocate.select(list(structure), neg, allocate.Size(size_fn, target, fill), info=info)
    return keep, info["achieved"]


# ------------------------------------------------------------------------------------------------
# distillation

def distill_loss(s_out, t_out, transform, alpha_ce, alpha_layer, T, use_logits=True, use_hidden=True):
    loss = s_out.logits.new_zeros(())
    parts = {}
    if use_logits and alpha_ce:
        s, t = s_out.logits.float(), t_out.logits.float()
        if s.shape[-1] == 1:                  # regression head (STS-B): no distribution to match
            ce = F.mse_loss(s, t)
        else:
            s, t = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
            ce = F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="batchmean") * T * T
        loss = loss + alpha_ce * ce
        parts["pred"] = float(ce.detach())
    if use_hidden and alpha_layer:
        hs, ht = s_out.hidden_states, t_out.hidden_states
        layer = sum(F.mse_loss(transform(a.float()), b.float()) for a, b in zip(hs, ht)) / len(ht)
        loss = loss + alpha_layer * layer
        parts["layer"] = float(layer.detach())
    return loss, parts


# ------------------------------------------------------------------------------------------------


@register_method("vtrans")
class VTrans(Method):
    name = "vtrans"
    impl = "reimpl"
    # 2: phase 1 in the shared training loop (its data order from the cell's data seed, as every phase; the
    # multipliers inside the gradient clipping, as TVA-Prune): records of version 1 are not reused
    VERSION = 2
    finetune = True
    description = "VIB masks on hidden width, heads, FFN neurons and sublayers, Lagrangian budget, distillation"
    Options = VTransOptions
    Settings = VTransSettings

    @classmethod
    def compress_epochs(cls, settings) -> float:
        return float(settings.epochs)

    def prune(self, ctx):
        t_start = time.perf_counter()
        opts, s, _ = self.typed_blocks(ctx)
        # a profile may rescale options (micro): its non-null option keys override the card's for that profile
        o = opts.model_copy(update={k: getattr(s, k) for k in type(opts).model_fields if getattr(s, k) is not None})
        kinds = [k for k in o.unit_kinds]
        bad = set(kinds) - set(MASK_KINDS)
        if bad:
            raise BenchError(f"{self.name} masks the unit kinds {MASK_KINDS}, not {sorted(bad)}")
        st = ctx.adapter.structure(ctx.model, kinds)
        model, task, device, p = ctx.model, ctx.task, ctx.device, float(ctx.ratio.p)
        sm = SizeModel(model, st, o.ratio_basis)
        if o.constraint == "flops":
            n = o.flops_seq_len or int(task.sequence_length())
            budget = FlopsModel(model, st, n, ctx.adapter.geometry(model))
            sparsity_fn, size_fn = budget.sparsity, budget.macs
            dense_macs = budget.dense()
            target_size = (1 - p) * dense_macs
            achieved_sparsity = lambda a: 1 - a / dense_macs   # noqa: E731
        elif o.constraint == "params":
            sparsity_fn, size_fn, target_size = sm.sparsity, sm.size, sm.target_size(p)
            achieved_sparsity = lambda a: (sm.total - a) / sm.denominator()   # noqa: E731
        else:
            raise BenchError(f"vtrans constraint must be 'params' or 'flops', got {o.constraint!r}")

        gen = torch.Generator().manual_seed(ctx.seed)
        vib = VIBMasks(st, o.mu_init, o.logvar_init, device, gen)
        history = self._phase1(ctx, st, vib, o, s, sparsity_fn, p)

        # hard pruning: keep rule, then the exact budget by re-ranking log alpha
        with torch.no_grad():
            la = {g.name: log_alpha(vib.m(g.name), vib.lv(g.name)).detach().cpu() for g in st}
            rule = {g.name: la[g.name] < o.threshold for g in st}
            for g in st:                       # min_keep also under the rule (the extractor needs it)
                if g.kind != "layer" and int(rule[g.name].sum()) < g.min_keep:
                    rule[g.name][torch.argsort(la[g.name])[: g.min_keep]] = True
            rule_frac = {g.name: float(rule[g.name].float().mean()) for g in st}
            rule_sparsity = float(sparsity_fn(rule_frac))
            if o.exact_budget:
                keep, achieved = exact_selection(st, la, size_fn, target_size)
            else:
                keep, achieved = rule, float(size_fn(rule_frac))
            values = {g.name: (vib.m(g.name).detach().cpu() * keep[g.name]) for g in st}
            for g in st:    # a kept unit whose mean is exactly 0 would read as pruned: keep it at a tiny value
                z = keep[g.name] & (values[g.name] == 0)
                values[g.name][z] = 1e-12
        ctx.adapter.clear_unit_masks(model)
        ctx.adapter.fold_unit_masks(model, st, values)
        for prm in model.parameters():
            prm.requires_grad_(True)
        model.eval()
        return PruneResult(keep, st, finetune=bool(o.weight_finetune), info={
            "compression_s": round(time.perf_counter() - t_start, 3),
            "variant": self.name, "options": o.to_dict(),
            "phase1": history,
            "keep_rule": {"threshold": o.threshold, "sparsity": round(rule_sparsity, 6),
                          "kept_units": {g.name: int(rule[g.name].sum()) for g in st}},
            "hard": {"constraint": o.constraint, "target_sparsity": p, "exact_budget": o.exact_budget,
                     "achieved_sparsity": round(achieved_sparsity(achieved), 6),
                     "kept_units": {g.name: int(keep[g.name].sum()) for g in st}},
            "weight_finetune": bool(o.weight_finetune),
        })

    # -------------------------------------------------------------------------------------------
    def _phase1(self, ctx, st, vib, o, s, sparsity_fn, p):
        """Mask (and weight) training under KL + Lagrangian + distillation, as one training phase of the runner's
        loop (`ctx.train`, bench.training.train), which gives it the precision, gradient accumulation, data
        parallelism and fsdp sharding, resumable checkpoints and the progress line of every other phase. This
        method supplies the per-micro-batch objective (`batch_loss`: sampled masks, distillation, task loss),
        the once-per-step KL + Lagrangian (`extra_loss`), its layer map W (`extra_params`, trained by the loop's
        AdamW with the weights), and steps its own optimizers for the VIB masks and the multipliers after each
        step (`after_step`); their state, W, the selection and the history are checkpointed with the phase
        (`state_hooks`). Returns a summary."""
        model, task, device, adapter = ctx.model, ctx.task, ctx.device, ctx.adapter
        for hook in ("forward", "loss_from_output", "token_shape"):
            if getattr(type(task), hook) is getattr(TaskAdapter, hook):
                raise BenchError(f"{self.name} needs the task's `{hook}` (tasks/glue.py and tasks/lm_perplexity.py "
                                 f"have it); task {task.name} does not")
        distill = o.distill
        if distill not in ("logits+hidden", "logits", "hidden", "none"):
            raise BenchError(f"vtrans distill must be logits+hidden, logits, hidden or none, got {distill!r}")
        sel = o.selection
        if sel not in ("none", "val"):
            raise BenchError(f"vtrans selection must be 'none' or 'val', got {sel!r}")
        use_logits, use_hidden = "logits" in distill, "hidden" in distill
        train_weights = bool(o.train_weights)
        model.to(device).train()
        for prm in model.parameters():
            prm.requires_grad_(train_weights)
        # the teacher: the dense model. With frozen weights it is the student itself without its masks (no copy);
        # otherwise a frozen copy, taken now (before a resume loads trained weights), kept on the CPU until the
        # first forward puts it on the device whole, or sharded like the student under fsdp
        teacher = {"net": None, "copy": None}
        if distill != "none" and train_weights:
            teacher["copy"] = copy.deepcopy(model).cpu().eval()
            for prm in teacher["copy"].parameters():
                prm.requires_grad_(False)
        transform = nn.Identity()
        if use_hidden:
            width = adapter.geometry(model).width
            transform = nn.Linear(width, width).to(device)
            if o.layer_transform_init == "identity":
                with torch.no_grad():
                    transform.weight.copy_(torch.eye(width))
                    transform.bias.zero_()
        subset = o.subset
        bs = int(s.batch_size)
        data_options = {"subset": subset, "subset_seed": int(o.subset_seed)} if subset is not None else {}
        spe = task.steps_per_epoch(bs, subset=subset) if subset is not None else task.steps_per_epoch(bs)
        from bench.training import as_recipe, schedule_units
        recipe = as_recipe(epochs=float(s.epochs), batch_size=bs, lr=float(s.lr), weight_decay=float(s.weight_decay),
                           weight_decay_groups="all", schedule="poly", poly_power=1.0, min_lr=0.0,  # linear decay to 0
                           warmup_epochs=0, clip_grad=float(o.max_grad_norm) or None, precision=s.precision)
        total = schedule_units(recipe, spe)[0]   # the loop's own count of optimizer steps
        warm_frac = float(s.lagrangian_warmup if s.lagrangian_warmup is not None else (0.2 if p > 0.6 else 0.1))
        warmup = max(1, int(round(warm_frac * total)))
        vib_lr = float(s.vib_lr if s.vib_lr is not None else (0.1 if p > 0.5 else 0.05))
        reg_lr = float(s.reg_lr)
        lam = nn.Parameter(torch.zeros(2, device=device))
        opt_vib = torch.optim.AdamW(list(vib.parameters()), lr=vib_lr, weight_decay=0.0)
        opt_lam = torch.optim.AdamW([lam], lr=reg_lr, weight_decay=0.0, maximize=True)
        kl_mult = dict(KL_MULT, **o.kl_mult)
        n_layers = len({g.layer for g in st if g.layer is not None})
        mult = {}
        for g in st:
            m = kl_mult.get(g.kind, 1.0)
            m = float(o.emb_mult) + 2 * n_layers if m == "tva" else float(m)
            mult[g.name] = m / (g.size if o.kl_normalise else 1)
        from bench import distributed as dist
        log_every = int(s.log_every)
        # what the loop's callbacks share; all of it is saved with the phase's checkpoints
        cur = {"step": 0, "es": 0.0, "target": 0.0, "parts": []}
        hist, best = [], {"at": None}

        def teacher_output(net, batch):
            if not train_weights:   # frozen weights: the dense model is the student without masks
                adapter.clear_unit_masks(net)
                net.eval()
                with torch.no_grad():
                    out = task.forward(net, batch, device, output_hidden_states=use_hidden)
                net.train()
                return out
            if teacher["net"] is None:
                if net is model:   # not sharded: the whole copy on the device
                    teacher["net"] = teacher["copy"].to(device)
                else:              # fsdp: the student trains a sharded twin; the teacher is sharded too
                    if sel == "val":
                        raise BenchError(f"{self.name}: selection val with sharding fsdp would evaluate the model "
                                         f"while its weights train sharded elsewhere; set selection: none or run "
                                         f"phase 1 without --sharding fsdp")
                    from bench.sharding import ShardedTwin
                    # only the sharded module is kept: the twin's pairs would hold the CPU copy alive
                    teacher["net"] = ShardedTwin(teacher["copy"], adapter, device, [], phase=f"{self.name} teacher",
                                                 forward_only=True).module.eval()
                teacher["copy"] = None
            with torch.no_grad():
                return task.forward(teacher["net"], batch, device, output_hidden_states=use_hidden)

        def batch_loss(net, batch):
            """One micro-batch: masks sampled (per token or per step), distillation + task loss."""
            lead = tuple(task.token_shape(batch)) if o.noise == "per_token" else ()
            z = {g.name: vib.sample(g.name, lead) for g in st}
            t_out = teacher_output(net, batch) if distill != "none" else None
            adapter.set_unit_masks(net, st, z)
            out = task.forward(net, batch, device, output_hidden_states=use_hidden) if t_out is not None \
                else task.forward(net, batch, device)
            loss = out.logits.new_zeros(())
            parts = {}
            if t_out is not None:
                d, parts = distill_loss(out, t_out, transform, float(o.alpha_ce), float(o.alpha_layer),
                                        float(o.temperature), use_logits, use_hidden)
                loss = loss + d
            if t_out is None or float(o.task_loss_weight):
                tl = task.loss_from_output(out, batch, device)
                loss = loss + (float(o.task_loss_weight) if t_out is not None else 1.0) * tl
                parts["task"] = float(tl.detach())
            cur["parts"].append(parts)
            return loss

        def kl_and_lagrangian():
            """Once per optimizer step: the KL of every structure and the Lagrangian on the expected sparsity."""
            kl = sum(mult[g.name] * vib_kl(vib.m(g.name), vib.lv(g.name)) for g in st) * float(o.kl_factor)
            probs = {g.name: soft_keep(vib.m(g.name), vib.lv(g.name), float(o.sharpness)) for g in st}
            es = sparsity_fn(fractions(probs, st))
            target = p * min(1.0, cur["step"] / warmup)
            cur["es"], cur["target"] = float(es.detach()), target
            return kl + lam[0] * (es - target) + lam[1] * (es - target) ** 2

        def after_step(step, total):
            """The VIB masks (linear lr decay, no warm-up) and the multipliers (gradient ascent) step."""
            for gr in opt_vib.param_groups:
                gr["lr"] = vib_lr * (1 - step / total)
            opt_vib.step()
            opt_lam.step()
            opt_vib.zero_grad(set_to_none=True)
            opt_lam.zero_grad(set_to_none=True)
            es, target = cur["es"], cur["target"]
            parts = {k: sum(d[k] for d in cur["parts"]) / len(cur["parts"]) for k in (cur["parts"] or [{}])[0]}
            cur["parts"] = []
            cur["step"] = step + 1
            if log_every and (step + 1) % log_every == 0 and dist.is_main():
                ctx.log(f"{self.name} step {step + 1}/{total} E[sparsity] {es:.4f} target {target:.4f} "
                        f"lambda {lam.detach().cpu().tolist()}")
            if (step + 1) % max(1, total // 20) == 0 or step == total - 1:
                hist.append({"step": step + 1, "expected_sparsity": round(es, 5), "target": round(target, 5),
                             "lambda": [round(v, 5) for v in lam.detach().cpu().tolist()],
                             **{k: round(v, 5) for k, v in parts.items()}})
            if sel == "val" and step >= warmup and (step + 1) % int(o.select_every) == 0 \
                    and target - 0.008 <= es <= target + (0.006 if target > 0.7 else 0.001):
                score = self._validate(ctx, st, vib, o)
                if best["at"] is None or score > best["at"][0]:
                    best["at"] = (score, step + 1, {k: v.detach().clone() for k, v in vib.state_dict().items()})

        def get_state():
            return copy.deepcopy({"vib": vib.state_dict(), "lam": lam.detach(), "opt_vib": opt_vib.state_dict(),
                                  "opt_lam": opt_lam.state_dict(), "transform": transform.state_dict(),
                                  "cur": cur, "hist": hist, "best": best["at"]})

        def set_state(state):
            state = copy.deepcopy(state)
            vib.load_state_dict(state["vib"])
            with torch.no_grad():
                lam.copy_(state["lam"])
            opt_vib.load_state_dict(state["opt_vib"])
            opt_lam.load_state_dict(state["opt_lam"])
            transform.load_state_dict(state["transform"])
            cur.update(state["cur"])
            hist[:] = state["hist"]
            best["at"] = state["best"]

        t0 = time.perf_counter()
        try:
            stats = ctx.train(model, recipe=recipe, batch_loss=batch_loss, extra_loss=kl_and_lagrangian,
                              extra_params=list(transform.parameters()),
                              clip_tensors=lambda: list(vib.parameters()) + [lam],
                              sync_tensors=lambda: list(vib.parameters()) + [lam],
                              after_step=after_step, state_hooks=(get_state, set_state), data_options=data_options,
                              # frozen weights: nothing to shard (and no sharded copy of the whole model)
                              **({"sharding": "none"} if not train_weights else {}))
        finally:
            teacher.clear()
            adapter.clear_unit_masks(model)
        if best["at"] is not None:
            vib.load_state_dict(best["at"][2])
        model.eval()
        return {"steps": total, "steps_per_epoch": spe, "subset": subset, "warmup_steps": warmup, "vib_lr": vib_lr,
                "reg_lr": reg_lr, "train_weights": train_weights, "distill": distill,
                "seconds": round(time.perf_counter() - t0, 3), "final_expected_sparsity": round(cur["es"], 6),
                "selected_step": best["at"][1] if best["at"] else None, "precision": stats["precision"],
                "micro_batch_size": stats["micro_batch_size"], "accumulation_steps": stats["accumulation_steps"],
                "world_size": stats["world_size"], "sharding": stats["sharding"],
                **({"resumed_from_step": stats["resumed_from_step"]} if "resumed_from_step" in stats else {}),
                "history": hist}

    def _validate(self, ctx, st, vib, o) -> float:
        """Hard keep-rule masks with the mean values, evaluated on the task's val split (never the reported one)."""
        task = ctx.task
        with torch.no_grad():
            vals = {g.name: vib.m(g.name).detach() * keep_rule(vib.m(g.name), vib.lv(g.name), o.threshold)
                    for g in st}
        ctx.adapter.set_unit_masks(ctx.model, st, vals)
        res = task.evaluate(ctx.model, "val", ctx.device)
        ctx.model.train()
        name = getattr(task, "primary", None) or next(iter(task.metrics))
        return float(res[name]) if task.metrics.get(name, True) else -float(res[name])


@register_method("fast_vtrans")
class FastVTrans(VTrans):
    name = "fast_vtrans"
    description = "VTrans on a random 3% of the training data"
    Options = FastVTransOptions


@register_method("faster_vtrans")
class FasterVTrans(VTrans):
    name = "faster_vtrans"
    description = "VTrans training only the VIB masks (weights frozen, no weight finetune)"
    Options = FasterVTransOptions
