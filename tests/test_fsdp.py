"""`sharding: fsdp` (bench.sharding) on this CPU machine: 2 gloo ranks, torch FSDP2 on a fully-sharded twin.

- a 2-rank fsdp phase ends with the weights of the 2-rank non-sharded phase and of one process at the same
  effective batch, within fp32 rounding: the same per-sample gradients summed in another order (FSDP's
  reduce-scatter per micro-batch against one all-reduce per step; one process: another accumulation order), so
  weights agree to ~1e-6 after 8 AdamW steps, asserted at atol = rtol = 1e-5; the toy net has uneven shards (5
  and 1 rows over 2 ranks: one rank holds none), a 0-dim parameter (replicated, gradient averaged), a buffer, a
  mask outside the optimizer (gradient averaged, as UPop's) and gradient clipping;
- after the phase the caller's model is the plain module it was (its class, no DTensor parameter), whole on every
  rank (bit-identical across the ranks);
- an `on_step` that changes the model (as SGMP masks weights) sees the whole model and its change reaches the
  sharded copy;
- a sharded phase stopped after a checkpoint and run again resumes from it and ends bit-identical to the
  uninterrupted sharded run; the checkpoint is a non-sharded one (whole weights, torch.optim state): a phase
  without sharding resumes from it too (within the tolerance above);
- an `extra_loss` that reads the model's own weights (GOHSP's ADMM penalty) is refused with one line; so is fp16;
- BLIP retrieval (root-only sharding, its frozen momentum encoders replicated) keeps its in-forward EMA update and
  trains like the non-sharded run;
- GPT-2 (tied embedding and LM head) and LLaMA micro models sharded per block by their adapters train like the
  non-sharded run (atol = rtol = 1e-5).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from bench.api import ModelAdapter
from bench.errors import BenchError
from bench.training import train
from tests.test_distributed import WORLD, _spawn
from tests.test_train_loop import R, SeqTask

TOL = dict(atol=1e-5, rtol=1e-5)


class ToyNet(nn.Module):
    """fc1 (4 -> 8) and mid (8 -> 5) are the shard units, fc2 (5 -> 1) stays in the root: 5 rows shard 3 + 2 and
    1 row 1 + 0 over 2 ranks. `scale` is 0-dim (FSDP cannot shard it), `seen` a buffer the training forward
    updates, `mask` a tensor outside the optimizer that takes gradients."""

    def __init__(self, drop=0.0):
        super().__init__()
        self.fc1, self.mid, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 5), nn.Linear(5, 1)
        self.scale = nn.Parameter(torch.tensor(1.5))
        self.register_buffer("seen", torch.zeros(()))
        self.drop = nn.Dropout(drop)
        self.mask = torch.ones(8, requires_grad=True)

    def forward(self, x):
        if self.training:
            self.seen += x.shape[0]
        h = self.drop(torch.relu(self.fc1(x)) * self.mask)
        return self.fc2(torch.tanh(self.mid(h))) * self.scale


class ToyAdapter(ModelAdapter):
    family = "toy"

    def __init__(self):
        super().__init__("toy", {})

    def shard_units(self, model):
        return [model.fc1, model.mid]


def toy(seed=0, drop=0.0):
    torch.manual_seed(seed)
    return ToyNet(drop)


def _state(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _l1(m):
    return lambda: 1e-2 * m.mask.abs().sum()


RECIPE = dict(epochs=2, clip_grad=0.5, micro_batch_size=2)   # 8 steps; 2 ranks x 2 micro-batches of 2 per step


def _finetune(sharding):
    m = toy()
    cls = type(m)
    stats = train(m, SeqTask(noise=False), R(**RECIPE, sharding=sharding), device="cpu", seed=1, adapter=ToyAdapter(),
                  extra_loss=_l1(m), quiet=True)
    from torch.distributed.tensor import DTensor
    return {"state": _state(m), "mask_grad": m.mask.grad.clone(), "stats": stats, "same_class": type(m) is cls,
            "dtensors": [n for n, p in m.named_parameters() if isinstance(p, DTensor) or isinstance(p.grad, DTensor)]}


def _with_on_step(sharding):
    """As SGMP: on_step zeroes fc1's first row on the model after every step."""
    m = toy()
    seen = []

    def on_step(step, total):
        seen.append(float(m.fc1.weight.detach().abs().sum()))
        with torch.no_grad():
            m.fc1.weight[0].zero_()
    train(m, SeqTask(noise=False), R(**RECIPE, sharding=sharding), device="cpu", seed=1, adapter=ToyAdapter(),
          on_step=on_step, quiet=True)
    return {"state": _state(m), "seen": seen}


