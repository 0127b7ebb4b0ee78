"""Random units: the floor any structured-pruning method must beat.

From the converged dense model, give every unit of the chosen kinds an independent uniform random score (a
`torch.Generator` seeded by the cell's seed, so seeds differ and a rerun repeats) and remove the lowest-scoring
units with exactly the selection SOMP uses (methods.magnitude.select_for_method), so the units are random but
the budget is SOMP's: the same unit kinds, the same allocation (per_type: p of each kind's params; per_layer,
global, gohsp as SOMP), the same min-one-unit-per-group rule. The runner then extracts the subnet and finetunes
it with the card's finetune block, as SOMP. A method whose rows do not beat `random` at the same training compute
has not shown that its criterion matters.

Options (card `method_options.random`, declared in RandomOptions): unit_kinds, allocation and GOHSP's budget
options, as SOMP's block (mirror the card's somp block); there is no norm.
"""
from __future__ import annotations

import torch

from bench.api import Method, PruneResult
from bench.registry import register_method
from methods.magnitude import BudgetOptions, method_structure, select_for_method


class RandomOptions(BudgetOptions):
    """The card's `method_options.random` block: SOMP's budget keys without the score (the scores are random)."""


def random_scores(structure, seed: int) -> dict:
    """Independent U(0, 1) scores per unit, from a generator seeded by `seed` (the global RNG is not touched)."""
    g = torch.Generator().manual_seed(int(seed))
    return {grp.name: torch.rand(grp.size, generator=g, dtype=torch.float64) for grp in structure}


@register_method("random")
class RandomUnits(Method):
    name = "random"
    impl = "baseline"
    finetune = True
    description = "random units at SOMP's per-kind budget + finetune (the floor)"
    Options = RandomOptions

    def prune(self, ctx):
        o, _, _ = self.typed_blocks(ctx)
        st = method_structure(ctx)
        scores = random_scores(st, ctx.seed)
        keep = select_for_method(ctx, st, scores, ctx.ratio.p, o.allocation)
        return PruneResult(keep, st, info={"options": {"unit_kinds": st.kinds(), "allocation": o.allocation,
                                                       "seed": int(ctx.seed)}})
