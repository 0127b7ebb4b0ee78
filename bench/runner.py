"""The path of one cell (shared/DESIGN.md), in `run_cell`, and the expansion of a card into cells.

A cell = (table, method, ratio, seed) under one profile. Its resolved config is hashed; a finished
record with that hash is reused, so an interrupted run (even kill -9) resumes where it stopped.
"""
from __future__ import annotations

import copy
import datetime as dt
import functools
import time
import traceback
import uuid
import warnings
from pathlib import Path

import torch

from bench import measure
from bench.api import CellContext, PruneResult, RatioSpec
from bench.cards import DENSE_RATIO, card_dict, load_checked_card, parse_card
from bench.options import parse_block
from bench.recipe import TrainRecipe
from bench.config import Paths
from bench.errors import BenchError, CellFailure, UnknownName
from bench.judge import apply_relations, judge_cell, judge_reference  # noqa: F401  (judge_reference: re-exported)
from bench.records import (RECORD_VERSION, Flops, Params, Record, RetentionRow, Speed, Memory, TrainingPhase, cell_dir,
                           config_hash, load_records, read_record, record_path, write_record)
from bench.registry import METHODS, MODELS, TASKS
from bench.structure import extract, kept_param_count, retention, save_manifest, write_json_atomic
from bench.training import train

RUN_ID = uuid.uuid4().hex[:12]


def resolve_device(device: str | None) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda was asked for but torch sees no CUDA device; use --device cpu.")
    if device not in ("cpu", "cuda"):
        raise UnknownName("device", device, ["cpu", "cuda"])
    return device


def _parse_list(value, kind, known, cast=str, flag=None):
    if value in (None, ""):
        return None
    items = []
    for v in str(value).split(","):
        v = v.strip()
        if not v:
            continue
        try:
            items.append(cast(v))
        except ValueError:
            raise BenchError(f"{flag or kind}: {v!r} is not a whole number; give comma-separated integers, "
                             f"e.g. {flag or kind} 0,1,2") from None
    for v in items:
        if known is not None and v not in known:
            raise UnknownName(kind, v, known)
    return items


def write_cells(cells: list, folder: Path) -> Path:
    """The expanded cells as a JSON file in `folder` (bench run hands them to the pytest plugin and its xdist
    workers this way, so a card is expanded once per run); the caller removes it."""
    from bench.atomic import temp_path
    path = temp_path(Path(folder) / "cells.json")
    write_json_atomic(path, cells)
    return path


def read_cells(path) -> list:
    import json
    return json.loads(Path(path).read_text())


def card_parts(card, profile: str) -> list:
    """The (task, model) parts of a card: one for most cards; several when the card lists `tasks:` (GLUE)
    or when ratios name their own `model:` (GOHSP: DeiT-Tiny at 30%, DeiT-Small at 35% and 50%).
    Returns [{"part": name or None, "task", "model_name", "arch", "ratios": [Ratio]}]."""
    card = parse_card(card)
    prof = card.profile(profile)
    tasks = prof.tasks or card.task_names()
    names = list(dict.fromkeys(r.model or card.model for r in card.ratios))
    arch_of = {card.model: prof.model, **prof.models}
    parts = []
    for t in tasks:
        for name in names:
            part = "/".join(x for x, multi in ((t, card.tasks is not None), (name, len(names) > 1)) if multi) or None
            parts.append({"part": part, "task": t, "model_name": name, "arch": arch_of.get(name, name),
                          "ratios": [r for r in card.ratios if (r.model or card.model) == name]})
    return parts


def _block(cls, data, where: str) -> dict:
    """A typed block as plain data with its defaults filled in (what a cell's config and hash hold)."""
    return parse_block(cls, data, where).to_dict()


