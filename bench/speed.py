"""Benchmark (not a test): measured throughput of a dense architecture vs its pruned extraction,
printed next to the FLOPs ratio. Weights are random: speed depends only on the shapes, and the
pruned shapes come from the registered `somp` method (one-shot magnitude, per kind) at ratio p. Dense
and pruned are timed in alternation, one trial each, so both see the same machine state."""
from __future__ import annotations

import copy

import torch

from bench import measure
from bench.api import CellContext, RatioSpec
from bench.registry import METHODS, MODELS
from bench.runner import paired_throughput, resolve_device
from bench.structure import extract, kept_param_count


def speed_benchmark(arch: str, p: float, kinds, device="auto", batch_size=None, iters=None, trials=3):
    device = resolve_device(device)
    batch_size = batch_size or (256 if device == "cuda" else 64)
    iters = iters or (40 if device == "cuda" else 10)
    cls, cfg = MODELS.get(arch)
    adapter = cls(arch, cfg)
    adapter.example_inputs(1, "meta")   # fails with one line for families that need a card's inputs
    torch.manual_seed(0)
    dense = adapter.build().eval()
    ctx = CellContext(model=dense, adapter=adapter, structure=adapter.structure(dense), task=None,
                      ratio=RatioSpec(f"p={p}", p), options={"unit_kinds": list(kinds), "allocation": "per_type"},
                      settings={}, device=torch.device("cpu"), seed=0, train=None)
    result = METHODS.get("somp")().prune(ctx)
    st, keep = result.structure, result.keep
    counts = kept_param_count(dense, st, keep)
    pruned = extract(copy.deepcopy(dense), adapter, st, keep)

    def make(bs, dev):
        return adapter.example_inputs(bs, dev)

    macs = [measure.count_macs(m, make(1, "cpu"))["macs"] for m in (dense, pruned)]
    params = [measure.count_params(m) for m in (dense, pruned)]
    tp = {"batch_size": batch_size, "warmup": 5 if device == "cpu" else 10, "iters": iters, "trials": trials}
    res = paired_throughput(pruned.to(device), dense, make, device, tp)
    print(f"{arch}: p = {p} of prunable params removed (kinds {', '.join(kinds)}); "
          f"{counts['removed'] / counts['prunable_dense']:.3f} achieved")
    print(f"device {res['device_name']} ({res['device']}), precision {res['precision']}, batch {res['batch_size']}, "
          f"{iters} iters x {trials} trials in alternation (median), threads {res['threads']}")
    print(f"{'model':<16}{'params M':>10}{'GFLOPs':>9}{'samples/s':>12}")
    print(f"{'dense':<16}{params[0] / 1e6:>10.2f}{macs[0] / 1e9:>9.2f}{res['dense_throughput_sps']:>12.1f}")
    print(f"{f'pruned p={p}':<16}{params[1] / 1e6:>10.2f}{macs[1] / 1e9:>9.2f}{res['throughput_sps']:>12.1f}")
    print(f"FLOPs ratio {macs[0] / macs[1]:.2f}x, measured speedup {res['speedup_measured']:.2f}x "
          f"(trials dense {['%.1f' % v for v in res['dense_trials_sps']]}, pruned {['%.1f' % v for v in res['trials_sps']]})")
    return res
