"""timm ViT / DeiT family.

The model is timm's `VisionTransformer` with two drop-in layers of our own, `PrunableAttention` and
`PrunableMlp`, which keep timm's parameter names (so official DeiT/timm checkpoints load unchanged) and add:
- any (num_heads, head_dim) after extraction, including head_dim shrinking to 1;
- a softmax scale fixed at construction (1/sqrt(original head_dim)) even on the fused SDPA path, so a
  sliced model computes exactly what the masked dense model computed (UPop's ViT/DeiT behaviour);
- optional activation masks for search methods: `dim_mask` (length head_dim, on q, k and v after the
  head reshape, shared by all heads), `head_mask` (length num_heads, on each head's output) and
  `neuron_mask` (length d_ff, on fc1's output before the activation).

Unit kinds: `head_dim` (UPop's shared head-dim units), `head` (whole heads), `ffn` (MLP neurons).
"""
from __future__ import annotations

import torch

import torch.nn.functional as F
from timm.layers import Mlp
from timm.layers.attention import Attention
from timm.models.vision_transformer import VisionTransformer

from bench.api import Geometry, ModelAdapter
from bench.checkpoints import check_matches, load_state_dict
from bench.errors import BenchError
from bench.registry import register_model_family
from bench.structure import Slice, Structure, UnitGroup, fill_params_per_unit


class PrunableAttention(Attention):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.dim_mask = None    # (head_dim,) activation mask on q, k, v
        self.head_mask = None   # (num_heads,) activation mask on each head's output

    def forward(self, x, attn_mask=None, is_causal=False):
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.dim_mask is not None:
            q, k, v = q * self.dim_mask, k * self.dim_mask, v * self.dim_mask
        q, k = self.q_norm(q), self.k_norm(k)
        if self.fused_attn:
            # explicit scale: SDPA's default 1/sqrt(q.size(-1)) would change when head_dim is sliced
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=self.scale,
                                               dropout_p=self.attn_drop.p if self.training else 0.0)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            if attn_mask is not None:
                attn = attn + attn_mask
            attn = self.attn_drop(attn.softmax(dim=-1))
            x = attn @ v
        if self.head_mask is not None:
            x = x * self.head_mask.view(1, -1, 1, 1)
        x = x.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)
        x = self.norm(x)
        return self.proj_drop(self.proj(x))


class PrunableMlp(Mlp):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.neuron_mask = None  # (d_ff,) activation mask before the activation (UPop's position)

    def forward(self, x):
        x = self.fc1(x)
        if self.neuron_mask is not None:
            x = x * self.neuron_mask
        x = self.drop1(self.act(x))
        return self.drop2(self.fc2(self.norm(x)))


def set_blocks_drop_path(blocks, rate: float) -> list[float]:
    """Set timm `Block`s' `drop_path1` / `drop_path2` as timm's VisionTransformer builds them for
    drop_path_rate=rate: block i gets `torch.linspace(0, rate, depth)[i]` (timm.layers.calculate_drop_path_rates),
    a `timm.layers.DropPath` where that is above 0, `nn.Identity` otherwise. Returns the per-block rates."""
    from timm.layers import DropPath, calculate_drop_path_rates
    from torch import nn
    dpr = calculate_drop_path_rates(float(rate), len(blocks))
    for blk, r in zip(blocks, dpr):
        blk.drop_path1 = (DropPath(r) if r > 0 else nn.Identity()).train(blk.training)
        blk.drop_path2 = (DropPath(r) if r > 0 else nn.Identity()).train(blk.training)
    return dpr


def _deit(embed_dim, num_heads, img_size=224, patch_size=16, depth=12, num_classes=1000, **kw):
    return dict(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                mlp_ratio=4.0, qkv_bias=True, num_classes=num_classes, **kw)