def expand_cells(card, profile: str, methods=None, ratios=None, seeds=None, device="cpu") -> list:
    """The resolved config of every cell the card asks for under `profile`, filtered by the CLI lists.
    A cell's config is plain JSON data (hashed, stored in its record, sent to workers); `run_cell` turns its
    blocks back into the typed objects of the task, the method and the recipe."""
    card = parse_card(card)
    prof = card.profile(profile)
    methods = _parse_list(methods, "method", card.methods) or list(card.methods)
    labels = list(card.ratio_by_label())
    # a profile may run a subset of the card's ratios by default (`ratios: [2x, 4x]`); --ratios overrides it
    ratio_sel = (_parse_list(ratios, "ratio", labels + [DENSE_RATIO["label"]])
                 or [r for r in (prof.ratios or []) if r in labels] or labels)
    seeds = _parse_list(seeds, "seed", None, int, flag="--seeds") or [0]
    throughput = {**card.protocol.throughput.to_dict(),
                  **{k: v for k, v in (prof.throughput.to_dict() if prof.throughput else {}).items() if v is not None}}
    where = f"profiles.{profile}"
    source = prof.source(profile)
    cells = []
    for part in card_parts(card, profile):
        arch = part["arch"]
        adapter_cls, arch_cfg = MODELS.get(arch)
        task_cls = TASKS.get(part["task"])
        # a task may need a head size (GLUE: num_labels 1 for STS-B, 3 for MNLI); the card's model_config wins
        task_cfg = getattr(task_cls, "model_config_overrides", None) or {}
        model_cfg = {**arch_cfg, **task_cfg, **prof.config_overrides}
        metrics = [m.to_dict() for m in card.metrics if (m.task or part["task"]) == part["task"]]
        data = _block(task_cls.Data, prof.data, f"{where}.data")
        for budget, m in [(b, m) for b in prof.budgets
                          for m in sorted(methods, key=lambda m: (m != "dense", card.methods.index(m)))]:
            method = METHODS.get(m)
            skey = method.settings_key or m
            rlist = [DENSE_RATIO] if m == "dense" else [r.to_dict() for r in part["ratios"] if r.label in ratio_sel]
            for r in rlist:
                finetune = _finetune_for(card, prof, method, skey, r["label"], budget)
                if budget == "matched" and m != "dense" and finetune == _finetune_for(card, prof, method, skey,
                                                                                       r["label"], "paper"):
                    continue   # already at the matched budget (the reference method): its paper-budget row is it
                for seed in seeds:
                    cfg = {
                        "record_version": RECORD_VERSION,
                        "table": card.table, "table_version": card.version, "profile": profile,
                        "data_source": source,
                        "task": part["task"], "data": data,
                        "metrics": metrics,
                        "model": arch, "model_config": model_cfg,
                        "checkpoint": _checkpoint(prof, part),
                        "dense_training": prof.dense.to_dict() if prof.dense else None,
                        "method": m,
                        "method_options": _block(method.Options, card.method_options.get(m), f"method_options.{m}"),
                        "method_settings": _block(method.Settings, prof.method_settings_for(skey, r["label"]),
                                                  f"{where}.{skey}"),
                        "ratio": {"label": str(r["label"]), "p": float(r["p"])},
                        "ratio_meaning": card.ratio_meaning,
                        "finetune": finetune,
                        "seed": seed, "device": device,
                        "protocol": {"flops": card.protocol.flops.to_dict(), "throughput": throughput},
                        # what the seed varies, and the version of every piece of code that determines the result:
                        # a record of another version is never reused (bench report lists it as stale)
                        "seed_varies": sorted(prof.seed_varies),
                        "code_version": code_version(method, task_cls, adapter_cls),
                    }
                    if card.ratio_basis != "prunable":   # only then: keeps older hashes valid
                        cfg["ratio_basis"] = card.ratio_basis
                    part_name = part["part"]
                    if budget == "matched":              # the matched-budget rows are a part of their own
                        cfg["budget"] = {"kind": "matched", "reference": _budget_reference(card, prof)}
                        part_name = "/".join(x for x in (part_name, MATCHED_PART) if x)
                    if part_name:                        # likewise, multi-part cards only
                        cfg["part"] = part_name
                    cfg["hash"] = config_hash(cfg)
                    prefix = f"{part_name.replace('/', '-')}-" if part_name else ""
                    cfg["cell_id"] = f"{prefix}{m}-{r['label']}-seed{seed}"
                    cells.append(cfg)
    # seed outermost: a multi-seed run cut short has every method and ratio of its first seeds (dense first)
    cells.sort(key=lambda c: seeds.index(c["seed"]))
    return cells


MATCHED_PART = "matched"


def _budget_reference(card, prof) -> str:
    """The method whose total training (its own phase before the finetune + the finetune) every method gets under
    `budget: matched`: the profile's budget_reference, else the first method of the card that trains before its
    finetune (UPop's search, GOHSP's ADMM stage, VTrans's mask phase)."""
    if prof.budget_reference:
        return prof.budget_reference
    for m in card.methods:
        method = METHODS.get(m)
        label = card.ratios[0].label
        if m != "dense" and method.compress_epochs(_settings(method, prof, label)) > 0:
            return m
    raise BenchError(f"card {card.table}: budgets has matched, but no method trains before its finetune; set "
                     f"budget_reference: <method> in the profile")


def _settings(method, prof, label):
    return parse_block(method.Settings, prof.method_settings_for(method.settings_key or method.name, label) or {},
                       f"settings of {method.name}")


