"""Data-parallel cells (bench.distributed) on this CPU machine: 2 gloo ranks.

- the gradients of tensors outside the optimizer (UPop's search masks) are averaged over the ranks, so both
  ranks hold the same mask gradient (the bug this guards against: -1.99 on one rank, -3.02 on the other), equal
  to the one-process gradient at the same effective batch;
- the keep-mask identity check fails the cell, naming the group and the rank, when the masks differ;
- a data-parallel phase stopped after a checkpoint and run again resumes from rank 0's checkpoint, each rank
  with its own RNG state, and ends bit-identical to the uninterrupted 2-rank run;
- `torchrun --nproc_per_node 2 -m bench run` of a tiny card gives the same SOMP keep-masks as one process at
  the same effective batch, and the same metrics within one validation sample (stated below), writing one
  record per cell, from rank 0.

Tolerances: 2 ranks and 1 process sum the same per-sample gradients in another order, so weights agree to
about 1e-6 (fp32 rounding), not bit for bit; keep-masks and params/FLOPs must be equal; a metric may move by
at most one validation sample (100 / 32 % on the tiny card), and final losses agree within 1e-4 (relative).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml

from bench import distributed as dist
from bench.errors import BenchError, CellFailure
from bench.training import train
from tests.test_train_loop import R, SeqTask, net
from tests.tiny_cards import records, tiny_env

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, tmp_path: Path, *args):
    """Run fn(rank, *args) on 2 gloo ranks (spawned processes); returns [rank 0's, rank 1's] result."""
    port = _free_port()
    mp.spawn(_entry, args=(fn, port, str(tmp_path), args), nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _entry(rank, fn, port, out, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    assert dist.init("cpu")
    try:
        result = fn(rank, *args)
    finally:
        dist.cleanup()
    torch.save(result, Path(out) / f"rank{rank}.pt")


# ------------------------------------------------------------------------------------------- on 2 ranks

def _local_mask_grad(rank):
    """What rank `rank` would hold WITHOUT the all-reduce: the gradient of its own micro-batch only."""
    task, m = SeqTask(noise=False), net()
    x, y = next(dist.shard(task.train_batches(4, 1), WORLD, rank))
    loss = ((m(x) - y) ** 2).mean() + 1e-2 * m.mask.abs().sum()
    loss.backward()
    return m.mask.grad.clone()


def _train_on_ranks(epochs):
    task, m = SeqTask(noise=False), net()
    stats = train(m, task, R(epochs=epochs), device="cpu", seed=1, extra_loss=lambda: 1e-2 * m.mask.abs().sum())
    return {"mask_grad": m.mask.grad.clone(), "state": {k: v.clone() for k, v in m.state_dict().items()},
            "stats": stats, "sizes": task.sizes}


def _check_masks(rank, differ):
    keep = {"blocks.0.attn:head_dim": torch.ones(6, dtype=torch.bool),
            "blocks.1.mlp:ffn": torch.tensor([True, False, True, True])}
    if differ and rank == 1:
        keep["blocks.1.mlp:ffn"] = torch.tensor([True, True, False, True])
    try:
        return {"ok": dist.check_identical(keep, "keep-masks")}
    except CellFailure as e:
        return {"error": str(e)}


class _Stop(Exception):
    pass


def _interrupted_and_resumed(state_dir):
    """8 steps with dropout, checkpoints every 3 steps: stopped after step 5 (on every rank), then run again: it
    resumes from rank 0's checkpoint of step 3, each rank with its own RNG state."""
    def stop(step, _total):
        if step == 4:
            raise _Stop

    kw = dict(device="cpu", seed=1, state_dir=state_dir, state_every_steps=3, quiet=True)
    m = net(drop=0.2)
    with pytest.raises(_Stop):
        train(m, SeqTask(), R(), on_step=stop, **kw)
    m = net(drop=0.2)
    stats = train(m, SeqTask(), R(), **kw)
    ref = net(drop=0.2)
    train(ref, SeqTask(), R(), device="cpu", seed=1, quiet=True)
    return {"resumed_from": stats.get("resumed_from_step"), "state": {k: v.clone() for k, v in m.state_dict().items()},
            "uninterrupted": {k: v.clone() for k, v in ref.state_dict().items()}}


