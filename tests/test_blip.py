"""BLIP family: masked == extracted for every variant (cross-attention included), UPop's masks, the
official checkpoint key mapping, and the paper-size params / FLOPs counted on `meta`."""
import copy

import pytest
import torch

from bench import measure
from bench.errors import BenchError
from bench.registry import MODELS, TASKS
from bench.structure import extract, mask_weights
from models.blip import load_official_state, official_state_shapes, official_to_ours
from tests.conftest import build, random_keep

VARIANTS = ("nlvr2", "caption", "vqa", "retrieval")


def _inputs(cfg, seed=0, B=3):
    g = torch.Generator().manual_seed(seed)
    s = cfg["image_size"]
    img = lambda: torch.randn(B, 3, s, s, generator=g)   # noqa: E731
    ids = torch.randint(7, 60, (B, 9), generator=g)
    ids[:, 0], ids[:, -1] = 1, 2
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0                                        # padding must be respected
    v = cfg["variant"]
    if v == "nlvr2":
        return (img(), img(), ids, mask)
    if v in ("caption", "retrieval"):
        return (img(), ids, mask)
    a = torch.randint(7, 60, (B, 4), generator=g)
    a[:, 0], a[:, -1] = 1, 2
    return (img(), ids, mask, a, torch.ones_like(a))


def _out(model, inputs):
    with torch.no_grad():
        out = model(*inputs)
    return torch.cat([o.flatten() for o in out]) if isinstance(out, tuple) else out


@pytest.mark.parametrize("variant", VARIANTS)
def test_masked_vs_extracted_equal_cross_attention_included(variant):
    adapter, model = build(f"blip_{variant}_micro")
    st = adapter.structure(model)
    assert {g.modality for g in st} == {"vision", "text", "fusion"}
    keep = random_keep(st, seed=1, frac=0.5)
    x = _inputs(adapter.config)
    dense = _out(model, x)
    # activation masks at UPop's positions (q, k, v after the head reshape; FFN before GELU) == extraction
    act = copy.deepcopy(model)
    adapter.attach_unit_masks(act, st)
    adapter.set_unit_masks(act, st, {n: k.float() for n, k in keep.items()})
    masked_act = _out(act, x)
    zeroed = copy.deepcopy(model)
    mask_weights(zeroed, st, keep)
    masked_w = _out(zeroed, x)
    small = extract(copy.deepcopy(model), adapter, st, keep, {"attention_scale": "fixed"})
    got = _out(small, x)
    assert torch.allclose(masked_act, got, atol=1e-5, rtol=1e-4)
    assert torch.allclose(masked_w, got, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(dense, got, atol=1e-4)
    assert measure.count_params(small) < measure.count_params(model)
    if variant == "retrieval":   # momentum copies are sliced with the same masks and re-copied
        for a, b in small.PAIRS:
            for p, pm in zip(getattr(small, a).parameters(), getattr(small, b).parameters()):
                assert torch.equal(p, pm)


def test_nlvr2_twin_cross_attention_groups_and_official_scale_rule():
    adapter, model = build("blip_nlvr2_micro")
    st = adapter.structure(model)
    fusion = [g.name for g in st if g.modality == "fusion"]
    L = adapter.config["text_layers"]
    assert len(fusion) == 2 * L
    assert "text_encoder.encoder.layer.0.crossattention.self0:head_dim" in fusion
    assert "text_encoder.encoder.layer.0.crossattention.self1:head_dim" in fusion
    # merge_layer (layers >= merge_from) is never pruned; layers before it average the two outputs
    assert model.text_encoder.encoder.layer[0].crossattention.output.merge_layer is None
    assert model.text_encoder.encoder.layer[L - 1].crossattention.output.merge_layer is not None
    assert not any("merge_layer" in s.param for g in st for s in g.slices)
    keep = random_keep(st, seed=3)
    small = extract(copy.deepcopy(model), adapter, st, keep, {})          # default: the official rule
    n_v = int(keep["visual_encoder.layers.0.self_attn:head_dim"].sum())
    n_x = int(keep["text_encoder.encoder.layer.0.crossattention.self1:head_dim"].sum())
    dh = adapter.config["vision_width"] // adapter.config["vision_heads"]
    assert small.visual_encoder.layers[0].self_attn.head_dim == n_v
    assert small.visual_encoder.layers[0].self_attn.scale == dh ** -0.5        # ViT: fixed
    assert small.text_encoder.encoder.layer[0].crossattention.self1.scale == n_x ** -0.5   # BERT: sliced
    _out(small, _inputs(adapter.config))


def test_upop_masks_attach_and_get_gradients_in_every_modality():
    adapter, model = build("blip_nlvr2_micro")
    st = adapter.structure(model)
    masks = adapter.attach_unit_masks(model, st, ("head_dim", "ffn"))
    assert set(masks) == {g.name for g in st}
    model.train()
    logits = model(*_inputs(adapter.config), mode="train")
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 1])).backward()
    for g in st:
        assert masks[g.name].grad is not None and masks[g.name].grad.abs().sum() > 0, g.name
    assert not any(m.requires_grad is False for m in masks.values())
    assert not any(m is p for m in masks.values() for p in model.parameters())   # not optimiser-visible


