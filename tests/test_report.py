"""Reporting and CSV comparison on hand-made records (no model runs; fast)."""
from __future__ import annotations

import copy
import csv
import math
import statistics

import pytest

from bench.compare import compare_csv, format_diffs, read_leaderboard
from bench.errors import BenchError
from bench.report import (LEADERBOARD_COLUMNS, leaderboard_filename, leaderboard_rows, plot, render_table,
                          retention_table, tolerance_abs, write_leaderboard_csv)

CARD = {
    "table": "toy_deit", "version": 3, "title": "Toy DeiT table", "task": "imagenet",
    "model": "deit_small_patch16_224",
    "methods": ["dense", "somp", "gohsp", "sgmp"],
    "ratio_meaning": "p = fraction of the prunable parameters removed; label 1/(1-p).",
    "ratios": [{"label": "1.25x", "p": 0.2}, {"label": "2.00x", "p": 0.5}],
    "metrics": [{"name": "top1", "split": "val", "higher_is_better": True, "primary": True},
                {"name": "top5", "split": "val", "higher_is_better": True}],
    "protocol": {"throughput": {"batch_size": 64}},
    "references": {"source": "Toy paper, Table 9", "profile": "micro",
                   "tolerance": {"top1": 0.5, "top5": "1%", "params_m": 0.05, "gflops": 0.05},
                   "rows": [{"method": "dense", "ratio": "1x", "top1": 80.0, "top5": 95.0, "params_m": 22.0,
                             "gflops": 4.6},
                            {"method": "somp", "ratio": "2.00x", "top1": 70.3, "top5": 90.2, "params_m": 11.5,
                             "gflops": 2.3}]},
    "notes": ["A toy note about the baselines."],
}


def rec(method, label, p, seed, metrics, *, impl="baseline", status="no_ref", reason=None, total=11_500_000,
        macs=2_300_000_000, tput=1000.0, checks=None, ref_values=None, date="2025-01-01T00:00:00Z"):
    error = status == "error"
    return {
        "record_version": 1, "hash": f"{method}-{label}-{seed}", "run_id": f"run-{seed}", "date_utc": date,
        "status": status, "reason": reason, "table": "toy_deit", "table_version": 3, "profile": "micro",
        "task": "imagenet", "split": "val", "model_arch": "vit_micro", "model_tag": "scratch",
        "method": method, "method_impl": impl, "ratio_label": label, "ratio_p": p, "ratio_meaning": "",
        "seed": seed, "config": {}, "metrics": {} if error else metrics,
        "metric_splits": {"top1": "val", "top5": "val"},
        "params": None if error else {"total": total, "dense_total": 22_000_000, "prunable_dense": 21_000_000,
                                      "removed": 22_000_000 - total, "target_removed": int(p * 21_000_000),
                                      "achieved_reduction": (22_000_000 - total) / 21_000_000,
                                      "target_reduction": p},
        "flops": None if error else {"macs": macs, "dense_macs": 4_600_000_000, "input_spec": "1x3x32x32",
                                     "counter": "bench.dispatch", "convention": "fma1_attn_incl"},
        "speed": None if error else {"throughput_sps": tput, "batch_size": 64, "precision": "fp32",
                                     "device": "cpu", "latency_ms_bs1": 1.5, "trials": 3, "iters": 10},
        "memory": None if error else {"peak_mem_mb": 12.0, "kind": "cpu_rss"},
        "reference": None if ref_values is None else {
            "values": ref_values, "source": "Toy paper, Table 9",
            "tolerance": {"top1": 0.5, "top5": "1%"}, "checks": checks or []},
        "timings": {}, "retention": [], "method_info": {},
        "env": {"torch": "2.14.1", "timm": "1.0.20", "transformers": None, "open_clip": None,
                "bench_version": "0.1.0", "git_sha": "abc123", "device_name": "Test CPU 9000", "cuda": None,
                "python": "3.11", "cpu_threads": 2},
    }


