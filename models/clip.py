"""CLIP family (open_clip), as UPop prunes it for image-text retrieval (docs/specs/upop.md §2.2, §5, §9.11, §9.16).

The model is `ClipRetrieval`: an open_clip `CLIP` (`clip.`) plus its momentum copy (`clip_m.`, EMA 0.995,
no gradients) and the ITC queues, i.e. the training set-up of UPop's CLIP retrieval code; the paper counts
the momentum encoder in Params (856.0 M for ViT-L/14@336) and measured FLOPs on that training forward
(395.7 G, about twice the inference cost).

Every residual block of both towers gets two drop-in layers that keep open_clip's parameter names (so
open_clip / OpenAI checkpoints load unchanged):
- `PrunableMHA` replaces `nn.MultiheadAttention` (UPop monkey-patches it the same way, docs/specs/upop.md §9.16): the
  packed in-projection `in_proj_weight`/`in_proj_bias`, then an optional `dim_mask` (length head_dim,
  shared by all heads) multiplies q, k and v after the head reshape, then SDPA, then `out_proj`.
  After slicing head_dim may be anything down to 1. The softmax scale is 1/sqrt(kept head_dim) by default,
  as UPop's patched MHA (attention_scale "sliced"); "fixed" keeps 1/sqrt(original head_dim).
- `PrunableMlp` (an nn.Sequential with c_fc, gelu, c_proj): an optional `neuron_mask` multiplies c_fc's
  output before (Quick)GELU.

Unit kinds: `head_dim` and `ffn`, modality "vision" (visual.transformer) or "text" (transformer). Each
unit's slices include the momentum copy, so extraction cuts `clip_m` identically; afterwards the momentum
copy is re-copied from the main model as the official `copy_params()` (option `copy_momentum`, default on).

ITC options (arch config keys, a card's `model_config` overrides them): `distill_alpha` (0.4; the retrieval task
scales it per step with `set_distill_alpha_scale`, recipe `distill_alpha_warmup`), `queue_features` ("momentum":
the queue takes the momentum features, as BLIP; "main": the main model's, as the official CLIP forward) and
`momentum_ln_final` ("own": the momentum text tower ends in its own EMA ln_final; "main": in the main model's, as
the official encode_text_m). clip_vit_l14_336 sets both to the official choice, clip_micro keeps the defaults.

Model API (shared with BLIP, see the VL contract): image_features / text_features / has_itm=False /
retrieval_loss / set_distill_alpha_scale / forward(images, input_ids, attention_mask, idx=None,
mode="inference"|"train").
Text pooling takes the last non-pad token (attention_mask), which is open_clip's EOT position for its own
tokenizer (EOT is the last token before the zero padding) and [SEP] for the micro tokenizer.
"""
from __future__ import annotations

import copy
import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from bench import distributed as dist
from bench.api import ModelAdapter
from bench.checkpoints import check_matches, load_state_dict
from bench.errors import BenchError
from bench.registry import register_model_family
from bench.structure import Slice, Structure, UnitGroup, fill_params_per_unit


class PrunableMHA(nn.Module):
    """nn.MultiheadAttention's parameters and call signature (self-attention only), any head_dim."""

    def __init__(self, embed_dim: int, num_heads: int, batch_first: bool = True):
        super().__init__()
        self.embed_dim, self.num_heads, self.batch_first = embed_dim, num_heads, batch_first
        self.head_dim = embed_dim // num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.scale = self.head_dim ** -0.5
        self.dim_mask = None

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention) -> "PrunableMHA":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.embed_dim, new.num_heads, new.batch_first = mha.embed_dim, mha.num_heads, mha.batch_first
        new.head_dim = mha.embed_dim // mha.num_heads
        new.in_proj_weight, new.in_proj_bias, new.out_proj = mha.in_proj_weight, mha.in_proj_bias, mha.out_proj
        new.scale = new.head_dim ** -0.5
        new.dim_mask = None
        return new

    def forward(self, query, key=None, value=None, need_weights=False, attn_mask=None, key_padding_mask=None, **_):
        x = query if self.batch_first else query.transpose(0, 1)
        B, N, _ = x.shape
        H, dh = self.num_heads, self.head_dim
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).reshape(B, N, 3, H, dh).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.dim_mask is not None:      # UPop: after the in-projection (bias included) and the head reshape
            q, k, v = q * self.dim_mask, k * self.dim_mask, v * self.dim_mask
        mask = attn_mask
        if key_padding_mask is not None:
            pad = torch.zeros(B, 1, 1, N, dtype=q.dtype, device=q.device).masked_fill(
                key_padding_mask.view(B, 1, 1, N).bool(), float("-inf"))
            mask = pad if mask is None else mask + pad
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        out = self.out_proj(out.transpose(1, 2).reshape(B, N, H * dh))
        return (out if self.batch_first else out.transpose(0, 1)), None


