"""pytest plugin: table cards are collected as files and their cells as test items.

    python -m bench run --table upop_deit            (thin CLI over this plugin)
    pytest -p bench.pytest_plugin bench/tables/upop_deit.yaml -k sgmp --bench-profile micro

A cell is PASSED (within the card's reference tolerance), FAILED (out of tolerance, or an invariant
broken: non-finite metric, ratio not reached), ERROR-as-FAILED (exception, NaN loss, OOM: the reason is
shown and the other cells go on) or NO-REF (ran fine, the card has no reference for it). Finished cells
are reused from their records.

With pytest-xdist (`bench run --workers N`, or `pytest -n N -p bench.pytest_plugin ...`) the cells run in N
worker processes: one GPU each when CUDA is there (`CUDA_VISIBLE_DEVICES` set from the worker's index before
torch touches CUDA), otherwise the CPU cores split between them. Each cell is computed once (a lock per cell
record: `bench.locks`), the dense model once (a lock on its cache folder); the table, CSV and plot are built
once, on the controller, from the records on disk after the workers end; `-s` lines are prefixed `[gw0]`.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

import pytest

from bench import report
from bench.cards import card_dict, load_card, table_dirs
from bench.config import Paths
from bench.recipe import parse_micro_batch
from bench.records import table_dir
from bench.locks import run_cell_once
from bench.runner import Session, current_records, expand_cells, load_checked_card, read_cells, resolve_device

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
    g.addoption("--bench-checkpoint-every-steps", type=int, default=0,
                help="training-state checkpoint every N optimizer steps of each training phase (0: off)")
    g.addoption("--bench-checkpoint-every-minutes", type=float, default=0.0,
                help="training-state checkpoint every M minutes of each training phase (0: off)")
    g.addoption("--bench-quiet", action="store_true", help="no progress lines while a training phase runs")
    g.addoption("--bench-micro-batch", default=None, help="micro-batch of every training phase (N or auto)")
    g.addoption("--bench-sharding", default=None, choices=("none", "fsdp"),
                help="sharding of every training phase under torchrun (overrides the cards' sharding key)")
    g.addoption("--bench-force", action="store_true", help="run the selected cells again, even those with a record")
    g.addoption("--bench-cells", default=None,
                help="a JSON file of the cells to run, as `bench run` expanded them (then they are not expanded "
                     "again here, and every xdist worker runs the same cells)")


def pytest_configure(config):
    config._bench_t0 = time.perf_counter()
    config._bench_tables = {}
    config._bench_paths = Paths.resolve(config.getoption("--bench-data-root"), config.getoption("--bench-checkpoints"),
                                        config.getoption("--bench-cache"), config.getoption("--bench-output"))
    config._bench_session = None
    _configure_xdist(config)
    from bench import distributed as dist
    # torchrun started this pytest directly (`torchrun ... -m pytest -p bench.pytest_plugin ...`): join the group
    # here (`bench run` under torchrun has joined it already)
    config._bench_dist_here = (dist.env_world_size() > 1 and not dist.is_distributed()
                               and dist.init(resolve_device(config.getoption("--bench-device"))))
    from bench.registry import METHODS
    for m in METHODS.names():   # every method is a marker: -m somp
        config.addinivalue_line("markers", f"{m}: cells of method {m}")


def _worker_id(config) -> str | None:
    """The pytest-xdist worker id (gw0, gw1, ...) in a worker process, None in the controller or a serial run."""
    wi = getattr(config, "workerinput", None)
    return wi.get("workerid") if wi else None


def _is_xdist_controller(config) -> bool:
    return _worker_id(config) is None and bool(getattr(config.option, "numprocesses", None)) \
        and not getattr(config.option, "collectonly", False)


def _configure_xdist(config) -> None:
    """Controller: the GPUs the workers share out (BENCH_WORKER_GPUS, inherited by the workers). Worker: its GPU
    (CUDA_VISIBLE_DEVICES, before anything initialises CUDA in this process) or its share of the CPU threads."""
    from bench.workers import gpus_for, pin_gpus, share_cpu, visible_gpus
    wid = _worker_id(config)
    if wid is None:
        if _is_xdist_controller(config) and "BENCH_WORKER_GPUS" not in os.environ \
                and config.getoption("--bench-device") in ("auto", "cuda"):
            os.environ["BENCH_WORKER_GPUS"] = ",".join(visible_gpus())
        return
    n = int(config.workerinput.get("workercount") or os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
    index = int(wid[2:]) if wid[2:].isdigit() else 0
    gpus = [g for g in os.environ.get("BENCH_WORKER_GPUS", "").split(",") if g]
    if gpus and config.getoption("--bench-device") in ("auto", "cuda"):
        pin_gpus(gpus_for(index, gpus))   # more workers than GPUs: they share
    else:
        share_cpu(n)
    if config.getoption("capture") == "no" and not isinstance(sys.stderr, _Prefixed):
        # -s: a worker's stdout does not reach the terminal, its stderr does: every line it writes there (logs,
        # progress lines, warnings) starts with its id; not a tty, so progress is plain lines, not live bars
        sys.stderr = _Prefixed(sys.stderr, f"[{wid}] ")


class _Prefixed:
    """A text stream that starts every line with `prefix` (and says it is not a terminal)."""

    def __init__(self, stream, prefix: str):
        self._stream, self._prefix, self._bol = stream, prefix, True

    def write(self, text: str) -> int:
        out = []
        for piece in text.splitlines(keepends=True):
            if self._bol:
                out.append(self._prefix)
            out.append(piece)
            self._bol = piece.endswith(("\n", "\r"))
        self._stream.write("".join(out))
        return len(text)

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _worker_write(config, text: str) -> None:
    """A line on a worker's stderr, with the worker id in front."""
    stream = sys.stderr
    stream.write(text if isinstance(stream, _Prefixed) else f"[{_worker_id(config)}] {text}")
    stream.flush()


