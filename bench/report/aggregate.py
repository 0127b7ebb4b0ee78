"""Reporting: aggregation of cell records into cells and leaderboard rows; the card helpers; `--against`.

Aggregation: the records of one (table, profile, method, ratio_label) are one *cell*; its seeds are
averaged (mean, sample standard deviation, seed list). The dense values (metric_dense, gmacs_dense,
the throughput of speedup_measured) come from the records with method "dense" of the same table and
profile. A record whose cell crashed (status "error") counts in the seed list and makes the status
"error"; its missing numbers are left out of the means.

`against_rows` gives, for `bench report --against METHOD`, each cell's difference to METHOD with the 95% Welch
interval over the seeds (`welch_ci`, `t975`). The number formatting shared with the tables is here too (the
failure reasons of a cell use it).
"""
from __future__ import annotations

import math
import statistics
from collections import Counter

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
DEFAULT_METRIC_TOLERANCE = 0.5
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
# leaderboard rows (written as CSV by bench.report.render)
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
# ---------------------------------------------------------------------------------------------
# number formatting (also used by the tables of bench.report.render)
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
