"""UPop: Unified and Progressive Pruning (Shi et al., ICML 2023), faithful to the paper and the official code.

Spec: docs/specs/upop.md §1-§4, §9. Works on any model whose adapter exposes UPop's unit kinds,
`head_dim` (one mask entry per per-head dimension, shared by all heads of the module and by q, k, v,
applied after the projections and the head reshape) and `ffn` (one entry per FFN neuron, on fc1's output
before the activation), and implements `attach_unit_masks`.

Search (§3): the weights train with the task loss + w_attn·Σ|ζ_attn| + w_mlp·Σ|ζ_mlp| at a constant lr; the
masks ζ start at 1 and are not in the optimizer. Every `interval` steps (and at the last step) the
importance of every mask entry (its gradient accumulated since the search began, as the official fp32
code, or the single-step gradient: option `importance`) is z-scored within the attention group and within
the FFN group (unbiased std), all entries are ranked together in descending order, and the entries past
the point where the cumulative weight is closest to p_t × total weight are selected; they are set to
1 - p_t/p, every other entry to 1, and each module keeps its lowest-ranked entry.
p_t = p·sin(π(t+1)/(2T)), so at the last step the selected masks are exactly 0 and the rest exactly 1.
The runner then extracts the subnet (masks == 1) and retrains it with the card's finetune block.

Options (card `method_options.upop`):
  weights          : "exact" (default; params per unit, i.e. 9234 vs 769 for DeiT-S: the ratio the
                     DeiT/Segmenter code intends), "exact_int" (that ratio truncated to an integer, 12 for
                     DeiT-S, which is what the official code computes: it writes 9234/769 into an integer
                     tensor) or "official_36" (36 per attention unit, 1 per FFN neuron: BLIP/CLIP code)
  threshold_rule   : "official" (default: units strictly above the threshold value are pruned, the unit at
                     the threshold position is kept) or "closest" (that unit is pruned too, so the removed
                     weight is the closest achievable to p x total)
  importance       : "accumulated" (default, official fp32 code) or "single_step" (the --amp / Segmenter path)
  update_at_step0  : false (DeiT/Segmenter code) or true (BLIP/CLIP code)
  attention_scale  : "fixed" (ViT/DeiT/Segmenter code: 1/sqrt(original head_dim)) or "sliced"
                     (BERT/CLIP code: 1/sqrt(kept dims)); default: the model family's official behaviour
  reinit_qkv_bias  : false (default: the sliced qkv bias is copied). true reproduces the official
                     ViT/DeiT extraction bug that leaves the new qkv bias at its random init (§9.9)
  ratio_basis      : "prunable" (default: p of the head-dim + FFN params) or "total" (p of ALL the model's
                     params, for cards with `ratio_basis: total` such as the VTrans tables, where the
                     embeddings count; UPop then removes p x total / prunable of its units' params)
Profile settings (card `profiles.<p>.upop`): search_epochs, lr (constant), batch_size, weight_decay,
interval (a number, or a mapping from p to interval with a `default`), w_sp_attn, w_sp_mlp; all required but
weight_decay (0.05), weight_decay_groups and drop_path (the recipe keys of the same names, for the search): the
sparsity weights differ per table and a silent 0 would switch the L1 term off. The search draws its batches
with the finetune block's `randaugment` (BLIP's RandomAugment): the official search and retrain share one loader;
it takes the finetune block's `distill_alpha_warmup` too (the retrieval scripts' one train() ramps alpha in both).
Both blocks are declared below (UPopOptions, UPopSettings).

Ablations, registered separately so tables show them as the paper does:
  upop_unified : the unified ranking without the progressive shrinking: masks stay 1 during the search
                 (importance still accumulates), the selected units are cut at the end.
  upop_uniform : progressive, but every module loses the same fraction p_t of its units (no unified ranking).
"""
from __future__ import annotations

from typing import Annotated, ClassVar, Literal