def _finetune_for(card, prof, method, skey, label, budget) -> dict | None:
    """A cell's finetune recipe. paper: the card's (per ratio). matched: its epochs set so that the method's own
    training before the finetune plus the finetune equal the reference method's (SOMP finetunes for UPop's
    search + retrain epochs; SGMP's gradual schedule, a fraction of its finetune, stretches with it)."""
    if not (prof.finetune and (method.finetune or method.uses_finetune_budget)):
        return None
    recipe = prof.finetune_for(label)
    if budget == "matched":
        ref = METHODS.get(_budget_reference(card, prof))
        ref_total = ref.compress_epochs(_settings(ref, prof, label)) + (recipe.epochs if ref.finetune else 0.0)
        own = method.compress_epochs(_settings(method, prof, label))
        if own > ref_total:
            raise BenchError(f"card {card.table}: budget matched: {method.name} trains {own:g} epochs before its "
                             f"finetune at {label}, more than {ref.name}'s total {ref_total:g}; choose another "
                             f"budget_reference")
        recipe = recipe.with_(epochs=ref_total - own)
    return recipe.to_dict()


def code_version(method_cls, task_cls, adapter_cls) -> dict:
    """The versions of the code behind a cell (part of its hash): the suite's `__version__`, the training loop's
    TRAINING_VERSION, the measuring code's MEASURE_VERSION, and the VERSION of its method, task (with its micro
    generator) and model adapter, which their authors bump when a change alters results."""
    import bench
    from bench.training import TRAINING_VERSION
    return {"bench": bench.__version__, "training": TRAINING_VERSION, "measure": measure.MEASURE_VERSION,
            "method": int(getattr(method_cls, "VERSION", 1)), "task": int(getattr(task_cls, "VERSION", 1)),
            "model": int(getattr(adapter_cls, "VERSION", 1))}


def seed_for(cfg: dict, part: str, offset: int = 0) -> int:
    """The seed a part of the cell uses (profiles.<p>.seed_varies): the cell's seed if the profile says the seed
    varies that part, else 0 (the same for every seed); plus `offset` (the finetune's +1000)."""
    varies = cfg.get("seed_varies")
    return (cfg["seed"] if varies is None or part in varies else 0) + offset


def _checkpoint(prof, part: dict):
    """The checkpoint of a part: `checkpoints: {model name or task name: file}` for multi-model cards
    and for multi-task cards whose dense models are fine-tuned per task (GLUE)."""
    ck = prof.checkpoints
    return ck.get(part["model_name"]) or ck.get(part["task"]) or prof.checkpoint


def task_profile(cfg) -> str:
    """What a task adapter is told: "micro" (generate the synthetic data set) or "paper" (read the real layout)."""
    return "micro" if cfg.get("data_source", "synthetic" if cfg["profile"] == "micro" else "folder") == "synthetic" \
        else "paper"


