"""Language adapters (BERT, RoBERTa, GPT-2, LLaMA with GQA): masked == extracted for every unit kind, the
manifest round trip into transformers' classes, mask folding, the paper-size parameter counts and FLOPs on
`meta`, checkpoint loading with transformers' key names, and clear errors."""
import copy

import pytest
import torch
from transformers import (BertForSequenceClassification, BertModel, GPT2LMHeadModel, LlamaForCausalLM,
                          RobertaForSequenceClassification)

from bench import measure
from bench.errors import BenchError, MissingData
from bench.structure import extract, kept_param_count, load_manifest, save_manifest
from tests.conftest import build, random_keep

ARCHS = ["bert_micro", "roberta_micro", "gpt2_micro", "llama_micro"]
CLASSES = {"bert_micro": BertForSequenceClassification, "roberta_micro": RobertaForSequenceClassification,
           "gpt2_micro": GPT2LMHeadModel, "llama_micro": LlamaForCausalLM}
TOL = 1e-5


@pytest.fixture(scope="module", params=ARCHS)
def fam(request):
    adapter, model = build(request.param, seed=3, num_hidden_layers=3) if "gpt2" not in request.param else \
        build(request.param, seed=3, n_layer=3)
    return request.param, adapter, model


def _inputs(adapter, seed=0, B=3, T=10):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, adapter.config["vocab_size"], (B, T), generator=g)
    am = torch.ones(B, T, dtype=torch.long)
    am[1, 7:] = 0                        # padding (right)
    am[2, 4:] = 0
    return {"input_ids": ids, "attention_mask": am}


def _out(model, inputs):
    with torch.no_grad():
        y = model(**inputs).logits
    am = inputs["attention_mask"]
    return y if y.dim() == 2 else y * am[..., None]      # LM logits at padded positions are meaningless


def _keep(structure, seed, layer_off=("0.attn", "1.ffn")):
    """Random keep-masks; whole sublayers: the named ones removed, the others kept."""
    keep = random_keep(structure, seed=seed, frac=0.4)
    for g in structure:
        if g.kind == "layer":
            keep[g.name] = torch.tensor([not any(f".{x}:" in g.name for x in layer_off)])
    return keep


def _kinds(adapter):
    return [(k,) for k in adapter.UNIT_KINDS] + [tuple(adapter.UNIT_KINDS)]


def test_structure_names_sizes_and_modality(fam):
    arch, adapter, model = fam
    st = adapter.structure(model)
    names = [g.name for g in st]
    assert names[0] == "hidden" and sum(g.kind == "hidden" for g in st) == 1
    assert all(g.modality == "text" for g in st)
    layers = [g for g in st if g.kind == "layer"]
    assert len(layers) == 6 and all(g.size == 1 and not g.slices and g.params for g in layers)
    assert any(n.endswith(".attn:layer") for n in names) and any(n.endswith(".ffn:layer") for n in names)
    params = dict(model.named_parameters())
    for g in layers:                    # params_per_unit = everything the sublayer owns
        assert g.params_per_unit == sum(params[n].numel() for n in g.params)
    heads = [g for g in st if g.kind == "head"]
    assert len(heads) == 3
    if arch == "llama_micro":           # GQA: one unit = one KV head with its 2 query heads
        assert heads[0].size == 2 and "head_dim" not in adapter.UNIT_KINDS
    else:
        assert heads[0].size == 4 and any(g.kind == "head_dim" for g in st)
    with pytest.raises(BenchError, match="no unit kind"):
        adapter.structure(model, ["channels"])


@pytest.mark.parametrize("kinds_idx", range(6))
def test_masked_equals_extracted(fam, kinds_idx):
    arch, adapter, model = fam
    all_kinds = _kinds(adapter)
    if kinds_idx >= len(all_kinds):
        pytest.skip("family has fewer kinds")
    kinds = all_kinds[kinds_idx]
    st = adapter.structure(model, kinds)
    keep = _keep(st, seed=10 + kinds_idx)
    opts = {"attention_scale": "fixed"}           # the masked model keeps the original softmax scale
    inputs = _inputs(adapter)
    masked = copy.deepcopy(model)
    adapter.set_unit_masks(masked, st, {n: k.float() for n, k in keep.items()})
    ref = _out(masked, inputs)
    adapter.clear_unit_masks(masked)
    assert torch.equal(_out(masked, inputs), _out(model, inputs))       # clearing restores the dense model
    small = extract(copy.deepcopy(model), adapter, st, keep, opts)
    assert isinstance(small, CLASSES[arch])
    got = _out(small, inputs)
    assert (ref - got).abs().max().item() <= TOL, kinds
    # the framework's count without extracting equals the extracted model's parameters (layers included)
    assert kept_param_count(model, st, keep)["total"] == measure.count_params(small)
    assert measure.count_params(small) < measure.count_params(model)


