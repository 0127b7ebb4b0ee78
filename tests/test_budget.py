"""budget: matched: every method trains as long as the reference method (search + finetune), and the
random-units floor line of the table."""
import copy

import pytest

from bench.cards import load_card, parse_card, validate_card
from bench.errors import BenchError
from bench.report import floor_notes
from bench.runner import MATCHED_PART, expand_cells


def _deit(budgets, **extra):
    raw = copy.deepcopy(load_card("upop_deit"))
    raw["profiles"]["micro"]["budgets"] = budgets
    raw["profiles"]["micro"].update(extra)
    return raw


def test_matched_cells_get_the_reference_total():
    cells = expand_cells(parse_card(_deit(["paper", "matched"])), "micro", ratios="2.00x")
    by_id = {c["cell_id"]: c for c in cells}
    search = by_id["upop-2.00x-seed0"]["method_settings"]["search_epochs"]
    retrain = by_id["upop-2.00x-seed0"]["finetune"]["epochs"]
    for m in ("somp", "sgmp", "taylor", "random"):
        assert by_id[f"{m}-2.00x-seed0"]["finetune"]["epochs"] == retrain          # the paper's budget
        matched = by_id[f"{MATCHED_PART}-{m}-2.00x-seed0"]
        assert matched["finetune"]["epochs"] == search + retrain                    # UPop's search + retrain
        assert matched["part"] == MATCHED_PART and matched["budget"] == {"kind": "matched", "reference": "upop"}
    # UPop already has the matched budget: no second cell; the dense row is in both parts
    assert f"{MATCHED_PART}-upop-2.00x-seed0" not in by_id
    assert f"{MATCHED_PART}-dense-1x-seed0" in by_id


def test_paper_budget_cells_keep_their_hash():
    paper_only = {c["cell_id"]: c["hash"] for c in expand_cells(parse_card(_deit(["paper"])), "micro")}
    both = {c["cell_id"]: c["hash"] for c in expand_cells(parse_card(_deit(["paper", "matched"])), "micro")}
    assert all(both[k] == h for k, h in paper_only.items())
    assert len(both) > len(paper_only)


def test_budget_reference_must_be_a_method_of_the_card():
    errs = validate_card(_deit(["paper", "matched"], budget_reference="nope"))
    assert any("budget_reference: 'nope' is not in methods" in e for e in errs), errs


def test_reference_with_less_training_than_a_search_is_refused():
    # somp as the reference: 4 epochs in all. UPop's 4 search epochs fit (no retrain left); 6 do not
    cells = expand_cells(parse_card(_deit(["matched"], budget_reference="somp")), "micro", ratios="2.00x")
    assert {c["cell_id"]: c["finetune"]["epochs"] for c in cells if c["method"] == "upop"} == {
        f"{MATCHED_PART}-upop-2.00x-seed0": 0.0}
    raw = _deit(["matched"], budget_reference="somp")
    raw["profiles"]["micro"]["upop"]["search_epochs"] = 6
    with pytest.raises(BenchError, match="upop trains 6 epochs before its finetune at 2.00x, more than somp's total 4"):
        expand_cells(parse_card(raw), "micro", ratios="2.00x")


def _cell(method, value, epochs, ratio="2x", part="matched"):
    return {"method": method, "profile": "micro", "ratio_label": ratio, "part": part, "method_impl": "port",
            "train_epochs": epochs, "metrics": {"top1": {"value": value}}}


def test_floor_notes_name_rows_that_do_not_beat_random_at_the_same_training():
    card = {"metrics": [{"name": "top1", "split": "val", "higher_is_better": True, "primary": True}]}
    cells = [_cell("random", 60.0, 8.0), _cell("somp", 59.5, 8.0), _cell("taylor", 61.0, 8.0),
             _cell("sgmp", 50.0, 4.0)]          # other training: not compared
    notes = floor_notes(card, cells)
    assert len(notes) == 1 and notes[0].startswith("Floor: somp at 2x [matched] does not beat random units")
    assert "top1 59.5 vs 60.0" in notes[0] or "59.50 vs 60.00" in notes[0], notes