@pytest.mark.parametrize("variant", VARIANTS)
def test_official_checkpoint_key_mapping(variant, tmp_path):
    adapter, model = build(f"blip_{variant}_micro")
    shapes = official_state_shapes(model)
    assert any(k.startswith("visual_encoder.blocks.0.attn.qkv") for k in shapes)
    g = torch.Generator().manual_seed(0)
    state = {k: (torch.randn(s, generator=g) if k not in ("idx_queue", "ptr_queue") and not k.endswith("position_ids")
                 else torch.zeros(s, dtype=torch.long)) for k, s in shapes.items()}
    path = tmp_path / "ckpt.pth"
    torch.save({"model": state}, path)
    fresh = adapter.build()
    adapter.load_checkpoint(fresh, path)
    params = dict(fresh.named_parameters())
    filled = set()
    for k, v in state.items():
        n = official_to_ours(k)
        if n in params:
            assert torch.equal(params[n].detach(), v), k
            filled.add(n)
    assert filled == set(params)                      # every parameter came from the file
    bad = dict(state)
    bad.pop(next(k for k in shapes if k.endswith("mlp.fc1.weight")))
    with pytest.raises(BenchError, match="fc1"):
        load_official_state(adapter.build(), bad)
    wrong = dict(state)
    k = next(k for k in shapes if k.endswith("attn.qkv.weight"))
    wrong[k] = torch.zeros(3, 3)
    with pytest.raises(BenchError, match="shape"):
        load_official_state(adapter.build(), wrong)


def test_nlvr2_key_names_follow_blip():
    _, model = build("blip_nlvr2_micro")
    keys = official_state_shapes(model)
    for k in ("text_encoder.encoder.layer.0.crossattention.self0.query.weight",
              "text_encoder.encoder.layer.0.crossattention.output.dense1.weight",
              "text_encoder.encoder.layer.1.crossattention.output.merge_layer.weight", "cls_head.2.weight"):
        assert k in keys and official_to_ours(k) in dict(model.named_parameters())
    assert official_to_ours("visual_encoder.blocks.2.attn.proj.weight") == "visual_encoder.layers.2.self_attn.projection.weight"
    assert official_to_ours("visual_encoder.pos_embed") == "visual_encoder.embeddings.position_embedding"
    assert official_to_ours("text_decoder.cls.predictions.decoder.weight") is None   # tied to the embeddings


# paper-size params (M) and FLOPs (G, fvcore MACs) of upop.md §5 / §6; our counts exclude the masks (+0.08 M)
PAPER = {"nlvr2": (259.45, 132.54), "caption": (224.0, 65.7), "vqa": (361.6, 186.1), "retrieval": (447.6, 153.2)}
TASK_OF = {"nlvr2": "nlvr2", "caption": "caption_coco", "vqa": "vqa", "retrieval": "retrieval_coco"}