import torch
from pydantic import BeforeValidator, Field

from bench.api import Method, PruneResult
from bench.errors import BenchError
from bench.options import Fraction, NonNegFloat, OpenFraction, OptionsModel, PositiveFloat, PositiveInt
from bench.registry import register_method
from methods import _allocate as allocate
from methods._schedule import interval_for, sine_progress   # noqa: F401  (interval_for: re-exported)

ATTN_KINDS = ("head_dim",)
FFN_KINDS = ("ffn",)


class UPopOptions(OptionsModel):
    """The card's `method_options.upop` block (also upop_unified / upop_uniform): choices of the official code."""

    weights: Literal["exact", "exact_int", "official_36"] = Field(
        "exact", description="weight of a unit in the ranking: its params (exact), that ratio truncated to an int "
                             "as the DeiT/Segmenter code computes (exact_int), or 36 per attention unit (official_36, BLIP/CLIP)")
    threshold_rule: Literal["official", "closest"] = Field(
        "official", description="official: the unit at the threshold is kept; closest: it is pruned too")
    importance: Literal["accumulated", "single_step"] = Field(
        "accumulated", description="mask gradient accumulated since the search began (fp32 code) or of one step (--amp / Segmenter)")
    update_at_step0: bool = Field(False, description="also update the masks at step 0 (BLIP/CLIP code: true; DeiT/Segmenter: false)")
    attention_scale: Literal["official", "fixed", "sliced"] | None = Field(
        None, description="extraction: 1/sqrt(original head_dim) (fixed), 1/sqrt(kept dims) (sliced) or BLIP's "
                          "official rule; null: the model family's official behaviour")
    reinit_qkv_bias: bool = Field(False, description="extraction: reproduce the official ViT/DeiT bug that leaves the "
                                                     "sliced qkv bias at its random init")
    ratio_basis: Literal["prunable", "total"] = Field(
        "prunable", description="p is a fraction of the head-dim + FFN params (prunable) or of all the model's params (total)")


def _interval_keys(v):
    """Mapping keys written as text ("0.1", e.g. a config dumped to JSON) are read as the numbers they are."""
    if not isinstance(v, dict):
        return v
    out = {}
    for k, x in v.items():
        if isinstance(k, str) and k != "default":
            try:
                k = float(k)
            except ValueError:
                pass
        out[k] = x
    return out


Interval = Annotated[PositiveInt | dict[OpenFraction | Literal["default"], PositiveInt], BeforeValidator(_interval_keys)]


class UPopSettings(OptionsModel):
    """A profile's `upop:` block: the search budget and the sparsity weights (no defaults: they are per table)."""

    search_epochs: NonNegFloat = Field(description="epochs of the search (progressive mask updates), constant lr")
    lr: PositiveFloat = Field(description="constant learning rate of the search")
    batch_size: PositiveInt = Field(description="batch size of the search")
    interval: Interval = Field(description="steps between mask updates: a number, or a mapping {p: steps} with an "
                                           "optional `default` for the ratios it does not list")
    w_sp_attn: NonNegFloat = Field(description="weight of the L1 term on the attention (head-dim) masks (official --w_sp_attn)")
    w_sp_mlp: NonNegFloat = Field(description="weight of the L1 term on the FFN masks (official --w_sp_mlp)")
    weight_decay: NonNegFloat = Field(0.05, description="AdamW weight decay of the search")
    weight_decay_groups: Literal["no_norm_bias", "all"] = Field(
        "no_norm_bias", description="the search's decay groups, as the recipe key: all (the official BLIP/CLIP search "
                                    "optimizer decays every tensor but the masks) or no_norm_bias (timm's rule)")
    drop_path: Fraction | None = Field(
        None, description="stochastic depth of the search model, as the recipe key (official: 0.1 for BLIP NLVR2/VQA "
                          "and DeiT, none for caption/retrieval; none: the model's own)")
    optimizer: Literal["adamw", "sgd"] = Field(
        "adamw", description="the search's optimizer, as the recipe key (official: AdamW for BLIP/CLIP/DeiT, SGD with "
                             "Nesterov momentum for Segmenter, compress_segmenter.py l. 235-244); the masks are never in it")
    momentum: Fraction = Field(0.9, description="SGD momentum of the search (optimizer sgd)")
    nesterov: bool = Field(False, description="SGD with Nesterov momentum in the search (optimizer sgd)")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="the search's precision, as the recipe key (auto: bf16 on CUDA, fp32 on CPU; the official "
                            "searches run fp32); fp16 is refused: its GradScaler would scale the masks' gradients")

    # added after UPop cells were recorded: at their defaults they stay out of the cell's hash (OptionsModel.to_dict)
    HASH_STABLE_KEYS: ClassVar[tuple] = ("optimizer", "momentum", "nesterov", "precision")


