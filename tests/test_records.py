"""The record is a typed object (bench.records.Record), built by the runner and serialized once; a card is
expanded into cells once per `bench run` (the CLI's expansion is the one pytest runs)."""
from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

import bench.pytest_plugin
import bench.runner
from bench.cli import main
from bench.records import Record, read_record, record_path, write_record
from bench.runner import _empty_record, expand_cells, load_checked_card
from tests.test_trust import TABLE, card_env, fake_record  # noqa: F401  (card_env: a fixture)


def somp_cell():
    return next(c for c in expand_cells(load_checked_card(TABLE), "micro", device="cpu") if c["method"] == "somp")


def test_a_record_refuses_wrong_types_and_unknown_keys_where_it_is_built(card_env):
    rec = _empty_record(somp_cell())
    with pytest.raises(ValidationError):
        rec.timings.dense_s = "three seconds"
    with pytest.raises(ValidationError):
        rec.status = "passed"                       # not one of pass / fail / no_ref / error
    with pytest.raises(ValidationError):
        rec.metrcs = {"top1": 1.0}                  # a typo is an error, not a new key
    with pytest.raises(ValidationError):
        Record.from_data({**rec.to_data(), "params": {"total": 1}})   # a part with keys missing


def test_a_record_is_written_once_as_its_data_and_read_back_validated(card_env):
    _, out = card_env
    rec = fake_record(somp_cell(), 47.5)
    data = write_record(out, rec)
    path = record_path(out, rec.table, rec.hash)
    assert json.loads(path.read_text()) == data == read_record(path) == rec.to_data()
    assert data["status"] == "no_ref" and data["training"] == {} and data["runner"] is None
    bad = {**data, "timings": {**data["timings"], "total_s": "soon"}}
    path.write_text(json.dumps(bad))
    assert read_record(path) is None                # does not fit the schema: treated as absent (computed again)
    path.write_text(json.dumps({**data, "record_version": 0}))
    assert read_record(path) is None


def test_bench_run_expands_the_card_once_and_pytest_runs_those_cells(card_env, monkeypatch):
    _, out = card_env
    calls = []
    real = bench.runner.expand_cells

    def counted(*a, **k):
        calls.append(a[1:3])
        return real(*a, **k)
    monkeypatch.setattr(bench.runner, "expand_cells", counted)
    monkeypatch.setattr(bench.pytest_plugin, "expand_cells", counted)
    assert main(["run", "--table", TABLE, "--methods", "dense", "--quiet"]) == 0
    # the run's cells (--methods dense) were expanded once, by the CLI: the plugin read its cells file. (The
    # table at the end expands the whole card, every method: which records are current, bench.runner.current_records.)
    assert [c for c in calls if c[1] == "dense"] == [("micro", "dense")]
    assert all(c == ("micro", None) for c in calls[1:])
    [rec] = [json.loads(p.read_text()) for p in (out / TABLE / "records").glob("*.json")]
    assert rec["method"] == "dense" and rec["status"] in ("pass", "no_ref")
    assert not list((out / TABLE).glob(".cells.json*"))   # the cells file is removed after the run
