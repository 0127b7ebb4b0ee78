"""LLaMA (transformers' LlamaForCausalLM, random init, no downloads) with every language unit kind except
head_dim (RoPE rotates pairs of dims, so per-head dims are not independent units).

Architectures (keys are LlamaConfig kwargs; the card's model_config may override any):
  llama2_7b    LLaMA-2-7B: 32 layers, hidden 4096, 32 heads (no GQA), SwiGLU FFN 11008, vocab 32000, untied LM
               head, 4096 positions: 6,738,415,616 params. Exists here only on `meta` (FLOPs, shapes);
               load_checkpoint reads the official transformers folder when one is given.
  llama_micro  micro profile: hidden 64, 4 query heads / 2 KV heads (grouped-query attention), FFN 176,
               2 layers, vocab 1024, 256 positions.
Forward: model(input_ids, attention_mask=None) -> transformers CausalLMOutput (.logits). use_cache is off.

Unit kinds (layer prefix P = "model.layers.i"; modality "text"):
  hidden  ONE group "hidden": token embedding columns, every RMSNorm weight (input, post-attention, final),
          q/k/v/gate/up input columns, o/down output rows, the LM head's input columns
  head    "P.attn:head": one unit = one KV head together with its num_heads/num_kv_heads query heads (the GQA
          ratio is kept): k/v rows of the KV head, q rows and o_proj columns of its query heads
  ffn     "P.ffn:ffn": gate row + up row + down column (the gated FFN neuron as one unit)
  layer   "P.attn:layer" (input RMSNorm + q/k/v/o), "P.ffn:layer" (post-attention RMSNorm + gate/up/down);
          a removed sublayer is skipped (pre-norm residual: the stream passes through unchanged)
Masks (see models/_hf_common.py and models/bert.py for the API): hidden on the embedding output, on o_proj and
down_proj outputs and on the LM head's input, RMSNorm over the kept dims; head on the per-query-head context
before o_proj (one value per KV-head unit); ffn after act(gate)*up ("post_act"; "pre_act" puts it on up_proj's
output, which is the same product); layer: a scalar on the sublayer output.
"""
from __future__ import annotations

from bench.api import ModelAdapter
from bench.checkpoints import load_state_dict
from bench.registry import register_model_family
from bench.structure import Slice, Structure, UnitGroup, fill_params_per_unit
from models import _hf_common as hf

_COMMON = dict(hidden_act="silu", rms_norm_eps=1e-5, tie_word_embeddings=False, use_cache=False,
               attention_bias=False, mlp_bias=False, initializer_range=0.02)


def _layer_forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None,
                   use_cache=False, position_embeddings=None, **kwargs):
    if self.self_attn is not None:           # removed sublayer: skipped, the residual passes through
        h = self.input_layernorm(hidden_states)
        h, _ = self.self_attn(hidden_states=h, attention_mask=attention_mask, position_ids=position_ids,
                              past_key_values=past_key_values, use_cache=use_cache,
                              position_embeddings=position_embeddings, **kwargs)
        hidden_states = hidden_states + h
    if self.mlp is not None:
        hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
    return hidden_states


