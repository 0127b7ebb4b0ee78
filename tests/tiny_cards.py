"""A tiny copy of the upop_deit card (4 classes of 32x32 synthetic images, a 2-epoch dense model) in a folder
named by BENCH_TABLES, for the tests that run whole tables in several processes (workers, launchers)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from bench.cards import load_card


def write_tiny_card(folder: Path, methods=("dense", "upop", "somp"), ratios=slice(0, 4, 3), finetune_epochs=2,
                    name="tiny_deit") -> Path:
    card = load_card("upop_deit")
    card.pop("_path")
    card["table"] = name
    card["methods"] = list(methods)
    card["method_options"] = {k: v for k, v in card["method_options"].items() if k in card["methods"]}
    card["ratios"] = card["ratios"][ratios]      # default: 1.11x and 1.67x
    labels = {r["label"] for r in card["ratios"]} | {"1x"}
    card["references"]["rows"] = [r for r in card["references"]["rows"]
                                  if r["ratio"] in labels and r["method"] in card["methods"]]
    micro = card["profiles"]["micro"]
    micro["data"] = {"num_classes": 4, "train_per_class": 24, "val_per_class": 8, "image_size": 32, "seed": 7}
    micro["dense"] = {"epochs": 2, "lr": 2.0e-3, "batch_size": 32}
    micro["finetune"] = {"epochs": finetune_epochs, "lr": 5.0e-4, "batch_size": 32}
    micro["upop"] = {"search_epochs": 1, "lr": 5.0e-4, "batch_size": 32, "interval": 1, "w_sp_attn": 4.8e-3,
                     "w_sp_mlp": 2.0e-4}
    micro["throughput"] = {"batch_size": 8, "warmup": 1, "iters": 2, "trials": 1}
    micro.pop("budgets", None)   # the paper budget only (tests of budget: matched build their own)
    for prof in card["profiles"].values():   # the strict schema refuses settings of a method the card does not run
        for m in ("sgmp", "upop"):
            if m not in card["methods"]:
                prof.pop(m, None)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(card, sort_keys=False))
    return path


def tiny_env(tmp_path: Path, out="out", cache="cache", **card_kw) -> dict:
    write_tiny_card(tmp_path / "cards", **card_kw)
    # not the xdist variables of a test session run with -n: the child `bench run` is a fresh controller
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_XDIST", "PYTEST_CURRENT_TEST"))}
    return dict(base, BENCH_TABLES=str(tmp_path / "cards"), BENCH_CACHE=str(tmp_path / cache),
                BENCH_OUTPUT=str(tmp_path / out), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def bench(env, *args, timeout=600):
    return subprocess.run([sys.executable, "-m", "bench", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def records(out_table: Path) -> dict:
    """{hash: record} of a table's output folder (every file must parse)."""
    recs = {}
    for p in sorted((out_table / "records").glob("*.json")):
        recs[p.stem] = json.loads(p.read_text())
    return recs


def dense_trainings(text: str) -> int:
    return text.count("training the dense")
