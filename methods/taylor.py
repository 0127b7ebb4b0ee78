"""First-order Taylor importance (Molchanov et al., "Importance Estimation for Neural Network Pruning", CVPR 2019),
one shot, then the card's finetune.

The importance of a unit is the first-order estimate of the loss change when its weights are removed:
    I(unit) = | sum over the unit's weights w of  w * dL/dw |,
w the weights the unit owns (every slice of its group: the qkv rows and proj columns of a head-dim unit, the
fc1 row + bias and fc2 column of an FFN neuron), dL/dw the gradient of the task's training loss. Gradients are
taken on `calibration_batches` training batches of `batch_size` (the model in eval mode: no dropout / drop path,
weights unchanged, no optimizer step): `criterion: abs_sum` sums w * dL/dw over the batches and takes the
absolute value of the sum (the gradient of the whole calibration set); `squared` averages the per-batch squares
(sum w * dL/dw)**2 (Molchanov 2019's accumulation). The units with the lowest importance are removed with SOMP's
selection (methods.magnitude.select_for_method: the same unit kinds and allocation, so the budget is SOMP's),
the runner extracts the subnet and finetunes it with the card's finetune block.

Options (card `method_options.taylor`, TaylorOptions): unit_kinds, allocation (+ GOHSP's budget keys), criterion.
Settings (profile `taylor:` block, TaylorSettings; optional): calibration_batches, batch_size.
Tensors that take no gradient (BLIP retrieval's momentum encoders) add nothing to a unit's importance; a task
whose training loss updates state (retrieval's momentum queues) does so during calibration too.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from bench.api import Method, PruneResult
from bench.options import OptionsModel, PositiveInt
from bench.registry import register_method
from methods._importance import per_unit_sum
from methods.magnitude import BudgetOptions, method_structure, select_for_method


class TaylorOptions(BudgetOptions):
    """The card's `method_options.taylor` block: SOMP's budget keys and the Taylor criterion."""

    criterion: Literal["abs_sum", "squared"] = Field(
        "abs_sum", description="abs_sum: |sum over the calibration batches of sum(w * dL/dw)|; squared: the mean over "
                               "batches of (sum(w * dL/dw))**2 (Molchanov 2019)")


class TaylorSettings(OptionsModel):
    """A profile's `taylor:` block (optional): the calibration budget."""

    calibration_batches: PositiveInt = Field(8, description="training batches whose gradients give the importance")
    batch_size: PositiveInt | None = Field(
        None, description="samples per calibration batch (none: the finetune block's batch_size, else 32)")


def unit_contributions(model, structure) -> dict:
    """Per group: sum over each unit's weights of w * w.grad (float64, on CPU; signed: the criterion takes |.| of
    the sum over batches); 0 where a tensor has no gradient."""
    return per_unit_sum(model, structure, lambda p: None if p.grad is None else (
        p.detach() * p.grad.detach()).to("cpu", torch.float64))


def taylor_scores(model, structure, task, device, batches: int, batch_size: int, seed: int,
                  criterion: str = "abs_sum") -> dict:
    """The Taylor importance of every unit over `batches` training batches (see the module docstring)."""
    was_training = model.training
    model.eval()
    it = task.train_batches(batch_size, seed)
    total = {g.name: torch.zeros(g.size, dtype=torch.float64) for g in structure}
    squares = {g.name: torch.zeros(g.size, dtype=torch.float64) for g in structure}
    try:
        for _ in range(batches):
            model.zero_grad(set_to_none=True)
            task.loss(model, next(it), device).backward()
            for n, c in unit_contributions(model, structure).items():
                total[n] += c
                squares[n] += c * c
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    if criterion == "squared":
        return {n: v / batches for n, v in squares.items()}
    return {n: v.abs() for n, v in total.items()}


@register_method("taylor")
class Taylor(Method):
    name = "taylor"
    impl = "baseline"
    finetune = True
    description = "first-order Taylor importance |sum w*dL/dw| per unit (Molchanov 2019), one shot + finetune"
    Options = TaylorOptions
    Settings = TaylorSettings

    def prune(self, ctx):
        o, s, ft = self.typed_blocks(ctx)
        st = method_structure(ctx)
        bs = s.batch_size or (ft.batch_size if ft is not None else 32)
        scores = taylor_scores(ctx.model, st, ctx.task, ctx.device, s.calibration_batches, bs, ctx.seed, o.criterion)
        keep = select_for_method(ctx, st, scores, ctx.ratio.p, o.allocation)
        return PruneResult(keep, st, info={"options": {
            "unit_kinds": st.kinds(), "allocation": o.allocation, "criterion": o.criterion,
            "calibration_batches": s.calibration_batches, "batch_size": bs}})
