"""Compare two leaderboard CSVs (e.g. a published one in results/ and a fresh run) and flag regressions.

Cells are matched on (table_id, profile, method, ratio_label, metric). A cell regresses when:
- its metric moved in the bad direction (the card's higher_is_better) by more than the card's
  tolerance for that metric (references.tolerance[metric]; 0.5 absolute if the card has none);
- params_m or gmacs changed, in either direction, by more than their tolerance (the architecture
  changed; tolerance references.tolerance.params_m / .gflops, 0.1% if absent);
- throughput dropped by more than protocol.throughput.regression_tolerance (default "10%"), compared
  only when device, precision and batch size are the same (otherwise noted, not flagged);
- its status went from pass (or no_ref) to fail, or to error from anything else;
- its metric value disappeared, or the cell is missing from the new file.
A cell only in the new file is reported as "added" and is not a regression.

Tolerances: a number is absolute in the metric's unit, a string such as "1%" is relative (to the old value).
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Callable

from bench.errors import BenchError
from bench.report import card_metrics, card_tolerance, format_tolerance, tolerance_abs

KEY_COLUMNS = ("table_id", "profile", "method", "ratio_label", "metric")
REQUIRED_COLUMNS = KEY_COLUMNS + ("metric_value", "status", "params_m", "gmacs", "throughput_sps")
OPTIONAL_COLUMNS = ("higher_is_better", "device_name", "precision", "tput_batch_size")
DEFAULT_METRIC_TOLERANCE = 0.5
DEFAULT_ARCH_TOLERANCE = "0.1%"
DEFAULT_THROUGHPUT_TOLERANCE = "10%"


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


def read_leaderboard(path) -> dict:
    """Rows of a leaderboard CSV keyed by KEY_COLUMNS. Raises BenchError for a missing/malformed file."""
    path = Path(path)
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames
            if not header:
                raise BenchError(f"{path}: empty leaderboard CSV (no header row).")
            missing = [c for c in REQUIRED_COLUMNS if c not in header]
            if missing:
                raise BenchError(f"{path}: not a leaderboard CSV, missing columns: {', '.join(missing)}.")
            rows = {}
            for i, row in enumerate(reader, start=2):
                if None in row:
                    raise BenchError(f"{path}: line {i} has more fields than the header.")
                key = tuple(row[c] for c in KEY_COLUMNS)
                if key in rows:
                    raise BenchError(f"{path}: line {i} repeats the cell {'/'.join(key)}.")
                rows[key] = row
            return rows
    except FileNotFoundError:
        raise BenchError(f"leaderboard CSV not found: {path}") from None
    except (csv.Error, UnicodeDecodeError) as e:
        raise BenchError(f"{path}: not a readable CSV ({e}).") from None


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


def _compare_row(key, old: dict, new: dict | None, card: dict) -> dict:
    table_id, profile, method, ratio_label, metric = key
    metric_card = next((m for m in card_metrics(card) if m["name"] == metric), None)
    if metric_card is not None:
        hib = bool(metric_card.get("higher_is_better", True))
    else:
        hib = _bool(old.get("higher_is_better"))
        hib = True if hib is None else hib
    tol = card_tolerance(card, metric, DEFAULT_METRIC_TOLERANCE)
    ov = _float(old.get("metric_value"))
    nv = _float(new.get("metric_value")) if new else None
    d = {"table_id": table_id, "profile": profile, "method": method, "ratio_label": ratio_label, "metric": metric,
         "old": ov, "new": nv, "delta": (nv - ov) if ov is not None and nv is not None else None,
         "tolerance": format_tolerance(tol), "higher_is_better": hib,
         "old_status": old.get("status") or None, "new_status": (new.get("status") or None) if new else None,
         "changes": {}, "problems": [], "notes": [], "verdict": "ok", "regression": False}
    if new is None:
        d["verdict"], d["regression"] = "missing", True
        d["problems"].append("cell missing from the new file")
        return d

    # metric
    if ov is not None and nv is None:
        d["problems"].append(f"{metric} has no value in the new file")
    elif ov is not None and nv is not None:
        if math.isnan(nv) and not math.isnan(ov):
            d["problems"].append(f"{metric} is NaN in the new file")
        elif not math.isnan(ov) and not math.isnan(nv):
            t = tolerance_abs(tol, ov)
            worse = (ov - nv) if hib else (nv - ov)
            if worse > t + 1e-12:
                word = "dropped" if hib else "rose"
                d["problems"].append(f"{metric} {word} by {abs(nv - ov):.4g} > tolerance {format_tolerance(tol)}")
            elif -worse > t + 1e-12:
                d["notes"].append(f"{metric} improved by {abs(nv - ov):.4g}")
                d["verdict"] = "improved"

    # architecture: params and MACs (either direction)
    for col, tname in (("params_m", "params_m"), ("gmacs", "gflops")):
        o, n = _float(old.get(col)), _float(new.get(col))
        if o is None or n is None:
            if o is not None:
                d["notes"].append(f"{col} not measured in the new file")
            continue
        d["changes"][col] = (o, n)
        t = card_tolerance(card, tname, DEFAULT_ARCH_TOLERANCE)
        if abs(n - o) > tolerance_abs(t, o) + 1e-12:
            d["problems"].append(f"{col} changed {o:.6g} -> {n:.6g} (tolerance {format_tolerance(t)}): "
                                 "the architecture changed")

    # throughput (only drops, only on the same device/precision/batch)
    o, n = _float(old.get("throughput_sps")), _float(new.get("throughput_sps"))
    if o is not None and n is not None:
        d["changes"]["throughput_sps"] = (o, n)
        same = all((old.get(c) or "") == (new.get(c) or "") for c in ("device_name", "precision", "tput_batch_size"))
        if not same:
            d["notes"].append("throughput not compared: device, precision or batch size differ")
        else:
            t = ((card.get("protocol") or {}).get("throughput") or {}).get("regression_tolerance",
                                                                            DEFAULT_THROUGHPUT_TOLERANCE)
            if o - n > tolerance_abs(t, o) + 1e-12:
                d["problems"].append(f"throughput dropped {o:.4g} -> {n:.4g} samples/s "
                                     f"({100 * (n - o) / o:+.1f}%, tolerance {format_tolerance(t)})")

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

    if d["problems"]:
        d["verdict"], d["regression"] = "regression", True
    return d


def compare_csv(old_path, new_path, card_lookup: Callable[[str], dict]) -> tuple[list, bool]:
    """Compare two leaderboard CSVs. card_lookup(table_id) returns the card dict (for tolerances and
    metric directions). Returns (diffs, regression): one diff dict per cell of either file, with keys
    table_id, profile, method, ratio_label, metric, old, new, delta, tolerance, higher_is_better,
    old_status, new_status, changes {column: (old, new)}, problems [str], notes [str],
    verdict ("ok" | "improved" | "regression" | "missing" | "added") and regression (bool)."""
    old_rows, new_rows = read_leaderboard(old_path), read_leaderboard(new_path)
    card_of = _card_cache(card_lookup)
    diffs = [_compare_row(key, row, new_rows.get(key), card_of(key[0])) for key, row in old_rows.items()]
    for key, row in new_rows.items():
        if key not in old_rows:
            v = _float(row.get("metric_value"))
            diffs.append({"table_id": key[0], "profile": key[1], "method": key[2], "ratio_label": key[3],
                          "metric": key[4], "old": None, "new": v, "delta": None, "tolerance": "",
                          "higher_is_better": _bool(row.get("higher_is_better")), "old_status": None,
                          "new_status": row.get("status") or None, "changes": {}, "problems": [],
                          "notes": ["cell only in the new file"], "verdict": "added", "regression": False})
    return diffs, any(d["regression"] for d in diffs)


def format_diffs(diffs: list) -> str:
    """One line per cell: old, new, delta, tolerance, verdict (and why), then a summary line."""
    lines = []
    for d in diffs:
        name = f"{d['table_id']}/{d['profile']} {d['method']} {d['ratio_label']} {d['metric']}"
        delta = f"{d['delta']:+.4g}" if d["delta"] is not None and not math.isnan(d["delta"]) else "-"
        verdict = d["verdict"].upper()
        why = d["problems"] + d["notes"]
        lines.append(f"{name}: old {_fmt(d['old'])}  new {_fmt(d['new'])}  delta {delta}  "
                     f"tol {d['tolerance'] or '-'}  {verdict}" + (f" ({'; '.join(why)})" if why else ""))
    n_reg = sum(1 for d in diffs if d["verdict"] == "regression")
    n_miss = sum(1 for d in diffs if d["verdict"] == "missing")
    n_add = sum(1 for d in diffs if d["verdict"] == "added")
    n_imp = sum(1 for d in diffs if d["verdict"] == "improved")
    lines.append(f"{len(diffs)} cells: {n_reg} regressed, {n_miss} missing, {n_imp} improved, {n_add} added"
                 + (" -> REGRESSION" if n_reg or n_miss else " -> OK"))
    return "\n".join(lines) + "\n"