@register_model_family("vit")
class VitAdapter(ModelAdapter):
    """timm VisionTransformer (ViT / DeiT, any size)."""

    UNIT_KINDS = ("head_dim", "head", "ffn")
    ARCHS = {
        "deit_tiny_patch16_224": _deit(192, 3),
        "deit_small_patch16_224": _deit(384, 6),
        "deit_base_patch16_224": _deit(768, 12),
        "vit_small_patch16_224": _deit(384, 6),
        "vit_base_patch16_224": _deit(768, 12),
        # GOHSP's ViT-Small for CIFAR-10 (NOT FOUND in the paper): DeiT-Small's body at CIFAR's native 32x32
        # with 4x4 patches (64 tokens + cls), so per-head and per-neuron parameter counts are ViT-Small's
        "vit_small_cifar10": _deit(384, 6, img_size=32, patch_size=4, num_classes=10),
        # micro profile: 32x32 images, 8x8 patches -> 16 tokens + cls, trains on 2 CPU cores in a minute
        "vit_micro": _deit(96, 4, img_size=32, patch_size=4, depth=4, num_classes=10),
        # the micro stand-in for DeiT-Tiny where a card has DeiT-Tiny and DeiT-Small rows: half vit_micro's
        # width with 3 heads, as DeiT-Tiny is half of DeiT-Small with 3 heads
        "vit_micro_tiny": _deit(48, 3, img_size=32, patch_size=4, depth=4, num_classes=10),
    }
    # config keys passed through to timm's VisionTransformer
    _TIMM_KEYS = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias",
                  "num_classes", "drop_path_rate", "drop_rate", "class_token", "global_pool", "in_chans")

    def build(self):
        cfg = {k: v for k, v in self.config.items() if k in self._TIMM_KEYS}
        return VisionTransformer(**cfg, attn_layer=PrunableAttention, mlp_layer=PrunableMlp)

    def geometry(self, model):
        attn = model.blocks[0].attn
        return Geometry(width=int(model.embed_dim), heads=int(attn.num_heads), head_dim=int(attn.head_dim),
                        layers=len(model.blocks))

    def example_inputs(self, batch_size, device):
        """A zero image batch of the config's img_size (int or (H, W))."""
        size = self.config["img_size"]
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (torch.zeros(batch_size, self.config.get("in_chans", 3), h, w, device=device),)

    def structure(self, model, kinds=None) -> Structure:
        kinds = set(kinds or self.UNIT_KINDS)
        unknown = kinds - set(self.UNIT_KINDS)
        if unknown:
            raise BenchError(f"model family vit has no unit kind(s) {sorted(unknown)}; it has {self.UNIT_KINDS}")
        groups = []
        for i, blk in enumerate(model.blocks):
            a, m = blk.attn, blk.mlp
            H, dh, C = a.num_heads, a.head_dim, a.proj.out_features
            p = f"blocks.{i}"
            qkv = [Slice(f"{p}.attn.qkv.weight", 0, (3, H, dh), None)]
            if a.qkv.bias is not None:
                qkv.append(Slice(f"{p}.attn.qkv.bias", 0, (3, H, dh), None))
            proj = [Slice(f"{p}.attn.proj.weight", 1, (H, dh), None)]
            if "head_dim" in kinds:
                sl = tuple(Slice(s.param, s.dim, s.view, 2) for s in qkv) + \
                     tuple(Slice(s.param, s.dim, s.view, 1) for s in proj)
                groups.append(UnitGroup(f"{p}.attn:head_dim", "head_dim", f"{p}.attn", dh, sl, layer=i))
            if "head" in kinds:
                sl = tuple(Slice(s.param, s.dim, s.view, 1) for s in qkv) + \
                     tuple(Slice(s.param, s.dim, s.view, 0) for s in proj)
                groups.append(UnitGroup(f"{p}.attn:head", "head", f"{p}.attn", H, sl, layer=i))
            if "ffn" in kinds:
                d_ff = m.fc1.out_features
                sl = [Slice(f"{p}.mlp.fc1.weight", 0, (d_ff,), 0), Slice(f"{p}.mlp.fc2.weight", 1, (d_ff,), 0)]
                if m.fc1.bias is not None:
                    sl.append(Slice(f"{p}.mlp.fc1.bias", 0, (d_ff,), 0))
                groups.append(UnitGroup(f"{p}.mlp:ffn", "ffn", f"{p}.mlp", d_ff, tuple(sl), layer=i))
        del C
        return fill_params_per_unit(model, Structure(groups))

    # UPop's official ViT/DeiT code keeps the softmax scale of the unsliced head_dim (docs/specs/upop.md §9.8)
    DEFAULT_ATTENTION_SCALE = "fixed"

    # activation masks (ModelAdapter.attach_unit_masks): head_dim -> attn.dim_mask on q, k, v; head ->
    # attn.head_mask; ffn -> mlp.neuron_mask
    MASK_ATTRS = {"head_dim": "dim_mask", "head": "head_mask", "ffn": "neuron_mask"}

    # model-side recipe keys: drop_path (set_drop_path). no_weight_decay_names: the default, timm's own
    # VisionTransformer.no_weight_decay() (pos_embed, cls_token, reg_token, dist_token)
    RECIPE_KEYS = frozenset({"drop_path"})

    def set_drop_path(self, model, rate):
        """Stochastic depth on both residual branches of every block, timm's per-block rule."""
        set_blocks_drop_path(model.blocks, rate)

    def shard_units(self, model):
        """sharding: fsdp: one unit per timm Block."""
        return list(model.blocks)

    def fix_modules(self, model, structure, keep, options):
        for g in structure:
            if g.kind not in ("head_dim", "head"):
                continue
            attn = model.get_submodule(g.module)
            n = int(keep[g.name].sum())
            if g.kind == "head_dim":
                attn.head_dim = n
            else:
                attn.num_heads = n
            attn.attn_dim = attn.num_heads * attn.head_dim
            # masks of the old shape make no sense on the sliced module
            attn.dim_mask = attn.head_mask = None
            if options.get("attention_scale", self.DEFAULT_ATTENTION_SCALE) == "sliced":   # BERT/CLIP-style
                attn.scale = attn.head_dim ** -0.5
            if g.kind == "head_dim" and options.get("reinit_qkv_bias") and attn.qkv.bias is not None:
                # reproduces the official UPop ViT/DeiT extraction, whose sliced qkv bias never reaches the
                # new Linear: it keeps nn.Linear's default init U(-1/sqrt(in), 1/sqrt(in)) (docs/specs/upop.md §9.9)
                bound = attn.qkv.in_features ** -0.5
                attn.qkv.bias.data.uniform_(-bound, bound)
        for g in structure:
            if g.kind == "ffn":
                model.get_submodule(g.module).neuron_mask = None

    def load_checkpoint(self, model, path):
        """A timm/DeiT release (.pth, bare or under "model") or .safetensors, with timm's key names."""
        state = load_state_dict(path, f"checkpoint for {self.arch}", expected=(
            "  a timm/DeiT .pth file (e.g. deit_small_patch16_224-cd65a155.pth) or .safetensors"))
        check_matches(model, state, self.arch, path)
        model.load_state_dict(state, strict=True)
