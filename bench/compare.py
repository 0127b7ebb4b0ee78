"""Compare two leaderboard CSVs (e.g. a published one in results/ and a fresh run) and tell noise from change.

    python -m bench compare OLD.csv NEW.csv [--k 3] [--arch-tolerance 0] [--speedup-tolerance 30%]
                                            [--absolute-speed [--throughput-tolerance 10%]]

Exit code: 0 no regression, 1 a regression (each regressed cell is named), 2 bad input (a file missing, not a
leaderboard CSV, an unknown table).

Cells are the CSV's aggregate rows (row_kind "cell"; a CSV without that column has only those), matched on
(table_id, profile, method, ratio_label, metric). A cell regresses when:
- its metric moved in the bad direction (the card's higher_is_better) by more than max(the card's tolerance
  for that metric (references.tolerance[metric]; 0.5 absolute if the card has none), K x the seed standard
  deviation (the larger of the two files' metric_std; K = 3 by default, `--k`)): a difference within the
  seed spread is noise. With a single seed only the card tolerance applies;
- params_m or gmacs changed in either direction: they are exact (deterministic), compared to 10 significant
  digits, or within `--arch-tolerance` (a number in M / G, or "N%");
- its paired measured speedup (pruned vs dense, timed in alternation inside the cell, so both see the same
  machine) dropped by more than `--speedup-tolerance` (relative, default 30%: shared CI runners move a paired
  ratio by 10-20%), compared only when device and precision are the same. Absolute throughput moves 20-40%
  between two runs on a shared machine, so it is compared only with `--absolute-speed`, on the same device,
  precision and batch size (drop beyond `--throughput-tolerance`, default 10%);
- its status went from pass (or no_ref) to fail, or to error from anything else;
- its metric value disappeared, or the cell is missing from the new file.
A cell only in the new file is "added", not a regression.

What makes two rows not comparable is reported, and only what is comparable is judged:
- another card version (table_version): the table's cells are listed with their differences, verdict
  NOT-COMPARABLE, never a regression (the card's author said the results change);
- another code version (the code_version column: the suite, training, measuring, method, task and model
  versions of bench.runner.code_version) for a cell: its differences are listed, verdict CHANGED, not a
  regression (a version bump declares that results change); a file without the column is compared as usual;
- another seed set (seed_list): metrics, params and FLOPs are compared on the seeds both files have (the
  per-seed rows, row_kind "seed", or a one-seed cell's row), with the tolerance above; no common seed: the
  cell is NOT-COMPARABLE.

Tolerances: a number is absolute in the metric's unit, a string such as "1%" is relative (to the old value).
"""
from __future__ import annotations

import csv
import math
from collections import Counter
from pathlib import Path
from typing import Callable

from bench.errors import BenchError
from bench.report import card_metrics, card_tolerance, format_tolerance, parse_tolerance, tolerance_abs

def _float(s):
    if s is None:
        return None
    s = str(s).strip()
    if s == "":
        return None
    try:
        return float(s)
    except ValueError:
        return None


def _bool(s):
    if s is None:
        return None
    s = str(s).strip().lower()
    if s in ("true", "1", "yes"):
        return True
    if s in ("false", "0", "no"):
        return False
    return None


def _fmt(x) -> str:
    if x is None:
        return "-"
    if math.isnan(x):
        return "nan"
    if abs(x) >= 1000 or (x != 0 and abs(x) < 0.01):
        return f"{x:.4g}"
    return f"{x:.2f}" if abs(x) >= 1 else f"{x:.4f}"


def _card_cache(card_lookup: Callable[[str], dict]):
    cache: dict = {}

    def get(table_id):
        if table_id not in cache:
            cache[table_id] = card_lookup(table_id) or {}
        return cache[table_id]
    return get


