"""Segmenter (Strudel et al., ICCV 2021): a timm ViT encoder + a mask-transformer decoder, for semantic
segmentation (UPop's ADE20K row, docs/specs/upop.md §2.2, §6.6, §7, §9.20).

mmsegmentation cannot be installed against current torch, so the model is rebuilt here the way the official
code (`rstrudel/segmenter`, segm/model/{vit,decoder,segmenter,blocks,factory}.py) builds it:

- encoder = timm's `VisionTransformer` with the suite's `PrunableAttention` / `PrunableMlp` (models/vit.py),
  torch's LayerNorm (eps 1e-5, as the official blocks; timm's ViT default is 1e-6), drop-path 0.1 and the
  1000-class `head` the official encoder carries (unused by the segmentation forward, but in the released
  state dict and in the paper's 26.4 M params);
- decoder = `MaskTransformer`: `proj_dec` (d_encoder -> d_model), `n_cls` learned class embeddings appended
  to the patch tokens, 2 timm `Block`s (again with PrunableAttention / PrunableMlp, dropout 0.1), `decoder_norm`,
  `proj_patch` / `proj_classes` (d_model x d_model matrices), L2-normalised patch-class products, `mask_norm`
  (LayerNorm over the classes); or `DecoderLinear` (`decoder: linear`, one Linear head per patch);
- forward: images (B, 3, H, W) are zero-padded on the bottom/right to a multiple of the patch size (as
  Segmenter's `padding`), the position embedding is resized bilinearly when the patch grid differs from the
  configured one (as Segmenter's `resize_pos_embed`), the patch-level masks are upsampled bilinearly to the
  padded size and the padding is cut off: logits (B, n_cls, H, W).

The parameter names are the official ones (timm's ViT names are what Segmenter's ViT uses too), so the
official `checkpoint.pth` maps one to one; `official_key_map` documents the correspondence and
`load_checkpoint` checks the release's `variant.yml` against the architecture.

Unit kinds (`head_dim`, `head`, `ffn`) exist in every encoder *and* decoder block: groups are named
`encoder.blocks.i.attn:head_dim`, `decoder.blocks.j.mlp:ffn`, ...; their layer index runs over the encoder
blocks and then the decoder blocks (0..11, 12..13 for Segmenter-S), so UPop ranks all 14 blocks together
(§9.20) and retention plots show 14 layers. The masks, the extraction fixes and the attention-scale rule
are VitAdapter's (this adapter subclasses it).
"""
from __future__ import annotations

import math
import re
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from bench.checkpoints import check_matches, load_state_dict
from bench.errors import BenchError, MissingData
from bench.registry import register_model_family
from bench.structure import Slice, Structure, UnitGroup
from models.vit import PrunableAttention, PrunableMlp, VitAdapter, set_blocks_drop_path

__all__ = ["Segmenter", "MaskTransformer", "DecoderLinear", "SegmenterAdapter", "official_key_map",
           "map_official_state_dict", "read_variant", "resize_pos_embed"]


