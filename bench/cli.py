"""`python -m bench ...`: ls, validate, run, report, flops, speed, compare. Unknown names exit with code 2
and a "did you mean" hint, never a traceback."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.errors import BenchError, UnknownName

COMMANDS = ("ls", "validate", "run", "report", "flops", "speed", "compare", "keys")
LS_KINDS = ("tables", "tasks", "methods", "models", "recipe")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = p.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")

    s = sub.add_parser("ls", help="list tables, tasks, methods, models, or the training recipe's keys")
    s.add_argument("kind", help="|".join(LS_KINDS))
    s.add_argument("pattern", nargs="?", help="only names matching this glob, e.g. 'upop*'")
    s.add_argument("--options", action="store_true", help="methods and tasks: print each one's option keys")

    s = sub.add_parser("validate", help="check a table card against the schema, without running anything")
    s.add_argument("--table", help="card name (default: every card)")
    s.add_argument("--options", action="store_true", help="also print the option keys of the card's methods and tasks")

    s = sub.add_parser("run", help="run the cells of a table and print the paper-style table")
    s.add_argument("--table", required=True)
    s.add_argument("--profile", default="micro",
                   help="micro (default: synthetic data, tiny models) | paper | a profile the card defines")
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

    s = sub.add_parser("keys", help="every card key with its meaning (Markdown, generated from the schema)")
    s.add_argument("--all", action="store_true", help="also every method's and task's own keys")
    s.add_argument("--write", action="store_true", help="rewrite the generated lists in README.md and docs/card_keys.md")

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


def _print_block(title: str, model, indent: str = "  ") -> None:
    from bench.options import field_docs
    rows = field_docs(model)
    if not rows:
        print(f"{indent}{title}: (no keys)")
        return
    print(f"{indent}{title}:")
    for name, typ, default, doc in rows:
        print(f"{indent}  {name:20s} {typ:28s} default {default:14s} {doc}")


def cmd_ls(args):
    import fnmatch

    from bench.cards import load_card, table_names
    from bench.recipe import TrainRecipe
    from bench.registry import METHODS, MODELS, TASKS

    if args.kind not in LS_KINDS:
        raise UnknownName("list", args.kind, LS_KINDS)
    keep = (lambda n: fnmatch.fnmatch(n, args.pattern)) if args.pattern else (lambda n: True)
    if args.kind == "tables":
        for n in filter(keep, table_names()):
            c = load_card(n)
            print(f"{n:28s} {c.get('title', '')}")
    elif args.kind == "tasks":
        for n in filter(keep, TASKS.names()):
            t = TASKS.get(n)
            print(f"{n:28s} metrics: {', '.join(t.metrics)}"
                  + (f"; recipe keys: {', '.join(sorted(t.RECIPE_KEYS))}" if t.RECIPE_KEYS else ""))
            if args.options:
                _print_block("data (profiles.<p>.data)", t.Data)
    elif args.kind == "methods":
        for n in filter(keep, METHODS.names()):
            m = METHODS.get(n)
            print(f"{n:28s} [{m.impl}] {m.description}")
            if args.options:
                _print_block(f"options (method_options.{n})", m.Options)
                _print_block(f"settings (profiles.<p>.{m.settings_key or n})", m.Settings)
    elif args.kind == "recipe":
        _print_block("training recipe (profiles.<p>.dense and profiles.<p>.finetune)", TrainRecipe, indent="")
    else:
        for n in filter(keep, MODELS.names()):
            cls, cfg = MODELS.get(n)
            print(f"{n:28s} family {cls.family}; unit kinds {', '.join(cls.UNIT_KINDS)}"
                  + (f"; recipe keys: {', '.join(sorted(cls.RECIPE_KEYS))}" if cls.RECIPE_KEYS else ""))


def cmd_validate(args):
    from bench.cards import load_card, parse_card, table_names, validate_card
    from bench.registry import METHODS, TASKS

    names = [args.table] if args.table else table_names()
    bad = 0
    for n in names:
        errs = validate_card(load_card(n))
        if errs:
            bad += 1
            print(f"{n}: INVALID ({len(errs)} problem{'s' if len(errs) > 1 else ''})")
            for e in errs:
                print(f"  - {e}")
            continue
        print(f"{n}: ok")
        if args.options:   # the blocks this card uses, with every default written out
            card = parse_card(load_card(n))
            for m in card.methods:
                _print_block(f"method_options.{m}", METHODS.get(m).Options)
            for t in card.task_names():
                _print_block(f"data ({t})", TASKS.get(t).Data)
    return 1 if bad else 0


def cmd_run(args):
    import pytest

    from bench import pytest_plugin
    from bench.cards import card_path
    from bench.config import Paths
    from bench.runner import Session, expand_cells, load_checked_card, resolve_device

    card = load_checked_card(args.table)
    prof = card.profile(args.profile)
    source = prof.source(args.profile)
    if args.data_root and source == "synthetic":
        raise BenchError(f"--data-root: profile {args.profile!r} reads no data (data_source: synthetic: its task "
                         f"generates a synthetic data set); use a profile with data_source: folder "
                         f"(e.g. --profile paper), or drop --data-root")
    # fail fast on bad names, missing or corrupt data and checkpoints before pytest starts (nothing is written)
    cells = expand_cells(card, args.profile, args.methods, args.ratios, args.seeds, resolve_device(args.device))
    session = Session(Paths.resolve(args.data_root, args.checkpoints, args.cache, args.output))
    seen = set()
    for cell in cells:
        key = (cell["task"], cell.get("checkpoint"), cell["model"], bool(cell.get("dense_training")))
        if key not in seen:
            seen.add(key)
            session.preflight(cell)
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
    return int(pytest.main(pargs, plugins=[pytest_plugin]))


def cmd_report(args):
    from bench import report
    from bench.cards import card_dict, load_checked_card
    from bench.config import Paths
    from bench.pytest_plugin import _records_for

    if args.format not in ("md", "csv", "latex", "terminal"):
        raise UnknownName("format", args.format, ["md", "csv", "latex", "terminal"])
    card = card_dict(load_checked_card(args.table))
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
        try:
            res = measure.arch_flops(args.model)
        except BenchError as e:
            raise BenchError(f"{e} ({', '.join(_cards_using(args.model)) or 'no shipped card uses it'})") from None
        print(f"{args.model}: params {res['params'] / 1e6:.2f} M ({res['params']:,}), "
              f"FLOPs {res['macs'] / 1e9:.2f} G ({res['macs']:,} MACs, fvcore convention: 1 multiply-add = 1, "
              f"attention matmuls and norms included) at input {res['input_spec']}, counted on the meta device")
        return
    from bench.config import Paths
    from bench.registry import MODELS, TASKS

    card = load_checked_card(args.table)
    prof = card.profile(args.profile)
    paths = Paths.resolve()
    print(f"table {args.table}, {args.profile} profile, FLOPs protocol: {' '.join(card.protocol.flops.input.split())}")
    print("counted on the meta device; fvcore convention: 1 multiply-add = 1 FLOP, attention matmuls and norms included")
    seen = set()
    for part in card_parts(card, args.profile):
        key = (part["task"], part["arch"])
        if key in seen:
            continue
        seen.add(key)
        config = {**MODELS.get(part["arch"])[1], **(getattr(TASKS.get(part["task"]), "model_config_overrides", None) or {}),
                  **prof.config_overrides}
        # the task object is only asked for its dummy inputs: nothing is read or generated
        source = "micro" if prof.source(args.profile) == "synthetic" else "paper"
        task = TASKS.get(part["task"])(prof.data, paths.data_root, source, paths.cache)
        res = measure.protocol_flops(part["arch"], config, lambda dev: task.flops_forwards(config, dev))
        name = f"{part['part']}: " if part["part"] else ""
        print(f"{name}{part['arch']}: params {res['params'] / 1e6:.2f} M ({res['params']:,})")
        for label, r in res["protocols"].items():
            print(f"  FLOPs {r['macs'] / 1e9:.2f} G ({r['macs']:,} MACs) [{label}] at input {r['input_spec']}")


def _cards_using(arch: str) -> list:
    from bench.cards import load_card, table_names
    out = []
    for n in table_names():
        profs = (load_card(n).get("profiles") or {}).values()
        if any(isinstance(p, dict) and (p.get("model") == arch or arch in (p.get("models") or {}).values()) for p in profs):
            out.append(n)
    return out


def cmd_speed(args):
    from bench.speed import speed_benchmark
    speed_benchmark(args.model, args.ratio, args.kinds.split(","), args.device, args.batch_size, args.iters, args.trials)


def cmd_keys(args):
    from bench import keys_doc
    if args.write:
        for rel in keys_doc.write_all() or ["(all up to date)"]:
            print(rel)
        return 0
    print(keys_doc.card_keys_markdown(args.all), end="")
    return 0


def cmd_compare(args):
    from bench.cards import card_dict, load_checked_card
    from bench.compare import compare_csv, format_diffs

    for p in (args.old, args.new):
        if not Path(p).is_file():
            raise BenchError(f"{p}: no such file")
    diffs, regression = compare_csv(args.old, args.new, lambda n: card_dict(load_checked_card(n)))
    print(format_diffs(diffs))
    print("REGRESSION" if regression else "no regression")
    return 1 if regression else 0