KEY_COLUMNS = ("table_id", "profile", "method", "ratio_label", "metric")
REQUIRED_COLUMNS = KEY_COLUMNS + ("metric_value", "status", "params_m", "gmacs", "throughput_sps")
OPTIONAL_COLUMNS = ("higher_is_better", "device_name", "precision", "tput_batch_size", "table_version", "metric_std",
                    "n_seeds", "seed_list", "speedup_measured", "row_kind", "seed", "code_version")
DEFAULT_METRIC_TOLERANCE = 0.5
DEFAULT_K = 3.0
DEFAULT_ARCH_TOLERANCE = 0.0
DEFAULT_SPEEDUP_TOLERANCE = "30%"
DEFAULT_THROUGHPUT_TOLERANCE = "10%"
ARCH_REL_EPS = 1e-9   # the CSV writes 10 significant digits


def read_leaderboard(path):
    """A leaderboard CSV as a pandas DataFrame of strings (every OPTIONAL_COLUMNS present, "" where the file has
    none; row_kind "cell" where the file has no such column). Raises BenchError for a missing/malformed file or
    a repeated row."""
    import pandas as pd

    path = Path(path)
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False)
    except FileNotFoundError:
        raise BenchError(f"leaderboard CSV not found: {path}") from None
    except pd.errors.EmptyDataError:
        raise BenchError(f"{path}: empty leaderboard CSV (no header row).") from None
    except (pd.errors.ParserError, UnicodeDecodeError, csv.Error) as e:
        raise BenchError(f"{path}: not a readable CSV ({' '.join(str(e).split())}).") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise BenchError(f"{path}: not a leaderboard CSV, missing columns: {', '.join(missing)}.")
    for c in OPTIONAL_COLUMNS:
        if c not in df.columns:
            df[c] = ""
    df.loc[df["row_kind"] == "", "row_kind"] = "cell"
    dup = df.duplicated(list(KEY_COLUMNS) + ["row_kind", "seed"], keep="first")
    if dup.any():
        i = int(dup.to_numpy().nonzero()[0][0])
        raise BenchError(f"{path}: line {i + 2} repeats the cell {'/'.join(df.iloc[i][list(KEY_COLUMNS)])}.")
    return df


def _seed_values(df) -> dict:
    """{cell key: {seed: row}} from the per-seed rows, and from one-seed cell rows (their seed_list is the seed)."""
    out: dict = {}
    for _, r in df.iterrows():
        key = tuple(r[c] for c in KEY_COLUMNS)
        if r["row_kind"] == "seed" and r["seed"] != "":
            out.setdefault(key, {})[r["seed"]] = r
        elif r["row_kind"] == "cell" and r["seed_list"] and ";" not in r["seed_list"]:
            out.setdefault(key, {}).setdefault(r["seed_list"], r)
    return out


def _mean_of(rows, col):
    vals = [_float(r[col]) for r in rows]
    vals = [v for v in vals if v is not None]
    return sum(vals) / len(vals) if vals else None


