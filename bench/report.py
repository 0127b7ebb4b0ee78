"""Reporting: leaderboard CSV, paper-style tables (terminal / Markdown / CSV / LaTeX), plots, retention.

Inputs are a table card (the dict of `yaml.safe_load(card file)`) and cell records (the JSON dicts of
`bench.records`, one per (method, ratio, seed)). Nothing here runs a model.

Aggregation: the records of one (table, profile, method, ratio_label) are one *cell*; its seeds are
averaged (mean, sample standard deviation, seed list). The dense values (metric_dense, gmacs_dense,
the throughput of speedup_measured) come from the records with method "dense" of the same table and
profile. A record whose cell crashed (status "error") counts in the seed list and makes the status
"error"; its missing numbers are left out of the means.
"""
from __future__ import annotations

import csv
import io
import math
import re
import statistics
from collections import Counter
from pathlib import Path

from bench.atomic import atomic_write

# Fixed column order of the leaderboard CSV (docs/specs/anchors.md §3.4). Never reorder: append.
LEADERBOARD_COLUMNS = [
    # identity
    "table_id", "table_version", "profile", "task", "split", "model_arch", "model_tag", "method", "method_impl",
    # compression
    "ratio_label", "ratio_p", "target_param_reduction", "achieved_param_reduction", "params_m", "params_dense_m",
    "prunable_params_m",
    # compute
    "gmacs", "gmacs_dense", "macs_reduction", "flop_counter", "flop_convention", "flop_input_spec",
    # quality
    "metric", "metric_value", "metric_dense", "metric_delta", "higher_is_better", "n_seeds", "metric_std", "seed_list",
    # reference
    "paper_value", "paper_source", "tolerance", "status",
    # speed
    "throughput_sps", "tput_batch_size", "latency_ms_bs1", "speedup_measured", "speedup_theoretical", "precision",
    "peak_mem_mb",
    # provenance
    "device_name", "torch", "timm", "transformers", "open_clip", "bench_version", "git_sha", "run_id", "date_utc",
    # appended: multi-part cards, the inference-only FLOPs count, method wall times
    "part", "gmacs_inference", "compress_s", "finetune_s",
    # appended: per-seed rows and the code versions behind the numbers (README "Seeds")
    "row_kind", "seed", "code_version",
    # appended: training compute of the row (the method's phases + finetune; the shared dense training excluded)
    # and the checkpoint selection ("(best-epoch on dev)" when the finetune kept its best epoch on that split)
    "train_epochs", "train_steps", "train_phases", "selection",
]

STATUS_WORDS = {"pass": "PASSED", "fail": "FAILED", "no_ref": "NO-REF", "error": "ERROR"}
DEFAULT_METRIC_TOLERANCE = 0.5
REIMPL_SENTENCE = ("Rows marked (reimpl) are re-implementations written for this suite, not the authors' code; "
                   "a gap to the paper may come from the re-implementation.")


# ---------------------------------------------------------------------------------------------
# card helpers (the card is a plain dict)

def card_metrics(card: dict) -> list[dict]:
    """The card's metrics as dicts {name, split, higher_is_better, primary}, in card order."""
    out = []
    for m in card.get("metrics") or []:
        if isinstance(m, str):
            m = {"name": m}
        m = dict(m)
        m.setdefault("higher_is_better", True)
        out.append(m)
    return out


def _primary_names(card: dict, task) -> set:
    return {m["name"] for m in card_metrics(card) if m.get("primary") and m.get("task") in (None, task)}


def primary_metric(card: dict) -> dict | None:
    ms = card_metrics(card)
    for m in ms:
        if m.get("primary"):
            return m
    return ms[0] if ms else None


def card_ratios(card: dict) -> list[dict]:
    """The card's ratios as [{label, p}] (accepts a list of dicts or a {label: {p: ...}} mapping)."""
    r = card.get("ratios") or []
    if isinstance(r, dict):
        return [{"label": str(k), "p": (v or {}).get("p")} for k, v in r.items()]
    return [{"label": str(x["label"]), "p": x.get("p")} for x in r]


def card_references(card: dict) -> dict:
    return card.get("references") or card.get("reference") or {}


def card_tolerance(card: dict, name: str, default=None):
    """The card's tolerance for `name` (a metric, "params_m", "gflops"/"gmacs"), as written in the card."""
    tol = card_references(card).get("tolerance") or {}
    if name in tol:
        return tol[name]
    aliases = {"gmacs": "gflops", "gflops": "gmacs"}
    if name in aliases and aliases[name] in tol:
        return tol[aliases[name]]
    return default


def parse_tolerance(tol) -> tuple[float, bool] | None:
    """A card tolerance -> (value, relative). A number is absolute in the metric's unit; "1%" is relative."""
    if tol is None or tol == "":
        return None
    if isinstance(tol, bool):
        raise ValueError(f"not a tolerance: {tol!r}")
    if isinstance(tol, (int, float)):
        return float(tol), False
    s = str(tol).strip()
    if s.endswith("%"):
        return float(s[:-1]) / 100.0, True
    return float(s), False


def tolerance_abs(tol, reference: float) -> float | None:
    """The tolerance in the metric's unit around `reference` (relative ones scale with |reference|)."""
    parsed = parse_tolerance(tol)
    if parsed is None:
        return None
    value, relative = parsed
    return abs(reference) * value if relative else value


def format_tolerance(tol) -> str:
    if tol is None:
        return ""
    if isinstance(tol, (int, float)) and not isinstance(tol, bool):
        return f"{tol:g}"
    return str(tol).strip()


def _ref_rows(card: dict) -> list[dict]:
    return list(card_references(card).get("rows") or [])


def _card_reference_values(card: dict, profile: str, method: str, ratio_label: str) -> dict:
    """Paper numbers of the card for a cell (only when the card's references apply to that profile)."""
    refs = card_references(card)
    if refs.get("profile", "paper") != profile:
        return {}
    for row in _ref_rows(card):
        if row.get("method") != method:
            continue
        if method == "dense" or str(row.get("ratio")) == str(ratio_label):
            return {k: v for k, v in row.items() if k not in ("method", "ratio")}
    return {}


# ---------------------------------------------------------------------------------------------
# aggregation of records into cells

def _get(d, *keys):
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def _num(x):
    if x is None or isinstance(x, bool):
        return None
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x


def _mean(values):
    vals = [v for v in (_num(x) for x in values) if v is not None]
    if not vals:
        return None
    if any(math.isnan(v) for v in vals):
        return float("nan")
    return statistics.fmean(vals)


def _std(values):
    vals = [v for v in (_num(x) for x in values) if v is not None]
    if len(vals) < 2 or any(math.isnan(v) for v in vals):
        return None
    return statistics.stdev(vals)


def _first(values):
    for v in values:
        if v is not None:
            return v
    return None


def _ratio(a, b):
    a, b = _num(a), _num(b)
    if a is None or b is None or b == 0:
        return None
    return a / b


def _joined(values) -> str | None:
    seen = []
    for v in values:
        if v is not None and str(v) not in seen:
            seen.append(str(v))
    return ";".join(seen) if seen else None