def chk(name, value, paper, tol, ok):
    return {"name": name, "value": value, "paper": paper, "tolerance": tol, "ok": ok}


SOMP_REF = {"top1": 70.3, "top5": 90.2}


def make_records():
    return [
        rec("dense", "1x", 0.0, 0, {"top1": 80.0, "top5": 95.0}, impl="dense", status="pass", total=22_000_000,
            macs=4_600_000_000, tput=1000.0, ref_values={"top1": 80.0, "top5": 95.0},
            checks=[chk("top1", 80.0, 80.0, 0.5, True), chk("top5", 95.0, 95.0, "1%", True)]),
        # two seeds of one cell: seed 1 fails its top5 check only
        rec("somp", "2.00x", 0.5, 1, {"top1": 71.0, "top5": 88.0}, status="fail", reason="top5 88 vs 90.2",
            tput=2000.0, ref_values=SOMP_REF,
            checks=[chk("top1", 71.0, 70.3, 0.5, False), chk("top5", 88.0, 90.2, "1%", False)],
            date="2025-01-02T00:00:00Z"),
        rec("somp", "2.00x", 0.5, 0, {"top1": 70.0, "top5": 90.0}, status="pass", tput=1800.0, ref_values=SOMP_REF,
            checks=[chk("top1", 70.0, 70.3, 0.5, True), chk("top5", 90.0, 90.2, "1%", True)]),
        rec("somp", "1.25x", 0.2, 0, {"top1": 78.0, "top5": 94.0}, total=17_800_000, macs=3_700_000_000,
            tput=1200.0),
        rec("gohsp", "2.00x", 0.5, 0, {"top1": 72.5, "top5": 91.0}, impl="reimpl", tput=1500.0),
        rec("sgmp", "2.00x", 0.5, 0, {}, status="error", reason="RuntimeError: CUDA out of memory"),
    ]


def rows_by(rows, method, label, metric):
    [row] = [r for r in rows if (r["method"], r["ratio_label"], r["metric"]) == (method, label, metric)
             and r.get("row_kind", "cell") == "cell"]
    return row


# ---------------------------------------------------------------------------------------------
# leaderboard

def test_column_order_exact(tmp_path):
    expected = (
        "table_id table_version profile task split model_arch model_tag method method_impl "
        "ratio_label ratio_p target_param_reduction achieved_param_reduction params_m params_dense_m prunable_params_m "
        "gmacs gmacs_dense macs_reduction flop_counter flop_convention flop_input_spec "
        "metric metric_value metric_dense metric_delta higher_is_better n_seeds metric_std seed_list "
        "paper_value paper_source tolerance status "
        "throughput_sps tput_batch_size latency_ms_bs1 speedup_measured speedup_theoretical precision peak_mem_mb "
        "device_name torch timm transformers open_clip bench_version git_sha run_id date_utc "
        "part gmacs_inference compress_s finetune_s "
        "row_kind seed code_version "
        "train_epochs train_steps train_phases selection").split()
    assert LEADERBOARD_COLUMNS == expected
    path = tmp_path / "out" / "lb.csv"
    write_leaderboard_csv(CARD, make_records(), path)
    text = path.read_text()
    assert not text.startswith("#")
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == expected
    assert all(len(r) == len(expected) for r in rows[1:])
    # one row per (method, ratio, metric), in card order: dense first, then methods by ascending p; a cell of
    # two seeds (somp 2.00x) is followed by its per-seed rows
    kind, seed = expected.index("row_kind"), expected.index("seed")
    assert [(r[7], r[9], r[22], r[seed]) for r in rows[1:] if r[kind] == "seed"] == [
        ("somp", "2.00x", "top1", "0"), ("somp", "2.00x", "top1", "1"),
        ("somp", "2.00x", "top5", "0"), ("somp", "2.00x", "top5", "1")]
    keys = [(r[7], r[9], r[22]) for r in rows[1:] if r[kind] == "cell"]
    assert keys == [("dense", "1x", "top1"), ("dense", "1x", "top5"),
                    ("somp", "1.25x", "top1"), ("somp", "1.25x", "top5"),
                    ("somp", "2.00x", "top1"), ("somp", "2.00x", "top5"),
                    ("gohsp", "2.00x", "top1"), ("gohsp", "2.00x", "top5"),
                    ("sgmp", "2.00x", "top1"), ("sgmp", "2.00x", "top5")]
    assert [p.name for p in path.parent.iterdir()] == ["lb.csv"]  # no temp file left behind


