"""Segmenter adapter: forward (padding, other sizes), structure in encoder and decoder, exact extraction,
UPop masks, the official checkpoint's key names, and the paper's params / FLOPs at 512x512."""
import copy

import pytest
import torch
import torch.nn.functional as F
import yaml

from bench import measure
from bench.errors import BenchError, MissingData
from bench.structure import extract, kept_param_count, mask_weights
from models.segmenter import map_official_state_dict, official_key_map
from tests.conftest import build, random_keep

KIND_SETS = [("head_dim",), ("head",), ("ffn",), ("head_dim", "head", "ffn")]


@pytest.fixture(scope="module")
def micro_seg():
    return build("segmenter_micro")


def _x(b, h, w, seed=0):
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_forward_shapes_padding_and_other_sizes(micro_seg):
    _, model = micro_seg
    with torch.no_grad():
        assert model(_x(2, 64, 64)).shape == (2, 8, 64, 64)
        x = _x(1, 50, 70)                                 # not a multiple of the 8-pixel patch
        y = model(x)
        assert y.shape == (1, 8, 50, 70)
        # Segmenter's rule: zero-pad bottom/right to the patch grid, predict, cut the padding off
        padded = model(F.pad(x, (0, 2, 0, 6)))[:, :, :50, :70]
        assert torch.equal(y, padded)
        assert model(_x(1, 96, 128)).shape == (1, 8, 96, 128)   # 12x16 grid: position embedding resized


def test_structure_covers_encoder_and_decoder(micro_seg):
    adapter, model = micro_seg
    st = adapter.structure(model)
    names = [g.name for g in st]
    assert "encoder.blocks.0.attn:head_dim" in names and "decoder.blocks.1.mlp:ffn" in names
    assert {g.layer for g in st} == set(range(6))                    # 4 encoder + 2 decoder blocks
    assert {g.layer for g in st if g.module.startswith("decoder.")} == {4, 5}
    assert {g.modality for g in st} == {"vision"} and st.kinds() == ["ffn", "head", "head_dim"]
    for g in st:   # every slice names a real parameter of the full model
        params = dict(model.named_parameters())
        assert all(s.param in params for s in g.slices)
    with pytest.raises(BenchError, match="segmenter has no unit kind"):
        adapter.structure(model, ["hidden"])


def test_paper_structure_has_14_layers_with_upops_unit_sizes():
    adapter, model = build_meta("segmenter_small_mask_512")
    st = adapter.structure(model)
    assert sorted({g.layer for g in st}) == list(range(14))
    per = {g.kind: g.params_per_unit for g in st}
    assert per == {"head_dim": 9234, "head": 98496, "ffn": 769}         # docs/specs/upop.md §3.4: exact in the decoder too
    prunable = kept_param_count(model, adapter.structure(model, ["head_dim", "ffn"]),
                                adapter.structure(model, ["head_dim", "ffn"]).full_keep())["prunable_dense"]
    assert prunable == 14 * (64 * 9234 + 1536 * 769)                     # 24.81 M


def build_meta(arch):
    from bench.registry import MODELS
    cls, cfg = MODELS.get(arch)
    adapter = cls(arch, cfg)
    with torch.device("meta"):
        return adapter, adapter.build()


@pytest.mark.parametrize("kinds", KIND_SETS, ids=lambda k: "+".join(k))
def test_masked_vs_extracted_equal_decoder_included(kinds, micro_seg):
    adapter, model = micro_seg
    for seed in range(2):
        st = adapter.structure(model, kinds)
        keep = random_keep(st, seed)
        assert any(not bool(keep[g.name].all()) for g in st if g.module.startswith("decoder."))
        masked = copy.deepcopy(model)
        mask_weights(masked, st, keep)
        pruned = extract(copy.deepcopy(model), adapter, st, keep)
        x = _x(2, 64, 80, seed)
        with torch.no_grad():
            assert (masked(x) - pruned(x)).abs().max().item() <= 1e-5
        assert sum(p.numel() for p in pruned.parameters()) == kept_param_count(model, st, keep)["total"]
        if "head_dim" in kinds:
            assert any(b.attn.head_dim < 24 for b in pruned.decoder.blocks)
        if "ffn" in kinds:
            assert any(b.mlp.fc1.out_features < 384 for b in pruned.decoder.blocks)


