"""GPT-2 (transformers' GPT2LMHeadModel, random init, no downloads) with every language unit kind.

Architectures (keys are GPT2Config kwargs; the card's model_config may override any):
  gpt2        GPT-2 small: 12 layers, hidden 768, 12 heads, FFN 3072, vocab 50257, 1024 positions, LM head
              tied to the token embedding: 124,439,808 params
  gpt2_micro  micro profile: hidden 64, 4 heads, 2 layers, FFN 256, vocab 1024, 256 positions
Forward: model(input_ids, attention_mask=None) -> transformers CausalLMOutput (.logits). use_cache is off.

GPT-2 uses transformers' Conv1D: weight shape (in, out), so output units are weight *columns* (dim 1) and
input units weight rows (dim 0); the slices below say so. The tied LM head is one tensor with the token
embedding: it is left out of `state_dict()` (safetensors refuses shared tensors) and re-tied on load and after
extraction, so manifests and the dense cache store it once (as the official checkpoint does).

Unit kinds (layer prefix P = "transformer.h.i"; modality "text"):
  hidden    ONE group "hidden": wte/wpe columns, ln_1/ln_2/ln_f, c_attn and c_fc input rows, both c_proj
            output columns and biases (the tied LM head follows wte)
  head      "P.attn:head"     (q/k/v columns of c_attn, c_proj rows)
  head_dim  "P.attn:head_dim" (UPop's per-head dims, shared by all heads and q/k/v)
  ffn       "P.ffn:ffn"       (c_fc column + bias, c_proj row)
  layer     "P.attn:layer" (ln_1 + attention), "P.ffn:layer" (ln_2 + MLP); a removed sublayer is skipped
Masks: as models/bert.py (API in models/_hf_common.LanguageMasks): hidden on the embedding output (after
wte+wpe), on both c_proj outputs and on the LM head's input, LayerNorms over the kept dims; head before
c_proj; head_dim on q, k, v; ffn "pre_act" (c_fc output, UPop) or "post_act" (after GELU, VTrans); layer: a
scalar on the sublayer output.
Attention scale (`options["attention_scale"]`): "fixed" (default: 1/sqrt(original head_dim), so the masked
model equals the extracted one; no official UPop GPT-2 code exists) or "sliced" (1/sqrt(kept head_dim),
what transformers' GPT-2 would compute for a smaller head).
"""
from __future__ import annotations

from bench.api import ModelAdapter
from bench.checkpoints import load_state_dict
from bench.errors import BenchError
from bench.registry import register_model_family
from bench.structure import Slice, Structure, UnitGroup, fill_params_per_unit
from models import _hf_common as hf

_COMMON = dict(activation_function="gelu_new", resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1,
               layer_norm_epsilon=1e-5, initializer_range=0.02, use_cache=False, tie_word_embeddings=True)


def _block_forward(self, hidden_states, past_key_values=None, attention_mask=None, encoder_hidden_states=None,
                   encoder_attention_mask=None, use_cache=False, **kwargs):
    if encoder_hidden_states is not None:
        raise BenchError("the pruned GPT-2 block has no cross-attention")
    if self.attn is not None:                # removed sublayer: skipped, the residual passes through
        h, _ = self.attn(self.ln_1(hidden_states), past_key_values=past_key_values, attention_mask=attention_mask,
                         use_cache=use_cache, **kwargs)
        hidden_states = hidden_states + h
    if self.mlp is not None:
        hidden_states = hidden_states + self.mlp(self.ln_2(hidden_states))
    return hidden_states