def _compare_row(key, old, new, card: dict, opts: dict, old_seeds: dict, new_seeds: dict) -> dict:
    table_id, profile, method, ratio_label, metric = key
    metric_card = next((m for m in card_metrics(card) if m["name"] == metric), None)
    if metric_card is not None:
        hib = bool(metric_card.get("higher_is_better", True))
    else:
        hib = _bool(old.get("higher_is_better"))
        hib = True if hib is None else hib
    tol = card_tolerance(card, metric, DEFAULT_METRIC_TOLERANCE)
    ov = _float(old.get("metric_value"))
    nv = _float(new.get("metric_value")) if new is not None else None
    d = {"table_id": table_id, "profile": profile, "method": method, "ratio_label": ratio_label, "metric": metric,
         "old": ov, "new": nv, "delta": (nv - ov) if ov is not None and nv is not None else None,
         "tolerance": format_tolerance(tol), "higher_is_better": hib,
         "old_status": old.get("status") or None, "new_status": (new.get("status") or None) if new is not None else None,
         "changes": {}, "problems": [], "notes": [], "verdict": "ok", "regression": False}
    if new is None:
        d["verdict"], d["regression"] = "missing", True
        d["problems"].append("cell missing from the new file")
        return d

    # what is comparable: the card version, the code version, the seeds
    incomparable = None
    ov_, nv_ = old.get("table_version") or "", new.get("table_version") or ""
    if ov_ and nv_ and ov_ != nv_:
        incomparable = f"card version {ov_} -> {nv_}"
    oc, nc = old.get("code_version") or "", new.get("code_version") or ""
    code_changed = bool(oc and nc and oc != nc)
    if code_changed:
        d["notes"].append("code version " + ", ".join(
            f"{a.split('=')[0]} {a.split('=')[-1]} -> {b.split('=')[-1]}"
            for a, b in zip(oc.split(";"), nc.split(";")) if a != b) if len(oc.split(";")) == len(nc.split(";"))
            else f"code version {oc} -> {nc}")
    o_std, n_std = _float(old.get("metric_std")), _float(new.get("metric_std"))
    std = max([s for s in (o_std, n_std) if s is not None and not math.isnan(s)], default=None)
    o_list, n_list = old.get("seed_list") or "", new.get("seed_list") or ""
    cmp_old, cmp_new = old, new
    if o_list and n_list and set(o_list.split(";")) != set(n_list.split(";")):
        common = sorted(set(o_list.split(";")) & set(n_list.split(";")), key=lambda s: (len(s), s))
        os_, ns_ = old_seeds.get(key, {}), new_seeds.get(key, {})
        common = [s for s in common if s in os_ and s in ns_]
        if not common:
            incomparable = incomparable or f"seeds {o_list} vs {n_list}: no common seed"
        else:
            d["notes"].append(f"seeds {o_list} vs {n_list}: compared on seed{'s' if len(common) > 1 else ''} "
                              f"{';'.join(common)}")
            cols = ("metric_value", "params_m", "gmacs", "speedup_measured", "throughput_sps")
            cmp_old = {**old, **{c: str(_mean_of([os_[s] for s in common], c) or "") for c in cols}}
            cmp_new = {**new, **{c: str(_mean_of([ns_[s] for s in common], c) or "") for c in cols}}
            ov, nv = _float(cmp_old["metric_value"]), _float(cmp_new["metric_value"])
            d["old"], d["new"] = ov, nv
            d["delta"] = (nv - ov) if ov is not None and nv is not None else None
    if incomparable:
        d["verdict"] = "not comparable"
        d["notes"].insert(0, incomparable)
        return d

    # metric: the card's tolerance, or K seed standard deviations when that is larger
    if ov is not None and nv is None:
        d["problems"].append(f"{metric} has no value in the new file")
    elif ov is not None and nv is not None:
        if math.isnan(nv) and not math.isnan(ov):
            d["problems"].append(f"{metric} is NaN in the new file")
        elif not math.isnan(ov) and not math.isnan(nv):
            t = tolerance_abs(tol, ov)
            if std is not None and opts["k"] * std > t:
                t = opts["k"] * std
                d["tolerance"] = f"{opts['k']:g}x std {std:.3g}"
            worse = (ov - nv) if hib else (nv - ov)
            if worse > t + 1e-12:
                word = "dropped" if hib else "rose"
                d["problems"].append(f"{metric} {word} by {abs(nv - ov):.4g} > tolerance {d['tolerance']}")
            elif -worse > t + 1e-12:
                d["notes"].append(f"{metric} improved by {abs(nv - ov):.4g}")
                d["verdict"] = "improved"

    # architecture: params and MACs, exact (either direction)
    for col in ("params_m", "gmacs"):
        o, n = _float(cmp_old.get(col)), _float(cmp_new.get(col))
        if o is None or n is None:
            if o is not None:
                d["notes"].append(f"{col} not measured in the new file")
            continue
        d["changes"][col] = (o, n)
        t = tolerance_abs(opts["arch_tolerance"], o) or 0.0
        if abs(n - o) > t + ARCH_REL_EPS * max(abs(o), 1e-12):
            d["problems"].append(f"{col} changed {o:.10g} -> {n:.10g} (tolerance "
                                 f"{format_tolerance(opts['arch_tolerance']) or 'exact'}): the architecture changed")

    # speed: the paired measured speedup (same device and precision); absolute throughput only when asked
    same_dev = all((old.get(c) or "") == (new.get(c) or "") for c in ("device_name", "precision"))
    o, n = _float(cmp_old.get("speedup_measured")), _float(cmp_new.get("speedup_measured"))
    if o is not None and n is not None and method != "dense":
        d["changes"]["speedup_measured"] = (o, n)
        if not same_dev:
            d["notes"].append("speedup not compared: device or precision differ")
        elif o - n > tolerance_abs(opts["speedup_tolerance"], o) + 1e-12:
            d["problems"].append(f"measured speedup dropped {o:.3g}x -> {n:.3g}x ({100 * (n - o) / o:+.1f}%, "
                                 f"tolerance {format_tolerance(opts['speedup_tolerance'])})")
    o, n = _float(cmp_old.get("throughput_sps")), _float(cmp_new.get("throughput_sps"))
    if opts["absolute_speed"] and o is not None and n is not None:
        d["changes"]["throughput_sps"] = (o, n)
        if not (same_dev and (old.get("tput_batch_size") or "") == (new.get("tput_batch_size") or "")):
            d["notes"].append("throughput not compared: device, precision or batch size differ")
        elif o - n > tolerance_abs(opts["throughput_tolerance"], o) + 1e-12:
            d["problems"].append(f"throughput dropped {o:.4g} -> {n:.4g} samples/s "
                                 f"({100 * (n - o) / o:+.1f}%, tolerance {format_tolerance(opts['throughput_tolerance'])})")

    # status
    os_, ns = d["old_status"], d["new_status"]
    if ns == "error" and os_ != "error":
        d["problems"].append(f"status {os_} -> error")
    elif os_ in ("pass", "no_ref") and ns == "fail":
        d["problems"].append(f"status {os_} -> fail")
    elif os_ == ns and ns in ("fail", "error"):
        d["notes"].append(f"still {ns}")
    elif os_ in ("fail", "error") and ns == "pass":
        d["notes"].append(f"status {os_} -> pass")

    if d["problems"] and code_changed:   # a version bump declares the change: listed, not a regression
        d["notes"] = d["problems"] + d["notes"]
        d["problems"], d["verdict"] = [], "changed"
    elif d["problems"]:
        d["verdict"], d["regression"] = "regression", True
    return d