class Session:
    """Shared state of one run: paths, the loaded tasks and dense models (cached on disk by hash)."""

    def __init__(self, paths: Paths, log=print, checkpoint_every_steps: int = 0, checkpoint_every_minutes: float = 0.0,
                 quiet: bool = False, micro_batch: int | str | None = None, sharding: str | None = None):
        from bench import distributed as dist
        self.paths = paths
        self.log = log if dist.is_main() else (lambda msg: None)   # data parallel: rank 0 logs
        self._tasks: dict = {}
        # training-state checkpoints inside a phase (bench.train_state) and progress lines (bench.progress):
        # how the run is carried out, not what it computes, so they are not in any config hash
        self.train_options = {"state_every_steps": checkpoint_every_steps,
                              "state_every_minutes": checkpoint_every_minutes, "quiet": quiet,
                              "micro_batch": micro_batch, "sharding": sharding}

    def task(self, cfg):
        key = (cfg["task"], cfg["profile"], config_hash(cfg["data"]))
        if key not in self._tasks:
            task_cls = TASKS.get(cfg["task"])
            t = task_cls(cfg["data"], self.paths.data_root, task_profile(cfg), self.paths.cache)
            from bench import distributed as dist
            if not dist.is_main():   # data parallel: rank 0 generates the micro data first, the others then read it
                dist.barrier()
            t.prepare()
            if dist.is_main():
                dist.barrier()
            self._tasks[key] = t
        return self._tasks[key]

    def checkpoint_path(self, cfg) -> Path:
        ckpt = Path(cfg["checkpoint"])
        return ckpt if ckpt.is_absolute() else self.paths.checkpoints / ckpt

    def check_checkpoint(self, cfg) -> None:
        """Pre-flight: the files the loader will read are there (a file, or a transformers folder with every
        shard its index names): `bench.checkpoints.checkpoint_files`, MissingData naming the path if not."""
        from bench.checkpoints import checkpoint_files
        checkpoint_files(self.checkpoint_path(cfg), f"official checkpoint of {cfg['model']}")

    def preflight(self, cfg) -> None:
        """Before any cell runs: the data is there and readable, the checkpoint's files are there and match the
        architecture, and the model fits the task's inputs (built on the meta device: no weights, no memory;
        the checkpoint's tensors are read once). Raises BenchError naming the problem, so nothing is written."""
        task = self.task(cfg)
        adapter_cls, _ = MODELS.get(cfg["model"])
        adapter = adapter_cls(cfg["model"], cfg["model_config"])
        with torch.device("meta"):
            model = adapter.build()
        if cfg.get("checkpoint"):
            self.check_checkpoint(cfg)
            with warnings.catch_warnings():   # copying into meta tensors is the intended no-op here
                warnings.filterwarnings("ignore", message=".*non-meta parameter in the checkpoint to a meta parameter")
                adapter.load_checkpoint(model, self.checkpoint_path(cfg), **_quiet(adapter))
            if not cfg.get("dense_training") and getattr(model, "_bench_left_at_init", None):
                self._refuse_untrained(cfg, model._bench_left_at_init)
        _check_model(task, model)

    @staticmethod
    def _refuse_untrained(cfg, untrained):
        raise BenchError(f"checkpoint {cfg['checkpoint']} has no trained {', '.join(untrained)} for {cfg['task']}: "
                         f"the dense row would be a random classifier. Add a dense recipe "
                         f"(profiles.{cfg['profile']}.dense: {{epochs, lr, batch_size}}) to finetune it on the "
                         f"task first, or use a checkpoint finetuned on {cfg['task']}")

    def dense_model(self, cfg, task, device):
        """The dense model of a cell, from the profile's dense-model source:
        - `checkpoint` only: the weights as released;
        - `dense` recipe only: trained from scratch on the task;
        - both: the checkpoint, then a dense finetune on the task (a base checkpoint has no trained task head).
        Trained models are cached by the hash of everything that determines them (and reused by later cells)."""
        adapter_cls, _ = MODELS.get(cfg["model"])
        adapter = adapter_cls(cfg["model"], cfg["model_config"])
        recipe = cfg.get("dense_training")
        key = {"model": cfg["model"], "model_config": cfg["model_config"], "task": task.fingerprint(),
               "training": recipe, "seed": seed_for(cfg, "dense")}
        if seed_for(cfg, "data_order") != key["seed"]:   # only then: the default keeps the key of older caches
            key["data_seed"] = seed_for(cfg, "data_order")
        if cfg.get("code_version"):   # a dense model of an older training loop, task or adapter is not reused
            key["code_version"] = {k: cfg["code_version"][k] for k in ("bench", "training", "task", "model")}
        torch.manual_seed(seed_for(cfg, "dense"))
        if cfg.get("checkpoint"):
            self.check_checkpoint(cfg)
            model = adapter.build()
            adapter.load_checkpoint(model, self.checkpoint_path(cfg))
            _check_model(task, model)
            untrained = getattr(model, "_bench_left_at_init", None)
            if not recipe and untrained:
                self._refuse_untrained(cfg, untrained)
            if not recipe:
                return adapter, model.to(device).eval(), {"dense_s": 0.0, "model_tag": "checkpoint"}
            key["checkpoint"] = _checkpoint_identity(self.checkpoint_path(cfg))
            tag, what = "checkpoint+finetune", f"finetuning the dense {cfg['model']} from {cfg['checkpoint']} on {cfg['task']}"
        else:
            model = adapter.build()
            _check_model(task, model)
            tag, what = "scratch", f"training the dense {cfg['model']} from scratch"
        folder = self.paths.cache / "dense" / f"{cfg['model']}-{config_hash(key)}"
        from safetensors.torch import load_file, save_file

        from bench.locks import held, lock_path_for
        # one process trains a dense model (xdist workers, concurrent runs, cluster jobs): the others wait here,
        # then load what it cached
        import contextlib

        from bench import distributed as dist
        # data parallel: rank 0 holds the lock and decides; a cached model reaches the others by broadcast, a
        # training runs on every rank together and rank 0 writes it
        with (held(lock_path_for(folder), f"the dense model {folder.name}", log=self.log, write_owner=True)
              if dist.is_main() else contextlib.nullcontext()):
            if dist.broadcast_object((folder / "model.safetensors").is_file() if dist.is_main() else None):
                if dist.is_main():
                    model.load_state_dict(load_file(str(folder / "model.safetensors")))
                dist.broadcast_module(model)
                return adapter, model.to(device).eval(), {"dense_s": 0.0, "model_tag": tag,
                                                          "training": _cached_training(folder)}
            self.log(f"{what} (cached for later cells and runs)")
            stats = train(model, task, device=device, seed=seed_for(cfg, "data_order"), log=self.log, adapter=adapter,
                          phase="dense",
                          state_dir=folder / "train_state", **self.train_options, **recipe)
            if dist.is_main():
                folder.mkdir(parents=True, exist_ok=True)
                from bench.atomic import temp_path   # unique (concurrent runs may write at once), with the writer's pid
                tmp = temp_path(folder / "model.safetensors")   # so that the next run removes it if the writer died
                save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))
                write_json_atomic(folder / "training.json", {"key": key, "stats": stats})
                tmp.replace(folder / "model.safetensors")
        return adapter, model.eval(), {"dense_s": stats["seconds"], "model_tag": tag,
                                       "training": training_summary(stats)}


