"""Cell records: one JSON file per finished cell, named by the hash of the cell's resolved config.

Layout under the output folder (default $BENCH_CACHE/results, or --output):
    <output>/<table>/records/<hash>.json        one per cell, written atomically
    <output>/<table>/cells/<hash>/manifest.json pruned model (manifest + safetensors) of that cell
    <output>/<table>/<table>-<profile>-<precision>-<device>.csv   leaderboard CSV (rewritten after every cell)

Record schema (RECORD_VERSION 1); every key is always present, values may be null:
{
  "record_version": 1, "hash": str, "run_id": str, "date_utc": str,
  "status": "pass" | "fail" | "no_ref" | "error",     # vs the card's reference (error = the cell crashed)
  "reason": str | null,                                # why fail / error
  "table": str, "table_version": int, "profile": "micro" | "paper",
  "task": str, "split": str,                           # the split of the primary metric
  "model_arch": str, "model_tag": str,                 # e.g. "vit_micro"; "scratch" / "checkpoint" / "checkpoint+finetune"
  "method": str, "method_impl": "official" | "reimpl" | "baseline" | "dense",
  "ratio_label": str, "ratio_p": float, "ratio_meaning": str, "seed": int,
  "config": dict,                                      # the resolved cell config (hashed), with its code_version:
                                                       # {bench, training, measure, method, task, model} versions
                                                       # (bench.runner.code_version) and seed_varies
  "problems": [str],                                   # broken invariants (non-finite metric, ratio missed), kept
                                                       # so that a reused record is judged again (judge_reference)
  "metrics": {name: float},                            # e.g. {"top1": 71.3, "top5": 95.0} (percent)
  "metric_splits": {name: split},
  "params": {"total": int, "dense_total": int, "prunable_dense": int, "removed": int,
             "target_removed": int, "achieved_reduction": float, "target_reduction": float},
  "flops": {"macs": int, "dense_macs": int, "input_spec": str, "counter": str, "convention": str},
  "speed": {"throughput_sps": float, "batch_size": int, "precision": str, "device": str,
            "latency_ms_bs1": float, "trials": int, "iters": int} | null,
  "memory": {"peak_mem_mb": float, "kind": str} | null,
  "reference": {"values": {name: float}, "source": str, "tolerance": {name: str|float},
                "checks": [{"name": str, "value": float, "paper": float, "tolerance": str|float, "ok": bool}]} | null,
  "timings": {"dense_s": float, "prune_s": float, "finetune_s": float, "eval_s": float, "measure_s": float,
              "total_s": float},
  "retention": [{"group": str, "kind": str, "layer": int, "modality": str, "kept": int, "size": int}],
  "method_info": dict,                                 # schedules, residuals... what the method logged
  "training": {phase: {"steps": int, "precision": str, "micro_batch_size": int, "accumulation_steps": int,
                       "seconds": float, "resumed_from_step": int|null}},   # dense, the method's, finetune
  "env": {"torch": str, "timm": str, "transformers": str|null, "open_clip": str|null, "bench_version": str,
          "git_sha": str|null, "device_name": str, "cuda": str|null, "python": str, "cpu_threads": int},
  "runner": {"pid": int, "host": str, "worker": str|null,   # who computed it: the pytest-xdist worker (gw0, ...),
             "job_id": str|null, "launcher": str|null}      # the Slurm / submitit job, "xdist" / "local" / "slurm"
}

Next to a record, while its cell is computed (bench.locks):
    <output>/<table>/records/<hash>.lock        the cell lock (flock: released by the OS when its holder dies)
    <output>/<table>/records/<hash>.owner       JSON: who holds it (pid, host, worker, job id, since)
    <output>/<table>/jobs.json                  the launcher's jobs per cell (`bench run --launcher local|slurm`)
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from bench.structure import write_json_atomic

RECORD_VERSION = 1


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


def write_record(output: Path, record: dict) -> Path:
    path = record_path(output, record["table"], record["hash"])
    write_json_atomic(path, record)
    return path


def read_record(path: Path) -> dict | None:
    """A record that cannot be parsed (should not happen: writes are atomic) is treated as absent."""
    try:
        rec = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return rec if rec.get("record_version") == RECORD_VERSION else None


def load_records(output: Path, table: str, profile: str | None = None) -> list:
    folder = table_dir(output, table) / "records"
    recs = [read_record(p) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []
    return [r for r in recs if r and (profile is None or r["profile"] == profile)]
