"""The training loop at paper scale (bench.training.train): the default path unchanged bit for bit, gradient
accumulation equal to the full batch, mixed precision, training-state checkpoints (resume inside a phase, in
one process here; tests/test_resume.py kills a real process) and progress lines."""
from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from bench.errors import BenchError, CellFailure
from bench.progress import Progress
from bench.recipe import TrainRecipe
from bench.train_state import KEEP, TrainState, fingerprint
from bench.training import _grad_tensors_outside, as_recipe, lr_at, train


class SeqTask:
    """A fixed data set served in a fixed order: batches of size b are consecutive slices of (X, Y), so two
    micro-batches of 4 are exactly the two halves of the batch of 8 (with noise=False). The loss is the
    batch-mean MSE."""

    name = "seq"
    RECIPE_KEYS = frozenset()

    def __init__(self, n=32, d=4, noise=True):
        g = torch.Generator().manual_seed(0)
        self.noise = noise
        self.X = torch.randn(n, d, generator=g)
        self.Y = torch.randn(n, 1, generator=g)
        self.n = n
        self.sizes = []
        self.autocast = []

    def steps_per_epoch(self, bs):
        return self.n // bs

    def train_batches(self, bs, seed, recipe=None):
        self.sizes.append(bs)
        g = torch.Generator().manual_seed(seed)
        while True:
            for i in range(0, self.n - bs + 1, bs):
                # noise: a seeded draw per batch, like a task's augmentation (the replay on resume reproduces it)
                x = self.X[i:i + bs]
                yield (x + 0.01 * torch.randn(x.shape, generator=g) if self.noise else x), self.Y[i:i + bs]

    def loss(self, model, batch, device, recipe=None):
        self.autocast.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        x, y = batch
        return ((model(x.to(device)).float() - y.to(device)) ** 2).mean()


class MaskedNet(nn.Module):
    """Two linears with a unit mask between them that takes gradients but is no parameter (as UPop's masks),
    and dropout (drawn from the global torch RNG)."""

    def __init__(self, drop=0.0):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 1)
        self.drop = nn.Dropout(drop)
        self.mask = torch.ones(8, requires_grad=True)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.fc1(x)) * self.mask))


def R(**kw):
    return TrainRecipe(**{"epochs": 2, "lr": 1.0e-2, "batch_size": 8, **kw})


def net(seed=0, drop=0.0):
    torch.manual_seed(seed)
    return MaskedNet(drop)


def state(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


# ------------------------------------------------------------------------------------------- default path

def test_default_recipe_is_the_plain_loop_bit_for_bit():
    """The default recipe (fp32 on CPU, no accumulation, no checkpoint) does exactly what the loop did before
    precision, micro-batches and resume existed: the same weights, losses and RNG state, torch.equal."""
    recipe = R(clip_grad=1.0, warmup_epochs=0.5)
    task = SeqTask()
    m = net(drop=0.2)
    ref = net(drop=0.2)
    extra = lambda: 1e-2 * m.mask.abs().sum()            # noqa: E731
    torch.manual_seed(5)
    stats = train(m, task, recipe, device="cpu", seed=3, extra_loss=extra)
    rng_after = torch.get_rng_state()
    # the loop as it was: lr_at, next batch, loss + extra, zero_grad, backward, clip, step
    opt = torch.optim.AdamW([{"params": [ref.fc1.weight, ref.fc2.weight], "weight_decay": 0.05},
                             {"params": [ref.fc1.bias, ref.fc2.bias], "weight_decay": 0.0}], lr=recipe.lr)
    params = [ref.fc1.weight, ref.fc2.weight, ref.fc1.bias, ref.fc2.bias]
    spe = task.steps_per_epoch(8)
    torch.manual_seed(5)
    ref.train()
    batches = task.train_batches(8, 3)
    losses = []
    for step in range(int(2 * spe)):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, recipe, spe)
        loss = task.loss(ref, next(batches), "cpu") + 1e-2 * ref.mask.abs().sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
    assert all(torch.equal(a, b) for a, b in zip(state(m).values(), state(ref).values()))
    assert torch.equal(m.mask.grad, ref.mask.grad) and torch.equal(rng_after, torch.get_rng_state())
    assert stats["final_loss"] == sum(losses[-spe:]) / spe
    assert stats["precision"] == "fp32" and stats["micro_batch_size"] == 8 and stats["accumulation_steps"] == 1
    assert task.autocast[0] == (False, torch.get_autocast_dtype("cpu")) and "resumed_from_step" not in stats


