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


# ------------------------------------------------------------------ ITC queue content and the momentum ln_final
def _queue_after_one_step(**cfg):
    """clip_micro (with arch config `cfg`) after one training forward of the 2-sample batch: the model, the
    main model's normalised features, the momentum copy's (own ln_final) and its text through the main ln_final."""
    _, m = build("clip_micro", **cfg)
    m.train()
    x, ids, mask = _inputs()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():                        # a momentum copy that differs from the main model (as after EMA)
        for p in m.clip_m.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        m.clip_m.ln_final.weight.mul_(1.5)      # and the two ln_final choices differ
    m.retrieval_loss(x, ids, mask, torch.tensor([3, 4]))
    with torch.no_grad():                        # no optimizer step: the main model is unchanged, the EMA done once
        main = (m._encode_image(m.clip, x), m._encode_text(m.clip, ids, mask))
        mom = (m._encode_image(m.clip_m, x), m._encode_text(m.clip_m, ids, mask))
        mom_main_ln = m._encode_text(m.clip_m, ids, mask, m.clip.ln_final)
    return m, main, mom, mom_main_ln


def _queued(m):
    return m.image_queue[:, :2].t(), m.text_queue[:, :2].t()


def test_queue_holds_the_momentum_features_by_default():
    m, main, mom, _ = _queue_after_one_step()
    img, txt = _queued(m)
    torch.testing.assert_close(img, mom[0])
    torch.testing.assert_close(txt, mom[1])
    assert not torch.allclose(img, main[0]) and not torch.allclose(txt, main[1])
    assert m.idx_queue[0, :2].tolist() == [3, 4] and int(m.queue_ptr) == 2


def test_queue_features_main_enqueues_the_main_models_features():
    """The official CLIP forward: `self._dequeue_and_enqueue(image_features, text_features, idxs)` (sdc17/UPop
    clip/model.py), the main model's normalised features."""
    m, main, mom, _ = _queue_after_one_step(queue_features="main")
    img, txt = _queued(m)
    torch.testing.assert_close(img, main[0])
    torch.testing.assert_close(txt, main[1])
    assert not torch.allclose(img, mom[0])
    assert not img.requires_grad and m.idx_queue[0, :2].tolist() == [3, 4]


def test_momentum_ln_final_main_runs_the_momentum_text_through_the_main_ln_final():
    """Official encode_text_m: `x = self.ln_final(x)` (the main model's; ln_final_m is EMA-updated but unused)."""
    m, _, mom, mom_main_ln = _queue_after_one_step(momentum_ln_final="main")
    _, txt = _queued(m)
    torch.testing.assert_close(txt, mom_main_ln)
    assert not torch.allclose(txt, mom[1])
    m_own, _, mom_own, _ = _queue_after_one_step()
    torch.testing.assert_close(_queued(m_own)[1], mom_own[1])   # default: the momentum copy's own ln_final


def test_paper_arch_is_official_and_micro_keeps_its_config():
    from bench.errors import BenchError
    paper, micro = ClipAdapter.ARCHS["clip_vit_l14_336"], ClipAdapter.ARCHS["clip_micro"]
    assert (paper["queue_features"], paper["momentum_ln_final"]) == ("main", "main")
    # absent from the micro arch: its cells' model_config (and hash) are the ones recorded before the options
    assert "queue_features" not in micro and "momentum_ln_final" not in micro
    for key, bad in (("queue_features", "both"), ("momentum_ln_final", "mine")):
        try:
            build("clip_micro", **{key: bad})
        except BenchError as e:
            assert key in str(e) and "\n" not in str(e)
        else:
            raise AssertionError(f"{key}: {bad} accepted")
