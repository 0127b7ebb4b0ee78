"""Checkpoint selection of the finetune (recipe `selection: final | paper`, bench.selection) and the training
compute of every row (bench.report.training_compute): `paper` keeps the epoch with the best score on the
selection split, loads its weights back, and the table and CSV label the row "(best-epoch on <split>)"."""
import csv
import io

import pytest
import torch
from torch import nn

from bench.errors import BenchError
from bench.options import parse_block
from bench.recipe import TrainRecipe
from bench.report import leaderboard_csv_text, render_table
from bench.selection import EpochSelection
from bench.training import train
from tests.test_report import CARD, make_records, rec


class ScriptedTask:
    """A toy regression task whose evaluation returns scripted dev scores, one per call."""

    name = "toy"
    metrics = {"acc": True}
    RECIPE_KEYS = frozenset()

    def __init__(self, scores):
        self.scores = list(scores)
        self.calls = []

    def steps_per_epoch(self, batch_size):
        return 3

    def train_batches(self, batch_size, seed, recipe=None):
        g = torch.Generator().manual_seed(seed)
        while True:
            yield torch.randn(batch_size, 4, generator=g)

    def loss(self, model, batch, device, recipe=None):
        return (model(batch) - 1.0).pow(2).mean()

    def evaluate(self, model, split, device):
        assert not model.training            # evaluated in eval mode
        self.calls.append((split, {k: v.detach().clone() for k, v in model.state_dict().items()}))
        return {"acc": self.scores[len(self.calls) - 1], "dev_acc": self.scores[len(self.calls) - 1]}


CFG_METRICS = [{"name": "dev_acc", "split": "dev", "higher_is_better": True, "primary": True},
               {"name": "test_acc", "split": "test", "higher_is_better": True}]


def _cfg(**ft):
    return {"metrics": CFG_METRICS, "finetune": parse_block(TrainRecipe, {"epochs": 4, "lr": 1.0e-2, "batch_size": 8,
                                                                          **ft}, "finetune").to_dict()}


def test_final_selection_is_none_and_keys_need_paper():
    assert EpochSelection.for_cell(_cfg(), ScriptedTask([]), nn.Linear(4, 1), "cpu") is None
    with pytest.raises(BenchError, match="selection: paper"):
        parse_block(TrainRecipe, {"epochs": 1, "lr": 1.0e-3, "batch_size": 8, "selection_split": "dev"}, "finetune")


def test_paper_selection_keeps_the_best_epoch_on_the_dev_split():
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    task = ScriptedTask([60.0, 75.0, 75.0, 70.0])      # epoch 2 best; the tie at epoch 3 keeps epoch 2 (strict >)
    cfg = _cfg(selection="paper")
    sel = EpochSelection.for_cell(cfg, task, model, "cpu")
    assert (sel.split, sel.metric, sel.higher) == ("dev", "dev_acc", True)
    stats = train(model, task, device="cpu", seed=0, **cfg["finetune"], **sel.train_kwargs())
    assert stats["steps"] == 12 and len(task.calls) == 4       # once per epoch
    assert {s for s, _ in task.calls} == {"dev"}
    final = {k: v.clone() for k, v in model.state_dict().items()}
    out = sel.finish()
    assert out["best_epoch"] == 2 and out["best_score"] == 75.0
    assert out["label"] == "(best-epoch on dev)"
    assert [h["epoch"] for h in out["history"]] == [1, 2, 3, 4]
    epoch2 = task.calls[1][1]
    assert all(torch.equal(model.state_dict()[k], epoch2[k]) for k in epoch2)      # the epoch-2 weights are back
    assert not all(torch.equal(final[k], epoch2[k]) for k in final)


def test_paper_selection_lower_is_better_and_explicit_split():
    model = nn.Linear(4, 1)
    task = ScriptedTask([3.0, 1.0, 2.0, 5.0])
    cfg = {"metrics": [{"name": "ppl", "split": "test", "higher_is_better": False, "primary": True}],
           "finetune": _cfg(selection="paper", selection_split="valid", selection_metric="acc")["finetune"]}
    cfg["metrics"].append({"name": "acc", "split": "test", "higher_is_better": False})
    sel = EpochSelection.for_cell(cfg, task, model, "cpu")
    assert (sel.split, sel.metric, sel.higher) == ("valid", "acc", False)
    train(model, task, device="cpu", seed=0, **cfg["finetune"], **sel.train_kwargs())
    assert sel.finish()["best_epoch"] == 2


def _selected_records():
    recs = make_records()
    for r in recs:
        if r["method"] == "somp" and r["ratio_label"] == "1.25x":
            r["selection"] = {"rule": "paper", "split": "val", "label": "(best-epoch on val)", "best_epoch": 3}
            r["training"] = {"dense": {"steps": 99, "epochs": 24}, "finetune": {"steps": 40, "epochs": 4}}
        if r["method"] == "gohsp":
            r["training"] = {"gohsp": {"steps": 30, "epochs": 3}, "finetune": {"steps": 40, "epochs": 4}}
    return recs


