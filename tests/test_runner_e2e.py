"""End to end through the CLI and the pytest plugin, on a tiny copy of the upop_deit card:
the table is printed, a second run reuses every cell, and a run killed with kill -9 resumes."""
import csv
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from bench.cards import load_card

pytestmark = pytest.mark.slow


@pytest.fixture
def tiny_env(tmp_path):
    card = load_card("upop_deit")
    card.pop("_path")
    card["table"] = "tiny_deit"
    card["methods"] = ["dense", "upop", "somp"]
    card["method_options"] = {k: v for k, v in card["method_options"].items() if k in card["methods"]}
    card["ratios"] = card["ratios"][:4:3]      # 1.11x and 1.67x
    labels = {r["label"] for r in card["ratios"]} | {"1x"}
    card["references"]["rows"] = [r for r in card["references"]["rows"] if r["ratio"] in labels]
    micro = card["profiles"]["micro"]
    micro["data"] = {"num_classes": 4, "train_per_class": 24, "val_per_class": 8, "image_size": 32, "seed": 7}
    micro["dense"] = {"epochs": 2, "lr": 2.0e-3, "batch_size": 32}
    micro["finetune"] = {"epochs": 2, "lr": 5.0e-4, "batch_size": 32}
    micro["upop"] = {"search_epochs": 1, "lr": 5.0e-4, "batch_size": 32, "interval": 1, "w_sp_attn": 4.8e-3,
                     "w_sp_mlp": 2.0e-4}
    micro["throughput"] = {"batch_size": 8, "warmup": 1, "iters": 2, "trials": 1}
    for prof in card["profiles"].values():   # the strict schema refuses settings of a method the card does not run
        prof.pop("sgmp", None)
        prof.pop("budgets", None)             # the paper budget only (tests/test_budget.py covers matched)
    (tmp_path / "cards").mkdir()
    (tmp_path / "cards" / "tiny_deit.yaml").write_text(yaml.safe_dump(card, sort_keys=False))
    env = dict(os.environ, BENCH_TABLES=str(tmp_path / "cards"), BENCH_CACHE=str(tmp_path / "cache"),
               BENCH_OUTPUT=str(tmp_path / "out"), OMP_NUM_THREADS="1")
    return env, tmp_path / "out" / "tiny_deit"


def bench(env, *args, **kw):
    return subprocess.run([sys.executable, "-m", "bench", *args], env=env, capture_output=True, text=True,
                          timeout=600, **kw)


def test_run_reuse_report_and_compare(tiny_env):
    env, out = tiny_env
    r = bench(env, "run", "--table", "tiny_deit")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for cell in ["dense-1x-seed0 NO-REF", "somp-1.11x-seed0 NO-REF", "upop-1.67x-seed0 NO-REF"]:
        assert cell in r.stdout
    assert "wall time:" in r.stdout and "Throughput" in r.stdout
    records = sorted((out / "records").glob("*.json"))
    assert len(records) == 5
    stamps = {p: p.stat().st_mtime_ns for p in records}
    csv_file = next(out.glob("tiny_deit-micro-*.csv"))
    rows = list(csv.DictReader(csv_file.open()))
    assert len(rows) == 5 * 2          # 5 cells x (top1, top5)
    assert (out / "tiny_deit-micro.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((out / "cells").glob("*/manifest.json"))) == 5

    t0 = time.perf_counter()
    r2 = bench(env, "run", "--table", "tiny_deit")
    assert r2.returncode == 0
    assert r2.stdout.count("(reused)") == 5
    assert {p: p.stat().st_mtime_ns for p in records} == stamps   # nothing recomputed or rewritten
    assert time.perf_counter() - t0 < 60

    for fmt, needle in [("md", "| somp"), ("csv", "somp"), ("latex", "\\toprule")]:
        rep = bench(env, "report", "--table", "tiny_deit", "--format", fmt)
        assert rep.returncode == 0 and needle in rep.stdout, rep.stderr
    rep = bench(env, "report", "--table", "tiny_deit", "--retention")
    # one table per pruned cell (upop and somp at 1.11x and 1.67x; the dense row has none), each ending in its
    # "all" row with the head_dim and ffn columns
    titles = [line for line in rep.stdout.splitlines() if line.startswith("Retention (fraction of units kept): ")]
    assert sorted(t.split(": ", 1)[1] for t in titles) == sorted(
        f"{m} {r} seed 0" for m in ("upop", "somp") for r in ("1.11x", "1.67x")), rep.stdout
    assert sum(line.split()[:1] == ["all"] for line in rep.stdout.splitlines()) == 4, rep.stdout
    assert all(line.split()[:3] == ["layer", "head_dim", "ffn"] for line in rep.stdout.splitlines()
               if line.split()[:1] == ["layer"]), rep.stdout

    same = bench(env, "compare", str(csv_file), str(csv_file))
    assert same.returncode == 0 and "no regression" in same.stdout
    worse = out / "worse.csv"
    rows2 = [dict(r) for r in rows]
    for row in rows2:
        if row["method"] == "somp" and row["metric"] == "top1":
            row["metric_value"] = str(float(row["metric_value"]) - 20)
    with worse.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows2)
    reg = bench(env, "compare", str(csv_file), str(worse))
    assert reg.returncode == 1 and "REGRESSION" in reg.stdout


def test_kill_9_then_resume(tiny_env):
    env, out = tiny_env
    proc = subprocess.Popen([sys.executable, "-m", "bench", "run", "--table", "tiny_deit"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and len(list((out / "records").glob("*.json"))) < 2:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {p.name: p.read_bytes() for p in (out / "records").glob("*.json")}
    assert 2 <= len(before) < 5, "the run should have been killed halfway"
    r = bench(env, "run", "--table", "tiny_deit")
    assert r.returncode == 0, r.stdout[-3000:]
    assert r.stdout.count("(reused)") == len(before)
    after = {p.name: p.read_bytes() for p in (out / "records").glob("*.json")}
    assert len(after) == 5
    assert all(after[k] == v for k, v in before.items())     # finished cells untouched
    assert not list(out.rglob(".*.tmp"))                     # no half-written files left behind
    rows = list(csv.DictReader(next(out.glob("tiny_deit-micro-*.csv")).open()))
    assert len(rows) == 10 and all(r["metric_value"] for r in rows)
