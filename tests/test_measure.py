"""Measuring: params, MACs (fvcore convention, also on meta), throughput, peak memory, environment."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bench.measure import (MacCounter, _retry_on_oom, arch_flops, count_macs, count_params, env_info, peak_memory,
                           throughput)
from bench.registry import MODELS
from bench.structure import extract

aten = torch.ops.aten


def _build(arch, device="cpu", **overrides):
    cls, cfg = MODELS.get(arch)
    adapter = cls(arch, {**cfg, **overrides})
    with torch.device(device):
        model = adapter.build()
    return adapter, model


def _set_fused(model, on: bool):
    for blk in model.blocks:
        blk.attn.fused_attn = on


# ---------------------------------------------------------------------------------------------
# golden numbers: timm's benchmark CSV (results/benchmark-infer-amp-nchw-pt240-cu124-rtx4090.csv)

@pytest.mark.parametrize("arch, gmacs, mparams, exact_params, exact_macs", [
    ("deit_tiny_patch16_224", 1.26, 5.72, 5_717_416, 1_258_411_200),
    ("deit_small_patch16_224", 4.61, 22.05, 22_050_664, 4_608_338_304),
    ("deit_base_patch16_224", 17.58, 86.57, 86_567_656, 17_582_740_224),
])
def test_deit_golden(arch, gmacs, mparams, exact_params, exact_macs):
    r = arch_flops(arch)
    assert r["input_spec"] == "1x3x224x224"
    assert round(r["macs"] / 1e9, 2) == gmacs
    assert round(r["params"] / 1e6, 2) == mparams
    assert r["params"] == exact_params
    # exact value = fvcore FlopCountAnalysis on the same model with unfused attention (checked for DeiT-Ti)
    assert r["macs"] == exact_macs
    # both attention matmuls are in (linear-only counters give 1.07 / 4.24 / 16.85)
    assert r["by_kind"]["attention"] > 0


def test_arch_flops_batch_and_overrides():
    one = arch_flops("deit_tiny_patch16_224")
    two = arch_flops("deit_tiny_patch16_224", batch_size=2)
    assert two["input_spec"] == "2x3x224x224" and two["macs"] == 2 * one["macs"]
    big = arch_flops("deit_tiny_patch16_224", {"img_size": 384})
    assert big["input_spec"] == "1x3x384x384" and big["macs"] > 2.5 * one["macs"]


@pytest.mark.parametrize("grad_ctx", [torch.inference_mode, torch.no_grad])
def test_fused_and_unfused_attention_count_the_same(grad_ctx):
    _, model = _build("deit_small_patch16_224", "meta")
    x = torch.zeros(1, 3, 224, 224, device="meta")
    counts = {}
    for fused in (True, False):
        _set_fused(model, fused)
        counts[fused] = count_macs(model, (x,))["macs"]
        # a caller only in no_grad sees decomposed ops (on meta SDPA becomes the math path: bmm)
        with grad_ctx():
            c = MacCounter()
            with c:
                model(x)
        assert c.total == counts[fused]
    assert counts[True] == counts[False] == 4_608_338_304


def test_every_sdpa_variant_is_counted():
    b, h, L, S, d, dv = 2, 3, 5, 7, 8, 4
    expected = b * h * L * S * (d + dv)
    with torch.device("meta"):
        q, k, v = torch.randn(b, h, L, d), torch.randn(b, h, S, d), torch.randn(b, h, S, dv)
        v_d = torch.randn(b, h, S, d)          # flash/cudnn want dv == d
    same_d = b * h * L * S * 2 * d
    calls = {
        "scaled_dot_product_attention": (lambda: F.scaled_dot_product_attention(q, k, v), expected),
        "math": (lambda: aten._scaled_dot_product_attention_math(q, k, v), expected),
        "flash": (lambda: aten._scaled_dot_product_flash_attention(q, k, v_d), same_d),
        "flash_for_cpu": (lambda: aten._scaled_dot_product_flash_attention_for_cpu(q, k, v), expected),
        "efficient": (lambda: aten._scaled_dot_product_efficient_attention(q, k, v, None, False), expected),
        "cudnn": (lambda: aten._scaled_dot_product_cudnn_attention(q, k, v_d, None, False), same_d),
        # the kernels below SDPA take (B, L, H, D)
        "_flash_attention_forward": (lambda: aten._flash_attention_forward(
            q.transpose(1, 2), k.transpose(1, 2), v_d.transpose(1, 2), None, None, L, S, 0.0, False, False), same_d),
        "_efficient_attention_forward": (lambda: aten._efficient_attention_forward(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, None, None, None, None, 0.0, 0), expected),
    }
    for name, (call, want) in calls.items():
        for ctx in (torch.no_grad, torch.inference_mode):
            with ctx():
                c = MacCounter()
                with c:
                    call()
            assert c.total == want, (name, ctx.__name__, dict(c.by_op))


def test_real_cpu_sdpa_dispatch_is_counted():
    # on CPU, no_grad SDPA runs _scaled_dot_product_flash_attention_for_cpu; inference_mode shows the composite
    q = torch.randn(1, 2, 9, 4)
    for ctx in (torch.no_grad, torch.inference_mode):
        with ctx():
            c = MacCounter()
            with c:
                F.scaled_dot_product_attention(q, q, q)
        assert c.total == 2 * 9 * 9 * 8


# ---------------------------------------------------------------------------------------------
# agreement with fvcore

def _fvcore_total(model, x):
    from fvcore.nn import FlopCountAnalysis
    fa = FlopCountAnalysis(model, x)
    fa.unsupported_ops_warnings(False)
    fa.uncalled_modules_warnings(False)
    return int(fa.total())


def test_vit_micro_matches_fvcore():
    torch.manual_seed(0)
    _, model = _build("vit_micro")
    model.eval()
    _set_fused(model, False)   # fvcore has no SDPA handler: it would drop attention on the fused path
    x = torch.randn(1, 3, 32, 32)
    ours = count_macs(model, (x,))
    # Exactly equal: both count linear/matmul/conv MACs and LayerNorm as 5*numel, nothing else.
    assert ours["macs"] == _fvcore_total(model, x) == 32_575_392
    _set_fused(model, True)
    assert count_macs(model, (x,))["macs"] == ours["macs"]
    # the meta-built architecture gives the same number
    _, meta_model = _build("vit_micro", "meta")
    assert count_macs(meta_model, (torch.zeros(1, 3, 32, 32, device="meta"),))["macs"] == ours["macs"]


class _Cnn(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, groups=2, bias=False)
        self.gn = nn.GroupNorm(2, 8)
        self.inorm = nn.InstanceNorm2d(8, affine=True)
        self.bn_plain = nn.BatchNorm2d(8, affine=False)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        x = self.bn_plain(self.inorm(self.gn(self.conv2(x))))
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        x = F.interpolate(x, scale_factor=0.5, mode="nearest")
        x = self.up(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x) + torch.einsum("bi,ji->bj", x, self.fc.weight)


def test_conv_norm_resample_match_fvcore():
    torch.manual_seed(0)
    model = _Cnn().eval()
    x = torch.randn(2, 3, 16, 16)
    got = count_macs(model, (x,))
    # exact: conv (grouped, transposed), BN at inference (2*numel), GroupNorm/InstanceNorm (5*numel),
    # bilinear (4*out) and nearest (1*out) upsampling, adaptive avg pool (numel in), einsum, linear
    assert got["macs"] == _fvcore_total(model, x)
    assert got["by_kind"]["norm"] > 0 and got["by_kind"]["resample"] > 0 and got["by_kind"]["conv"] > 0


def test_train_mode_model_is_counted_in_eval_and_restored():
    torch.manual_seed(0)
    model = _Cnn().train()
    x = torch.randn(2, 3, 16, 16)
    got = count_macs(model, (x,))["macs"]
    assert model.training and all(m.training for m in model.modules())
    assert got == _fvcore_total(model.eval(), x)
    # the counter in a training-mode forward agrees with fvcore traced in training mode (BN = 5/4 * numel)
    model.train()
    with torch.inference_mode():
        c = MacCounter()
        with c:
            model(x)
    fv_train = _fvcore_total(model.train(), x)
    assert c.total == fv_train > got
    # Under plain no_grad autograd decomposes composites before the mode sees them, and
    # adaptive_avg_pool2d(x, 1) becomes aten.mean (free), so fvcore's numel(input) for it is missing.
    # count_macs always counts under inference_mode for that reason.
    with torch.no_grad():
        c = MacCounter()
        with c:
            model(x)
    assert fv_train - c.total == 2 * 4 * 14 * 14      # numel of the pooled (B, 4, 14, 14) map


def test_batchnorm_training_rule():
    # fvcore: BN at inference = numel * 2 (affine) / 1; in training mode = numel * 5 / 4
    x = torch.randn(2, 4, 3, 3)
    n = x.numel()
    for affine in (True, False):
        bn = nn.BatchNorm2d(4, affine=affine)
        for train, want in ((False, 2 if affine else 1), (True, 5 if affine else 4)):
            bn.train(train)
            with torch.no_grad():
                c = MacCounter()
                with c:
                    bn(x)
            assert c.total == n * want, (affine, train, dict(c.by_op))


def test_count_params_ties_once():
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    assert count_params(nn.ModuleList([emb, head])) == 40


# ---------------------------------------------------------------------------------------------
# pruned models

def _half_keep(structure):
    return {g.name: torch.arange(g.size) % 2 == 0 for g in structure}


def test_extracted_model_has_fewer_macs_and_matches_meta_build():
    torch.manual_seed(0)
    adapter, model = _build("vit_micro")
    x = torch.randn(1, 3, 32, 32)
    dense = count_macs(model, (x,))["macs"]
    structure = adapter.structure(model)
    keep = _half_keep(structure)
    extract(model, adapter, structure, keep)
    pruned = count_macs(model, (x,))
    assert pruned["macs"] < dense

    # the same sliced architecture built and extracted on meta
    adapter_m, meta_model = _build("vit_micro", "meta")
    s_m = adapter_m.structure(meta_model)
    extract(meta_model, adapter_m, s_m, _half_keep(s_m))
    assert count_macs(meta_model, (torch.zeros(1, 3, 32, 32, device="meta"),))["macs"] == pruned["macs"]
    assert count_params(meta_model) == count_params(model)

    # analytic check: heads 4->2, head_dim 24->12, d_ff 384->192; d=96, N=65 tokens, 4 blocks
    d, N, H, dh, ff, depth = 96, 65, 2, 12, 192, 4
    per_block = N * d * 3 * H * dh + N * H * dh * d + 2 * N * d * ff + H * N * N * 2 * dh + 2 * N * d * 5
    stem = 64 * 3 * 4 * 4 * d
    expected = depth * per_block + stem + N * d * 5 + d * 10
    assert pruned["macs"] == expected
    # and the fused/unfused paths still agree on the sliced head_dim
    _set_fused(model, False)
    assert count_macs(model, (x,))["macs"] == expected


# ---------------------------------------------------------------------------------------------
# throughput, memory, environment

def test_throughput_cpu_keys():
    _, model = _build("vit_micro")
    threads_before = torch.get_num_threads()
    r = throughput(model, lambda bs, dev: (torch.randn(bs, 3, 32, 32, device=dev),), "cpu", batch_size=4,
                   warmup=1, iters=2, trials=3, threads=1)
    for key in ("throughput_sps", "trials_sps", "batch_size", "precision", "device", "device_name",
                "latency_ms_bs1", "iters", "warmup", "trials", "threads"):
        assert key in r, key
    assert r["throughput_sps"] > 0 and r["latency_ms_bs1"] > 0
    assert len(r["trials_sps"]) == 3 and all(s > 0 for s in r["trials_sps"])
    assert r["throughput_sps"] == sorted(r["trials_sps"])[1]          # median
    assert r["precision"] == "fp32" and r["device"] == "cpu" and r["batch_size"] == 4
    assert r["iters"] == 2 and r["warmup"] == 1 and r["threads"] == 1
    assert torch.get_num_threads() == threads_before            # restored
    assert not model.training


def test_oom_retry_halves_batch():
    def run(bs):
        if bs > 16:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return bs * 10
    result, bs, errors = _retry_on_oom(run, 64)
    assert (result, bs, len(errors)) == (160, 16, 2)
    with pytest.raises(ValueError):
        _retry_on_oom(lambda bs: (_ for _ in ()).throw(ValueError("not memory")), 8)


def test_peak_memory_cpu_exact_on_linear_chain():
    model = nn.Sequential(*[nn.Linear(256, 256, bias=False) for _ in range(3)])
    x = torch.randn(8, 256)
    r = peak_memory(model, (x,), "cpu")
    assert r["kind"] == "cpu_live_tensors"
    act = 8 * 256 * 4
    # at most two activations are alive at once (the previous one is dropped when the next is assigned)
    assert r["activations_peak_mb"] * 2 ** 20 == 2 * act
    assert r["peak_mem_mb"] * 2 ** 20 == 3 * 256 * 256 * 4 + act + 2 * act


def test_peak_memory_cpu_vit():
    _, model = _build("vit_micro")
    x = torch.randn(4, 3, 32, 32)
    r = peak_memory(model, (x,), "cpu")
    assert r["kind"] == "cpu_live_tensors"
    params_mb = count_params(model) * 4 / 2 ** 20
    assert math.isclose(r["params_mb"], params_mb + sum(b.numel() for b in model.buffers()) * 4 / 2 ** 20)
    # the qkv output of one block alone is 4 * 65 * 288 floats
    assert r["activations_peak_mb"] * 2 ** 20 >= 4 * 65 * 288 * 4
    assert r["peak_mem_mb"] > r["params_mb"] + r["inputs_mb"]


def test_env_info():
    e = env_info()
    for key in ("torch", "timm", "transformers", "open_clip", "bench", "git_sha", "device_name", "cuda_version",
                "python", "threads"):
        assert key in e, key
    assert e["torch"] == torch.__version__ and e["threads"] == torch.get_num_threads()
    assert e["device_name"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_measurements():
    _, model = _build("deit_tiny_patch16_224")
    dense_meta = arch_flops("deit_tiny_patch16_224")["macs"]
    x = torch.randn(1, 3, 224, 224, device="cuda")
    model.cuda()
    assert count_macs(model, (x,))["macs"] == dense_meta          # fused flash/efficient SDPA on CUDA
    r = throughput(model, lambda bs, dev: (torch.randn(bs, 3, 224, 224, device=dev),), "cuda", batch_size=64,
                   warmup=3, iters=5, trials=3)
    assert r["precision"] == "amp_fp16" and r["throughput_sps"] > 0 and r["tf32"] is not None
    m = peak_memory(model, (x,), "cuda")
    assert m["kind"] == "cuda_max_allocated" and m["peak_mem_mb"] > m["params_mb"]