class _Stop(Exception):
    pass


def _resume(state_dir):
    """Checkpoints every 3 steps, dropout on; the sharded phase stopped during step 5 (by its extra_loss: no on_step,
    so the plain sharded path), then run again; the uninterrupted sharded run; a non-sharded run resuming from the
    sharded run's checkpoint."""
    kw = dict(device="cpu", seed=1, state_every_steps=3, quiet=True, adapter=ToyAdapter())
    calls = []

    def stopping(m):
        def extra():
            calls.append(1)
            if len(calls) == 5:
                raise _Stop
            return 1e-2 * m.mask.abs().sum()
        return extra

    m = toy(drop=0.2)
    with pytest.raises(_Stop):
        train(m, SeqTask(), R(**RECIPE, sharding="fsdp"), extra_loss=stopping(m), state_dir=state_dir + "/a", **kw)
    m = toy(drop=0.2)
    resumed = train(m, SeqTask(), R(**RECIPE, sharding="fsdp"), extra_loss=_l1(m), state_dir=state_dir + "/a", **kw)
    ref = toy(drop=0.2)
    train(ref, SeqTask(), R(**RECIPE, sharding="fsdp"), extra_loss=_l1(ref), **kw)
    calls.clear()
    m2 = toy(drop=0.2)
    with pytest.raises(_Stop):
        train(m2, SeqTask(), R(**RECIPE, sharding="fsdp"), extra_loss=stopping(m2), state_dir=state_dir + "/b", **kw)
    m2 = toy(drop=0.2)
    plain = train(m2, SeqTask(), R(**RECIPE), extra_loss=_l1(m2), state_dir=state_dir + "/b", **kw)
    return {"resumed_from": resumed.get("resumed_from_step"), "state": _state(m), "uninterrupted": _state(ref),
            "plain_resumed_from": plain.get("resumed_from_step"), "plain_state": _state(m2)}


def _refusals():
    out = {}
    m = toy()
    try:       # an extra_loss on the model's own weights (GOHSP's ADMM penalty) would train the caller's copy
        train(m, SeqTask(noise=False), R(**RECIPE, sharding="fsdp"), device="cpu", seed=1, adapter=ToyAdapter(),
              extra_loss=lambda: 1e-3 * m.fc1.weight.pow(2).sum(), quiet=True)
    except BenchError as e:
        out["penalty"] = str(e)
    from bench import sharding
    try:
        sharding.check_sharding("fsdp", "fp16", 2, "finetune")
    except BenchError as e:
        out["fp16"] = str(e)
    return out


class LMTask:
    """Next-token cross-entropy on random token windows (seeded, a fixed order)."""

    name = "lm"
    RECIPE_KEYS = frozenset()

    def __init__(self, vocab, seq=12, n=16):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, seq), generator=g)
        self.n = n

    def steps_per_epoch(self, bs):
        return self.n // bs

    def train_batches(self, bs, seed, recipe=None):
        while True:
            for i in range(0, self.n - bs + 1, bs):
                yield self.ids[i:i + bs]

    def loss(self, model, batch, device, recipe=None):
        logits = model(input_ids=batch.to(device)).logits[:, :-1].float()
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def _family(arch, sharding):
    from tests.conftest import build
    adapter, m = build(arch)
    cls = type(m)
    task = LMTask(int(adapter.config["vocab_size"]))
    stats = train(m, task, {"epochs": 0.75, "lr": 1.0e-3, "batch_size": 4, "clip_grad": 1.0, "sharding": sharding},
                  device="cpu", seed=1, adapter=adapter, quiet=True)
    units = len(adapter.shard_units(m))
    return {"state": _state(m), "stats": stats, "same_class": type(m) is cls, "units": units}