# ------------------------------------------------------------------------------------------- accumulation

def test_micro_batches_accumulate_to_the_full_batch():
    """batch_size 8 with micro_batch_size 4 (2 micro-batches per step) = batch_size 8 in one go: same weights,
    same accumulated mask gradient (extra_loss added once per step), same steps, lr schedule and on_step calls."""
    out = {}
    for mb in (None, 4, 2):
        task = SeqTask(noise=False)
        m = net()
        steps = []
        stats = train(m, task, R(micro_batch_size=mb, clip_grad=0.5), device="cpu", seed=1,
                      extra_loss=lambda: 1e-2 * m.mask.abs().sum(), on_step=lambda s, t: steps.append((s, t)))
        out[mb] = (state(m), m.mask.grad.clone(), stats, steps, task.sizes)
    full = out[None]
    for mb, accum in ((4, 2), (2, 4)):
        w, mg, stats, steps, sizes = out[mb]
        for k, v in full[0].items():
            torch.testing.assert_close(w[k], v, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mg, full[1], atol=1e-5, rtol=1e-5)
        assert stats["final_loss"] == pytest.approx(full[2]["final_loss"], rel=1e-5)
        assert stats["steps"] == full[2]["steps"] == 8
        assert (stats["lr_first"], stats["lr_last"]) == (full[2]["lr_first"], full[2]["lr_last"])
        assert steps == full[3] and sizes == [mb]
        assert stats["micro_batch_size"] == mb and stats["accumulation_steps"] == accum
    assert not torch.equal(out[4][0]["fc1.weight"], net().state_dict()["fc1.weight"])     # it did train


def test_micro_batch_size_must_divide_batch_size():
    with pytest.raises(BenchError, match=r"micro_batch_size 3 does not divide batch_size 8"):
        train(net(), SeqTask(), {"epochs": 1, "lr": 1.0e-2, "batch_size": 8, "micro_batch_size": 3}, device="cpu",
              seed=0)
    with pytest.raises(BenchError, match=r"micro_batch_size 16 does not divide batch_size 8"):
        train(net(), SeqTask(), epochs=1, lr=1.0e-2, batch_size=8, micro_batch_size=16, device="cpu", seed=0)


def test_non_finite_micro_batch_loss_names_the_micro_batch():
    class Bad(SeqTask):
        def loss(self, model, batch, device, recipe=None):
            return super().loss(model, batch, device) * float("nan")
    with pytest.raises(CellFailure, match=r"non-finite loss \(nan\) at step 0/4 \(micro-batch 1/2\)"):
        train(net(), Bad(), R(epochs=1, micro_batch_size=4), device="cpu", seed=0)


# ------------------------------------------------------------------------------------------- precision

def test_bf16_autocast_on_cpu_and_fp16_refused_on_cpu():
    task = SeqTask()
    m = net()
    stats = train(m, task, R(precision="bf16"), device="cpu", seed=1)
    assert stats["precision"] == "bf16" and set(task.autocast) == {(True, torch.bfloat16)}
    assert math.isfinite(stats["final_loss"])
    ref = net()
    train(ref, SeqTask(), R(), device="cpu", seed=1)
    assert not torch.equal(m.fc1.weight, ref.fc1.weight)                                # bf16 matmuls differ
    torch.testing.assert_close(m.fc1.weight, ref.fc1.weight, atol=5e-2, rtol=0)         # but train the same
    assert _grad_tensors_outside(ref, list(ref.parameters())) == ["mask"]          # what fp16 refuses on CUDA
    auto = train(net(), SeqTask(), R(precision="auto"), device="cpu", seed=1)
    assert auto["precision"] == "fp32"
    with pytest.raises(BenchError, match=r"precision fp16 needs CUDA .* set precision: bf16 or fp32"):
        train(net(), SeqTask(), R(precision="fp16"), device="cpu", seed=1)
    with pytest.raises(BenchError, match="precision"):
        as_recipe(epochs=1, lr=1.0e-3, batch_size=8, precision="fp8")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_auto_is_bf16_and_fp16_uses_a_scaler():
    task = SeqTask()
    stats = train(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1)), task, R(), device="cuda", seed=1)
    assert stats["precision"] == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")
    fp16 = train(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1)), task, R(precision="fp16", clip_grad=1.0),
                 device="cuda", seed=1)
    assert fp16["precision"] == "fp16" and math.isfinite(fp16["final_loss"])
    with pytest.raises(BenchError, match="outside the optimizer"):
        train(net(), task, R(precision="fp16"), device="cuda", seed=1)                # the mask would stay scaled


