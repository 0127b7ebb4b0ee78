"""The declared contracts of bench/api.py hold for every registered plugin, and the harness and the methods
name no model family's internals (the project's rule: only a model adapter knows module names and config
attributes; only a task opens a batch)."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

from bench.api import Geometry, Method, ModelAdapter, TaskAdapter
from bench.cards import load_checked_card, table_names
from bench.registry import METHODS, MODELS, TASKS

ROOT = Path(__file__).resolve().parents[1]
TASK_MEMBERS = ("train_batches", "loss", "evaluate", "dummy_inputs", "steps_per_epoch")
DISTILLING = ("vtrans", "fast_vtrans", "faster_vtrans")   # read model outputs through the task


def _overrides(cls, base, name) -> bool:
    return getattr(cls, name) is not getattr(base, name)


@pytest.mark.parametrize("name", TASKS.names())
def test_every_task_implements_the_members_the_runner_calls(name):
    cls = TASKS.get(name)
    missing = [m for m in TASK_MEMBERS if not _overrides(cls, TaskAdapter, m)]
    assert not missing, f"task {name} lacks {missing}"


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_implements_prune(name):
    assert _overrides(METHODS.get(name), Method, "prune")


def test_what_the_distilling_methods_need_is_declared_by_every_task_and_family_they_run_on():
    """VTrans reads the adapter's geometry and the task's forward / loss_from_output / token_shape /
    sequence_length: every cell of every card that runs it gives them, on its micro and paper models."""
    from bench.runner import expand_cells
    seen = set()
    for table in table_names():
        card = load_checked_card(table)
        for prof in ("micro", "paper"):
            for cell in expand_cells(card, prof, None, None, None, "cpu"):
                if cell["method"] not in DISTILLING or (cell["task"], cell["model"]) in seen:
                    continue
                seen.add((cell["task"], cell["model"]))
                task = TASKS.get(cell["task"])
                for member in ("forward", "loss_from_output", "token_shape", "sequence_length"):
                    assert _overrides(task, TaskAdapter, member), (table, cell["task"], member)
                cls, cfg = MODELS.get(cell["model"])
                assert _overrides(cls, ModelAdapter, "geometry"), cell["model"]
                adapter = cls(cell["model"], {**cfg, **(cell.get("model_config") or {})})
                with torch.device("meta"):
                    geo = adapter.geometry(adapter.build())
                assert isinstance(geo, Geometry) and geo.heads * geo.head_dim > 0 and geo.layers > 0
    assert {"bert_micro", "gpt2_micro", "llama_micro", "llama2_7b"} <= {m for _, m in seen}


# the families' internals, as code (docstrings and comments may name them): transformers config attributes and
# timm / transformers module names read as attributes, batch keys read by subscript or .get(), family imports
ATTRIBUTES = {"num_attention_heads", "hidden_size", "n_embd", "n_head", "num_hidden_layers", "n_layer",
              "intermediate_size", "vocab_size", "img_size", "embed_dim", "num_heads", "qkv", "fc1", "fc2",
              "self_attn", "q_proj", "k_proj", "v_proj", "o_proj", "blocks", "encoder"}
KEYS = {"input_ids", "attention_mask", "token_type_ids", "pixel_values", "labels", "img_size", "vocab_size",
        "hidden_size", "num_attention_heads", "embed_dim", "num_heads"}


def _internals(path: Path) -> list:
    hits = []
    for node in ast.walk(ast.parse(path.read_text())):
        where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Attribute) and (node.attr in ATTRIBUTES or node.attr == "config" and isinstance(
                node.value, ast.Name) and node.value.id in ("model", "student", "teacher")):   # a model's config
            hits.append(f"{where}: .{node.attr}")
        elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and node.slice.value in KEYS:
            hits.append(f"{where}: [{node.slice.value!r}]")
        elif isinstance(node, ast.Call) and any(isinstance(a, ast.Constant) and a.value in KEYS for a in node.args):
            hits.append(f"{where}: a call with {[a.value for a in node.args if isinstance(a, ast.Constant)]}")
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            mods = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            hits += [f"{where}: import {m}" for m in mods if m == "models" or m.startswith("models.")]
    return hits


def test_methods_and_bench_name_no_family_internals():
    hits = [h for folder in ("methods", "bench") for p in sorted((ROOT / folder).rglob("*.py")) for h in _internals(p)]
    assert not hits, "\n".join(hits)


def test_bench_imports_no_plugin_module():
    """The harness reaches methods, tasks and models through the registry (discovery), never by import (the
    metrics registry, a library of metric definitions, it imports)."""
    hits = []
    for p in sorted((ROOT / "bench").rglob("*.py")):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                hits += [f"{p.relative_to(ROOT)}:{node.lineno}: {m}" for m in mods
                         if m.split(".")[0] in ("methods", "tasks", "models")]
    assert not hits, hits


def test_tasks_import_nothing_private_from_models():
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in sorted((ROOT / "tasks").rglob("*.py"))
            for i, line in enumerate(p.read_text().splitlines(), 1)
            if re.search(r"from models(\.\w+)* import .*\b_\w+|from models", line)]
    assert not hits, hits