TRAINING_SUMMARY_KEYS = tuple(k for k in TrainingPhase.model_fields if k != "cached")


def training_summary(stats: dict, cached: bool = False) -> TrainingPhase:
    """What the record's `training` entry keeps of a phase's train() stats."""
    return TrainingPhase(**{k: stats[k] for k in TRAINING_SUMMARY_KEYS if k in stats}, cached=cached)


def _cached_training(folder: Path) -> dict | None:
    """The training summary of a cached dense model (its training.json), marked cached."""
    import json
    try:
        stats = json.loads((folder / "training.json").read_text())["stats"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return training_summary(stats, cached=True)


def _quiet(adapter) -> dict:
    """load_checkpoint(..., log=) where the adapter takes one: the pre-flight's load says nothing."""
    import inspect
    return {"log": lambda m: None} if "log" in inspect.signature(adapter.load_checkpoint).parameters else {}


def _check_model(task, model) -> None:
    """The task's check that the model fits its inputs (e.g. a tokenizer's ids within the embedding)."""
    check = getattr(task, "check_model", None)
    if check is not None:
        check(model)


def _checkpoint_identity(path: Path) -> list:
    """What identifies a checkpoint for caching what was trained from it: its files' names, sizes and times."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return [[str(p.relative_to(path.parent)), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def reuse_record(output: Path, cfg: dict, force: bool = False):
    """The finished record of this cell (same hash: same resolved config and code versions), judged again against
    the card's current references (and rewritten when its status changes); None to run it (no record, an error
    record, or `force`: bench run --force)."""
    if force:
        return None
    data = read_record(record_path(output, cfg["table"], cfg["hash"]))
    if not data or data["status"] == "error" or data["config"].get("hash") != cfg["hash"]:
        return None
    rec = Record.from_data(data)
    try:
        changed = judge_reference(rec, load_checked_card(cfg["table"]))
    except BenchError:
        changed = False
    return write_record(output, rec) if changed else rec.to_data()


def run_cell(cfg: dict, session: Session) -> dict:
    """Run one cell end to end and write its record (returned as the data written); exceptions become an
    'error' record."""
    t_start = time.perf_counter()
    record = _empty_record(cfg)
    from bench.workers import single_thread_on_cpu
    try:
        with single_thread_on_cpu(cfg.get("device") or "cpu"):   # results independent of the core count
            _run_cell(cfg, session, record)
    except (CellFailure, BenchError) as e:
        record.status, record.reason = "error", str(e)
    except torch.cuda.OutOfMemoryError as e:   # noqa: F841
        record.status, record.reason = "error", "out of memory: " + str(e).splitlines()[0]
    except Exception as e:  # noqa: BLE001 - a crashing cell must not stop the others
        session.log(traceback.format_exc())
        record.status, record.reason = "error", f"{type(e).__name__}: {e}"
    record.timings.total_s = round(time.perf_counter() - t_start, 3)
    from bench.locks import runner_identity
    record.runner = runner_identity()   # pid, host, xdist worker, job id: who computed it
    from bench import distributed as dist
    if dist.is_distributed():   # rank 0 evaluated, measured and judged: its record is every rank's, and it writes
        record = dist.broadcast_object(record)
        if not dist.is_main():
            return record.to_data()
    return write_record(session.paths.output, record)


def _empty_record(cfg) -> Record:
    """The record of a cell that starts: what its config says; the rest is filled as the cell runs."""
    card_metrics = cfg["metrics"]
    primary = next(m for m in card_metrics if m.get("primary"))
    return Record(
        hash=cfg["hash"], run_id=RUN_ID, date_utc=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        table=cfg["table"], table_version=cfg["table_version"], profile=cfg["profile"],
        task=cfg["task"], part=cfg.get("part"), split=primary["split"], model_arch=cfg["model"],
        method=cfg["method"], method_impl=METHODS.get(cfg["method"]).impl,
        ratio_label=cfg["ratio"]["label"], ratio_p=cfg["ratio"]["p"], ratio_meaning=cfg["ratio_meaning"],
        seed=cfg["seed"], config=cfg, metric_splits={m["name"]: m["split"] for m in card_metrics},
        env=measure.env_info())


def _run_cell(cfg, session: Session, record: Record):
    device = torch.device(cfg["device"])
    task = session.task(cfg)
    adapter, model, dense_info = session.dense_model(cfg, task, device)
    record.model_tag = dense_info["model_tag"]
    record.timings.dense_s = round(dense_info["dense_s"], 3)
    if dense_info.get("training"):
        record.training["dense"] = dense_info["training"]
    dense_params = measure.count_params(model)
    flop_forwards = task.flops_forwards(cfg["model_config"], device)   # count_macs works on any device
    dense_macs = _count_protocols(model, flop_forwards)

    dense_copy = copy.deepcopy(model).cpu() if cfg["method"] != "dense" else None   # for paired timing

    # method: search / prune / train -> keep-masks
    torch.manual_seed(seed_for(cfg, "pruning"))
    method_cls = METHODS.get(cfg["method"])
    finetune = parse_block(TrainRecipe, cfg["finetune"], "finetune") if cfg["finetune"] else None
    settings = {"finetune": finetune,
                "method": parse_block(method_cls.Settings, cfg["method_settings"], f"{cfg['profile']}.{cfg['method']}")}
    trainer = functools.partial(train, task=task, device=device, seed=seed_for(cfg, "data_order"), log=session.log,
                                adapter=adapter)
    state_root = cell_dir(session.paths.output, cfg["table"], cfg["hash"]) / "train_state"
    method_calls = []

    def method_train(m, **kw):
        """ctx.train: a method's training phase `<method>` (`<method>2`, ... for later calls). It is resumable
        when the method passes state_hooks (which save what the training state does not hold: its masks,
        importance); without them it runs without checkpoints, as resuming would lose the method's state."""
        method_calls.append(1)
        phase = kw.pop("phase", None) or cfg["method"] + (str(len(method_calls)) if len(method_calls) > 1 else "")
        opts = dict(session.train_options)
        if kw.get("state_hooks") is not None:
            opts["state_dir"] = state_root / phase
        stats = trainer(m, phase=phase, **{**opts, **kw})
        record.training[phase] = training_summary(stats)
        return stats
    structure = adapter.structure(model)
    ctx = CellContext(model=model, adapter=adapter, structure=structure, task=task,
                      ratio=RatioSpec(cfg["ratio"]["label"], cfg["ratio"]["p"], cfg["ratio_meaning"]),
                      options=parse_block(method_cls.Options, cfg["method_options"], f"method_options.{cfg['method']}"),
                      settings=settings, device=device, seed=seed_for(cfg, "pruning"),
                      train=method_train, log=session.log)
    method = method_cls()
    t = time.perf_counter()
    result = method.prune(ctx)
    if not isinstance(result, PruneResult):
        raise CellFailure(f"method {cfg['method']} returned a {type(result).__name__}, not a bench.api.PruneResult "
                          f"(keep-masks, structure, extract options, info): fix methods/{cfg['method']}.py")
    keep, structure = result.keep, result.structure
    info = dict(result.info)
    record.timings.prune_s = round(time.perf_counter() - t, 3)
    from bench import distributed as dist
    if dist.is_distributed():   # every rank must extract the same subnet: a CellFailure names the groups otherwise
        check = dist.check_identical(keep, "keep-masks")
        info["data_parallel"] = {"world_size": check["world_size"], "backend": dist.backend(),
                                 "keep_masks_identical": True, "keep_masks_hash": check["hash"]}
        session.log(f"keep-masks checked identical on all {check['world_size']} ranks (hash {check['hash']})")
    counts = kept_param_count(model, structure, keep)

    # extract -> smaller model, saved as a manifest
    extract(model, adapter, structure, keep, result.extract_options)
    record.retention = [RetentionRow(**row) for row in retention(structure, keep)]
    if cfg["method"] != "dense" and dist.is_main():
        from bench.report import retention_heatmap
        retention_heatmap(record.to_data(), cell_dir(session.paths.output, cfg["table"], cfg["hash"]) / "retention.png")
    record.method_info = info

    # finetune as the card says
    if (method.finetune if result.finetune is None else result.finetune) and cfg["finetune"]:
        t = time.perf_counter()
        if "finetune" not in cfg.get("seed_varies", ["finetune"]):   # the same finetune randomness for every seed
            torch.manual_seed(seed_for(cfg, "finetune", 1000))
        # selection: paper (bench.selection): evaluate every epoch, keep the best one's weights, label the row
        from bench.selection import EpochSelection
        selection = EpochSelection.for_cell(cfg, task, model, device, session.log)
        stats = train(model, task, device=device, seed=seed_for(cfg, "data_order", 1000), log=session.log, adapter=adapter,
                      phase="finetune", state_dir=state_root / "finetune", **session.train_options, **cfg["finetune"],
                      **(selection.train_kwargs() if selection is not None else {}))
        if selection is not None:
            record.selection = selection.finish()
        record.method_info["finetune"] = stats
        record.training["finetune"] = training_summary(stats)
        record.timings.finetune_s = round(time.perf_counter() - t, 3)
    if not dist.is_main():   # data parallel: rank 0 alone saves, evaluates (the whole split) and measures
        return
    save_manifest(cell_dir(session.paths.output, cfg["table"], cfg["hash"]), model, cfg["model"],
                  cfg["model_config"], structure, keep, result.extract_options,
                  extra={"table": cfg["table"], "cell": cfg["cell_id"]})

    # evaluate on the card's splits (final model; with finetune.selection paper the selected epoch's, labelled)
    t = time.perf_counter()
    for split in dict.fromkeys(m["split"] for m in cfg["metrics"]):
        res = task.evaluate(model, split, device)
        for m in cfg["metrics"]:
            if m["split"] == split:
                record.metrics[m["name"]] = res[m["name"]]
    record.timings.eval_s = round(time.perf_counter() - t, 3)

    # measure the extracted model
    t = time.perf_counter()
    total = measure.count_params(model)
    prunable = counts["prunable_dense"]
    # the ratio's basis: the prunable params (default) or all params (GOHSP's convention)
    basis = dense_params if cfg.get("ratio_basis") == "total" else prunable
    target_removed = cfg["ratio"]["p"] * basis
    record.params = Params(total=total, dense_total=dense_params, prunable_dense=prunable,
                           removed=dense_params - total, target_removed=round(target_removed),
                           achieved_reduction=(dense_params - total) / basis if basis else 0.0,
                           target_reduction=cfg["ratio"]["p"], basis=cfg.get("ratio_basis", "prunable"))
    macs = _count_protocols(model, flop_forwards)
    paper_label = next(iter(flop_forwards))
    inference_label = next((k for k in flop_forwards if k.startswith("inference")), None)
    record.flops = Flops(macs=macs[paper_label], dense_macs=dense_macs[paper_label],
                         protocol=paper_label, by_protocol=macs, dense_by_protocol=dense_macs,
                         inference_macs=macs.get(inference_label), dense_inference_macs=dense_macs.get(inference_label),
                         input_spec=measure.input_spec(flop_forwards[paper_label][0]),
                         counter="bench.dispatch", convention="fma1_attn_incl")
    tp = cfg["protocol"]["throughput"]
    model.to(device).eval()
    record.speed = Speed(**paired_throughput(model, None if cfg["method"] == "dense" else dense_copy,
                                             lambda bs, dev: task.dummy_inputs(cfg["model_config"], bs, dev),
                                             str(device), tp))
    record.memory = Memory(**measure.peak_memory(model, task.dummy_inputs(cfg["model_config"], tp["batch_size"],
                                                                          device), str(device)))
    record.timings.measure_s = round(time.perf_counter() - t, 3)
    judge_cell(cfg, record, structure, load_checked_card(cfg["table"]))