def progress(t: int, total: int) -> float:
    """p_t / p = sin(π(t+1)/(2T)) (docs/specs/upop.md §3.6; methods._schedule.sine_progress)."""
    return sine_progress(t, total)


def zscore(x: torch.Tensor) -> torch.Tensor:
    std = x.std(unbiased=True) if x.numel() > 1 else x.new_tensor(0.0)
    return (x - x.mean()) / (std if std > 0 else 1.0)


def standardised_importance(groups, grads: dict) -> dict:
    """z-score the importance within the attention group and within the FFN group (each pooled over all
    modalities and layers); returns per-group tensors of standardised values."""
    out = {}
    for kinds in (ATTN_KINDS, FFN_KINDS):
        names = [g.name for g in groups if g.kind in kinds]
        if not names:
            continue
        flat = zscore(torch.cat([grads[n].detach().double().flatten() for n in names]))
        for n, chunk in zip(names, torch.split(flat, [grads[n].numel() for n in names])):
            out[n] = chunk
    return out


def unit_weights(groups, scheme: str) -> dict:
    if scheme == "exact":
        return {g.name: float(g.params_per_unit) for g in groups}
    if scheme == "official_36":
        return {g.name: 36.0 if g.kind in ATTN_KINDS else 1.0 for g in groups}
    if scheme == "exact_int":
        # the official DeiT/Segmenter code writes 9234/769 into an integer tensor: the weight becomes 12
        ffn = [g.params_per_unit for g in groups if g.kind in FFN_KINDS]
        ref = ffn[0] if ffn else 1
        return {g.name: float(int(g.params_per_unit / ref)) if g.kind in ATTN_KINDS else 1.0 for g in groups}
    raise BenchError(f"upop weights must be 'exact', 'exact_int' or 'official_36', got {scheme!r}")


def unified_selection(groups, values: dict, weights: dict, p_t: float, threshold_rule: str = "official",
                      return_protected: bool = False):
    """Units selected for pruning (True) by the unified weighted ranking of docs/specs/upop.md §3.3-3.5.

    The threshold is the value at the sorted position whose cumulative weight is closest to p_t x total.
    "official": units strictly above it are selected, the threshold unit itself is kept (so up to one
    unit fewer than the closest count is removed); "closest": the threshold unit is removed too, so the
    removed weight is the closest achievable to the target. With `return_protected`, also the units that the
    threshold selected but the keep-one-unit-per-module rule kept."""
    # the toolkit's weighted budget; its scores are "higher = kept", so the pruning values go in negated
    info: dict = {}
    keep = allocate.select(groups, {g.name: -values[g.name] for g in groups},
                           allocate.Weighted(p_t, weights, threshold_rule), keep_at_least="restore", info=info)
    sel = {g.name: ~keep[g.name] for g in groups}
    return (sel, info["protected"]) if return_protected else sel


