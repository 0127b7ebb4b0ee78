"""The card schema: every bad input is one line naming its path and the fix, exit code 2, no traceback,
nothing written; a user's own profile runs; shipped cards validate."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from bench.cards import load_card, parse_card, table_names, validate_card
from bench.cli import main
from bench.errors import BenchError


def _write(cards: Path, card: dict) -> str:
    card = {k: v for k, v in card.items() if k != "_path"}
    (cards / f"{card['table']}.yaml").write_text(yaml.safe_dump(card, sort_keys=False))
    return card["table"]


def _copy(name: str, new: str) -> dict:
    card = copy.deepcopy(load_card(name))
    card["table"] = new
    return card


def _fails(capsys, argv, *needles, out_dir=None):
    """The command exits 2 with one 'error:' line (no traceback) that contains every needle."""
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]
    if out_dir is not None:
        assert not Path(out_dir).exists() or not any(Path(out_dir).rglob("*.json"))
    return lines[0]


def test_every_shipped_card_validates_under_the_strict_schema():
    for name in table_names():
        assert validate_card(load_card(name)) == [], name


@pytest.mark.parametrize("where, key, value, needles", [
    (("profiles", "paper", "finetune"), "mixupp", 0.8, ["profiles.paper.finetune.mixupp", "did you mean mixup"]),
    (("profiles", "micro", "finetune"), "lr", "1e-3", ["profiles.micro.finetune.lr", "1.0e-3"]),
    (("profiles", "micro", "finetune"), "epochs", "two", ["profiles.micro.finetune.epochs", "number"]),
    (("profiles", "micro", "finetune"), "epochs", -1, ["profiles.micro.finetune.epochs", "greater than or equal to 0"]),
    (("profiles", "micro", "finetune"), "batch_size", 0, ["profiles.micro.finetune.batch_size", "greater than or equal to 1"]),
    (("profiles", "micro", "dense"), "warmup_epoch", 1, ["profiles.micro.dense.warmup_epoch", "did you mean warmup_epochs"]),
    (("method_options", "somp"), "nrom", "l1", ["method_options.somp.nrom", "did you mean norm"]),
    (("method_options", "somp"), "norm", "l3", ["method_options.somp.norm"]),
    (("profiles", "micro"), "finetun", {}, ["profiles.micro.finetun", "did you mean finetune"]),
    ((), "ratio_basis", "all", ["ratio_basis"]),
])
def test_a_bad_key_or_value_is_one_line_naming_its_path(own_cards, capsys, tmp_path, where, key, value, needles):
    card = _copy("upop_deit", "bad_card")
    block = card
    for w in where:
        block = block[w]
    block[key] = value
    name = _write(own_cards, card)
    # `run` refuses it before anything runs or is written
    _fails(capsys, ["run", "--table", name, "--methods", "dense"], *needles, out_dir=tmp_path / "out")


def test_validate_lists_every_problem_with_its_path(own_cards, capsys):
    card = _copy("upop_deit", "two_bad")
    card["profiles"]["micro"]["finetune"]["lr"] = "1e-3"
    card["ratios"][0]["p"] = 1.5
    card["method_options"]["somp"]["nrom"] = "l1"    # a plugin block's problem is listed in the same pass
    name = _write(own_cards, card)
    assert main(["validate", "--table", name]) == 1
    out = capsys.readouterr().out
    assert "two_bad: INVALID (3 problems)" in out
    assert "profiles.micro.finetune.lr" in out and "ratios[0].p" in out and "method_options.somp.nrom" in out


def test_upop_without_its_sparsity_weights_is_refused(own_cards, capsys):
    card = _copy("upop_deit", "no_wsp")
    del card["profiles"]["micro"]["upop"]["w_sp_attn"]
    name = _write(own_cards, card)
    _fails(capsys, ["run", "--table", name, "--methods", "upop"], "profiles.micro.upop.w_sp_attn", "missing")


def test_a_recipe_key_the_task_does_not_implement_is_refused(own_cards, capsys):
    card = _copy("upop_nlvr2", "nlvr2_mixup")
    card["profiles"]["micro"]["finetune"]["mixup"] = 0.8
    name = _write(own_cards, card)
    _fails(capsys, ["run", "--table", name], "profiles.micro.finetune.mixup", "nlvr2 does not implement")


@pytest.mark.parametrize("seeds", ["a", "1.5", "0-2"])
def test_bad_seeds_are_one_line(capsys, seeds, tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_OUTPUT", str(tmp_path / "out"))
    _fails(capsys, ["run", "--table", "upop_deit", "--seeds", seeds], "--seeds", repr(seeds), out_dir=tmp_path / "out")


def test_a_card_that_is_not_utf8_is_one_line(own_cards, capsys):
    (own_cards / "latin1.yaml").write_bytes("table: latin1\ntitle: \"Caf\xe9\"\n".encode("latin-1"))
    _fails(capsys, ["validate", "--table", "latin1"], "latin1.yaml", "not UTF-8")


def test_data_root_with_a_synthetic_profile_is_refused(capsys, tmp_path):
    _fails(capsys, ["run", "--table", "upop_deit", "--data-root", str(tmp_path)], "--data-root", "synthetic")


def test_flops_and_speed_of_any_family_without_a_card(capsys):
    assert main(["flops", "--model", "bert_base_uncased"]) == 0
    assert "bert_base_uncased: params 109.48 M" in capsys.readouterr().out
    _fails(capsys, ["flops", "--model", "blip_nlvr2"], "blip_nlvr2", "--table", "upop_nlvr2")
    assert main(["speed", "--model", "gpt2_micro", "--iters", "1", "--trials", "1", "--batch-size", "2"]) == 0
    assert "measured speedup" in capsys.readouterr().out


def test_a_card_without_micro_profile_or_references_validates():
    card = _copy("upop_deit", "only_paper")
    card["_path"] = "only_paper.yaml"
    del card["profiles"]["micro"]
    del card["references"]
    assert validate_card(card) == []
    parsed = parse_card(card)
    assert parsed.references is None and list(parsed.profiles) == ["paper"]


def test_a_profile_without_any_dense_model_source_is_refused():
    card = _copy("upop_deit", "no_dense")
    card["_path"] = "no_dense.yaml"
    del card["profiles"]["micro"]["dense"]
    errs = validate_card(card)
    assert any(e.startswith("profiles.micro: no dense model") for e in errs), errs


def test_references_must_name_a_profile_of_the_card():
    card = _copy("upop_deit", "ref_profile")
    card["_path"] = "ref_profile.yaml"
    card["references"]["profile"] = "papr"
    assert any("references.profile" in e for e in validate_card(card))


def test_parse_card_raises_one_bench_error_listing_all():
    card = _copy("upop_deit", "x")
    card["_path"] = "x.yaml"
    card["version"] = "2"
    with pytest.raises(BenchError, match="version"):
        parse_card(card)


def test_ls_and_validate_print_the_declared_options(capsys):
    assert main(["ls", "methods", "upop*", "--options"]) == 0
    out = capsys.readouterr().out
    assert "upop_unified" in out and "somp" not in out
    assert "w_sp_attn" in out and "threshold_rule" in out
    assert main(["ls", "recipe"]) == 0
    out = capsys.readouterr().out
    for key in ("mixup", "cutmix", "label_smoothing", "auto_augment", "reprob", "drop_path", "clip_grad",
                "optimizer", "schedule_unit", "weight_decay_groups"):
        assert f"  {key} " in out, key
    assert main(["validate", "--table", "upop_deit", "--options"]) == 0
    assert "method_options.somp" in capsys.readouterr().out


@pytest.mark.parametrize("data, needles", [
    ({"num_classes": 12}, ["12 classes", "10 outputs", "model_config.num_classes: 12"]),
    ({"image_size": 48}, ["48x48 image does not fit the model", "data.image_size"]),
])
def test_data_that_does_not_fit_the_model_is_refused_before_any_cell(own_cards, capsys, tmp_path, data, needles):
    card = _copy("upop_deit", "misfit")
    card["profiles"]["micro"]["data"] = {"train_per_class": 4, "val_per_class": 2, **data}
    name = _write(own_cards, card)
    _fails(capsys, ["run", "--table", name, "--methods", "dense"], *needles, out_dir=tmp_path / "out")


def test_the_documented_key_lists_are_generated_from_the_current_schema():
    """README.md and docs/card_keys.md hold `python -m bench keys` output: rerun `bench keys --write` after a change."""
    from bench import keys_doc
    for rel, with_plugins in keys_doc.DOC_FILES.items():
        path = keys_doc.ROOT / rel
        assert path.read_text() == keys_doc.rendered(path, with_plugins), f"{rel} is stale: run python -m bench keys --write"


def test_the_readme_example_card_validates(own_cards):
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    text = readme.split("# ~/cards/my_flowers.yaml\n", 1)[1].split("```", 1)[0]
    (own_cards / "my_flowers.yaml").write_text(text)
    assert validate_card(load_card("my_flowers")) == []
    card = parse_card(load_card("my_flowers"))
    assert card.profiles["mine"].source("mine") == "folder" and card.references is None