def test_aggregation_mean_std_exact():
    rows = leaderboard_rows(CARD, make_records())
    r = rows_by(rows, "somp", "2.00x", "top1")
    assert r["metric_value"] == pytest.approx(70.5, abs=1e-12)
    assert r["metric_std"] == pytest.approx(statistics.stdev([70.0, 71.0]), abs=1e-12)
    assert r["metric_std"] == pytest.approx(math.sqrt(0.5), abs=1e-12)
    assert r["n_seeds"] == 2 and r["seed_list"] == "0;1"
    assert r["metric_dense"] == 80.0 and r["metric_delta"] == pytest.approx(-9.5)
    assert r["params_m"] == pytest.approx(11.5) and r["params_dense_m"] == pytest.approx(22.0)
    assert r["achieved_param_reduction"] == pytest.approx(10.5 / 21.0)
    assert r["target_param_reduction"] == 0.5
    assert r["gmacs"] == pytest.approx(2.3) and r["gmacs_dense"] == pytest.approx(4.6)
    assert r["macs_reduction"] == pytest.approx(0.5)
    assert r["paper_value"] == 70.3 and r["paper_source"] == "Toy paper, Table 9" and r["tolerance"] == "0.5"
    assert rows_by(rows, "somp", "2.00x", "top5")["tolerance"] == "1%"
    assert r["method_impl"] == "baseline" and rows_by(rows, "gohsp", "2.00x", "top1")["method_impl"] == "reimpl"
    assert r["run_id"] == "run-0;run-1" and r["date_utc"] == "2025-01-02T00:00:00Z"
    assert r["higher_is_better"] is True and r["split"] == "val"
    # without a reference in the records, the card's reference for the same profile is used
    recs = make_records()
    for r in recs:
        r["reference"], r["status"] = None, "no_ref"
    r2 = rows_by(leaderboard_rows(CARD, recs), "somp", "2.00x", "top1")
    assert r2["paper_value"] == 70.3 and r2["paper_source"] == "Toy paper, Table 9" and r2["status"] == "no_ref"
    other = dict(CARD, references=dict(CARD["references"], profile="paper"))
    assert rows_by(leaderboard_rows(other, recs), "somp", "2.00x", "top1")["paper_value"] is None
    # single seed: no std
    one = rows_by(rows, "somp", "1.25x", "top1")
    assert one["metric_std"] is None and one["n_seeds"] == 1 and one["seed_list"] == "0"


def test_speedups():
    rows = leaderboard_rows(CARD, make_records())
    r = rows_by(rows, "somp", "2.00x", "top1")
    assert r["throughput_sps"] == pytest.approx(1900.0)
    assert r["speedup_measured"] == pytest.approx(1.9)           # 1900 / 1000 dense
    assert r["speedup_theoretical"] == pytest.approx(2.0)        # 4.6 G / 2.3 G
    d = rows_by(rows, "dense", "1x", "top1")
    assert d["speedup_measured"] == pytest.approx(1.0) and d["speedup_theoretical"] == pytest.approx(1.0)
    assert d["metric_delta"] == 0.0
    # no dense record: no measured speedup, theoretical still from the record's dense_macs
    rows = leaderboard_rows(CARD, [r for r in make_records() if r["method"] != "dense"])
    r = rows_by(rows, "somp", "2.00x", "top1")
    assert r["speedup_measured"] is None and r["speedup_theoretical"] == pytest.approx(2.0)
    assert r["metric_dense"] is None and r["metric_delta"] is None


