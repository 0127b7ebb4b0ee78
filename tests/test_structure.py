"""Extraction is exact, manifests round-trip, bad manifests give clear errors."""
import copy
import json

import pytest
import torch

from bench.errors import ManifestError
from bench.structure import extract, kept_param_count, load_manifest, mask_weights, save_manifest
from tests.conftest import build, random_keep

KIND_SETS = [("head_dim",), ("head",), ("ffn",), ("head", "head_dim", "ffn")]


def _masked_vs_extracted(adapter, model, kinds, seed, img):
    st = adapter.structure(model, kinds)
    keep = random_keep(st, seed)
    masked = copy.deepcopy(model)
    mask_weights(masked, st, keep)
    pruned = extract(copy.deepcopy(model), adapter, st, keep)
    x = torch.randn(2, 3, img, img, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        diff = (masked(x) - pruned(x)).abs().max().item()
    return st, keep, pruned, diff


@pytest.mark.parametrize("kinds", KIND_SETS, ids=lambda k: "+".join(k))
@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "manual"])
def test_extraction_exact_micro(kinds, fused):
    adapter, model = build("vit_micro")
    for blk in model.blocks:
        blk.attn.fused_attn = fused
    for seed in range(3):
        st, keep, pruned, diff = _masked_vs_extracted(adapter, model, kinds, seed, 32)
        assert diff <= 1e-5
        # the sliced model really is smaller, with the counted number of params
        assert sum(p.numel() for p in pruned.parameters()) == kept_param_count(model, st, keep)["total"]
        assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("kinds", KIND_SETS, ids=lambda k: "+".join(k))
def test_extraction_exact_deit_small(kinds):
    adapter, model = build("deit_small_patch16_224")
    _, _, pruned, diff = _masked_vs_extracted(adapter, model, kinds, 1, 224)
    assert diff <= 1e-5
    if "head_dim" in kinds:
        assert any(b.attn.head_dim < 64 for b in pruned.blocks)


def test_units_own_the_paper_parameter_counts():
    adapter, model = build("deit_small_patch16_224")
    per = {g.kind: g.params_per_unit for g in adapter.structure(model)}
    # spec: 9234 per UPop head-dim unit (3*6*384 + 18 + 6*384), 98,496 per head, 769 per MLP neuron
    assert per == {"head_dim": 9234, "head": 98496, "ffn": 769}


def test_head_dim_can_shrink_to_one_and_heads_to_one():
    adapter, model = build("vit_micro")
    st = adapter.structure(model, ["head_dim", "head"])
    keep = {g.name: torch.zeros(g.size, dtype=torch.bool) for g in st}
    for k in keep.values():
        k[0] = True
    masked = copy.deepcopy(model)
    mask_weights(masked, st, keep)
    pruned = extract(copy.deepcopy(model), adapter, st, keep)
    assert all(b.attn.head_dim == 1 and b.attn.num_heads == 1 for b in pruned.blocks)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert (masked(x) - pruned(x)).abs().max() <= 1e-5


def test_zero_units_kept_is_refused(micro):
    adapter, model = micro
    st = adapter.structure(model, ["ffn"])
    keep = {g.name: torch.zeros(g.size, dtype=torch.bool) for g in st}
    with pytest.raises(ValueError, match="at least 1"):
        extract(model, adapter, st, keep)


def test_manifest_round_trip(tmp_path, micro):
    adapter, model = micro
    st = adapter.structure(model)
    keep = random_keep(st, 5)
    pruned = extract(copy.deepcopy(model), adapter, st, keep)
    save_manifest(tmp_path / "m", pruned, "vit_micro", adapter.config, st, keep)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["manifest.json", "model.safetensors"]
    loaded, manifest = load_manifest(tmp_path / "m")
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), pruned(x))
    assert manifest["groups"]["blocks.0.mlp:ffn"]["kept"] == torch.nonzero(keep["blocks.0.mlp:ffn"]).view(-1).tolist()
    raw = (tmp_path / "m" / "model.safetensors").read_bytes()
    assert b"pickle" not in raw[:200]


def _saved(tmp_path, micro, name="m", seed=5):
    adapter, model = micro
    st = adapter.structure(model)
    keep = random_keep(st, seed)
    pruned = extract(copy.deepcopy(model), adapter, st, keep)
    return save_manifest(tmp_path / name, pruned, "vit_micro", adapter.config, st, keep)


def test_corrupt_weights_are_refused(tmp_path, micro):
    d = _saved(tmp_path, micro)
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    with pytest.raises(ManifestError, match="corrupt"):
        load_manifest(d)


def test_corrupt_json_is_refused(tmp_path, micro):
    d = _saved(tmp_path, micro)
    (d / "manifest.json").write_text((d / "manifest.json").read_text()[:50])
    with pytest.raises(ManifestError, match="not valid JSON"):
        load_manifest(d)


def test_mismatched_manifest_is_refused(tmp_path, micro):
    a = _saved(tmp_path, micro, "a", seed=1)
    b = _saved(tmp_path, micro, "b", seed=2)
    # weights of b with the manifest of a (sha fixed up so the shape check is what fires)
    (a / "model.safetensors").write_bytes((b / "model.safetensors").read_bytes())
    m = json.loads((a / "manifest.json").read_text())
    m["weights_sha256"] = json.loads((b / "manifest.json").read_text())["weights_sha256"]
    (a / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ManifestError, match="do not fit the pruned architecture"):
        load_manifest(a)


def test_manifest_for_another_architecture_is_refused(tmp_path, micro):
    d = _saved(tmp_path, micro)
    m = json.loads((d / "manifest.json").read_text())
    m["groups"]["blocks.0.mlp:ffn"]["size"] = 7
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ManifestError, match="does not match the architecture"):
        load_manifest(d)


def test_missing_manifest_folder(tmp_path):
    with pytest.raises(ManifestError, match="no manifest.json"):
        load_manifest(tmp_path / "nothing")


def test_interrupted_save_leaves_no_manifest(tmp_path, micro, monkeypatch):
    import safetensors.torch as st_mod
    adapter, model = micro
    st = adapter.structure(model)

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(st_mod, "save_file", boom)
    with pytest.raises(OSError):
        save_manifest(tmp_path / "m", model, "vit_micro", adapter.config, st, st.full_keep())
    assert not (tmp_path / "m" / "manifest.json").exists()
    assert not (tmp_path / "m" / "model.safetensors").exists()