# ------------------------------------------------------------------------------------------- resume, in one process

class Stop(Exception):
    pass


def _run(tmp, recipe, *, stop_at=None, every=3, hooks=True, log=None):
    """A training with dropout, a mask whose gradient accumulates across steps (importance, no optimizer),
    a method state restored by hooks (a counter updated in on_step), checkpoints every `every` steps;
    `stop_at`: raise from on_step after that step (an interruption)."""
    torch.manual_seed(11)
    m = MaskedNet(drop=0.3)
    seen = {"updates": 0}

    def on_step(s, t):
        if s % 2 == 1:
            seen["updates"] += 1
            with torch.no_grad():
                m.mask.mul_(0.9)
        if stop_at is not None and s + 1 == stop_at:
            raise Stop()

    def get_state():
        return {"mask": m.mask.detach().clone(), "grad": m.mask.grad.clone(), "updates": seen["updates"]}

    def set_state(st):
        with torch.no_grad():
            m.mask.copy_(st["mask"])
        m.mask.grad = st["grad"].clone()
        seen["updates"] = st["updates"]

    stats = train(m, SeqTask(), recipe, device="cpu", seed=4, on_step=on_step, phase="search",
                  extra_loss=lambda: 1e-2 * m.mask.abs().sum(), state_dir=tmp, state_every_steps=every,
                  state_hooks=(get_state, set_state) if hooks else None, log=log)
    return m, stats, seen, torch.get_rng_state()


def test_resume_in_one_process_equals_the_uninterrupted_run(tmp_path):
    recipe = R(epochs=3, micro_batch_size=4)                       # 12 steps of 2 micro-batches
    ref, ref_stats, ref_seen, ref_rng = _run(tmp_path / "ref", recipe, every=0)
    with pytest.raises(Stop):
        _run(tmp_path / "s", recipe, stop_at=8)
    names = sorted(p.name for p in (tmp_path / "s").iterdir())
    assert names == ["search-step000000003.pt", "search-step000000006.pt"][-KEEP:]   # the last KEEP kept
    lines = []
    m, stats, seen, rng = _run(tmp_path / "s", recipe, log=lines.append)
    assert any(line.startswith(f"resuming search at step 6/12 from {tmp_path / 's' / 'search-step000000006.pt'}")
               for line in lines), lines
    assert all(torch.equal(a, b) for a, b in zip(state(m).values(), state(ref).values()))
    assert torch.equal(m.mask, ref.mask) and torch.equal(m.mask.grad, ref.mask.grad) and torch.equal(rng, ref_rng)
    assert seen == ref_seen and stats["final_loss"] == ref_stats["final_loss"]
    assert stats["resumed_from_step"] == 6 and stats["lr_first"] == ref_stats["lr_first"]
    assert not (tmp_path / "s").exists()                            # the phase removed its checkpoints
    # without hooks the method's own state would be lost: the result differs (why methods pass them)
    with pytest.raises(Stop):
        _run(tmp_path / "h", recipe, stop_at=8, hooks=False)
    m2, *_ = _run(tmp_path / "h", recipe, hooks=False)
    assert not torch.equal(m2.mask, ref.mask)


def test_upop_search_resumes_with_its_masks_and_importance(tmp_path):
    """UPop passes state_hooks: its masks, their accumulated gradients and its update history are in the
    checkpoint, so a search interrupted at step 7 of 12 and resumed from step 6 ends as the uninterrupted one."""
    import functools

    from bench.registry import METHODS
    from tests.conftest import build
    from tests.test_methods import TinyTask
    from tests.test_upop import _ctx

    class Interrupted(TinyTask):
        def train_batches(self, bs, seed, recipe=None):
            for i, b in enumerate(super().train_batches(bs, seed, recipe)):
                if i == 7:
                    raise Stop()
                yield b

    def search(task, state_dir):
        adapter, model = build("vit_micro")
        ctx = _ctx("upop", 0.5, model, adapter, task, search_epochs=0.75, interval=3, batch_size=16)
        ctx.train = functools.partial(train, task=task, device="cpu", seed=0, phase="upop", state_dir=state_dir,
                                      state_every_steps=3, quiet=True)
        return METHODS.get("upop")().prune(ctx), model

    res_ref, ref = search(TinyTask(), None)
    with pytest.raises(Stop):
        search(Interrupted(), tmp_path)
    assert [s for s, _ in TrainState(tmp_path, "upop").files()] == [6, 3]
    res, m = search(TinyTask(), tmp_path)
    assert res.info["search"]["train"]["resumed_from_step"] == 6 and res.info["search"]["steps"] == 12
    assert all(torch.equal(res.keep[n], res_ref.keep[n]) for n in res_ref.keep)
    assert res.info["mask_updates"] == res_ref.info["mask_updates"]
    assert all(torch.equal(a, b) for a, b in zip(state(m).values(), state(ref).values()))
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_a_checkpoint_of_another_recipe_is_ignored(tmp_path):
    with pytest.raises(Stop):
        _run(tmp_path, R(epochs=3), stop_at=4)
    lines = []
    m, stats, *_ = _run(tmp_path, R(epochs=3, lr=2.0e-2), log=lines.append)
    assert "resumed_from_step" not in stats
    assert any("ignoring" in line and "another recipe" in line for line in lines)
    fresh, *_ = _run(tmp_path / "fresh", R(epochs=3, lr=2.0e-2), every=0)
    assert torch.equal(m.fc1.weight, fresh.fc1.weight)