def _scenarios(rank, state_dir):
    """Everything the tests below check on 2 ranks, in one spawn (starting processes is the slow part)."""
    return {"one_step": _train_on_ranks(0.25),       # 32 samples / batch 8 = 4 steps per epoch: 1 step
            "eight_steps": _train_on_ranks(2), "local": _local_mask_grad(rank),
            "same": _check_masks(rank, False), "differ": _check_masks(rank, True),
            "resume": _interrupted_and_resumed(state_dir)}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    return _spawn(_scenarios, out, str(out / "train_state"))


def test_a_resumed_data_parallel_phase_equals_the_uninterrupted_one(ranks):
    for r in ranks:
        assert r["resume"]["resumed_from"] == 3
        for k, v in r["resume"]["uninterrupted"].items():
            assert torch.equal(r["resume"]["state"][k], v), k
    for k in ranks[0]["resume"]["state"]:   # and both ranks hold the same weights
        assert torch.equal(ranks[0]["resume"]["state"][k], ranks[1]["resume"]["state"][k])


def _one_process(epochs):
    task, m = SeqTask(noise=False), net()
    stats = train(m, task, R(epochs=epochs, micro_batch_size=4), device="cpu", seed=1,
                  extra_loss=lambda: 1e-2 * m.mask.abs().sum())
    return m, stats


def test_mask_gradients_are_averaged_over_the_ranks(ranks):
    """One optimizer step of batch 8 on 2 ranks (4 samples each): the mask (no parameter of the optimizer) has
    the same gradient on both ranks, equal to one process's at batch 8 in micro-batches of 4; without the
    all-reduce each rank would hold its own half's gradient, and they differ."""
    r0, r1 = (r["one_step"] for r in ranks)
    l0, l1 = (r["local"] for r in ranks)
    assert torch.equal(r0["mask_grad"], r1["mask_grad"])
    assert not torch.allclose(l0, l1, atol=1e-4)          # the original bug: each rank its own gradient
    torch.testing.assert_close(r0["mask_grad"], (l0 + l1) / 2, atol=1e-6, rtol=1e-6)
    m, one = _one_process(0.25)
    torch.testing.assert_close(r0["mask_grad"], m.mask.grad, atol=1e-6, rtol=1e-6)
    for r in (r0, r1):
        s = r["stats"]
        assert (s["world_size"], s["micro_batch_size"], s["accumulation_steps"], s["steps"]) == (2, 4, 1, 1)
        assert r["sizes"] == [4]                           # each rank draws micro-batches of batch_size / 2
        assert s["final_loss"] == pytest.approx(one["final_loss"], rel=1e-6)