class RetrievalTask:
    """BLIP retrieval's training loss (ITC with momentum distillation and queues, ITM on hard negatives drawn from
    every rank) on random image/text pairs."""

    name = "retrieval"
    RECIPE_KEYS = frozenset()

    def __init__(self, n=8):
        g = torch.Generator().manual_seed(3)
        self.x = torch.randn(n, 3, 32, 32, generator=g)
        self.ids = torch.randint(7, 60, (n, 6), generator=g)
        self.ids[:, 0], self.ids[:, -1] = 1, 2
        self.n = n

    def steps_per_epoch(self, bs):
        return self.n // bs

    def train_batches(self, bs, seed, recipe=None):
        while True:
            for i in range(0, self.n - bs + 1, bs):
                yield self.x[i:i + bs], self.ids[i:i + bs], torch.arange(i, i + bs)

    def loss(self, model, batch, device, recipe=None):
        x, ids, idx = batch
        return model(x, ids, torch.ones_like(ids), idx=idx, mode="train")


def _retrieval(sharding):
    """Root-only sharding with the frozen momentum encoders replicated: their in-forward EMA is kept."""
    from tests.conftest import build
    adapter, m = build("blip_retrieval_micro")
    m_before = {n: p.detach().clone() for n, p in m.named_parameters() if n.startswith("visual_encoder_m.")}
    stats = train(m, RetrievalTask(), {"epochs": 1, "lr": 1.0e-3, "batch_size": 4, "sharding": sharding},
                  device="cpu", seed=1, adapter=adapter, quiet=True)
    moved = sum(float((p.detach() - m_before[n]).abs().sum()) for n, p in m.named_parameters() if n in m_before)
    return {"state": _state(m), "stats": stats, "momentum_moved": moved, "units": len(adapter.shard_units(m))}


def _scenarios(rank, state_dir):
    return {"fsdp": _finetune("fsdp"), "none": _finetune("none"),
            "on_step_fsdp": _with_on_step("fsdp"), "on_step_none": _with_on_step("none"),
            "resume": _resume(state_dir), "refusals": _refusals(),
            "gpt2": {s: _family("gpt2_micro", s) for s in ("fsdp", "none")},
            "llama": {s: _family("llama_micro", s) for s in ("fsdp", "none")},
            "retrieval": {s: _retrieval(s) for s in ("fsdp", "none")}}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp_ranks")
    return _spawn(_scenarios, out, str(out / "train_state"))


def _close(a: dict, b: dict):
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], **TOL, msg=lambda m: f"{k}: {m}")


def test_a_sharded_phase_trains_like_the_non_sharded_one_and_one_process(ranks):
    for r in ranks:
        s = r["fsdp"]["stats"]
        assert (s["sharding"], s["world_size"], s["micro_batch_size"], s["accumulation_steps"], s["steps"]) == \
            ("fsdp", 2, 2, 2, 8)
        assert r["none"]["stats"]["sharding"] == "none"
        assert r["fsdp"]["same_class"] and r["fsdp"]["dtensors"] == []     # the caller's model: a plain module
        _close(r["fsdp"]["state"], r["none"]["state"])                     # the buffer too: each rank its own count
        torch.testing.assert_close(r["fsdp"]["mask_grad"], r["none"]["mask_grad"], **TOL)
        assert s["final_loss"] == pytest.approx(r["none"]["stats"]["final_loss"], rel=1e-5)
    for k, v in ranks[0]["fsdp"]["state"].items():                          # whole and equal on every rank
        assert torch.equal(v, ranks[1]["fsdp"]["state"][k]), k
    assert float(ranks[0]["fsdp"]["state"]["seen"]) == 8 * 4               # 8 steps x 2 micro-batches of 2
    m = toy()                                                                # one process, the same micro-batches
    one = train(m, SeqTask(noise=False), R(**RECIPE), device="cpu", seed=1, adapter=ToyAdapter(), extra_loss=_l1(m),
                quiet=True)
    assert (one["sharding"], one["accumulation_steps"]) == ("none", 4)
    mine = _state(m)
    mine.pop("seen")
    theirs = dict(ranks[0]["fsdp"]["state"])
    theirs.pop("seen")
    _close(theirs, mine)
    torch.testing.assert_close(ranks[0]["fsdp"]["mask_grad"], m.mask.grad, **TOL)