def compare_csv(old_path, new_path, card_lookup: Callable[[str], dict], k: float = DEFAULT_K,
                arch_tolerance=DEFAULT_ARCH_TOLERANCE, speedup_tolerance=DEFAULT_SPEEDUP_TOLERANCE,
                absolute_speed: bool = False, throughput_tolerance=DEFAULT_THROUGHPUT_TOLERANCE) -> tuple[list, bool]:
    """Compare two leaderboard CSVs. card_lookup(table_id) returns the card dict (for tolerances and metric
    directions). Returns (diffs, regression): one diff dict per cell of either file, with keys table_id,
    profile, method, ratio_label, metric, old, new, delta, tolerance, higher_is_better, old_status, new_status,
    changes {column: (old, new)}, problems [str], notes [str], verdict ("ok" | "improved" | "regression" |
    "missing" | "added" | "changed" | "not comparable") and regression (bool). The list's `notes` attribute
    holds the file-level differences (card versions, seed sets, code versions)."""
    for name, v in (("--arch-tolerance", arch_tolerance), ("--speedup-tolerance", speedup_tolerance),
                    ("--throughput-tolerance", throughput_tolerance)):
        try:
            parse_tolerance(v)
        except ValueError:
            raise BenchError(f"{name} {v!r}: give a number or 'N%'") from None
    if k < 0:
        raise BenchError(f"--k {k}: give a number of standard deviations >= 0")
    opts = {"k": float(k), "arch_tolerance": arch_tolerance, "speedup_tolerance": speedup_tolerance,
            "absolute_speed": absolute_speed, "throughput_tolerance": throughput_tolerance}
    old_df, new_df = read_leaderboard(old_path), read_leaderboard(new_path)
    card_of = _card_cache(card_lookup)
    keys = list(KEY_COLUMNS)
    cells = old_df[old_df["row_kind"] == "cell"].merge(new_df[new_df["row_kind"] == "cell"], on=keys, how="outer",
                                                       suffixes=("", "_new"), indicator=True)
    old_seeds, new_seeds = _seed_values(old_df), _seed_values(new_df)
    value_cols = [c for c in old_df.columns if c not in keys]
    diffs = DiffList()
    for _, r in cells.iterrows():
        key = tuple(r[c] for c in keys)
        if r["_merge"] == "right_only":
            row = {c: r[f"{c}_new"] for c in value_cols if f"{c}_new" in r}
            v = _float(row.get("metric_value"))
            diffs.append({"table_id": key[0], "profile": key[1], "method": key[2], "ratio_label": key[3],
                          "metric": key[4], "old": None, "new": v, "delta": None, "tolerance": "",
                          "higher_is_better": _bool(row.get("higher_is_better")), "old_status": None,
                          "new_status": row.get("status") or None, "changes": {}, "problems": [],
                          "notes": ["cell only in the new file"], "verdict": "added", "regression": False})
            continue
        old = {c: r[c] for c in value_cols}
        new = None if r["_merge"] == "left_only" else {c: r[f"{c}_new"] for c in value_cols if f"{c}_new" in r}
        diffs.append(_compare_row(key, old, new, card_of(key[0]), opts, old_seeds, new_seeds))
    # file-level differences, said once
    for col, what in (("table_version", "card version"), ("seed_list", "seeds"), ("code_version", "code version")):
        a = tuple(sorted({v for v in df.loc[df["row_kind"] == "cell", col] if v}) for df in (old_df, new_df))
        if a[0] and a[1] and a[0] != a[1]:
            diffs.notes.append(f"{what}: old {' | '.join(a[0])}, new {' | '.join(a[1])}")
    return diffs, any(d["regression"] for d in diffs)