class PrunableMlp(nn.Sequential):
    """open_clip's mlp Sequential(c_fc, gelu, c_proj) with UPop's mask before the activation."""

    def __init__(self, seq: nn.Sequential):
        super().__init__(OrderedDict(seq.named_children()))
        self.neuron_mask = None

    def forward(self, x):
        x = self.c_fc(x)
        if self.neuron_mask is not None:
            x = x * self.neuron_mask
        return self.c_proj(self.gelu(x))


def _instrument(clip: nn.Module) -> None:
    for tower in (clip.visual.transformer, clip.transformer):
        for blk in tower.resblocks:
            if not isinstance(blk.attn, PrunableMHA):
                blk.attn = PrunableMHA.from_mha(blk.attn)
            if not isinstance(blk.mlp, PrunableMlp):
                blk.mlp = PrunableMlp(blk.mlp)


class ClipRetrieval(nn.Module):
    """open_clip CLIP + momentum copy + ITC queues (UPop's CLIP retrieval model)."""

    has_itm = False

    def __init__(self, cfg: dict):
        super().__init__()
        from open_clip.model import CLIP
        self.clip = CLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"], quick_gelu=cfg.get("quick_gelu", True))
        _instrument(self.clip)
        self.momentum = float(cfg.get("momentum", 0.995))
        self.distill_alpha = float(cfg.get("distill_alpha", 0.4))
        self.alpha = self.distill_alpha      # the current ITC alpha: the task may ramp it (set_distill_alpha_scale)
        self.queue_size = int(cfg.get("queue_size", 0))
        self.use_momentum = bool(cfg.get("momentum_encoder", True))
        self.queue_features = cfg.get("queue_features", "momentum")
        if self.queue_features not in ("momentum", "main"):
            raise BenchError(f"clip: queue_features must be 'momentum' or 'main', not {self.queue_features!r}")
        self.momentum_ln_final = cfg.get("momentum_ln_final", "own")
        if self.momentum_ln_final not in ("own", "main"):
            raise BenchError(f"clip: momentum_ln_final must be 'own' or 'main', not {self.momentum_ln_final!r}")
        if self.use_momentum:
            self.clip_m = copy.deepcopy(self.clip)
            for p in self.clip_m.parameters():
                p.requires_grad_(False)
        if self.queue_size:
            d = cfg["embed_dim"]
            self.register_buffer("image_queue", F.normalize(torch.randn(d, self.queue_size), dim=0))
            self.register_buffer("text_queue", F.normalize(torch.randn(d, self.queue_size), dim=0))
            self.register_buffer("idx_queue", torch.full((1, self.queue_size), -100, dtype=torch.long))
            self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    # ------------------------------------------------------------------ encoders
    @staticmethod
    def _encode_image(clip, images):
        return F.normalize(clip.visual(images), dim=-1)

    @staticmethod
    def _encode_text(clip, input_ids, attention_mask, ln_final=None):
        L = input_ids.shape[1]
        x = clip.token_embedding(input_ids) + clip.positional_embedding[:L]
        causal = torch.full((L, L), float("-inf"), device=x.device, dtype=x.dtype).triu_(1)
        x = (ln_final if ln_final is not None else clip.ln_final)(clip.transformer(x, attn_mask=causal))
        last = (attention_mask.sum(1) - 1).clamp(min=0).long()
        x = x[torch.arange(x.shape[0], device=x.device), last]
        x = clip.text_projection(x) if isinstance(clip.text_projection, nn.Linear) else x @ clip.text_projection
        return F.normalize(x, dim=-1)

    def image_features(self, images) -> dict:
        return {"embed": self._encode_image(self.clip, images), "tokens": None}

    def text_features(self, input_ids, attention_mask) -> dict:
        return {"embed": self._encode_text(self.clip, input_ids, attention_mask)}

    def itm_scores(self, image_tokens, input_ids, attention_mask):
        raise BenchError("CLIP has no ITM head: retrieval uses cosine similarity only (has_itm is False)")

    # ------------------------------------------------------------------ training
    def set_distill_alpha_scale(self, scale: float) -> None:
        """ITC alpha = distill_alpha x scale (the task's ramp over the first epoch, recipe distill_alpha_warmup)."""
        self.alpha = self.distill_alpha * float(scale)

    @torch.no_grad()
    def copy_params(self):
        if self.use_momentum:
            for p, pm in zip(self.clip.parameters(), self.clip_m.parameters()):
                pm.data.copy_(p.data)

    @torch.no_grad()
    def _momentum_update(self):
        for p, pm in zip(self.clip.parameters(), self.clip_m.parameters()):
            pm.data.mul_(self.momentum).add_(p.data, alpha=1 - self.momentum)

    @torch.no_grad()
    def _enqueue(self, img, txt, idx):
        n = img.shape[0]
        ptr = int(self.queue_ptr)
        n = min(n, self.queue_size - ptr)
        self.image_queue[:, ptr:ptr + n] = img[:n].T
        self.text_queue[:, ptr:ptr + n] = txt[:n].T
        self.idx_queue[:, ptr:ptr + n] = idx[:n].view(1, -1)
        self.queue_ptr[0] = (ptr + n) % self.queue_size

    def retrieval_loss(self, images, input_ids, attention_mask, idx=None):
        """ITC as BLIP/UPop's retrieval code: targets = the in-batch/queue entries of the same image id,
        softened by the momentum model's similarities (alpha), both directions averaged."""
        B = images.shape[0]
        if idx is None:
            idx = torch.arange(B, device=images.device)
        idx = idx.view(-1, 1)
        with torch.no_grad():
            self.clip.logit_scale.clamp_(0, math.log(100))
        scale = self.clip.logit_scale.exp()
        img = self._encode_image(self.clip, images)
        txt = self._encode_text(self.clip, input_ids, attention_mask)
        idx_all = idx.t() if not self.queue_size else torch.cat([idx.t(), self.idx_queue.clone().detach()], 1)
        pos = torch.eq(idx, idx_all).float()
        targets = pos / pos.sum(1, keepdim=True)
        if self.use_momentum:
            with torch.no_grad():
                if self.training:
                    self._momentum_update()
                img_m = self._encode_image(self.clip_m, images)
                # official encode_text_m applies the main model's ln_final (momentum_ln_final main)
                ln_m = self.clip.ln_final if self.momentum_ln_final == "main" else None
                txt_m = self._encode_text(self.clip_m, input_ids, attention_mask, ln_m)
                img_all = img_m.t() if not self.queue_size else torch.cat([img_m.t(), self.image_queue.clone()], 1)
                txt_all = txt_m.t() if not self.queue_size else torch.cat([txt_m.t(), self.text_queue.clone()], 1)
                t_i2t = self.alpha * F.softmax(scale * img_m @ txt_all, 1) + (1 - self.alpha) * targets
                t_t2i = self.alpha * F.softmax(scale * txt_m @ img_all, 1) + (1 - self.alpha) * targets
        else:
            img_all, txt_all, t_i2t, t_t2i = img.t(), txt.t(), targets, targets
        loss_i2t = -(F.log_softmax(scale * img @ txt_all, 1) * t_i2t).sum(1).mean()
        loss_t2i = -(F.log_softmax(scale * txt @ img_all, 1) * t_t2i).sum(1).mean()
        if self.queue_size and self.training and self.use_momentum:
            # official CLIP forward: `_dequeue_and_enqueue(image_features, text_features, idxs)`, the main model's
            # normalised features (queue_features main); BLIP's (and micro's default) the momentum ones; every
            # rank's rows (concat_all_gather in _dequeue_and_enqueue; one process: this batch's)
            main = self.queue_features == "main"
            q_img, q_txt = (img.detach(), txt.detach()) if main else (img_m, txt_m)
            self._enqueue(dist.gather_cat(q_img), dist.gather_cat(q_txt), dist.gather_cat(idx))
        return (loss_i2t + loss_t2i) / 2

    def forward(self, images, input_ids, attention_mask, idx=None, mode: str = "inference"):
        if mode == "train":
            return self.retrieval_loss(images, input_ids, attention_mask, idx)
        if mode != "inference":
            raise ValueError(f"mode must be 'inference' or 'train', not {mode!r}")
        return self.image_features(images)["embed"] @ self.text_features(input_ids, attention_mask)["embed"].t()


