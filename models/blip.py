"""BLIP (Li et al., ICML 2022) as UPop prunes it: NLVR2, VQA, captioning and retrieval variants.

Built from `transformers`' BLIP parts (transformers.models.blip): the ViT is `BlipVisionEmbeddings` +
`BlipEncoderLayer`s whose attention / MLP are our subclasses of `BlipAttention` / `BlipMLP`, and the BERT
text encoder/decoder is made of `BlipTextEmbeddings`, `BlipTextAttention` (its `self` swapped for our
subclass of `BlipTextSelfAttention`), `BlipTextIntermediate` (subclassed), `BlipTextOutput` and
`BlipTextPredictionHeadTransform`. The text side keeps the official BLIP (med.py) parameter names
(`text_encoder.encoder.layer.3.crossattention.self.query.weight`...), the vision side keeps transformers'
names; `load_checkpoint` maps BLIP's released .pth files (timm-style `visual_encoder.blocks.3.attn.qkv`)
onto them.

What UPop needs (docs/specs/upop.md §2):
- `head_dim` units: one mask entry per per-head dimension, shared by all heads and by q, k and v, applied
  after the projections and the head reshape (ViT: on the fused qkv; BERT: on query/key/value after
  `transpose_for_scores`). Pruning unit d removes row d of every head of q, k, v (+bias) and column d of
  every head of the output projection. head_dim may shrink to 1; the number of heads never changes.
- `ffn` units: one entry per FFN neuron, on fc1 / intermediate.dense's output before GELU.
- Groups carry a modality: "vision" (ViT), "text" (BERT self-attention and FFN; the caption / VQA answer
  decoder's too), "fusion" (cross-attention). NLVR2's two cross-attentions per layer (one per image,
  `self0`/`self1` with `output.dense0`/`dense1`) are separate groups. Never pruned: embeddings, LayerNorms,
  heads (cls_head, itm_head, LM head), projections, NLVR2's merge_layer.
- Attention scale after slicing (upop.md §9.8): the official BLIP ViT keeps 1/sqrt(64) (computed at
  construction), the official BERT code divides by sqrt(attention_head_size), which slicing changes.
  `DEFAULT_ATTENTION_SCALE = "official"` reproduces exactly that (vision fixed, text sliced); extraction
  options "fixed" / "sliced" force one rule on every module.
- Retrieval: the momentum encoders (`visual_encoder_m`, `text_encoder_m`, projections) are parameters
  (counted: 447.6 M), carry no masks, and are sliced with the same keep-masks (each unit's slices include
  the momentum copies); after extraction they are re-copied from the main encoders, as the official
  `copy_params()` does.

Variants (config key `variant`): nlvr2, vqa, caption, retrieval; each has a paper-size arch (ViT-B/16 +
BERT-base, image 384; VQA 480) and a micro arch (32 px images, 8 px patches, width 64, 2-3 layers,
vocabulary 512). Models never tokenise; they swap position 0 of the ids to [ENC] / [DEC] where BLIP does.

NLVR2 (BLIP's nlvr_encoder.py design, rebuilt from transformers' parts): every text layer has self-attention
then two cross-attentions over the same hidden states, one to each image's tokens; their output
projections `dense0`/`dense1` are averaged for layers < `merge_from` (6) and concatenated through
`merge_layer` (Linear 2d -> d) from layer 6 on, then the residual LayerNorm; cls_head = Linear-ReLU-Linear
on the [ENC] output. The layer split (average vs merge layer) follows the official file as described in
upop.md §2 (merge layer in layers >= 6); the paper-size parameter count (259.37 M without masks, 259.45 M
reported with the masks) confirms the shapes.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.blip.configuration_blip import BlipTextConfig, BlipVisionConfig
from transformers.models.blip.modeling_blip import BlipAttention, BlipEncoderLayer, BlipMLP, BlipVisionEmbeddings
from transformers.models.blip.modeling_blip_text import (BlipTextAttention, BlipTextEmbeddings, BlipTextIntermediate,
                                                         BlipTextOutput, BlipTextPredictionHeadTransform,
                                                         BlipTextSelfAttention)

from bench import distributed as dist
from bench.api import ModelAdapter
from bench.checkpoints import check_matches, load_state_dict
from bench.errors import BenchError
from bench.registry import register_model_family
from bench.structure import Slice, Structure, UnitGroup, fill_params_per_unit

NEG_INF = -10000.0      # BERT's additive mask value (BLIP's med.py)

# ----------------------------------------------------------------------------------------------------
# prunable building blocks


class PrunableVisionAttention(BlipAttention):
    """BlipAttention with a mutable head_dim, a softmax scale fixed at construction (BLIP ViT) and UPop's
    `dim_mask` (length head_dim, on q, k and v after the head reshape, shared by all heads)."""

    def __init__(self, config):
        super().__init__(config)
        self.dim_mask = None

    def forward(self, hidden_states, **kwargs):
        B, N, _ = hidden_states.shape
        qkv = self.qkv(hidden_states).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.dim_mask is not None:
            qkv = qkv * self.dim_mask
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = torch.matmul(q, k.transpose(-1, -2)) * self.scale
        attn = self.dropout(attn.softmax(dim=-1))
        ctx = torch.matmul(attn, v).permute(0, 2, 1, 3).reshape(B, N, self.num_heads * self.head_dim)
        return self.projection(ctx), None


class PrunableVisionMLP(BlipMLP):
    """BlipMLP with UPop's `neuron_mask` on fc1's output, before the activation."""

    def __init__(self, config):
        super().__init__(config)
        self.neuron_mask = None

    def forward(self, hidden_states):
        h = self.fc1(hidden_states)
        if self.neuron_mask is not None:
            h = h * self.neuron_mask
        return self.fc2(self.activation_fn(h))


class VisionBlock(BlipEncoderLayer):
    """BlipEncoderLayer (pre-norm ViT block) with the prunable attention and MLP, and the `drop_path` of BLIP's
    own ViT block (vit.py: one DropPath on both residual branches; Identity unless the recipe's drop_path sets
    it through BlipAdapter.set_drop_path). The forward is transformers' with that drop path added."""

    def __init__(self, config):
        super().__init__(config)
        self.self_attn = PrunableVisionAttention(config)
        self.mlp = PrunableVisionMLP(config)
        self.drop_path = nn.Identity()

    def forward(self, hidden_states, **kwargs):
        h, _ = self.self_attn(hidden_states=self.layer_norm1(hidden_states), **kwargs)
        hidden_states = hidden_states + self.drop_path(h)
        return hidden_states + self.drop_path(self.mlp(self.layer_norm2(hidden_states)))


class VisionEncoder(nn.Module):
    """BLIP's ViT: BlipVisionEmbeddings + blocks + final LayerNorm; returns all tokens (B, 1+N, C)."""

    def __init__(self, config: BlipVisionConfig):
        super().__init__()
        self.embeddings = BlipVisionEmbeddings(config)
        self.layers = nn.ModuleList([VisionBlock(config) for _ in range(config.num_hidden_layers)])
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, images):
        h = self.embeddings(images)
        for blk in self.layers:
            h = blk(h)
        return self.post_layernorm(h)


