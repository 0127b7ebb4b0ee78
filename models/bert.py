"""BERT and RoBERTa for sequence classification (transformers' BertForSequenceClassification /
RobertaForSequenceClassification, random init, no downloads), with every language unit kind.

Architectures (config keys are transformers' BertConfig/RobertaConfig kwargs; the card's model_config may
override any, e.g. num_labels (1 = STS-B regression), vocab_size, max_position_embeddings):
  bert_base_uncased  12 layers, hidden 768, 12 heads, FFN 3072, vocab 30522 (BertModel 109,482,240 params;
                     with the 2-label classifier 109,483,778)
  roberta_base       the same body, vocab 50265, 514 positions, classification head dense+out_proj
                     (124,647,170 params with 2 labels)
  bert_micro         micro profile: hidden 64, 4 heads, 2 layers, FFN 256, vocab 1024, 128 positions
  roberta_micro      the same, RoBERTa-style (pad id 1, positions offset by 2: 130 position rows)
Forward: model(input_ids, attention_mask=None, token_type_ids=None) -> transformers output with .logits.

Unit kinds (adapter.structure(model, kinds); modality "text"; layer prefix P = "bert.encoder.layer.i" or
"roberta.encoder.layer.i"):
  hidden    ONE group "hidden": every residual-stream tensor (word/position/token-type embeddings, embedding
            and sublayer LayerNorms, q/k/v and FFN-in columns, attention-out and FFN-out rows, the pooler /
            classification-head dense (in and out) and the classifier's input)
  head      "P.attn:head"      (q/k/v rows + attention-out columns of a head)
  head_dim  "P.attn:head_dim"  (UPop's per-head dims, shared by all heads and q/k/v)
  ffn       "P.ffn:ffn"        (intermediate row + output column)
  layer     "P.attn:layer", "P.ffn:layer" (size 1, no slices, `params` = what the sublayer owns)
Masks (attach_unit_masks / set_unit_masks / clear_unit_masks / fold_unit_masks, see models/_hf_common.py):
  hidden on the embedding output (after its LayerNorm) and on each sublayer's output before the residual add;
  every LayerNorm then normalises over the kept dims (mask != 0) and outputs 0 on the others;
  head on each head's context before the attention-out dense; head_dim on q, k, v after the head reshape;
  ffn on the intermediate activation: `ffn_at="pre_act"` (UPop: dense output before GELU; attach's default)
  or "post_act" (VTrans: after GELU; set_unit_masks' default when no position was set on the model yet);
  layer: a scalar on the sublayer's output. Both ffn positions fold exactly (into the intermediate rows /
  output columns). fold_unit_masks(model, structure, values) returns keep = value != 0 for `extract`.
Removed sublayers: BERT is post-LN, so a removed attention (or FFN) sublayer leaves h -> LayerNorm(h): its
LayerNorm stays (and is not counted as removed), exactly what the masked model computes with the gate at 0.
Attention scale (`options["attention_scale"]`): "sliced" (default: 1/sqrt(kept head_dim), as the official
UPop BERT code, docs/specs/upop.md §9.8) or "fixed" (1/sqrt(original head_dim): the masked model equals the
extracted one exactly). Head pruning never changes the scale.
"""
from __future__ import annotations

from bench.api import ModelAdapter
from bench.checkpoints import load_state_dict
from bench.registry import register_model_family
from bench.structure import Slice, Structure, UnitGroup, fill_params_per_unit
from models import _hf_common as hf

_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
             hidden_act="gelu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, type_vocab_size=2,
             initializer_range=0.02, num_labels=2)
_MICRO = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
              hidden_act="gelu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, initializer_range=0.02,
              num_labels=2, vocab_size=1024)
_ROBERTA = dict(pad_token_id=1, bos_token_id=0, eos_token_id=2, type_vocab_size=1, layer_norm_eps=1e-5)


def _removable_attention(self, hidden_states, *args, **kwargs):
    if self.query is None:                   # removed sublayer: no context, the output keeps the residual
        return None, None
    return type(self)._bench_base.forward(self, hidden_states, *args, **kwargs)