def test_unit_masks_act_in_encoder_and_decoder(micro_seg):
    """UPop's activation masks with 0/1 values compute what the extracted model computes."""
    adapter, model = micro_seg
    model = copy.deepcopy(model)
    st = adapter.structure(model, ["head_dim", "ffn"])
    masks = adapter.attach_unit_masks(model, st, ["head_dim", "ffn"])
    assert set(masks) == {g.name for g in st}
    keep = random_keep(st, 3)
    with torch.no_grad():
        for n, m in masks.items():
            m.copy_(keep[n].float())
    x = _x(2, 64, 64, 1)
    with torch.no_grad():
        y_masked = model(x)
    pruned = extract(copy.deepcopy(model), adapter, st, keep)
    assert all(b.attn.dim_mask is None and b.mlp.neuron_mask is None
               for b in list(pruned.encoder.blocks) + list(pruned.decoder.blocks))
    with torch.no_grad():
        assert (y_masked - pruned(x)).abs().max().item() <= 1e-5


def test_linear_decoder_variant():
    adapter, model = build("segmenter_micro", decoder="linear")
    with torch.no_grad():
        assert model(_x(1, 64, 64)).shape == (1, 8, 64, 64)
    st = adapter.structure(model)
    assert {g.layer for g in st} == set(range(4)) and all(g.module.startswith("encoder.") for g in st)
    with pytest.raises(BenchError, match="decoder must be one of"):
        build("segmenter_micro", decoder="deeplab")


# ---------------------------------------------------------------------------------------------------
# official checkpoint

def _official_keys(n_enc, n_dec, with_head=True):
    """The state-dict keys of the official Segmenter (segm/model/{vit,decoder,blocks}.py), written out from
    the official code, independently of this suite's model."""
    blk = [f"{a}.{b}" for a in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2") for b in ("weight", "bias")]
    keys = ["encoder.cls_token", "encoder.pos_embed", "encoder.patch_embed.proj.weight", "encoder.patch_embed.proj.bias",
            "encoder.norm.weight", "encoder.norm.bias"]
    if with_head:
        keys += ["encoder.head.weight", "encoder.head.bias"]
    keys += [f"encoder.blocks.{i}.{k}" for i in range(n_enc) for k in blk]
    keys += ["decoder.cls_emb", "decoder.proj_dec.weight", "decoder.proj_dec.bias", "decoder.proj_patch",
             "decoder.proj_classes", "decoder.decoder_norm.weight", "decoder.decoder_norm.bias",
             "decoder.mask_norm.weight", "decoder.mask_norm.bias"]
    keys += [f"decoder.blocks.{i}.{k}" for i in range(n_dec) for k in blk]
    return keys


def test_paper_model_has_the_official_keys_and_shapes():
    _, model = build_meta("segmenter_small_mask_512")
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    official = _official_keys(12, 2)
    assert {official_key_map(k) for k in official} == set(own)
    shapes = {"encoder.pos_embed": (1, 1025, 384), "encoder.cls_token": (1, 1, 384),
              "encoder.patch_embed.proj.weight": (384, 3, 16, 16), "encoder.head.weight": (1000, 384),
              "encoder.blocks.11.attn.qkv.weight": (1152, 384), "encoder.blocks.0.mlp.fc1.weight": (1536, 384),
              "decoder.cls_emb": (1, 150, 384), "decoder.proj_dec.weight": (384, 384), "decoder.proj_patch": (384, 384),
              "decoder.proj_classes": (384, 384), "decoder.mask_norm.weight": (150,),
              "decoder.blocks.1.attn.proj.weight": (384, 384), "decoder.blocks.1.mlp.fc2.weight": (384, 1536)}
    for k, s in shapes.items():
        assert own[k] == s, k
    # a state dict with the official names and shapes (meta tensors: no memory) maps without complaint
    fake = {k: torch.empty(own[official_key_map(k)], device="meta") for k in official}
    assert set(map_official_state_dict(fake, model)) == set(own)


def _release(tmp_path, model, n_cls=8, variant_overrides=None, state_edit=None):
    """A checkpoint.pth + variant.yml as the official train.py writes them, built from `model` by renaming."""
    inverse = {official_key_map(k): k for k in _official_keys(4, 2, with_head=False)}
    state = {inverse[k]: v.clone() for k, v in model.state_dict().items()}
    if state_edit:
        state_edit(state)
    d = tmp_path / "seg_micro_mask"
    d.mkdir(exist_ok=True)
    torch.save({"model": state, "n_cls": n_cls, "epoch": 63, "optimizer": {"state": {}, "param_groups": []}},
               d / "checkpoint.pth")
    net = dict(image_size=(64, 64), patch_size=8, d_model=96, n_heads=4, n_layers=4, normalization="vit",
               distilled=False, backbone="vit_micro", dropout=0.0, drop_path_rate=0.0, n_cls=n_cls,
               decoder=dict(name="mask_transformer", drop_path_rate=0.0, dropout=0.1, n_layers=2))
    net.update(variant_overrides or {})
    variant = dict(world_batch_size=8, version="normal", net_kwargs=net,
                   dataset_kwargs=dict(dataset="ade20k", image_size=64, crop_size=64, normalization="vit"))
    (d / "variant.yml").write_text(yaml.dump(variant))        # image_size becomes !!python/tuple, as in the release
    assert "!!python/tuple" in (d / "variant.yml").read_text()
    return d / "checkpoint.pth"


def test_checkpoint_key_mapping_round_trip(tmp_path, micro_seg):
    adapter, model = micro_seg
    path = _release(tmp_path, model)
    _, fresh = build("segmenter_micro", seed=5)
    x = _x(2, 64, 64)
    with torch.no_grad():
        assert not torch.equal(fresh(x), model(x))
    adapter.load_checkpoint(fresh, path)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model(x))
    # a DDP-saved state dict ("module." prefix) maps too
    path = _release(tmp_path, model, state_edit=lambda s: [s.__setitem__("module." + k, s.pop(k)) for k in list(s)])
    adapter.load_checkpoint(build("segmenter_micro", seed=6)[1], path)