class PrunableTextSelfAttention(BlipTextSelfAttention):
    """BERT (self or cross) attention with a mutable head size, an explicit scale attribute and UPop's
    `dim_mask` on q, k, v after `transpose_for_scores`. No KV cache (generation recomputes)."""

    def __init__(self, config, is_cross_attention):
        super().__init__(config, is_cross_attention)
        self.scale = self.attention_head_size ** -0.5
        self.dim_mask = None

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                **kwargs):
        src = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        mask = attention_mask
        if encoder_hidden_states is not None and encoder_attention_mask is not None:
            mask = encoder_attention_mask
        dh = self.attention_head_size
        q = self.query(hidden_states).view(*hidden_states.shape[:-1], -1, dh).transpose(1, 2)
        k = self.key(src).view(*src.shape[:-1], -1, dh).transpose(1, 2)
        v = self.value(src).view(*src.shape[:-1], -1, dh).transpose(1, 2)
        if self.dim_mask is not None:
            q, k, v = q * self.dim_mask, k * self.dim_mask, v * self.dim_mask
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale
        if mask is not None:
            scores = scores + mask
        probs = self.dropout(scores.softmax(dim=-1))
        ctx = torch.matmul(probs, v).permute(0, 2, 1, 3)
        return ctx.reshape(*ctx.shape[:-2], self.num_attention_heads * dh), probs


class PrunableIntermediate(BlipTextIntermediate):
    def __init__(self, config):
        super().__init__(config)
        self.neuron_mask = None

    def forward(self, hidden_states):
        h = self.dense(hidden_states)
        if self.neuron_mask is not None:
            h = h * self.neuron_mask
        return self.intermediate_act_fn(h)


def _text_attention(config, cross: bool) -> BlipTextAttention:
    att = BlipTextAttention(config, is_cross_attention=cross)
    att.self = PrunableTextSelfAttention(config, cross)
    return att


class TwinOutput(nn.Module):
    """NLVR2's output of the two cross-attentions: dense0/dense1, averaged (layers < merge_from) or
    concatenated through merge_layer, then dropout + residual LayerNorm (BLIP nlvr_encoder.py)."""

    def __init__(self, config, merge: bool):
        super().__init__()
        d = config.hidden_size
        self.dense0 = nn.Linear(d, d)
        self.dense1 = nn.Linear(d, d)
        self.merge_layer = nn.Linear(2 * d, d) if merge else None
        self.LayerNorm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, h0, h1, input_tensor):
        h0, h1 = self.dense0(h0), self.dense1(h1)
        h = self.merge_layer(torch.cat([h0, h1], dim=-1)) if self.merge_layer is not None else (h0 + h1) / 2
        return self.LayerNorm(self.dropout(h) + input_tensor)


class TwinCrossAttention(nn.Module):
    def __init__(self, config, merge: bool):
        super().__init__()
        self.self0 = PrunableTextSelfAttention(config, True)
        self.self1 = PrunableTextSelfAttention(config, True)
        self.output = TwinOutput(config, merge)

    def forward(self, hidden_states, encoder_hidden_states, encoder_attention_mask):
        c0, _ = self.self0(hidden_states, encoder_hidden_states=encoder_hidden_states[0],
                           encoder_attention_mask=encoder_attention_mask[0])
        c1, _ = self.self1(hidden_states, encoder_hidden_states=encoder_hidden_states[1],
                           encoder_attention_mask=encoder_attention_mask[1])
        return self.output(c0, c1, hidden_states)


class TextLayer(nn.Module):
    """BERT layer of BLIP's med.py: self-attention, optional cross-attention (single, or NLVR2's twin),
    FFN. Cross-attention runs only when encoder states are given (BLIP's mode='text' skips it)."""

    def __init__(self, config, cross: str | None, merge: bool = False):
        super().__init__()
        self.attention = _text_attention(config, False)
        if cross == "single":
            self.crossattention = _text_attention(config, True)
        elif cross == "twin":
            self.crossattention = TwinCrossAttention(config, merge)
        self.cross = cross
        self.intermediate = PrunableIntermediate(config)
        self.output = BlipTextOutput(config)

    def forward(self, h, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None):
        h, _ = self.attention(h, attention_mask=attention_mask)
        if encoder_hidden_states is not None:
            if self.cross == "twin":
                h = self.crossattention(h, encoder_hidden_states, encoder_attention_mask)
            else:
                h, _ = self.crossattention(h, attention_mask=encoder_attention_mask,
                                           encoder_hidden_states=encoder_hidden_states)
        return self.output(self.intermediate(h), h)


class _Layers(nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.layer = nn.ModuleList(layers)


def _extended_mask(attention_mask, causal: bool, dtype):
    """(B, L) 1/0 -> additive (B, 1, L, L) or (B, 1, 1, L) mask (BERT's get_extended_attention_mask)."""
    if attention_mask is None:
        return None
    m = attention_mask[:, None, None, :].to(dtype)
    if causal:
        L = attention_mask.shape[1]
        tri = torch.ones(L, L, device=attention_mask.device, dtype=dtype).tril()
        m = m * tri[None, None]
    return (1.0 - m) * NEG_INF


class TextModel(nn.Module):
    """BLIP's BertModel (med.py, add_pooling_layer=False): embeddings + layers; `causal` for the decoder."""

    def __init__(self, config, cross: str | None, merge_from: int = 10 ** 9):
        super().__init__()
        self.embeddings = BlipTextEmbeddings(config)
        self.encoder = _Layers([TextLayer(config, cross, merge=i >= merge_from)
                                for i in range(config.num_hidden_layers)])

    def forward(self, input_ids, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                causal: bool = False):
        h = self.embeddings(input_ids=input_ids)
        mask = _extended_mask(attention_mask, causal, h.dtype)
        if causal and mask is None:
            mask = _extended_mask(torch.ones(input_ids.shape, device=input_ids.device), True, h.dtype)
        if isinstance(encoder_attention_mask, (list, tuple)):
            enc_mask = [_extended_mask(m, False, h.dtype) for m in encoder_attention_mask]
        else:
            enc_mask = _extended_mask(encoder_attention_mask, False, h.dtype)
        for layer in self.encoder.layer:
            h = layer(h, mask, encoder_hidden_states, enc_mask)
        return h


class LMHead(nn.Module):
    """BERT LM head (`cls.predictions`): transform + decoder tied to the word embeddings + bias. The tie is
    done in forward (the embedding weight is passed in), so the state dict holds the tensor once."""

    def __init__(self, config):
        super().__init__()
        self.transform = BlipTextPredictionHeadTransform(config)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, h, word_embeddings):
        return F.linear(self.transform(h), word_embeddings, self.bias)


