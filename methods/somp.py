"""SOMP: structured one-shot magnitude pruning (Han et al. 2016, single round), the benchmark's baseline.

Spec: docs/specs/gohsp_vtrans_baselines.md §4.1-4.2. From the converged dense model, score every unit
once by the norm of the weights it owns, remove the lowest-scoring units until the budget is met, then
the runner extracts the subnet and finetunes it with the card's finetune budget.

Options (card `method_options.somp`), each a guess of the spec made explicit:
  unit_kinds : unit kinds to prune (default [head, ffn], GOHSP's heterogeneous structure; upop_deit uses
               [head_dim, ffn] to match UPop's units)
  allocation : per_type (default; one ranking per kind across layers, p of each kind's params),
               per_layer, global (scores divided by sqrt(params per unit)), or gohsp (GOHSP's unit
               budgets for p of the total params: same kept head/head-dim/FFN counts as GOHSP)
  norm       : l2 (default) or l1
  head_budget, attn_split, ffn_budget : with allocation gohsp, GOHSP's budget options (methods/gohsp.py)
(declared in methods.magnitude.MagnitudeOptions)
"""
from bench.api import Method, PruneResult
from bench.registry import register_method
from methods._schedule import one_shot
from methods.magnitude import MagnitudeOptions, method_structure, select_for_method, unit_scores


@register_method("somp")
class SOMP(Method):
    name = "somp"
    impl = "baseline"
    finetune = True
    description = "structured one-shot magnitude pruning + finetune"
    Options = MagnitudeOptions     # no profile settings: the finetune block is the runner's

    def prune(self, ctx):
        o, _, _ = self.typed_blocks(ctx)
        st = method_structure(ctx)
        scores = unit_scores(ctx.model, st, o.norm)
        keep = select_for_method(ctx, st, scores, one_shot(ctx.ratio.p), o.allocation)
        return PruneResult(keep, st, info={"options": {"unit_kinds": st.kinds(), "allocation": o.allocation,
                                                       "norm": o.norm}})
