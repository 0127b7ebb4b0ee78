"""SGMP: structured gradual magnitude pruning with Zhu & Gupta's (2018) cubic schedule.

Spec: docs/specs/gohsp_vtrans_baselines.md §4.3. One training run of the card's finetune length (the
same number of steps SOMP finetunes, so both get equal compute). Pruning events at
t = t0, t0+dt, ..., t0+n*dt raise the removed fraction to
    s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n*dt))**3,   s_i = 0, s_f = p,
re-scoring the units still alive by magnitude and removing more of the lowest ones (no regrowth).
Removed weights are held at zero after every optimizer step; after t0+n*dt the run goes on as the
recovery phase. The runner then extracts the subnet (exact: the removed weights are zero) and does
not finetune again.

Options (card `method_options.sgmp`): unit_kinds, allocation, norm as SOMP; schedule from the
profile's `sgmp` block: prune_start_epoch (t0, default 0), prune_end_fraction (fraction of the run
by which s_f is reached, default 0.5), prune_events (n, default 10).
"""
from pydantic import Field

from bench.api import Method, PruneResult
from bench.errors import BenchError
from bench.options import Fraction, NonNegFloat, OptionsModel, PositiveInt
from bench.registry import register_method
from bench.structure import apply_param_masks, param_masks
from methods._schedule import cubic_sparsity, prune_steps   # noqa: F401  (the schedule; re-exported)
from methods.magnitude import MagnitudeOptions, method_structure, select_for_method, unit_scores


class SGMPSettings(OptionsModel):
    """A profile's `sgmp:` block: the cubic schedule (the run's length is the card's finetune block)."""

    prune_start_epoch: NonNegFloat = Field(0.0, description="t0: epoch of the first pruning event")
    prune_end_fraction: Fraction = Field(0.5, description="fraction of the run by which the final sparsity p is reached")
    prune_events: PositiveInt = Field(10, description="n: number of pruning events after the first")


@register_method("sgmp")
class SGMP(Method):
    name = "sgmp"
    impl = "baseline"
    finetune = False   # the gradual run is the finetune (equal compute with SOMP)
    uses_finetune_budget = True
    description = "structured gradual magnitude pruning (cubic schedule) during training"
    Options = MagnitudeOptions
    Settings = SGMPSettings

    def prune(self, ctx):
        o, sched, ft = self.typed_blocks(ctx)
        if ft is None:
            raise BenchError("sgmp trains for the card's finetune block (epochs, lr, batch_size), and this profile "
                             "has none")
        st = method_structure(ctx)
        norm, allocation = o.norm, o.allocation
        spe = ctx.task.steps_per_epoch(ft.batch_size)
        total = max(1, int(round(ft.epochs * spe)))
        t0, dt, n = prune_steps(total, spe, sched.prune_start_epoch, sched.prune_end_fraction, sched.prune_events)
        event_steps = {t0 + k * dt for k in range(n + 1)}
        keep = st.full_keep()
        state = {"masks": None}
        history = []

        def prune_event(step):
            s_t = cubic_sparsity(step, t0, dt, n, 0.0, ctx.ratio.p)
            removed = {k: ~v for k, v in keep.items()}
            new = select_for_method(ctx, st, unit_scores(ctx.model, st, norm), s_t, allocation, already_removed=removed)
            keep.update(new)
            state["masks"] = param_masks(ctx.model, st, keep)
            kept_units = {}   # per kind, keyed ":<kind>" like the group-name suffix
            for g in st:
                kept_units[":" + g.kind] = kept_units.get(":" + g.kind, 0) + int(keep[g.name].sum())
            history.append({"step": step, "target": round(s_t, 6), "kept_units": kept_units})

        def on_step(step, _total):
            if step in event_steps:
                prune_event(step)
            if state["masks"] is not None:
                apply_param_masks(ctx.model, state["masks"])

        if t0 >= total:
            prune_event(t0)
        stats = ctx.train(ctx.model, recipe=ft, on_step=on_step)
        if cubic_sparsity(max(event_steps), t0, dt, n, 0.0, ctx.ratio.p) < ctx.ratio.p - 1e-9:
            prune_event(max(event_steps))
        return PruneResult(keep, st, info={
            "schedule": {"t0": t0, "dt": dt, "n": n, "total_steps": total}, "events": history, "train": stats,
            "options": {"unit_kinds": st.kinds(), "allocation": allocation, "norm": norm}})