def _card_order(card: dict):
    methods = list(card.get("methods") or [])
    if "dense" in methods:
        methods.remove("dense")
    methods.insert(0, "dense")
    ratio_index = {r["label"]: i for i, r in enumerate(card_ratios(card))}
    models = list(dict.fromkeys(r.get("model") or card.get("model") for r in card.get("ratios") or []
                                if isinstance(r, dict)))
    tasks = card.get("tasks") or [card.get("task")]
    part_index = {"/".join(x for x, multi in ((t, "tasks" in card), (mo, len(models) > 1)) if multi) or None: i
                  for i, (t, mo) in enumerate((t, mo) for t in tasks for mo in models)}

    def key(cell):
        m = cell["method"]
        mi = methods.index(m) if m in methods else len(methods)
        p = _num(cell["ratio_p"])
        part = cell.get("part")
        return (cell["profile"], part_index.get(part, len(part_index)), str(part or ""), mi, m,
                p if p is not None else math.inf,
                ratio_index.get(cell["ratio_label"], len(ratio_index)), str(cell["ratio_label"]))
    return key


def _metric_names(card: dict, records) -> list[str]:
    names = [m["name"] for m in card_metrics(card)]
    if names:
        return names
    seen = []
    for r in records:
        for k in r.get("metrics") or {}:
            if k not in seen:
                seen.append(k)
    return seen


def _checks_status(recs: list, relevant) -> tuple[str, list]:
    """Status of a set of seed records, looking only at checks for which relevant(name) holds.
    error if any seed errored, else fail if any (relevant) check failed, else pass if any check ran,
    else no_ref. A record marked "fail" without check details counts as failed."""
    if any(r.get("status") == "error" for r in recs):
        return "error", []
    failed, ran = [], False
    for r in recs:
        checks = [c for c in (_get(r, "reference", "checks") or []) if relevant(c.get("name"))]
        if checks:
            ran = True
            failed += [c for c in checks if not c.get("ok")]
        elif r.get("status") == "fail" and not (_get(r, "reference", "checks") or []):
            failed.append({"name": None, "reason": r.get("reason")})
    if failed:
        return "fail", failed
    return ("pass" if ran else "no_ref"), []


def _aggregate(card: dict, records) -> list[dict]:
    """Records -> cells (one per table/profile/method/ratio), in card order."""
    table = card.get("table")
    records = [r for r in records if r and (table is None or r.get("table") == table)]
    groups: dict = {}
    for r in records:
        groups.setdefault((r.get("profile"), r.get("part"), r.get("method"), str(r.get("ratio_label"))), []).append(r)
    metric_names = _metric_names(card, records)

    dense_by_part = {(prof, part): recs for (prof, part, meth, _), recs in groups.items() if meth == "dense"}

    def speed_key(r):
        s = r.get("speed") or {}
        return (s.get("device"), s.get("precision"), s.get("batch_size"), _get(r, "env", "device_name"))

    cells = []
    for (profile, part, method, label), recs in groups.items():
        recs = sorted(recs, key=lambda r: (r.get("seed") is None, r.get("seed") or 0, r.get("date_utc") or ""))
        by_date = sorted(recs, key=lambda r: r.get("date_utc") or "")
        ok = [r for r in recs if r.get("status") != "error"]
        dense = [r for r in dense_by_part.get((profile, part), []) if r.get("status") != "error"]
        cell = {
            "profile": profile, "part": part, "method": method, "ratio_label": label, "records": recs,
            "table_id": _first(r.get("table") for r in recs),
            "table_version": _first(r.get("table_version") for r in recs) or card.get("version"),
            "task": _first(r.get("task") for r in recs) or card.get("task"),
            "split": _first(r.get("split") for r in recs),
            "model_arch": _first(r.get("model_arch") for r in recs),
            "model_tag": _first(r.get("model_tag") for r in recs),
            "method_impl": _first(r.get("method_impl") for r in recs),
            "ratio_p": _first(r.get("ratio_p") for r in recs),
            "seeds": [r.get("seed") for r in recs],
        }
        if method == "dense" and cell["ratio_p"] is None:
            cell["ratio_p"] = 0.0
        # compression
        cell["target_param_reduction"] = _first(_get(r, "params", "target_reduction") for r in recs)
        cell["achieved_param_reduction"] = _mean(_get(r, "params", "achieved_reduction") for r in ok)
        total = _mean(_get(r, "params", "total") for r in ok)
        dense_total = _mean(_get(r, "params", "total") for r in dense) or _mean(
            _get(r, "params", "dense_total") for r in recs)
        prunable_dense = _mean(_get(r, "params", "prunable_dense") for r in recs)
        removed = _mean(_get(r, "params", "removed") for r in ok)
        cell["params_m"] = total / 1e6 if total is not None else None
        cell["params_dense_m"] = dense_total / 1e6 if dense_total is not None else None
        cell["prunable_params_m"] = ((prunable_dense - (removed or 0.0)) / 1e6
                                     if prunable_dense is not None and (removed is not None or method == "dense")
                                     else None)
        if cell["achieved_param_reduction"] is None and method == "dense" and ok:
            cell["achieved_param_reduction"] = 0.0
        # compute
        macs = _mean(_get(r, "flops", "macs") for r in ok)
        dense_macs = _mean(_get(r, "flops", "macs") for r in dense) or _mean(
            _get(r, "flops", "dense_macs") for r in recs)
        cell["gmacs"] = macs / 1e9 if macs is not None else None
        cell["gmacs_dense"] = dense_macs / 1e9 if dense_macs is not None else None
        cell["macs_reduction"] = (1.0 - macs / dense_macs) if macs is not None and dense_macs else None
        cell["speedup_theoretical"] = _ratio(dense_macs, macs)
        cell["flop_counter"] = _first(_get(r, "flops", "counter") for r in recs)
        cell["flop_convention"] = _first(_get(r, "flops", "convention") for r in recs)
        cell["flop_input_spec"] = _first(_get(r, "flops", "input_spec") for r in recs)
        inference = _mean(_get(r, "flops", "inference_macs") for r in ok)
        cell["gmacs_inference"] = inference / 1e9 if inference is not None else None
        # compression wall time: the method's own search/pruning time (VTrans's claim is speed), then finetune
        cell["compress_s"] = _mean(_get(r, "timings", "prune_s") for r in ok)
        cell["finetune_s"] = _mean(_get(r, "timings", "finetune_s") for r in ok)
        cell.update(training_compute(ok or recs))
        # speed: the most common (device, precision, batch) among the seeds
        sp = [r for r in ok if r.get("speed")]
        if sp:
            common = Counter(speed_key(r) for r in sp).most_common(1)[0][0]
            sp = [r for r in sp if speed_key(r) == common]
        cell["throughput_sps"] = _mean(_get(r, "speed", "throughput_sps") for r in sp)
        cell["tput_batch_size"] = _first(_get(r, "speed", "batch_size") for r in sp)
        cell["latency_ms_bs1"] = _mean(_get(r, "speed", "latency_ms_bs1") for r in sp)
        cell["precision"] = _first(_get(r, "speed", "precision") for r in sp)
        cell["speed_device"] = _first(_get(r, "speed", "device") for r in sp)
        cell["speed_trials"] = _first(_get(r, "speed", "trials") for r in sp)
        # prefer the speedup measured in the cell itself (dense and pruned timed in alternation, so both
        # see the same machine state); otherwise the ratio to the dense record's throughput
        paired = _mean(_get(r, "speed", "speedup_measured") for r in sp)
        dsp = [r for r in dense if r.get("speed") and sp and speed_key(r) == speed_key(sp[0])]
        cell["speedup_measured"] = paired if paired is not None else _ratio(
            cell["throughput_sps"], _mean(_get(r, "speed", "throughput_sps") for r in dsp))
        peaks = [v for v in (_num(_get(r, "memory", "peak_mem_mb")) for r in ok) if v is not None]
        cell["peak_mem_mb"] = max(peaks) if peaks else None
        # provenance: distinct values in date order (seeds may come from different runs)
        cell["device_name"] = _joined(_get(r, "env", "device_name") for r in by_date)
        for k in ("torch", "timm", "transformers", "open_clip", "bench_version", "git_sha"):
            cell[k] = _joined(_get(r, "env", k) for r in by_date)
        cell["run_id"] = _joined(r.get("run_id") for r in by_date)
        cell["code_version"] = _joined(code_version_text(_get(r, "config", "code_version")) for r in by_date)
        cell["date_utc"] = _first(r.get("date_utc") for r in reversed(by_date))
        # quality, per metric
        card_m = {m["name"]: m for m in card_metrics(card)}
        cell["metrics"] = {}
        task = cell["task"]
        applies = {m["name"] for m in card_metrics(card) if m.get("task") in (None, task)}
        for name in metric_names:
            if card_m and name not in applies:   # multi-task cards: each task has its own metrics
                continue
            vals = [_get(r, "metrics", name) for r in ok]
            value = _mean(vals)
            dvalue = _mean(_get(r, "metrics", name) for r in dense)
            ref_vals = {}
            for r in recs:
                ref_vals = _get(r, "reference", "values") or {}
                if name in ref_vals:
                    break
            paper = ref_vals.get(name)
            source = _first(_get(r, "reference", "source") for r in recs)
            tol = _first((_get(r, "reference", "tolerance") or {}).get(name) for r in recs)
            if paper is None:
                paper = _card_reference_values(card, profile, method, label).get(name)
                if paper is not None:
                    source = source or card_references(card).get("source")
            if tol is None:
                tol = card_tolerance(card, name)
            others = set(metric_names) - {name}
            status, failed = _checks_status(recs, lambda n, others=others: n not in others)
            cell["metrics"][name] = {
                "value": value, "std": _std(vals), "n": sum(1 for v in vals if _num(v) is not None),
                "dense": dvalue,
                "delta": (value - dvalue) if value is not None and dvalue is not None else None,
                "higher_is_better": card_m.get(name, {}).get("higher_is_better"),
                "split": _first(_get(r, "metric_splits", name) for r in recs) or card_m.get(name, {}).get("split")
                or cell["split"],
                "paper": paper, "source": source if paper is not None else None, "tolerance": tol,
                "status": status,
            }
        cell["status"], cell["failed_checks"] = _checks_status(recs, lambda n: True)
        cell["reason"] = _short_reason(cell, card)
        cells.append(cell)
    cells.sort(key=_card_order(card))
    return cells


