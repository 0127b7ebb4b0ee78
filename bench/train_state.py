"""Training-state checkpoints inside one training phase, so that a killed phase resumes where it stopped and
ends with the same result as an uninterrupted run (bit-identical on CPU in one process).

A checkpoint is one file `<state_dir>/<phase>-step<k>.pt` (k = optimizer steps done), written to a unique
temporary name, fsynced and renamed into place (`os.replace`), so a kill leaves either the old or the new
file, never half of one; the last `KEEP` are kept and the phase removes its own when it finishes. It holds:

- the model's state_dict, the optimizer's, the GradScaler's (fp16), the step, the loss and lr lists;
- the task iterator's position as the number of batches drawn: an iterator cannot be pickled, so on resume
  the task's iterator is made again with the same seed and that many batches are drawn and dropped. Every
  task draws its shuffling and augmentation from generators seeded with the seed (`tasks.augment.PrivateRNG`,
  a DataLoader's `generator=`), so the replay yields the same batches. Its cost: producing (not training on)
  those batches again: nothing for the synthetic micro data, about the data-loading time of the steps done
  for the image folders of the paper profile (a few minutes for an ImageNet epoch on 8 workers);
- the global RNG states (torch CPU and CUDA, numpy, python), restored after the replay, so dropout, drop
  path and anything else drawn from them continue the same sequence (data parallel: rank 0 writes the file,
  with every rank's RNG states gathered into `rng_by_rank`, and each rank restores its own);
- what the caller's `state_hooks=(get_state, set_state)` return (a method's masks, accumulated importance):
  tensors and plain Python values (the file is read with `torch.load(weights_only=True)`: no pickled code);
- a fingerprint (phase, recipe, steps, micro-batches, seed, precision, device type): a checkpoint written
  for another recipe or budget is ignored (and logged), never resumed from.
"""
from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from bench.atomic import atomic_write

STATE_VERSION = 1
KEEP = 2
REPORTING_KEYS = ("log_every",)   # recipe keys that do not change the result: not in the fingerprint
# recipe keys of how a phase is laid out over the ranks, not of what it computes: not in the fingerprint either (a
# phase under sharding: fsdp writes the same checkpoint as without, bench.sharding, so each resumes the other)
LAYOUT_KEYS = ("sharding",)


def fingerprint(phase: str, recipe, total: int, steps_per_epoch: int, accum: int, seed: int,
                precision: str = "fp32", device: str = "cpu", world: int = 1) -> dict:
    """What a checkpoint must have been written for to be resumed from (the resolved precision and the device
    type too: a dense model's cache folder is shared by CPU and CUDA runs; the data-parallel world size, whose
    checkpoints hold one RNG state per rank and count the batches each rank drew)."""
    r = {k: v for k, v in recipe.model_dump(mode="json").items() if k not in REPORTING_KEYS + LAYOUT_KEYS}
    fp = {"version": STATE_VERSION, "phase": phase, "recipe": r, "total": total,
          "steps_per_epoch": steps_per_epoch, "accumulation_steps": accum, "seed": seed,
          "precision": precision, "device": device}
    if world > 1:   # only then: one-process checkpoints keep their fingerprint
        fp["world_size"] = world
    return fp


def rng_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return {"torch": torch.get_rng_state(), "cuda": cuda, "python": random.getstate(),
            "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached": float(cached)}}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    random.setstate(s["python"])
    n = s["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))


class TrainState:
    """The checkpoints of one phase in `state_dir`: `due()` after each step, `save()`, `latest()`, `clear()`."""

    def __init__(self, state_dir, phase: str, every_steps: int = 0, every_minutes: float = 0.0,
                 log: Callable[[str], None] | None = None, clock=None):
        import time
        self.dir = Path(state_dir)
        self.phase = phase
        self.stem = re.sub(r"[^A-Za-z0-9_.-]", "_", phase)
        self.every_steps = int(every_steps or 0)
        self.every_s = float(every_minutes or 0.0) * 60.0
        self.log = log or (lambda m: None)
        self.clock = clock or time.monotonic
        self.t_last = self.clock()
        self.pattern = re.compile(rf"^{re.escape(self.stem)}-step(\d+)\.pt$")

    def files(self) -> list:
        """[(step, path)] of this phase's checkpoints, newest first."""
        if not self.dir.is_dir():
            return []
        found = []
        for p in self.dir.iterdir():
            m = self.pattern.match(p.name)
            if m:
                found.append((int(m.group(1)), p))
        return sorted(found, reverse=True)

    def latest(self, fp: dict):
        """(state, path) of the newest readable checkpoint written for `fp`, else None."""
        for _, path in self.files():
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - an unreadable checkpoint is skipped, the previous one tried
                self.log(f"ignoring {path}: unreadable ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
                continue
            if state.get("fingerprint") != fp:
                self.log(f"ignoring {path}: written for another recipe, budget or seed of {self.phase}")
                continue
            return state, path
        return None

    def due(self, done: int, total: int) -> bool:
        """After step `done` (1-based count): a checkpoint every N steps and/or M minutes, never at the end."""
        if done >= total:
            return False
        if self.every_steps and done % self.every_steps == 0:
            return True
        return bool(self.every_s) and self.clock() - self.t_last >= self.every_s

    def save(self, state: dict, done: int) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        final = atomic_write(self.dir / f"{self.stem}-step{done:09d}.pt", lambda f: torch.save(state, f))
        for _, old in self.files()[KEEP:]:
            old.unlink(missing_ok=True)
        self.t_last = self.clock()
        return final

    def clear(self) -> None:
        """Remove this phase's checkpoints and temporary files (the phase finished); then the folder if empty
        (and its parent when that is a `train_state` folder left empty)."""
        for _, p in self.files():
            p.unlink(missing_ok=True)
        if self.dir.is_dir():
            for p in self.dir.glob(f".{self.stem}-step*.tmp"):
                p.unlink(missing_ok=True)
            for d in (self.dir, self.dir.parent):
                if d == self.dir or d.name == "train_state":
                    try:
                        d.rmdir()
                    except OSError:
                        break