class _Predictions(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.predictions = LMHead(config)


class TextDecoder(nn.Module):
    """BLIP's BertLMHeadModel: causal BERT with cross-attention (`bert`) + tied LM head (`cls`). The loss is
    the official one: shifted CE with label smoothing 0.1, pad/prompt labels -100."""

    def __init__(self, config, label_smoothing: float = 0.1):
        super().__init__()
        self.bert = TextModel(config, cross="single")
        self.cls = _Predictions(config)
        self.label_smoothing = label_smoothing

    def forward(self, input_ids, attention_mask, encoder_hidden_states, encoder_attention_mask=None):
        h = self.bert(input_ids, attention_mask, encoder_hidden_states, encoder_attention_mask, causal=True)
        return self.cls.predictions(h, self.bert.embeddings.word_embeddings.weight)

    def lm_loss(self, logits, labels, reduction="mean"):
        """Shifted LM loss; reduction 'none' gives the per-sequence sum (med.py's reduction='none')."""
        shifted = logits[:, :-1].contiguous()
        lab = labels[:, 1:].contiguous()
        loss = F.cross_entropy(shifted.view(-1, shifted.shape[-1]), lab.view(-1), ignore_index=-100,
                               label_smoothing=self.label_smoothing, reduction=reduction)
        if reduction == "none":
            loss = loss.view(logits.shape[0], -1).sum(1)
        return loss


# ----------------------------------------------------------------------------------------------------
# configs


def _vision_config(c: dict) -> BlipVisionConfig:
    return BlipVisionConfig(hidden_size=c["vision_width"], intermediate_size=c["vision_mlp"],
                            num_hidden_layers=c["vision_layers"], num_attention_heads=c["vision_heads"],
                            image_size=c["image_size"], patch_size=c["patch_size"], hidden_act="gelu",
                            layer_norm_eps=c.get("vision_eps", 1e-6), attention_dropout=0.0)


def _text_config(c: dict, layers_key: str = "text_layers") -> BlipTextConfig:
    return BlipTextConfig(vocab_size=c["vocab_size"], hidden_size=c["text_width"],
                          encoder_hidden_size=c["vision_width"], intermediate_size=c["text_mlp"],
                          num_hidden_layers=c[layers_key], num_attention_heads=c["text_heads"],
                          max_position_embeddings=c["max_position"], hidden_act="gelu",
                          layer_norm_eps=c.get("text_eps", 1e-12),
                          hidden_dropout_prob=float(c.get("hidden_dropout_prob", 0.0)),
                          attention_probs_dropout_prob=float(c.get("attention_probs_dropout_prob", 0.0)),
                          pad_token_id=c["pad_token_id"],
                          bos_token_id=c["bos_token_id"], sep_token_id=c["sep_token_id"])


def _set_first(ids, token_id: int):
    """ids with position 0 replaced by token_id (no in-place write: works on meta and keeps the input)."""
    return torch.cat([torch.full_like(ids[:, :1], token_id), ids[:, 1:]], dim=1)


# ----------------------------------------------------------------------------------------------------
# the four models


class BlipBase(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.cfg = dict(cfg)
        self.visual_encoder = VisionEncoder(_vision_config(cfg))

    def _ids(self, name):
        return int(self.cfg[name])


class BlipNLVR2(BlipBase):
    """model(image0, image1, input_ids, attention_mask) -> logits (B, 2). mode="train" is the same forward."""

    def __init__(self, cfg):
        super().__init__(cfg)
        tc = _text_config(cfg)
        self.text_encoder = TextModel(tc, cross="twin", merge_from=int(cfg.get("merge_from", 6)))
        d = cfg["text_width"]
        self.cls_head = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, 2))

    def forward(self, image0, image1, input_ids, attention_mask, mode: str = "inference"):
        emb = self.visual_encoder(torch.cat([image0, image1], dim=0))
        e0, e1 = emb[:image0.shape[0]], emb[image0.shape[0]:]
        ids = _set_first(input_ids, self._ids("enc_token_id"))
        h = self.text_encoder(ids, attention_mask, [e0, e1], [None, None])
        return self.cls_head(h[:, 0])


class BlipCaption(BlipBase):
    """Captioning: ViT + BERT decoder. caption_loss / generate_captions / forward (contract)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.text_decoder = TextDecoder(_text_config(cfg))

    def caption_loss(self, images, input_ids, attention_mask, prompt_len=None):
        prompt_len = int(self.cfg.get("prompt_len", 4) if prompt_len is None else prompt_len)
        emb = self.visual_encoder(images)
        ids = _set_first(input_ids, self._ids("bos_token_id"))
        labels = ids.masked_fill(ids == self._ids("pad_token_id"), -100)
        pos = torch.arange(ids.shape[1], device=ids.device)[None]
        labels = labels.masked_fill(pos < prompt_len, -100)     # the prompt "a picture of" is not learnt
        logits = self.text_decoder(ids, attention_mask, emb)
        return self.text_decoder.lm_loss(logits, labels)

    def forward(self, images, input_ids, attention_mask, mode: str = "inference", prompt_len=None):
        if mode == "train":
            return self.caption_loss(images, input_ids, attention_mask, prompt_len)
        emb = self.visual_encoder(images)
        return self.text_decoder(_set_first(input_ids, self._ids("bos_token_id")), attention_mask, emb)

    @torch.no_grad()
    def generate_captions(self, images, prompt_ids, max_length: int = 20, min_length: int = 5,
                          num_beams: int = 3) -> list:
        """Beam search (num_beams=1: greedy) as BLIP's generate: the prompt ([CLS]->[DEC] at 0, no [SEP]) is
        given, max/min_length count the whole sequence including the prompt, [SEP] ends a caption (not
        allowed before min_length), length penalty 1 (score / length). Returns the ids after the prompt."""
        emb = self.visual_encoder(images)
        return beam_search(lambda ids, enc: self.text_decoder(ids, torch.ones_like(ids), enc), emb, prompt_ids,
                           self._ids("bos_token_id"), self._ids("sep_token_id"), self._ids("pad_token_id"),
                           max_length, min_length, num_beams)


def beam_search(step_logits, enc, prompt_ids, bos, sep, pad, max_length, min_length, num_beams):
    B = enc.shape[0]
    prompt = torch.as_tensor(prompt_ids, dtype=torch.long, device=enc.device)
    if prompt.dim() == 1:
        prompt = prompt[None].expand(B, -1)
    prompt = _set_first(prompt, bos)
    P, K = prompt.shape[1], max(1, int(num_beams))
    out = []
    for b in range(B):
        e = enc[b:b + 1]
        beams = [(0.0, prompt[b].tolist())]
        finished = []
        while beams:
            cur_len = len(beams[0][1])
            if cur_len >= max_length:
                finished += [(s / cur_len, seq) for s, seq in beams]
                break
            ids = torch.tensor([seq for _, seq in beams], device=enc.device)
            logp = step_logits(ids, e.expand(len(beams), *e.shape[1:]))[:, -1].float().log_softmax(-1)
            logp[:, pad] = -math.inf
            if cur_len < min_length:
                logp[:, sep] = -math.inf
            cand = torch.tensor([s for s, _ in beams], device=enc.device)[:, None] + logp
            top = cand.view(-1).topk(min(2 * K, cand.numel()))
            new = []
            for score, flat in zip(top.values.tolist(), top.indices.tolist()):
                bi, tok = divmod(flat, logp.shape[1])
                seq = beams[bi][1] + [tok]
                if tok == sep:
                    finished.append((score / len(seq), seq))
                else:
                    new.append((score, seq))
                if len(new) == K:
                    break
            beams = new
            if len(finished) >= K:
                # stop when no alive beam can beat the best finished one (HF's early_stopping=False bound)
                best = max(f[0] for f in finished)
                if not beams or max(s for s, _ in beams) / max_length <= best:
                    break
        best = max(finished, key=lambda f: f[0])[1] if finished else beams[0][1]
        body = best[P:]
        if sep in body:
            body = body[:body.index(sep)]
        out.append(body)
    return out


class BlipVQA(BlipBase):
    """VQA: ViT + question encoder (BERT with cross-attention, [ENC] at 0) + answer decoder ([DEC] at 0)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.text_encoder = TextModel(_text_config(cfg), cross="single")
        self.text_decoder = TextDecoder(_text_config(cfg, "decoder_layers"))

    def _questions(self, images, q_ids, q_mask):
        emb = self.visual_encoder(images)
        return self.text_encoder(_set_first(q_ids, self._ids("enc_token_id")), q_mask, emb)

    def vqa_loss(self, images, q_ids, q_mask, a_ids, a_mask, weights=None, n=None):
        """BLIP's VQA training loss: question i repeated n[i] times for its answers, per-answer LM loss
        (label smoothing 0.1) times its weight, summed and divided by the number of images."""
        q_states = self._questions(images, q_ids, q_mask)
        if n is None:
            n = [1] * q_states.shape[0]
        n = [int(k) for k in (n.tolist() if torch.is_tensor(n) else n)]
        states = torch.cat([q_states[b:b + 1].expand(k, *q_states.shape[1:]) for b, k in enumerate(n)], dim=0)
        atts = torch.cat([q_mask[b:b + 1].expand(k, -1) for b, k in enumerate(n)], dim=0)
        ids = _set_first(a_ids, self._ids("bos_token_id"))
        labels = ids.masked_fill(ids == self._ids("pad_token_id"), -100)
        logits = self.text_decoder(ids, a_mask, states, atts)
        loss = self.text_decoder.lm_loss(logits, labels, reduction="none")
        if weights is not None:
            loss = weights.to(loss.dtype) * loss
        return loss.sum() / images.shape[0]

    def forward(self, images, q_ids, q_mask, a_ids, a_mask, weights=None, n=None, mode: str = "inference"):
        if mode == "train":
            return self.vqa_loss(images, q_ids, q_mask, a_ids, a_mask, weights, n)
        q_states = self._questions(images, q_ids, q_mask)
        return self.text_decoder(_set_first(a_ids, self._ids("bos_token_id")), a_mask, q_states, q_mask)

    @torch.no_grad()
    def rank_answers(self, images, q_ids, q_mask, answer_ids, answer_mask, k: int = 128):
        """BLIP's rank_answer: top-k answers by the probability of their first token, re-ranked by the
        decoder's full answer log-likelihood (-LM loss with its label smoothing). Returns (B,) indices."""
        q_states = self._questions(images, q_ids, q_mask)
        B, A = q_states.shape[0], answer_ids.shape[0]
        k = min(int(k), A)
        bos = self._ids("bos_token_id")
        start = torch.full((B, 1), bos, dtype=torch.long, device=q_states.device)
        first = self.text_decoder(start, torch.ones_like(start), q_states, q_mask)[:, 0]
        prob_first = first.softmax(-1).index_select(1, answer_ids[:, 1])
        topk_ids = prob_first.topk(k, dim=1).indices                          # (B, k)
        ids = _set_first(answer_ids, bos)[topk_ids.reshape(-1)]
        atts = answer_mask[topk_ids.reshape(-1)]
        labels = ids.masked_fill(ids == self._ids("pad_token_id"), -100)
        states = q_states.repeat_interleave(k, 0)
        logits = self.text_decoder(ids, atts, states, q_mask.repeat_interleave(k, 0))
        logp = -self.text_decoder.lm_loss(logits, labels, reduction="none").view(B, k)
        return topk_ids.gather(1, logp.argmax(1, keepdim=True)).squeeze(1)