def _ep(x) -> str:
    """Epochs as written in a card: 4, 0.5, 27."""
    x = _num(x)
    return "-" if x is None else f"{x:g}"


def training_compute(recs: list) -> dict:
    """The training compute of a cell from its records' `training` entries: every phase but the dense model's
    (shared by all rows): the method's own (upop, sgmp, ...) and the finetune. train_epochs: passes over the
    training split, summed; train_steps: optimizer steps, summed; train_phases: "upop 4 + finetune 4" (epochs);
    selection: the finetune's selection label, or None for the final epoch. Seeds: the first record's (a cell's
    seeds train the same budget)."""
    out = {"train_epochs": None, "train_steps": None, "train_phases": None, "selection": None}
    for r in recs:
        if not isinstance(r.get("training"), dict):   # a record older than the training entry: unknown
            continue
        tr = {k: v for k, v in r["training"].items() if k != "dense" and isinstance(v, dict)}
        cfg = r.get("config") or {}
        if "finetune" in tr and _num(tr["finetune"].get("epochs")) is None and cfg.get("finetune"):
            tr["finetune"] = {**tr["finetune"], "epochs": cfg["finetune"].get("epochs")}   # records before "epochs"
        if tr:
            eps = [_num(v.get("epochs")) for v in tr.values()]
            out["train_epochs"] = sum(eps) if all(e is not None for e in eps) else None
            out["train_steps"] = sum(int(v.get("steps") or 0) for v in tr.values())
            out["train_phases"] = " + ".join(f"{k} {_ep(v.get('epochs'))}" if _num(v.get("epochs")) is not None
                                             else f"{k} {v.get('steps')} steps" for k, v in tr.items())
        elif r.get("status") != "error":
            out["train_epochs"], out["train_steps"], out["train_phases"] = 0.0, 0, "none"
        out["selection"] = _get(r, "selection", "label")
        return out
    return out


def _short_reason(cell: dict, card: dict, width: int = 80) -> str | None:
    """The short reason shown next to FAILED / ERROR: the crash message, or the failed checks."""
    multi = len(cell["records"]) > 1
    if cell["status"] == "error":
        errs = [r for r in cell["records"] if r.get("status") == "error"]
        text = _first(r.get("reason") for r in errs) or "the cell crashed"
        if multi:
            text = f"seed {errs[0].get('seed')}: {text}"
    elif cell["status"] == "fail":
        parts = []
        for r in cell["records"]:
            seed = f"seed {r.get('seed')}: " if multi else ""
            checks = _get(r, "reference", "checks") or []
            if r.get("status") == "fail" and not checks:
                parts.append(seed + (r.get("reason") or "failed"))
            for c in checks:
                if c.get("ok"):
                    continue
                v, p = _num(c.get("value")), _num(c.get("paper"))
                if v is not None and p is not None:
                    known = {m["name"] for m in card_metrics(card)}
                    d = _metric_decimals(card, c["name"]) if c.get("name") in known else None
                    parts.append(f"{seed}{c['name']} {_fmt(v, d)} vs {_fmt(p, d)} "
                                 f"(tol {format_tolerance(c.get('tolerance'))})")
                else:
                    parts.append(f"{seed}{c.get('name')} off")
                seed = ""
        text = "; ".join(dict.fromkeys(parts)) or _first(r.get("reason") for r in cell["records"]) or "failed"
    else:
        return None
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 3] + "..."


# ---------------------------------------------------------------------------------------------
# leaderboard CSV

def code_version_text(v) -> str | None:
    """A cell's code versions as one CSV field: "bench=0.1.0;training=1;measure=1;method=1;task=1;model=1"."""
    if not isinstance(v, dict):
        return None
    return ";".join(f"{k}={v[k]}" for k in ("bench", "training", "measure", "method", "task", "model") if k in v)