def test_two_ranks_train_like_one_process_at_the_same_effective_batch(ranks):
    """8 steps (2 epochs): the same weights on both ranks (bit for bit) and, within fp32 rounding, the weights
    of one process at batch 8 in micro-batches of 4; the accumulated mask gradient too."""
    r0, r1 = (r["eight_steps"] for r in ranks)
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    m, one = _one_process(2)
    for k, v in m.state_dict().items():
        torch.testing.assert_close(r0["state"][k], v, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(r0["mask_grad"], m.mask.grad, atol=1e-5, rtol=1e-5)
    assert r0["stats"]["steps"] == one["steps"] == 8
    assert r0["stats"]["final_loss"] == pytest.approx(one["final_loss"], rel=1e-5)


def test_the_identity_check_catches_keep_masks_that_differ_across_ranks(ranks):
    same = [r["same"] for r in ranks]
    assert all(r["ok"]["checked"] and r["ok"]["world_size"] == 2 for r in same)
    assert same[0]["ok"]["hash"] == same[1]["ok"]["hash"]
    differ = [r["differ"] for r in ranks]
    for r in differ:       # every rank fails the cell, with the same message
        assert "error" in r, r
        msg = r["error"]
        assert "keep-masks differ across the 2 data-parallel ranks" in msg
        assert "blocks.1.mlp:ffn (ranks 1 differ from rank 0)" in msg and "blocks.0.attn" not in msg
    assert differ[0]["error"] == differ[1]["error"]


def test_one_process_is_a_no_op():
    keep = {"a": torch.ones(3, dtype=torch.bool)}
    assert dist.world_size() == 1 and dist.is_main() and not dist.is_distributed()
    assert dist.check_identical(keep)["checked"] is False
    t = torch.arange(3.0)
    assert dist.all_reduce_mean(t) is t and dist.all_reduce_sum(t) is t and dist.broadcast_object(5) == 5
    assert list(dist.shard(iter(range(4)))) == [0, 1, 2, 3]
    assert list(dist.shard(iter(range(7)), 2, 1)) == [1, 3, 5]
    assert dist.average_grads([torch.ones(2, requires_grad=True)]) == 0


def test_a_batch_that_does_not_split_over_the_ranks_is_one_clear_line(monkeypatch):
    monkeypatch.setattr(dist, "world_size", lambda: 3)
    with pytest.raises(BenchError, match=r"batch_size 8 is not divisible by world size 3 x micro_batch_size 2: .*"
                                         r"run on a number of processes that divides batch_size 8"):
        train(net(), SeqTask(), R(), device="cpu", seed=1)
    cell = {"cell_id": "somp-2x-seed0", "method": "somp", "finetune": {"batch_size": 12, "micro_batch_size": 8}}
    with pytest.raises(BenchError, match=r"somp-2x-seed0: finetune.batch_size 12 .* set finetune.micro_batch_size "
                                         r"to a divisor of 4"):
        dist.check_cells([cell])


# ------------------------------------------------------------------------------------------- torchrun, end to end

def _kept(out_table: Path) -> dict:
    """{method: {group: kept indices}} from the cells' manifests."""
    kept = {}
    for rec in records(out_table).values():
        man = json.loads((out_table / "cells" / rec["hash"] / "manifest.json").read_text())
        kept[rec["method"]] = {g: v["kept"] for g, v in man["groups"].items()}
    return kept


@pytest.mark.slow      # two `bench run` startups (torchrun + 2 ranks) dominate: about a minute on 2 idle cores
def test_torchrun_two_ranks_match_one_process(tmp_path, monkeypatch):
    """The tiny card (dense + SOMP at 1.11x; dense and finetune batch 32 in micro-batches of 16) under
    `torchrun --nproc_per_node 2` and in one process: one record per cell written by rank 0, keep-masks
    checked identical across the ranks, the same SOMP keep-masks, params and FLOPs as one process, and the
    metrics within one validation sample."""
    env = tiny_env(tmp_path, methods=("dense", "somp"), ratios=slice(0, 1))
    card_path = tmp_path / "cards" / "tiny_deit.yaml"
    card = yaml.safe_load(card_path.read_text())
    micro = card["profiles"]["micro"]
    micro.pop("budgets", None)            # the paper budget only: one SOMP cell
    for block in ("dense", "finetune"):   # the same micro-batches in both runs: 16 per rank, or 2 x 16 in one
        micro[block]["micro_batch_size"] = 16
    card_path.write_text(yaml.safe_dump(card, sort_keys=False))
    env_dp = dict(env, BENCH_OUTPUT=str(tmp_path / "out_dp"), BENCH_CACHE=str(tmp_path / "cache_dp"))
    cmd = ["-m", "bench", "run", "--table", "tiny_deit", "--device", "cpu", "-s"]
    r2 = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                         "--master_port", str(_free_port()), *cmd], env=env_dp, capture_output=True, text=True,
                        timeout=300)
    assert r2.returncode == 0, r2.stdout[-3000:] + r2.stderr[-3000:]
    # the one-process reference: the same cells run in this process (no second `bench run` to start)
    from bench.config import Paths
    from bench.runner import Session, expand_cells, load_checked_card, run_cell
    for k in ("BENCH_TABLES", "BENCH_CACHE", "BENCH_OUTPUT"):
        monkeypatch.setenv(k, env[k])
    session = Session(Paths.resolve(), log=lambda msg: None, quiet=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)       # as each rank (OMP_NUM_THREADS=1): on a shared 2-core machine, much faster
    try:
        for cell in expand_cells(load_checked_card("tiny_deit"), "micro", None, None, "0", "cpu"):
            assert run_cell(cell, session)["status"] == "no_ref"
    finally:
        torch.set_num_threads(threads)

    text = r2.stdout + r2.stderr
    assert text.count("keep-masks checked identical on all 2 ranks") == 2      # dense and somp, rank 0 only
    assert r2.stdout.count("Throughput/s") == 1 and r2.stdout.count("[2/2] somp-1.11x-seed0") == 1
    dp_out, one_out = tmp_path / "out_dp" / "tiny_deit", tmp_path / "out" / "tiny_deit"
    dp, one = records(dp_out), records(one_out)
    assert len(dp) == len(one) == 2 and set(dp) == set(one)     # one record per cell, the same hashes
    assert _kept(dp_out)["somp"] == _kept(one_out)["somp"]
    for h, rec in dp.items():
        ref = one[h]
        assert rec["status"] == ref["status"] == "no_ref"
        assert rec["method_info"]["data_parallel"]["keep_masks_identical"] is True
        assert rec["params"] == ref["params"] and rec["flops"]["macs"] == ref["flops"]["macs"]
        for k, v in ref["metrics"].items():
            assert abs(rec["metrics"][k] - v) <= 100 / 32 + 1e-9, (rec["method"], k, rec["metrics"][k], v)
        for phase, tr in rec["training"].items():
            assert (tr["world_size"], tr["micro_batch_size"], tr["accumulation_steps"]) == (2, 16, 1), phase
            assert ref["training"][phase]["world_size"] == 1 and ref["training"][phase]["accumulation_steps"] == 2
        ft_dp, ft_one = rec["method_info"].get("finetune"), ref["method_info"].get("finetune")
        if ft_one:
            assert ft_dp["final_loss"] == pytest.approx(ft_one["final_loss"], rel=1e-4)


