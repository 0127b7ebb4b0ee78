"""Every registered method's keep-masks at a fixed seed on a tiny model, pinned to golden values generated
from the code before the method toolkit (methods/_importance.py, _allocate.py, _schedule.py) replaced the
per-method selectors: a refactor of a method must leave its masks bit-identical.

Each case stores the sha256 of the concatenated bool masks (groups in name order, each name hashed with its
mask) and the kept units per kind. Regenerate (only for an intended change of a method's output):
    PIN_PRINT=1 .venv/bin/python -m pytest tests/test_keep_masks_pinned.py -q -s
and paste the printed table over GOLDEN. Single-threaded, so the trained cases do not depend on the
machine's core count."""
import functools
import hashlib
import os
from pathlib import Path

import pytest
import torch

from bench.api import CellContext, RatioSpec
from bench.options import parse_block
from bench.recipe import TrainRecipe
from bench.registry import METHODS, TASKS
from bench.training import train
from tests.conftest import build
from tests.test_methods import TinyTask


def digest(keep: dict) -> tuple:
    h = hashlib.sha256()
    per_kind: dict = {}
    for name in sorted(keep):
        m = keep[name].detach().cpu().bool().flatten()
        h.update(name.encode() + b"\0" + bytes(m.to(torch.uint8).tolist()))
        kind = name.rsplit(":", 1)[-1]
        per_kind[kind] = per_kind.get(kind, 0) + int(m.sum())
    return h.hexdigest()[:16], dict(sorted(per_kind.items()))


def _vision_ctx(method, p, options=None, settings=None, finetune_epochs=1.0):
    adapter, model = build("vit_micro")
    task = TinyTask()
    M = METHODS.get(method)
    return CellContext(model=model, adapter=adapter, structure=adapter.structure(model), task=task,
                       ratio=RatioSpec("x", p), options=parse_block(M.Options, options, f"method_options.{method}"),
                       settings={"finetune": TrainRecipe(epochs=finetune_epochs, lr=1e-3, batch_size=32),
                                 "method": parse_block(M.Settings, settings, M.settings_key or method)},
                       device=torch.device("cpu"), seed=0,
                       train=functools.partial(train, task=task, device="cpu", seed=0), log=lambda m: None)


UPOP = {"search_epochs": 1.0, "lr": 1e-3, "batch_size": 32, "interval": 3, "w_sp_attn": 4.8e-3, "w_sp_mlp": 2e-4}
GOHSP = {"admm_epochs": 1.0, "batch_size": 32, "lr": 1e-3, "rho0": 1.0, "rho_growth": 1.5, "calib_batches": 2,
         "calib_batch_size": 32}
SGMP = {"prune_start_epoch": 0, "prune_end_fraction": 0.5, "prune_events": 4}


def _lang_ctx(method, p, options=None, settings=None):
    task = TASKS.get("glue_sst2")({"train_size": 96, "dev_size": 16, "max_len": 16}, None, "micro",
                                  Path(os.environ["BENCH_CACHE"]))
    task.prepare()
    from tasks.glue import MICRO_VOCAB_SIZE
    adapter, model = build("bert_micro", vocab_size=MICRO_VOCAB_SIZE, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0)
    s = {"epochs": 1, "batch_size": 16, "lr": 1e-3, "kl_factor": 1e-4, "vib_lr": 0.1, "reg_lr": 0.1,
         "lagrangian_warmup": 0.5, **(settings or {})}
    M = METHODS.get(method)
    return CellContext(model=model, adapter=adapter, structure=adapter.structure(model), task=task,
                       ratio=RatioSpec("x", p), options=parse_block(M.Options, options, f"method_options.{method}"),
                       settings={"finetune": None, "method": parse_block(M.Settings, s, method)},
                       device=torch.device("cpu"), seed=0,
                       train=functools.partial(train, task=task, device="cpu", seed=0, adapter=adapter),
                       log=lambda m: None)


