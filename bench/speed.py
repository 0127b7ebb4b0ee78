"""Benchmark (not a test): measured throughput of a dense architecture vs its pruned extraction,
printed next to the FLOPs ratio. Weights are random: speed depends only on the shapes, and the
pruned shapes come from one-shot magnitude selection (SOMP's rule) at ratio p per unit kind."""
from __future__ import annotations

import copy

import torch

from bench import measure
from bench.registry import MODELS
from bench.runner import resolve_device
from bench.structure import extract, kept_param_count
from methods.magnitude import select_units, unit_scores


def _inputs(cfg):
    def make(bs, device):
        return (torch.randn(bs, 3, cfg["img_size"], cfg["img_size"], device=device),)
    return make


def speed_benchmark(arch: str, p: float, kinds, device="auto", batch_size=None, iters=None, trials=3):
    device = resolve_device(device)
    batch_size = batch_size or (256 if device == "cuda" else 64)
    iters = iters or (40 if device == "cuda" else 10)
    cls, cfg = MODELS.get(arch)
    adapter = cls(arch, cfg)
    torch.manual_seed(0)
    dense = adapter.build().eval()
    st = adapter.structure(dense, kinds)
    keep = select_units(st, unit_scores(dense, st), p, "per_type")
    counts = kept_param_count(dense, st, keep)
    pruned = extract(copy.deepcopy(dense), adapter, st, keep)
    make = _inputs(cfg)
    rows = []
    for name, model in (("dense", dense), (f"pruned p={p}", pruned)):
        macs = measure.count_macs(model, make(1, "cpu"))["macs"]
        model = model.to(device)
        tp = measure.throughput(model, make, device, batch_size, warmup=5 if device == "cpu" else 10,
                                iters=iters, trials=trials)
        rows.append((name, measure.count_params(model), macs, tp))
    (_, p0, m0, t0), (_, p1, m1, t1) = rows
    print(f"{arch}: p = {p} of prunable params removed (kinds {', '.join(kinds)}); "
          f"{counts['removed'] / counts['prunable_dense']:.3f} achieved")
    print(f"device {t0['device_name']} ({t0['device']}), precision {t0['precision']}, batch {t0['batch_size']}, "
          f"{t0['iters']} iters x {t0['trials']} trials (median), threads {t0['threads']}")
    print(f"{'model':<16}{'params M':>10}{'GFLOPs':>9}{'samples/s':>12}{'bs1 ms':>9}")
    for name, params, macs, tp in rows:
        print(f"{name:<16}{params / 1e6:>10.2f}{macs / 1e9:>9.2f}{tp['throughput_sps']:>12.1f}{tp['latency_ms_bs1']:>9.2f}")
    print(f"FLOPs ratio {m0 / m1:.2f}x, measured speedup {t1['throughput_sps'] / t0['throughput_sps']:.2f}x "
          f"(trials dense {['%.1f' % v for v in t0['trials_sps']]}, pruned {['%.1f' % v for v in t1['trials_sps']]})")
    return rows
