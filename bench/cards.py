"""Table cards: YAML files in bench/tables/ (and the folders in BENCH_TABLES), one per paper table, versioned.

A card names the task, the model, the methods and their options, the ratios (label, p, and what p
means), the metrics (split, higher_is_better), the measuring protocol, named profiles (data source,
dense-model source, budgets) and the paper's reference rows with source and tolerance. The schema is
bench/schema.py; `validate_card` checks all of it without running anything, `parse_card` returns the
typed `Card` that the runner uses.
"""
from __future__ import annotations

import os
from pathlib import Path

import yaml
from pydantic import ValidationError

from bench.errors import BenchError, UnknownName
from bench.options import describe_errors
from bench.schema import (DENSE_RATIO_LABEL, EXTRA_REFERENCE_KEYS, REFERENCE_ROW_KEYS, RELATION_KINDS,  # noqa: F401
                          Card, check_against_registry)

TABLES_DIR = Path(__file__).parent / "tables"
DENSE_RATIO = {"label": DENSE_RATIO_LABEL, "p": 0.0}


def table_dirs() -> list:
    """bench/tables/ plus the folders in BENCH_TABLES (os.pathsep-separated) for one's own cards."""
    extra = [Path(p).expanduser() for p in os.environ.get("BENCH_TABLES", "").split(os.pathsep) if p]
    return [TABLES_DIR] + extra


def table_names() -> list:
    return sorted({p.stem for d in table_dirs() for p in d.glob("*.yaml")})


def card_path(name: str) -> Path:
    for d in table_dirs():
        path = d / f"{name}.yaml"
        if path.is_file():
            return path
    raise UnknownName("table", name, table_names())


def load_card(name: str) -> dict:
    """The card as written (a dict, `_path` added); `parse_card` turns it into the typed `Card`."""
    path = card_path(name)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise BenchError(f"table card {path} is not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8")
    try:
        card = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise BenchError(f"table card {path} is not valid YAML: {' '.join(str(e).split())}")
    if not isinstance(card, dict):
        raise BenchError(f"table card {path} must be a mapping of keys (table:, task:, ...), got {type(card).__name__}")
    card["_path"] = str(path)
    return card


def _structure(raw: dict) -> tuple:
    """(Card or None, problems): the schema's structural check, one sentence per problem."""
    data = {k: v for k, v in raw.items() if k != "_path"}
    try:
        return Card.model_validate(data), []
    except ValidationError as e:
        return None, describe_errors(e, Card)


def validate_card(raw: dict) -> list:
    """Every problem found, as sentences naming each one's path in the card. Empty list = valid."""
    card, errs = _structure(raw)
    path = raw.get("_path")
    if card is not None:
        if path and card.table != Path(path).stem:
            errs.append(f"table: {card.table!r} does not match the file name {path}")
        errs += check_against_registry(card)
    else:   # the plugin blocks can still be checked one by one, so one pass lists every problem
        errs += [e for e in _plugin_block_errors(raw) if e not in errs]
    return errs


def _plugin_block_errors(raw: dict) -> list:
    """The method options, method settings and task data blocks of a card that failed the structural check."""
    from bench.options import block_errors
    from bench.registry import METHODS, TASKS
    errs = []
    for m, opts in (raw.get("method_options") or {}).items() if isinstance(raw.get("method_options"), dict) else []:
        if m in METHODS:
            errs += block_errors(METHODS.get(m).Options, opts, f"method_options.{m}")
    tasks = raw.get("tasks") if isinstance(raw.get("tasks"), list) else [raw.get("task")]
    methods = [m for m in raw.get("methods") or [] if isinstance(m, str) and m in METHODS]
    from bench.schema import Profile
    settings_of = {k: m for m in methods if (k := METHODS.get(m).settings_key or m) not in Profile.model_fields}
    for pname, prof in (raw.get("profiles") or {}).items() if isinstance(raw.get("profiles"), dict) else []:
        if not isinstance(prof, dict):
            continue
        for t in tasks:
            if isinstance(t, str) and t in TASKS:
                errs += block_errors(TASKS.get(t).Data, prof.get("data"), f"profiles.{pname}.data")
        for key, m in settings_of.items():
            if key in prof:
                errs += block_errors(METHODS.get(m).Settings, prof[key], f"profiles.{pname}.{key}")
    return list(dict.fromkeys(errs))


def parse_card(raw: dict) -> Card:
    """The typed card; raises one BenchError listing every problem."""
    if isinstance(raw, Card):
        return raw
    errs = validate_card(raw)
    if errs:
        where = raw.get("_path") or raw.get("table", "the card")
        raise BenchError(f"table card {where}: {errs[0]}" if len(errs) == 1 else
                         f"table card {where} has {len(errs)} problems:\n  - " + "\n  - ".join(errs))
    card, _ = _structure(raw)
    card._path = raw.get("_path")
    return card


check_card = parse_card


def load_checked_card(name: str) -> Card:
    return parse_card(load_card(name))


def card_dict(card) -> dict:
    """The card as plain data with every default filled in (reports, CSV provenance)."""
    if isinstance(card, dict):
        return card
    d = card.model_dump(mode="json", exclude_none=True, by_alias=True)
    for pname, prof in d["profiles"].items():   # method blocks back where the card writes them
        prof.update(prof.pop("method_settings", {}))
    d["_path"] = getattr(card, "_path", None)
    return d


def within(value: float, paper: float, tol) -> bool:
    if isinstance(tol, str) and tol.endswith("%"):
        return abs(value - paper) <= abs(paper) * float(tol[:-1]) / 100
    return abs(value - paper) <= float(tol) + 1e-9


def reference_row(card, method: str, ratio_label: str, profile: str, part: str | None = None):
    """The paper's row of a cell, or None (references judged on another profile, or no such row)."""
    return parse_card(card).reference_row(method, ratio_label, profile, part)