def leaderboard_rows(card: dict, records, per_seed: bool = True) -> list[dict]:
    """One row per (profile, method, ratio, metric) with row_kind "cell", keys exactly LEADERBOARD_COLUMNS, Python
    values (None where unknown): seeds aggregated (mean, sample std (n >= 2), n_seeds, ";"-joined seed list).
    A cell of two or more seeds is followed by one row_kind "seed" row per seed (its own values, n_seeds 1, the
    seed in `seed`, metric_delta vs the dense model of the same seed); a one-seed cell has its cell row only."""
    rows = _cell_rows(card, records, "cell")
    if not per_seed:
        return rows
    key = lambda r: (r["profile"], r["part"], r["method"], str(r["ratio_label"]), r["metric"])   # noqa: E731
    multi = {key(r) for r in rows if (r["n_seeds"] or 0) > 1 or len(str(r["seed_list"] or "").split(";")) > 1}
    seeds = sorted({r.get("seed") for r in records if r and r.get("seed") is not None})
    extra: dict = {}
    for seed in seeds:
        for r in _cell_rows(card, [x for x in records if x and x.get("seed") == seed], "seed"):
            if key(r) in multi:
                r["seed"] = seed
                extra.setdefault(key(r), []).append(r)
    out = []
    for r in rows:
        out += [r] + extra.get(key(r), [])
    return out


def _cell_rows(card: dict, records, kind: str) -> list[dict]:
    rows = []
    for cell in _aggregate(card, records):
        for name, m in cell["metrics"].items():
            row = {c: None for c in LEADERBOARD_COLUMNS}
            for k in LEADERBOARD_COLUMNS:
                if k in cell:
                    row[k] = cell[k]
            row.update({
                "split": m["split"], "metric": name, "metric_value": m["value"], "metric_dense": m["dense"],
                "metric_delta": m["delta"], "higher_is_better": m["higher_is_better"], "n_seeds": m["n"],
                "metric_std": m["std"], "seed_list": ";".join(str(s) for s in cell["seeds"] if s is not None),
                "paper_value": m["paper"], "paper_source": m["source"],
                "tolerance": format_tolerance(m["tolerance"]) or None, "status": m["status"],
                "row_kind": kind,
            })
            rows.append(row)
    return rows


def _csv_value(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.10g}"
    return str(v)


