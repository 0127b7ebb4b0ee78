"""`python -m bench ...`: ls, validate, run, report, flops, speed, compare. Unknown names exit with code 2
and a "did you mean" hint, never a traceback."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.errors import BenchError, UnknownName

COMMANDS = ("ls", "validate", "run", "report", "flops", "speed", "compare")
LS_KINDS = ("tables", "tasks", "methods", "models")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = p.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")

    s = sub.add_parser("ls", help="list tables, tasks, methods or models")
    s.add_argument("kind", help="|".join(LS_KINDS))

    s = sub.add_parser("validate", help="check a table card is complete, without running anything")
    s.add_argument("--table", help="card name (default: every card)")

    s = sub.add_parser("run", help="run the cells of a table and print the paper-style table")
    s.add_argument("--table", required=True)
    s.add_argument("--profile", default="micro", help="micro (default: synthetic data, tiny models) | paper")
    s.add_argument("--methods", help="comma-separated, default: the card's")
    s.add_argument("--ratios", help="comma-separated ratio labels, default: the card's (1x = dense)")
    s.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    s.add_argument("--device", default="auto", help="cpu | cuda (default: cuda when present)")
    s.add_argument("--output", help="where records, CSVs and plots go (default $BENCH_OUTPUT or the cache)")
    s.add_argument("--data-root", help="data sets in their public layouts (default $BENCH_DATA or ./data)")
    s.add_argument("--checkpoints", help="official weights (default $BENCH_CHECKPOINTS or ./checkpoints)")
    s.add_argument("--cache", help="micro data and dense models (default $BENCH_CACHE)")
    s.add_argument("-k", dest="keyword", help="pytest -k expression selecting cells, e.g. 'sgmp and 2.00x'")
    s.add_argument("-s", "--show-log", action="store_true", help="print training logs as they happen")

    s = sub.add_parser("report", help="print a table from stored records, without running")
    s.add_argument("--table", required=True)
    s.add_argument("--format", default="md", help="md | csv | latex | terminal")
    s.add_argument("--profile", default="micro")
    s.add_argument("--output", help="the folder the run wrote to (default $BENCH_OUTPUT or the cache)")
    s.add_argument("--retention", action="store_true", help="also print per-layer kept fractions of every cell")

    s = sub.add_parser("flops", help="params and FLOPs of a paper-size architecture, built on the meta device")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--model", help="architecture name (see `ls models`)")
    g.add_argument("--table", help="the card's model of --profile")
    s.add_argument("--profile", default="paper")

    s = sub.add_parser("speed", help="benchmark: measured throughput, dense vs pruned extraction, next to the FLOPs ratio")
    s.add_argument("--model", default="deit_small_patch16_224")
    s.add_argument("--ratio", type=float, default=0.5, help="p, fraction of prunable params removed")
    s.add_argument("--kinds", default="head_dim,ffn", help="unit kinds removed (one-shot magnitude, per kind)")
    s.add_argument("--device", default="auto")
    s.add_argument("--batch-size", type=int, default=None, help="default 256 on CUDA, 64 on CPU")
    s.add_argument("--iters", type=int, default=None)
    s.add_argument("--trials", type=int, default=3)

    s = sub.add_parser("compare", help="per-cell differences of two leaderboard CSVs; exit 1 on a regression")
    s.add_argument("old")
    s.add_argument("new")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-") and argv[0] not in COMMANDS:
        print(f"error: {UnknownName('command', argv[0], COMMANDS)}", file=sys.stderr)
        return 2
    args = _parser().parse_args(argv)
    if not args.command:
        _parser().print_help()
        return 2
    try:
        return globals()[f"cmd_{args.command}"](args) or 0
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def cmd_ls(args):
    from bench.cards import load_card, table_names
    from bench.registry import METHODS, MODELS, TASKS

    if args.kind not in LS_KINDS:
        raise UnknownName("list", args.kind, LS_KINDS)
    if args.kind == "tables":
        for n in table_names():
            c = load_card(n)
            print(f"{n:28s} {c.get('title', '')}")
    elif args.kind == "tasks":
        for n in TASKS.names():
            t = TASKS.get(n)
            print(f"{n:28s} metrics: {', '.join(t.metrics)}")
    elif args.kind == "methods":
        for n in METHODS.names():
            m = METHODS.get(n)
            print(f"{n:28s} [{m.impl}] {m.description}")
    else:
        for n in MODELS.names():
            cls, cfg = MODELS.get(n)
            print(f"{n:28s} family {cls.family}; unit kinds {', '.join(cls.UNIT_KINDS)}")


def cmd_validate(args):
    from bench.cards import load_card, table_names, validate_card

    names = [args.table] if args.table else table_names()
    bad = 0
    for n in names:
        errs = validate_card(load_card(n))
        if errs:
            bad += 1
            print(f"{n}: INCOMPLETE")
            for e in errs:
                print(f"  - {e}")
        else:
            print(f"{n}: ok")
    return 1 if bad else 0


def cmd_run(args):
    import pytest

    from bench import pytest_plugin
    from bench.cards import card_path, load_card
    from bench.runner import expand_cells, load_checked_card, resolve_device

    card = load_checked_card(args.table)
    # fail fast on bad names, missing data or checkpoints before pytest starts (nothing is written)
    cells = expand_cells(card, args.profile, args.methods, args.ratios, args.seeds, resolve_device(args.device))
    if args.profile == "paper":
        from bench.config import Paths
        from bench.runner import Session
        session = Session(Paths.resolve(args.data_root, args.checkpoints, args.cache, args.output))
        session.task(cells[0])
        session.check_checkpoint(cells[0])
    pargs = [str(card_path(args.table)), "-p", "no:cacheprovider", "--noconftest", "-v", "--tb=short",
             "--rootdir", str(Path(card_path(args.table)).parent), "-o", "console_output_style=classic",
             "-W", "ignore::pytest.PytestAssertRewriteWarning",
             "--bench-profile", args.profile, "--bench-seeds", args.seeds, "--bench-device", args.device]
    for opt, val in (("--bench-methods", args.methods), ("--bench-ratios", args.ratios),
                     ("--bench-output", args.output), ("--bench-data-root", args.data_root),
                     ("--bench-checkpoints", args.checkpoints), ("--bench-cache", args.cache), ("-k", args.keyword)):
        if val:
            pargs += [opt, val]
    if args.show_log:
        pargs.append("-s")
    del load_card
    return int(pytest.main(pargs, plugins=[pytest_plugin]))


def cmd_report(args):
    from bench import report
    from bench.cards import load_card
    from bench.config import Paths
    from bench.pytest_plugin import _records_for

    if args.format not in ("md", "csv", "latex", "terminal"):
        raise UnknownName("format", args.format, ["md", "csv", "latex", "terminal"])
    card = load_card(args.table)
    paths = Paths.resolve(output=args.output)
    recs = _records_for(card, paths, args.profile)
    if not recs:
        raise BenchError(f"no records of table {args.table} ({args.profile} profile) under {paths.output}. "
                         f"Run `python -m bench run --table {args.table}` first, or pass --output DIR.")
    print(report.render_table(card, recs, args.format))
    rel = report.format_relations(report.relation_checks(card, recs))
    if rel and args.format in ("md", "terminal"):
        print(rel)
    if args.retention:
        for r in sorted(recs, key=lambda r: (r["method"], r["ratio_p"], r["seed"])):
            if r.get("retention"):
                print(f"\n{r['method']} {r['ratio_label']} seed {r['seed']}:")
                print(report.retention_table(r))
                png = paths.output / r["table"] / "cells" / r["hash"] / "retention.png"
                if png.is_file():
                    print(f"heat-map: {png}")


def cmd_flops(args):
    from bench import measure
    from bench.runner import card_parts, load_checked_card

    if not args.table:
        from bench.registry import MODELS
        MODELS.get(args.model)
        res = measure.arch_flops(args.model)
        print(f"{args.model}: params {res['params'] / 1e6:.2f} M ({res['params']:,}), "
              f"FLOPs {res['macs'] / 1e9:.2f} G ({res['macs']:,} MACs, fvcore convention: 1 multiply-add = 1, "
              f"attention matmuls and norms included) at input {res['input_spec']}, counted on the meta device")
        return
    from bench.config import Paths
    from bench.registry import MODELS, TASKS

    card = load_checked_card(args.table)
    if args.profile not in card["profiles"]:
        raise UnknownName("profile", args.profile, list(card["profiles"]))
    prof = card["profiles"][args.profile]
    paths = Paths.resolve()
    print(f"table {args.table}, {args.profile} profile, FLOPs protocol: {' '.join(str(card['protocol']['flops']['input']).split())}")
    print("counted on the meta device; fvcore convention: 1 multiply-add = 1 FLOP, attention matmuls and norms included")
    seen = set()
    for part in card_parts(card, args.profile):
        key = (part["task"], part["arch"])
        if key in seen:
            continue
        seen.add(key)
        config = {**MODELS.get(part["arch"])[1], **(getattr(TASKS.get(part["task"]), "model_config_overrides", None) or {}),
                  **(prof.get("model_config") or {})}
        # the task object is only asked for its dummy inputs: nothing is read or generated
        task = TASKS.get(part["task"])(prof.get("data") or {}, paths.data_root, args.profile, paths.cache)
        res = measure.protocol_flops(part["arch"], config, lambda dev: task.flops_forwards(config, dev))
        name = f"{part['part']}: " if part["part"] else ""
        print(f"{name}{part['arch']}: params {res['params'] / 1e6:.2f} M ({res['params']:,})")
        for label, r in res["protocols"].items():
            print(f"  FLOPs {r['macs'] / 1e9:.2f} G ({r['macs']:,} MACs) [{label}] at input {r['input_spec']}")


def cmd_speed(args):
    from bench.speed import speed_benchmark
    speed_benchmark(args.model, args.ratio, args.kinds.split(","), args.device, args.batch_size, args.iters, args.trials)


def cmd_compare(args):
    from bench.cards import load_card
    from bench.compare import compare_csv, format_diffs

    for p in (args.old, args.new):
        if not Path(p).is_file():
            raise BenchError(f"{p}: no such file")
    diffs, regression = compare_csv(args.old, args.new, load_card)
    print(format_diffs(diffs))
    print("REGRESSION" if regression else "no regression")
    return 1 if regression else 0
