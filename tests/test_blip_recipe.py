"""BLIP's training-side settings of the official recipe (issue 16): the text encoder's dropout (official
med_config.json: 0.1 / 0.1) active in train mode and off in eval, the ViT drop path through the recipe key, and
`reinit_qkv_bias` (the official UPop extraction bug) on BLIP's fused ViT qkv."""
import copy

import pytest
import torch

from bench.registry import MODELS
from bench.structure import extract
from tests.conftest import build, random_keep
from tests.test_blip import _inputs, _out


def test_paper_archs_carry_the_official_text_dropout_micro_none():
    for arch in ("blip_nlvr2", "blip_vqa", "blip_caption", "blip_retrieval"):
        cfg = MODELS.get(arch)[1]
        assert cfg["hidden_dropout_prob"] == 0.1 and cfg["attention_probs_dropout_prob"] == 0.1, arch
    for arch in ("blip_nlvr2_micro", "blip_vqa_micro", "blip_caption_micro", "blip_retrieval_micro"):
        cfg = MODELS.get(arch)[1]
        assert cfg["hidden_dropout_prob"] == 0.0 and cfg["attention_probs_dropout_prob"] == 0.0, arch


@pytest.mark.parametrize("variant", ["nlvr2", "vqa"])
def test_text_dropout_active_in_train_mode_off_in_eval(variant):
    adapter, model = build(f"blip_{variant}_micro", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    text = {n: m.p for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout) and n.startswith("text_")}
    assert text and set(text.values()) == {0.1}   # every text dropout (embeddings, attention, outputs) reads the keys
    vision = {m.p for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout) and n.startswith("visual")}
    assert vision <= {0.0}                   # BLIP's ViT: attn_drop_rate 0, drop_rate 0
    x = _inputs(adapter.config)
    model.eval()
    a, b = _out(model, x), _out(model, x)
    assert torch.equal(a, b)                 # eval: deterministic, no dropout
    _, plain = build(f"blip_{variant}_micro")   # same seed, dropout 0: the same weights
    assert torch.allclose(_out(plain.eval(), x), a, atol=1e-6)
    model.train()
    torch.manual_seed(1)
    c = _out(model, x)
    torch.manual_seed(2)
    d = _out(model, x)
    assert not torch.allclose(c, d)          # train: dropout active
    assert not torch.allclose(c, a)


def test_text_dropout_default_is_zero_when_the_key_is_absent():
    cls, cfg = MODELS.get("blip_nlvr2_micro")
    cfg = {k: v for k, v in cfg.items() if k not in ("hidden_dropout_prob", "attention_probs_dropout_prob")}
    model = cls("blip_nlvr2_micro", cfg).build()
    assert {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)} == {0.0}


def test_drop_path_recipe_key_sets_blips_vit_rule():
    adapter, model = build("blip_nlvr2_micro")
    adapter.set_drop_path(model, 0.1)
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for b in model.visual_encoder.layers]
    assert rates == pytest.approx([0.0, 0.05, 0.1])     # torch.linspace(0, 0.1, depth), BLIP's vit.py


@pytest.mark.parametrize("variant", ["nlvr2", "retrieval"])
def test_reinit_qkv_bias_changes_the_vit_qkv_bias_and_nothing_else(variant):
    adapter, model = build(f"blip_{variant}_micro")
    st = adapter.structure(model)
    keep = random_keep(st, seed=3, frac=0.5)
    torch.manual_seed(0)
    plain = extract(copy.deepcopy(model), adapter, st, keep, {})
    torch.manual_seed(0)
    bug = extract(copy.deepcopy(model), adapter, st, keep, {"reinit_qkv_bias": True})
    a, b = plain.state_dict(), bug.state_dict()
    assert a.keys() == b.keys()
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    n_layers = len(model.visual_encoder.layers)
    expected = {f"visual_encoder.layers.{i}.self_attn.qkv.bias" for i in range(n_layers)}
    if variant == "retrieval":   # the momentum encoder is re-copied from the main one, as the official copy_params()
        expected |= {f"visual_encoder_m.layers.{i}.self_attn.qkv.bias" for i in range(n_layers)}
        for i in range(n_layers):
            assert torch.equal(b[f"visual_encoder.layers.{i}.self_attn.qkv.bias"],
                               b[f"visual_encoder_m.layers.{i}.self_attn.qkv.bias"])
    assert changed == expected
    for i in range(n_layers):
        bias = b[f"visual_encoder.layers.{i}.self_attn.qkv.bias"]
        bound = bug.visual_encoder.layers[i].self_attn.qkv.in_features ** -0.5
        assert bias.abs().max() <= bound     # nn.Linear's default init U(-1/sqrt(in), 1/sqrt(in))
    # the same shapes and the same forward path: only the bias values differ
    x = _inputs(adapter.config)
    assert not torch.allclose(_out(plain.eval(), x), _out(bug.eval(), x))


def test_unknown_extraction_option_is_refused_not_ignored():
    from bench.errors import BenchError
    adapter, model = build("blip_nlvr2_micro")
    st = adapter.structure(model)
    with pytest.raises(BenchError, match="unknown"):
        extract(copy.deepcopy(model), adapter, st, random_keep(st), {"reinit_qkv_biass": True})