def _atomic_write_bytes(path, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def leaderboard_csv_text(card: dict, records) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(LEADERBOARD_COLUMNS)
    for row in leaderboard_rows(card, records):
        w.writerow([_csv_value(row[c]) for c in LEADERBOARD_COLUMNS])
    return buf.getvalue()


def write_leaderboard_csv(card: dict, records, path) -> Path:
    """Write the leaderboard CSV atomically (temp file + os.replace): header = LEADERBOARD_COLUMNS."""
    return _atomic_write_bytes(path, leaderboard_csv_text(card, records).encode())


def sanitize(name) -> str:
    """A file-name-safe token: lower case, runs of other characters -> "_" (e.g. "NVIDIA H100 80GB HBM3"
    -> "nvidia_h100_80gb_hbm3")."""
    s = re.sub(r"[^a-z0-9.]+", "_", str(name).lower()).strip("_.")
    return s or "unknown"


def leaderboard_filename(card: dict, records) -> str:
    """`<table>-<profile>-<precision>-<device>.csv` (timm style; the most common values of the records)."""
    table = card.get("table") or _first(r.get("table") for r in records) or "table"
    recs = [r for r in records if r and (card.get("table") is None or r.get("table") == card.get("table"))]

    def common(values, default):
        c = Counter(v for v in values if v)
        return c.most_common(1)[0][0] if c else default

    profile = common((r.get("profile") for r in recs), "micro")
    # a record without a speed (its cell crashed) names the precision its device times with, so that a run in
    # which every cell crashed writes the same file as a good run (not a second, "-unknown-" one)
    prec = common((_get(r, "speed", "precision") or
                   {"cuda": "amp_fp16", "cpu": "fp32"}.get(_get(r, "config", "device")) for r in recs), "unknown")
    device = common((_get(r, "env", "device_name") or _get(r, "speed", "device") for r in recs), "unknown")
    return f"{sanitize(table)}-{sanitize(profile)}-{sanitize(prec)}-{sanitize(device)}.csv"


def write_table_csv(card: dict, records, folder) -> Path:
    """Write the leaderboard CSV of `records` (the current records of the card's cells) into the table's folder
    and remove every other `<table>-<profile>-*.csv` there: those were built from records that are no longer
    the current ones (another device name, or a run whose cells all crashed), so none is left to mislead."""
    folder = Path(folder)
    name = leaderboard_filename(card, records)
    path = write_leaderboard_csv(card, records, folder / name)
    profile = name[len(sanitize(card.get("table") or "table")) + 1:].split("-")[0]
    for other in folder.glob(f"{sanitize(card.get('table') or 'table')}-{profile}-*.csv"):
        if other.name != name:
            other.unlink(missing_ok=True)
    return path


# ---------------------------------------------------------------------------------------------
# paper-style table

def _decimals_of(x) -> int:
    s = repr(float(x))
    return len(s.split(".")[1].rstrip("0")) if "." in s and "e" not in s else 2


def _metric_decimals(card: dict, name: str) -> int:
    """As many decimals as the paper gives for this metric (1..3), 2 if the card has none."""
    ds = [_decimals_of(row[name]) for row in _ref_rows(card) if _num(row.get(name)) is not None]
    return min(3, max(1, max(ds))) if ds else 2


def _fmt(x, decimals=None) -> str:
    x = _num(x)
    if x is None:
        return "-"
    if math.isnan(x):
        return "nan"
    if decimals is not None:
        return f"{x:.{decimals}f}"
    a = abs(x)
    if a >= 1000:
        return f"{x:.0f}"
    if a >= 100:
        return f"{x:.1f}"
    if a >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def _method_name(cell: dict) -> str:
    name = f"{cell['method']} (reimpl)" if cell.get("method_impl") == "reimpl" else str(cell["method"])
    return f"{name} {cell['selection']}" if cell.get("selection") else name


def _train_text(cell: dict) -> str:
    """The row's training compute: total epochs of search + finetune, with the phases when there are several."""
    if cell["method"] == "dense" or _num(cell.get("train_epochs")) is None:
        return "-" if cell.get("train_steps") is None else f"{cell['train_steps']} steps"
    total = _ep(cell["train_epochs"])
    phases = cell.get("train_phases") or ""
    return f"{total} ({phases})" if "+" in phases else total


def _status_text(cell: dict) -> str:
    word = STATUS_WORDS.get(cell["status"], str(cell["status"]).upper())
    return f"{word}: {cell['reason']}" if cell.get("reason") else word


def _table_cells(card: dict, cells: list, pm: str) -> tuple[list, list]:
    metrics = list(dict.fromkeys(m["name"] for m in card_metrics(card))) or (list(cells[0]["metrics"]) if cells else [])
    multi = len({c["profile"] for c in cells}) > 1
    parts = any(c.get("part") for c in cells)
    part_col = ("Task" if "tasks" in card else
                "Budget" if all((c.get("part") or "").endswith("matched") or not c.get("part") for c in cells)
                else "Model")
    inference = any(_num(c.get("gmacs_inference")) is not None for c in cells)
    header = (["Profile"] if multi else []) + ([part_col] if parts else []) + ["Method", "Ratio"] + metrics + [
        "Params M", "GFLOPs"] + (["GFLOPs inf."] if inference else []) + [
        "Throughput/s", "Speedup meas./FLOPs", "Compress s", "Train ep.", "Status"]
    body = []
    for c in cells:
        part_text = str(c.get("part") or ("paper" if part_col == "Budget" else ""))
        row = ([str(c["profile"])] if multi else []) + ([part_text] if parts else []) + [
            _method_name(c), str(c["ratio_label"])]
        for name in metrics:
            m = c["metrics"].get(name) or {}
            d = _metric_decimals(card, name)
            if _num(m.get("value")) is None:
                row.append("-")
                continue
            s = _fmt(m["value"], d)
            if m.get("std") is not None and (m.get("n") or 0) > 1:
                s += f" {pm} {_fmt(m['std'], d)}"
            if c["method"] != "dense" and m.get("delta") is not None:
                s += f" ({m['delta']:+.{d}f})"
            row.append(s)
        p = _fmt(c["params_m"])
        if c["method"] != "dense" and _num(c["achieved_param_reduction"]) is not None:
            p += f" (-{100 * c['achieved_param_reduction']:.1f}%)"
        g = _fmt(c["gmacs"])
        if c["method"] != "dense" and _num(c["macs_reduction"]) is not None:
            g += f" (-{100 * c['macs_reduction']:.1f}%)"
        meas = f"{c['speedup_measured']:.2f}x" if _num(c["speedup_measured"]) is not None else "-"
        theo = f"{c['speedup_theoretical']:.2f}x" if _num(c["speedup_theoretical"]) is not None else "-"
        row += [p, g] + ([_fmt(c.get("gmacs_inference"))] if inference else []) + [
            _fmt(c["throughput_sps"]), f"{meas} / {theo}",
            _fmt(c.get("compress_s"), 1) if c["method"] != "dense" else "-", _train_text(c), _status_text(c)]
        body.append(row)
    return header, body


def _footnotes(card: dict, cells: list) -> tuple[list, list, list]:
    """(heading lines, reference table (header, rows) or None, other lines)."""
    refs = card_references(card)
    ref_profile = refs.get("profile", "paper")
    metric_names = [m["name"] for m in card_metrics(card)]
    ref_header, ref_body = None, []
    rows = _ref_rows(card)
    if rows:
        extra = [k for k in ("params_m", "gflops") if any(k in r for r in rows)]
        cols = [n for n in metric_names if any(n in r for r in rows)] + extra
        ref_header = ["Method", "Ratio"] + cols
        dec = {k: min(3, max([1] + [_decimals_of(r[k]) for r in rows if _num(r.get(k)) is not None])) for k in cols}
        for r in rows:
            ref_body.append([str(r.get("method")), str(r.get("ratio", ""))] +
                            [(_fmt(r[k], dec[k]) if _num(r.get(k)) is not None else "-") for k in cols])
    profiles = sorted({str(c["profile"]) for c in cells})
    if rows:
        head = f"Paper reference ({refs.get('source', 'source not given')}), for the {ref_profile} profile"
        tol = refs.get("tolerance") or {}
        if tol:
            head += "; tolerance " + ", ".join(f"{k} {format_tolerance(v)}" for k, v in tol.items())
        if profiles and ref_profile not in profiles:
            head += f"; not compared with the {'/'.join(profiles)} rows above"
        head += ":"
    else:
        head = "No paper reference numbers in this card."
    notes = []
    for n in card.get("notes") or []:
        notes.append(f"Note: {' '.join(str(n).split())}")
    if card.get("ratio_meaning"):
        notes.append(f"Ratio: {' '.join(str(card['ratio_meaning']).split())}")
    notes.append("Params: all parameters of the deployed model, in millions; in parentheses the achieved "
                 "reduction of the prunable parameters. GFLOPs: multiply-accumulates / 1e9 (one MAC = one FLOP), "
                 "in parentheses the reduction vs dense. Metric deltas in parentheses are vs the dense row. "
                 "Compress s: wall time of the method's search/pruning (before the common finetune), seconds.")
    if any(_num(c.get("gmacs_inference")) is not None for c in cells):
        notes.append("GFLOPs follows the paper's FLOPs protocol (" + " ".join(str(
            (card.get("protocol") or {}).get("flops", {}).get("input", "")).split()) + "); GFLOPs inf. is the "
            "inference-only forward of the same model, counted the same way.")
    speeds = Counter()
    for c in cells:
        if _num(c["throughput_sps"]) is not None:
            dev = c["device_name"] or c["speed_device"] or "unknown device"
            speeds[(dev, c["precision"] or "unknown precision", c["tput_batch_size"], c["speed_trials"])] += 1
    for (dev, prec, bs, trials), _ in speeds.most_common():
        t = f", median of {trials} trials" if trials else ""
        notes.append(f"Throughput: samples/s on {dev}, {prec}, batch size {bs}{t}. Speedup: measured "
                     f"throughput ratio vs dense (timed in alternation within the cell) / FLOPs ratio dense/pruned.")
    if not speeds:
        notes.append("Throughput: not measured.")
    if any(c.get("method_impl") == "reimpl" for c in cells):
        notes.append(REIMPL_SENTENCE)
    notes += floor_notes(card, cells)
    return [head], ((ref_header, ref_body) if ref_header else None), notes


def floor_notes(card: dict, cells: list) -> list[str]:
    """The random-units floor: every row trained for as many epochs as a `random` row of the same profile, part
    and ratio (matched compute) whose primary-metric mean does not beat random's gets one line saying so."""
    pm = primary_metric(card)
    if not pm:
        return []
    name, hib = pm["name"], pm.get("higher_is_better", True)

    def value(c):
        return _num((c["metrics"].get(name) or {}).get("value"))

    floors = [c for c in cells if c["method"] == "random" and value(c) is not None
              and _num(c.get("train_epochs")) is not None]
    out = []
    for c in cells:
        if c["method"] in ("random", "dense") or value(c) is None:
            continue
        for f in floors:
            if (f["profile"], str(f["ratio_label"])) != (c["profile"], str(c["ratio_label"])) or \
                    _num(c.get("train_epochs")) != _num(f["train_epochs"]):
                continue
            a, b = value(c), value(f)
            if (a <= b) if hib else (a >= b):
                where = f" [{c['part']}]" if c.get("part") else ""
                out.append(f"Floor: {_method_name(c)} at {c['ratio_label']}{where} does not beat random units at the "
                           f"same training ({_ep(c['train_epochs'])} epochs): {name} {_fmt(a)} vs {_fmt(b)}.")
            break
    return out


_TEXT_COLUMNS = ("Method", "Ratio", "Profile", "Task", "Model", "Status", "layer", "modality")


def _aligned(header, body) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header] + body) for i in range(len(header))]

    def line(r):
        out = []
        for i, (v, w) in enumerate(zip(r, widths)):
            left = i == 0 or header[i] in _TEXT_COLUMNS
            out.append(str(v).ljust(w) if left else str(v).rjust(w))
        return "  ".join(out).rstrip()
    return [line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in body]


def _md_table(header, body) -> list[str]:
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    align = ["---" if h in _TEXT_COLUMNS else "---:" for h in header]
    return (["| " + " | ".join(esc(h) for h in header) + " |", "| " + " | ".join(align) + " |"] +
            ["| " + " | ".join(esc(v) for v in r) + " |" for r in body])


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(s) -> str:
    s = "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(s))
    return s.replace("±", r"$\pm$")


def _latex_table(header, body) -> list[str]:
    spec = "".join("l" if h in ("Method", "Ratio", "Profile", "Status") else "r" for h in header)
    out = [r"\begin{tabular}{" + spec + "}", r"\toprule",
           " & ".join(latex_escape(h) for h in header) + r" \\", r"\midrule"]
    out += [" & ".join(latex_escape(v) for v in r) + r" \\" for r in body]
    out += [r"\bottomrule", r"\end{tabular}"]
    return out