def _cfg(embed_dim, image_size, patch_size, v_width, v_layers, v_head_width, ctx, vocab, t_width, t_heads, t_layers,
         **kw):
    return dict(embed_dim=embed_dim,
                vision_cfg=dict(image_size=image_size, patch_size=patch_size, width=v_width, layers=v_layers,
                                head_width=v_head_width),
                text_cfg=dict(context_length=ctx, vocab_size=vocab, width=t_width, heads=t_heads, layers=t_layers),
                quick_gelu=True, momentum=0.995, distill_alpha=0.4, momentum_encoder=True,
                img_size=image_size, **kw)


@register_model_family("clip")
class ClipAdapter(ModelAdapter):
    """open_clip CLIP with UPop's momentum encoder (retrieval)."""

    UNIT_KINDS = ("head_dim", "ffn")
    MODALITIES = ("vision", "text")
    # UPop's patched MHA divides by sqrt(q.shape[-1]): the scale follows the sliced head_dim (docs/specs/upop.md §9.8)
    DEFAULT_ATTENTION_SCALE = "sliced"
    ARCHS = {
        # the paper's model: OpenAI CLIP ViT-L/14 at 336 (open_clip "ViT-L-14-336", QuickGELU as OpenAI's
        # weights), momentum copy, queue 57,600 (sdc17/UPop clip/model.py CLIP.__init__ `self.queue_size = 57600`)
        # that holds the main model's features (forward: `self._dequeue_and_enqueue(image_features,
        # text_features, idxs)`), momentum text tower through the main ln_final (encode_text_m: `self.ln_final(x)`)
        "clip_vit_l14_336": _cfg(768, 336, 14, 1024, 24, 64, 77, 49408, 768, 12, 12, queue_size=57600,
                                 queue_features="main", momentum_ln_final="main"),
        # micro: 32x32 images, 8x8 patches (16 tokens + cls), 3+3 blocks of width 64 (4 heads of 16),
        # micro tokenizer (vocab 512, sequences up to 32), small queue: trains in under a minute on 1 core; the
        # queue holds the momentum features and the momentum tower its own ln_final (BLIP's way, the defaults:
        # the micro cells recorded before these options)
        "clip_micro": _cfg(64, 32, 8, 64, 3, 16, 32, 512, 64, 4, 3, queue_size=256),
    }

    def build(self):
        return ClipRetrieval(self.config)

    def _towers(self, model):
        yield "vision", "clip.visual.transformer", model.clip.visual.transformer
        yield "text", "clip.transformer", model.clip.transformer

    def structure(self, model, kinds=None) -> Structure:
        kinds = set(kinds or self.UNIT_KINDS)
        unknown = kinds - set(self.UNIT_KINDS)
        if unknown:
            raise BenchError(f"model family clip has no unit kind(s) {sorted(unknown)}; it has {self.UNIT_KINDS}")
        groups = []
        for modality, prefix, tower in self._towers(model):
            for i, blk in enumerate(tower.resblocks):
                p = f"{prefix}.resblocks.{i}"
                copies = [p] + ([p.replace("clip.", "clip_m.", 1)] if model.use_momentum else [])
                H, dh = blk.attn.num_heads, blk.attn.head_dim
                if "head_dim" in kinds:
                    sl = []
                    for c in copies:
                        sl += [Slice(f"{c}.attn.in_proj_weight", 0, (3, H, dh), 2),
                               Slice(f"{c}.attn.in_proj_bias", 0, (3, H, dh), 2),
                               Slice(f"{c}.attn.out_proj.weight", 1, (H, dh), 1)]
                    groups.append(UnitGroup(f"{p}.attn:head_dim", "head_dim", f"{p}.attn", dh, tuple(sl), layer=i,
                                            modality=modality))
                if "ffn" in kinds:
                    d_ff = blk.mlp.c_fc.out_features
                    sl = []
                    for c in copies:
                        sl += [Slice(f"{c}.mlp.c_fc.weight", 0, (d_ff,), 0), Slice(f"{c}.mlp.c_fc.bias", 0, (d_ff,), 0),
                               Slice(f"{c}.mlp.c_proj.weight", 1, (d_ff,), 0)]
                    groups.append(UnitGroup(f"{p}.mlp:ffn", "ffn", f"{p}.mlp", d_ff, tuple(sl), layer=i,
                                            modality=modality))
        return fill_params_per_unit(model, Structure(groups))

    # masks of ones on the main model only (the momentum copy has none during the search, docs/specs/upop.md §3.8)
    MASK_ATTRS = {"head_dim": "dim_mask", "ffn": "neuron_mask"}

    def fix_modules(self, model, structure, keep, options):
        scale_rule = options.get("attention_scale", self.DEFAULT_ATTENTION_SCALE)
        if scale_rule not in ("fixed", "sliced"):
            raise BenchError(f"attention_scale must be 'fixed' or 'sliced', not {scale_rule!r}")
        for g in structure:
            names = [g.module] + ([g.module.replace("clip.", "clip_m.", 1)] if model.use_momentum else [])
            for name in names:
                mod = model.get_submodule(name)
                if g.kind == "head_dim":
                    n = int(keep[g.name].sum())
                    mod.head_dim = n
                    mod.embed_dim = mod.num_heads * n    # the attention width (the residual width is unchanged)
                    mod.dim_mask = None
                    if scale_rule == "sliced":
                        mod.scale = n ** -0.5
                else:
                    mod.neuron_mask = None
        if options.get("copy_momentum", True):
            model.copy_params()   # official: the momentum copy is re-copied from the sliced main model

    # ------------------------------------------------------------------ checkpoints
    @staticmethod
    def map_checkpoint_keys(state: dict, momentum: bool = True) -> dict:
        """open_clip / OpenAI CLIP state dict (visual.*, transformer.*, token_embedding.weight, ...) ->
        this model's names (clip.* and, with the momentum encoder, clip_m.* copies). Keys already in
        this model's naming (clip.*, clip_m.*) pass through; DDP's "module." prefix is dropped; OpenAI's
        metadata entries (input_resolution, context_length, vocab_size) are ignored."""
        out = {}
        for k, v in state.items():
            k = k[len("module."):] if k.startswith("module.") else k
            if k in ("input_resolution", "context_length", "vocab_size"):
                continue
            if k.startswith(("clip.", "clip_m.")):
                out[k] = v
                continue
            out[f"clip.{k}"] = v
            if momentum and f"clip_m.{k}" not in out:
                out.setdefault(f"clip_m.{k}", v)
        return out

    def load_checkpoint(self, model, path):
        """open_clip / OpenAI CLIP state dict (a TorchScript archive too), or UPop's retrieval .pth; the
        momentum copy (clip_m.*) is filled from the same weights; missing queues keep their init."""
        state = load_state_dict(path, f"checkpoint for {self.arch}", expected=(
            "  an open_clip / OpenAI CLIP ViT-L-14-336 state dict (.pt/.pth/.bin/.safetensors), or "
            "UPop's clip_large_retrieval_coco.pth / clip_large_retrieval_flickr.pth"))
        state = self.map_checkpoint_keys(state, model.use_momentum)
        check_matches(model, state, self.arch, path, optional=lambda k: k.endswith(("_queue", "queue_ptr")))
        model.load_state_dict(state, strict=False)