def test_train_state_files_keep_due_and_clear(tmp_path):
    now = [0.0]
    st = TrainState(tmp_path / "train_state" / "finetune", "finetune", every_steps=0, every_minutes=1.0,
                    clock=lambda: now[0])
    assert not st.due(1, 10)
    now[0] = 61.0
    assert st.due(1, 10) and not st.due(10, 10)                     # never at the end
    fp = fingerprint("finetune", R(), 10, 4, 1, 0)
    for k in (2, 4, 6):
        st.save({"fingerprint": fp, "step": k}, k)
    assert [s for s, _ in st.files()] == [6, 4]
    assert st.latest(fp)[0]["step"] == 6
    (tmp_path / "train_state" / "finetune" / "finetune-step000000008.pt").write_bytes(b"truncated")
    assert st.latest(fp)[0]["step"] == 6                            # unreadable: the previous one
    assert st.latest({**fp, "total": 11}) is None
    assert fingerprint("finetune", R(log_every=5), 10, 4, 1, 0) == fp   # reporting keys do not matter
    st.clear()
    assert not (tmp_path / "train_state").exists()
    every = TrainState(tmp_path, "dense", every_steps=3)
    assert [d for d in range(1, 10) if every.due(d, 9)] == [3, 6]


# ------------------------------------------------------------------------------------------- progress

def test_progress_plain_lines_every_tenth_and_quiet():
    lines = []
    p = Progress("finetune", 100, 32, log=lines.append, mode="plain")
    for k in range(1, 101):
        p.update(k, 1.0 + k / 100, 1e-3)
    p.close()
    assert len(lines) == 10 and lines[0].startswith("finetune: step 10/100 (10%) loss 1.0550 lr 1.00e-03 ")
    assert "samples/s elapsed 0:00:00 ETA" in lines[0] and lines[-1].startswith("finetune: step 100/100 (100%)")
    quiet = []
    q = Progress("finetune", 100, 32, log=quiet.append, quiet=True, mode="plain")
    q.update(10, 1.0, 1e-3)
    assert quiet == [] and q.bar is None


def test_progress_every_30_seconds_when_steps_are_slow(monkeypatch):
    lines = []
    p = Progress("dense", 1000, 8, log=lines.append, mode="plain")
    monkeypatch.setattr(Progress, "PLAIN_SECONDS", 0.0)
    p.update(1, 2.0, 1e-3)
    p.update(2, 2.0, 1e-3)
    assert [line.split(" loss")[0] for line in lines] == ["dense: step 1/1000 (0%)", "dense: step 2/1000 (0%)"]


def test_progress_live_line_on_a_terminal():
    stream = io.StringIO()
    lines = []
    p = Progress("finetune", 60, 32, log=lines.append, stream=stream, mode="tty", start=20)
    for k in range(21, 61):
        p.update(k, 1.2345, 4.1e-4)
        if k == 30:
            p.write("step 30/60 loss 1.2345 lr 4.10e-04")               # a log line around the live bar
    p.close()
    out = stream.getvalue()
    assert "finetune: 100%" in out and "60/60" in out and "loss 1.2345 lr 4.10e-04" in out and "samples/s" in out
    assert lines == ["step 30/60 loss 1.2345 lr 4.10e-04"]