def render_table(card: dict, records, fmt: str = "terminal") -> str:
    """The paper-style table of a card's records: fmt is "terminal", "md", "csv" or "latex"."""
    if fmt not in ("terminal", "md", "csv", "latex"):
        raise ValueError(f"unknown table format {fmt!r}: use terminal, md, csv or latex")
    cells = _aggregate(card, records)
    header, body = _table_cells(card, cells, "±")
    head, ref, notes = _footnotes(card, cells)
    title = card.get("title") or card.get("table") or ""
    profiles = "/".join(sorted({str(c["profile"]) for c in cells})) or "no records"
    title = f"{title} [{card.get('table')} v{card.get('version', '?')}, profile {profiles}]"
    if fmt == "terminal":
        out = [title, ""] + _aligned(header, body) + ["", *head]
        if ref:
            out += ["  " + l for l in _aligned(*ref)]
        out += [""] + notes
    elif fmt == "md":
        out = [f"**{title}**", ""] + _md_table(header, body) + ["", *head]
        if ref:
            out += [""] + _md_table(*ref)
        out += [""] + [f"- {n}" for n in notes]
    elif fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(header)
        w.writerows(body)
        out = [buf.getvalue().rstrip("\n"), f"# {title}", *(f"# {h}" for h in head)]
        if ref:
            out += ["# " + ", ".join(ref[0])] + ["# " + ", ".join(r) for r in ref[1]]
        out += [f"# {n}" for n in notes]
    else:
        out = [f"% {title}"] + _latex_table(header, body) + ["", r"\smallskip", r"{\footnotesize"]
        out += [latex_escape(h) + r"\\" for h in head]
        if ref:
            out += _latex_table(*ref) + [r"\\"]
        out += [latex_escape(n) + r"\\" for n in notes] + ["}"]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------
# plot

