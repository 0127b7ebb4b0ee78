"""Cards with several parts: ratios that name their own model (GOHSP: DeiT-Tiny at 30%, DeiT-Small at 35/50%)
and cards that list several tasks (GLUE). Each part gets its own dense row and its own reference rows."""
import copy

import pytest

from bench.cards import load_card, reference_row, validate_card
from bench.report import relation_checks, render_table
from bench.runner import card_parts, expand_cells


def test_ratios_with_their_own_model_expand_to_one_dense_row_per_model():
    card = load_card("gohsp_imagenet")
    assert validate_card(card) == []
    micro = expand_cells(card, "micro")
    by_part = {}
    for c in micro:
        by_part.setdefault(c["part"], []).append(c)
    assert set(by_part) == {"deit_tiny_patch16_224", "deit_small_patch16_224"}
    tiny, small = by_part["deit_tiny_patch16_224"], by_part["deit_small_patch16_224"]
    assert {c["model"] for c in tiny} == {"vit_micro_tiny"} and {c["model"] for c in small} == {"vit_micro"}
    assert sorted((c["method"], c["ratio"]["label"]) for c in tiny) == [
        ("dense", "1x"), ("gohsp", "30%"), ("random", "30%"), ("sgmp", "30%"), ("somp", "30%"), ("taylor", "30%")]
    assert sum(c["method"] == "dense" for c in small) == 1 and len(small) == 11     # 1 + 2 ratios x 5 methods
    assert len({c["cell_id"] for c in micro}) == len(micro) == 17
    assert len({c["hash"] for c in micro}) == 17
    paper = {c["cell_id"]: c for c in expand_cells(card, "paper", methods="dense")}
    assert paper["deit_tiny_patch16_224-dense-1x-seed0"]["checkpoint"] == "deit_tiny_patch16_224-a1311bcf.pth"
    assert paper["deit_small_patch16_224-dense-1x-seed0"]["checkpoint"] == "deit_small_patch16_224-cd65a155.pth"
    # the dense reference of each model is found by its part
    assert reference_row(card, "dense", "1x", "paper", "deit_tiny_patch16_224")["top1"] == 72.2
    assert reference_row(card, "dense", "1x", "paper", "deit_small_patch16_224")["top1"] == 79.85


def test_single_part_cards_keep_their_hashes():
    """No `part` key for ordinary cards, so the records of earlier runs stay valid; only the matched-budget cells
    (upop_deit micro runs budgets paper and matched) are a part of their own."""
    cells = expand_cells(load_card("upop_deit"), "micro")
    assert all("part" not in c for c in cells if "budget" not in c)
    assert {c["part"] for c in cells if "budget" in c} == {"matched"}
    assert [c["cell_id"] for c in cells][:2] == ["dense-1x-seed0", "upop-1.11x-seed0"]


def _two_task_card():
    card = copy.deepcopy(load_card("upop_deit"))
    card.pop("task")
    card["tasks"] = ["imagenet", "cifar10"]
    card["profiles"]["micro"].pop("budgets", None)
    card["profiles"]["micro"]["data"] = {}    # one data block for both tasks: only keys both know (the defaults)
    card["metrics"] = [{"name": "top1", "split": "val", "higher_is_better": True, "primary": True},
                       {"name": "top5", "split": "val", "higher_is_better": True, "task": "imagenet"}]
    return card


def test_multi_task_card_expands_over_tasks_with_their_own_metrics():
    card = _two_task_card()
    errs = validate_card(card)
    assert not [e for e in errs if "task" in e], errs
    parts = card_parts(card, "micro")
    assert [p["part"] for p in parts] == ["imagenet", "cifar10"]
    cells = expand_cells(card, "micro", methods="dense,somp", ratios="2.00x")
    assert [(c["task"], c["cell_id"]) for c in cells] == [
        ("imagenet", "imagenet-dense-1x-seed0"), ("imagenet", "imagenet-somp-2.00x-seed0"),
        ("cifar10", "cifar10-dense-1x-seed0"), ("cifar10", "cifar10-somp-2.00x-seed0")]
    assert [m["name"] for m in cells[0]["metrics"]] == ["top1", "top5"]
    assert [m["name"] for m in cells[2]["metrics"]] == ["top1"]
    card["profiles"]["micro"]["tasks"] = ["cifar10"]          # a profile may run a subset
    assert [c["task"] for c in expand_cells(card, "micro", methods="dense")] == ["cifar10"]


@pytest.mark.parametrize("change, message", [
    (lambda c: c["metrics"][1].update(task="glue_sst2"), "is not one of the card's tasks"),
    (lambda c: c["profiles"]["micro"].update(tasks=["ade20k"]), "must be a sub-list"),
    (lambda c: c["metrics"][0].pop("primary"), "exactly one metric of imagenet"),
])
def test_multi_task_card_errors_name_the_problem(change, message):
    card = _two_task_card()
    change(card)
    assert any(message in e for e in validate_card(card)), validate_card(card)


def _record(method, label, part, top1, p=0.0):
    return {"table": "gohsp_imagenet", "profile": "micro", "status": "no_ref", "method": method,
            "method_impl": "reimpl" if method == "gohsp" else "dense", "ratio_label": label, "ratio_p": p,
            "part": part, "task": "imagenet", "seed": 0, "metrics": {"top1": top1, "top5": 99.0},
            "params": {"total": 1e5, "achieved_reduction": p}, "flops": {"macs": 1e7}}


def test_relations_and_table_use_the_dense_row_of_the_same_model():
    card = load_card("gohsp_imagenet")
    recs = [_record("dense", "1x", "deit_tiny_patch16_224", 60.0),
            _record("dense", "1x", "deit_small_patch16_224", 80.0),
            _record("gohsp", "30%", "deit_tiny_patch16_224", 59.0, 0.3),
            _record("gohsp", "35%", "deit_small_patch16_224", 81.0, 0.35),
            _record("gohsp", "50%", "deit_small_patch16_224", 79.5, 0.5)]
    checks = {c["kind"]: c for c in relation_checks(card, recs)}
    assert checks["no_loss_vs_dense"]["measured"] == "gohsp - dense = +1.00"       # 81.0 vs small's 80.0
    assert checks["below_dense_by"]["measured"].startswith("dense - gohsp = +0.50")
    table = render_table(card, recs)
    lines = [l for l in table.splitlines() if "gohsp (reimpl)" in l]
    assert lines[0].split()[0] == "deit_tiny_patch16_224" and "(-1.00)" in lines[0]   # vs the tiny dense
    assert "(+1.00)" in lines[1] and "(-0.50)" in lines[2]
