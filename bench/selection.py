"""Checkpoint selection of the runner's finetune (the recipe's `selection`, `selection_split`, `selection_metric`).

`final` (the default) reports the model after the last epoch: the clean protocol. `paper` reproduces what the
official scripts do (UPop's compress_nlvr.py keeps `checkpoint_best.pth` when `val_stats['acc'] > best`, DeiT's
main keeps `best_checkpoint.pth` on the ImageNet val split it reports): after every epoch of the finetune the
model is evaluated on `selection_split` (default: the split of the card's primary metric), the epoch with the
strictly best `selection_metric` (default: the primary metric; ties keep the earlier epoch, as `>` does) is kept,
and its weights are loaded back before the card's splits are evaluated. `selection_every: N` evaluates only after
the epochs 1, N + 1, 2N + 1, ... (counted from 1) and after the last one, as Segmenter's retrain does with its
0-based epochs (`epoch % eval_freq == 0 or epoch == num_epochs - 1`, sdc17/UPop compress_segmenter.py l. 420). The
evaluation is the task's `evaluate_for_selection` (default: its `evaluate`), so a task can select as its official
scripts do (ADE20K: single scale with the training config's window stride) while reporting another evaluation.
The record carries `selection` (rule, split, metric, the best epoch and every epoch's score; `every` when not 1)
and its `label`, "(best-epoch on dev)", which the table and the CSV print next to the method, so that nobody
mistakes such a row for a final-epoch one.

The selection state (best weights, best score, history) is saved with the finetune's training-state checkpoints
(train()'s state_hooks), so a resumed finetune selects as an uninterrupted one.
"""
from __future__ import annotations

import math

from bench.errors import BenchError


def selection_label(split: str) -> str:
    return f"(best-epoch on {split})"


class EpochSelection:
    """Evaluate after every epoch (every `every`-th, and the last) of a training (train()'s on_step) and keep the
    best epoch's weights."""

    def __init__(self, model, task, device, split: str, metric: str, higher_is_better: bool, steps_per_epoch: int,
                 log=None, every: int = 1):
        self.model, self.task, self.device = model, task, device
        self.split, self.metric, self.higher = split, metric, bool(higher_is_better)
        self.spe = max(1, int(steps_per_epoch))
        self.every = max(1, int(every))
        self.log = log
        self.best_state = None
        self.best_score = None
        self.best_epoch = None
        self.history: list = []

    @classmethod
    def for_cell(cls, cfg: dict, task, model, device, log=None) -> "EpochSelection | None":
        """The selection of a cell's finetune block, or None for `selection: final`."""
        ft = cfg.get("finetune") or {}
        if ft.get("selection", "final") == "final":
            return None
        primary = next(m for m in cfg["metrics"] if m.get("primary"))
        metric = ft.get("selection_metric") or primary["name"]
        split = ft.get("selection_split") or next(
            (m["split"] for m in cfg["metrics"] if m["name"] == metric), primary["split"])
        hib = next((m["higher_is_better"] for m in cfg["metrics"] if m["name"] == metric),
                   task.metrics.get(metric, True) if isinstance(getattr(task, "metrics", None), dict) else True)
        return cls(model, task, device, split, metric, hib, task.steps_per_epoch(ft["batch_size"]), log,
                   every=ft.get("selection_every", 1))   # absent from the cell's dict at its default (hash-stable)

    # ---------------------------------------------------------------- train() hooks
    def on_step(self, step: int, total: int) -> None:
        if (step + 1) % self.spe and step + 1 != total:
            return
        epoch = (step + 1 + self.spe - 1) // self.spe          # 1-based, the last partial epoch included
        if (epoch - 1) % self.every and step + 1 != total:     # selection_every: 0-based `epoch % N == 0` or last
            return
        was_training = self.model.training
        self.model.eval()
        evaluate = getattr(self.task, "evaluate_for_selection", None)   # TaskAdapter's; a duck-typed task: evaluate
        res = (evaluate(self.model, self.split, self.device, self.metric) if evaluate is not None
               else self.task.evaluate(self.model, self.split, self.device))
        self.model.train(was_training)
        if self.metric not in res:
            raise BenchError(f"selection: paper: the task's evaluation of split {self.split!r} has no metric "
                             f"{self.metric!r} (it has {sorted(res)}); set finetune.selection_metric")
        score = float(res[self.metric])
        self.history.append({"epoch": epoch, "step": step + 1, self.metric: score})
        better = self.best_score is None or (math.isfinite(score) and (
            score > self.best_score if self.higher else score < self.best_score))
        if better:
            self.best_score, self.best_epoch = score, epoch
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        if self.log is not None:
            self.log(f"selection: epoch {epoch} {self.split} {self.metric} {score:.4g} "
                     f"(best: epoch {self.best_epoch}, {self.best_score:.4g})")

    def get_state(self):
        return {"best_state": self.best_state, "best_score": self.best_score, "best_epoch": self.best_epoch,
                "history": list(self.history)}

    def set_state(self, st) -> None:
        self.best_state, self.best_score = st["best_state"], st["best_score"]
        self.best_epoch, self.history = st["best_epoch"], list(st["history"])

    def train_kwargs(self) -> dict:
        return {"on_step": self.on_step, "state_hooks": (self.get_state, self.set_state)}

    # ---------------------------------------------------------------- after the training
    def finish(self) -> dict:
        """Load the best epoch's weights into the model; the record's `selection` entry."""
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        return {"rule": "paper", "split": self.split, "metric": self.metric, "higher_is_better": self.higher,
                "best_epoch": self.best_epoch, "best_score": self.best_score,
                "epochs_evaluated": len(self.history), "history": self.history,
                **({"every": self.every} if self.every != 1 else {}),
                "label": selection_label(self.split)}