def test_removed_sublayers_are_gone_and_the_residual_passes(fam):
    arch, adapter, model = fam
    st = adapter.structure(model, ["layer"])
    keep = {g.name: torch.tensor([False]) for g in st}       # every sublayer removed
    small = extract(copy.deepcopy(model), adapter, st, keep)
    inputs = _inputs(adapter)
    _out(small, inputs)                                       # still runs
    left = {n for n, _ in small.named_parameters()}
    assert not any(n.endswith(("query.weight", "q_proj.weight", "c_attn.weight", "c_fc.weight", "gate_proj.weight",
                                "intermediate.dense.weight")) for n in left)
    counts = kept_param_count(model, st, keep)
    assert counts["total"] == measure.count_params(small)
    assert counts["prunable_dense"] == sum(g.params_per_unit for g in st)   # layer-only structure: its params


def test_manifest_round_trip_into_transformers_classes(fam, tmp_path):
    arch, adapter, model = fam
    st = adapter.structure(model)
    keep = _keep(st, seed=5)
    small = extract(copy.deepcopy(model), adapter, st, keep, {"attention_scale": "sliced"})
    inputs = _inputs(adapter)
    save_manifest(tmp_path / "m", small, arch, adapter.config, st, keep, {"attention_scale": "sliced"})
    again, manifest = load_manifest(tmp_path / "m")
    again.eval()
    assert isinstance(again, CLASSES[arch])
    assert measure.count_params(again) == measure.count_params(small)
    assert torch.equal(_out(again, inputs), _out(small, inputs))
    if arch == "gpt2_micro":                                  # the LM head is tied again after loading
        assert again.lm_head.weight is again.transformer.wte.weight


