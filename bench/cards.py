"""Table cards: YAML files in bench/tables/, one per paper table, versioned.

A card names the task, the model, the methods and their options, the ratios (label, p, and what p
means), the metrics (split, higher_is_better), the measuring protocol, per-profile settings (model,
data, training budget) and the paper's reference rows with source and tolerance. `validate_card`
checks all of it without running anything.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import yaml

from bench.errors import BenchError, UnknownName
from bench.registry import METHODS, MODELS, TASKS

TABLES_DIR = Path(__file__).parent / "tables"
PROFILES = ("micro", "paper")
EXTRA_REFERENCE_KEYS = {"params_m", "gflops"}   # reference columns that are not task metrics
# relations a paper states without a number per cell, and the fields each needs (checked by
# bench.report.relation_checks): "no accuracy loss", "0.96% above SGMP", "26.57% faster"
RELATION_KINDS = {
    "no_loss_vs_dense": ("ratio", "metric", "tolerance"),
    "below_dense_by": ("ratio", "metric", "by", "tolerance"),
    "above": ("other", "ratios", "metric", "by", "tolerance"),
    "above_value": ("ratio", "metric", "value", "by", "tolerance"),
    "speedup": ("ratio", "value", "tolerance"),
}


def table_dirs() -> list:
    """bench/tables/ plus the folders in BENCH_TABLES (os.pathsep-separated) for one's own cards."""
    extra = [Path(p).expanduser() for p in os.environ.get("BENCH_TABLES", "").split(os.pathsep) if p]
    return [TABLES_DIR] + extra


def table_names() -> list:
    return sorted({p.stem for d in table_dirs() for p in d.glob("*.yaml")})


def card_path(name: str) -> Path:
    for d in table_dirs():
        path = d / f"{name}.yaml"
        if path.is_file():
            return path
    raise UnknownName("table", name, table_names())


def load_card(name: str) -> dict:
    path = card_path(name)
    try:
        card = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise BenchError(f"table card {path} is not valid YAML: {e}")
    if not isinstance(card, dict):
        raise BenchError(f"table card {path} must be a mapping")
    card["_path"] = str(path)
    return card


def ratio_by_label(card: dict) -> dict:
    return {str(r["label"]): r for r in card.get("ratios", [])}


DENSE_RATIO = {"label": "1x", "p": 0.0}
REFERENCE_ROW_KEYS = ("method", "ratio", "source", "note", "part")   # the rest of a reference row are values