def _init_weights(m):
    """Segmenter's init (segm/model/utils.py `init_weights`): trunc-normal(0.02) Linear weights, zero biases,
    unit LayerNorms."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.constant_(m.bias, 0)
    elif isinstance(m, nn.LayerNorm):
        nn.init.constant_(m.bias, 0)
        nn.init.constant_(m.weight, 1.0)


def resize_pos_embed(pos_embed: torch.Tensor, old_grid, new_grid, num_extra_tokens: int = 1) -> torch.Tensor:
    """Bilinear resize of the patch part of a (1, extra + gh*gw, d) position embedding (Segmenter's rule:
    F.interpolate(mode="bilinear"), align_corners=False, no antialias). The cls token part is kept."""
    tok, grid = pos_embed[:, :num_extra_tokens], pos_embed[0, num_extra_tokens:]
    gh, gw = old_grid
    grid = grid.reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bilinear", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], -1)
    return torch.cat([tok, grid], dim=1)


def _decoder_block(d_model, n_heads, d_ff, dropout, drop_path):
    blk = Block(d_model, n_heads, mlp_ratio=(d_ff + 0.5) / d_model, qkv_bias=True, proj_drop=dropout,
                attn_drop=dropout, drop_path=drop_path, norm_layer=nn.LayerNorm,
                attn_layer=PrunableAttention, mlp_layer=PrunableMlp)
    assert blk.mlp.fc1.out_features == d_ff
    return blk


class MaskTransformer(nn.Module):
    """Segmenter's mask-transformer decoder (segm/model/decoder.py), with prunable blocks."""

    def __init__(self, n_cls, patch_size, d_encoder, n_layers, n_heads, d_model, d_ff, drop_path_rate=0.0,
                 dropout=0.1):
        super().__init__()
        self.d_encoder, self.patch_size, self.n_layers = d_encoder, patch_size, n_layers
        self.n_cls, self.d_model, self.d_ff = n_cls, d_model, d_ff
        self.scale = d_model ** -0.5
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, n_layers, device="cpu")]
        self.blocks = nn.ModuleList([_decoder_block(d_model, n_heads, d_ff, dropout, dpr[i]) for i in range(n_layers)])
        self.cls_emb = nn.Parameter(torch.randn(1, n_cls, d_model))
        self.proj_dec = nn.Linear(d_encoder, d_model)
        self.proj_patch = nn.Parameter(self.scale * torch.randn(d_model, d_model))
        self.proj_classes = nn.Parameter(self.scale * torch.randn(d_model, d_model))
        self.decoder_norm = nn.LayerNorm(d_model)
        self.mask_norm = nn.LayerNorm(n_cls)
        self.apply(_init_weights)
        trunc_normal_(self.cls_emb, std=0.02)

    def forward(self, x, grid):
        """x: encoder patch tokens (B, gh*gw, d_encoder) -> patch-level class masks (B, n_cls, gh, gw)."""
        gh, gw = grid
        x = self.proj_dec(x)
        x = torch.cat((x, self.cls_emb.expand(x.size(0), -1, -1)), 1)
        for blk in self.blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        patches, cls_seg_feat = x[:, : -self.n_cls], x[:, -self.n_cls:]
        patches = patches @ self.proj_patch
        cls_seg_feat = cls_seg_feat @ self.proj_classes
        patches = patches / patches.norm(dim=-1, keepdim=True)
        cls_seg_feat = cls_seg_feat / cls_seg_feat.norm(dim=-1, keepdim=True)
        masks = self.mask_norm(patches @ cls_seg_feat.transpose(1, 2))     # (B, gh*gw, n_cls)
        return masks.transpose(1, 2).reshape(masks.size(0), self.n_cls, gh, gw)


class DecoderLinear(nn.Module):
    """Segmenter's linear decoder: one Linear(d_encoder, n_cls) per patch token."""

    def __init__(self, n_cls, patch_size, d_encoder):
        super().__init__()
        self.n_cls, self.patch_size, self.d_encoder = n_cls, patch_size, d_encoder
        self.head = nn.Linear(d_encoder, n_cls)
        self.apply(_init_weights)

    def forward(self, x, grid):
        gh, gw = grid
        x = self.head(x)
        return x.transpose(1, 2).reshape(x.size(0), self.n_cls, gh, gw)


class Segmenter(nn.Module):
    """encoder (timm ViT) + decoder; forward(images (B,3,H,W)) -> logits (B, n_cls, H, W)."""

    def __init__(self, encoder: VisionTransformer, decoder: nn.Module, n_cls: int, patch_size: int, grid):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.n_cls = n_cls
        self.patch_size = patch_size
        self.grid = tuple(grid)            # the patch grid the position embedding was built for

    def encode(self, im):
        enc = self.encoder
        x = enc.patch_embed.proj(im)                             # (B, d, gh, gw)
        grid = x.shape[-2:]
        x = enc.patch_embed.norm(x.flatten(2).transpose(1, 2))
        pos = enc.pos_embed
        if tuple(grid) != self.grid:
            pos = resize_pos_embed(pos, self.grid, tuple(grid), enc.num_prefix_tokens)
        x = torch.cat((enc.cls_token.expand(x.size(0), -1, -1), x), dim=1) + pos
        x = enc.norm_pre(enc.patch_drop(enc.pos_drop(x)))
        x = enc.blocks(x)
        return enc.norm(x), tuple(grid)

    def forward(self, im):
        H0, W0 = im.shape[-2:]
        P = self.patch_size
        pad_h, pad_w = (-H0) % P, (-W0) % P
        if pad_h or pad_w:
            im = F.pad(im, (0, pad_w, 0, pad_h), value=0.0)     # Segmenter's `padding` (fill 0)
        H, W = im.shape[-2:]
        x, grid = self.encode(im)
        x = x[:, self.encoder.num_prefix_tokens:]               # drop the cls token for decoding
        masks = self.decoder(x, grid)
        masks = F.interpolate(masks, size=(H, W), mode="bilinear", align_corners=False)
        return masks[:, :, :H0, :W0]                             # Segmenter's `unpadding`


# ---------------------------------------------------------------------------------------------------
# architectures