def test_status_aggregation():
    rows = leaderboard_rows(CARD, make_records())
    assert rows_by(rows, "dense", "1x", "top1")["status"] == "pass"
    # seed 1 failed both checks -> both rows of the cell fail
    assert rows_by(rows, "somp", "2.00x", "top1")["status"] == "fail"
    assert rows_by(rows, "somp", "2.00x", "top5")["status"] == "fail"
    assert rows_by(rows, "gohsp", "2.00x", "top1")["status"] == "no_ref"
    err = rows_by(rows, "sgmp", "2.00x", "top1")
    assert err["status"] == "error" and err["metric_value"] is None and err["seed_list"] == "0"
    # per metric: a failed top5 check does not fail the top1 row
    recs = make_records()
    recs[1]["reference"]["checks"][0]["ok"] = True
    rows = leaderboard_rows(CARD, recs)
    assert rows_by(rows, "somp", "2.00x", "top1")["status"] == "pass"
    assert rows_by(rows, "somp", "2.00x", "top5")["status"] == "fail"
    # an error in any seed wins over fail and pass
    recs.append(rec("somp", "2.00x", 0.5, 2, {}, status="error", reason="NaN loss"))
    rows = leaderboard_rows(CARD, recs)
    assert rows_by(rows, "somp", "2.00x", "top1")["status"] == "error"
    assert rows_by(rows, "somp", "2.00x", "top1")["seed_list"] == "0;1;2"
    assert rows_by(rows, "somp", "2.00x", "top1")["n_seeds"] == 2


def test_filename():
    assert leaderboard_filename(CARD, make_records()) == "toy_deit-micro-fp32-test_cpu_9000.csv"
    recs = make_records()
    for r in recs:
        r["env"]["device_name"] = "NVIDIA H100 80GB/HBM3"
    assert leaderboard_filename(CARD, recs) == "toy_deit-micro-fp32-nvidia_h100_80gb_hbm3.csv"


# ---------------------------------------------------------------------------------------------
# tables, plot, retention

@pytest.mark.parametrize("fmt", ["terminal", "md", "csv", "latex"])
def test_render_formats(fmt):
    out = render_table(CARD, make_records(), fmt)
    pm = r"$\pm$" if fmt == "latex" else "±"
    pct = r"\%" if fmt == "latex" else "%"
    # as many decimals as the paper gives (80.0 -> 1)
    for s in ["70.5 " + pm + " 0.7 (-9.5)", "89.0 " + pm + " 1.4 (-6.0)",          # mean ± std (delta)
              "80.0", "78.0 (-2.0)",                                               # dense; single seed
              "seed 1: top1 71.0 vs 70.3",                                         # failure reason
              "gohsp (reimpl)", "1.90x / 2.00x", "1.00x / 1.00x",                 # speedups
              "11.50 (-50.0" + pct + ")", "2.30 (-50.0" + pct + ")",              # params, GFLOPs
              "PASSED", "FAILED", "NO-REF", "ERROR", "CUDA out of memory",
              "Toy paper, Table 9", "A toy note about the baselines", "fraction of the prunable parameters",
              "re-implementations", "Test CPU 9000", "fp32", "batch size 64", "1900"]:
        assert s in out, (fmt, s, out)
    assert "somp (reimpl)" not in out
    lines = out.splitlines()
    order = [next(i for i, l in enumerate(lines) if key in l) for key in ("dense", "1.25x", "2.00x")]
    assert order == sorted(order)
    if fmt == "md":
        assert "| Method | Ratio | top1 | top5 |" in out and "| --- | --- | ---: |" in out
    if fmt == "latex":
        assert r"\begin{tabular}" in out and r"\toprule" in out and r"\midrule" in out and r"\bottomrule" in out
    if fmt == "csv":
        header = next(csv.reader([lines[0]]))
        assert header[:4] == ["Method", "Ratio", "top1", "top5"] and header[-1] == "Status"
    if fmt == "terminal":
        head = next(l for l in lines if l.startswith("Method"))
        dense = next(l for l in lines if l.startswith("dense "))
        assert len(head) <= len(dense) + 60  # aligned, fixed width
        assert head.index("top1") < head.index("Params M") < head.index("GFLOPs") < head.index("Status")


