"""pytest plugin: table cards are collected as files and their cells as test items.

    python -m bench run --table upop_deit            (thin CLI over this plugin)
    pytest -p bench.pytest_plugin bench/tables/upop_deit.yaml -k sgmp --bench-profile micro

A cell is PASSED (within the card's reference tolerance), FAILED (out of tolerance, or an invariant
broken: non-finite metric, ratio not reached), ERROR-as-FAILED (exception, NaN loss, OOM: the reason is
shown and the other cells go on) or NO-REF (ran fine, the card has no reference for it). Finished cells
are reused from their records.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from bench import report
from bench.cards import card_dict, load_card, table_dirs
from bench.config import Paths
from bench.records import load_records, table_dir
from bench.runner import Session, expand_cells, load_checked_card, resolve_device, reuse_record, run_cell

STATUS_WORD = {"pass": "PASSED", "fail": "FAILED", "error": "FAILED", "no_ref": "NO-REF"}


def pytest_addoption(parser):
    g = parser.getgroup("bench", "pruning benchmark cells")
    g.addoption("--bench-profile", default="micro", help="a profile of the card: micro (default), paper, or the card's own")
    g.addoption("--bench-methods", default=None, help="comma-separated methods (default: the card's)")
    g.addoption("--bench-ratios", default=None, help="comma-separated ratio labels (default: the card's)")
    g.addoption("--bench-seeds", default="0", help="comma-separated seeds")
    g.addoption("--bench-device", default="auto", help="cpu | cuda | auto")
    g.addoption("--bench-output", default=None)
    g.addoption("--bench-data-root", default=None)
    g.addoption("--bench-checkpoints", default=None)
    g.addoption("--bench-cache", default=None)


def pytest_configure(config):
    config._bench_t0 = time.perf_counter()
    config._bench_tables = {}
    config._bench_paths = Paths.resolve(config.getoption("--bench-data-root"), config.getoption("--bench-checkpoints"),
                                        config.getoption("--bench-cache"), config.getoption("--bench-output"))
    config._bench_session = None
    from bench.registry import METHODS
    for m in METHODS.names():   # every method is a marker: -m somp
        config.addinivalue_line("markers", f"{m}: cells of method {m}")


def _session(config):
    if config._bench_session is None:
        tr = config.pluginmanager.get_plugin("terminalreporter")

        def log(msg):
            if tr is not None and config.getoption("capture") == "no":
                tr.write_line(f"  {msg}")
        config._bench_session = Session(config._bench_paths, log=log)
    return config._bench_session


def pytest_collect_file(file_path: Path, parent):
    if file_path.suffix == ".yaml" and file_path.parent.resolve() in {d.resolve() for d in table_dirs()}:
        return CardFile.from_parent(parent, path=file_path)
    return None


class CardFile(pytest.File):
    def collect(self):
        cfg = self.config
        card = load_checked_card(self.path.stem)
        cells = expand_cells(card, cfg.getoption("--bench-profile"), cfg.getoption("--bench-methods"),
                             cfg.getoption("--bench-ratios"), cfg.getoption("--bench-seeds"),
                             resolve_device(cfg.getoption("--bench-device")))
        cfg._bench_tables[card.table] = card_dict(card)
        for cell in cells:
            yield CellItem.from_parent(self, name=cell["cell_id"], cell=cell)


class CellFailed(Exception):
    pass


class CellItem(pytest.Item):
    def __init__(self, *, cell, **kw):
        super().__init__(**kw)
        self.cell = cell
        self.add_marker(cell["method"])

    def runtest(self):
        session = _session(self.config)
        rec = reuse_record(session.paths.output, self.cell)
        reused = rec is not None
        if not reused:
            rec = run_cell(self.cell, session)
            _write_outputs(self.config, self.cell["table"])
        self.user_properties += [("bench_status", rec["status"]), ("bench_reused", reused)]
        if rec["status"] in ("fail", "error"):
            raise CellFailed(f"{rec['status']}: {rec['reason']}")

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, CellFailed):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style)

    def reportinfo(self):
        return self.path, None, f"{self.cell['table']}::{self.name}"


@pytest.hookimpl(tryfirst=True)
def pytest_report_teststatus(report, config):
    if report.when != "call":
        return None
    props = dict(report.user_properties)
    status = props.get("bench_status")
    if status is None:
        return None
    suffix = " (reused)" if props.get("bench_reused") else ""
    if report.passed and status == "no_ref":
        return "no-reference", "N", "NO-REF" + suffix
    if report.passed:
        return "passed", ".", "PASSED" + suffix
    return None


def _records_for(card, paths, profile):
    """The latest record of every (part, method, ratio, seed) of this card version and profile (the part:
    the task or model of a multi-task / multi-model card, None otherwise)."""
    latest = {}
    for r in load_records(paths.output, card["table"], profile):
        if r.get("table_version") != card["version"]:
            continue
        key = ((r.get("config") or {}).get("part"), r["method"], r["ratio_label"], r["seed"])
        if key not in latest or r["date_utc"] >= latest[key]["date_utc"]:
            latest[key] = r
    return list(latest.values())


def _write_outputs(config, table):
    card = config._bench_tables[table]
    paths = config._bench_paths
    recs = _records_for(card, paths, config.getoption("--bench-profile"))
    if recs:
        folder = table_dir(paths.output, table)
        report.write_leaderboard_csv(card, recs, folder / report.leaderboard_filename(card, recs))
    return recs


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if config.option.collectonly:
        return
    for table, card in config._bench_tables.items():
        recs = _write_outputs(config, table)
        if not recs:
            continue
        folder = table_dir(config._bench_paths.output, table)
        png = folder / f"{table}-{config.getoption('--bench-profile')}.png"
        report.plot(card, recs, png)
        tr = terminalreporter
        tr.section(f"{card['title']} [{config.getoption('--bench-profile')} profile]")
        tr.write_line(report.render_table(card, recs, "terminal"))
        rel = report.format_relations(report.relation_checks(card, recs))
        if rel:
            tr.write_line(rel)
        ret = report.retention_summary(card, recs)
        if ret:
            tr.write_line(ret)
        tr.write_line(f"records: {folder / 'records'}")
        tr.write_line(f"leaderboard CSV: {folder / report.leaderboard_filename(card, recs)}")
        tr.write_line(f"plot: {png}")
    tr = terminalreporter
    tr.write_line(f"wall time: {time.perf_counter() - config._bench_t0:.1f} s")


def load_card_for_report(name):
    return load_card(name)