class BlipRetrieval(BlipBase):
    """ITC (+ momentum distillation and queues) + ITM with hard negatives, as BLIP's blip_retrieval.py.

    Data parallel (torchrun): as the official code (sdc17/UPop models/blip_retrieval.py, `forward`): the
    queues take the momentum features and ids of every rank (`concat_all_gather` in `_dequeue_and_enqueue`),
    and with `negative_all_rank` (the configs' value: True in UPop's configs/retrieval_coco.yaml and
    retrieval_flickr.yaml) the ITM hard negatives are drawn from the whole world batch, the image embeddings
    gathered with their gradient (`all_gather_with_grad`). In one process both are the local batch."""

    has_itm = True

    def __init__(self, cfg):
        super().__init__(cfg)
        tc = _text_config(cfg)
        d_v, d_t, e = cfg["vision_width"], cfg["text_width"], cfg["embed_dim"]
        self.text_encoder = TextModel(tc, cross="single")
        self.vision_proj, self.text_proj = nn.Linear(d_v, e), nn.Linear(d_t, e)
        self.itm_head = nn.Linear(d_t, 2)
        self.temp = nn.Parameter(torch.tensor(0.07))
        self.visual_encoder_m = VisionEncoder(_vision_config(cfg))
        self.vision_proj_m = nn.Linear(d_v, e)
        self.text_encoder_m = TextModel(tc, cross="single")
        self.text_proj_m = nn.Linear(d_t, e)
        for p in self.momentum_params():
            p.requires_grad_(False)
        q = int(cfg["queue_size"])
        self.register_buffer("image_queue", F.normalize(torch.randn(e, q), dim=0))
        self.register_buffer("text_queue", F.normalize(torch.randn(e, q), dim=0))
        self.register_buffer("idx_queue", torch.full((1, q), -100, dtype=torch.long))
        self.register_buffer("ptr_queue", torch.zeros(1, dtype=torch.long))
        self.momentum = float(cfg.get("momentum", 0.995))
        self.distill_alpha = float(cfg.get("alpha", 0.4))
        self.alpha = self.distill_alpha   # the current ITC alpha: the task may ramp it over epoch 0 as BLIP does
        self.negative_all_rank = bool(cfg.get("negative_all_rank", True))

    def set_distill_alpha_scale(self, scale: float) -> None:
        """ITC alpha = the config's alpha x scale (the task's ramp over the first epoch, recipe
        distill_alpha_warmup; sdc17/UPop compress_retrieval.py l. 88-91)."""
        self.alpha = self.distill_alpha * float(scale)

    PAIRS = (("visual_encoder", "visual_encoder_m"), ("vision_proj", "vision_proj_m"),
             ("text_encoder", "text_encoder_m"), ("text_proj", "text_proj_m"))

    def momentum_params(self):
        return [p for _, m in self.PAIRS for p in getattr(self, m).parameters()]

    @torch.no_grad()
    def copy_params(self):
        for a, b in self.PAIRS:
            for p, pm in zip(getattr(self, a).parameters(), getattr(self, b).parameters()):
                pm.data.copy_(p.data)

    @torch.no_grad()
    def _momentum_update(self):
        for a, b in self.PAIRS:
            for p, pm in zip(getattr(self, a).parameters(), getattr(self, b).parameters()):
                pm.data.mul_(self.momentum).add_(p.data, alpha=1 - self.momentum)

    def image_features(self, images):
        tokens = self.visual_encoder(images)
        return {"embed": F.normalize(self.vision_proj(tokens[:, 0]), dim=-1), "tokens": tokens}

    def text_features(self, input_ids, attention_mask):
        h = self.text_encoder(input_ids, attention_mask)          # mode='text': no cross-attention
        return {"embed": F.normalize(self.text_proj(h[:, 0]), dim=-1)}

    def _itm_logits(self, image_tokens, input_ids, attention_mask):
        h = self.text_encoder(_set_first(input_ids, self._ids("enc_token_id")), attention_mask, image_tokens)
        return self.itm_head(h[:, 0])

    def itm_scores(self, image_tokens, input_ids, attention_mask):
        return self._itm_logits(image_tokens, input_ids, attention_mask)[:, 1]

    def retrieval_loss(self, images, input_ids, attention_mask, idx=None):
        B = images.shape[0]
        meta = images.is_meta
        if not meta:
            with torch.no_grad():
                self.temp.clamp_(0.001, 0.5)
        idx = torch.arange(B, device=images.device) if idx is None else idx.to(images.device)
        img = self.image_features(images)
        txt = self.text_features(input_ids, attention_mask)
        image_embeds, image_feat, text_feat = img["tokens"], img["embed"], txt["embed"]
        idx = idx.view(-1, 1)
        idx_all = torch.cat([idx.t(), self.idx_queue.clone()], dim=1)
        pos_idx = (idx == idx_all).float()
        sim_targets = pos_idx / pos_idx.sum(1, keepdim=True)
        with torch.no_grad():
            if not meta:
                self._momentum_update()
            image_feat_m = F.normalize(self.vision_proj_m(self.visual_encoder_m(images)[:, 0]), dim=-1)
            text_feat_m = F.normalize(self.text_proj_m(self.text_encoder_m(input_ids, attention_mask)[:, 0]), dim=-1)
            image_feat_m_all = torch.cat([image_feat_m.t(), self.image_queue.clone()], dim=1)
            text_feat_m_all = torch.cat([text_feat_m.t(), self.text_queue.clone()], dim=1)
            sim_i2t_m = image_feat_m @ text_feat_m_all / self.temp
            sim_t2i_m = text_feat_m @ image_feat_m_all / self.temp
            i2t_targets = self.alpha * sim_i2t_m.softmax(1) + (1 - self.alpha) * sim_targets
            t2i_targets = self.alpha * sim_t2i_m.softmax(1) + (1 - self.alpha) * sim_targets
        sim_i2t = image_feat @ text_feat_m_all / self.temp
        sim_t2i = text_feat @ image_feat_m_all / self.temp
        loss_ita = (-(F.log_softmax(sim_i2t, 1) * i2t_targets).sum(1).mean()
                    - (F.log_softmax(sim_t2i, 1) * t2i_targets).sum(1).mean()) / 2
        idxs = dist.gather_cat(idx)                  # every rank's ids (one process: this batch's)
        if not meta:
            self._enqueue(dist.gather_cat(image_feat_m), dist.gather_cat(text_feat_m), idxs)

        # ITM: the positive pair, then a hard negative image per text and a hard negative text per image
        enc_ids = _set_first(input_ids, self._ids("enc_token_id"))
        out_pos = self.text_encoder(enc_ids, attention_mask, image_embeds)
        world = self.negative_all_rank and not meta and dist.is_distributed()
        pool_ids, pool_mask, pool_embeds = ((dist.gather_cat(enc_ids, 0), dist.gather_cat(attention_mask, 0),
                                             dist.gather_cat_with_grad(image_embeds)) if world
                                            else (enc_ids, attention_mask, image_embeds))
        neg_img, neg_txt = self._hard_negatives(image_feat, text_feat, idx, meta, idxs if world else idx,
                                                dist.gather_cat(image_feat) if world else image_feat,
                                                dist.gather_cat(text_feat) if world else text_feat)
        ids_neg, atts_neg = pool_ids[neg_txt], pool_mask[neg_txt]
        pad = ids_neg.shape[1] - enc_ids.shape[1]     # the pool is padded to the widest rank's texts: match it
        if pad:                                       # (masked positions: the outputs do not change)
            enc_ids, attention_mask = F.pad(enc_ids, (0, pad)), F.pad(attention_mask, (0, pad))
        ids_all = torch.cat([enc_ids, ids_neg], dim=0)
        atts_all = torch.cat([attention_mask, atts_neg], dim=0)
        embeds_all = torch.cat([pool_embeds[neg_img], image_embeds], dim=0)
        out_neg = self.text_encoder(ids_all, atts_all, embeds_all)
        vl = self.itm_head(torch.cat([out_pos[:, 0], out_neg[:, 0]], dim=0))
        itm_labels = torch.cat([torch.ones(B, dtype=torch.long), torch.zeros(2 * B, dtype=torch.long)]).to(vl.device)
        return loss_ita + F.cross_entropy(vl, itm_labels)

    @torch.no_grad()
    def _hard_negatives(self, image_feat, text_feat, idx, meta, pool_idx=None, pool_image=None, pool_text=None):
        """Indices into the pool (this batch, or the world batch under data parallelism) of one negative per
        sample, drawn in proportion to the similarity, positives (same idx) excluded. On `meta` (FLOPs) or
        when a batch has no valid negative, a fixed shift within this batch is used (same compute)."""
        B = image_feat.shape[0]
        pool_idx = idx if pool_idx is None else pool_idx
        pool_image = image_feat if pool_image is None else pool_image
        pool_text = text_feat if pool_text is None else pool_text
        shift = torch.roll(torch.arange(B, device=image_feat.device), 1)
        if meta or B < 2:
            return shift, shift
        offset = dist.rank() * B if pool_idx.shape[0] != B else 0   # this rank's rows in the world pool
        shift = shift + offset
        mask = idx == pool_idx.t()
        w_i2t = (image_feat @ pool_text.t() / self.temp).softmax(1).masked_fill(mask, 0)
        w_t2i = (text_feat @ pool_image.t() / self.temp).softmax(1).masked_fill(mask, 0)
        ok = (w_i2t.sum(1) > 0) & (w_t2i.sum(1) > 0)
        if not bool(ok.all()):
            return shift, shift
        return torch.multinomial(w_t2i, 1).view(-1), torch.multinomial(w_i2t, 1).view(-1)

    @torch.no_grad()
    def _enqueue(self, image_feat, text_feat, idx):
        B, q = image_feat.shape[0], self.image_queue.shape[1]
        ptr = int(self.ptr_queue)
        take = min(B, q - ptr)
        self.image_queue[:, ptr:ptr + take] = image_feat[:take].t()
        self.text_queue[:, ptr:ptr + take] = text_feat[:take].t()
        self.idx_queue[:, ptr:ptr + take] = idx[:take].t()
        self.ptr_queue[0] = (ptr + take) % q

    def forward(self, images, input_ids, attention_mask, idx=None, mode: str = "inference"):
        if mode == "train":
            return self.retrieval_loss(images, input_ids, attention_mask, idx)
        img = self.image_features(images)
        txt = self.text_features(input_ids, attention_mask)
        return img["embed"] @ txt["embed"].t(), self.itm_scores(img["tokens"], input_ids, attention_mask)


