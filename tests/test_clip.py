import torch

from bench.structure import extract
from models.clip import ClipAdapter
from tests.conftest import build, random_keep


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 32, 32, generator=g)
    ids = torch.randint(7, 60, (2, 9), generator=g)
    ids[:, 0] = 1
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return x, ids, mask


def test_structure_modalities_and_momentum_slices():
    ad, m = build("clip_micro")
    st = ad.structure(m)
    assert {g.modality for g in st} == {"vision", "text"} and st.kinds() == ["ffn", "head_dim"]
    g = st.groups[0]
    assert any(s.param.startswith("clip_m.") for s in g.slices)        # momentum copy cut identically


def test_masked_equals_extracted():
    ad, m = build("clip_micro")
    st = ad.structure(m)
    keep = random_keep(st, seed=3)
    masks = ad.attach_unit_masks(m, st)
    with torch.no_grad():
        for n, v in masks.items():
            v.copy_(keep[n].float())
    x, ids, mask = _inputs()
    ref = m(x, ids, mask)
    n_before = sum(p.numel() for p in m.parameters())
    extract(m, ad, st, keep, {"attention_scale": "fixed"})
    assert sum(p.numel() for p in m.parameters()) < n_before
    torch.testing.assert_close(m(x, ids, mask), ref, atol=1e-5, rtol=1e-5)
    # the momentum copy has the sliced shapes and the main model's weights (copy_params)
    blk, blk_m = m.clip.transformer.resblocks[0], m.clip_m.transformer.resblocks[0]
    assert torch.equal(blk.attn.in_proj_weight, blk_m.attn.in_proj_weight)
    assert m(x, ids, mask, mode="train").isfinite()


def test_sliced_scale_is_the_default():
    ad, m = build("clip_micro")
    st = ad.structure(m, kinds=["head_dim"])
    keep = {g.name: torch.arange(g.size) < 4 for g in st}
    extract(m, ad, st, keep, {})
    assert m.clip.visual.transformer.resblocks[0].attn.scale == 4 ** -0.5


def test_checkpoint_key_mapping(tmp_path):
    ad, m = build("clip_micro", seed=1)
    # an open_clip-style state dict (visual.*, transformer.*, token_embedding..., DDP prefix) from the
    # micro architecture itself
    official = {f"module.{k[len('clip.'):]}": v.clone() for k, v in m.state_dict().items() if k.startswith("clip.")}
    official["input_resolution"] = torch.tensor(32)
    assert "module.visual.transformer.resblocks.0.attn.in_proj_weight" in official
    assert "module.transformer.resblocks.0.mlp.c_fc.weight" in official
    path = tmp_path / "ViT-micro.pt"
    torch.save(official, path)
    ad2, m2 = build("clip_micro", seed=2)
    ad2.load_checkpoint(m2, path)
    for k, v in m.state_dict().items():
        if k.startswith("clip."):
            assert torch.equal(m2.state_dict()[k], v)
            assert torch.equal(m2.state_dict()["clip_m." + k[5:]], v)
    mapped = ClipAdapter.map_checkpoint_keys({"logit_scale": torch.ones(())})
    assert set(mapped) == {"clip.logit_scale", "clip_m.logit_scale"}


def test_paper_size_on_meta():
    from bench import measure
    with torch.device("meta"):
        ad, m = build("clip_vit_l14_336")
    assert abs(sum(p.numel() for p in m.parameters()) / 1e6 - 856.0) / 856.0 < 0.01
    x = torch.zeros(1, 3, 336, 336, device="meta")
    ids = torch.zeros(1, 77, dtype=torch.long, device="meta")
    macs = measure.count_macs(m, (x, ids, torch.ones_like(ids)), {"mode": "train"})["macs"]
    assert abs(macs / 1e9 - 395.7) / 395.7 < 0.01