@pytest.mark.parametrize("variant", VARIANTS)
def test_paper_params_and_flops_on_meta(variant, tmp_path):
    arch = f"blip_{variant}"
    cls, cfg = MODELS.get(arch)
    adapter = cls(arch, cfg)
    with torch.device("meta"):
        model = adapter.build()
    params_m = measure.count_params(model) / 1e6
    assert params_m == pytest.approx(PAPER[variant][0], rel=0.01)
    # the FLOPs protocol is the task's: built as `bench flops` builds it, never prepared (no data on disk)
    task = TASKS.get(TASK_OF[variant])({}, tmp_path / "nowhere", "paper", tmp_path / "cache")
    forwards = task.flops_forwards(cfg, "meta")
    label, (args, kwargs) = next(iter(forwards.items()))
    assert label.startswith("paper")
    assert any(k.startswith("inference") for k in forwards)
    gmacs = measure.count_macs(model, args, kwargs)["macs"] / 1e9
    assert gmacs == pytest.approx(PAPER[variant][1], rel=0.01)
    st = adapter.structure(model)
    assert all(g.size in (64, 3072) for g in st)


def test_paper_nlvr2_compressible_params_match_spec():
    """upop.md §5: 226.68 M compressible params (attention 113.36 M, MLP 113.32 M)."""
    cls, cfg = MODELS.get("blip_nlvr2")
    with torch.device("meta"):
        model = cls("blip_nlvr2", cfg).build()
    st = cls("blip_nlvr2", cfg).structure(model)
    attn = sum(g.size * g.params_per_unit for g in st if g.kind == "head_dim") / 1e6
    ffn = sum(g.size * g.params_per_unit for g in st if g.kind == "ffn") / 1e6
    assert attn == pytest.approx(113.36, abs=0.01) and ffn == pytest.approx(113.32, abs=0.01)


def test_caption_generation_vqa_ranking_and_retrieval_loss_run():
    adapter, cap = build("blip_caption_micro")
    imgs = torch.randn(2, 3, 32, 32)
    prompt = torch.tensor([1, 7, 8, 9])
    for beams in (1, 3):
        out = cap.generate_captions(imgs, prompt, max_length=10, min_length=6, num_beams=beams)
        assert len(out) == 2 and all(2 <= len(o) <= 6 for o in out)   # min_length counts the prompt
    ids = torch.tensor([[1, 7, 8, 9, 10, 11, 2], [1, 7, 8, 9, 12, 2, 0]])
    loss = cap(imgs, ids, (ids > 0).long(), mode="train")
    assert torch.isfinite(loss)

    adapter, vqa = build("blip_vqa_micro")
    q = torch.tensor([[1, 7, 8, 2], [1, 9, 2, 0]])
    answers = torch.tensor([[1, 20, 2], [1, 21, 2], [1, 22, 2]])
    idx = vqa.rank_answers(imgs, q, (q > 0).long(), answers, torch.ones_like(answers), k=2)
    assert idx.shape == (2,) and int(idx.min()) >= 0 and int(idx.max()) < 3
    loss = vqa(imgs, q, (q > 0).long(), answers, torch.ones_like(answers), weights=torch.ones(3), n=[2, 1], mode="train")
    assert torch.isfinite(loss)

    adapter, ret = build("blip_retrieval_micro")
    ret.train()
    x = torch.randn(4, 3, 32, 32)
    ids = torch.randint(7, 60, (4, 6))
    ids[:, 0], ids[:, -1] = 1, 2
    loss = ret(x, ids, torch.ones_like(ids), idx=torch.arange(4), mode="train")
    loss.backward()
    assert torch.isfinite(loss) and int(ret.ptr_queue) == 4
    assert all(p.grad is None for p in ret.momentum_params())
    feats = ret.image_features(x)
    assert feats["embed"].norm(dim=-1).allclose(torch.ones(4)) and feats["tokens"].shape[:2] == (4, 17)
    assert ret.itm_scores(feats["tokens"], ids, torch.ones_like(ids)).shape == (4,)