@register_model_family("llama")
class LlamaAdapter(hf.LanguageMasks, ModelAdapter):
    UNIT_KINDS = ("hidden", "head", "ffn", "layer")
    MODALITIES = ("text",)
    ARCHS = {
        "llama2_7b": {**_COMMON, "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
                      "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                      "max_position_embeddings": 4096},
        "llama_micro": {**_COMMON, "vocab_size": 1024, "hidden_size": 64, "intermediate_size": 176,
                        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                        "max_position_embeddings": 256},
    }
    DEFAULT_ATTENTION_SCALE = "fixed"    # head pruning only: the head size never changes

    def build(self):
        from transformers import LlamaConfig, LlamaForCausalLM
        from transformers.models.llama.modeling_llama import LlamaRMSNorm
        model = LlamaForCausalLM(LlamaConfig(**self.config))
        hf.meta_safe(model, causal=True)
        hf.patch_norms(model, LlamaRMSNorm)
        for layer in model.model.layers:
            hf.swap_class(layer, "Prunable", {"forward": _layer_forward})
        if model.config.tie_word_embeddings:
            hf.tie_outputs(model, {"lm_head.weight": "model.embed_tokens.weight"})
        return model

    def shard_units(self, model):
        """sharding: fsdp: one unit per decoder layer (the embeddings, final norm and LM head stay in the root unit)."""
        return list(model.model.layers)

    def structure(self, model, kinds=None) -> Structure:
        kinds = hf.check_kinds(self.family, kinds, self.UNIT_KINDS)
        params = dict(model.named_parameters())
        d = params["model.embed_tokens.weight"].shape[1]
        hidden = [("model.embed_tokens.weight", 1), ("model.norm.weight", 0)]
        if "lm_head.weight" in params:            # untied head (tied: the embedding entry covers it)
            hidden.append(("lm_head.weight", 1))
        groups = []
        for i, layer in enumerate(model.model.layers):
            P = f"model.layers.{i}"
            if layer.self_attn is not None:
                a = layer.self_attn
                A = f"{P}.self_attn"
                dh, G = a.head_dim, a.num_key_value_groups
                kvh = a.k_proj.out_features // dh
                sl = [Slice(f"{A}.q_proj.weight", 0, (kvh, G * dh), 0), Slice(f"{A}.o_proj.weight", 1, (kvh, G * dh), 0)]
                sl += [Slice(f"{A}.{n}_proj.weight", 0, (kvh, dh), 0) for n in ("k", "v")]
                if a.q_proj.bias is not None:
                    sl += [Slice(f"{A}.q_proj.bias", 0, (kvh, G * dh), 0)]
                    sl += [Slice(f"{A}.{n}_proj.bias", 0, (kvh, dh), 0) for n in ("k", "v")]
                if "head" in kinds:
                    groups.append(UnitGroup(f"{P}.attn:head", "head", A, kvh, tuple(sl), layer=i, modality="text"))
                hidden += [(f"{P}.input_layernorm.weight", 0), (f"{A}.o_proj.weight", 0)]
                hidden += [(f"{A}.{n}_proj.weight", 1) for n in ("q", "k", "v")]
                hidden += [(f"{A}.o_proj.bias", 0)] if a.o_proj.bias is not None else []
                if "layer" in kinds:
                    names = [f"{P}.input_layernorm.weight"] + [f"{A}.{n}_proj.{w}" for n in "qkvo"
                                                              for w in ("weight", "bias")]
                    groups.append(hf.layer_group(P, "attn", A, params, i, names))
            if layer.mlp is not None:
                M = f"{P}.mlp"
                dff = layer.mlp.gate_proj.out_features
                sl = [Slice(f"{M}.gate_proj.weight", 0, (dff,), 0), Slice(f"{M}.up_proj.weight", 0, (dff,), 0),
                      Slice(f"{M}.down_proj.weight", 1, (dff,), 0)]
                if layer.mlp.gate_proj.bias is not None:
                    sl += [Slice(f"{M}.gate_proj.bias", 0, (dff,), 0), Slice(f"{M}.up_proj.bias", 0, (dff,), 0)]
                if "ffn" in kinds:
                    groups.append(UnitGroup(f"{P}.ffn:ffn", "ffn", M, dff, tuple(sl), layer=i, modality="text"))
                hidden += [(f"{P}.post_attention_layernorm.weight", 0), (f"{M}.gate_proj.weight", 1),
                           (f"{M}.up_proj.weight", 1), (f"{M}.down_proj.weight", 0)]
                hidden += [(f"{M}.down_proj.bias", 0)] if layer.mlp.down_proj.bias is not None else []
                if "layer" in kinds:
                    names = [f"{P}.post_attention_layernorm.weight"] + [f"{M}.{n}_proj.{w}" for n in
                                                                       ("gate", "up", "down") for w in ("weight", "bias")]
                    groups.append(hf.layer_group(P, "ffn", M, params, i, names))
        if "hidden" in kinds:
            groups.insert(0, UnitGroup("hidden", "hidden", "model.embed_tokens", d, hf.hidden_slices(hidden, d),
                                       modality="text"))
        return fill_params_per_unit(model, Structure(groups))

    # --- masks -------------------------------------------------------------------------------
    def mask_sites(self, model, ffn_at="post_act") -> list:
        S, L = hf.Site, hf.linear_folds
        sites = [S("hidden", "model.embed_tokens", "out", folds=[("model.embed_tokens.weight", 1)]),
                 S("hidden", "model.norm", "norm"),
                 S("hidden", "lm_head", "in", folds=L("lm_head", "in"))]
        for i, layer in enumerate(model.model.layers):
            P = f"model.layers.{i}"
            if layer.self_attn is not None:
                o = f"{P}.self_attn.o_proj"
                ob = layer.self_attn.o_proj.bias is not None
                sites += [S("hidden", f"{P}.input_layernorm", "norm"),
                          S("hidden", o, "out", folds=L(o, "out", ob)),
                          S(f"{P}.attn:layer", o, "out", folds=L(o, "out", ob)),
                          S(f"{P}.attn:head", o, "in", "outer", folds=L(o, "in"))]
            if layer.mlp is not None:
                dn, up = f"{P}.mlp.down_proj", f"{P}.mlp.up_proj"
                db, ub = layer.mlp.down_proj.bias is not None, layer.mlp.up_proj.bias is not None
                sites += [S("hidden", f"{P}.post_attention_layernorm", "norm"),
                          S("hidden", dn, "out", folds=L(dn, "out", db)),
                          S(f"{P}.ffn:layer", dn, "out", folds=L(dn, "out", db)),
                          S(f"{P}.ffn:ffn", dn, "in", folds=L(dn, "in")) if ffn_at == "post_act" else
                          S(f"{P}.ffn:ffn", up, "out", folds=L(up, "out", ub))]
        return sites

    # --- extraction --------------------------------------------------------------------------
    def fix_modules(self, model, structure, keep, options):
        hf.clear_masks(model)
        for i, layer in enumerate(model.model.layers):
            P = f"model.layers.{i}"
            a = layer.self_attn
            if a is not None:
                a.num_heads = a.q_proj.out_features // a.head_dim          # per-layer counts on the module
                a.num_key_value_heads = a.k_proj.out_features // a.head_dim
                if f"{P}.attn:layer" in keep and not bool(keep[f"{P}.attn:layer"].any()):
                    layer.self_attn = layer.input_layernorm = None
            if layer.mlp is not None and f"{P}.ffn:layer" in keep and not bool(keep[f"{P}.ffn:layer"].any()):
                layer.mlp = layer.post_attention_layernorm = None
        hf.retie(model)
        hf.materialise_buffers(model)

    def load_checkpoint(self, model, path, log=print):
        """Official transformers LLaMA-2 folder (model-0000x-of-00002.safetensors + index, or
        pytorch_model-*.bin via a single file) with transformers' key names."""
        state = load_state_dict(path, f"checkpoint for {self.arch}")

        def rename(k):
            k = k.removeprefix("module.")
            if k.endswith("rotary_emb.inv_freq"):
                return None                       # buffer stored by old exports
            return k if k.startswith(("model.", "lm_head.")) else f"model.{k}"
        return hf.load_mapped(model, state, rename, what=f"checkpoint {path}", log=log, arch=self.arch,
                              source=path)