def test_fold_unit_masks_equals_masked_model(fam):
    """VTrans exports the mean: model with mask values == folded model (extracted with keep = value != 0)."""
    arch, adapter, model = fam
    st = adapter.structure(model)
    g = torch.Generator().manual_seed(7)
    values = {}
    for grp in st:
        v = 0.5 + torch.rand(grp.size, generator=g)
        if grp.kind != "layer":
            v[torch.randperm(grp.size, generator=g)[: grp.size // 3]] = 0.0
        values[grp.name] = v
    values[[grp.name for grp in st if grp.kind == "layer"][1]] = torch.zeros(1)   # one sublayer gated off
    inputs = _inputs(adapter)
    for ffn_at in ("pre_act", "post_act"):
        masked = copy.deepcopy(model)
        adapter.set_unit_masks(masked, st, values, ffn_at=ffn_at)
        ref = _out(masked, inputs)
        keep = adapter.fold_unit_masks(masked, st, values)
        assert not masked.__dict__.get("_unit_masks")
        small = extract(masked, adapter, st, keep, {"attention_scale": "fixed"})
        assert (_out(small, inputs) - ref).abs().max().item() <= TOL, ffn_at


def test_upop_masks_get_gradients_and_per_token_masks_run(fam):
    arch, adapter, model = fam
    m = copy.deepcopy(model).train()
    kinds = ("head_dim", "ffn") if "head_dim" in adapter.UNIT_KINDS else ("head", "ffn")
    st = adapter.structure(m, kinds)
    masks = adapter.attach_unit_masks(m, st, kinds)
    assert set(masks) == {g.name for g in st} and all(t.requires_grad for t in masks.values())
    m(**_inputs(adapter)).logits.sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in masks.values())
    # VTrans-style sampled masks, one per token: (batch, tokens, size) for hidden, head, ffn and layer groups
    st2 = adapter.structure(m, ["hidden", "head", "ffn", "layer"])
    x = _inputs(adapter)
    B, T = x["input_ids"].shape
    adapter.clear_unit_masks(m)
    adapter.set_unit_masks(m.eval(), st2, {g.name: 1 + 0.1 * torch.randn(B, T, g.size) for g in st2})
    assert _out(m, x).isfinite().all()
    adapter.clear_unit_masks(m)


def test_head_dim_attention_scale_option():
    adapter, model = build("bert_micro")
    st = adapter.structure(model, ["head_dim"])
    keep = {g.name: torch.arange(g.size) < 4 for g in st}
    sliced = extract(copy.deepcopy(model), adapter, st, keep, {"attention_scale": "sliced"})   # UPop's rule
    fixed = extract(copy.deepcopy(model), adapter, st, keep)               # BERT default: the pretrained scale
    assert sliced.bert.encoder.layer[0].attention.self.scaling == pytest.approx(4 ** -0.5)
    assert fixed.bert.encoder.layer[0].attention.self.scaling == pytest.approx(16 ** -0.5)
    st_h = adapter.structure(model, ["head"])
    heads = extract(copy.deepcopy(model), adapter, st_h, {g.name: torch.tensor([1, 0, 1, 1]).bool() for g in st_h})
    assert heads.bert.encoder.layer[0].attention.self.scaling == pytest.approx(16 ** -0.5)   # heads: unchanged
    with pytest.raises(BenchError, match="attention_scale"):
        extract(copy.deepcopy(model), adapter, st, keep, {"attention_scale": "wrong"})
    a2, g2 = build("gpt2_micro")
    st = a2.structure(g2, ["head_dim"])
    keep = {g.name: torch.arange(g.size) < 4 for g in st}
    assert extract(copy.deepcopy(g2), a2, st, keep).transformer.h[0].attn.scaling == pytest.approx(16 ** -0.5)
    s2 = extract(copy.deepcopy(g2), a2, st, keep, {"attention_scale": "sliced"})
    assert s2.transformer.h[0].attn.scaling == pytest.approx(4 ** -0.5)


# ---------------------------------------------------------------------------------------------
# paper sizes on meta

def _meta(arch):
    from bench.registry import MODELS
    cls, cfg = MODELS.get(arch)
    adapter = cls(arch, cfg)
    with torch.device("meta"):
        return adapter, adapter.build()


def test_paper_param_counts_on_meta():
    _, llama = _meta("llama2_7b")
    assert measure.count_params(llama) == 6_738_415_616
    _, bert = _meta("bert_base_uncased")
    assert measure.count_params(bert.bert) == 109_482_240             # BertModel, transformers' reference
    assert measure.count_params(bert) == 109_482_240 + 768 * 2 + 2     # + the 2-label classifier
    _, roberta = _meta("roberta_base")
    assert measure.count_params(roberta) == 124_647_170                # RobertaModel w/o pooler + cls head
    assert measure.count_params(roberta.roberta) == 124_055_040
    _, gpt2 = _meta("gpt2")
    assert measure.count_params(gpt2) == 124_439_808                   # LM head tied to wte


def test_llama2_7b_flops_on_meta_for_2048_tokens():
    _, llama = _meta("llama2_7b")
    ids = torch.zeros(1, 2048, dtype=torch.long, device="meta")
    res = measure.count_macs(llama, (ids,))
    # every Linear (6,476,267,520 body params + 131,072,000 LM head) once per token, plus both attention
    # matmuls over the full 2048x2048 score matrix in 32 layers
    matmul = 2048 * (6_738_415_616 - 32000 * 4096 - 4096 * 65)
    attention = 32 * 2 * 2048 * 2048 * 4096
    assert res["by_kind"]["matmul"] == matmul
    assert res["by_kind"]["attention"] == attention
    assert res["macs"] == matmul + attention == 14_630_806_093_824
    # a padding mask on meta works too (transformers' own mask helpers would read the values)
    am = torch.ones(1, 2048, dtype=torch.long, device="meta")
    assert measure.count_macs(llama, (ids,), {"attention_mask": am})["macs"] == res["macs"]


def test_meta_forward_of_every_family():
    for arch, T in (("bert_micro", 16), ("roberta_micro", 16), ("gpt2_micro", 16), ("llama_micro", 16)):
        _, m = _meta(arch)
        ids = torch.zeros(2, T, dtype=torch.long, device="meta")
        assert measure.count_macs(m, (ids,))["macs"] > 0
        am = torch.ones(2, T, dtype=torch.long, device="meta")
        assert measure.count_macs(m, (ids,), {"attention_mask": am})["macs"] > 0
        if arch.startswith(("bert", "roberta")):      # BertForSequenceClassification(input_ids, attention_mask)
            assert measure.count_macs(m, (ids, am))["macs"] > 0


# ---------------------------------------------------------------------------------------------
# checkpoints

def test_load_checkpoint_hf_folder_and_base_model_without_classifier(tmp_path):
    from safetensors.torch import save_file
    adapter, model = build("bert_micro", seed=1)
    body = {f"{k}": v for k, v in model.bert.state_dict().items()}          # a BertModel checkpoint: no prefix
    body["cls.predictions.bias"] = torch.zeros(3)                           # its MLM head is ignored
    (tmp_path / "base").mkdir()
    save_file({k: v.contiguous() for k, v in body.items()}, str(tmp_path / "base" / "model.safetensors"))
    _, fresh = build("bert_micro", seed=2)
    notes = []
    res = adapter.load_checkpoint(fresh, tmp_path / "base", log=notes.append)
    assert res["missing"] == ["classifier.weight", "classifier.bias"] and "classifier" in notes[0]
    assert all(torch.equal(a, b) for a, b in zip(fresh.bert.state_dict().values(), model.bert.state_dict().values()))
    # GPT-2: official layout (GPT2Model keys, no lm_head), pytorch_model.bin in a folder
    a2, g2 = build("gpt2_micro", seed=1)
    (tmp_path / "gpt2").mkdir()
    torch.save(g2.transformer.state_dict(), tmp_path / "gpt2" / "pytorch_model.bin")
    _, g3 = build("gpt2_micro", seed=2)
    a2.load_checkpoint(g3, tmp_path / "gpt2")
    x = _inputs(a2)
    assert torch.equal(_out(g3, x), _out(g2, x)) and g3.lm_head.weight is g3.transformer.wte.weight
    # LLaMA: sharded safetensors with an index
    a3, l1 = build("llama_micro", seed=1)
    sd = l1.state_dict()
    keys = sorted(sd)
    (tmp_path / "llama").mkdir()
    half = len(keys) // 2
    for i, part in enumerate((keys[:half], keys[half:])):
        save_file({k: sd[k].contiguous() for k in part}, str(tmp_path / "llama" / f"model-0000{i + 1}-of-00002.safetensors"))
    import json
    (tmp_path / "llama" / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: f"model-0000{1 + (j >= half)}-of-00002.safetensors" for j, k in enumerate(keys)}}))
    _, l2 = build("llama_micro", seed=2)
    a3.load_checkpoint(l2, tmp_path / "llama")
    assert torch.equal(_out(l2, _inputs(a3)), _out(l1, _inputs(a3)))