# case id -> (method, context factory)
CASES = {
    "dense": ("dense", lambda: _vision_ctx("dense", 0.0)),
    "somp-per_type": ("somp", lambda: _vision_ctx("somp", 0.3, {"unit_kinds": ["head_dim", "ffn"]})),
    "somp-per_layer-l1": ("somp", lambda: _vision_ctx("somp", 0.3, {"unit_kinds": ["head_dim", "ffn"],
                                                                     "allocation": "per_layer", "norm": "l1"})),
    "somp-global": ("somp", lambda: _vision_ctx("somp", 0.4, {"unit_kinds": ["head", "ffn"],
                                                               "allocation": "global"})),
    "somp-gohsp": ("somp", lambda: _vision_ctx("somp", 0.4, {"unit_kinds": ["head", "head_dim", "ffn"],
                                                              "allocation": "gohsp"})),
    "somp-gohsp-global-per_layer": ("somp", lambda: _vision_ctx(
        "somp", 0.5, {"unit_kinds": ["head", "ffn"], "allocation": "gohsp", "head_budget": "global",
                      "ffn_budget": "per_layer"})),
    "sgmp-per_type": ("sgmp", lambda: _vision_ctx("sgmp", 0.4, {"unit_kinds": ["head_dim", "ffn"]}, SGMP)),
    "sgmp-gohsp": ("sgmp", lambda: _vision_ctx("sgmp", 0.4, {"unit_kinds": ["head", "head_dim", "ffn"],
                                                              "allocation": "gohsp", "head_budget": "global"}, SGMP)),
    "upop": ("upop", lambda: _vision_ctx("upop", 0.5, None, UPOP)),
    "upop-closest-official_36": ("upop", lambda: _vision_ctx("upop", 0.4, {"threshold_rule": "closest",
                                                                           "weights": "official_36"}, UPOP)),
    "upop-single_step-total": ("upop", lambda: _vision_ctx("upop", 0.3, {"importance": "single_step",
                                                                         "ratio_basis": "total",
                                                                         "weights": "exact_int",
                                                                         "update_at_step0": True}, UPOP)),
    "upop_unified": ("upop_unified", lambda: _vision_ctx("upop_unified", 0.5, None, UPOP)),
    "upop_uniform": ("upop_uniform", lambda: _vision_ctx("upop_uniform", 0.5, None, UPOP)),
    "gohsp": ("gohsp", lambda: _vision_ctx("gohsp", 0.4, None, GOHSP)),
    "gohsp-global-per_layer-reselect": ("gohsp", lambda: _vision_ctx(
        "gohsp", 0.5, {"head_budget": "global", "ffn_budget": "per_layer", "reselect": True}, GOHSP)),
    "gohsp-heads_only-redundancy": ("gohsp", lambda: _vision_ctx(
        "gohsp", 0.4, {"attn_split": "heads_only", "unit_kinds": ["head", "ffn"], "ranking": "redundancy",
                       "damping": 0.15}, GOHSP)),
    "vtrans": ("vtrans", lambda: _lang_ctx("vtrans", 0.5)),
    "vtrans-flops-rule": ("vtrans", lambda: _lang_ctx("vtrans", 0.4, {"constraint": "flops",
                                                                      "unit_kinds": ["head", "ffn", "layer"]})),
    "fast_vtrans": ("fast_vtrans", lambda: _lang_ctx("fast_vtrans", 0.4, {"subset": 0.5})),
    "faster_vtrans": ("faster_vtrans", lambda: _lang_ctx("faster_vtrans", 0.4, {"exact_budget": False})),
}