def test_on_step_sees_the_whole_model_and_its_changes_reach_the_shards(ranks):
    for r in ranks:
        a, b = r["on_step_fsdp"], r["on_step_none"]
        _close(a["state"], b["state"])
        assert float(a["state"]["fc1.weight"][0].abs().sum()) == 0.0
        assert a["seen"] == pytest.approx(b["seen"], rel=1e-5) and len(a["seen"]) == 8


def test_a_resumed_sharded_phase_equals_the_uninterrupted_one(ranks):
    for r in ranks:
        res = r["resume"]
        assert res["resumed_from"] == 3 and res["plain_resumed_from"] == 3
        for k, v in res["uninterrupted"].items():
            assert torch.equal(res["state"][k], v), k
        _close(res["plain_state"], res["uninterrupted"])   # a non-sharded phase resumes from the sharded checkpoint


def test_what_sharding_cannot_train_is_refused_in_one_line(ranks):
    for r in ranks:
        msg = r["refusals"]["penalty"]
        assert "sharding fsdp: the model's own parameters got gradients outside the sharded copy (fc1.weight)" in msg
        assert msg.endswith("run this phase with sharding: none")
        assert "use precision: bf16" in r["refusals"]["fp16"]


def test_the_families_shard_per_block_and_train_like_the_non_sharded_run(ranks):
    for fam, units in (("gpt2", 2), ("llama", 2)):
        for r in ranks:
            a, b = r[fam]["fsdp"], r[fam]["none"]
            assert a["units"] == units and a["same_class"] and a["stats"]["sharding"] == "fsdp"
            assert a["stats"]["steps"] == 3
            _close(a["state"], b["state"])
        for k, v in ranks[0][fam]["fsdp"]["state"].items():
            assert torch.equal(v, ranks[1][fam]["fsdp"]["state"][k]), (fam, k)


def test_blip_retrieval_shards_the_root_and_keeps_the_momentum_update(ranks):
    """The momentum encoders (frozen, replicated) follow the online ones by EMA inside the forward: sharded, they
    move as without sharding; queues (buffers) too."""
    for r in ranks:
        a, b = r["retrieval"]["fsdp"], r["retrieval"]["none"]
        assert a["units"] == 0 and a["stats"]["sharding"] == "fsdp" and a["stats"]["steps"] == 2
        assert a["momentum_moved"] > 0
        assert a["momentum_moved"] == pytest.approx(b["momentum_moved"], rel=1e-4)
        _close(a["state"], b["state"])


def test_sharding_is_ignored_in_one_process():
    m = toy()
    lines = []
    stats = train(m, SeqTask(noise=False), R(epochs=0.25, sharding="fsdp"), device="cpu", seed=1,
                  adapter=ToyAdapter(), log=lines.append, quiet=True)
    assert stats["sharding"] == "none" and "ignored in one process" in stats["sharding_note"]
    assert any("sharding fsdp ignored in one process" in ln for ln in lines)
    from tests.conftest import build
    adapter, model = build("blip_nlvr2_micro")
    assert len(adapter.shard_units(model)) == 3 + 2      # 3 ViT layers, 2 text-encoder layers
    assert WORLD == 2
