"""Judging a cell: one place for every rule that sets a record's status.

- `judge_cell`: a fresh record's invariants (finite metrics; the ratio reached within one unit per kind, or
  within the method's own `ratio_check` when its ratio is not a fraction of params), then its reference.
- `judge_reference`: the card's reference row and tolerances, applied again to every reused record, so an
  edited reference or tolerance applies to old records too.
- `relation_checks`: the paper's relations (claims without a number per cell: "no accuracy loss", "0.96%
  above SGMP", "26.57% faster"), judged PASS/FAIL on the reference profile, shown as INFO elsewhere.
- `apply_relations`: a relation the card marks `checked: true` that FAILs fails the cells it is about (on the
  reference profile only); the others are reported next to the table and never change a status.
"""
from __future__ import annotations

import math

from bench.cards import REFERENCE_ROW_KEYS, within
from bench.records import Check, Record, Reference


def judge_cell(cfg, record: Record, structure, card) -> None:
    """A fresh record's status: invariants first (finite metrics, ratio reached within one unit), then the
    card's reference (`judge_reference`)."""
    problems = []
    for k, v in record.metrics.items():
        if v is None or not math.isfinite(v):
            problems.append(f"metric {k} is {v}")
    rc = record.method_info.get("ratio_check")
    if rc:   # the method's ratio is not a fraction of params (e.g. UPop's official 36-per-attention-unit weights)
        if abs(rc["achieved"] - rc["target"]) > rc["tolerance"]:
            problems.append(f"removed {rc['achieved']:.6g} {rc['unit']}, target {rc['target']:.6g} "
                            f"(off by more than {rc['tolerance']:.6g})")
    elif cfg["method"] != "dense":
        one_unit = max((g.params_per_unit for g in structure), default=0) * max(1, len(structure.kinds()))
        gap = abs(record.params.removed - record.params.target_removed)
        if gap > one_unit:
            problems.append(f"removed {record.params.removed} params, target {record.params.target_removed} "
                            f"(off by {gap} > one unit per kind = {one_unit})")
    record.problems = problems   # kept, so that a reused record can be judged again (judge_reference)
    judge_reference(record, card)


def judge_reference(record: Record, card) -> bool:
    """Set the record's reference checks and status from its invariant problems (`record.problems`) and the
    card's current references and tolerances; a reused record is judged again this way, so an edited reference
    or tolerance applies to it. An error record is left alone. Returns whether the status or the checks changed."""
    if record.status == "error" or record.params is None or record.flops is None:
        return False
    cfg = record.config
    before = (record.status, record.reason, record.reference)
    ref = card.reference_row(cfg["method"], cfg["ratio"]["label"], cfg["profile"], cfg.get("part"))
    checks = []
    reference = None
    if ref:
        tol = card.references.tolerance
        got = {**record.metrics, "params_m": record.params.total / 1e6, "gflops": record.flops.macs / 1e9}
        for k, paper in ref.items():
            if k in REFERENCE_ROW_KEYS:
                continue
            checks.append(Check(name=k, value=got[k], paper=paper, tolerance=tol[k], ok=within(got[k], paper, tol[k])))
        reference = Reference(values={k: v for k, v in ref.items() if k not in REFERENCE_ROW_KEYS},
                              source=ref.get("source") or card.references.source, tolerance=tol, checks=checks)
    record.reference = reference
    bad = [c for c in checks if not c.ok]
    if record.problems or bad:
        record.status = "fail"
        record.reason = "; ".join(record.problems + [f"{c.name} {c.value:.4g} vs paper {c.paper} (tol {c.tolerance})"
                                                     for c in bad])
    else:
        record.status, record.reason = ("pass" if checks else "no_ref"), None
    return (record.status, record.reason, record.reference) != before


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


def apply_relations(card: dict, records) -> list:
    """Judge the card's relations on `records` and fail, in place, the records of every `checked` relation
    that FAILs (its method's cells at its ratios), the relation named in their reason. Returns the checks."""
    checks = relation_checks(card, records)
    for rel, check in zip(card.get("relations") or [], checks):
        if not rel.get("checked") or check["status"] != "FAIL":
            continue
        ratios = {str(x) for x in (rel.get("ratios") or [rel.get("ratio")])}
        why = f"relation {rel['kind']} ({rel['method']}) does not hold: {check['measured']}"
        for r in records:
            if r.get("method") == rel["method"] and str(r.get("ratio_label")) in ratios and r.get("status") != "error":
                r["status"] = "fail"
                r["reason"] = "; ".join(x for x in (r.get("reason"), why) if x)
    return checks