def test_checkpoint_errors_name_the_keys(tmp_path, micro_seg):
    adapter, model = micro_seg
    path = _release(tmp_path, model, state_edit=lambda s: s.pop("decoder.proj_classes"))
    with pytest.raises(BenchError, match=r"missing keys \['decoder.proj_classes'\]"):
        adapter.load_checkpoint(build("segmenter_micro")[1], path)
    path = _release(tmp_path, model, state_edit=lambda s: s.__setitem__("encoder.dist_token", torch.zeros(1, 1, 96)))
    with pytest.raises(BenchError, match=r"unexpected keys \['encoder.dist_token'\]"):
        adapter.load_checkpoint(build("segmenter_micro")[1], path)
    path = _release(tmp_path, model, variant_overrides={"n_layers": 12})
    with pytest.raises(BenchError, match="n_layers = 12"):
        adapter.load_checkpoint(build("segmenter_micro")[1], path)
    (path.parent / "variant.yml").unlink()
    with pytest.raises(MissingData, match="variant.yml"):
        adapter.load_checkpoint(build("segmenter_micro")[1], path)
    with pytest.raises(MissingData, match="checkpoint"):
        adapter.load_checkpoint(build("segmenter_micro")[1], tmp_path / "nope" / "checkpoint.pth")


# ---------------------------------------------------------------------------------------------------
# the paper's numbers (docs/specs/upop.md §6.6: 26.4 M params, 38.6 G FLOPs at 1x3x512x512, fvcore convention)

def test_paper_params_and_flops_on_meta():
    res = measure.arch_flops("segmenter_small_mask_512")
    assert res["input_spec"] == "1x3x512x512"
    assert abs(res["params"] / 1e6 - 26.4) <= 0.01 * 26.4
    assert abs(res["macs"] / 1e9 - 38.6) <= 0.01 * 38.6
    # exact values (equal to fvcore 0.1.5's count of this model, attention matmuls included)
    assert res["params"] == 26_418_964 and res["macs"] == 38_622_423_168
