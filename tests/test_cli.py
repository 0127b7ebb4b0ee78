"""The CLI: listing, card validation, clear errors (exit 2, "did you mean") for bad names and missing data."""
import copy

import pytest

from bench.cards import load_card, validate_card
from bench.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_ls(capsys):
    code, out, _ = run(capsys, "ls", "tables")
    assert code == 0 and "upop_deit" in out
    assert "somp" in run(capsys, "ls", "methods")[1]
    assert "deit_small_patch16_224" in run(capsys, "ls", "models")[1]
    assert "imagenet" in run(capsys, "ls", "tasks")[1]


@pytest.mark.parametrize("argv,needle", [
    (["run", "--table", "upop_deitt"], "did you mean 'upop_deit'"),
    (["validate", "--table", "upop_dei"], "did you mean 'upop_deit'"),
    (["report", "--table", "nope_table"], "unknown table 'nope_table'"),
    (["run", "--table", "upop_deit", "--methods", "dense,sommp"], "did you mean 'somp'"),
    (["run", "--table", "upop_deit", "--ratios", "2.0x"], "unknown ratio '2.0x'"),
    (["run", "--table", "upop_deit", "--profile", "papr"], "did you mean 'paper'"),
    (["flops", "--model", "deit_smal_patch16_224"], "did you mean 'deit_small_patch16_224'"),
    (["ls", "tabels"], "did you mean 'tables'"),
    (["rnu"], "did you mean 'run'"),
    (["run", "--table", "upop_deit", "--micro-batch", "0"], "--micro-batch '0': give a whole number >= 1"),
    (["run", "--table", "upop_deit", "--micro-batch", "half"], "or auto"),
])
def test_unknown_names_exit_2(capsys, argv, needle):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert needle.lower() in err.lower()
    assert "Traceback" not in err


def test_validate_the_shipped_cards(capsys):
    code, out, _ = run(capsys, "validate")
    assert code == 0, out
    assert "upop_deit: ok" in out


def test_validate_catches_incomplete_cards():
    card = load_card("upop_deit")
    assert validate_card(card) == []
    # structural problems (types, ranges, required keys) are found first, each with its path
    bad = copy.deepcopy(card)
    bad["ratios"][0]["p"] = 1.5
    del bad["metrics"][0]["higher_is_better"]
    errs = "\n".join(validate_card(bad))
    for needle in ["ratios[0].p: input should be less than 1, got 1.5", "metrics[0].higher_is_better: missing"]:
        assert needle in errs, errs
    # then everything that needs the registry and the rest of the card
    bad = copy.deepcopy(card)
    del bad["references"]["rows"][1]["top1"]
    bad["references"]["rows"][2]["top1"] = "high"
    del bad["references"]["tolerance"]["top5"]
    bad["methods"].append("magnitud")
    typo_at = len(bad["methods"]) - 1
    del bad["profiles"]["micro"]["finetune"]
    bad["references"]["rows"].append({"method": "upop", "ratio": "3x", "top1": 1.0})
    errs = "\n".join(validate_card(bad))
    for needle in ["references.rows[2].top1: must be a number", "no tolerance for 'top5'",
                   f"methods[{typo_at}]: unknown method 'magnitud'", "profiles.micro: missing finetune:",
                   "references.rows[6].ratio: '3x' is not a ratio label"]:
        assert needle in errs, errs


def test_paper_profile_without_data_is_a_clear_error(capsys, tmp_path):
    code, out, err = run(capsys, "run", "--table", "upop_deit", "--profile", "paper", "--data-root", str(tmp_path / "d"),
                         "--output", str(tmp_path / "out"))
    assert code == 2
    assert str(tmp_path / "d" / "imagenet") in err and "train/<wnid>" in err
    assert not (tmp_path / "out").exists()    # nothing half-written


def test_paper_profile_without_checkpoint_is_a_clear_error(capsys, tmp_path):
    from tasks.imagenet import generate_micro
    generate_micro(tmp_path / "d" / "imagenet", num_classes=2, train_per_class=2, val_per_class=1, image_size=32, seed=0)
    code, out, err = run(capsys, "run", "--table", "upop_deit", "--profile", "paper", "--data-root", str(tmp_path / "d"),
                         "--checkpoints", str(tmp_path / "ck"), "--output", str(tmp_path / "out"))
    assert code == 2
    assert "deit_small_patch16_224-cd65a155.pth" in err and str(tmp_path / "ck") in err
    assert not (tmp_path / "out").exists()


def test_flops_of_paper_architectures(capsys):
    code, out, _ = run(capsys, "flops", "--model", "deit_small_patch16_224")
    assert code == 0 and "params 22.05 M" in out and "FLOPs 4.61 G" in out
    code, out, _ = run(capsys, "flops", "--table", "upop_deit", "--profile", "paper")
    assert code == 0 and "FLOPs 4.61 G" in out


def test_report_without_records_is_a_clear_error(capsys, tmp_path):
    code, _, err = run(capsys, "report", "--table", "upop_deit", "--output", str(tmp_path))
    assert code == 2 and "no records" in err and "bench run --table upop_deit" in err
