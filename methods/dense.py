"""The uncompressed model (the 1x row): an identity method that keeps every unit."""
from bench.api import Method, PruneResult
from bench.registry import register_method


@register_method("dense")
class Dense(Method):
    name = "dense"
    impl = "dense"
    finetune = False   # the baseline is the trained (micro) or official (paper) model as it is
    description = "uncompressed model, no pruning and no extra training"

    def prune(self, ctx):
        return PruneResult(ctx.structure.full_keep(), ctx.structure)