def test_checkpoint_errors(tmp_path):
    adapter, model = build("llama_micro")
    with pytest.raises(MissingData, match="model.safetensors"):
        adapter.load_checkpoint(model, tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingData):
        adapter.load_checkpoint(model, tmp_path / "empty")
    bad = tmp_path / "bad" / "model.safetensors"
    bad.parent.mkdir()
    bad.write_bytes(b"\x00\x01 not a safetensors file")
    with pytest.raises(BenchError, match="cannot read checkpoint"):
        adapter.load_checkpoint(model, bad.parent)
    from safetensors.torch import save_file
    a2, other = build("llama_micro", hidden_size=32)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(tmp_path / "other.safetensors"))
    with pytest.raises(BenchError, match="shapes differ"):
        adapter.load_checkpoint(model, tmp_path / "other.safetensors")
    b, bm = build("bert_micro")
    save_file({"bert.encoder.layer.0.output.dense.bias": torch.zeros(64)}, str(tmp_path / "partial.safetensors"))
    with pytest.raises(BenchError, match="missing"):
        b.load_checkpoint(bm, tmp_path / "partial.safetensors")


def test_bertmodel_reference_class_count_matches():
    """The BertModel inside our classifier is transformers' own class with its own count."""
    from transformers import BertConfig
    with torch.device("meta"):
        ref = BertModel(BertConfig())
    assert measure.count_params(ref) == 109_482_240