def test_a_terminal_without_a_size_gets_plain_lines():
    """tqdm draws nothing on a pseudo-terminal of 0 rows (`script` run without a terminal): plain lines there."""
    class SizelessTerminal(io.StringIO):
        def isatty(self):
            return True
    lines = []
    p = Progress("finetune", 10, 32, log=lines.append, stream=SizelessTerminal())
    assert p.mode == "plain"
    for k in range(1, 11):
        p.update(k, 1.0, 1e-3)
    p.close()
    assert len(lines) == 10 and lines[-1].startswith("finetune: step 10/10 (100%)")


def test_train_progress_through_log_and_quiet():
    lines = []
    train(net(), SeqTask(n=80), R(epochs=5, log_every=25), device="cpu", seed=0, log=lines.append, phase="dense")
    plain = [line for line in lines if line.startswith("dense: step")]
    assert len(plain) == 10 and plain[-1].startswith("dense: step 50/50 (100%)")
    assert [line.split(" loss")[0] for line in lines if line.startswith("step ")] == ["step 25/50", "step 50/50"]
    quiet = []
    train(net(), SeqTask(n=80), R(epochs=5, log_every=25), device="cpu", seed=0, log=quiet.append, quiet=True)
    assert [line.split(" loss")[0] for line in quiet] == ["step 25/50", "step 50/50"]   # log_every still works


# ---------------------------------------------------------------------------------------------
# micro_batch_size: auto

class OomTask(SeqTask):
    """SeqTask whose loss runs out of memory above `fits` samples per forward (a simulated GPU)."""

    def __init__(self, fits, **kw):
        super().__init__(**kw)
        self.fits = fits

    def loss(self, model, batch, device, recipe=None):
        if batch[0].shape[0] > self.fits:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate for {batch[0].shape[0]} samples")
        return super().loss(model, batch, device, recipe)


def test_auto_micro_batch_takes_the_largest_that_fits_and_trains_as_if_given_by_hand(monkeypatch):
    """Probe 8 (out of memory), 4 (out of memory), 2 (fits): micro-batch 2 with 4 accumulation steps, and the
    weights, the masks' gradients and the RNG after training equal those of micro_batch_size 2 given by hand
    (the probe leaves no trace: buffers, gradients and RNG states are put back)."""
    import bench.training as training
    monkeypatch.setattr(training, "AUTO_PROBE_DEVICES", ("cuda", "cpu"))
    logs = []
    m_auto = net(drop=0.2)
    stats = train(m_auto, OomTask(fits=2), R(micro_batch_size="auto"), device="cpu", seed=1, log=logs.append,
                  extra_loss=lambda: 1e-2 * m_auto.mask.abs().sum())
    after_auto = torch.rand(3)
    m_hand = net(drop=0.2)
    ref = train(m_hand, OomTask(fits=2), R(micro_batch_size=2), device="cpu", seed=1,
                extra_loss=lambda: 1e-2 * m_hand.mask.abs().sum())
    after_hand = torch.rand(3)
    assert stats["micro_batch_size"] == 2 and stats["accumulation_steps"] == 4
    assert [t["micro_batch_size"] for t in stats["micro_batch_probe"]["tried"]] == [8, 4, 2]
    assert [t["fits"] for t in stats["micro_batch_probe"]["tried"]] == [False, False, True]
    assert any("micro_batch_size auto -> 2" in line for line in logs)
    assert all(torch.equal(a, b) for a, b in zip(state(m_auto).values(), state(m_hand).values()))
    assert torch.equal(m_auto.mask.grad, m_hand.mask.grad) and torch.equal(after_auto, after_hand)
    assert stats["final_loss"] == ref["final_loss"]


def test_auto_micro_batch_on_cpu_is_the_per_rank_batch_and_nothing_fits_is_one_line(monkeypatch):
    import bench.training as training
    stats = train(net(), SeqTask(), R(micro_batch_size="auto"), device="cpu", seed=1)
    assert stats["micro_batch_size"] == 8 and stats["micro_batch_probe"]["probed"] is False
    monkeypatch.setattr(training, "AUTO_PROBE_DEVICES", ("cuda", "cpu"))
    with pytest.raises(BenchError, match="not even 1 sample per forward/backward fits"):
        train(net(), OomTask(fits=0), R(micro_batch_size="auto"), device="cpu", seed=1)
    with pytest.raises(RuntimeError, match="boom"):   # any other error is not taken for out of memory
        class Broken(SeqTask):
            def loss(self, model, batch, device, recipe=None):
                raise RuntimeError("boom")
        train(net(), Broken(), R(micro_batch_size="auto"), device="cpu", seed=1)
