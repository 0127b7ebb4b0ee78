"""Measuring: parameters, MACs ("FLOPs" in the fvcore convention), throughput, peak memory, environment.

Conventions: DESIGN.md, "Measuring conventions" (anchors §2.4, §2.5). One file per concern, each stating the
conventions of its part in its docstring:

- `flops.py`: parameters (`count_params`), the MAC counter (`MacCounter` and its per-op formulas,
  `count_macs`, `arch_flops`, `protocol_flops`, `input_spec`) and `eval_mode`;
- `speed.py`: throughput (`throughput`, timm's benchmark.py protocol): precisions, autocast, device sync,
  out-of-memory retry, timed steps;
- `memory.py`: peak memory (`peak_memory`, `LiveTensorTracker`);
- `env.py`: the environment of a record (`env_info`: versions, git commit, device and CPU names).

Import from `bench.measure` (the names in `__all__`); the files import each other directly.
"""
from __future__ import annotations

from bench.measure.env import env_info
from bench.measure.flops import (MacCounter, arch_flops, count_macs, count_params, eval_mode, input_spec,
                                 protocol_flops)
from bench.measure.memory import LiveTensorTracker, peak_memory
from bench.measure.speed import _retry_on_oom, throughput

# The version of the measuring code (params, FLOPs, throughput, memory): part of every cell's record hash
# (bench.runner.code_version). Bump it when a change in this package alters a measured number.
MEASURE_VERSION = 1

__all__ = ["count_params", "count_macs", "arch_flops", "throughput", "peak_memory", "env_info", "MacCounter",
           "LiveTensorTracker",
           # also used as bench.measure.X by the suite and its tests
           "MEASURE_VERSION", "eval_mode", "input_spec", "protocol_flops", "_retry_on_oom"]