def test_the_row_is_labelled_in_the_table_and_the_csv():
    recs = _selected_records()
    text = render_table(CARD, recs, "md")
    assert "somp (best-epoch on val)" in text
    assert "Train ep." in text
    rows = list(csv.DictReader(io.StringIO(_strip_comments(leaderboard_csv_text(CARD, recs)))))
    sel = {(r["method"], r["ratio_label"], r["selection"]) for r in rows if r["metric"] == "top1"}
    assert ("somp", "1.25x", "(best-epoch on val)") in sel
    assert ("somp", "2.00x", "") in sel           # the other rows: final epoch, no label


def _strip_comments(text):
    return "\n".join(line for line in text.splitlines() if not line.startswith("#"))


def test_every_row_shows_its_training_compute():
    recs = _selected_records()
    rows = list(csv.DictReader(io.StringIO(_strip_comments(leaderboard_csv_text(CARD, recs)))))
    by = {(r["method"], r["ratio_label"]): r for r in rows if r["metric"] == "top1"}
    g = by[("gohsp", "2.00x")]
    assert (float(g["train_epochs"]), int(g["train_steps"]), g["train_phases"]) == (7.0, 70, "gohsp 3 + finetune 4")
    s = by[("somp", "1.25x")]                      # the dense training is shared by all rows: not counted
    assert (float(s["train_epochs"]), int(s["train_steps"])) == (4.0, 40)
    text = render_table(CARD, recs, "md")
    assert "7 (gohsp 3 + finetune 4)" in text


def test_compute_unknown_for_records_without_training_entry_zero_for_no_phase():
    from bench.report import training_compute
    r = rec("somp", "2.00x", 0.5, 0, {"top1": 70.0, "top5": 90.0})
    assert training_compute([r])["train_epochs"] is None    # an old record: unknown, not 0
    r["training"] = {"dense": {"steps": 9, "epochs": 1}}
    assert training_compute([r])["train_epochs"] == 0.0     # no phase after the dense model: none trained


# ---------------------------------------------------------------- selection_every (Segmenter's eval_freq)
@pytest.mark.parametrize("epochs", [7, 8, 64])
def test_selection_every_evaluates_as_segmenters_eval_freq(epochs):
    """selection_every 2 = sdc17/UPop compress_segmenter.py l. 420 with its 0-based epochs: `epoch % eval_freq == 0
    or epoch == num_epochs - 1` (eval_freq 2, segm/config.yml l. 108); the record counts epochs from 1."""
    official = [e for e in range(epochs) if e % 2 == 0 or e == epochs - 1]
    scores = [float(i) for i in range(len(official))]
    scores[len(scores) // 2] = 1000.0                 # the best evaluated epoch, mid-run
    model, task = nn.Linear(4, 1), ScriptedTask(scores)
    cfg = _cfg(selection="paper", selection_every=2, epochs=epochs)
    sel = EpochSelection.for_cell(cfg, task, model, "cpu")
    train(model, task, device="cpu", seed=0, **cfg["finetune"], **sel.train_kwargs())
    out = sel.finish()
    assert [h["epoch"] for h in out["history"]] == [e + 1 for e in official]
    assert len(task.calls) == len(official) == out["epochs_evaluated"]
    assert out["best_epoch"] == official[len(scores) // 2] + 1 and out["every"] == 2
    if epochs == 64:
        assert len(official) == 33 and out["history"][-2]["epoch"] == 63 and out["history"][-1]["epoch"] == 64
    chosen = task.calls[len(scores) // 2][1]
    assert all(torch.equal(model.state_dict()[k], chosen[k]) for k in chosen)


def test_selection_every_needs_paper_and_stays_out_of_the_hash():
    with pytest.raises(BenchError, match="selection_every are for selection: paper"):
        parse_block(TrainRecipe, {"epochs": 1, "lr": 1.0e-3, "batch_size": 8, "selection_every": 2}, "finetune")
    assert "selection_every" not in _cfg(selection="paper")["finetune"]
    out = EpochSelection(nn.Linear(4, 1), ScriptedTask([]), "cpu", "dev", "acc", True, 3).finish()
    assert "every" not in out                          # the records of every-epoch selection are unchanged


def test_selection_uses_the_tasks_selection_evaluation():
    """TaskAdapter.evaluate_for_selection (default: evaluate) is what the selection reads, with its metric."""
    class SelectingTask(ScriptedTask):
        def evaluate(self, model, split, device):
            raise AssertionError("the reported evaluation is not the selection's")

        def evaluate_for_selection(self, model, split, device, metric):
            self.calls.append((split, metric))
            return {metric: self.scores[len(self.calls) - 1]}

    model, task = nn.Linear(4, 1), SelectingTask([1.0, 3.0, 2.0, 0.0])
    cfg = _cfg(selection="paper")
    sel = EpochSelection.for_cell(cfg, task, model, "cpu")
    train(model, task, device="cpu", seed=0, **cfg["finetune"], **sel.train_kwargs())
    assert task.calls == [("dev", "dev_acc")] * 4 and sel.finish()["best_epoch"] == 2
    from bench.api import TaskAdapter
    assert TaskAdapter.evaluate_for_selection.__doc__ and TaskAdapter.on_train_step.__doc__
