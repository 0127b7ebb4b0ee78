"""Cell records: one JSON file per finished cell, named by the hash of the cell's resolved config.

Layout under the output folder (default $BENCH_CACHE/results, or --output):
    <output>/<table>/records/<hash>.json        one per cell, written atomically
    <output>/<table>/cells/<hash>/manifest.json pruned model (manifest + safetensors) of that cell
    <output>/<table>/<table>-<profile>-<precision>-<device>.csv   leaderboard CSV (rewritten after every cell)

The record's schema is the typed `Record` below (RECORD_VERSION 1): the runner builds one `Record` per cell,
fills its typed parts as the cell goes (dense model, pruning, finetune, evaluation, measurement, judging) and
serializes it once (`write_record`); `read_record` / `load_records` validate every file against it, so a
reader sees every key (values may be null) and a record that does not fit is treated as absent.

Next to a record, while its cell is computed (bench.locks):
    <output>/<table>/records/<hash>.lock        the cell lock (flock: released by the OS when its holder dies)
    <output>/<table>/records/<hash>.owner       JSON: who holds it (pid, host, worker, job id, since)
    <output>/<table>/jobs.json                  the launcher's jobs per cell (`bench run --launcher local|slurm`)
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bench.structure import write_json_atomic

RECORD_VERSION = 1
Status = Literal["pass", "fail", "no_ref", "error"]   # vs the card's reference; error: the cell crashed


class _Part(BaseModel):
    """A part of a record: its keys are fixed (a typo is an error where the record is built)."""
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class _OpenPart(BaseModel):
    """A part whose core keys are typed and whose other keys are what the measuring code adds (kept as is)."""
    model_config = ConfigDict(extra="allow", validate_assignment=True)


class Params(_Part):
    total: int
    dense_total: int
    prunable_dense: int
    removed: int
    target_removed: int
    achieved_reduction: float
    target_reduction: float
    basis: str = "prunable"          # the ratio's basis: the prunable params, or all params (GOHSP's convention)


class Flops(_Part):
    macs: int                        # of the card's first (paper) FLOPs protocol
    dense_macs: int
    protocol: Optional[str] = None
    by_protocol: dict[str, int] = {}
    dense_by_protocol: dict[str, int] = {}
    inference_macs: Optional[int] = None
    dense_inference_macs: Optional[int] = None
    input_spec: str
    counter: str                     # "bench.dispatch": the suite's MAC counter (bench.measure.flops)
    convention: str                  # "fma1_attn_incl": one multiply-add = 1 MAC, attention matmuls included


class Speed(_OpenPart):
    """bench.measure.speed.throughput's result; with a dense twin timed in alternation, the paired speedup."""
    throughput_sps: float
    batch_size: int
    precision: str
    device: str
    latency_ms_bs1: Optional[float] = None
    trials: int
    iters: int
    dense_throughput_sps: Optional[float] = None
    speedup_measured: Optional[float] = None


class Memory(_OpenPart):
    """bench.measure.memory.peak_memory's result."""
    peak_mem_mb: float
    kind: str                        # how it was measured: "cuda_max_allocated" or the CPU tensor tracker
    device: Optional[str] = None
    precision: Optional[str] = None


class Check(_Part):
    name: str
    value: Optional[float]
    paper: float
    tolerance: Any                   # "2%" or an absolute number, as the card writes it
    ok: bool


class Reference(_Part):
    values: dict[str, Any]
    source: Optional[str] = None
    tolerance: dict[str, Any]
    checks: list[Check]


class Timings(_Part):
    dense_s: float = 0.0
    prune_s: float = 0.0
    finetune_s: float = 0.0
    eval_s: float = 0.0
    measure_s: float = 0.0
    total_s: float = 0.0


class RetentionRow(_Part):
    group: str
    kind: str
    layer: Optional[int] = None
    modality: Optional[str] = None
    kept: int
    size: int


class TrainingPhase(_Part):
    """What a record keeps of one training phase (dense, the method's, finetune): bench.training.train's stats."""
    steps: Optional[int] = None
    epochs: Optional[float] = None
    precision: Optional[str] = None
    micro_batch_size: Optional[int] = None
    accumulation_steps: Optional[int] = None
    world_size: Optional[int] = None
    sharding: Optional[str] = None
    seconds: Optional[float] = None
    resumed_from_step: Optional[int] = None
    cached: bool = False             # the dense model came from the cache: these are its first run's figures


