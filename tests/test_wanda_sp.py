"""Wanda-sp (methods/wanda_sp.py): the unit score is |W| x input norm summed over the unit's weights, and the
method prunes every family (ViT, BERT, GPT-2, BLIP) to the requested ratio, the model untouched by the
calibration, the extracted model running."""
import copy
import os
from pathlib import Path

import pytest
import torch

from bench.api import CellContext, RatioSpec
from bench.options import parse_block
from bench.recipe import TrainRecipe
from bench.registry import METHODS, TASKS
from bench.structure import extract, kept_param_count
from methods import _importance as importance
from tests.conftest import build
from tests.test_keep_masks_pinned import digest
from tests.test_methods import TinyTask


def _cache():
    return Path(os.environ["BENCH_CACHE"])


def _family(name):
    """(adapter, model, task) of a family's micro model on a micro task of the right kind."""
    if name == "vit":
        return (*build("vit_micro"), TinyTask())
    if name == "bert":
        from tasks.glue import MICRO_VOCAB_SIZE
        task = TASKS.get("glue_sst2")({"train_size": 64, "dev_size": 16, "max_len": 16}, None, "micro", _cache())
        return (*build("bert_micro", vocab_size=MICRO_VOCAB_SIZE), task)
    if name == "gpt2":
        from tasks.lm_perplexity import MICRO_VOCAB_SIZE
        task = TASKS.get("wikitext2_ppl")({"train_tokens": 3000, "eval_tokens": 700, "seq_len": 32}, None, "micro",
                                          _cache())
        return (*build("gpt2_micro", vocab_size=MICRO_VOCAB_SIZE), task)
    if name == "blip":
        from tasks.nlvr2 import Nlvr2Task
        task = Nlvr2Task({"train_pairs": 16, "dev_pairs": 8, "test_pairs": 8}, _cache() / "data", "micro", _cache())
        return (*build("blip_nlvr2_micro"), task)
    raise KeyError(name)


def _ctx(adapter, model, task, p, options=None):
    M = METHODS.get("wanda_sp")
    return CellContext(model=model, adapter=adapter, structure=adapter.structure(model), task=task,
                       ratio=RatioSpec("x", p), options=parse_block(M.Options, options, "method_options.wanda_sp"),
                       settings={"finetune": TrainRecipe(epochs=1, lr=1e-3, batch_size=8),
                                 "method": parse_block(M.Settings, {"calib_batches": 2}, "wanda_sp")},
                       device=torch.device("cpu"), seed=0, train=None, log=lambda m: None)


@pytest.mark.parametrize("family", ["vit", "bert", "gpt2", "blip"])
def test_wanda_sp_prunes_every_family(family):
    adapter, model, task = _family(family)
    getattr(task, "prepare", lambda: None)()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ctx = _ctx(adapter, model, task, 0.3)
    res = METHODS.get("wanda_sp")().prune(ctx)
    keep = res.keep
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)       # calibration changes nothing
    st = res.structure
    assert st.kinds() == ["ffn", "head_dim"]
    for kind in ("head_dim", "ffn"):            # per_type: p of each kind's params, within one unit
        groups = [g for g in st if g.kind == kind]
        total = sum(g.size * g.params_per_unit for g in groups)
        removed = sum(int((~keep[g.name]).sum()) * g.params_per_unit for g in groups)
        assert abs(removed - 0.3 * total) <= groups[0].params_per_unit / 2 + 1e-6, kind
    dense = kept_param_count(model, st, st.full_keep())["total"]
    small = extract(copy.deepcopy(model), adapter, st, keep, res.extract_options).eval()
    assert sum(q.numel() for q in small.parameters()) == kept_param_count(model, st, keep)["total"] < dense
    with torch.no_grad():
        loss = task.loss(small, next(task.train_batches(4, 0)), "cpu")
    assert torch.isfinite(loss)


def test_wanda_score_is_weight_times_input_norm():
    """FFN neuron j of a ViT block: sum_i |fc1[j, i]| ||x_i|| (fc1's input) + sum_k |fc2[k, j]| ||h_j|| (fc2's input,
    the neuron's activation), computed here by hand with hooks on the two layers."""
    adapter, model = build("vit_micro")
    st = adapter.structure(model, ["ffn"])
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    sq = importance.input_sq_norms(model, st, lambda: model(x))
    scores = importance.wanda(model, st, sq, "l1")
    mlp = model.blocks[0].mlp
    seen = {}
    hooks = [mlp.fc1.register_forward_pre_hook(lambda m, i: seen.__setitem__("fc1", i[0])),
             mlp.fc2.register_forward_pre_hook(lambda m, i: seen.__setitem__("fc2", i[0]))]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    n1 = seen["fc1"].reshape(-1, seen["fc1"].shape[-1]).double().norm(dim=0)
    n2 = seen["fc2"].reshape(-1, seen["fc2"].shape[-1]).double().norm(dim=0)
    want = (mlp.fc1.weight.detach().double().abs() * n1).sum(1) + (mlp.fc2.weight.detach().double().abs() * n2).sum(0)
    assert torch.allclose(scores["blocks.0.mlp:ffn"], want, rtol=1e-6)
    # a square weight (the attention output projection) is read along its input dim
    st2 = adapter.structure(model, ["head_dim"])
    sq2 = importance.input_sq_norms(model, st2, lambda: model(x))
    assert sq2["blocks.0.attn.proj.weight"][0] == 1 and sq2["blocks.0.attn.qkv.weight"][0] == 1


def test_wanda_sp_masks_are_pinned():
    torch.manual_seed(0)
    adapter, model, task = _family("vit")
    keep = METHODS.get("wanda_sp")().prune(_ctx(adapter, model, task, 0.4)).keep
    assert digest(keep) == PINNED


PINNED = ('90189a3f1e44b948', {'ffn': 922, 'head_dim': 58})   # generated from the first version
