"""Profiles are data source x dense-model source x budgets: a card's own profile runs, a base checkpoint is
finetuned densely on the task before pruning, and a checkpoint without a trained task head is refused."""
from __future__ import annotations

import copy

import pytest
import torch

from bench.cards import load_card
from bench.config import Paths
from bench.errors import BenchError
from bench.registry import MODELS, TASKS
from bench.runner import Session, expand_cells, run_cell
from bench.training import train

DATA = {"train_size": 2000, "dev_size": 200, "seed": 3, "max_len": 32}


def _glue_card(checkpoint, dense):
    card = copy.deepcopy(load_card("vtrans_glue_bert"))
    card["_path"] = "vtrans_glue_bert.yaml"
    card["methods"] = ["dense"]
    card["method_options"] = {}
    card["profiles"] = {"mine": {
        "model": "bert_micro", "model_config": {"vocab_size": 140},
        "data_source": "synthetic", "tasks": ["glue_sst2"],
        "data": DATA,
        "checkpoint": str(checkpoint), **({"dense": dense} if dense else {}),
        "throughput": {"batch_size": 4, "warmup": 1, "iters": 1, "trials": 1},
    }}
    card.pop("references", None)
    card["relations"] = []
    return card


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory):
    """A BERT 'base model' folder as transformers writes it: an encoder whose features were learnt (here: on the
    synthetic task itself, standing in for pre-training), saved without its classifier (save_pretrained)."""
    root = tmp_path_factory.mktemp("ckpt")
    folder = root / "bert-micro-base"
    cls, cfg = MODELS.get("bert_micro")
    torch.manual_seed(0)
    adapter = cls("bert_micro", {**cfg, "vocab_size": 140, "num_labels": 2})
    model = adapter.build()
    task = TASKS.get("glue_sst2")(DATA, None, "micro", root / "cache")
    task.prepare()
    train(model, task, epochs=6, lr=1.0e-3, batch_size=32, device="cpu", seed=0, adapter=adapter)
    model.bert.save_pretrained(folder)
    assert (folder / "config.json").is_file() and not any("classifier" in p.name for p in folder.iterdir())
    return folder


def test_a_base_checkpoint_is_finetuned_on_the_task_before_pruning(base_checkpoint, tmp_path):
    card = _glue_card(base_checkpoint, {"epochs": 1, "lr": 1.0e-3, "batch_size": 32})
    (cell,) = expand_cells(card, "mine", device="cpu")
    assert cell["checkpoint"] == str(base_checkpoint) and cell["dense_training"]["epochs"] == 1
    session = Session(Paths.resolve(cache=tmp_path / "cache", output=tmp_path / "out"), log=lambda m: None)
    rec = run_cell(cell, session)
    assert rec["status"] == "no_ref", rec["reason"]
    assert rec["model_tag"] == "checkpoint+finetune"
    assert rec["metrics"]["acc"] > 65.0, rec["metrics"]     # chance is 50 on the balanced synthetic SST-2


def test_a_checkpoint_without_a_trained_task_head_is_refused_without_a_dense_recipe(base_checkpoint, tmp_path):
    card = _glue_card(base_checkpoint, None)
    (cell,) = expand_cells(card, "mine", device="cpu")
    session = Session(Paths.resolve(cache=tmp_path / "cache", output=tmp_path / "out"), log=lambda m: None)
    task = session.task(cell)
    with pytest.raises(BenchError, match=r"profiles\.mine\.dense"):
        session.dense_model(cell, task, torch.device("cpu"))