def uniform_selection(groups, values: dict, p_t: float) -> dict:
    """Ablation: every module loses the fraction p_t of its units, ranked within the module."""
    counts = {g.name: min(int(round(p_t * values[g.name].numel())), values[g.name].numel() - 1) for g in groups}
    keep = allocate.select(groups, {g.name: -values[g.name] for g in groups}, allocate.Count(counts), pool="layer",
                           keep_at_least=None)
    return {g.name: ~keep[g.name] for g in groups}


@register_method("upop")
class UPop(Method):
    name = "upop"
    impl = "port"         # the suite's own code, following the official code wherever the spec says what it does
    finetune = True       # retrain the extracted subnet with the card's finetune block
    settings_key = "upop"
    description = "unified and progressive search of head-dim and FFN units, then retrain (UPop)"
    Options = UPopOptions
    Settings = UPopSettings
    progressive = True
    unified = True

    @classmethod
    def compress_epochs(cls, settings) -> float:
        return float(settings.search_epochs)

    def prune(self, ctx):
        opts, s, ft = self.typed_blocks(ctx)
        st = ctx.adapter.structure(ctx.model, ATTN_KINDS + FFN_KINDS)
        groups = list(st)
        masks = ctx.adapter.attach_unit_masks(ctx.model, st, ATTN_KINDS + FFN_KINDS)
        weights = unit_weights(groups, opts.weights)
        importance = opts.importance
        p = ctx.ratio.p
        if opts.ratio_basis == "total":
            total_params = sum(q.numel() for q in ctx.model.parameters())
            p = p * total_params / sum(g.size * g.params_per_unit for g in groups)
            if not 0 < p < 1:
                raise BenchError(f"upop: removing {ctx.ratio.p} of all {total_params} params needs {p:.3f} of the "
                                 "head-dim and FFN params; at most < 1 is possible")
        interval = interval_for(s.interval, ctx.ratio.p)
        total = max(1, int(round(s.search_epochs * ctx.task.steps_per_epoch(s.batch_size))))
        at_step0 = opts.update_at_step0
        w_attn, w_mlp = float(s.w_sp_attn), float(s.w_sp_mlp)
        kind_of = {g.name: g.kind for g in groups}
        attn_masks = [m for n, m in masks.items() if kind_of[n] in ATTN_KINDS]
        ffn_masks = [m for n, m in masks.items() if kind_of[n] in FFN_KINDS]
        history = []
        kept_by_rule = {"weight": 0.0}   # weight the keep-one-unit-per-module rule kept at the last update

        def l1():
            return w_attn * sum(m.abs().sum() for m in attn_masks) + w_mlp * sum(m.abs().sum() for m in ffn_masks)

        def update(t):
            p_t = p * progress(t, total)
            grads = {n: (m.grad if m.grad is not None else torch.zeros_like(m)) for n, m in masks.items()}
            values = standardised_importance(groups, grads)
            if self.unified:
                sel, protected = unified_selection(groups, values, weights, p_t, opts.threshold_rule,
                                                   return_protected=True)
                kept_by_rule["weight"] = sum(int(protected[g.name].sum()) * weights[g.name] for g in groups)
            else:
                sel = uniform_selection(groups, values, p_t)
            selected_value = 1.0 - p_t / p if self.progressive else 1.0
            if t == total - 1:
                selected_value = 0.0          # p_t = p exactly: the selected masks become exactly 0
            with torch.no_grad():
                for n, m in masks.items():
                    m.copy_(torch.where(sel[n].to(m.device), torch.full_like(m, selected_value), torch.ones_like(m)))
            removed = sum(int(sel[g.name].sum()) * g.params_per_unit for g in groups)
            history.append({"step": t, "p_t": round(p_t, 6), "mask_value": round(selected_value, 6),
                            "removed_param_fraction": removed / sum(g.size * g.params_per_unit for g in groups)})

        def on_step(t, _total):
            if (t % interval == 0 and (t > 0 or at_step0)) or t == total - 1:
                update(t)
            if importance == "single_step":
                for m in masks.values():
                    m.grad = None

        def get_state():
            """What a training-state checkpoint of the search must add (bench.train_state): the masks, their
            accumulated gradients (the importance; no optimizer holds them) and the update history."""
            return {"masks": {n: m.detach().clone() for n, m in masks.items()},
                    "grads": {n: None if m.grad is None else m.grad.detach().clone() for n, m in masks.items()},
                    "history": list(history), "kept_weight": kept_by_rule["weight"]}

        def set_state(st):
            with torch.no_grad():
                for n, m in masks.items():
                    m.copy_(st["masks"][n])
                    g = st["grads"][n]
                    m.grad = None if g is None else g.to(device=m.device, dtype=m.dtype)
            history[:] = st["history"]
            kept_by_rule["weight"] = st["kept_weight"]

        stats = ctx.train(ctx.model, epochs=s.search_epochs, lr=s.lr, min_lr=s.lr, warmup_epochs=0,
                          batch_size=s.batch_size, weight_decay=s.weight_decay,
                          weight_decay_groups=s.weight_decay_groups, drop_path=s.drop_path,
                          optimizer=s.optimizer, momentum=s.momentum, nesterov=s.nesterov, precision=s.precision,
                          # the official search iterates the retrain's train_loader (BLIP's transform_train, e.g.
                          # compress_nlvr.py l. 181, 208, 250): its batches get the finetune block's randaugment
                          randaugment=ft.randaugment if ft is not None else None,
                          # and its train() ramps the distillation alpha over epoch 0 of the search too
                          # (compress_retrieval.py l. 88-91, compress_retrieval_clip.py l. 103-106)
                          distill_alpha_warmup=ft.distill_alpha_warmup if ft is not None else "none",
                          on_step=on_step, extra_loss=l1 if (w_attn or w_mlp) else None,
                          state_hooks=(get_state, set_state))
        final = {n: m.detach().cpu() for n, m in masks.items()}
        bad = [n for n, m in final.items() if not bool(((m == 0) | (m == 1)).all())]
        if bad:
            raise BenchError(f"UPop masks are not exactly 0/1 after the last update: {bad[:3]}")
        # only what the card chose: unset, the adapter applies its family's official behaviour
        extract_options = {k: getattr(opts, k) for k in ("attention_scale", "reinit_qkv_bias")
                           if getattr(opts, k) not in (None, False)}
        info = {}
        if opts.weights != "exact":
            # p is a fraction of the weighted units, not of the params (BLIP/CLIP: 36 per attention unit), so
            # the runner checks the ratio in that unit: within one unit of each kind, as for params
            total_w = sum(g.size * weights[g.name] for g in groups)
            removed_w = sum(int((final[g.name] == 0).sum()) * weights[g.name] for g in groups)
            # the official rule keeps one unit per module even when the ranking selects all of them (micro
            # models, where one attention unit weighs 36 but holds far fewer params, hit this): that weight
            # is short of the target by design, so it widens the tolerance and is recorded
            info["ratio_check"] = {
                "unit": f"weighted units ({opts.weights})", "target": p * total_w, "achieved": removed_w,
                "kept_by_min_one_rule": kept_by_rule["weight"],
                "tolerance": max(weights.values()) * len({g.kind for g in groups}) + kept_by_rule["weight"]}
        info.update({"search": {"steps": total, "interval": interval, "updates": len(history),
                                "importance": importance, "weights": opts.weights,
                                "train": stats}, "mask_updates": history})
        return PruneResult({n: m == 1 for n, m in final.items()}, st, extract_options=extract_options, info=info)


@register_method("upop_unified")
class UPopUnified(UPop):
    name = "upop_unified"
    description = "UPop ablation: unified ranking, no progressive shrinking (cut at the end of the search)"
    progressive = False


@register_method("upop_uniform")
class UPopUniform(UPop):
    name = "upop_uniform"
    description = "UPop ablation: progressive, but the same ratio p for every module (no unified ranking)"
    unified = False