def _segmenter(embed_dim, num_heads, depth=12, img_size=512, patch_size=16, n_cls=150, decoder="mask_transformer",
               dec_layers=2, drop_path_rate=0.1, dec_dropout=0.1, encoder_head_classes=1000, **kw):
    cfg = dict(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
               mlp_ratio=4.0, qkv_bias=True, drop_path_rate=drop_path_rate, n_cls=n_cls, decoder=decoder,
               encoder_head_classes=encoder_head_classes)
    if decoder == "mask_transformer":
        # official factory: d_model = encoder width, n_heads = d_model // 64, d_ff = 4 d_model
        cfg.update(dec_layers=dec_layers, dec_d_model=embed_dim, dec_heads=max(1, embed_dim // 64),
                   dec_d_ff=4 * embed_dim, dec_dropout=dec_dropout, dec_drop_path_rate=0.0)
    cfg.update(kw)
    return cfg


@register_model_family("segmenter")
class SegmenterAdapter(VitAdapter):
    """Segmenter: timm ViT encoder + mask-transformer (or linear) decoder, pruned in both."""

    UNIT_KINDS = ("head_dim", "head", "ffn")
    ARCHS = {
        # the `seg_small_mask` release: ViT-S/16 at 512x512 + 2-block mask transformer, ADE20K's 150 classes
        "segmenter_small_mask_512": _segmenter(384, 6),
        "segmenter_small_linear_512": _segmenter(384, 6, decoder="linear"),
        # micro profile: 64x64 crops, 8x8 patches (8x8 grid), 4 encoder + 2 decoder blocks of width 96,
        # 8 classes (the micro ADE20K stand-in); no encoder classification head, no dropout / drop-path
        "segmenter_micro": _segmenter(96, 4, depth=4, img_size=64, patch_size=8, n_cls=8, drop_path_rate=0.0,
                                      dec_dropout=0.0, encoder_head_classes=0, dec_heads=4),
    }
    DECODERS = ("mask_transformer", "linear")

    def build(self):
        c = self.config
        if c.get("decoder", "mask_transformer") not in self.DECODERS:
            raise BenchError(f"segmenter decoder must be one of {self.DECODERS}, got {c.get('decoder')!r}")
        img = c["img_size"]
        img = (img, img) if isinstance(img, int) else tuple(img)
        P = int(c["patch_size"])
        if img[0] % P or img[1] % P:
            raise BenchError(f"segmenter img_size {img} is not a multiple of patch_size {P}")
        encoder = VisionTransformer(
            img_size=img, patch_size=P, in_chans=c.get("in_chans", 3), num_classes=int(c.get("encoder_head_classes", 1000)),
            embed_dim=c["embed_dim"], depth=c["depth"], num_heads=c["num_heads"], mlp_ratio=c.get("mlp_ratio", 4.0),
            qkv_bias=c.get("qkv_bias", True), drop_rate=0.0, pos_drop_rate=c.get("drop_rate", 0.0),
            drop_path_rate=c.get("drop_path_rate", 0.0), norm_layer=nn.LayerNorm,
            attn_layer=PrunableAttention, mlp_layer=PrunableMlp)
        # Segmenter's init (trunc-normal Linear weights, zero biases, std-0.02 cls/pos embeddings)
        encoder.apply(_init_weights)
        trunc_normal_(encoder.pos_embed, std=0.02)
        trunc_normal_(encoder.cls_token, std=0.02)
        n_cls = int(c["n_cls"])
        if c.get("decoder", "mask_transformer") == "linear":
            decoder = DecoderLinear(n_cls, P, c["embed_dim"])
        else:
            decoder = MaskTransformer(n_cls, P, c["embed_dim"], c["dec_layers"], c["dec_heads"], c["dec_d_model"],
                                      c["dec_d_ff"], c.get("dec_drop_path_rate", 0.0), c.get("dec_dropout", 0.1))
        return Segmenter(encoder, decoder, n_cls, P, (img[0] // P, img[1] // P))

    # ------------------------------------------------------------------------------------------ structure
    def example_inputs(self, batch_size, device):
        """A zero image batch of the config's img_size (int or (H, W))."""
        size = self.config["img_size"]
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (torch.zeros(batch_size, self.config.get("in_chans", 3), h, w, device=device),)

    def structure(self, model, kinds=None) -> Structure:
        """VitAdapter's head_dim / head / ffn groups of the encoder's blocks, then of the decoder's blocks,
        re-rooted at `encoder.` / `decoder.`, with the layer index continuing from the encoder into the
        decoder."""
        kinds = list(kinds or self.UNIT_KINDS)
        unknown = set(kinds) - set(self.UNIT_KINDS)
        if unknown:
            raise BenchError(f"model family segmenter has no unit kind(s) {sorted(unknown)}; it has {self.UNIT_KINDS}")
        groups, offset = [], 0
        for part in ("encoder", "decoder"):
            sub = getattr(model, part)
            blocks = getattr(sub, "blocks", None)
            if not blocks:
                continue                                   # the linear decoder has no prunable blocks
            for g in super().structure(sub, kinds):
                groups.append(_rerooted(g, part, offset))
            offset += len(blocks)
        return Structure(groups)

    # attach_unit_masks / fix_modules: VitAdapter's, on the full names (encoder.blocks.i.attn, ...)

    # recipe: drop_path (RECIPE_KEYS inherited) acts on the encoder, as the official drop_path_rate 0.1 does (the
    # official decoder's rate is 0)
    def set_drop_path(self, model, rate):
        set_blocks_drop_path(model.encoder.blocks, rate)

    def shard_units(self, model):
        """sharding: fsdp: the encoder's timm Blocks and the mask transformer's blocks (the linear decoder has none)."""
        return list(model.encoder.blocks) + list(getattr(model.decoder, "blocks", None) or [])

    def no_weight_decay_names(self, model):
        """The encoder's timm no-decay tensors (encoder.pos_embed, encoder.cls_token). The official Segmenter
        also exempts decoder.cls_emb; its paper recipe (SGD, weight decay 0) makes no difference."""
        return {"encoder." + n for n in model.encoder.no_weight_decay()}

    # ------------------------------------------------------------------------------------------ checkpoint
    def load_checkpoint(self, model, path):
        """Load the official Segmenter release (`checkpoint.pth` + `variant.yml` in the same folder)."""
        path = Path(path)
        how = ("Download the official release (rstrudel/segmenter README, `seg_small_mask`) by hand, put both "
               "files there, or pass --checkpoints DIR. Nothing is downloaded at run time.")
        if not path.exists():
            raise MissingData(f"Segmenter checkpoint for {self.arch}", path, CHECKPOINT_LAYOUT, how)
        variant_path = (path if path.is_dir() else path.parent) / "variant.yml"
        if not variant_path.is_file():
            raise MissingData(f"variant.yml of the Segmenter checkpoint {path.name}", variant_path, CHECKPOINT_LAYOUT,
                              "The official release ships variant.yml next to checkpoint.pth: copy it there too.")
        check_variant(read_variant(variant_path), self.config, variant_path)
        state = load_state_dict(path, f"Segmenter checkpoint for {self.arch}", expected=CHECKPOINT_LAYOUT)
        mapped = map_official_state_dict(state, model, source=str(path), arch=self.arch)
        model.load_state_dict(mapped, strict=True)


CHECKPOINT_LAYOUT = """\
  <checkpoints>/seg_small_mask/checkpoint.pth   torch.save({"model": state_dict, ...}) of the official release
  <checkpoints>/seg_small_mask/variant.yml      its configuration (net_kwargs: d_model, n_layers, decoder, ...)"""


def _rerooted(g: UnitGroup, prefix: str, layer_offset: int) -> UnitGroup:
    slices = tuple(Slice(f"{prefix}.{s.param}", s.dim, s.view, s.axis) for s in g.slices)
    return replace(g, name=f"{prefix}.{g.name}", module=f"{prefix}.{g.module}", slices=slices,
                   layer=None if g.layer is None else g.layer + layer_offset)


# ---------------------------------------------------------------------------------------------------
# official checkpoint: key names, variant.yml

# (official key pattern, this model's key). The official encoder is a ViT with timm's own parameter names
# (segm/model/vit.py), the decoder's blocks use the same names (segm/model/blocks.py), and this model keeps
# them all, so every official key maps to itself; the table is the documented correspondence and the
# place to add renames for other releases.
_OFFICIAL_KEYS = [
    (r"encoder\.patch_embed\.proj\.(weight|bias)", r"encoder.patch_embed.proj.\1"),
    (r"encoder\.(cls_token|pos_embed)", r"encoder.\1"),
    (r"(encoder|decoder)\.blocks\.(\d+)\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)",
     r"\1.blocks.\2.\3.\4"),
    (r"encoder\.norm\.(weight|bias)", r"encoder.norm.\1"),
    (r"encoder\.head\.(weight|bias)", r"encoder.head.\1"),
    (r"decoder\.(cls_emb|proj_patch|proj_classes)", r"decoder.\1"),
    (r"decoder\.(proj_dec|decoder_norm|mask_norm|head)\.(weight|bias)", r"decoder.\1.\2"),
]


def official_key_map(key: str):
    """This model's name for an official Segmenter state-dict key (None if it is not one)."""
    if key.startswith("module."):                 # saved from the DDP wrapper
        key = key[len("module."):]
    for pat, rep in _OFFICIAL_KEYS:
        if re.fullmatch(pat, key):
            return re.sub(pat, rep, key)
    return None


def map_official_state_dict(state: dict, model: nn.Module, source: str = "checkpoint",
                            arch: str = "Segmenter") -> dict:
    """Rename an official Segmenter state dict to this model's keys and check it fits
    (`bench.checkpoints.check_matches`: a clear BenchError names the missing, unexpected (under the file's
    own names) and wrongly shaped tensors). A position embedding trained for another patch grid is resized
    bilinearly (Segmenter's `checkpoint_filter_fn`)."""
    own = model.state_dict()
    out, unexpected = {}, []
    for k, v in state.items():
        name = official_key_map(k)
        if name is None or name not in own:
            unexpected.append(k)
            out[k] = v                            # reported as unexpected, under the file's own name
        else:
            out[name] = v
    hint = ""
    if any("dist_token" in k or "head_dist" in k for k in unexpected):
        hint = " (a distilled DeiT backbone: only the ViT backbones of the release are supported)"
    elif any(k.endswith(".alpha") for k in unexpected):
        hint = " (UPop search masks `alpha`: load the official Segmenter release, not a UPop search state)"
    pos = out.get("encoder.pos_embed")
    if pos is not None and pos.shape != own["encoder.pos_embed"].shape and pos.shape[-1] == own["encoder.pos_embed"].shape[-1]:
        n_old = pos.shape[1] - 1
        g_old = int(math.isqrt(n_old))
        if g_old * g_old == n_old:
            out["encoder.pos_embed"] = resize_pos_embed(pos, (g_old, g_old), model.grid)
    check_matches(model, out, arch, source, hint=hint)
    return out


class _VariantLoader:
    """yaml.SafeLoader that also reads the python tags yaml.dump writes (variant.yml stores
    image_size as !!python/tuple)."""

    @staticmethod
    def loader():
        import yaml

        class L(yaml.SafeLoader):
            pass

        def python_tag(loader, suffix, node):
            if isinstance(node, yaml.SequenceNode):
                seq = loader.construct_sequence(node, deep=True)
                return tuple(seq) if suffix == "tuple" else seq
            if isinstance(node, yaml.MappingNode):
                return loader.construct_mapping(node, deep=True)
            return loader.construct_scalar(node)

        L.add_multi_constructor("tag:yaml.org,2002:python/", python_tag)
        return L


def read_variant(path) -> dict:
    import yaml
    try:
        variant = yaml.load(Path(path).read_text(), Loader=_VariantLoader.loader())   # noqa: S506 - safe subclass
    except yaml.YAMLError as e:
        raise BenchError(f"{path} is not valid YAML: {e}") from e
    if not isinstance(variant, dict) or not isinstance(variant.get("net_kwargs"), dict):
        raise BenchError(f"{path}: expected Segmenter's variant.yml with a 'net_kwargs' mapping")
    return variant


def check_variant(variant: dict, config: dict, path) -> None:
    """The release's net_kwargs must describe the architecture the card builds."""
    nk = variant["net_kwargs"]
    dec = nk.get("decoder") or {}
    img = nk.get("image_size")
    want_img = config["img_size"]
    want_img = (want_img, want_img) if isinstance(want_img, int) else tuple(want_img)
    checks = [("d_model", nk.get("d_model"), config["embed_dim"]), ("n_layers", nk.get("n_layers"), config["depth"]),
              ("n_heads", nk.get("n_heads"), config["num_heads"]), ("patch_size", nk.get("patch_size"), config["patch_size"]),
              ("n_cls", nk.get("n_cls"), config["n_cls"])]
    if img is not None:
        checks.append(("image_size", tuple(img) if isinstance(img, (list, tuple)) else (img, img), want_img))
    name = dec.get("name")
    if name is not None:
        want = config.get("decoder", "mask_transformer")
        checks.append(("decoder.name", "linear" if "linear" in str(name) else name, want))
    if dec.get("n_layers") is not None and config.get("decoder", "mask_transformer") == "mask_transformer":
        checks.append(("decoder.n_layers", dec.get("n_layers"), config["dec_layers"]))
    if nk.get("distilled"):
        checks.append(("distilled", True, False))
    bad = [(k, got, want) for k, got, want in checks if got is not None and got != want]
    if bad:
        raise BenchError(f"{path} describes another Segmenter than this card's model: "
                         + ", ".join(f"{k} = {got!r} (the model has {want!r})" for k, got, want in bad))