@register_model_family("gpt2")
class Gpt2Adapter(hf.LanguageMasks, ModelAdapter):
    UNIT_KINDS = ("hidden", "head", "head_dim", "ffn", "layer")
    MODALITIES = ("text",)
    ARCHS = {
        "gpt2": {**_COMMON, "vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12},
        "gpt2_micro": {**_COMMON, "vocab_size": 1024, "bos_token_id": 0, "eos_token_id": 0, "n_positions": 256, "n_embd": 64, "n_layer": 2, "n_head": 4,
                       "n_inner": 256},
    }
    DEFAULT_ATTENTION_SCALE = "fixed"

    def build(self):
        from transformers import GPT2Config, GPT2LMHeadModel
        model = GPT2LMHeadModel(GPT2Config(**self.config))
        hf.meta_safe(model, causal=True)
        hf.patch_norms(model)
        for block in model.transformer.h:
            block.attn._orig_scaling = block.attn.scaling
            block.attn._orig_head_dim = block.attn.head_dim
            hf.swap_class(block, "Prunable", {"forward": _block_forward})
        if model.config.tie_word_embeddings:
            hf.tie_outputs(model, {"lm_head.weight": "transformer.wte.weight"})
        return model

    def shard_units(self, model):
        """sharding: fsdp: one unit per block (the tied embedding and LM head stay in the root unit)."""
        return list(model.transformer.h)

    def structure(self, model, kinds=None) -> Structure:
        kinds = hf.check_kinds(self.family, kinds, self.UNIT_KINDS)
        params = dict(model.named_parameters())
        d = params["transformer.wte.weight"].shape[1]
        hidden = [("transformer.wte.weight", 1), ("transformer.wpe.weight", 1),
                  ("transformer.ln_f.weight", 0), ("transformer.ln_f.bias", 0)]
        if "lm_head.weight" in params:
            hidden.append(("lm_head.weight", 1))
        groups = []
        for i, block in enumerate(model.transformer.h):
            P = f"transformer.h.{i}"
            if block.attn is not None:
                a, A = block.attn, f"{P}.attn"
                H, dh = a.num_heads, a.head_dim
                qkv = [Slice(f"{A}.c_attn.weight", 1, (3, H, dh), None), Slice(f"{A}.c_attn.bias", 0, (3, H, dh), None)]
                out = [Slice(f"{A}.c_proj.weight", 0, (H, dh), None)]
                for kind, ax in (("head", 1), ("head_dim", 2)):
                    if kind in kinds:
                        sl = tuple(Slice(s.param, s.dim, s.view, ax) for s in qkv) + \
                             tuple(Slice(s.param, s.dim, s.view, ax - 1) for s in out)
                        groups.append(UnitGroup(f"{P}.attn:{kind}", kind, A, (H, dh)[ax - 1], sl, layer=i,
                                                modality="text"))
                hidden += [(f"{P}.ln_1.weight", 0), (f"{P}.ln_1.bias", 0), (f"{A}.c_attn.weight", 0),
                           (f"{A}.c_proj.weight", 1), (f"{A}.c_proj.bias", 0)]
                if "layer" in kinds:
                    names = [f"{P}.ln_1.{w}" for w in ("weight", "bias")] + \
                            [f"{A}.{n}.{w}" for n in ("c_attn", "c_proj") for w in ("weight", "bias")]
                    groups.append(hf.layer_group(P, "attn", A, params, i, names))
            if block.mlp is not None:
                M = f"{P}.mlp"
                dff = block.mlp.c_fc.weight.shape[1]
                if "ffn" in kinds:
                    sl = (Slice(f"{M}.c_fc.weight", 1, (dff,), 0), Slice(f"{M}.c_fc.bias", 0, (dff,), 0),
                          Slice(f"{M}.c_proj.weight", 0, (dff,), 0))
                    groups.append(UnitGroup(f"{P}.ffn:ffn", "ffn", M, dff, sl, layer=i, modality="text"))
                hidden += [(f"{P}.ln_2.weight", 0), (f"{P}.ln_2.bias", 0), (f"{M}.c_fc.weight", 0),
                           (f"{M}.c_proj.weight", 1), (f"{M}.c_proj.bias", 0)]
                if "layer" in kinds:
                    names = [f"{P}.ln_2.{w}" for w in ("weight", "bias")] + \
                            [f"{M}.{n}.{w}" for n in ("c_fc", "c_proj") for w in ("weight", "bias")]
                    groups.append(hf.layer_group(P, "ffn", M, params, i, names))
        if "hidden" in kinds:
            groups.insert(0, UnitGroup("hidden", "hidden", "transformer.wte", d, hf.hidden_slices(hidden, d),
                                       modality="text"))
        return fill_params_per_unit(model, Structure(groups))

    # --- masks -------------------------------------------------------------------------------
    def mask_sites(self, model, ffn_at="pre_act") -> list:
        S = hf.Site

        def C(prefix, where):                 # Conv1D folds
            return hf.linear_folds(prefix, where, conv1d=True)
        sites = [S("hidden", "transformer.drop", "out",
                   folds=[("transformer.wte.weight", 1), ("transformer.wpe.weight", 1)]),
                 S("hidden", "transformer.ln_f", "norm"),
                 S("hidden", "lm_head", "in", folds=hf.linear_folds("lm_head", "in"))]
        for i, block in enumerate(model.transformer.h):
            P = f"transformer.h.{i}"
            if block.attn is not None:
                A = f"{P}.attn"
                sites += [S("hidden", f"{P}.ln_1", "norm"),
                          S("hidden", f"{A}.c_proj", "out", folds=C(f"{A}.c_proj", "out")),
                          S(f"{P}.attn:layer", f"{A}.c_proj", "out", folds=C(f"{A}.c_proj", "out")),
                          S(f"{P}.attn:head", f"{A}.c_proj", "in", "outer", folds=C(f"{A}.c_proj", "in")),
                          S(f"{P}.attn:head_dim", f"{A}.c_attn", "out", folds=C(f"{A}.c_attn", "out"))]
            if block.mlp is not None:
                M = f"{P}.mlp"
                sites += [S("hidden", f"{P}.ln_2", "norm"),
                          S("hidden", f"{M}.c_proj", "out", folds=C(f"{M}.c_proj", "out")),
                          S(f"{P}.ffn:layer", f"{M}.c_proj", "out", folds=C(f"{M}.c_proj", "out")),
                          S(f"{P}.ffn:ffn", f"{M}.c_fc", "out", folds=C(f"{M}.c_fc", "out")) if ffn_at == "pre_act"
                          else S(f"{P}.ffn:ffn", f"{M}.c_proj", "in", folds=C(f"{M}.c_proj", "in"))]
        return sites

    # --- extraction --------------------------------------------------------------------------
    def fix_modules(self, model, structure, keep, options):
        from transformers.pytorch_utils import Conv1D
        hf.clear_masks(model)
        scale = options.get("attention_scale", self.DEFAULT_ATTENTION_SCALE)
        if scale not in ("sliced", "fixed"):
            raise BenchError(f"attention_scale must be 'sliced' or 'fixed', got {scale!r}")
        for mod in model.modules():
            if isinstance(mod, Conv1D):
                mod.nx, mod.nf = mod.weight.shape
        for i, block in enumerate(model.transformer.h):
            P = f"transformer.h.{i}"
            a = block.attn
            if a is not None:
                if f"{P}.attn:head" in keep:
                    a.num_heads = int(keep[f"{P}.attn:head"].sum())
                if f"{P}.attn:head_dim" in keep:
                    a.head_dim = int(keep[f"{P}.attn:head_dim"].sum())
                a.split_size = a.embed_dim = a.num_heads * a.head_dim
                assert 3 * a.split_size == a.c_attn.nf, (P, a.split_size, a.c_attn.nf)
                # "sliced": the original scaling (incl. scale_attn_by_inverse_layer_idx) times sqrt(old/new)
                a.scaling = a._orig_scaling * ((a._orig_head_dim / a.head_dim) ** 0.5 if scale == "sliced" else 1.0)
                if f"{P}.attn:layer" in keep and not bool(keep[f"{P}.attn:layer"].any()):
                    block.attn = block.ln_1 = None
            if block.mlp is not None and f"{P}.ffn:layer" in keep and not bool(keep[f"{P}.ffn:layer"].any()):
                block.mlp = block.ln_2 = None
        hf.retie(model)
        hf.materialise_buffers(model)

    def load_checkpoint(self, model, path, log=print):
        """transformers GPT-2 checkpoint (folder or file). The official `gpt2` files hold GPT2Model keys
        (h.0..., wte, wpe, ln_f) and no lm_head (tied): both layouts are read."""
        state = load_state_dict(path, f"checkpoint for {self.arch}")

        def rename(k):
            k = k.removeprefix("module.")
            if k.endswith((".attn.bias", ".attn.masked_bias")):
                return None                        # causal-mask buffers of old exports
            return k if k.startswith(("transformer.", "lm_head.")) else f"transformer.{k}"
        return hf.load_mapped(model, state, rename, what=f"checkpoint {path}", log=log, arch=self.arch,
                              source=path)