def test_deepcopy_of_a_masked_model_is_independent():
    adapter, model = build("llama_micro")
    st = adapter.structure(model, ["hidden", "ffn"])
    x = _inputs(adapter)
    adapter.set_unit_masks(model, st, {g.name: torch.ones(g.size) for g in st})
    twin = copy.deepcopy(model)                   # e.g. a teacher copy taken while masks are attached
    adapter.set_unit_masks(twin, st, {g.name: (torch.arange(g.size) % 2).float() for g in st})
    dense = _out(model, x)
    adapter.clear_unit_masks(model)
    assert torch.equal(dense, _out(model, x))     # the original still runs with its ones
    assert not torch.equal(_out(twin, x), dense)  # the twin with its own masks
    adapter.clear_unit_masks(twin)
    assert torch.equal(_out(twin, x), dense)


# ---------------------------------------------------------------------------------------------
# the methods that only see groups run on the language adapters

class _TinyText:
    """Token sequences; the label says whether token 5 occurs: enough for a few training steps."""
    metrics = {"acc": True}

    def __init__(self, vocab=1024):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(6, vocab, (128, 12), generator=g)
        self.x[::2, 3] = 5
        self.y = (self.x == 5).any(1).long()

    def steps_per_epoch(self, bs):
        return len(self.x) // bs

    def train_batches(self, bs, seed, recipe=None):
        g = torch.Generator().manual_seed(seed)
        while True:
            perm = torch.randperm(len(self.x), generator=g)
            for i in range(0, len(perm) - bs + 1, bs):
                yield self.x[perm[i:i + bs]], self.y[perm[i:i + bs]]

    def loss(self, model, batch, device, recipe=None):
        return torch.nn.functional.cross_entropy(model(input_ids=batch[0]).logits, batch[1])


@pytest.mark.parametrize("method", ["upop", "somp"])
def test_upop_and_somp_run_on_bert(method):
    import functools

    from bench.api import CellContext, RatioSpec
    from bench.registry import METHODS
    from bench.training import train
    adapter, model = build("bert_micro")
    task = _TinyText()
    M = METHODS.get(method)
    settings = M.Settings(**({"search_epochs": 1, "lr": 1e-3, "batch_size": 32, "interval": 2, "w_sp_attn": 1e-3,
                              "w_sp_mlp": 1e-3} if method == "upop" else {}))
    opts = M.Options(**({"unit_kinds": ["head", "ffn"]} if method == "somp" else {}))
    ctx = CellContext(model=model, adapter=adapter, structure=adapter.structure(model), task=task,
                      ratio=RatioSpec("x", 0.5), options=opts, settings={"finetune": None, "method": settings},
                      device=torch.device("cpu"), seed=0,
                      train=functools.partial(train, task=task, device="cpu", seed=0), log=lambda m: None)
    res = METHODS.get(method)().prune(ctx)
    keep = res.keep
    st = res.structure
    counts = kept_param_count(model, st, keep)
    small = extract(model, adapter, st, keep, res.extract_options)
    assert measure.count_params(small) == counts["total"]
    removed = counts["dense_total"] - counts["total"]
    assert abs(removed - 0.5 * counts["prunable_dense"]) <= 0.05 * counts["prunable_dense"]
    with torch.no_grad():
        assert small(input_ids=task.x[:4]).logits.shape == (4, 2)


def test_roberta_official_layout_and_regression_head(tmp_path):
    from safetensors.torch import save_file
    adapter, model = build("roberta_micro", seed=1)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("classifier.")}
    state["lm_head.dense.weight"] = torch.zeros(2, 2)                     # RobertaForMaskedLM's head: ignored
    state["roberta.pooler.dense.weight"] = torch.zeros(64, 64)             # no pooler in the classifier
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    _, fresh = build("roberta_micro", seed=2)
    res = adapter.load_checkpoint(fresh, tmp_path / "model.safetensors", log=lambda m: None)
    assert sorted(res["missing"]) == ["classifier.dense.bias", "classifier.dense.weight",
                                      "classifier.out_proj.bias", "classifier.out_proj.weight"]
    _, sts = build("bert_micro", num_labels=1)                               # STS-B: regression
    with torch.no_grad():
        assert sts(input_ids=torch.randint(3, 1000, (2, 7))).logits.shape == (2, 1)
