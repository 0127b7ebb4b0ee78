"""Resume inside a training phase after a real SIGKILL (bench.train_state): a process is killed once a
training-state checkpoint is on disk, run again, says it resumed at that step, and ends with exactly the
result of an uninterrupted run (torch.equal on every tensor; CPU, one process).

- `test_sigkill_train_resumes_bit_identical`: train() alone (dropout, micro-batches, seeded batch noise);
- `test_sigkill_cell_in_its_finetune_resumes`: a micro cell (SOMP on vit_micro, finetune in bf16 with
  gradient accumulation) through `python -m bench run --checkpoint-every-steps 1`, killed in its finetune.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent('''
    import json, sys, time
    import torch
    from torch import nn
    from bench.training import train

    out, state_dir, slow = sys.argv[1], sys.argv[2], float(sys.argv[3])

    class Task:
        name = "seq"
        RECIPE_KEYS = frozenset()

        def __init__(self, n=64):
            g = torch.Generator().manual_seed(0)
            self.X, self.Y, self.n = torch.randn(n, 4, generator=g), torch.randn(n, 1, generator=g), n

        def steps_per_epoch(self, bs):
            return self.n // bs

        def train_batches(self, bs, seed, recipe=None):
            g = torch.Generator().manual_seed(seed)
            while True:
                perm = torch.randperm(self.n, generator=g)
                for i in range(0, self.n - bs + 1, bs):
                    idx = perm[i:i + bs]
                    yield self.X[idx] + 0.05 * torch.randn(bs, 4, generator=g), self.Y[idx]

        def loss(self, model, batch, device, recipe=None):
            x, y = batch
            return ((model(x) - y) ** 2).mean()

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 1))

    def on_step(s, t):
        if slow:
            time.sleep(slow)

    stats = train(model, Task(), {"epochs": 5, "lr": 1.0e-2, "batch_size": 8, "micro_batch_size": 4},
                  device="cpu", seed=2, phase="dense", state_dir=None if state_dir == "-" else state_dir,
                  state_every_steps=3, on_step=on_step, log=lambda m: print(m, flush=True), quiet=True)
    torch.save({"model": model.state_dict(), "rng": torch.get_rng_state(), "final_loss": stats["final_loss"]}, out)
    print("DONE", json.dumps({"resumed_from_step": stats.get("resumed_from_step")}), flush=True)
''')


def _env(**extra):
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **extra)


def _wait_for(pattern_dir: Path, glob: str, proc, timeout=120.0) -> list:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        found = sorted(pattern_dir.glob(glob))
        if found:
            return found
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the process ended (rc {proc.returncode}) before writing a checkpoint:\n"
                        f"{out[-3000:]}\n{err[-3000:]}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"no checkpoint {glob} under {pattern_dir} after {timeout} s")


def _kill(proc) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def _steps(folder: Path, stem: str) -> list:
    return sorted(int(m.group(1)) for p in folder.glob(f"{stem}-step*.pt")
                  if (m := re.match(rf"{stem}-step(\d+)\.pt$", p.name)))


def test_sigkill_train_resumes_bit_identical(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    run = lambda out, state, slow: [sys.executable, str(script), str(out), str(state), str(slow)]   # noqa: E731
    ref = subprocess.run(run(tmp_path / "ref.pt", "-", 0), env=_env(), capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-3000:]
    state = tmp_path / "state"
    proc = subprocess.Popen(run(tmp_path / "a.pt", state, 0.05), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for(state, "dense-step*.pt", proc)
    _kill(proc)
    assert not (tmp_path / "a.pt").exists()                        # killed in the middle of the phase
    steps = _steps(state, "dense")
    assert steps and steps[-1] % 3 == 0 and steps[-1] < 40
    again = subprocess.run(run(tmp_path / "a.pt", state, 0), env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    k = steps[-1]
    assert f"resuming dense at step {k}/40 from {state / f'dense-step{k:09d}.pt'}" in again.stdout, again.stdout
    assert f'"resumed_from_step": {k}' in again.stdout
    a, b = torch.load(tmp_path / "a.pt"), torch.load(tmp_path / "ref.pt")
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][n], b["model"][n]) for n in a["model"])
    assert torch.equal(a["rng"], b["rng"]) and a["final_loss"] == b["final_loss"]
    assert not state.exists()                                       # the finished phase removed its checkpoints


SLOW_FINETUNE = textwrap.dedent('''
    import sys, time
    import bench.training as T
    _train = T.train

    def slow_train(*a, **kw):          # the finetune sleeps after every step, so the test can kill it midway
        if kw.get("phase") == "finetune":
            inner = kw.get("on_step")

            def on_step(s, t):
                if inner is not None:
                    inner(s, t)
                time.sleep(0.2)
            kw["on_step"] = on_step
        return _train(*a, **kw)

    T.train = slow_train
    from bench.cli import main
    sys.exit(main(sys.argv[1:]))
''')


@pytest.fixture
def resume_card(tmp_path):
    from bench.cards import load_card
    card = load_card("upop_deit")
    card.pop("_path")
    card["table"] = "tiny_resume"
    card["methods"] = ["dense", "somp"]
    card["method_options"] = {k: v for k, v in card["method_options"].items() if k in card["methods"]}
    card["ratios"] = card["ratios"][3:4]
    labels = {r["label"] for r in card["ratios"]} | {"1x"}
    card["references"]["rows"] = [r for r in card["references"]["rows"] if r["ratio"] in labels]
    micro = card["profiles"]["micro"]
    micro["data"] = {"num_classes": 4, "train_per_class": 16, "val_per_class": 8, "image_size": 32, "seed": 7}
    micro["dense"] = {"epochs": 1, "lr": 2.0e-3, "batch_size": 16}
    # bf16 on CPU is slow (no bf16 matmul units here): one epoch of 4 steps, each of 2 micro-batches
    micro["finetune"] = {"epochs": 1, "lr": 5.0e-4, "batch_size": 16, "micro_batch_size": 8, "precision": "bf16"}
    micro["throughput"] = {"batch_size": 4, "warmup": 1, "iters": 1, "trials": 1}
    for prof in card["profiles"].values():
        prof.pop("sgmp", None)
        prof.pop("upop", None)
        prof.pop("budgets", None)   # paper budget only: no method of this card searches
    (tmp_path / "cards").mkdir()
    (tmp_path / "cards" / "tiny_resume.yaml").write_text(yaml.safe_dump(card, sort_keys=False))
    return _env(BENCH_TABLES=str(tmp_path / "cards"), BENCH_CACHE=str(tmp_path / "cache"))


@pytest.mark.slow
def test_sigkill_cell_in_its_finetune_resumes(tmp_path, resume_card):
    env = resume_card
    wrapper = tmp_path / "slow_bench.py"
    wrapper.write_text(SLOW_FINETUNE)
    out, ref_out = tmp_path / "out", tmp_path / "ref"
    args = ["run", "--table", "tiny_resume", "-s", "--quiet", "--checkpoint-every-steps", "1"]
    proc = subprocess.Popen([sys.executable, str(wrapper), *args, "--output", str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    found = _wait_for(out / "tiny_resume" / "cells", "*/train_state/finetune/finetune-step*.pt", proc, timeout=300)
    _kill(proc)
    state = found[0].parent
    steps = _steps(state, "finetune")
    total = 64 // 16
    assert steps and steps[-1] < total
    records = out / "tiny_resume" / "records"
    assert len(list(records.glob("*.json"))) == 1                  # the dense cell; SOMP's was killed

    again = subprocess.run([sys.executable, "-m", "bench", *args, "--output", str(out)], env=env,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    k = steps[-1]
    assert f"resuming finetune at step {k}/{total} from {state / f'finetune-step{k:09d}.pt'}" in again.stdout
    assert "[2/2] somp-" in again.stdout and "dense-1x-seed0 NO-REF (reused)" in again.stdout
    assert not state.exists()

    ref = subprocess.run([sys.executable, "-m", "bench", "run", "--table", "tiny_resume", "--methods", "somp",
                          "--quiet", "--output", str(ref_out)], env=env, capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]
    assert "[1/1] somp-" in ref.stdout                              # the running cell, shown without -s too

    def somp(folder):
        rec = next(r for r in (json.loads(p.read_text()) for p in (folder / "tiny_resume" / "records").glob("*.json"))
                   if r["method"] == "somp")
        return rec
    a, b = somp(out), somp(ref_out)
    assert a["hash"] == b["hash"] and a["status"] == b["status"] != "error"
    assert a["metrics"] == b["metrics"] and a["params"] == b["params"]
    assert a["training"]["finetune"]["resumed_from_step"] == k and b["training"]["finetune"]["resumed_from_step"] is None
    for rec in (a, b):
        ft = rec["training"]["finetune"]
        assert (ft["precision"], ft["micro_batch_size"], ft["accumulation_steps"], ft["steps"]) == ("bf16", 8, 2, total)
        assert rec["method_info"]["finetune"]["precision"] == "bf16"
    from safetensors.torch import load_file
    wa = load_file(str(out / "tiny_resume" / "cells" / a["hash"] / "model.safetensors"))
    wb = load_file(str(ref_out / "tiny_resume" / "cells" / b["hash"] / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[n], wb[n]) for n in wa)
