"""Every method and every task declares its option blocks as typed, strict, documented OptionsModels, and every
key the shipped cards set in those blocks parses with the matching class (and survives the runner's
to_dict -> parse round trip)."""
from pathlib import Path

import pytest
import torch
import yaml

import bench
from bench.api import CellContext, NoOptions, RatioSpec
from bench.errors import BenchError
from bench.options import OptionsModel, parse_block
from bench.registry import METHODS, TASKS

CARDS = sorted((Path(bench.__file__).parent / "tables").glob("*.yaml"))


def _undocumented(cls) -> list:
    return [name for name, f in cls.model_fields.items() if not (f.description or "").strip()]


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_declares_typed_documented_blocks(name):
    M = METHODS.get(name)
    for attr in ("Options", "Settings"):
        cls = getattr(M, attr)
        assert isinstance(cls, type) and issubclass(cls, OptionsModel), f"{name}.{attr}"
        assert cls.model_config["extra"] == "forbid" and cls.model_config["strict"], f"{name}.{attr}"
        assert not _undocumented(cls), f"{name}.{attr}: fields without a description: {_undocumented(cls)}"
    if name != "dense":
        assert M.Options is not NoOptions, f"{name} declares no Options"


@pytest.mark.parametrize("name", TASKS.names())
def test_every_task_declares_a_typed_documented_data_block(name):
    T = TASKS.get(name)
    assert T.Data is not NoOptions, f"task {name} declares no Data block"
    assert issubclass(T.Data, OptionsModel)
    assert not _undocumented(T.Data), f"{name}.Data: fields without a description: {_undocumented(T.Data)}"


def _roundtrip(cls, data, where):
    block = parse_block(cls, data, where)
    again = parse_block(cls, block.to_dict(), where)      # the runner stores to_dict() and parses it back
    assert again == block, where
    return block


@pytest.mark.parametrize("card", CARDS, ids=lambda p: p.stem)
def test_shipped_card_blocks_parse(card):
    c = yaml.safe_load(card.read_text())
    methods = c["methods"]
    for m, opts in (c.get("method_options") or {}).items():
        _roundtrip(METHODS.get(m).Options, opts, f"{card.stem}: method_options.{m}")
    for pname, prof in c["profiles"].items():
        # settings blocks: profile keys named like a method of the card or its settings_key (a method without a
        # Settings block has none: `dense:` is the profile's dense-training recipe, not the dense method's)
        settings_of = {METHODS.get(m).settings_key or m: m for m in methods if METHODS.get(m).Settings is not NoOptions}
        for key, m in settings_of.items():
            cls = METHODS.get(m).Settings
            if key in prof:
                _roundtrip(cls, prof[key], f"{card.stem}: profiles.{pname}.{key}")
            else:
                required = [f for f, fi in cls.model_fields.items() if fi.is_required()]
                assert not required, f"{card.stem}: profiles.{pname} has no {key} block ({m} needs {required})"
        for t in prof.get("tasks") or c.get("tasks") or [c["task"]]:
            _roundtrip(TASKS.get(t).Data, prof.get("data"), f"{card.stem}: profiles.{pname}.data ({t})")


def test_unknown_option_says_did_you_mean():
    with pytest.raises(BenchError, match="did you mean norm"):
        parse_block(METHODS.get("somp").Options, {"nrom": "l1"}, "method_options.somp")
    with pytest.raises(BenchError, match=r"method_options\.somp\.norm: input should be 'l1' or 'l2'"):
        parse_block(METHODS.get("somp").Options, {"norm": "l3"}, "method_options.somp")


def _ctx(options, method_settings):
    return CellContext(model=None, adapter=None, structure=None, task=None, ratio=RatioSpec("x", 0.5),
                       options=options, settings={"finetune": None, "method": method_settings},
                       device=torch.device("cpu"), seed=0, train=None)


def test_upop_sparsity_weights_are_required():
    s = {"search_epochs": 1.0, "lr": 1.0e-3, "batch_size": 8, "interval": 10, "w_sp_mlp": 2.0e-4}
    with pytest.raises(BenchError, match=r"upop\.w_sp_attn: missing \(required\)"):
        parse_block(METHODS.get("upop").Settings, s, "upop")
    # a hand-built context with plain dicts goes through the same check before the method does anything
    for name in ("upop", "upop_unified", "upop_uniform"):
        with pytest.raises(BenchError, match="w_sp_attn"):
            METHODS.get(name)().typed_blocks(_ctx({}, s))


def test_typed_blocks_pass_typed_objects_through_and_parse_dicts():
    M = METHODS.get("sgmp")
    o, s = M.Options(norm="l1"), M.Settings(prune_events=3)
    ctx = _ctx(o, s)
    assert M().typed_blocks(ctx) == (o, s, None) and ctx.options is o
    ctx = _ctx({"allocation": "gohsp"}, {"prune_events": 3})
    o2, s2, _ = M().typed_blocks(ctx)
    assert o2.allocation == "gohsp" and o2.norm == "l2" and s2.prune_events == 3 and ctx.settings["method"] is s2


def test_upop_interval_mapping_keys():
    from methods.upop import interval_for
    cls = METHODS.get("upop").Settings
    base = {"search_epochs": 1.0, "lr": 1.0e-3, "batch_size": 8, "w_sp_attn": 0.0, "w_sp_mlp": 0.0}
    s = _roundtrip(cls, {**base, "interval": {0.1: 1600, 0.2: 1000, "default": 800}}, "upop")
    assert interval_for(s.interval, 0.2) == 1000 and interval_for(s.interval, 0.5) == 800
    with pytest.raises(BenchError, match="no entry"):
        interval_for(_roundtrip(cls, {**base, "interval": {0.1: 6}}, "upop").interval, 0.3)
    with pytest.raises(BenchError, match="upop.interval"):
        parse_block(cls, {**base, "interval": {"often": 6}}, "upop")


def test_vtrans_profile_overrides_keep_their_option_types():
    cls = METHODS.get("vtrans").Settings
    s = _roundtrip(cls, {"epochs": 1, "batch_size": 4, "kl_factor": 1.0e-4, "kl_mult": {"head": 64}}, "vtrans")
    assert s.kl_factor == 1.0e-4 and s.kl_mult == {"head": 64.0} and s.subset is None
    with pytest.raises(BenchError, match=r"vtrans\.noise"):
        parse_block(cls, {"epochs": 1, "batch_size": 4, "noise": "loud"}, "vtrans")


def test_task_data_blocks_are_checked_and_read_by_attribute(tmp_path):
    T = TASKS.get("nlvr2")
    with pytest.raises(BenchError, match="data.image_sise: unknown key, did you mean image_size"):
        T({"image_sise": 32}, tmp_path, "paper", tmp_path)
    t = T({}, tmp_path, "paper", tmp_path)
    assert isinstance(t.settings, T.Data) and t.image_size == 384                  # the paper default
    assert T({}, tmp_path, "micro", tmp_path).image_size == 32                     # the micro default
    lm = TASKS.get("wikitext2_ppl")
    with pytest.raises(BenchError, match="data.preset"):
        lm({"preset": "gtpq"}, tmp_path, "paper", tmp_path)
    assert lm({"preset": "wanda"}, tmp_path, "paper", tmp_path).seq_len == 4096
