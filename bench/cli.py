"""`python -m bench ...`: ls, validate, run, status, report, flops, speed, compare. Unknown names exit with code 2
and a "did you mean" hint, never a traceback."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.errors import BenchError, UnknownName

COMMANDS = ("ls", "validate", "run", "status", "report", "flops", "plan", "speed", "compare", "keys", "publish")
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
    s.add_argument("--checkpoint-every-steps", type=int, default=0, metavar="N",
                   help="write a training-state checkpoint every N optimizer steps of each training phase, so a "
                        "killed cell resumes inside it (default 0: off; not part of any config hash)")
    s.add_argument("--checkpoint-every-minutes", type=float, default=0.0, metavar="M",
                   help="the same every M minutes (default 0: off); both may be given")
    s.add_argument("--quiet", action="store_true", help="no progress lines while a training phase runs")
    s.add_argument("--micro-batch", default=None, metavar="N|auto",
                   help="samples per forward/backward in every training phase (overrides the cards' "
                        "micro_batch_size; auto: the largest that fits the GPU); the effective batch, steps and "
                        "schedule stay the card's (not part of any config hash; recorded per phase)")
    s.add_argument("--sharding", choices=("none", "fsdp"), default=None,
                   help="fsdp: every training phase under torchrun trains a fully-sharded copy of the model (torch "
                        "FSDP2: parameters, gradients and optimizer states split over the ranks; README \"Several "
                        "GPUs\"), overriding the cards' sharding key; ignored in one process (recorded per phase)")
    s.add_argument("--force", action="store_true",
                   help="run the selected cells again even where a finished record exists (it is replaced)")
    g = s.add_argument_group("many cells: workers and launchers (README: \"Many cells\")")
    g.add_argument("--workers", type=int, default=None, metavar="N",
                   help="run the cells in N pytest-xdist worker processes, one GPU each when CUDA is there, else "
                        "the CPU cores split between them (default 1); with --launcher local: jobs computing at "
                        "once; with --launcher slurm: array jobs running at once (default: no limit)")
    g.add_argument("--launcher", choices=("local", "slurm"), default=None,
                   help="one submitit job per cell: slurm (a job array on a Slurm cluster, requeued on pre-emption "
                        "or time-out) or local (the same jobs on this machine). Default: cells run here, by pytest")
    g.add_argument("--gpus-per-cell", type=int, default=1, metavar="G",
                   help="GPUs of each cell's job (default 1; 0: CPU jobs); G > 1: the cell data-parallel on its G GPUs, torchrun in the job")
    g.add_argument("--partition", help="slurm: partition (sbatch --partition)")
    g.add_argument("--time", dest="time_limit", metavar="HH:MM",
                   help="launchers: time limit of each job (HH:MM, D-HH:MM or minutes; slurm default 24:00); "
                        "the job is requeued when it is reached and resumes from its training-state checkpoint")
    g.add_argument("--account", help="slurm: account to charge (sbatch --account)")
    g.add_argument("--qos", help="slurm: quality of service (sbatch --qos)")
    g.add_argument("--mem", type=float, metavar="GB", help="slurm: memory per job in GB")
    g.add_argument("--cpus-per-gpu", type=int, metavar="C", help="slurm: CPU cores per GPU (cpus-per-task = C x G)")
    g.add_argument("--slurm-arg", action="append", metavar="KEY=VALUE",
                   help="slurm: any other sbatch option, e.g. --slurm-arg constraint=a100 (repeatable)")
    g.add_argument("--max-timeouts", type=int, default=10, metavar="N",
                   help="launchers: requeues after reaching the time limit before giving up (default 10)")
    g.add_argument("--wait", action=argparse.BooleanOptionalAction, default=None,
                   help="launchers: wait for the jobs, then print the table (default: local waits, slurm does not)")

    s = sub.add_parser("status", help="every cell of a table: done / running / queued / failed / not started, "
                                      "with its job id")
    s.add_argument("--table", required=True)
    s.add_argument("--profile", default="micro")
    s.add_argument("--output", help="the folder the run writes to (default $BENCH_OUTPUT or the cache)")
    s.add_argument("--methods", help="comma-separated, default: the card's")
    s.add_argument("--ratios", help="comma-separated ratio labels, default: the card's")
    s.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    s.add_argument("--device", default="auto",
                   help="cpu | cuda: the cells' device (default: the one of the table's records and jobs)")
    s.add_argument("--json", action="store_true", help="one JSON object per cell instead of the table")

    s = sub.add_parser("report", help="print a table from stored records, without running")
    s.add_argument("--table", required=True)
    s.add_argument("--format", default="md", help="md | csv | latex | terminal")
    s.add_argument("--profile", default="micro")
    s.add_argument("--output", help="the folder the run wrote to (default $BENCH_OUTPUT or the cache)")
    s.add_argument("--retention", action="store_true", help="also print per-layer kept fractions of every cell")
    s.add_argument("--against", metavar="METHOD",
                   help="add, for every cell, its difference to METHOD at the same ratio with a 95%% confidence "
                        "interval over the seeds (Welch), so that differences within the seed noise show as such")

    s = sub.add_parser("flops", help="params and FLOPs of a paper-size architecture, built on the meta device")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--model", help="architecture name (see `ls models`)")
    g.add_argument("--table", help="the card's model of --profile")
    s.add_argument("--profile", default="paper")
    s.add_argument("--check", action="store_true",
                   help="with --table: exit 1 when a count differs from the card's reference params_m / gflops "
                        "beyond its tolerance (the references of that profile)")

    s = sub.add_parser("plan", help="per cell: optimizer steps, training MACs, GPU-hours, peak memory and micro-batch, "
                                    "counted on the meta device (nothing runs)")
    s.add_argument("--table", required=True)
    s.add_argument("--profile", default="paper")
    s.add_argument("--methods", help="comma-separated, default: the card's")
    s.add_argument("--ratios", help="comma-separated ratio labels, default: the card's")
    s.add_argument("--gpus", default="1", help="data-parallel GPUs (default 1)")
    s.add_argument("--gpu-memory", default="80", help="GiB per GPU (default 80: an 80GB A100)")
    s.add_argument("--utilization", default="0.4", help="fraction of the peak the training reaches (default 0.4)")
    s.add_argument("--gpu-tflops", default="312", help="peak dense bf16 TFLOPS per GPU (default 312: A100)")
    s.add_argument("--train-size", help="training samples per epoch, instead of the task's public size")
    s.add_argument("--phases", action="store_true", help="also one line per training phase with its details")

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

    s = sub.add_parser("compare", help="per-cell differences of two leaderboard CSVs, noise told from change; exit 0 "
                                       "no regression, 1 a regression, 2 bad input")
    s.add_argument("old")
    s.add_argument("new")
    s.add_argument("--k", type=float, default=3.0,
                   help="a metric regresses when it moves the bad way by more than max(card tolerance, K x seed std) "
                        "(default 3)")
    s.add_argument("--arch-tolerance", default="0",
                   help="params_m / gmacs: allowed change, a number (M, G) or 'N%%' (default 0: exact)")
    s.add_argument("--speedup-tolerance", default="30%",
                   help="allowed relative drop of the paired measured speedup (default 30%%, for shared runners)")
    s.add_argument("--absolute-speed", action="store_true",
                   help="also compare absolute throughput (same device, precision and batch size only)")
    s.add_argument("--throughput-tolerance", default="10%",
                   help="with --absolute-speed: allowed relative throughput drop (default 10%%)")

    s = sub.add_parser("publish", help="a static leaderboard site (index + one page per table: table, plot, "
                                       "provenance, CSV) from an output folder's records")
    s.add_argument("--output", help="the folder `bench run` wrote to (default $BENCH_OUTPUT or the cache)")
    s.add_argument("--site", required=True, help="folder of the site (replaced as a whole; must be new, empty or "
                                                 "an earlier `bench publish` site)")
    s.add_argument("--results", help="also write each table's leaderboard CSV and plot here, with PROVENANCE.json")
    s.add_argument("--tables", help="comma-separated tables (default: every table with records under --output)")
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
        if args.command == "run":   # under torchrun: every rank runs the cells together (bench.distributed)
            from bench.distributed import run_command
            return run_command(cmd_run, args) or 0
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

    import time as _time
    run_start = _time.time()
    from bench.recipe import parse_micro_batch
    args.micro_batch = parse_micro_batch(args.micro_batch)
    card = load_checked_card(args.table)
    prof = card.profile(args.profile)
    source = prof.source(args.profile)
    # the output (and the cache) can be written and have free space: checked before anything is computed
    from bench.config import Paths as _Paths
    from bench.outputs import check_writable, clean_temp_files
    from bench.records import table_dir
    early = _Paths.resolve(args.data_root, args.checkpoints, args.cache, args.output)
    check_writable(table_dir(early.output, card.table), "output folder", "--output DIR (or $BENCH_OUTPUT)")
    check_writable(early.cache, "cache folder", "--cache DIR (or $BENCH_CACHE)")
    # temp files a killed writer left (its pid is dead, or it is old): removed; a live concurrent run's are kept
    clean_temp_files([table_dir(early.output, card.table), early.cache / "dense"], run_start)
    if args.data_root and source == "synthetic":
        raise BenchError(f"--data-root: profile {args.profile!r} reads no data (data_source: synthetic: its task "
                         f"generates a synthetic data set); use a profile with data_source: folder "
                         f"(e.g. --profile paper), or drop --data-root")
    _check_many_cells_flags(args)
    # a Slurm job's cells run on its GPU(s), whatever the machine that submits them has
    if args.launcher and args.device == "auto" and args.gpus_per_cell == 0:
        device = "cpu"
    elif args.launcher == "slurm" and args.device in ("auto", "cuda"):
        device = "cuda"
    else:
        device = resolve_device(args.device)
    # fail fast on bad names, missing or corrupt data and checkpoints before pytest starts (nothing is written)
    cells = expand_cells(card, args.profile, args.methods, args.ratios, args.seeds, device)
    session = Session(Paths.resolve(args.data_root, args.checkpoints, args.cache, args.output))
    seen = set()
    for cell in cells:
        key = (cell["task"], cell.get("checkpoint"), cell["model"], bool(cell.get("dense_training")))
        if key not in seen:
            seen.add(key)
            session.preflight(cell)
    if args.checkpoint_every_steps < 0 or args.checkpoint_every_minutes < 0:
        raise BenchError("--checkpoint-every-steps / --checkpoint-every-minutes: give a number >= 0 (0: off)")
    if args.launcher:
        return _run_jobs(args, card, cells, session.paths)
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
    if args.checkpoint_every_steps:
        pargs += ["--bench-checkpoint-every-steps", str(args.checkpoint_every_steps)]
    if args.checkpoint_every_minutes:
        pargs += ["--bench-checkpoint-every-minutes", str(args.checkpoint_every_minutes)]
    if args.quiet:
        pargs.append("--bench-quiet")
    if args.micro_batch is not None:
        pargs += ["--bench-micro-batch", str(args.micro_batch)]
    if args.sharding is not None:
        pargs += ["--bench-sharding", args.sharding]
    if args.force:
        pargs.append("--bench-force")
    from bench.workers import default_workers
    workers = args.workers or default_workers(cells, device)
    if workers > 1:   # pytest-xdist; the workers load the plugin by name (-p), this process gets it as an object
        import os
        pargs += ["-n", str(workers), "--dist", "load", "-p", "bench.pytest_plugin"]
        if os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD"):
            pargs += ["-p", "xdist.plugin"]
    # the cells expanded and checked above are the ones pytest runs: the plugin does not expand the card again
    from bench.runner import write_cells
    cells_file = write_cells(cells, table_dir(early.output, card.table))
    try:
        return int(pytest.main(pargs + ["--bench-cells", str(cells_file)], plugins=[pytest_plugin]))
    finally:
        cells_file.unlink(missing_ok=True)


SLURM_ONLY = ("partition", "account", "qos", "mem", "cpus_per_gpu", "slurm_arg")


def _check_many_cells_flags(args) -> None:
    flag = lambda k: "--" + {"time_limit": "time"}.get(k, k).replace("_", "-")   # noqa: E731
    if args.workers is not None and args.workers < 1:
        raise BenchError(f"--workers {args.workers}: give a number of worker processes >= 1")
    if args.gpus_per_cell < 0:
        raise BenchError(f"--gpus-per-cell {args.gpus_per_cell}: give a number of GPUs >= 0")
    if args.launcher != "slurm":
        given = [flag(k) for k in SLURM_ONLY if getattr(args, k) is not None]
        if given:
            raise BenchError(f"{', '.join(given)}: only with --launcher slurm")
    if not args.launcher:
        if args.wait is not None or args.time_limit is not None:
            raise BenchError(f"{'--time' if args.time_limit is not None else '--wait / --no-wait'}: only with "
                             f"--launcher local or slurm")
        if args.gpus_per_cell != 1:
            raise BenchError("--gpus-per-cell: only with --launcher local or slurm (workers get one GPU each)")
    else:
        from bench.launch import parse_slurm_args, parse_time, require_distributed
        parse_slurm_args(args.slurm_arg)
        if args.time_limit is not None:
            parse_time(args.time_limit)
        require_distributed(args.gpus_per_cell)   # G > 1 needs bench.distributed: refused before anything is submitted
    if (args.workers or 1) > 1 and not args.launcher:
        import importlib.util
        if importlib.util.find_spec("xdist") is None:
            raise BenchError("--workers needs pytest-xdist: pip install pytest-xdist")


def _run_jobs(args, card, cells, paths) -> int:
    """`bench run --launcher local|slurm`: one submitit job per cell; local waits and prints the table."""
    import time

    from bench import launch
    from bench.cards import card_dict
    from bench.pytest_plugin import summarize
    from bench.runner import reuse_record

    t0 = time.perf_counter()
    cells = launch.keyword_filter(cells, args.keyword)
    if not cells:
        raise BenchError(f"-k {args.keyword!r} selects no cell of {args.table}")
    if args.force:   # the jobs run the cells again: the selected cells' records go first
        from bench.records import record_path
        for c in cells:
            record_path(paths.output, c["table"], c["hash"]).unlink(missing_ok=True)
    opts = launch.LaunchOptions(
        launcher=args.launcher, gpus_per_cell=args.gpus_per_cell, partition=args.partition,
        time_min=launch.parse_time(args.time_limit) if args.time_limit else None, account=args.account,
        qos=args.qos, mem_gb=args.mem, cpus_per_gpu=args.cpus_per_gpu, max_parallel=args.workers,
        max_timeouts=args.max_timeouts, slurm_args=launch.parse_slurm_args(args.slurm_arg))
    train_options = {"checkpoint_every_steps": args.checkpoint_every_steps,
                     "checkpoint_every_minutes": args.checkpoint_every_minutes, "quiet": args.quiet,
                     "micro_batch": args.micro_batch, "sharding": args.sharding}
    if args.launcher == "slurm" and not (args.checkpoint_every_steps or args.checkpoint_every_minutes):
        train_options["checkpoint_every_minutes"] = 10.0   # a pre-empted job loses at most ~10 minutes
        print("training-state checkpoints every 10 minutes (a requeued job resumes from the last one); "
              "--checkpoint-every-minutes M to change")
    submitted = launch.submit(cells, paths, opts, train_options)
    wait = args.wait if args.wait is not None else args.launcher == "local"
    if not wait:
        if submitted:
            print(f"follow them with: python -m bench status --table {args.table} --profile {args.profile}"
                  + (f" --output {args.output}" if args.output else "")
                  + f"; the table when they are done: python -m bench report --table {args.table} "
                    f"--profile {args.profile}" + (f" --output {args.output}" if args.output else ""))
        return 0
    launch.wait(submitted)
    recs = summarize(card_dict(card), paths, args.profile, print)
    print(f"wall time: {time.perf_counter() - t0:.1f} s")
    done = [reuse_record(paths.output, c) for c in cells]
    return 0 if recs and all(r is not None and r["status"] in ("pass", "no_ref") for r in done) else 1


def cmd_status(args):
    from bench.config import Paths
    from bench.launch import read_jobs
    from bench.records import load_records
    from bench.runner import expand_cells, load_checked_card, resolve_device
    from bench.status import cell_states, format_rows

    card = load_checked_card(args.table)
    card.profile(args.profile)
    paths = Paths.resolve(output=args.output)
    device = args.device
    if device == "auto":   # the device the table's cells were run or submitted with (it is part of their hash)
        seen = {e.get("device") for e in read_jobs(paths.output, card.table).values() if e.get("profile") == args.profile}
        seen |= {(r.get("config") or {}).get("device") for r in load_records(paths.output, card.table, args.profile)}
        seen.discard(None)
        device = seen.pop() if len(seen) == 1 else resolve_device("auto")
    elif device not in ("cpu", "cuda"):
        raise UnknownName("device", device, ["cpu", "cuda"])
    cells = expand_cells(card, args.profile, args.methods, args.ratios, args.seeds, device)
    rows = cell_states(cells, paths.output)
    if args.json:
        import json
        for r in rows:
            print(json.dumps(r))
    else:
        print(format_rows(rows, f"table {card.table}, {args.profile} profile ({device}), {paths.output / card.table}"))
    return 0


def cmd_report(args):
    from bench import report
    from bench.cards import card_dict, load_checked_card
    from bench.config import Paths
    from bench.pytest_plugin import _records_for

    if args.format not in ("md", "csv", "latex", "terminal"):
        raise UnknownName("format", args.format, ["md", "csv", "latex", "terminal"])
    from bench.runner import format_stale

    parsed = load_checked_card(args.table)
    card = card_dict(parsed)
    if args.against and args.against not in parsed.methods:
        raise UnknownName("method", args.against, parsed.methods)
    paths = Paths.resolve(output=args.output)
    recs, stale = _records_for(card, paths, args.profile, with_stale=True)
    if not recs:
        hint = (f" {len(stale)} stale record{'s' if len(stale) > 1 else ''} (another card version, config or code "
                f"version) {'are' if len(stale) > 1 else 'is'} there: `python -m bench run --table {args.table} "
                f"--profile {args.profile}` computes the current cells." if stale else "")
        raise BenchError(f"no records of table {args.table} ({args.profile} profile) under {paths.output}."
                         f"{hint} Run `python -m bench run --table {args.table}` first, or pass --output DIR.")
    print(report.render_table(card, recs, args.format))
    if args.against:
        print(report.render_against(card, recs, args.against, "md" if args.format == "md" else "terminal"))
    if stale and args.format in ("md", "terminal"):
        print(format_stale(stale), end="")
    rel = report.format_relations(report.relation_checks(card, recs))
    if rel and args.format in ("md", "terminal"):
        print(rel)
    if args.retention:
        for r in sorted(recs, key=lambda r: (r["method"], r["ratio_p"], r["seed"])):
            if r.get("retention") and r["method"] != "dense":   # the dense model keeps every unit
                print(f"\n{r['method']} {r['ratio_label']} seed {r['seed']}:")
                print(report.retention_table(r))
                png = paths.output / r["table"] / "cells" / r["hash"] / "retention.png"
                if png.is_file():
                    print(f"heat-map: {png}")


def cmd_flops(args):
    from bench import measure
    from bench.runner import card_parts, load_checked_card

    if args.check and not args.table:
        raise BenchError("--check: give --table (the card holds the reference counts)")
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
    checks = []
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
        if args.check:
            checks += _flops_checks(card, args.profile, part["part"], res)
    if args.check:
        bad = [c for c in checks if not c[3]]
        for what, got, paper, ok, tol in checks:
            print(f"check {what}: {got:.4g} vs reference {paper:g} (tolerance {tol}): {'ok' if ok else 'DIFFERS'}")
        if not checks:
            print(f"check: the card's references have no dense params_m / gflops for the {args.profile} profile: "
                  f"nothing to check")
        print(f"{len(checks)} counts checked, {len(bad)} differ" + (" -> FAIL" if bad else " -> OK"))
        return 1 if bad else 0


def _flops_checks(card, profile: str, part, res: dict) -> list:
    """(what, counted, reference, ok, tolerance) for the dense reference row's params_m and gflops of a part (the
    paper's FLOPs protocol: the first one the task counts), judged with the card's tolerance (exact if none)."""
    from bench.cards import within
    ref = card.reference_row("dense", "1x", profile, part) or {}
    tol = card.references.tolerance if card.references else {}
    got = {"params_m": res["params"] / 1e6, "gflops": next(iter(res["protocols"].values()))["macs"] / 1e9}
    out = []
    for k in ("params_m", "gflops"):
        if isinstance(ref.get(k), (int, float)):
            t = tol.get(k, 0.0)
            out.append((f"{part + ' ' if part else ''}{k}", got[k], ref[k], within(got[k], ref[k], t), t))
    return out


def cmd_plan(args):
    from bench.plan import format_plan, plan_table

    def number(flag, value, cast):
        try:
            return cast(value)
        except (TypeError, ValueError):
            raise BenchError(f"{flag}: {value!r} is not a {'whole ' if cast is int else ''}number") from None

    plan = plan_table(args.table, args.profile, gpus=number("--gpus", args.gpus, int),
                      gpu_memory=number("--gpu-memory", args.gpu_memory, float),
                      utilization=number("--utilization", args.utilization, float),
                      gpu_tflops=number("--gpu-tflops", args.gpu_tflops, float), methods=args.methods,
                      ratios=args.ratios,
                      train_size=number("--train-size", args.train_size, int) if args.train_size else None)
    print(format_plan(plan, phases=args.phases))


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
    diffs, regression = compare_csv(args.old, args.new, lambda n: card_dict(load_checked_card(n)), k=args.k,
                                    arch_tolerance=args.arch_tolerance, speedup_tolerance=args.speedup_tolerance,
                                    absolute_speed=args.absolute_speed, throughput_tolerance=args.throughput_tolerance)
    print(format_diffs(diffs))
    print("REGRESSION" if regression else "no regression")
    return 1 if regression else 0


def cmd_publish(args):
    import shlex

    from bench.config import Paths
    from bench.publish import publish

    output = Paths.resolve(output=args.output).output
    command = "python -m bench publish " + " ".join(
        f"{flag} {shlex.quote(str(v))}" for flag, v in (("--output", args.output), ("--site", args.site),
                                                        ("--results", args.results), ("--tables", args.tables)) if v)
    tables = [t.strip() for t in args.tables.split(",") if t.strip()] if args.tables else None
    res = publish(output, args.site, args.results, tables, command,
                  warn=lambda m: print(f"warning: {m}", file=sys.stderr))
    for s in res["summaries"]:
        print(f"{s['table']} ({s['profile']}): {len(s['records'])} records -> {Path(args.site) / s['table'] / 'index.html'}")
    print(f"site: {res['index']}")
    if res["provenance"]:
        print(f"results: {len(res['summaries'])} CSVs and plots in {args.results}, provenance {res['provenance']}")
    return 0
