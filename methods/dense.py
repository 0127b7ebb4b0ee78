"""The uncompressed model (the 1x row): an identity method that keeps every unit."""
from bench.api import Method
from bench.registry import register_method


@register_method("dense")
class Dense(Method):
    name = "dense"
    impl = "dense"
    finetune = False   # the baseline is the trained (micro) or official (paper) model as it is
    description = "uncompressed model, no pruning and no extra training"

    def prune(self, ctx):
        return ctx.structure.full_keep()