def _removable_output(self, hidden_states, input_tensor):
    if self.dense is None:
        return self.LayerNorm(input_tensor)
    return type(self)._bench_base.forward(self, hidden_states, input_tensor)


def _removable_intermediate(self, hidden_states):
    if self.dense is None:
        return None
    return type(self)._bench_base.forward(self, hidden_states)


@register_model_family("bert")
class BertAdapter(hf.LanguageMasks, ModelAdapter):
    """transformers BERT / RoBERTa sequence classifiers (config key model_type: bert | roberta)."""

    UNIT_KINDS = ("hidden", "head", "head_dim", "ffn", "layer")
    MODALITIES = ("text",)
    ARCHS = {
        "bert_base_uncased": {"model_type": "bert", **_BASE, "vocab_size": 30522, "max_position_embeddings": 512},
        "roberta_base": {"model_type": "roberta", **_BASE, **_ROBERTA, "vocab_size": 50265,
                         "max_position_embeddings": 514},
        "bert_micro": {"model_type": "bert", **_MICRO, "max_position_embeddings": 128},
        "roberta_micro": {"model_type": "roberta", **_MICRO, **_ROBERTA, "max_position_embeddings": 130},
    }
    # Without a method's own attention_scale, removed head dims keep the pretrained softmax scale 1/sqrt(original
    # head_dim): VTrans/TVA-Prune (oshindutta/TVAprune) and CoFi (princeton-nlp/CoFiPruning) remove whole heads
    # only, so their scale never changes; "sliced" (1/sqrt(kept head_dim), UPop's rule for BLIP's text encoder,
    # which the cards' UPop rows set explicitly) changes a pretrained model's outputs before any retraining.
    DEFAULT_ATTENTION_SCALE = "fixed"
    VERSION = 2   # 2: default attention_scale fixed (was sliced)

    # --- build -------------------------------------------------------------------------------
    @property
    def base(self) -> str:
        return "roberta" if self.config.get("model_type", "bert") == "roberta" else "bert"

    def hf_config(self):
        from transformers import BertConfig, RobertaConfig
        cfg = {k: v for k, v in self.config.items() if k != "model_type"}
        return (RobertaConfig if self.base == "roberta" else BertConfig)(**cfg)

    def build(self):
        from transformers import BertForSequenceClassification, RobertaForSequenceClassification
        cls = RobertaForSequenceClassification if self.base == "roberta" else BertForSequenceClassification
        model = cls(self.hf_config())
        hf.meta_safe(model, causal=False)
        hf.patch_norms(model)
        for layer in self._layers(model):
            att = layer.attention.self
            att._orig_head_dim = att.attention_head_size
            hf.swap_class(att, "Prunable", {"forward": _removable_attention})
            for mod in (layer.attention.output, layer.output):
                hf.swap_class(mod, "Prunable", {"forward": _removable_output})
            hf.swap_class(layer.intermediate, "Prunable", {"forward": _removable_intermediate})
        return model

    def _layers(self, model):
        return getattr(model, self.base).encoder.layer

    def shard_units(self, model):
        """sharding: fsdp: one unit per encoder layer."""
        return list(self._layers(model))

    def _head_prefix(self) -> str:
        return "classifier.dense" if self.base == "roberta" else "bert.pooler.dense"

    # --- structure ---------------------------------------------------------------------------
    def structure(self, model, kinds=None) -> Structure:
        kinds = hf.check_kinds(self.family, kinds, self.UNIT_KINDS)
        b = self.base
        params = dict(model.named_parameters())
        d = params[f"{b}.embeddings.word_embeddings.weight"].shape[1]
        hidden = [(f"{b}.embeddings.{e}_embeddings.weight", 1) for e in ("word", "position", "token_type")]
        hidden += [(f"{b}.embeddings.LayerNorm.weight", 0), (f"{b}.embeddings.LayerNorm.bias", 0)]
        groups = []
        for i, layer in enumerate(self._layers(model)):
            P = f"{b}.encoder.layer.{i}"
            att, ao, ffo = f"{P}.attention.self", f"{P}.attention.output", f"{P}.output"
            hidden += [(f"{ao}.LayerNorm.weight", 0), (f"{ao}.LayerNorm.bias", 0),
                       (f"{ffo}.LayerNorm.weight", 0), (f"{ffo}.LayerNorm.bias", 0)]
            if layer.attention.self.query is not None:
                a = layer.attention.self
                H, dh = a.num_attention_heads, a.attention_head_size
                qkv = [Slice(f"{att}.{n}.{w}", 0, (H, dh), None) for n in ("query", "key", "value")
                       for w in ("weight", "bias")]
                out = [Slice(f"{ao}.dense.weight", 1, (H, dh), None)]
                for kind, ax in (("head", 0), ("head_dim", 1)):
                    if kind in kinds:
                        sl = tuple(Slice(s.param, s.dim, s.view, ax) for s in qkv + out)
                        groups.append(UnitGroup(f"{P}.attn:{kind}", kind, att, (H, dh)[ax], sl, layer=i,
                                                modality="text"))
                hidden += [(f"{att}.{n}.weight", 1) for n in ("query", "key", "value")]
                hidden += [(f"{ao}.dense.weight", 0), (f"{ao}.dense.bias", 0)]
                if "layer" in kinds:
                    names = [f"{att}.{n}.{w}" for n in ("query", "key", "value") for w in ("weight", "bias")]
                    groups.append(hf.layer_group(P, "attn", f"{P}.attention", params, i,
                                                 names + [f"{ao}.dense.weight", f"{ao}.dense.bias"]))
            if layer.intermediate.dense is not None:
                inter = f"{P}.intermediate.dense"
                dff = params[f"{inter}.weight"].shape[0]
                if "ffn" in kinds:
                    sl = (Slice(f"{inter}.weight", 0, (dff,), 0), Slice(f"{inter}.bias", 0, (dff,), 0),
                          Slice(f"{ffo}.dense.weight", 1, (dff,), 0))
                    groups.append(UnitGroup(f"{P}.ffn:ffn", "ffn", f"{P}.intermediate", dff, sl, layer=i,
                                            modality="text"))
                hidden += [(f"{inter}.weight", 1), (f"{ffo}.dense.weight", 0), (f"{ffo}.dense.bias", 0)]
                if "layer" in kinds:
                    groups.append(hf.layer_group(P, "ffn", f"{P}.intermediate", params, i,
                                                 [f"{inter}.weight", f"{inter}.bias", f"{ffo}.dense.weight",
                                                  f"{ffo}.dense.bias"]))
        if "hidden" in kinds:
            hp = self._head_prefix()
            hidden += [(f"{hp}.weight", 0), (f"{hp}.weight", 1), (f"{hp}.bias", 0)]
            hidden += [("classifier.out_proj.weight", 1)] if b == "roberta" else [("classifier.weight", 1)]
            groups.insert(0, UnitGroup("hidden", "hidden", f"{b}.embeddings", d, hf.hidden_slices(hidden, d),
                                       modality="text"))
        return fill_params_per_unit(model, Structure(groups))

    # --- masks -------------------------------------------------------------------------------
    def mask_sites(self, model, ffn_at="pre_act") -> list:
        b, S, L = self.base, hf.Site, hf.linear_folds
        emb_ln = f"{b}.embeddings.LayerNorm"
        sites = [S("hidden", emb_ln, "norm"),
                 S("hidden", emb_ln, "out", folds=[(f"{emb_ln}.weight", 0), (f"{emb_ln}.bias", 0)]),
                 S("hidden", self._head_prefix(), "out", "support")]
        for i, layer in enumerate(self._layers(model)):
            P = f"{b}.encoder.layer.{i}"
            ao, ffo = f"{P}.attention.output", f"{P}.output"
            sites += [S("hidden", f"{ao}.LayerNorm", "norm"), S("hidden", f"{ffo}.LayerNorm", "norm")]
            if layer.attention.self.query is not None:
                sites += [S("hidden", f"{ao}.dense", "out", folds=L(f"{ao}.dense", "out")),
                          S(f"{P}.attn:layer", f"{ao}.dense", "out", folds=L(f"{ao}.dense", "out")),
                          S(f"{P}.attn:head", f"{ao}.dense", "in", "outer", folds=L(f"{ao}.dense", "in"))]
                sites += [S(f"{P}.attn:head_dim", f"{P}.attention.self.{n}", "out",
                            folds=L(f"{P}.attention.self.{n}", "out")) for n in ("query", "key", "value")]
            if layer.intermediate.dense is not None:
                sites += [S("hidden", f"{ffo}.dense", "out", folds=L(f"{ffo}.dense", "out")),
                          S(f"{P}.ffn:layer", f"{ffo}.dense", "out", folds=L(f"{ffo}.dense", "out"))]
                inter = f"{P}.intermediate.dense"
                sites.append(S(f"{P}.ffn:ffn", inter, "out", folds=L(inter, "out")) if ffn_at == "pre_act" else
                             S(f"{P}.ffn:ffn", f"{ffo}.dense", "in", folds=L(f"{ffo}.dense", "in")))
        return sites

    # --- extraction --------------------------------------------------------------------------
    def fix_modules(self, model, structure, keep, options):
        hf.clear_masks(model)
        scale = options.get("attention_scale", self.DEFAULT_ATTENTION_SCALE)
        if scale not in ("sliced", "fixed"):
            from bench.errors import BenchError
            raise BenchError(f"attention_scale must be 'sliced' or 'fixed', got {scale!r}")
        b = self.base
        for i, layer in enumerate(self._layers(model)):
            P = f"{b}.encoder.layer.{i}"
            a = layer.attention.self
            if a.query is not None:
                if f"{P}.attn:head" in keep:
                    a.num_attention_heads = int(keep[f"{P}.attn:head"].sum())
                if f"{P}.attn:head_dim" in keep:
                    a.attention_head_size = int(keep[f"{P}.attn:head_dim"].sum())
                a.all_head_size = a.num_attention_heads * a.attention_head_size
                assert a.all_head_size == a.query.out_features, (P, a.all_head_size, a.query.out_features)
                a.scaling = (a.attention_head_size if scale == "sliced" else a._orig_head_dim) ** -0.5
                if f"{P}.attn:layer" in keep and not bool(keep[f"{P}.attn:layer"].any()):
                    a.query = a.key = a.value = None
                    layer.attention.output.dense = None
            if f"{P}.ffn:layer" in keep and not bool(keep[f"{P}.ffn:layer"].any()):
                layer.intermediate.dense = None
                layer.output.dense = None

        hf.materialise_buffers(model)

    # --- checkpoints -------------------------------------------------------------------------
    def load_checkpoint(self, model, path, log=print):
        """transformers BERT/RoBERTa checkpoint (folder or file). A base-model checkpoint (bert-base-uncased,
        roberta-base) has no classifier: it stays at random init (noted in the log); its MLM head is ignored."""
        b = self.base
        state = load_state_dict(path, f"checkpoint for {self.arch}")
        body = ("embeddings.", "encoder.", "pooler.")

        def rename(k):
            k = k.removeprefix("module.").replace("LayerNorm.gamma", "LayerNorm.weight").replace(
                "LayerNorm.beta", "LayerNorm.bias")
            if k.startswith(("cls.", "lm_head.")) or k.endswith("position_ids"):
                return None                       # MLM / NSP heads, non-persistent buffers
            if k.startswith(body):
                k = f"{b}.{k}"
            if b == "roberta" and k.startswith("roberta.pooler."):
                return None                       # RobertaForSequenceClassification has no pooler
            return k
        return hf.load_mapped(model, state, rename, allowed_missing=("classifier.",),
                              what=f"checkpoint {path}", log=log, arch=self.arch, source=path)