GOLDEN = {
    'dense': ('4889d1d5dcedaf22', {'ffn': 1536, 'head': 16, 'head_dim': 96}),
    'fast_vtrans': ('e5a1e30b299afa08', {'ffn': 424, 'head': 6, 'hidden': 55, 'layer': 3}),
    'faster_vtrans': ('bec4f54ed4d17d18', {'ffn': 512, 'head': 8, 'hidden': 64, 'layer': 4}),
    'gohsp': ('816d9ffd17f86523', {'ffn': 920, 'head': 12, 'head_dim': 72}),
    'gohsp-global-per_layer-reselect': ('a0320305b8338ef0', {'ffn': 740, 'head': 11, 'head_dim': 68}),
    'gohsp-heads_only-redundancy': ('0e8b033607b216b5', {'ffn': 920, 'head': 9}),
    'sgmp-gohsp': ('79c51793f97cb3f1', {'ffn': 920, 'head': 12, 'head_dim': 72}),
    'sgmp-per_type': ('12ae56e1cfc5313e', {'ffn': 922, 'head_dim': 58}),
    'somp-global': ('af4c9c453553a23d', {'ffn': 774, 'head': 13}),
    'somp-gohsp': ('85068fc464dca39d', {'ffn': 920, 'head': 12, 'head_dim': 72}),
    'somp-gohsp-global-per_layer': ('17aaa468133b38f7', {'ffn': 730, 'head': 8}),
    'somp-per_layer-l1': ('aaa18392af5767a0', {'ffn': 1076, 'head_dim': 68}),
    'somp-per_type': ('8ed47e930866d853', {'ffn': 1075, 'head_dim': 67}),
    'upop': ('f8c501acf1fad585', {'ffn': 769, 'head_dim': 48}),
    'upop-closest-official_36': ('ffdc9e7f9b2fbb02', {'ffn': 939, 'head_dim': 57}),
    'upop-single_step-total': ('5dbbd25c55dbd9a7', {'ffn': 1119, 'head_dim': 59}),
    'upop_unified': ('6a7be5d1804e21c3', {'ffn': 769, 'head_dim': 48}),
    'upop_uniform': ('4d19af343a50728e', {'ffn': 768, 'head_dim': 48}),
    'vtrans': ('5cfbb611c19cb312', {'ffn': 272, 'head': 3, 'hidden': 56, 'layer': 4}),
    'vtrans-flops-rule': ('3561a302b9a0a884', {'ffn': 287, 'head': 5, 'layer': 4}),
}


def _tied_scores(structure, seed=0):
    """Scores with many ties (integers 0..3), so that the selectors' tie-breaking is pinned too."""
    g = torch.Generator().manual_seed(seed)
    return {x.name: torch.randint(0, 4, (x.size,), generator=g).double() for x in structure}


def _selector_cases():
    from methods.gohsp import select_at_budgets
    from methods.magnitude import select_units
    adapter, model = build("vit_micro")
    st = adapter.structure(model, ["head", "head_dim", "ffn"])
    total = sum(q.numel() for q in model.parameters())
    sc = _tied_scores(st)
    out = {}
    for alloc in ("per_type", "per_layer", "global"):
        out[f"select_units-{alloc}"] = select_units(st, sc, 0.45, alloc)
        gone = select_units(st, sc, 0.2, alloc)
        out[f"select_units-{alloc}-regrow"] = select_units(st, _tied_scores(st, 1), 0.45, alloc,
                                                           already_removed={k: ~v for k, v in gone.items()})
    for hb in ("per_block", "global"):
        for fb in ("global", "per_layer"):
            out[f"select_at_budgets-{hb}-{fb}"] = select_at_budgets(st, sc, 0.5, total, head_budget=hb,
                                                                    ffn_budget=fb)
    from methods.upop import uniform_selection, unified_selection, unit_weights
    groups = list(adapter.structure(model, ["head_dim", "ffn"]))
    vals = _tied_scores(groups, 2)
    for scheme in ("exact", "official_36"):
        for rule in ("official", "closest"):   # the units selected for pruning, inverted to keep-masks
            sel = unified_selection(groups, vals, unit_weights(groups, scheme), 0.4, rule)
            out[f"unified_selection-{scheme}-{rule}"] = {k: ~v for k, v in sel.items()}
    out["uniform_selection"] = {k: ~v for k, v in uniform_selection(groups, vals, 0.4).items()}
    from methods.vtrans import SizeModel, exact_selection
    adapter, model = build("bert_micro")
    st = adapter.structure(model, ["hidden", "head", "ffn", "layer"])
    sm = SizeModel(model, st, "total")
    out["exact_selection"] = exact_selection(st, _tied_scores(st, 3), sm.size, sm.target_size(0.5))[0]
    return out