# ------------------------------------------------------------------------------- BLIP retrieval on 2 ranks

def _blip_batch():
    torch.manual_seed(3)
    x = torch.randn(4, 3, 32, 32)
    ids = torch.randint(7, 60, (4, 6))
    ids[:, 0], ids[:, -1] = 1, 2
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0                     # rank 0's second text is shorter: padding differs between the ranks
    return x, ids, mask


def _blip_retrieval_step(rank):
    """One training forward/backward of BLIP retrieval on this rank's half of a 4-sample batch; returns its
    queues and the size of the pool the ITM negatives were drawn from."""
    from tests.conftest import build
    _, model = build("blip_retrieval_micro")
    model.train()
    x, ids, mask = _blip_batch()
    rows = slice(2 * rank, 2 * rank + 2)
    ids_r, mask_r = ids[rows], mask[rows]
    if rank == 0:                       # rank 0 pads only to its own longest text: narrower than rank 1's
        ids_r, mask_r = ids_r[:, :6], mask_r[:, :6]
    seen = {}
    original = model._hard_negatives

    def spy(image_feat, text_feat, idx, meta, pool_idx=None, pool_image=None, pool_text=None):
        seen["pool"] = int(pool_idx.shape[0])
        out = original(image_feat, text_feat, idx, meta, pool_idx, pool_image, pool_text)
        seen["negatives"] = [int(i) for i in torch.cat(out)]
        return out

    model._hard_negatives = spy
    loss = model(x[rows], ids_r, mask_r, idx=torch.arange(4)[rows], mode="train")
    loss.backward()
    return {"image_queue": model.image_queue[:, :4].clone(), "idx_queue": model.idx_queue[:, :4].clone(),
            "ptr": int(model.ptr_queue), "pool": seen["pool"], "negatives": seen["negatives"],
            "grad_finite": all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)}


def test_blip_retrieval_queues_and_negatives_span_every_rank(tmp_path):
    """As the official code (sdc17/UPop models/blip_retrieval.py): the queues take every rank's momentum
    features and ids, in rank order, and the ITM negatives come from the world batch (negative_all_rank); the
    enqueued features equal one process's on the whole batch."""
    from tests.conftest import build
    ranks = _spawn(_blip_retrieval_step, tmp_path)
    _, one = build("blip_retrieval_micro")
    one.train()
    x, ids, mask = _blip_batch()
    one(x, ids, mask, idx=torch.arange(4), mode="train")
    for r in ranks:
        assert r["ptr"] == 4 and r["pool"] == 4 and r["grad_finite"]
        assert torch.equal(r["idx_queue"], torch.arange(4).view(1, 4))
        assert torch.allclose(r["image_queue"], one.image_queue[:, :4], atol=1e-5)
        assert all(0 <= i < 4 for i in r["negatives"])
    assert torch.equal(ranks[0]["image_queue"], ranks[1]["image_queue"])