USER_CARD = """\
table: my_shapes
version: 1
title: "ViT on my own photos: SOMP at 2x"
paper: "own data"
task: imagenet
model: vit
methods: [dense, somp]
ratio_meaning: "p = fraction of the attention and MLP parameters removed"
ratios: [{label: 2x, p: 0.5}]
metrics: [{name: top1, split: val, higher_is_better: true, primary: true}]
selection: "final epoch of the finetune"
protocol:
  flops: {input: "1x3x32x32 image"}
  throughput: {batch_size: 8, warmup: 1, iters: 2, trials: 1}
profiles:
  mine:
    model: vit_micro
    model_config: {num_classes: 3, img_size: 32}
    data: {root: DATA_ROOT, image_size: 32, workers: 0}
    dense: {epochs: 6, lr: 2.0e-3, batch_size: 16}
    finetune: {epochs: 1, lr: 5.0e-4, batch_size: 16, label_smoothing: 0.1}
"""


def _image_folder(root, per_class):
    """train/ and val/ class folders of JPEGs: each class a colour, with noise (learnable in a few epochs)."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    colours = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200)}
    for split, n in (("train", per_class), ("val", per_class // 2)):
        for name, rgb in colours.items():
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                img = np.clip(np.array(rgb) + rng.normal(0, 40, (40, 40, 3)), 0, 255).astype("uint8")
                Image.fromarray(img).save(d / f"{i}.jpg", quality=90)


def test_a_user_card_and_profile_run_end_to_end_on_an_image_folder(tmp_path):
    import os
    import subprocess
    import sys

    data = tmp_path / "photos"
    _image_folder(data, per_class=24)
    cards = tmp_path / "cards"
    cards.mkdir()
    (cards / "my_shapes.yaml").write_text(USER_CARD.replace("DATA_ROOT", str(data)))
    env = dict(os.environ, BENCH_TABLES=str(cards), BENCH_CACHE=str(tmp_path / "cache"),
               BENCH_OUTPUT=str(tmp_path / "out"), OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "bench", "run", "--table", "my_shapes", "--profile", "mine"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "dense-1x-seed0 NO-REF" in run.stdout and "somp-2x-seed0 NO-REF" in run.stdout, run.stdout[-3000:]
    import json
    recs = [json.loads(p.read_text()) for p in (tmp_path / "out" / "my_shapes" / "records").glob("*.json")]
    by = {r["method"]: r for r in recs}
    assert set(by) == {"dense", "somp"}
    assert by["dense"]["model_tag"] == "scratch" and by["dense"]["config"]["data_source"] == "folder"
    assert by["dense"]["metrics"]["top1"] > 60.0, by["dense"]["metrics"]   # 3 classes: chance is 33
    assert by["somp"]["params"]["total"] < by["dense"]["params"]["total"]


def test_per_ratio_budgets_resolve_into_each_cell():
    """upop_nlvr2's paper profile: search and retrain 15/20/23/24/27 epochs at 2x/3x/4x/5x/10x (official scripts)."""
    cells = expand_cells(load_card("upop_nlvr2"), "paper", methods="upop,somp")
    got = {(c["method"], c["ratio"]["label"]): (c["finetune"]["epochs"], c["method_settings"].get("search_epochs"))
           for c in cells}
    for label, epochs in {"2x": 15, "3x": 20, "4x": 23, "5x": 24, "10x": 27}.items():
        assert got[("upop", label)] == (epochs, epochs)
        assert got[("somp", label)] == (epochs, None)


def test_per_ratio_errors_name_their_path():
    from bench.cards import validate_card
    card = copy.deepcopy(load_card("upop_nlvr2"))
    card["profiles"]["paper"]["per_ratio"] = {"7x": {"finetune": {"epochs": 3}},
                                              "3x": {"finetune": {"epoch": 3}, "upopp": {"search_epochs": 1}}}
    errs = validate_card(card)
    for needle in ("profiles.paper.per_ratio.7x: '7x' is not a ratio label",
                   "profiles.paper.per_ratio.3x.finetune.epoch: unknown key, did you mean epochs?",
                   "profiles.paper.per_ratio.3x.upopp: neither finetune nor the settings of a method"):
        assert any(needle in e for e in errs), errs