class DiffList(list):
    """compare_csv's diffs, with `notes`: what differs between the two files as a whole."""

    def __init__(self, *a):
        super().__init__(*a)
        self.notes = []


def format_diffs(diffs: list) -> str:
    """The file-level notes, one line per cell (old, new, delta, tolerance, verdict and why), then a summary line
    naming the regressed cells."""
    lines = [f"note: {n}" for n in getattr(diffs, "notes", [])]
    for d in diffs:
        name = f"{d['table_id']}/{d['profile']} {d['method']} {d['ratio_label']} {d['metric']}"
        delta = f"{d['delta']:+.4g}" if d["delta"] is not None and not math.isnan(d["delta"]) else "-"
        verdict = d["verdict"].upper().replace(" ", "-")
        why = d["problems"] + d["notes"]
        lines.append(f"{name}: old {_fmt(d['old'])}  new {_fmt(d['new'])}  delta {delta}  "
                     f"tol {d['tolerance'] or '-'}  {verdict}" + (f" ({'; '.join(why)})" if why else ""))
    count = Counter(d["verdict"] for d in diffs)
    bad = [d for d in diffs if d["regression"]]
    lines.append(f"{len(diffs)} cells: {count['regression']} regressed, {count['missing']} missing, "
                 f"{count['improved']} improved, {count['added']} added, {count['changed']} changed with their code "
                 f"version, {count['not comparable']} not comparable" + (" -> REGRESSION" if bad else " -> OK"))
    if bad:
        lines.append("regressed: " + ", ".join(dict.fromkeys(
            f"{d['method']}-{d['ratio_label']} {d['metric']}" for d in bad)))
    return "\n".join(lines) + "\n"