def _session(config):
    if config._bench_session is None:
        tr = config.pluginmanager.get_plugin("terminalreporter")
        wid = _worker_id(config)

        def log(msg):
            if config.getoption("capture") != "no":
                return
            if wid is not None:   # a worker's stdout does not reach the terminal; its stderr does
                _worker_write(config, f"  {msg}\n")
            elif tr is not None:
                tr.write_line(f"  {msg}")
        config._bench_session = Session(config._bench_paths, log=log,
                                        checkpoint_every_steps=config.getoption("--bench-checkpoint-every-steps"),
                                        checkpoint_every_minutes=config.getoption("--bench-checkpoint-every-minutes"),
                                        quiet=config.getoption("--bench-quiet"),
                                        micro_batch=parse_micro_batch(config.getoption("--bench-micro-batch")),
                                        sharding=config.getoption("--bench-sharding"))
    return config._bench_session


def pytest_collect_file(file_path: Path, parent):
    if file_path.suffix == ".yaml" and file_path.parent.resolve() in {d.resolve() for d in table_dirs()}:
        return CardFile.from_parent(parent, path=file_path)
    return None


class CardFile(pytest.File):
    def collect(self):
        cfg = self.config
        card = load_checked_card(self.path.stem)
        given = cfg.getoption("--bench-cells")
        if given:   # bench run expanded them (and checked their data): the same cells, not expanded twice
            cells = [c for c in read_cells(given) if c["table"] == card.table]
        else:       # pytest run on a card directly: the plugin is the only place that expands it
            cells = expand_cells(card, cfg.getoption("--bench-profile"), cfg.getoption("--bench-methods"),
                                 cfg.getoption("--bench-ratios"), cfg.getoption("--bench-seeds"),
                                 resolve_device(cfg.getoption("--bench-device")))
        cfg._bench_tables[card.table] = card_dict(card)
        for cell in cells:
            yield CellItem.from_parent(self, name=cell["cell_id"], cell=cell)


class CellFailed(Exception):
    pass


def _announce(item) -> None:
    """"[3/13] somp-2x-seed0" on the terminal when a cell starts computing (also while pytest captures output)."""
    tr = item.config.pluginmanager.get_plugin("terminalreporter")
    from bench import distributed as dist
    if tr is None or not dist.is_main():
        return
    items = item.session.items
    pos = next((i for i, it in enumerate(items, 1) if it is item), 0)
    capman = item.config.pluginmanager.get_plugin("capturemanager")
    ctx = capman.global_and_fixture_disabled() if capman is not None else contextlib.nullcontext()
    with ctx:
        wid = _worker_id(item.config)
        if wid is not None:   # an xdist worker: stdout does not reach the terminal, stderr does
            _worker_write(item.config, f"[{pos}/{len(items)}] {item.cell['cell_id']}\n")
        else:
            tr.write_line(f"[{pos}/{len(items)}] {item.cell['cell_id']}")