def _count_protocols(model, forwards: dict) -> dict:
    """MACs of each FLOPs protocol of the card ({label: macs})."""
    return {label: measure.count_macs(model, args, kwargs)["macs"] for label, (args, kwargs) in forwards.items()}


def paired_throughput(model, dense, make_inputs, device: str, tp: dict) -> dict:
    """Throughput of `model`; with `dense` given, the two are timed in alternation (one trial each,
    `trials` times) so both see the same machine state, and the median ratio is the measured speedup."""
    kw = dict(warmup=tp["warmup"], iters=tp["iters"], trials=1)
    runs, dense_runs = [], []
    if dense is not None:
        dense.to(device).eval()
    for _ in range(tp["trials"]):
        if dense is not None:
            dense_runs.append(measure.throughput(dense, make_inputs, device, tp["batch_size"], **kw))
        runs.append(measure.throughput(model, make_inputs, device, tp["batch_size"], **kw))
    med = lambda xs: sorted(xs)[len(xs) // 2]   # noqa: E731
    out = dict(runs[0])
    out["trials"] = tp["trials"]
    out["trials_sps"] = [r["throughput_sps"] for r in runs]
    out["throughput_sps"] = med(out["trials_sps"])
    out["latency_ms_bs1"] = med([r["latency_ms_bs1"] for r in runs])
    if dense is not None:
        out["dense_trials_sps"] = [r["throughput_sps"] for r in dense_runs]
        out["dense_throughput_sps"] = med(out["dense_trials_sps"])
        out["speedup_measured"] = med([a["throughput_sps"] / b["throughput_sps"] for a, b in zip(runs, dense_runs)])
        dense.cpu()
    return out


def current_records(card, output: Path, profile: str) -> tuple[list, list]:
    """(current, stale) records of a card under `profile`. Current: the record of a cell the card asks for now
    (its hash is the hash of the cell's config resolved from the current card and code, for any ratio, seed and
    device it was run with), judged again against the current references. Stale: every other record of the
    table and profile (an older card version or config, older code): never reused, never in the table, the
    CSV or the plot; returned as [(record, why)] with what differs from the current cell. `card`: a Card, the
    card's dict or its name."""
    card = load_checked_card(card) if isinstance(card, str) else parse_card(card)
    recs = load_records(output, card.table, profile)
    if not recs:
        return [], []
    seeds = ",".join(str(s) for s in sorted({r["seed"] for r in recs if isinstance(r.get("seed"), int)}))
    labels = ",".join(card.ratio_by_label())
    want = {}
    for dev in sorted({(r.get("config") or {}).get("device") or "cpu" for r in recs}):
        try:
            cells = expand_cells(card, profile, None, labels, seeds or None, dev)
        except BenchError:
            cells = []
        want.update({c["hash"]: c for c in cells})
    by_cell = {(c.get("part"), c["method"], c["ratio"]["label"], c["seed"], c["device"]): c for c in want.values()}
    current, stale = [], []
    for r in recs:
        cfg = r.get("config") or {}
        if r.get("hash") in want and cfg.get("hash") == r.get("hash"):
            rec = Record.from_data(r)
            judge_reference(rec, card)
            current.append(rec.to_data())
        else:
            now = by_cell.get((cfg.get("part"), r.get("method"), r.get("ratio_label"), r.get("seed"), cfg.get("device")))
            stale.append((r, _differences(cfg, now) if now else "no such cell in the current card"))
    apply_relations(card_dict(card), current)   # a failing `checked` relation fails its cells
    return current, stale


def _differences(old: dict, new: dict, limit: int = 4) -> str:
    """What differs between a stale record's config and the current cell's: "code_version.method 1 -> 2"."""
    diffs = []
    for k in sorted(set(old) | set(new)):
        if k in ("hash", "cell_id"):
            continue
        a, b = old.get(k), new.get(k)
        if a == b:
            continue
        if k not in old:
            diffs.append(f"{k} not in the record (an older suite)")
        elif k not in new:
            diffs.append(f"{k} no longer in the config")
        elif isinstance(a, dict) and isinstance(b, dict):
            sub = [f"{k}.{j} {a.get(j)!r} -> {b.get(j)!r}" for j in sorted(set(a) | set(b)) if a.get(j) != b.get(j)]
            diffs += sub if len(sub) <= 2 else [f"{k} ({len(sub)} keys)"]
        else:
            diffs.append(f"{k} {a!r} -> {b!r}" if not isinstance(a, (dict, list)) and not isinstance(b, (dict, list))
                         else f"{k} changed")
    return "; ".join(diffs[:limit]) + (f"; ... ({len(diffs) - limit} more)" if len(diffs) > limit else "") \
        or "same config, other hash"


def format_stale(stale: list) -> str:
    """One line per stale record (bench report, the end of a run)."""
    if not stale:
        return ""
    lines = [f"{len(stale)} stale record{'s' if len(stale) > 1 else ''} (another card version, config or code "
             f"version: not reused, not in the table; `bench run` computes the current cells):"]
    for r, why in sorted(stale, key=lambda t: (t[0].get("method") or "", str(t[0].get("ratio_label")),
                                               t[0].get("seed") or 0, t[0].get("date_utc") or "")):
        lines.append(f"  stale {r.get('method')}-{r.get('ratio_label')}-seed{r.get('seed')} "
                     f"{r.get('hash')} ({r.get('date_utc')}): {why}")
    return "\n".join(lines) + "\n"


def table_records(card, paths: Paths, profile: str) -> list:
    """The current records of a card (see `current_records`)."""
    return current_records(card, paths.output, profile)[0]

