"""bench/judge.py: the paper's relations judged on records, and a `checked` relation failing its cells."""
from __future__ import annotations

import copy

from bench.judge import apply_relations, relation_checks


def _card(checked: bool, profile: str = "paper") -> dict:
    return {"references": {"profile": profile},
            "relations": [{"kind": "no_loss_vs_dense", "method": "upop", "ratio": "2x", "metric": "acc",
                           "tolerance": 0.5, "source": "test", "checked": checked}]}


def _records(upop_acc: float, profile: str = "paper") -> list:
    base = {"profile": profile, "part": None, "status": "pass", "reason": None, "speed": {}}
    return [dict(base, method="dense", ratio_label="1x", metrics={"acc": 80.0}),
            dict(base, method="upop", ratio_label="2x", metrics={"acc": upop_acc}),
            dict(base, method="somp", ratio_label="2x", metrics={"acc": 70.0})]


def test_a_checked_relation_that_fails_fails_the_cells_it_is_about_and_only_those():
    recs = _records(79.0)                                   # 1.0 below dense, tolerance 0.5: FAIL
    [check] = apply_relations(_card(checked=True), recs)
    assert check["status"] == "FAIL"
    by = {r["method"]: r for r in recs}
    assert by["upop"]["status"] == "fail" and "relation no_loss_vs_dense (upop) does not hold" in by["upop"]["reason"]
    assert by["dense"]["status"] == "pass" and by["somp"]["status"] == "pass"


def test_unchecked_holding_or_other_profile_relations_leave_statuses_alone():
    for card, recs in ((_card(checked=False), _records(79.0)),            # FAIL, but only reported
                       (_card(checked=True), _records(79.7)),             # within tolerance: PASS
                       (_card(checked=True), _records(79.0, "micro"))):   # not the reference profile: INFO
        before = copy.deepcopy(recs)
        apply_relations(card, recs)
        assert recs == before
    assert relation_checks(_card(True), _records(79.7))[0]["status"] == "PASS"
    assert relation_checks(_card(True), _records(79.0, "micro"))[0]["status"] == "INFO"