class CellItem(pytest.Item):
    def __init__(self, *, cell, **kw):
        super().__init__(**kw)
        self.cell = cell
        self.add_marker(cell["method"])

    def runtest(self):
        session = _session(self.config)
        # a finished record is reused; otherwise the cell's lock is taken (another worker, run or job computing
        # it is waited for, and its record reused) and the cell is run
        rec, reused = run_cell_once(self.cell, session, on_start=lambda: _announce(self),
                                    force=self.config.getoption("--bench-force"))
        if not reused:
            from bench import distributed as dist
            if dist.is_main():   # data parallel: rank 0 writes
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


def _records_for(card, paths, profile, with_stale: bool = False):
    """The records of the cells the card asks for now (`bench.runner.current_records`: same hash as the cell
    resolved from the current card and code, judged again against the current references), whatever seeds,
    ratios and device they were run with; with `with_stale`, (current, stale) where stale is [(record, why)]."""
    current, stale = current_records(load_checked_card(card["table"]), paths.output, profile)
    return (current, stale) if with_stale else current


def _write_outputs(config, table):
    card = config._bench_tables[table]
    paths = config._bench_paths
    recs = _records_for(card, paths, config.getoption("--bench-profile"))
    if recs:
        with contextlib.suppress(OSError):   # a full disk: the end of the run says so, once
            report.write_table_csv(card, recs, table_dir(paths.output, table))
    return recs


def _cards_from_args(config) -> dict:
    """The cards named on the command line (files or folders of cards), for the xdist controller: it collects
    nothing itself (its workers do), but builds the table once from the records they wrote."""
    dirs = {d.resolve() for d in table_dirs()}
    files = []
    for arg in config.args:
        p = Path(str(arg).split("::")[0])
        if not p.is_absolute():
            p = Path(config.invocation_params.dir) / p
        files += sorted(p.glob("*.yaml")) if p.is_dir() else [p]
    out = {}
    for f in files:
        if f.suffix == ".yaml" and f.parent.resolve() in dirs:
            card = load_checked_card(f.stem)
            out[card.table] = card_dict(card)
    return out


def summarize(card: dict, paths: Paths, profile: str, write_line, section=None) -> list:
    """Write the leaderboard CSV and the plot of `card` from its records and print the table (the end of a
    run: serial, xdist controller, or `bench run --launcher local`). Returns the records."""
    table = card["table"]
    recs, stale = _records_for(card, paths, profile, with_stale=True)
    if not recs:
        return recs
    folder = table_dir(paths.output, table)
    written = []
    png = folder / f"{table}-{profile}.png"
    # a full disk (or a folder made read-only during the run) must not lose the table: one line, then the table
    for what, write in (("leaderboard CSV", lambda: report.write_table_csv(card, recs, folder)),
                        ("plot", lambda: report.plot(card, recs, png))):
        try:
            written.append((what, write()))
        except OSError as e:
            written.append((what, None))
            write_line(f"{what} not written: {e.strerror or e} ({getattr(e, 'filename', None) or folder}); free "
                       f"space there (or pass another --output) and run the same command again: every cell is reused")
    (section or (lambda title: write_line(f"=== {title} ===")))(f"{card['title']} [{profile} profile]")
    write_line(report.render_table(card, recs, "terminal"))
    rel = report.format_relations(report.relation_checks(card, recs))
    if rel:
        write_line(rel)
    ret = report.retention_summary(card, recs)
    if ret:
        write_line(ret)
    if stale:
        write_line(f"{len(stale)} stale record{'s' if len(stale) > 1 else ''} (another card version, config or code "
                   f"version) not used: `python -m bench report --table {table} --profile {profile}` lists them")
    write_line(f"records: {folder / 'records'}")
    for what, path in written:
        if path is not None:
            write_line(f"{what}: {path}")
    return recs


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if config.option.collectonly or _worker_id(config) is not None:   # workers: the controller summarizes
        return
    from bench import distributed as dist
    if not dist.is_main():   # data parallel: rank 0 writes the CSV and the plot and prints the table
        return
    tables = config._bench_tables or (_cards_from_args(config) if _is_xdist_controller(config) else {})
    tr = terminalreporter
    for card in tables.values():
        summarize(card, config._bench_paths, config.getoption("--bench-profile"), tr.write_line, tr.section)
    tr.write_line(f"wall time: {time.perf_counter() - config._bench_t0:.1f} s")


def load_card_for_report(name):
    return load_card(name)


def pytest_unconfigure(config):
    if getattr(config, "_bench_dist_here", False):
        from bench import distributed as dist
        dist.cleanup()