def validate_card(card: dict) -> list:
    """Every problem found, as sentences. Empty list = complete."""
    errs: list = []
    name = card.get("table", "?")

    def need(obj, key, where, typ=None):
        if not isinstance(obj, dict) or key not in obj or obj[key] in (None, "", []):
            errs.append(f"{where}: missing '{key}'")
            return None
        if typ and not isinstance(obj[key], typ):
            errs.append(f"{where}: '{key}' should be {typ.__name__ if isinstance(typ, type) else typ}")
            return None
        return obj[key]

    if name != Path(card.get("_path", f"{name}.yaml")).stem:
        errs.append(f"'table: {name}' does not match the file name {card.get('_path')}")
    need(card, "version", "card", int)
    need(card, "title", "card", str)
    need(card, "paper", "card", str)
    if "tasks" in card:   # multi-task card (e.g. the eight GLUE tasks); a profile may run a subset
        tasks = need(card, "tasks", "card", list) or []
        for pr in (card.get("profiles") or {}).values():
            sub = (pr or {}).get("tasks") if isinstance(pr, dict) else None
            if sub is not None and not (isinstance(sub, list) and set(sub) <= set(tasks)):
                errs.append(f"a profile's tasks {sub} must be a sub-list of the card's tasks {tasks}")
    else:
        tasks = [t for t in [need(card, "task", "card", str)] if t]
    for t in tasks:
        if t not in TASKS:
            errs.append(str(UnknownName("task", t, TASKS.names())))
    model = need(card, "model", "card", str)
    if model and model not in MODELS:
        errs.append(str(UnknownName("model", model, MODELS.names())))
    methods = need(card, "methods", "card", list) or []
    for m in methods:
        if m not in METHODS:
            errs.append(str(UnknownName("method", m, METHODS.names())))
    for m in (card.get("method_options") or {}):
        if m not in methods:
            errs.append(f"method_options names {m!r}, which is not in methods")
    need(card, "ratio_meaning", "card", str)
    ratios = need(card, "ratios", "card", list) or []
    labels = set()
    for i, r in enumerate(ratios):
        lab = need(r, "label", f"ratios[{i}]")
        p = need(r, "p", f"ratios[{i}]")
        if lab is not None:
            if str(lab) in labels:
                errs.append(f"ratios: label {lab} appears twice")
            labels.add(str(lab))
        if p is not None and not (isinstance(p, (int, float)) and 0 < p < 1):
            errs.append(f"ratios[{i}]: p must be a number in (0, 1), got {p!r}")
    metrics = need(card, "metrics", "card", list) or []
    metric_names = set()
    for i, m in enumerate(metrics):
        n = need(m, "name", f"metrics[{i}]")
        need(m, "split", f"metrics[{i}]")
        if not isinstance(m, dict) or not isinstance(m.get("higher_is_better"), bool):
            errs.append(f"metrics[{i}]: 'higher_is_better' must be true or false")
        if n:
            metric_names.add(n)
        mt = m.get("task") if isinstance(m, dict) else None
        if mt is not None and mt not in tasks:
            errs.append(f"metrics[{i}]: task {mt!r} is not one of the card's tasks {tasks}")
        for t in ([mt] if mt else tasks):
            if t in TASKS and n and n not in TASKS.get(t).metrics:
                errs.append(f"metrics[{i}]: task {t} does not compute {n!r} (it has {sorted(TASKS.get(t).metrics)}); "
                            "give the metric a 'task:' key if only some tasks compute it")
    for t in tasks:
        of_t = [m for m in metrics if isinstance(m, dict) and m.get("task", t) == t]
        if of_t and sum(bool(m.get("primary")) for m in of_t) != 1:
            errs.append(f"metrics: exactly one metric {'of ' + t + ' ' if len(tasks) > 1 else ''}must have 'primary: true'")
    need(card, "selection", "card", str)
    proto = need(card, "protocol", "card", dict) or {}
    fl = need(proto, "flops", "protocol", dict) or {}
    need(fl, "input", "protocol.flops")
    tp = need(proto, "throughput", "protocol", dict) or {}
    for k in ("batch_size", "warmup", "iters", "trials"):
        need(tp, k, "protocol.throughput", int)
    profiles = need(card, "profiles", "card", dict) or {}
    for prof in PROFILES:
        pr = need(profiles, prof, "profiles", dict)
        if not pr:
            continue
        arch = need(pr, "model", f"profiles.{prof}")
        for a in [arch] + list((pr.get("models") or {}).values()):
            if a and a not in MODELS:
                errs.append(str(UnknownName("model", a, MODELS.names())))
        for r in ratios:
            rm = r.get("model") if isinstance(r, dict) else None
            if rm and rm != model and rm not in (pr.get("models") or {}) and rm not in MODELS:
                errs.append(f"ratios: model {rm!r} has no architecture in profiles.{prof}.models")
        if not isinstance(pr.get("data"), dict):
            errs.append(f"profiles.{prof}: missing 'data' (a mapping, may be empty)")
        if any(METHODS.get(m).finetune for m in methods if m in METHODS):
            ft = need(pr, "finetune", f"profiles.{prof}", dict) or {}
            for k in ("epochs", "lr", "batch_size"):
                need(ft, k, f"profiles.{prof}.finetune")
        if prof == "micro":
            de = need(pr, "dense", "profiles.micro", dict) or {}
            for k in ("epochs", "lr", "batch_size"):
                need(de, k, "profiles.micro.dense")
        if prof == "paper" and not pr.get("checkpoints"):
            need(pr, "checkpoint", "profiles.paper")
    refs = need(card, "references", "card", dict) or {}
    if refs:
        src = need(refs, "source", "references", str)
        rprof = need(refs, "profile", "references")
        if rprof and rprof not in PROFILES:
            errs.append(f"references.profile must be one of {PROFILES}")
        tol = need(refs, "tolerance", "references", dict) or {}
        rows = refs.get("rows")
        if not isinstance(rows, list) or (not rows and not card.get("relations") and not refs.get("absent")):
            errs.append("references: missing 'rows' (may be empty only when the card has relations, or says why "
                        "the paper's numbers are absent in 'absent: <reason>')")
        for i, row in enumerate(rows or []):
            where = f"references.rows[{i}]"
            need(row, "method", where)
            lab = need(row, "ratio", where)
            if lab is not None and str(lab) not in labels | {"1x"}:
                errs.append(f"{where}: ratio {lab!r} is not a ratio label of this card")
            values = {k: v for k, v in row.items() if k not in REFERENCE_ROW_KEYS}
            if not values:
                errs.append(f"{where}: no reference values")
            for k, v in values.items():
                if k not in metric_names | EXTRA_REFERENCE_KEYS:
                    errs.append(f"{where}: {k!r} is neither a metric of the card nor one of {sorted(EXTRA_REFERENCE_KEYS)}")
                elif not isinstance(v, (int, float)) or not math.isfinite(v):
                    errs.append(f"{where}: {k} must be a number")
                elif k not in tol:
                    errs.append(f"{where}: no tolerance for {k!r} in references.tolerance")
            if not (row.get("source") or src):
                errs.append(f"{where}: no source")
        for k, v in tol.items():
            if not (isinstance(v, (int, float)) or (isinstance(v, str) and v.endswith("%"))):
                errs.append(f"references.tolerance.{k}: a number (absolute) or 'N%' (relative), got {v!r}")
    if card.get("ratio_basis", "prunable") not in ("prunable", "total"):
        errs.append("ratio_basis must be 'prunable' (default) or 'total'")
    comparators = {c.get("method") for c in card.get("comparators") or []}
    for i, rel in enumerate(card.get("relations") or []):
        where = f"relations[{i}]"
        kind = need(rel, "kind", where)
        if kind and kind not in RELATION_KINDS:
            errs.append(f"{where}: kind {kind!r} is not one of {sorted(RELATION_KINDS)}")
        need(rel, "source", where)
        if rel.get("method") not in methods:
            errs.append(f"{where}: method {rel.get('method')!r} is not run by this card")
        if rel.get("other") is not None and rel["other"] not in set(methods) | comparators:
            errs.append(f"{where}: other {rel['other']!r} is neither run by this card nor a comparator")
        for lab in rel.get("ratios") or [rel.get("ratio")]:
            if str(lab) not in labels:
                errs.append(f"{where}: ratio {lab!r} is not a ratio label of this card")
        if kind != "speedup" and rel.get("metric") not in metric_names:
            errs.append(f"{where}: metric {rel.get('metric')!r} is not a metric of the card")
        for k in RELATION_KINDS.get(kind, ()):
            need(rel, k, where)
    return errs


def check_card(card: dict) -> dict:
    errs = validate_card(card)
    if errs:
        raise BenchError(f"table card {card.get('_path')} is incomplete:\n  - " + "\n  - ".join(errs))
    return card


def reference_row(card: dict, method: str, ratio_label: str, profile: str, part: str | None = None):
    refs = card.get("references") or {}
    if refs.get("profile") != profile:
        return None
    for row in refs.get("rows", []):
        if row["method"] == method and str(row["ratio"]) == str(ratio_label) and row.get("part") in (None, part):
            return row
    return None


def within(value: float, paper: float, tol) -> bool:
    if isinstance(tol, str) and tol.endswith("%"):
        return abs(value - paper) <= abs(paper) * float(tol[:-1]) / 100
    return abs(value - paper) <= float(tol) + 1e-9
