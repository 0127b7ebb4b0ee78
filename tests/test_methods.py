"""SOMP / SGMP: the cubic schedule, the requested ratio reached within one unit, no regrowth."""
import functools

import pytest
import torch
import torch.nn.functional as F

from bench.api import CellContext, RatioSpec
from bench.options import parse_block
from bench.recipe import TrainRecipe
from bench.registry import METHODS
from bench.structure import kept_param_count, param_masks
from bench.training import train
from methods.magnitude import select_units, unit_scores
from methods.sgmp import cubic_sparsity, prune_steps
from tests.conftest import build


def test_cubic_schedule_formula():
    # s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n dt))^3, held at s_f after t0 + n dt, s_i before t0
    t0, dt, n, si, sf = 10, 5, 4, 0.0, 0.5
    for t in range(0, 60):
        got = cubic_sparsity(t, t0, dt, n, si, sf)
        if t < t0:
            want = si
        elif t >= t0 + n * dt:
            want = sf
        else:
            want = sf + (si - sf) * (1 - (t - t0) / (n * dt)) ** 3
        assert got == pytest.approx(want, abs=1e-12)
    assert cubic_sparsity(20, t0, dt, n, si, sf) == pytest.approx(0.5 - 0.5 * 0.5 ** 3)
    assert prune_steps(total_steps=100, steps_per_epoch=10, start_epoch=1, end_fraction=0.5, events=8) == (10, 5, 8)


@pytest.fixture(scope="module")
def deit_small():
    return build("deit_small_patch16_224")


@pytest.mark.parametrize("allocation", ["per_type", "per_layer", "global"])
@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_selection_reaches_ratio_within_one_unit(allocation, p, deit_small):
    adapter, model = deit_small
    st = adapter.structure(model, ["head_dim", "ffn"])
    keep = select_units(st, unit_scores(model, st), p, allocation)
    counts = kept_param_count(model, st, keep)
    if allocation == "per_type":
        for kind in ("head_dim", "ffn"):
            groups = [g for g in st if g.kind == kind]
            total = sum(g.size * g.params_per_unit for g in groups)
            removed = sum(int((~keep[g.name]).sum()) * g.params_per_unit for g in groups)
            assert abs(removed - p * total) <= groups[0].params_per_unit / 2 + 1e-6
    elif allocation == "per_layer":
        for g in st:
            assert abs(int((~keep[g.name]).sum()) * g.params_per_unit - p * g.size * g.params_per_unit) <= g.params_per_unit / 2
    else:
        assert abs(counts["removed"] - p * counts["prunable_dense"]) <= max(g.params_per_unit for g in st)
    assert all(int(k.sum()) >= 1 for k in keep.values())


def test_magnitude_prunes_the_smallest_units():
    adapter, model = build("vit_micro")
    st = adapter.structure(model, ["ffn"])
    with torch.no_grad():
        model.blocks[0].mlp.fc1.weight[:5] *= 1e-3   # make neurons 0-4 of block 0 tiny
    keep = select_units(st, unit_scores(model, st), 0.05, "per_layer")
    assert not keep["blocks.0.mlp:ffn"][:5].any()


class TinyTask:
    """Random images, labels from a fixed linear rule: just enough to train for a few steps."""
    metrics = {"top1": True}

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(256, 3, 32, 32, generator=g)
        self.y = (self.x.mean((1, 2, 3)) > 0).long()

    def steps_per_epoch(self, bs):
        return len(self.x) // bs

    def train_batches(self, bs, seed, recipe=None):
        g = torch.Generator().manual_seed(seed)
        while True:
            perm = torch.randperm(len(self.x), generator=g)
            for i in range(0, len(perm) - bs + 1, bs):
                yield self.x[perm[i:i + bs]], self.y[perm[i:i + bs]]

    def loss(self, model, batch, device, recipe=None):
        return F.cross_entropy(model(batch[0]), batch[1])


def _ctx(method, p, model, adapter, task, epochs=2.0):
    """A context with typed blocks, as the runner hands them."""
    M = METHODS.get(method)
    ft = TrainRecipe(epochs=epochs, lr=1e-3, batch_size=32)
    sched = {"prune_start_epoch": 0, "prune_end_fraction": 0.5, "prune_events": 4} if method == "sgmp" else {}
    return CellContext(model=model, adapter=adapter, structure=adapter.structure(model), task=task,
                       ratio=RatioSpec("x", p), options=M.Options(unit_kinds=["head_dim", "ffn"]),
                       settings={"finetune": ft, "method": parse_block(M.Settings, sched, method)},
                       device=torch.device("cpu"), seed=0,
                       train=functools.partial(train, task=task, device="cpu", seed=0), log=lambda m: None)


def test_sgmp_gradual_run():
    adapter, model = build("vit_micro")
    task = TinyTask()
    ctx = _ctx("sgmp", 0.4, model, adapter, task)
    res = METHODS.get("sgmp")().prune(ctx)
    keep = res.keep
    st = res.structure
    events = res.info["events"]
    sched = res.info["schedule"]
    assert len(events) == sched["n"] + 1
    for e in events:   # every event's target is the cubic schedule value at its step
        assert e["target"] == pytest.approx(cubic_sparsity(e["step"], sched["t0"], sched["dt"], sched["n"], 0, 0.4), abs=1e-6)
    kept_ffn = [e["kept_units"][":ffn"] for e in events]
    assert kept_ffn == sorted(kept_ffn, reverse=True)      # no regrowth
    # final ratio within one unit per kind, and removed weights are exactly zero in the trained model
    for kind in ("head_dim", "ffn"):
        groups = [g for g in st if g.kind == kind]
        total = sum(g.size * g.params_per_unit for g in groups)
        removed = sum(int((~keep[g.name]).sum()) * g.params_per_unit for g in groups)
        assert abs(removed - 0.4 * total) <= groups[0].params_per_unit / 2 + 1e-6
    params = dict(model.named_parameters())
    for name, m in param_masks(model, st, keep).items():
        assert torch.all(params[name][(m == 0).expand_as(params[name])] == 0)


def test_somp_one_shot():
    adapter, model = build("vit_micro")
    ctx = _ctx("somp", 0.3, model, adapter, TinyTask())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = METHODS.get("somp")().prune(ctx)
    keep = res.keep
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # SOMP itself does not train
    counts = kept_param_count(model, res.structure, keep)
    assert abs(counts["removed"] - 0.3 * counts["prunable_dense"]) <= 2 * max(g.params_per_unit for g in res.structure)