SELECTOR_GOLDEN = {
    'exact_selection': ('dba0a9df09c6029b', {'ffn': 279, 'head': 7, 'hidden': 50, 'layer': 2}),
    'select_at_budgets-global-global': ('d1c81bc477a2a1b7', {'ffn': 740, 'head': 11, 'head_dim': 68}),
    'select_at_budgets-global-per_layer': ('d22e463938c14f2d', {'ffn': 740, 'head': 11, 'head_dim': 68}),
    'select_at_budgets-per_block-global': ('ee7e605466d807fc', {'ffn': 740, 'head': 11, 'head_dim': 68}),
    'select_at_budgets-per_block-per_layer': ('57140ad1dee13f2d', {'ffn': 740, 'head': 11, 'head_dim': 68}),
    'select_units-global': ('fdda5898a03d4710', {'ffn': 1156, 'head': 4, 'head_dim': 43}),
    'select_units-global-regrow': ('9cac327376b1b58b', {'ffn': 876, 'head': 9, 'head_dim': 49}),
    'select_units-per_layer': ('59da774a69fb274d', {'ffn': 844, 'head': 8, 'head_dim': 52}),
    'select_units-per_layer-regrow': ('949078ba0ee5fba5', {'ffn': 844, 'head': 8, 'head_dim': 52}),
    'select_units-per_type': ('2a56189231e22fad', {'ffn': 845, 'head': 9, 'head_dim': 53}),
    'select_units-per_type-regrow': ('73a70a944858d8bb', {'ffn': 845, 'head': 9, 'head_dim': 53}),
    'unified_selection-exact-closest': ('da44d055aa251204', {'ffn': 763, 'head_dim': 38}),
    'unified_selection-exact-official': ('e08a3308ebb7fa32', {'ffn': 1157, 'head_dim': 67}),
    'unified_selection-official_36-closest': ('da44d055aa251204', {'ffn': 763, 'head_dim': 38}),
    'unified_selection-official_36-official': ('e08a3308ebb7fa32', {'ffn': 1157, 'head_dim': 67}),
    'uniform_selection': ('05dfce8438e98c57', {'ffn': 920, 'head_dim': 56}),
}


def test_selectors_with_ties_are_pinned():
    got = {k: digest(v) for k, v in _selector_cases().items()}
    if os.environ.get("PIN_PRINT"):
        print("".join(f"\n    {k!r}: {v!r}," for k, v in sorted(got.items())))
        return
    assert got == SELECTOR_GOLDEN


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_every_registered_method_is_pinned():
    pinned = {m for m, _ in CASES.values()}
    # methods added after the pinning (wanda_sp and later) are pinned when they are added, by their own tests
    later = {"wanda_sp", "random", "taylor"}
    assert set(METHODS.names()) - later <= pinned, sorted(set(METHODS.names()) - later - pinned)


@pytest.mark.parametrize("case", sorted(CASES))
def test_keep_masks_are_pinned(case, one_thread):
    method, make = CASES[case]
    torch.manual_seed(0)
    ctx = make()
    res = METHODS.get(method)().prune(ctx)
    keep = res.keep
    got = digest(keep)
    if os.environ.get("PIN_PRINT"):
        print(f"\n    {case!r}: {got!r},")
        return
    assert got == GOLDEN[case], (case, got)