class Runner(_OpenPart):
    """Who computed the record (bench.locks.runner_identity)."""
    pid: int
    host: str
    worker: Optional[str] = None     # the pytest-xdist worker (gw0, ...)
    job_id: Optional[str] = None     # the Slurm / submitit job
    launcher: Optional[str] = None   # "xdist" / "local" / "slurm"


class Record(_Part):
    """One cell's result. `config` is the resolved cell config that was hashed (bench.runner.expand_cells),
    with its code_version ({bench, training, measure, method, task, model} versions) and seed_varies."""
    record_version: int = RECORD_VERSION
    hash: str
    run_id: str
    date_utc: str
    status: Optional[Status] = None
    reason: Optional[str] = None     # why fail / error
    table: str
    table_version: int
    profile: str
    task: str
    part: Optional[str] = None       # the card's part (a GLUE task, a model of a GOHSP card), None for one part
    split: str                       # the split of the primary metric
    model_arch: str                  # e.g. "vit_micro"
    model_tag: Optional[str] = None  # "scratch" / "checkpoint" / "checkpoint+finetune"
    method: str
    method_impl: str                 # "official" | "reimpl" | "baseline" | "dense"
    ratio_label: str
    ratio_p: float
    ratio_meaning: Optional[str] = None
    seed: int
    config: dict[str, Any]
    problems: list[str] = []         # broken invariants (non-finite metric, ratio missed): kept so that a reused
                                     # record is judged again (bench.judge.judge_reference)
    metrics: dict[str, Optional[float]] = {}     # e.g. {"top1": 71.3, "top5": 95.0} (percent)
    metric_splits: dict[str, str] = {}
    params: Optional[Params] = None
    flops: Optional[Flops] = None
    speed: Optional[Speed] = None
    memory: Optional[Memory] = None
    reference: Optional[Reference] = None
    timings: Timings = Field(default_factory=Timings)
    retention: list[RetentionRow] = []
    method_info: dict[str, Any] = {}  # schedules, residuals... what the method logged
    training: dict[str, TrainingPhase] = {}
    selection: Optional[dict[str, Any]] = None   # finetune.selection paper: the chosen epoch (bench.selection)
    env: dict[str, Any] = {}          # versions and hardware (bench.measure.env.env_info)
    runner: Optional[Runner] = None

    def to_data(self) -> dict:
        """The record as JSON data: what `write_record` writes and what every reader gets."""
        return self.model_dump(mode="json")

    @classmethod
    def from_data(cls, data: dict) -> "Record":
        return cls.model_validate(data)


def _str_keys(obj):
    """JSON keys are strings anyway; converting first lets mixed keys (0.1 and "default") be sorted."""
    if isinstance(obj, dict):
        return {str(k): _str_keys(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_str_keys(v) for v in obj]
    return obj


def config_hash(config: dict) -> str:
    blob = json.dumps(_str_keys(config), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def table_dir(output: Path, table: str) -> Path:
    return Path(output) / table


def record_path(output: Path, table: str, h: str) -> Path:
    return table_dir(output, table) / "records" / f"{h}.json"


def cell_dir(output: Path, table: str, h: str) -> Path:
    return table_dir(output, table) / "cells" / h


def write_record(output: Path, record: Record) -> dict:
    """Serialize the record (once) and write it atomically; returns the data written."""
    data = record.to_data()
    write_json_atomic(record_path(output, record.table, record.hash), data)
    return data


def read_record(path: Path) -> dict | None:
    """A record file as data, validated by `Record` (every key present). A file that cannot be parsed (should
    not happen: writes are atomic), of another RECORD_VERSION or that does not fit the schema is treated as
    absent (its cell is computed again)."""
    try:
        raw = json.loads(Path(path).read_text())
        if not isinstance(raw, dict) or raw.get("record_version") != RECORD_VERSION:
            return None
        return Record.from_data(raw).to_data()
    except (OSError, json.JSONDecodeError, ValidationError):
        return None


def load_records(output: Path, table: str, profile: str | None = None) -> list:
    folder = table_dir(output, table) / "records"
    recs = [read_record(p) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []
    return [r for r in recs if r and (profile is None or r["profile"] == profile)]