VARIANTS = {"nlvr2": BlipNLVR2, "caption": BlipCaption, "vqa": BlipVQA, "retrieval": BlipRetrieval}

# ----------------------------------------------------------------------------------------------------
# architectures

_PAPER_TOKENS = dict(vocab_size=30524, pad_token_id=0, cls_token_id=101, sep_token_id=102,
                     enc_token_id=30523, bos_token_id=30522)
_MICRO_TOKENS = dict(vocab_size=512, pad_token_id=0, cls_token_id=1, sep_token_id=2, enc_token_id=4,
                     bos_token_id=5)


# The text encoder/decoder's dropout (BERT's: embeddings, attention probabilities, both residual outputs), active in
# train mode only. Paper archs: the official configs/med_config.json of BLIP (and of UPop, which reads the same
# file: models/blip_nlvr.py l. 20), `"attention_probs_dropout_prob": 0.1` (l. 5) and `"hidden_dropout_prob": 0.1`
# (l. 7). Micro archs: 0 (a 2-layer, 64-wide model trained from scratch for a minute; the card's model_config may
# set 0.1). The ViT has no dropout in BLIP (vit.py: drop_rate 0, attn_drop_rate 0); its drop path is the recipe's
# drop_path key (BlipAdapter.set_drop_path).
PAPER_TEXT_DROPOUT = dict(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
MICRO_TEXT_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _paper(variant, image_size=384, **kw):
    cfg = dict(variant=variant, image_size=image_size, patch_size=16, vision_width=768, vision_layers=12,
               vision_heads=12, vision_mlp=3072, vision_eps=1e-6, text_width=768, text_layers=12, text_heads=12,
               text_mlp=3072, max_position=512, text_eps=1e-12, **PAPER_TEXT_DROPOUT, **_PAPER_TOKENS)
    return {**cfg, **kw}


def _micro(variant, **kw):
    cfg = dict(variant=variant, image_size=32, patch_size=8, vision_width=64, vision_layers=3, vision_heads=4,
               vision_mlp=256, vision_eps=1e-6, text_width=64, text_layers=2, text_heads=4, text_mlp=256,
               max_position=64, text_eps=1e-12, **MICRO_TEXT_DROPOUT, **_MICRO_TOKENS)
    return {**cfg, **kw}


ARCHS = {
    "blip_nlvr2": _paper("nlvr2", merge_from=6),
    "blip_caption": _paper("caption", prompt_len=4),
    "blip_vqa": _paper("vqa", image_size=480, decoder_layers=12),
    "blip_retrieval": _paper("retrieval", embed_dim=256, queue_size=57600, momentum=0.995, alpha=0.4),
    # micro: 32 px scenes, 16 patches + cls, width 64, 4 heads of 16 dims; trains in a minute on one core
    "blip_nlvr2_micro": _micro("nlvr2", merge_from=1, init_std=0.2),   # larger init: learns the pairs faster
    "blip_caption_micro": _micro("caption", prompt_len=4),
    "blip_vqa_micro": _micro("vqa", decoder_layers=2),
    "blip_retrieval_micro": _micro("retrieval", embed_dim=32, queue_size=256, momentum=0.995, alpha=0.4),
}

def _init_weights(model, std: float = 0.02):
    """BERT/ViT-style init for training from scratch (micro profile): N(0, std) linears and embeddings
    (BERT: 0.02; the micro configs use a larger std so that a narrow model trained for a minute sees its
    image through the cross-attention from the start), zero biases, unit LayerNorms, truncated-normal ViT
    position/class embeddings."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.trunc_normal_(m.weight, std=std)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, BlipVisionEmbeddings):
            nn.init.trunc_normal_(m.position_embedding, std=0.02)
            nn.init.trunc_normal_(m.class_embedding, std=0.02)


@register_model_family("blip")
class BlipAdapter(ModelAdapter):
    """BLIP (ViT-B/16 + BERT-base) for NLVR2 / VQA / captioning / retrieval, variant from config["variant"]."""

    UNIT_KINDS = ("head_dim", "ffn")
    MODALITIES = ("vision", "text", "fusion")
    ARCHS = ARCHS
    # official UPop BLIP code: ViT attention keeps 1/sqrt(64), BERT attention uses 1/sqrt(kept dims)
    DEFAULT_ATTENTION_SCALE = "official"

    @property
    def variant(self) -> str:
        v = self.config.get("variant")
        if v not in VARIANTS:
            raise BenchError(f"blip config variant must be one of {sorted(VARIANTS)}, got {v!r}")
        return v

    def build(self):
        model = VARIANTS[self.variant](self.config)
        if not any(p.is_meta for p in model.parameters()):
            _init_weights(model, float(self.config.get("init_std", 0.02)))
            if isinstance(model, BlipRetrieval):
                model.copy_params()
        return model

    # ------------------------------------------------------------------ structure
    @staticmethod
    def _text_modules(model):
        """(prefix of a TextModel, modality of its self-attention/FFN) for the variant's text models."""
        if isinstance(model, (BlipNLVR2, BlipRetrieval)):
            return [("text_encoder", "text")]
        if isinstance(model, BlipVQA):
            return [("text_encoder", "text"), ("text_decoder.bert", "text")]
        return [("text_decoder.bert", "text")]

    @staticmethod
    def _mirror(model, name: str):
        """The momentum copy of a module name (retrieval), or None."""
        if not isinstance(model, BlipRetrieval):
            return None
        for a in ("visual_encoder", "text_encoder"):
            if name.startswith(a + "."):
                return a + "_m" + name[len(a):]
        return None

    def structure(self, model, kinds=None) -> Structure:
        kinds = set(kinds or self.UNIT_KINDS)
        unknown = kinds - set(self.UNIT_KINDS)
        if unknown:
            raise BenchError(f"model family blip has no unit kind(s) {sorted(unknown)}; it has {self.UNIT_KINDS}")
        groups = []

        def both(name):            # a parameter name and its momentum copy
            m = self._mirror(model, name)
            return [name] + ([m] if m else [])

        def add_attn(module, q_names, out_name, H, dh, layer, modality):
            sl = []
            for qn in q_names:
                for pn in both(f"{module}.{qn}.weight"):
                    sl.append(Slice(pn, 0, tuple(H) + (dh,), len(H)))
                for pn in both(f"{module}.{qn}.bias"):
                    sl.append(Slice(pn, 0, tuple(H) + (dh,), len(H)))
            for pn in both(f"{out_name}.weight"):
                sl.append(Slice(pn, 1, (H[-1], dh), 1))
            groups.append(UnitGroup(f"{module}:head_dim", "head_dim", module, dh, tuple(sl), layer=layer,
                                    modality=modality))

        def add_ffn(module, fc1, fc2, d_ff, layer, modality):
            sl = []
            for pn in both(f"{fc1}.weight") + both(f"{fc1}.bias"):
                sl.append(Slice(pn, 0, (d_ff,), 0))
            for pn in both(f"{fc2}.weight"):
                sl.append(Slice(pn, 1, (d_ff,), 0))
            groups.append(UnitGroup(f"{module}:ffn", "ffn", module, d_ff, tuple(sl), layer=layer, modality=modality))

        for i, blk in enumerate(model.visual_encoder.layers):
            p = f"visual_encoder.layers.{i}"
            a = blk.self_attn
            if "head_dim" in kinds:
                add_attn(f"{p}.self_attn", ["qkv"], f"{p}.self_attn.projection", (3, a.num_heads), a.head_dim, i,
                         "vision")
            if "ffn" in kinds:
                add_ffn(f"{p}.mlp", f"{p}.mlp.fc1", f"{p}.mlp.fc2", blk.mlp.fc1.out_features, i, "vision")
        for prefix, modality in self._text_modules(model):
            tm = model.get_submodule(prefix)
            for i, layer in enumerate(tm.encoder.layer):
                p = f"{prefix}.encoder.layer.{i}"
                if "head_dim" in kinds:
                    s = layer.attention.self
                    add_attn(f"{p}.attention.self", ["query", "key", "value"], f"{p}.attention.output.dense",
                             (s.num_attention_heads,), s.attention_head_size, i, modality)
                    if layer.cross == "single":
                        s = layer.crossattention.self
                        add_attn(f"{p}.crossattention.self", ["query", "key", "value"],
                                 f"{p}.crossattention.output.dense", (s.num_attention_heads,),
                                 s.attention_head_size, i, "fusion")
                    elif layer.cross == "twin":
                        for j in (0, 1):
                            s = getattr(layer.crossattention, f"self{j}")
                            add_attn(f"{p}.crossattention.self{j}", ["query", "key", "value"],
                                     f"{p}.crossattention.output.dense{j}", (s.num_attention_heads,),
                                     s.attention_head_size, i, "fusion")
                if "ffn" in kinds:
                    add_ffn(f"{p}.intermediate", f"{p}.intermediate.dense", f"{p}.output.dense",
                            layer.intermediate.dense.out_features, i, modality)
        return fill_params_per_unit(model, Structure(groups))

    # ------------------------------------------------------------------ masks
    # UPop's masks (attach_unit_masks / set_unit_masks of ModelAdapter): head_dim -> the attention module's
    # dim_mask (q, k, v after the head reshape), ffn -> neuron_mask before GELU. The momentum encoders get none
    # (UPop: they are EMA copies of the un-masked weights).
    MASK_ATTRS = {"head_dim": "dim_mask", "ffn": "neuron_mask"}

    # model-side recipe keys. No no_weight_decay_names: the official BLIP code decays every tensor (the recipe's
    # weight_decay_groups: all); under no_norm_bias only 1-D tensors and biases are exempt
    RECIPE_KEYS = frozenset({"drop_path"})

    def set_drop_path(self, model, rate):
        """BLIP's ViT rule (vit.py: `torch.linspace(0, drop_path_rate, depth)` per block, one timm DropPath on
        both branches) on `visual_encoder`; the retrieval momentum encoder keeps none (official: created with
        rate 0)."""
        from timm.layers import DropPath, calculate_drop_path_rates
        layers = model.visual_encoder.layers
        for blk, r in zip(layers, calculate_drop_path_rates(float(rate), len(layers))):
            blk.drop_path = (DropPath(r) if r > 0 else nn.Identity()).train(blk.training)

    def shard_units(self, model):
        """sharding: fsdp: one unit per ViT layer and per layer of each text model (encoder, decoder). Retrieval:
        none (the root alone): its forward takes the momentum encoders' EMA of every online parameter
        (`_momentum_update`) at its start, which needs the online weights whole then; the frozen momentum
        encoders stay replicated (bench.sharding)."""
        if isinstance(model, BlipRetrieval):
            return []
        units = list(model.visual_encoder.layers)
        for prefix, _ in self._text_modules(model):
            units += list(model.get_submodule(prefix).encoder.layer)
        return units

    # ------------------------------------------------------------------ extraction
    def fix_modules(self, model, structure, keep, options):
        rule = options.get("attention_scale", self.DEFAULT_ATTENTION_SCALE)
        if rule not in ("official", "fixed", "sliced"):
            raise BenchError(f"blip attention_scale must be 'official', 'fixed' or 'sliced', got {rule!r}")
        # reinit_qkv_bias: only the ViT's fused qkv (the text side's query/key/value biases are copied by the
        # official code, so the option leaves them alone)
        reinit_bias = bool(options.get("reinit_qkv_bias", False))
        unknown = set(options) - {"attention_scale", "reinit_qkv_bias"}
        if unknown:
            raise BenchError(f"blip extraction options: unknown {sorted(unknown)} (known: attention_scale, "
                             f"reinit_qkv_bias)")
        for g in structure:
            names = [g.module] + ([self._mirror(model, g.module)] if self._mirror(model, g.module) else [])
            for name in names:
                mod = model.get_submodule(name)
                if g.kind == "head_dim":
                    n = int(keep[g.name].sum())
                    if isinstance(mod, PrunableVisionAttention):
                        mod.head_dim = n
                        if rule == "sliced":
                            mod.scale = n ** -0.5
                        if reinit_bias and name == g.module and mod.qkv.bias is not None:
                            # reproduces the official UPop extraction (models/blip_nlvr.py compress(), l. 132,
                            # and the same line in blip_vqa/blip_retrieval/blip.py): `attn.qkv.weight.bias = ...`
                            # sets an attribute of the weight, so the new nn.Linear keeps its default bias init
                            # U(-1/sqrt(in), 1/sqrt(in)). The momentum copy follows through copy_params() below.
                            bound = mod.qkv.in_features ** -0.5
                            with torch.no_grad():
                                mod.qkv.bias.uniform_(-bound, bound)
                    else:
                        mod.attention_head_size = n
                        mod.all_head_size = mod.num_attention_heads * n
                        if rule in ("official", "sliced"):
                            mod.scale = n ** -0.5
                    mod.dim_mask = None
                else:
                    mod.neuron_mask = None
        if isinstance(model, BlipRetrieval):
            model.copy_params()        # official: the momentum encoders are re-copied after slicing

    # ------------------------------------------------------------------ checkpoints
    def load_checkpoint(self, model, path):
        state = load_state_dict(path, f"BLIP checkpoint for {self.arch}", expected=(
            "  one of BLIP's released files: model_base_nlvr.pth, model_base_vqa_capfilt_large.pth,\n"
            "  model_base_caption_capfilt_large.pth, model_base_retrieval_coco.pth / _flickr.pth"))
        load_official_state(model, state, str(path), arch=self.arch)


# ----------------------------------------------------------------------------------------------------
# official key names <-> ours

_VIT_MAP = (("cls_token", "embeddings.class_embedding"), ("pos_embed", "embeddings.position_embedding"),
            ("patch_embed.proj.", "embeddings.patch_embedding."), ("norm.", "post_layernorm."))
_BLOCK_MAP = (("norm1.", "layer_norm1."), ("norm2.", "layer_norm2."), ("attn.qkv.", "self_attn.qkv."),
              ("attn.proj.", "self_attn.projection."), ("mlp.fc1.", "mlp.fc1."), ("mlp.fc2.", "mlp.fc2."))
# official keys that are not tensors of ours: tied decoder weights, non-persistent position ids
_DROP_SUFFIXES = ("embeddings.position_ids", "cls.predictions.decoder.weight", "cls.predictions.decoder.bias")


def official_to_ours(key: str) -> str | None:
    """Map one key of BLIP's released state dicts to our parameter/buffer name (None: not stored by us)."""
    if key.endswith(_DROP_SUFFIXES):
        return None
    for enc in ("visual_encoder_m.", "visual_encoder."):
        if key.startswith(enc):
            rest = key[len(enc):]
            if rest.startswith("blocks."):
                _, i, sub = rest.split(".", 2)
                for a, b in _BLOCK_MAP:
                    if sub.startswith(a):
                        return f"{enc}layers.{i}.{b}{sub[len(a):]}"
                return None
            for a, b in _VIT_MAP:
                if rest == a or (a.endswith(".") and rest.startswith(a)):
                    return enc + b + rest[len(a):] if a.endswith(".") else enc + b
            return None
    return key   # text side, heads, projections, temp and queues keep BLIP's names


def load_official_state(model, state: dict, source: str = "checkpoint", arch: str | None = None) -> None:
    """Load a state dict with BLIP's official key names; every parameter must be filled (buffers such as the
    retrieval queues are loaded when present). Shape or coverage problems raise a clear BenchError
    (`bench.checkpoints.check_matches`: keys in our names; a key we cannot place keeps its official name)."""
    ours = model.state_dict()
    mapped, hint = {}, ""
    for k, v in state.items():
        n = official_to_ours(k)
        if n is None:
            continue
        if n not in ours:
            mapped[k] = v                     # reported as unexpected, under the file's own name
            continue
        if n.endswith("position_embedding") and v.shape != ours[n].shape:
            hint = (f" ({k} is {tuple(v.shape)}: another image size; BLIP interpolates the position embedding, "
                    "use the matching arch)")
        mapped[n] = v
    check_matches(model, mapped, arch or type(model).__name__, source, optional_buffers=True, hint=hint)
    model.load_state_dict(mapped, strict=False)


def official_state_shapes(model) -> dict:
    """{official key: shape} for `model`, generated from BLIP's naming rules (timm ViT `blocks.i.attn.qkv`,
    med.py BERT, `cls.predictions.decoder` tied to the word embeddings, `position_ids` buffers): what a
    released .pth of this architecture contains. Used to test the mapping without downloading anything."""
    cfg = model.cfg
    out = {}

    def vit(prefix):
        d, n_tok = cfg["vision_width"], (cfg["image_size"] // cfg["patch_size"]) ** 2 + 1
        p = cfg["patch_size"]
        out.update({f"{prefix}.cls_token": (1, 1, d), f"{prefix}.pos_embed": (1, n_tok, d),
                    f"{prefix}.patch_embed.proj.weight": (d, 3, p, p), f"{prefix}.patch_embed.proj.bias": (d,),
                    f"{prefix}.norm.weight": (d,), f"{prefix}.norm.bias": (d,)})
        for i in range(cfg["vision_layers"]):
            b = f"{prefix}.blocks.{i}"
            out.update({f"{b}.norm1.weight": (d,), f"{b}.norm1.bias": (d,), f"{b}.attn.qkv.weight": (3 * d, d),
                        f"{b}.attn.qkv.bias": (3 * d,), f"{b}.attn.proj.weight": (d, d), f"{b}.attn.proj.bias": (d,),
                        f"{b}.norm2.weight": (d,), f"{b}.norm2.bias": (d,),
                        f"{b}.mlp.fc1.weight": (cfg["vision_mlp"], d), f"{b}.mlp.fc1.bias": (cfg["vision_mlp"],),
                        f"{b}.mlp.fc2.weight": (d, cfg["vision_mlp"]), f"{b}.mlp.fc2.bias": (d,)})

    def attn(b, kv_in, twin=False, merge=False):
        d = cfg["text_width"]
        selfs = ["self0", "self1"] if twin else ["self"]
        for s in selfs:
            for x, din in (("query", d), ("key", kv_in), ("value", kv_in)):
                out[f"{b}.{s}.{x}.weight"] = (d, din)
                out[f"{b}.{s}.{x}.bias"] = (d,)
        for dn in (["dense0", "dense1"] if twin else ["dense"]):
            out[f"{b}.output.{dn}.weight"] = (d, d)
            out[f"{b}.output.{dn}.bias"] = (d,)
        if merge:
            out[f"{b}.output.merge_layer.weight"] = (d, 2 * d)
            out[f"{b}.output.merge_layer.bias"] = (d,)
        out[f"{b}.output.LayerNorm.weight"] = (d,)
        out[f"{b}.output.LayerNorm.bias"] = (d,)

    def bert(prefix, layers, cross):
        d, f = cfg["text_width"], cfg["text_mlp"]
        out.update({f"{prefix}.embeddings.position_ids": (1, cfg["max_position"]),
                    f"{prefix}.embeddings.word_embeddings.weight": (cfg["vocab_size"], d),
                    f"{prefix}.embeddings.position_embeddings.weight": (cfg["max_position"], d),
                    f"{prefix}.embeddings.LayerNorm.weight": (d,), f"{prefix}.embeddings.LayerNorm.bias": (d,)})
        for i in range(layers):
            b = f"{prefix}.encoder.layer.{i}"
            attn(f"{b}.attention", d)
            if cross == "single":
                attn(f"{b}.crossattention", cfg["vision_width"])
            elif cross == "twin":
                attn(f"{b}.crossattention", cfg["vision_width"], twin=True, merge=i >= int(cfg.get("merge_from", 6)))
            out.update({f"{b}.intermediate.dense.weight": (f, d), f"{b}.intermediate.dense.bias": (f,),
                        f"{b}.output.dense.weight": (d, f), f"{b}.output.dense.bias": (d,),
                        f"{b}.output.LayerNorm.weight": (d,), f"{b}.output.LayerNorm.bias": (d,)})

    def lm_head(prefix):
        d, v = cfg["text_width"], cfg["vocab_size"]
        out.update({f"{prefix}.cls.predictions.bias": (v,), f"{prefix}.cls.predictions.transform.dense.weight": (d, d),
                    f"{prefix}.cls.predictions.transform.dense.bias": (d,),
                    f"{prefix}.cls.predictions.transform.LayerNorm.weight": (d,),
                    f"{prefix}.cls.predictions.transform.LayerNorm.bias": (d,),
                    f"{prefix}.cls.predictions.decoder.weight": (v, d), f"{prefix}.cls.predictions.decoder.bias": (v,)})

    vit("visual_encoder")
    v = cfg["variant"]
    d = cfg["text_width"]
    if v == "nlvr2":
        bert("text_encoder", cfg["text_layers"], "twin")
        out.update({"cls_head.0.weight": (d, d), "cls_head.0.bias": (d,), "cls_head.2.weight": (2, d),
                    "cls_head.2.bias": (2,)})
    elif v == "caption":
        bert("text_decoder.bert", cfg["text_layers"], "single")
        lm_head("text_decoder")
    elif v == "vqa":
        bert("text_encoder", cfg["text_layers"], "single")
        bert("text_decoder.bert", cfg["decoder_layers"], "single")
        lm_head("text_decoder")
    else:
        e, q = cfg["embed_dim"], cfg["queue_size"]
        for suffix in ("", "_m"):
            if suffix:
                vit("visual_encoder_m")
            bert(f"text_encoder{suffix}", cfg["text_layers"], "single")
            out.update({f"vision_proj{suffix}.weight": (e, cfg["vision_width"]), f"vision_proj{suffix}.bias": (e,),
                        f"text_proj{suffix}.weight": (e, d), f"text_proj{suffix}.bias": (e,)})
        out.update({"itm_head.weight": (2, d), "itm_head.bias": (2,), "temp": (), "image_queue": (e, q),
                    "text_queue": (e, q), "idx_queue": (1, q), "ptr_queue": (1,)})
    return out
