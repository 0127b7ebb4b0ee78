"""VTrans's phase 1 runs in the shared training loop (bench.training.train), so it scales and resumes as every
other phase: a checkpoint mid-phase resumes bit-identically (VIB masks, their optimizer, the multipliers, the layer
map, the history); bf16 autocast on CPU; on 2 gloo ranks the keep-masks are the same on both ranks, and with
`sharding: fsdp` (student and teacher sharded) phase 1 trains like the non-sharded 2-rank run within fp32 rounding
(atol = rtol = 1e-5 on the VIB parameters; the same keep-masks). With frozen weights (faster_vtrans) the teacher is
the student without its masks (no copy), which gives the keep-masks pinned in tests/test_keep_masks_pinned.py."""
from __future__ import annotations

import functools

import pytest
import torch

from bench.errors import BenchError
from bench.training import train
from tests.test_distributed import _spawn
from tests.test_vtrans import _ctx

TOL = dict(atol=1e-5, rtol=1e-5)
SETTINGS = {"epochs": 2, "batch_size": 16}     # 96 training examples: 6 steps per epoch, 12 steps


class _Stop(Exception):
    pass


def _run(method="vtrans", p=0.4, options=None, settings=None, **train_kw):
    torch.manual_seed(0)
    ctx, m = _ctx(method, p, options=options, settings={**SETTINGS, **(settings or {})}, train_size=96)
    ctx.train = functools.partial(train, task=ctx.task, device="cpu", seed=0, adapter=ctx.adapter, quiet=True,
                                  **train_kw)
    return ctx, m


def _outcome(res):
    return {"keep": {k: v.clone() for k, v in res.keep.items()}, "history": res.info["phase1"]["history"],
            "es": res.info["phase1"]["final_expected_sparsity"], "phase1": res.info["phase1"]}


def test_phase1_stopped_after_a_checkpoint_resumes_bit_identically(tmp_path):
    ctx, m = _run()
    ref = _outcome(m.prune(ctx))

    ctx, m = _run(state_dir=tmp_path / "vtrans", state_every_steps=4)
    calls = []
    real = ctx.task.loss_from_output

    def dying(*a, **k):   # killed in the middle of phase 1, during step 7 (checkpoints at steps 4 and 8)
        calls.append(1)
        if len(calls) == 7:
            raise _Stop
        return real(*a, **k)
    ctx.task.loss_from_output = dying
    with pytest.raises(_Stop):
        m.prune(ctx)
    assert sorted(p.name for p in (tmp_path / "vtrans").iterdir() if p.suffix == ".pt")   # a checkpoint is there

    ctx, m = _run(state_dir=tmp_path / "vtrans", state_every_steps=4)
    got = _outcome(m.prune(ctx))
    assert got["phase1"]["resumed_from_step"] == 4
    for k, v in ref["keep"].items():
        assert torch.equal(got["keep"][k], v), k
    assert got["history"] == ref["history"] and got["es"] == ref["es"]


def test_phase1_in_bf16_autocast_on_cpu():
    ctx, m = _run(settings={"precision": "bf16"})
    res = m.prune(ctx)
    ph = res.info["phase1"]
    assert ph["precision"] == "bf16" and ph["steps"] == 12
    assert all(h["expected_sparsity"] == h["expected_sparsity"] for h in ph["history"])   # finite (no NaN)
    assert res.info["hard"]["achieved_sparsity"] == pytest.approx(0.4, abs=0.02)


def test_phase1_with_gradient_accumulation_keeps_the_cards_steps():
    ctx, m = _run(micro_batch=8)
    ph = m.prune(ctx).info["phase1"]
    assert (ph["steps"], ph["micro_batch_size"], ph["accumulation_steps"]) == (12, 8, 2)


def test_frozen_weights_use_the_student_without_masks_as_teacher():
    """faster_vtrans: no teacher copy; its distillation targets are those of a frozen copy (checked by the pinned
    keep-masks); here: the weights end as they started, and no second model was made."""
    ctx, m = _run("faster_vtrans")
    before = {k: v.clone() for k, v in ctx.model.state_dict().items()}
    made = []
    import copy
    real = copy.deepcopy

    def counting(x, *a, **k):
        if isinstance(x, torch.nn.Module) and x is ctx.model:
            made.append(1)
        return real(x, *a, **k)
    copy.deepcopy = counting
    try:
        res = m.prune(ctx)
    finally:
        copy.deepcopy = real
    assert made == [] and res.info["phase1"]["train_weights"] is False
    q = "bert.encoder.layer.0.attention.self.query.weight"
    assert torch.equal(ctx.model.state_dict()[q], before[q])


# ------------------------------------------------------------------------------------------- on 2 ranks

def _on_rank(rank, cache):
    import os
    os.environ["BENCH_CACHE"] = f"{cache}/rank{rank}"   # each rank prepares the micro data set in its own folder
    out = {}
    for sharding in ("none", "fsdp"):
        ctx, m = _run(sharding=sharding)
        res = m.prune(ctx)
        out[sharding] = {"keep": res.keep, "phase1": res.info["phase1"],
                         "state": {k: v.detach().clone() for k, v in ctx.model.state_dict().items()}}
    ctx, m = _run("faster_vtrans", sharding="fsdp")
    out["faster"] = m.prune(ctx).info["phase1"]
    ctx, m = _run(options={"selection": "val", "select_every": 2}, sharding="fsdp")
    try:
        m.prune(ctx)
    except BenchError as e:
        out["refused"] = str(e)
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("vtrans_ranks")
    return _spawn(_on_rank, out, str(out / "cache"))


def test_two_ranks_agree_and_fsdp_trains_like_the_non_sharded_run(ranks):
    for r in ranks:
        a, b = r["fsdp"], r["none"]
        assert (a["phase1"]["sharding"], a["phase1"]["world_size"]) == ("fsdp", 2)
        assert (b["phase1"]["sharding"], b["phase1"]["steps"]) == ("none", 12)
        for k in b["keep"]:
            assert torch.equal(a["keep"][k], b["keep"][k]), k
        for k, v in b["state"].items():   # the folded, trained weights of the sharded student
            torch.testing.assert_close(a["state"][k], v, **TOL, msg=lambda s: f"{k}: {s}")
        assert a["phase1"]["final_expected_sparsity"] == pytest.approx(b["phase1"]["final_expected_sparsity"],
                                                                       abs=1e-5)
    for mode in ("none", "fsdp"):   # the same keep-masks on both ranks
        for k, v in ranks[0][mode]["keep"].items():
            assert torch.equal(v, ranks[1][mode]["keep"][k]), (mode, k)


def test_two_ranks_frozen_weights_and_the_refusal(ranks):
    for r in ranks:
        assert r["faster"]["sharding"] == "none" and r["faster"]["world_size"] == 2
        assert r["refused"].startswith("vtrans: selection val with sharding fsdp")
        assert r["refused"].endswith("run phase 1 without --sharding fsdp")