def test_render_without_reimpl_has_no_reimpl_sentence():
    recs = [r for r in make_records() if r["method_impl"] != "reimpl"]
    assert "re-implementations" not in render_table(CARD, recs, "terminal")
    with pytest.raises(ValueError):
        render_table(CARD, recs, "html")


def test_plot_writes_png(tmp_path):
    path = tmp_path / "plots" / "toy.png"
    plot(CARD, make_records(), path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert sorted(p.name for p in path.parent.iterdir()) == ["toy.png"]


def test_retention_table():
    r = rec("somp", "2.00x", 0.5, 0, {"top1": 70.0})
    r["retention"] = [
        {"group": "blocks.0.attn", "kind": "head_dim", "layer": 0, "modality": "vision", "kept": 48, "size": 64},
        {"group": "blocks.0.mlp", "kind": "ffn", "layer": 0, "modality": "vision", "kept": 128, "size": 256},
        {"group": "blocks.1.attn", "kind": "head_dim", "layer": 1, "modality": "vision", "kept": 64, "size": 64},
        {"group": "blocks.1.mlp", "kind": "ffn", "layer": 1, "modality": "vision", "kept": 64, "size": 256},
    ]
    text = retention_table(r)
    lines = text.splitlines()
    assert "head_dim" in lines[1] and "ffn" in lines[1]
    assert "0.75 (48/64)" in text and "0.50 (128/256)" in text and "1.00 (64/64)" in text
    assert "0.25 (64/256)" in text
    assert "0.88 (112/128)" in text and "0.38 (192/512)" in text  # totals per kind
    assert "no retention" in retention_table(rec("dense", "1x", 0.0, 0, {}))


def test_tolerance_abs():
    assert tolerance_abs(0.5, 80.0) == 0.5
    assert tolerance_abs("1%", 80.0) == pytest.approx(0.8)
    assert tolerance_abs("0.25", 80.0) == 0.25
    assert tolerance_abs(None, 80.0) is None


# ---------------------------------------------------------------------------------------------
# compare

def write_rows(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(LEADERBOARD_COLUMNS)
        for r in rows:
            w.writerow(["" if r[c] is None else r[c] for c in LEADERBOARD_COLUMNS])
    return path


def lookup(cards):
    return lambda table_id: cards[table_id]


def changed(rows, method, label, metric, **kw):
    rows = copy.deepcopy(rows)
    rows_by(rows, method, label, metric).update(kw)
    return rows


def verdict(diffs, method, label, metric):
    [d] = [d for d in diffs if (d["method"], d["ratio_label"], d["metric"]) == (method, label, metric)]
    return d


def test_compare_identical_and_within_tolerance(tmp_path):
    rows = leaderboard_rows(CARD, make_records())
    old = write_rows(tmp_path / "old.csv", rows)
    diffs, regression = compare_csv(old, write_rows(tmp_path / "same.csv", rows), lookup({"toy_deit": CARD}))
    assert not regression and {d["verdict"] for d in diffs} == {"ok"}
    new = write_rows(tmp_path / "new.csv", changed(rows, "somp", "2.00x", "top1", metric_value=70.1))  # -0.4
    diffs, regression = compare_csv(old, new, lookup({"toy_deit": CARD}))
    d = verdict(diffs, "somp", "2.00x", "top1")
    assert not regression and d["verdict"] == "ok" and d["delta"] == pytest.approx(-0.4)


def test_compare_regression_beyond_tolerance(tmp_path):
    rows = leaderboard_rows(CARD, make_records())
    old = write_rows(tmp_path / "old.csv", rows)
    new = write_rows(tmp_path / "new.csv", changed(rows, "somp", "2.00x", "top1", metric_value=69.8))  # -0.7
    # its two seeds (71, 70) have std 0.71: -0.7 is within 3 std, noise (k = 3, the default)
    diffs, regression = compare_csv(old, new, lookup({"toy_deit": CARD}))
    d = verdict(diffs, "somp", "2.00x", "top1")
    assert not regression and d["verdict"] == "ok" and d["tolerance"].startswith("3x std 0.707")
    # k = 0: the card's tolerance alone
    diffs, regression = compare_csv(old, new, lookup({"toy_deit": CARD}), k=0)
    d = verdict(diffs, "somp", "2.00x", "top1")
    assert regression and d["verdict"] == "regression" and d["tolerance"] == "0.5"
    assert verdict(diffs, "somp", "2.00x", "top5")["verdict"] == "ok"
    text = format_diffs(diffs)
    line = next(l for l in text.splitlines() if "somp 2.00x top1" in l)
    assert "old 70.50" in line and "new 69.80" in line and "-0.7" in line and "tol 0.5" in line
    assert "REGRESSION" in line
    # an improvement beyond tolerance is not a regression
    new = write_rows(tmp_path / "up.csv", changed(rows, "somp", "2.00x", "top1", metric_value=72.0))
    diffs, regression = compare_csv(old, new, lookup({"toy_deit": CARD}), k=0)
    assert not regression and verdict(diffs, "somp", "2.00x", "top1")["verdict"] == "improved"
    # relative tolerance ("1%" of 89.0 = 0.89)
    new = write_rows(tmp_path / "t5.csv", changed(rows, "somp", "2.00x", "top5", metric_value=88.2))
    assert not compare_csv(old, new, lookup({"toy_deit": CARD}), k=0)[1]
    new = write_rows(tmp_path / "t5b.csv", changed(rows, "somp", "2.00x", "top5", metric_value=88.0))
    assert compare_csv(old, new, lookup({"toy_deit": CARD}), k=0)[1]


def test_compare_arch_throughput_status(tmp_path):
    rows = leaderboard_rows(CARD, make_records())
    old = write_rows(tmp_path / "old.csv", rows)
    cards = lookup({"toy_deit": CARD})
    gohsp = rows_by(rows, "gohsp", "2.00x", "top1")
    for kw, word, opts in [({"params_m": 11.6}, "params_m", {}), ({"params_m": 11.4}, "params_m", {}),
                           ({"params_m": 11.54}, "params_m", {}),   # exact: +0.3% is a change of architecture
                           ({"gmacs": 2.4}, "gmacs", {}),
                           ({"speedup_measured": 0.6 * gohsp["speedup_measured"]}, "speedup", {}),
                           ({"throughput_sps": 1300.0}, "throughput", {"absolute_speed": True}),
                           ({"status": "error"}, "status", {})]:
        new = write_rows(tmp_path / "new.csv", changed(rows, "gohsp", "2.00x", "top1", **kw))
        diffs, regression = compare_csv(old, new, cards, **opts)
        d = verdict(diffs, "gohsp", "2.00x", "top1")
        assert regression and any(word in p for p in d["problems"]), (kw, d)
    # within a stated tolerance; absolute throughput is not compared unless asked (it moves 20-40% on a shared
    # machine); a paired speedup that moved by less than the 30% default tolerance is noise
    new = write_rows(tmp_path / "new.csv", changed(rows, "gohsp", "2.00x", "top1", params_m=11.54,
                                                   throughput_sps=600.0,
                                                   speedup_measured=0.8 * gohsp["speedup_measured"]))
    assert not compare_csv(old, new, cards, arch_tolerance="0.5%")[1]
    # throughput on another device is not compared, even when asked
    new = write_rows(tmp_path / "new.csv", changed(rows, "gohsp", "2.00x", "top1", throughput_sps=100.0,
                                                   device_name="Other CPU"))
    diffs, regression = compare_csv(old, new, cards, absolute_speed=True)
    assert not regression and verdict(diffs, "gohsp", "2.00x", "top1")["notes"]
    # pass -> fail
    new = write_rows(tmp_path / "new.csv", changed(rows, "dense", "1x", "top1", status="fail"))
    assert compare_csv(old, new, cards)[1]


def test_compare_missing_and_added_cells(tmp_path):
    rows = leaderboard_rows(CARD, make_records())
    old = write_rows(tmp_path / "old.csv", rows)
    fewer = [r for r in rows if not (r["method"] == "somp" and r["ratio_label"] == "1.25x")]
    diffs, regression = compare_csv(old, write_rows(tmp_path / "new.csv", fewer), lookup({"toy_deit": CARD}))
    assert regression and verdict(diffs, "somp", "1.25x", "top1")["verdict"] == "missing"
    assert "MISSING" in format_diffs(diffs)
    diffs, regression = compare_csv(write_rows(tmp_path / "a.csv", fewer), old, lookup({"toy_deit": CARD}))
    assert not regression and verdict(diffs, "somp", "1.25x", "top1")["verdict"] == "added"


def test_compare_lower_is_better(tmp_path):
    card = copy.deepcopy(CARD)
    card["metrics"] = [{"name": "ppl", "split": "test", "higher_is_better": False, "primary": True}]
    card["references"] = {"tolerance": {"ppl": "1%"}}
    recs = [rec("dense", "1x", 0.0, 0, {"ppl": 10.0}, impl="dense", total=22_000_000, macs=4_600_000_000),
            rec("somp", "2.00x", 0.5, 0, {"ppl": 20.0})]
    rows = leaderboard_rows(card, recs)
    assert rows_by(rows, "somp", "2.00x", "ppl")["higher_is_better"] is False
    old = write_rows(tmp_path / "old.csv", rows)
    worse = write_rows(tmp_path / "worse.csv", changed(rows, "somp", "2.00x", "ppl", metric_value=20.5))
    diffs, regression = compare_csv(old, worse, lookup({"toy_deit": card}))
    assert regression and "rose" in verdict(diffs, "somp", "2.00x", "ppl")["problems"][0]
    better = write_rows(tmp_path / "better.csv", changed(rows, "somp", "2.00x", "ppl", metric_value=15.0))
    diffs, regression = compare_csv(old, better, lookup({"toy_deit": card}))
    assert not regression and verdict(diffs, "somp", "2.00x", "ppl")["verdict"] == "improved"
    within = write_rows(tmp_path / "within.csv", changed(rows, "somp", "2.00x", "ppl", metric_value=20.15))
    assert not compare_csv(old, within, lookup({"toy_deit": card}))[1]


def test_compare_malformed_csv(tmp_path):
    good = tmp_path / "good.csv"
    write_leaderboard_csv(CARD, make_records(), good)
    bad = tmp_path / "bad.csv"
    bad.write_text("table_id,profile,method,metric\ntoy_deit,micro,somp,top1\n")
    with pytest.raises(BenchError) as e:
        compare_csv(good, bad, lookup({"toy_deit": CARD}))
    msg = str(e.value)
    assert "bad.csv" in msg and "ratio_label" in msg and "metric_value" in msg and "gmacs" in msg
    assert "table_id" not in msg.split("missing columns:")[1]
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(BenchError, match="empty.csv"):
        read_leaderboard(empty)
    with pytest.raises(BenchError, match="nope.csv"):
        read_leaderboard(tmp_path / "nope.csv")


def test_retention_heatmap_png(tmp_path):
    from bench.report import retention_heatmap
    rec = {"table": "t", "method": "upop", "ratio_label": "2.00x", "seed": 0,
           "retention": [{"group": f"blocks.{i}.attn:head_dim", "kind": "head_dim", "layer": i, "modality": "vision",
                          "kept": 8 * (i + 1), "size": 64} for i in range(4)] +
                        [{"group": f"blocks.{i}.mlp:ffn", "kind": "ffn", "layer": i, "modality": "vision",
                          "kept": 100, "size": 384} for i in range(4)]}
    out = retention_heatmap(rec, tmp_path / "r.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 1000


def _rel_rec(method, ratio, top1, profile="paper", speedup=None):
    return {"method": method, "ratio_label": ratio, "profile": profile, "status": "no_ref", "metrics": {"top1": top1},
            "speed": {"speedup_measured": speedup} if speedup else None}


def test_relation_checks_judged_and_info():
    from bench.report import relation_checks
    card = {"references": {"profile": "paper"},
            "comparators": [{"method": "s2vite", "ratio": "35%", "top1": 79.22}],
            "relations": [
                {"kind": "no_loss_vs_dense", "method": "gohsp", "ratio": "40%", "metric": "top1", "tolerance": 0.0},
                {"kind": "below_dense_by", "method": "gohsp", "ratio": "80%", "metric": "top1", "by": 0.45, "tolerance": 0.0},
                {"kind": "above", "method": "gohsp", "other": "sgmp", "ratios": ["40%", "80%"], "metric": "top1",
                 "by": 0.96, "tolerance": 0.0},
                {"kind": "above_value", "method": "gohsp", "ratio": "35%", "metric": "top1", "value": 79.22, "by": 0.76,
                 "tolerance": 0.0},
                {"kind": "speedup", "method": "gohsp", "ratio": "50%", "value": 1.2657, "tolerance": 0.1},
                {"kind": "above", "method": "gohsp", "other": "sgmp", "ratios": ["60%"], "metric": "top1", "by": 1,
                 "tolerance": 0.0}]}
    recs = [_rel_rec("dense", "1x", 90.0), _rel_rec("gohsp", "40%", 90.1), _rel_rec("gohsp", "80%", 89.0),
            _rel_rec("sgmp", "40%", 89.0), _rel_rec("sgmp", "80%", 88.5), _rel_rec("gohsp", "35%", 80.0),
            _rel_rec("gohsp", "50%", 88.0, speedup=1.30)]
    st = [c["status"] for c in relation_checks(card, recs)]
    # gohsp 80% is 1.0 below dense (> 0.45) and only 0.5 above sgmp there (< 0.96); 60% cells are missing
    assert st == ["PASS", "FAIL", "FAIL", "PASS", "PASS", "SKIPPED"]
    micro = [dict(r, profile="micro") for r in recs]
    assert [c["status"] for c in relation_checks(card, micro)][:5] == ["INFO", "INFO", "INFO", "SKIPPED", "INFO"]


def test_retention_shows_each_modality_and_both_nlvr2_cross_attentions():
    from bench.report import retention_summary, retention_table
    ret = []
    for layer in (0, 1):
        ret += [{"group": f"vision.blocks.{layer}.attn:head_dim", "kind": "head_dim", "layer": layer,
                 "modality": "vision", "kept": 8, "size": 16},
                {"group": f"text.layer.{layer}.attention.self:head_dim", "kind": "head_dim", "layer": layer,
                 "modality": "text", "kept": 4, "size": 16},
                {"group": f"text.layer.{layer}.crossattention.self0:head_dim", "kind": "head_dim", "layer": layer,
                 "modality": "fusion", "kept": 2, "size": 16},
                {"group": f"text.layer.{layer}.crossattention.self1:head_dim", "kind": "head_dim", "layer": layer,
                 "modality": "fusion", "kept": 16, "size": 16}]
    rec = {"method": "upop", "ratio_label": "2x", "seed": 0, "retention": ret}
    table = retention_table(rec)
    assert "fusion crossattention.self0  0" in table and "0.12 (2/16)" in table
    assert "fusion crossattention.self1" in table and "1.00 (16/16)" in table
    assert "vision" in table and "0.50 (8/16)" in table and "text" in table and "0.25 (4/16)" in table
    summary = retention_summary({"methods": ["upop"]}, [rec])
    assert "vision head_dim 0.50 [0.50 0.50]" in summary
    assert "fusion crossattention.self0 head_dim 0.12 [0.12 0.12]" in summary
    assert "fusion crossattention.self1 head_dim 1.00 [1.00 1.00]" in summary