def plot(card: dict, records, path) -> Path:
    """PNG, two panels: primary metric vs params (M) and vs GFLOPs; one line per method sorted by
    ratio (error bars = std over seeds), starting from the dense model (black star, dotted level);
    the card's paper references (x, dashed, same colour as the method) when they apply to the profile."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pm = primary_metric(card)
    cells = _aggregate(card, records)
    name = pm["name"] if pm else (next(iter(cells[0]["metrics"])) if cells and cells[0]["metrics"] else "metric")
    split, unit = (pm or {}).get("split"), (pm or {}).get("unit")
    ylabel = f"{name}" + (f" on {split}" if split else "") + (f" ({unit})" if unit else "")
    profiles = list(dict.fromkeys(c["profile"] for c in cells))
    multi = len(profiles) > 1
    refs = card_references(card)
    ref_rows = _ref_rows(card) if refs.get("profile", "paper") in profiles else []

    cycle = matplotlib.rcParams["axes.prop_cycle"].by_key().get("color") or ["C0", "C1", "C2", "C3"]
    colors: dict = {"dense": "black"}
    for m in [c["method"] for c in cells] + [r.get("method") for r in ref_rows]:
        if m not in colors:
            colors[m] = cycle[(len(colors) - 1) % len(cycle)]

    series: dict = {}
    for c in cells:
        label = _method_name(c) + (f" [{c['profile']}]" if multi else "") + (f" [{c['part']}]" if c.get("part") else "")
        series.setdefault((c["profile"], c.get("part"), c["method"], label), []).append(c)
    dense_cells = {(c["profile"], c.get("part")): c for c in cells if c["method"] == "dense"}

    def y_of(c):   # multi-task cards: each task's own primary metric
        m = c["metrics"].get(name) or next((c["metrics"][n] for n in c["metrics"]
                                            if n in _primary_names(card, c.get("task"))), {})
        return _num(m.get("value")), _num(m.get("std")) or 0.0

    fig = Figure(figsize=(11, 4.4), dpi=110)
    FigureCanvasAgg(fig)  # the Agg backend, without touching pyplot's global state
    axes = fig.subplots(1, 2)
    for ax, xkey, rkey, xlabel in ((axes[0], "params_m", "params_m", "Params (M)"),
                                   (axes[1], "gmacs", "gflops", "GFLOPs (GMACs, 1 MAC = 1 FLOP)")):
        for (profile, part, method, label), cs in series.items():
            pts = sorted(((_num(c[xkey]), *y_of(c), _num(c["ratio_p"]) or 0.0) for c in cs), key=lambda t: t[3])
            pts = [t for t in pts if t[0] is not None and t[1] is not None]
            if not pts:
                continue
            xs, ys, errs = [t[0] for t in pts], [t[1] for t in pts], [t[2] for t in pts]
            if method == "dense":
                ax.plot(xs, ys, linestyle="none", marker="*", markersize=14, color="black", label=label, zorder=5)
                ax.axhline(ys[0], color="black", linestyle=":", linewidth=0.8)
                continue
            d = dense_cells.get((profile, part))
            dx = _num(d[xkey]) if d else None
            dy = y_of(d)[0] if d else None
            if dx is not None and dy is not None:   # each curve starts at the dense model
                ax.plot([dx, xs[0]], [dy, ys[0]], color=colors[method], linestyle=":", linewidth=1)
            ax.errorbar(xs, ys, yerr=errs if any(errs) else None, marker="o", color=colors[method], label=label,
                        capsize=3)
        by_method: dict = {}
        for r in ref_rows:
            if _num(r.get(rkey)) is not None and _num(r.get(name)) is not None:
                by_method.setdefault(r.get("method"), []).append((float(r[rkey]), float(r[name])))
        for m, pts in by_method.items():
            pts.sort()
            ax.plot([t[0] for t in pts], [t[1] for t in pts], linestyle="--" if len(pts) > 1 else "none",
                    marker="x", markersize=8, color=colors.get(m, "gray"), alpha=0.7, label=f"{m} (paper)")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    title = card.get("title") or card.get("table") or ""
    fig.suptitle(f"{title} [{'/'.join(map(str, profiles)) or 'no records'}]")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return _atomic_write_bytes(path, buf.getvalue())


# ---------------------------------------------------------------------------------------------
# retention

def _retention_labels(ret: list) -> list:
    """A row label per retention entry: its modality, plus the module's role inside the layer when one
    layer has several groups of the same modality and kind (NLVR2's two cross-attentions per text layer:
    "fusion crossattention.self0" and "fusion crossattention.self1")."""
    seen = Counter((g.get("modality"), g.get("layer"), g.get("kind")) for g in ret)
    split = {(m, k) for (m, layer, k), n in seen.items() if n > 1 and layer is not None}
    labels = []
    for g in ret:
        label = str(g.get("modality"))
        if (g.get("modality"), g.get("kind")) in split:
            module = str(g.get("group", "")).split(":")[0]
            role = module.split(f".{g.get('layer')}.", 1)[-1] if g.get("layer") is not None else module
            label += f" {role}"
        labels.append(label)
    return labels


def retention_table(record: dict) -> str:
    """Per layer (and modality), the fraction of units kept for each unit kind: "0.75 (48/64)".
    Groups without a layer (e.g. the hidden width) are shown as layer "-"; a last row sums each kind."""
    ret = record.get("retention") or []
    if not ret:
        return "no retention data (dense model or the cell did not finish)\n"
    kinds = list(dict.fromkeys(g.get("kind") for g in ret))
    labels = _retention_labels(ret)
    modalities = list(dict.fromkeys(labels))
    multi = len(modalities) > 1
    acc: dict = {}
    totals = {k: [0, 0] for k in kinds}
    for g, label in zip(ret, labels):
        key = (label, g.get("layer"))
        cell = acc.setdefault(key, {}).setdefault(g.get("kind"), [0, 0])
        cell[0] += int(g.get("kept") or 0)
        cell[1] += int(g.get("size") or 0)
        totals[g.get("kind")][0] += int(g.get("kept") or 0)
        totals[g.get("kind")][1] += int(g.get("size") or 0)

    def frac(ks):
        return f"{ks[0] / ks[1]:.2f} ({ks[0]}/{ks[1]})" if ks and ks[1] else "-"

    order = sorted(acc, key=lambda k: (modalities.index(k[0]), k[1] is None, k[1] if k[1] is not None else 0))
    header = (["modality"] if multi else []) + ["layer"] + [str(k) for k in kinds]
    body = []
    for mod, layer in order:
        body.append(([str(mod)] if multi else []) + ["-" if layer is None else str(layer)] +
                    [frac(acc[(mod, layer)].get(k)) for k in kinds])
    body.append(([""] if multi else []) + ["all"] + [frac(totals[k]) for k in kinds])
    title = (f"Retention (fraction of units kept): {record.get('method')} {record.get('ratio_label')} "
             f"seed {record.get('seed')}")
    lines = [title] + _aligned(header, body)
    return "\n".join(lines) + "\n"


def retention_heatmap(record: dict, path) -> Path:
    """PNG heat-map of the kept fraction per layer (columns) and per module type (rows: modality + unit
    kind), as the UPop paper's figure of retained proportions. Atomic write."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    import numpy as np

    ret = record.get("retention") or []
    labels = _retention_labels(ret)
    rows = list(dict.fromkeys((label, g.get("kind")) for g, label in zip(ret, labels)))
    layers = sorted({g.get("layer") for g in ret if g.get("layer") is not None})
    grid = np.full((max(1, len(rows)), max(1, len(layers))), np.nan)
    for g, label in zip(ret, labels):
        if g.get("layer") is None or not g.get("size"):
            continue
        r, c = rows.index((label, g.get("kind"))), layers.index(g.get("layer"))
        prev = grid[r, c]
        grid[r, c] = g["kept"] / g["size"] if np.isnan(prev) else (prev + g["kept"] / g["size"]) / 2
    label_width = 0.07 * max([len(f"{m} {k}") for m, k in rows] + [10])   # room for the row labels
    fig = Figure(figsize=(1.2 + label_width + 0.55 * max(1, len(layers)), 1.4 + 0.5 * max(1, len(rows))), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for r in range(grid.shape[0]):
        for c in range(grid.shape[1]):
            if not np.isnan(grid[r, c]):
                ax.text(c, r, f"{100 * grid[r, c]:.0f}%", ha="center", va="center", fontsize=7,
                        color="white" if grid[r, c] < 0.6 else "black")
    ax.set_xticks(range(len(layers)), [str(x) for x in layers])
    ax.set_yticks(range(len(rows)), [f"{m} {k}" for m, k in rows])
    ax.set_xlabel("layer")
    fig.colorbar(im, ax=ax, label="fraction kept")
    ax.set_title(f"{record.get('table')}: {record.get('method')} {record.get('ratio_label')} "
                 f"(seed {record.get('seed')})", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return _atomic_write_bytes(path, buf.getvalue())


def retention_summary(card: dict, records) -> str:
    """One line per pruned cell: the kept fraction of each unit kind, layer by layer (the compact form of
    `retention_table`; `report --retention` prints the full one)."""
    lines = []
    order = {m: i for i, m in enumerate(card.get("methods") or [])}
    for r in sorted(records, key=lambda r: (order.get(r["method"], 99), r.get("ratio_p") or 0, r.get("seed") or 0)):
        ret = r.get("retention") or []
        if r["method"] == "dense" or not ret:
            continue
        parts = []
        labels = _retention_labels(ret)
        multi = len(set(labels)) > 1
        for label, kind in dict.fromkeys((label, g["kind"]) for g, label in zip(ret, labels)):
            gs = sorted((g for g, lab in zip(ret, labels) if g["kind"] == kind and lab == label),
                        key=lambda g: g.get("layer") or 0)
            total = sum(g["kept"] for g in gs) / max(1, sum(g["size"] for g in gs))
            name = f"{label} {kind}" if multi else kind
            parts.append(f"{name} {total:.2f} [" + " ".join(f"{g['kept'] / g['size']:.2f}" for g in gs) + "]")
        lines.append(f"{r['method']:<14}{r['ratio_label']:>7} s{r['seed']}  " + "  ".join(parts))
    if not lines:
        return ""
    return "Retention (fraction of units kept: overall [per layer]):\n" + "\n".join(lines) + "\n"


def relation_checks(card: dict, records) -> list:
    """Check the card's `relations` (claims stated without a number per cell) on the records.

    Judged (PASS/FAIL) on the profile the card's references are for; on other profiles (micro) the
    measured values are shown as INFO. A relation whose cells are missing is SKIPPED."""
    ref_profile = (card.get("references") or {}).get("profile")
    comparators = {(c["method"], str(c["ratio"])): c for c in card.get("comparators") or []}
    vals: dict = {}
    speed: dict = {}
    profiles = set()
    part_of_ratio: dict = {}   # multi-model cards: a ratio's dense row is the dense row of its own model
    for r in records:
        if r.get("status") == "error":
            continue
        profiles.add(r.get("profile"))
        if r["method"] != "dense":
            part_of_ratio[str(r["ratio_label"])] = r.get("part")
        label = str(r["ratio_label"]) if r["method"] != "dense" else ("1x", r.get("part"))
        for k, v in (r.get("metrics") or {}).items():
            vals.setdefault((r["method"], label, k), []).append(v)
        sp = (r.get("speed") or {}).get("speedup_measured")
        if sp is not None:
            speed.setdefault((r["method"], str(r["ratio_label"])), []).append(sp)
    judged = profiles == {ref_profile}

    def metric(method, ratio, name):
        key = ("1x", part_of_ratio.get(str(ratio))) if method == "dense" else str(ratio)
        v = vals.get((method, key, name))
        if v:
            return sum(v) / len(v)
        comp = comparators.get((method, str(ratio)))
        return comp.get(name) if comp else None

    out = []
    for rel in card.get("relations") or []:
        kind, tol = rel["kind"], float(rel.get("tolerance", 0.0))
        checks = []
        for ratio in [str(x) for x in (rel.get("ratios") or [rel.get("ratio")])]:
            m = metric(rel["method"], ratio, rel.get("metric"))
            if kind == "no_loss_vs_dense":
                d = metric("dense", ratio, rel["metric"])
                checks.append(None if None in (m, d) else (m - d, f"{rel['method']} - dense = {m - d:+.2f}", m - d >= -tol))
            elif kind == "below_dense_by":
                d = metric("dense", ratio, rel["metric"])
                checks.append(None if None in (m, d) else (d - m, f"dense - {rel['method']} = {d - m:+.2f} (claim <= {rel['by']})",
                                                           d - m <= rel["by"] + tol))
            elif kind == "above":
                o = metric(rel["other"], ratio, rel["metric"])
                checks.append(None if None in (m, o) else (m - o, f"{rel['method']} - {rel['other']} = {m - o:+.2f} at {ratio} (claim {rel['by']:+})",
                                                           m - o >= rel["by"] - tol))
            elif kind == "above_value":
                checks.append(None if m is None else (m - rel["value"], f"{rel['method']} - {rel['value']} = {m - rel['value']:+.2f} (claim {rel['by']:+})",
                                                      m - rel["value"] >= rel["by"] - tol))
            elif kind == "speedup":
                v = speed.get((rel["method"], ratio))
                s = sum(v) / len(v) if v else None
                checks.append(None if s is None else (s, f"measured speedup {s:.3f}x vs paper {rel['value']:.4g}x",
                                                      abs(s - rel["value"]) <= tol))
        uses_paper_value = kind == "above_value" or rel.get("other") in {m for m, _ in comparators}
        if any(c is None for c in checks) or not checks:
            status, text = "SKIPPED", "cells missing"
        elif uses_paper_value and not judged:
            status, text = "SKIPPED", "compares with a paper number: judged on the paper profile only"
        else:
            ok = all(c[2] for c in checks)
            status = ("PASS" if ok else "FAIL") if judged else "INFO"
            text = "; ".join(c[1] for c in checks)
        out.append({"kind": kind, "method": rel["method"], "status": status, "measured": text,
                    "source": rel.get("source", ""), "tolerance": tol})
    return out


def format_relations(checks) -> str:
    if not checks:
        return ""
    lines = ["Relations stated by the paper (INFO = measured on a profile the claims are not judged on):"]
    for c in checks:
        lines.append(f"  [{c['status']}] {c['kind']} ({c['method']}): {c['measured']} (tol {c['tolerance']}); "
                     f"source: {c['source']}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# differences to one method, with the seed noise (bench report --against METHOD)

# two-sided 95% Student t quantiles t(0.975, df) for df = 1..30 (scipy.stats.t.ppf when scipy is there)
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t975(df: float) -> float:
    """The 97.5% quantile of Student's t with `df` (non-integer: Welch) degrees of freedom."""
    try:
        from scipy.stats import t
        return float(t.ppf(0.975, df))
    except ImportError:
        pass
    if df >= 30:
        return 2.042 + (1.960 - 2.042) * min(1.0, (df - 30) / 90)
    lo = max(1, int(math.floor(df)))
    hi = min(30, lo + 1)
    w = df - lo
    return _T975[lo - 1] * (1 - w) + _T975[hi - 1] * w if df >= 1 else _T975[0]


def welch_ci(a, b) -> dict:
    """Difference of means a - b with its 95% Welch confidence interval (samples of the seeds). n < 2 on either
    side: no interval. Returns {diff, lo, hi, df, n_a, n_b}."""
    import numpy as np
    a, b = np.asarray(a, float), np.asarray(b, float)
    out = {"diff": float(a.mean() - b.mean()) if len(a) and len(b) else None, "lo": None, "hi": None,
           "df": None, "n_a": len(a), "n_b": len(b)}
    if len(a) < 2 or len(b) < 2 or out["diff"] is None:
        return out
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        out.update(lo=out["diff"], hi=out["diff"], df=float("inf"))
        return out
    df = (va + vb) ** 2 / ((va ** 2 / (len(a) - 1) if va else 0.0) + (vb ** 2 / (len(b) - 1) if vb else 0.0))
    half = t975(df) * se
    out.update(lo=out["diff"] - half, hi=out["diff"] + half, df=float(df))
    return out


def against_rows(card: dict, records, method: str) -> list[dict]:
    """For every cell (part, method, ratio) other than `method`'s own and every card metric: the difference of
    its mean to `method`'s at the same ratio (and part), with the 95% Welch interval over the seeds and whether
    the interval holds 0 (a difference within the seed noise)."""
    import pandas as pd

    rows = [{"part": r.get("part"), "method": r["method"], "ratio_label": str(r["ratio_label"]),
             "ratio_p": r.get("ratio_p"), "seed": r.get("seed"), "metric": k, "value": _num(v)}
            for r in records if r and r.get("status") != "error" for k, v in (r.get("metrics") or {}).items()
            if _num(v) is not None]
    if not rows:
        return []
    df = pd.DataFrame(rows)
    df["part"] = df["part"].fillna("")
    names = [m["name"] for m in card_metrics(card)] or list(dict.fromkeys(df["metric"]))
    df = df[df["metric"].isin(names)]
    keys = ["part", "ratio_label", "metric"]
    base = df[df["method"] == method].groupby(keys)["value"].apply(list).rename("base")
    cells = df[df["method"] != method].groupby(keys + ["method"]).agg(
        values=("value", list), ratio_p=("ratio_p", "first")).reset_index().join(base, on=keys)
    hib = {m["name"]: m.get("higher_is_better", True) for m in card_metrics(card)}
    out = []
    for _, c in cells.iterrows():
        if not isinstance(c["base"], list):
            continue
        ci = welch_ci(c["values"], c["base"])
        out.append({"part": c["part"] or None, "method": c["method"], "ratio_label": c["ratio_label"],
                    "ratio_p": c["ratio_p"], "metric": c["metric"], "higher_is_better": hib.get(c["metric"], True),
                    **ci, "noise": None if ci["lo"] is None else ci["lo"] <= 0 <= ci["hi"]})
    order = _card_order(card)
    out.sort(key=lambda r: (order({"profile": "", **r}), names.index(r["metric"]) if r["metric"] in names else 99))
    return out


def render_against(card: dict, records, method: str, fmt: str = "terminal") -> str:
    """The `report --against METHOD` table: one row per cell, one column per metric: the difference to METHOD at
    the same ratio "+1.23 [-0.40, +2.86]" (95% Welch interval over the seeds), "~" when the interval holds 0."""
    rows = against_rows(card, records, method)
    if not rows:
        return f"No cell shares a ratio with {method} (or no finished records of {method}).\n"
    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    parts = any(r["part"] for r in rows)
    cells: dict = {}
    for r in rows:
        cells.setdefault((r["part"], r["method"], r["ratio_label"]), {})[r["metric"]] = r
    header = (["Part"] if parts else []) + ["Method", "Ratio"] + [f"{m} - {method}" for m in metrics] + ["seeds (n)"]
    body = []
    for (part, meth, label), by_metric in cells.items():
        row = ([part or ""] if parts else []) + [str(meth), str(label)]
        ns = None
        for m in metrics:
            r = by_metric.get(m)
            if r is None or r["diff"] is None:
                row.append("-")
                continue
            d = _metric_decimals(card, m)
            s = f"{r['diff']:+.{d}f}"
            if r["lo"] is not None:
                s += f" [{r['lo']:+.{d}f}, {r['hi']:+.{d}f}]" + (" ~" if r["noise"] else "")
            else:
                s += " (one seed: no interval)"
            row.append(s)
            ns = f"{r['n_a']} vs {r['n_b']}"
        body.append(row + [ns or "-"])
    lines = ([f"Differences to {method} at the same ratio (mean over seeds), with the 95% Welch confidence interval "
              f"over the seeds; ~: the interval holds 0 (the difference is within the seed noise)"])
    lines += _md_table(header, body) if fmt == "md" else _aligned(header, body)
    return "\n".join(lines) + "\n"
