"""Wanda-sp: structured Wanda (Sun et al., "A Simple and Effective Pruning Approach for Large Language Models",
ICLR 2024, eq. 1; its structured variant as in An et al., FLAP, AAAI 2024, Table 1 "Wanda-sp"), one shot, then
the card's finetune.

The score of a weight is |W_ij| * ||X_j||_2, X_j its input feature over all tokens of `calib_batches`
training batches (run through the task's own loss, no gradient, eval mode); a unit's importance is the sum of
the scores of the weights it owns (l1; `norm: l2` the root of their sum of squares). The units with the lowest
importance are removed with SOMP's selection (the same unit kinds and allocation keys), the runner extracts the
subnet and finetunes it. Written with the method toolkit only (methods/_importance.py, _allocate.py,
_schedule.py): no module, config attribute or batch key of any family.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from bench.api import Method, PruneResult
from bench.options import OptionsModel, PositiveInt
from bench.registry import register_method
from methods import _importance as importance
from methods._schedule import one_shot
from methods.magnitude import MagnitudeOptions, method_structure, select_for_method


class WandaOptions(MagnitudeOptions):
    """The card's `method_options.wanda_sp` block: SOMP's keys, Wanda's defaults."""

    unit_kinds: list[Literal["head", "head_dim", "ffn", "hidden"]] = Field(
        ["head_dim", "ffn"], min_length=1, description="unit kinds to prune ([head_dim, ffn]: every family has them)")
    norm: Literal["l1", "l2"] = Field("l1", description="a unit's importance: the sum of its weights' Wanda scores "
                                                        "(l1, Wanda) or the root of their sum of squares (l2)")


class WandaSettings(OptionsModel):
    """A profile's `wanda_sp:` block (optional): the calibration data."""

    calib_batches: PositiveInt = Field(8, description="training batches whose inputs give ||X_j|| (Wanda: 128 samples)")
    calib_batch_size: PositiveInt | None = Field(
        None, description="samples per calibration batch (none: the finetune block's batch_size, else 32)")


@register_method("wanda_sp")
class WandaSP(Method):
    name = "wanda_sp"
    impl = "reimpl"
    finetune = True
    description = "structured Wanda: |W| x input activation norm per unit on calibration batches, one shot + finetune"
    Options = WandaOptions
    Settings = WandaSettings

    def prune(self, ctx):
        o, s, ft = self.typed_blocks(ctx)
        st = method_structure(ctx)
        model = ctx.model.to(ctx.device)
        bs = s.calib_batch_size or (ft.batch_size if ft is not None else 32)
        batches = ctx.task.train_batches(bs, ctx.seed + 11)
        sq = importance.input_sq_norms(
            model, st, lambda: importance.calibrate(model, ctx.task, batches, s.calib_batches, ctx.device))
        keep = select_for_method(ctx, st, importance.wanda(model, st, sq, o.norm), one_shot(ctx.ratio.p), o.allocation)
        return PruneResult(keep, st, info={"options": {
            "unit_kinds": st.kinds(), "allocation": o.allocation, "norm": o.norm,
            "calib_batches": s.calib_batches, "calib_batch_size": bs}})
