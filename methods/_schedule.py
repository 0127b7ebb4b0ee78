"""Pruning schedules, the "when and how much" third of a method (next to _importance and _allocate).

  one_shot(p)              everything at once (SOMP, Wanda-sp): the fraction removed at every step is p
  cubic_sparsity(...)      Zhu & Gupta (2018, eq. 1): s_t = s_f + (s_i - s_f)(1 - (t - t0)/(n dt))^3 (SGMP)
  prune_steps(...)         (t0, dt, n) of the cubic schedule's pruning events for a run of given length
  sine_progress(t, T)      UPop's progressive shrinking p_t / p = sin(pi (t + 1) / (2 T)) (Shi et al. 2023,
                           docs/specs/upop.md §3.6; t + 1 as the official code)
  interval_for(setting, p) UPop's mask-update interval for ratio p (a number, or {p: steps, "default": steps})
"""
from __future__ import annotations

import math

from bench.errors import BenchError


def one_shot(p: float, t: int = 0, total: int = 1) -> float:
    """The one-shot schedule: the whole fraction p at once."""
    return p


def cubic_sparsity(t: int, t0: int, dt: int, n: int, s_i: float, s_f: float) -> float:
    """Zhu & Gupta's schedule; s_i before t0 and s_f after t0 + n*dt."""
    if t < t0:
        return s_i
    frac = min(1.0, (t - t0) / float(n * dt)) if n * dt > 0 else 1.0
    return s_f + (s_i - s_f) * (1.0 - frac) ** 3


def prune_steps(total_steps: int, steps_per_epoch: int, start_epoch: float, end_fraction: float, events: int):
    """(t0, dt, n): events pruning events spread so that the last one is at end_fraction of the run."""
    t0 = int(round(start_epoch * steps_per_epoch))
    end = max(t0 + 1, int(round(end_fraction * total_steps)))
    n = max(1, events)
    dt = max(1, (end - t0) // n)
    return t0, dt, n


def sine_progress(t: int, total: int) -> float:
    """p_t / p = sin(π(t+1)/(2T)) (UPop, docs/specs/upop.md §3.6)."""
    return math.sin(math.pi * (t + 1) / (2 * total))


def interval_for(setting, p: float) -> int:
    """The mask-update interval for ratio p: the number, or the mapping's entry for p (else its `default`)."""
    if isinstance(setting, dict):
        for k, v in setting.items():
            if k != "default" and abs(float(k) - p) < 1e-9:
                return int(v)
        if "default" not in setting:
            raise BenchError(f"upop interval {setting} has no entry for p = {p} and no `default`")
        return int(setting["default"])
    return int(setting)
