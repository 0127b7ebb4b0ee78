"""The one training loop every profile and method uses, driven by a `bench.recipe.TrainRecipe`.

The loop implements the loop-side keys itself: the optimizer (AdamW with `betas`, or SGD with `momentum` /
`nesterov`), weight-decay groups, gradient clipping and the lr schedule (linear warm-up, then cosine, poly or
constant decay to `min_lr`, updated per step or once per epoch). The data-side keys (augmentation,
mixup/cutmix, label smoothing) are the task's (`task.train_batches(..., recipe=)` / `task.loss(..., recipe=)`)
and the model-side ones (drop path) the model adapter's (`adapter.set_drop_path`); a key the cell's task or
model does not implement is refused before any step, never dropped.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Mapping
from typing import Callable

import torch

from bench.errors import BenchError, CellFailure
from bench.recipe import DATA_RECIPE_KEYS, MODEL_RECIPE_KEYS, TrainRecipe

# The version of this training loop: part of every cell's record hash (bench.runner.code_version). Bump it
# when a change here alters what a training phase computes, so that records trained by the old loop are not reused.
TRAINING_VERSION = 1


def cosine_lr(step: int, total: int, base_lr: float, warmup: int = 0, min_lr: float = 0.0) -> float:
    """The default schedule (cosine per step, warm-up from 0): `lr_at` with the recipe's default keys."""
    if warmup and step < warmup:
        return base_lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


def schedule_units(recipe: TrainRecipe, steps_per_epoch: int) -> tuple[int, float, int]:
    """(total optimizer steps, schedule length U, warm-up length W) in the recipe's schedule unit: steps, or
    whole epochs (the warm-up rounded to whole epochs; U may be fractional when `epochs` is). epochs 0: no
    step; any other budget: at least one."""
    total = max(1, int(round(recipe.epochs * steps_per_epoch))) if recipe.epochs > 0 else 0
    if recipe.schedule_unit == "step":
        return total, float(total), int(round(recipe.warmup_epochs * steps_per_epoch))
    return total, total / steps_per_epoch, int(round(recipe.warmup_epochs))


def lr_at(step: int, recipe: TrainRecipe, steps_per_epoch: int) -> float:
    """The lr of optimizer step `step` (0-based). With u the current unit (the step, or the epoch `step //
    steps_per_epoch` when schedule_unit is epoch), U the run's length and W the warm-up's, both in units:

    - warm-up (u < W): warmup_lr 0: lr * (u + 1) / W (the suite's rule since its first version); warmup_lr > 0:
      warmup_lr + (lr - warmup_lr) * u / W (timm's and BLIP's linear warm-up, starting at warmup_lr);
    - then t = (u - W) / max(1, U - W), capped at 1:
      cosine: min_lr + (lr - min_lr) * (1 + cos(pi t)) / 2,
      poly:   min_lr + (lr - min_lr) * (1 - t) ** poly_power  (Segmenter's PolynomialLR when W = 0),
      constant: lr.
    Cosine with W = 0 or warmup_lr > 0 is timm's CosineLRScheduler(t_initial=U - W, warmup_t=W,
    warmup_lr_init=warmup_lr, warmup_prefix=True) at t = u; with the default keys this is
    `cosine_lr(step, total, lr, warmup, min_lr)` exactly."""
    total, U, W = schedule_units(recipe, steps_per_epoch)
    u = step if recipe.schedule_unit == "step" else step // steps_per_epoch
    base, lo = recipe.lr, recipe.min_lr
    if W and u < W:
        if recipe.warmup_lr == 0:
            return base * (u + 1) / W
        return recipe.warmup_lr + (base - recipe.warmup_lr) * u / W
    t = min(1.0, (u - W) / max(1, U - W))
    if recipe.schedule == "cosine":
        return lo + 0.5 * (base - lo) * (1 + math.cos(math.pi * t))
    if recipe.schedule == "poly":
        return lo + (base - lo) * (1.0 - t) ** recipe.poly_power
    return base


def as_recipe(recipe=None, **fields) -> TrainRecipe:
    """A TrainRecipe from a recipe, a plain dict (a card block) or keyword fields; fields given with a recipe
    override its keys. An unknown or badly typed key is a BenchError naming it."""
    from bench.options import parse_block
    if recipe is None:
        return parse_block(TrainRecipe, fields, "training recipe")
    if isinstance(recipe, TrainRecipe):
        return parse_block(TrainRecipe, {**recipe.model_dump(), **fields}, "training recipe") if fields else recipe
    if isinstance(recipe, Mapping):
        return parse_block(TrainRecipe, {**recipe, **fields}, "training recipe")
    raise TypeError(f"recipe must be a TrainRecipe, a dict or None, not {type(recipe).__name__}")


# device types on which micro_batch_size: auto probes (on a CPU the host's memory is not a GPU's: the per-rank
# batch is taken as it is); a test adds "cpu" to exercise the probe with a simulated out-of-memory error
AUTO_PROBE_DEVICES = ("cuda",)
OPTIMIZER_STATE_SLOTS = 2    # per parameter: AdamW's two moments (SGD with momentum needs one): reserved in the probe


def auto_micro_batch(model, task, recipe, device, per_rank: int, autocast, params, seed: int, batch_loss=None,
                     data_options: dict | None = None, extra_grads: list = (), state_hooks=None) -> tuple[int, dict]:
    """micro_batch_size: auto. The largest divisor of the per-rank batch whose training forward + backward fits
    on the device, tried from the whole per-rank batch down through its divisors, one real training batch each
    (drawn from a stream of its own, seeded apart from the training's), with OPTIMIZER_STATE_SLOTS copies of the
    parameters held aside so that the optimizer's states, allocated at the first step, still fit. An out-of-
    memory error (the strings timm's batch-size retry treats so, bench.measure) moves to the next divisor.
    Afterwards the gradients are cleared and the model's buffers (BatchNorm statistics, BLIP's queues) and the
    RNG states are put back, so the training that follows is the one the chosen micro-batch given by hand
    would run; so are the gradients of `extra_grads` (a method's own tensors) and, with `state_hooks`, the
    caller's own state. `batch_loss(model, batch)` replaces the task's loss, `data_options` go to
    train_batches, as in `train`. Returns (micro_batch_size, {"probed", "tried": [{micro_batch_size, fits}]})."""
    from bench.measure.speed import _is_oom
    dev = torch.device(device)
    if dev.type not in AUTO_PROBE_DEVICES:
        return per_rank, {"probed": False, "tried": [], "why": f"{dev.type}: the per-rank batch, no probe"}
    from bench.train_state import rng_state, set_rng_state
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    outside = [t for _, t in _tensors_outside(model, params)] + list(extra_grads)   # their gradients are state
    outside_grads = [None if t.grad is None else t.grad.detach().clone() for t in outside]
    rng = rng_state()
    caller = state_hooks[0]() if state_hooks is not None else None
    tried = []
    try:
        for m in sorted((d for d in range(1, per_rank + 1) if per_rank % d == 0), reverse=True):
            reserve = None
            try:
                reserve = [torch.empty_like(p) for p in params for _ in range(OPTIMIZER_STATE_SLOTS)]
                batch = next(iter(task.train_batches(m, seed + 7919, recipe=recipe, **(data_options or {}))))
                with autocast():
                    loss = (batch_loss(model, batch) if batch_loss is not None
                            else task.loss(model, batch, device, recipe=recipe))
                loss.backward()
                tried.append({"micro_batch_size": m, "fits": True})
                return m, {"probed": True, "tried": tried}
            except Exception as e:   # noqa: BLE001  (only an out-of-memory error moves on)
                if not _is_oom(e):
                    raise
                tried.append({"micro_batch_size": m, "fits": False})
            finally:
                del reserve
                loss = batch = None
                model.zero_grad(set_to_none=True)
                for t, g in zip(outside, outside_grads):
                    t.grad = None if g is None else g.clone()
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
        raise BenchError(f"training recipe: micro_batch_size auto: not even 1 sample per forward/backward fits on "
                         f"{device}: use a larger GPU, more GPUs, or precision bf16")
    finally:
        with torch.no_grad():
            for n, b in model.named_buffers():
                if n in buffers:
                    b.copy_(buffers[n])
        set_rng_state(rng)
        if caller is not None:
            state_hooks[1](caller)


def check_recipe(recipe: TrainRecipe, task, adapter=None) -> None:
    """Refuse a key set away from its default that the task (data side) or the model adapter (model side)
    does not implement: BenchError naming the key, the task or model and what it implements."""
    changed = recipe.changed_keys()
    task_keys = frozenset(getattr(task, "RECIPE_KEYS", ()) or ())
    missing = sorted(k for k in changed if k in DATA_RECIPE_KEYS and k not in task_keys)
    if missing:
        name = getattr(task, "name", "") or type(task).__name__
        raise BenchError(f"training recipe: task {name} does not implement {', '.join(missing)} (it implements "
                         f"{', '.join(sorted(task_keys)) or 'no data-side keys'}); remove the key(s) or implement "
                         f"them in the task's train_batches/loss")
    model_keys = [k for k in changed if k in MODEL_RECIPE_KEYS]
    if model_keys:
        if adapter is None:
            raise BenchError(f"training recipe: {', '.join(sorted(model_keys))} needs the model adapter, and "
                             f"train() was called without adapter=")
        fam_keys = frozenset(getattr(adapter, "RECIPE_KEYS", ()) or ())
        missing = sorted(k for k in model_keys if k not in fam_keys)
        if missing:
            fam = getattr(adapter, "family", "") or type(adapter).__name__
            raise BenchError(f"training recipe: model family {fam} ({getattr(adapter, 'arch', '?')}) does not "
                             f"implement {', '.join(missing)} (it implements "
                             f"{', '.join(sorted(fam_keys)) or 'no model-side keys'})")


def param_groups(model, recipe: TrainRecipe, adapter=None) -> list[dict]:
    """Optimizer groups. no_norm_bias (timm's rule): no decay for 1-D tensors (norms, scales), biases and the
    names the adapter declares (`no_weight_decay_names`: position embeddings, class tokens); all: every
    trainable tensor decayed (the official BLIP code). Each group carries `names` for inspection."""
    from bench.api import model_no_weight_decay
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if recipe.weight_decay_groups == "all":
        return [{"params": [p for _, p in params], "names": [n for n, _ in params],
                 "weight_decay": recipe.weight_decay}]
    declared = getattr(adapter, "no_weight_decay_names", None)
    skip = set(declared(model)) if declared is not None else model_no_weight_decay(model)
    decay, no_decay = [], []
    for n, p in params:
        (no_decay if p.ndim <= 1 or n.endswith(".bias") or n in skip else decay).append((n, p))
    return [{"params": [p for _, p in decay], "names": [n for n, _ in decay], "weight_decay": recipe.weight_decay},
            {"params": [p for _, p in no_decay], "names": [n for n, _ in no_decay], "weight_decay": 0.0}]


def make_optimizer(groups: list[dict], recipe: TrainRecipe) -> torch.optim.Optimizer:
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=recipe.lr, betas=tuple(recipe.betas))
    return torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum, nesterov=recipe.nesterov)


def _apply_drop_path(model, adapter, rate: float):
    """Set the drop-path rate through the adapter; return an undo that puts back the modules it replaced
    (the rate is the recipe's for this training only: a later training with drop_path none gets the model's
    own, in this process as after reloading the weights)."""
    before = [(m, dict(m._modules)) for m in model.modules()]
    adapter.set_drop_path(model, rate)
    replaced = [(m, k, old, m._modules.get(k)) for m, kids in before for k, old in kids.items()
                if m._modules.get(k) is not old]

    def undo():
        for m, k, old, new in replaced:
            if m._modules.get(k) is new:
                setattr(m, k, old)
    return undo


def resolve_precision(precision: str, device) -> str:
    """The precision a training runs in: auto is bf16 autocast on CUDA (fp32 on a GPU without bf16) and fp32
    elsewhere; bf16 is allowed on CPU too; fp16 needs CUDA (its GradScaler)."""
    dev = torch.device(device).type
    if precision == "auto":
        if dev == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        return "fp32"
    if precision == "fp16" and dev != "cuda":
        raise BenchError(f"training recipe: precision fp16 needs CUDA (float16 autocast with a GradScaler); on "
                         f"{dev} set precision: bf16 or fp32 (or auto) in the dense/finetune block")
    return precision


def _tensors_outside(model, params) -> list:
    """[(name, tensor)] of the tensors set on the model's modules that take gradients but are no parameter of the
    optimizer (a search method's activation masks, `ModelAdapter.attach_unit_masks`), in module order."""
    ids = {id(p) for p in params}
    return [(f"{n}.{k}" if n else k, v) for n, mod in model.named_modules() for k, v in vars(mod).items()
            if isinstance(v, torch.Tensor) and v.requires_grad and id(v) not in ids]


def _grad_tensors_outside(model, params) -> list:
    """Names of tensors that take gradients but are no parameter of the optimizer (a search method's activation
    masks, `ModelAdapter.attach_unit_masks`)."""
    return [n for n, _ in _tensors_outside(model, params)]


def train(model, task, recipe: TrainRecipe | Mapping | None = None, *, device, seed: int,
          log: Callable[[str], None] | None = None, on_step: Callable[[int, int], None] | None = None,
          extra_loss: Callable[[], torch.Tensor] | None = None, adapter=None, phase: str = "train",
          state_dir=None, state_every_steps: int | None = None, state_every_minutes: float | None = None,
          state_hooks: tuple[Callable[[], object], Callable[[object], None]] | None = None, quiet: bool = False,
          micro_batch: int | str | None = None,
          sync_tensors: Callable[[], list] | None = None, sharding: str | None = None,
          batch_loss: Callable[[torch.nn.Module, object], torch.Tensor] | None = None, extra_params: list | None = None,
          clip_tensors: Callable[[], list] | None = None, after_step: Callable[[int, int], None] | None = None,
          data_options: dict | None = None, **recipe_fields) -> dict:
    """Train `model` on `task` as `recipe` says (or the recipe made of the keyword `recipe_fields`: epochs,
    lr, batch_size, ... as in a card's finetune block; an unknown key is a BenchError). `adapter` (the model's
    ModelAdapter) declares the no-decay tensors and implements drop_path. `on_step(step, total)` runs after
    every optimizer step (methods use it to prune gradually or keep masked weights at zero); `extra_loss()` is
    added to the task loss once per optimizer step (e.g. UPop's L1 term on its masks). Raises CellFailure on a
    non-finite loss, so the cell is reported with that reason.

    Precision (`recipe.precision`, see `resolve_precision`): bf16/fp16 run the task's loss under torch.autocast;
    fp16 scales the loss with a GradScaler (and is refused when tensors outside the optimizer take gradients:
    the scaler would leave their gradients scaled). Gradient accumulation (`recipe.micro_batch_size`): each
    optimizer step draws batch_size / micro_batch_size micro-batches from `task.train_batches(micro_batch_size,
    seed)`, back-propagates each loss divided by their number and adds `extra_loss()` undivided on the last
    one, so the step's gradient is the full batch's mean loss + extra, as without accumulation; the steps,
    the lr schedule (steps_per_epoch of the effective batch) and `on_step` are the card's.

    Resume (`bench.train_state`): with `state_dir`, a training-state checkpoint of this `phase` is written there
    every `state_every_steps` optimizer steps and/or `state_every_minutes` minutes (the last two kept); a
    checkpoint found there at the start is resumed from ("resuming <phase> at step k/total from <file>"), and
    the phase's checkpoints are removed when it finishes. `state_hooks=(get_state, set_state)` save and restore
    the caller's own state (a method's masks and accumulated importance) with it. Progress (`bench.progress`):
    a live line on a terminal, plain periodic lines through `log` otherwise, nothing with `quiet`.

    Data parallelism (`bench.distributed`, under torchrun with WORLD_SIZE > 1): the effective batch, the steps
    and the schedule stay the card's. Every rank draws the same global stream of micro-batches of
    `micro_batch_size` (default batch_size / world size) from `task.train_batches(micro, seed)` and keeps
    micro-batch i when i mod world == rank (`bench.distributed.shard`), so an optimizer step sees the same
    samples as one process with that micro-batch; each rank accumulates batch_size / (world x micro) of them
    (`accumulation_steps`, per rank), then the gradients of the optimizer's parameters and of every tensor
    outside it that takes gradients (`_grad_tensors_outside` at the start, e.g. UPop's masks, plus
    `sync_tensors`) are averaged over the ranks (`average_grads`), so every rank takes the same step and the
    same mask decisions. The step's loss is the mean over the ranks, checked for NaN on every rank together.
    Rank 0's parameters are broadcast at the start; ranks > 0 reseed the global RNG (dropout, drop path) with
    seed + 1000003 x rank, and at the end every rank gets rank 0's RNG state back. Checkpoints: rank 0 decides
    when one is due and writes it, with every rank's RNG state; on resume every rank reads the file rank 0
    found. Progress and logs: rank 0 only.

    A method with its own objective and state (VTrans's phase 1) plugs into the same loop, and so gets the
    precision, accumulation, sharding, checkpoints and progress: `batch_loss(net, batch)` replaces
    `task.loss` (net: the module the forward runs on, the sharded copy under fsdp); `data_options` go to the
    task's train_batches (its `subset` to steps_per_epoch too); `extra_params` (tensors outside the model, e.g. a
    learned layer map) are trained by the optimizer as one more group with the recipe's weight decay and kept
    whole on every rank, their gradients averaged; `clip_tensors()` are clipped together with the optimizer's
    parameters; `after_step(step, total)` runs after the optimizer step (and `on_step`) on every rank without
    the model being gathered (a method's own optimizers step there).

    Returns {steps, epochs, final_loss (mean over the last epoch's steps), seconds, optimizer, lr_first,
    lr_last, precision, micro_batch_size, accumulation_steps, world_size, ...; resumed_from_step when resumed}."""
    from bench.progress import Progress
    from bench.train_state import TrainState, fingerprint, rng_state, set_rng_state
    recipe = as_recipe(recipe, **recipe_fields)
    if micro_batch is not None:   # --micro-batch: how the run is carried out, the card's effective batch kept
        recipe = recipe.model_copy(update={"micro_batch_size": micro_batch})
    if sharding is not None:      # --sharding: how the run is carried out (bench.sharding), the card's recipe kept
        recipe = recipe.model_copy(update={"sharding": sharding})
    check_recipe(recipe, task, adapter)
    precision = resolve_precision(recipe.precision, device)
    from bench import distributed as dist
    world, rank = dist.world_size(), dist.rank()
    main = rank == 0
    from bench.sharding import ShardedTwin, check_sharding
    sharded = check_sharding(recipe.sharding, precision, world, phase)
    sharding_note = (f"{phase}: sharding {recipe.sharding} ignored in one process (world size 1)"
                     if recipe.sharding != sharded else None)
    if sharding_note is not None and log is not None:
        log(sharding_note)
    auto = recipe.micro_batch_size == "auto"
    micro = recipe.batch_size if auto else (recipe.micro_batch_size or recipe.batch_size)
    if recipe.batch_size % micro:      # a TrainRecipe refuses it already; a hand-made one too
        raise BenchError(f"training recipe: micro_batch_size {micro} does not divide batch_size {recipe.batch_size}")
    if world > 1:
        if recipe.micro_batch_size is None or auto:
            micro = recipe.batch_size // world
        if micro < 1 or recipe.batch_size % (world * micro):
            fix = (f"set micro_batch_size to a divisor of {recipe.batch_size // world} (= batch_size / {world})"
                   if recipe.batch_size % world == 0 else
                   f"run on a number of processes that divides batch_size {recipe.batch_size}")
            raise BenchError(f"training recipe ({phase}): batch_size {recipe.batch_size} is not divisible by world "
                             f"size {world} x micro_batch_size {micro}: each of the {world} ranks takes batch_size / "
                             f"{world} samples per optimizer step in micro-batches of micro_batch_size; {fix}")
    accum = recipe.batch_size // (micro * world)
    data_options = dict(data_options or {})
    steps_per_epoch = task.steps_per_epoch(recipe.batch_size, **{k: v for k, v in data_options.items() if k == "subset"})
    total, _, _ = schedule_units(recipe, steps_per_epoch)
    groups = param_groups(model, recipe, adapter)
    stats_groups = {"decay": sum(len(g["params"]) for g in groups if g["weight_decay"]),
                    "no_decay": sum(len(g["params"]) for g in groups if not g["weight_decay"])}
    extra_params = list(extra_params or [])
    if extra_params:
        groups.append({"params": extra_params, "names": [f"extra.{i}" for i in range(len(extra_params))],
                       "weight_decay": recipe.weight_decay})
    for g in groups:
        del g["names"]
    opt = make_optimizer(groups, recipe)
    params = [p for g in groups for p in g["params"]]
    scaler = None
    if precision == "fp16":
        outside = _grad_tensors_outside(model, params)
        if outside:
            raise BenchError(f"training recipe: precision fp16 would leave the gradients of {len(outside)} tensors "
                             f"outside the optimizer scaled by the GradScaler ({', '.join(outside[:3])}...: a "
                             f"search method's masks); use precision: bf16")
        scaler = torch.amp.GradScaler("cuda")
    dev_type = torch.device(device).type
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = (lambda: torch.autocast(dev_type, dtype=amp_dtype)) if amp_dtype is not None else contextlib.nullcontext
    undo = _apply_drop_path(model, adapter, recipe.drop_path) if recipe.drop_path is not None else None
    model.to(device).train()
    twin, offloaded = None, False
    outside_tensors = [t for _, t in _tensors_outside(model, params)]
    if sharded == "fsdp" and total:   # bench.sharding: a fully-sharded twin trains; `model` gets its weights at the end
        dist.broadcast_module(model)   # every rank starts from rank 0's weights (and copies its own shards from them)
        twin = ShardedTwin(model, adapter, device, outside_tensors, phase)
        opt = make_optimizer(twin.twin_groups(opt.param_groups), recipe)
        params = [p for g in opt.param_groups for p in g["params"]]
        model.zero_grad(set_to_none=True)
        if dev_type != "cpu" and on_step is None:   # nothing reads the whole model during the phase: off the GPU
            model.to("cpu")
            offloaded = True
    net = twin.module if twin is not None else model   # the module the forward runs on
    probe = None
    if auto and total:   # the largest micro-batch that fits, the same on every rank; the accumulation follows
        own = (list(sync_tensors()) if sync_tensors is not None else []) + \
            (list(clip_tensors()) if clip_tensors is not None else [])
        micro, probe = auto_micro_batch(net, task, recipe, device, micro, autocast, params, seed, batch_loss=batch_loss,
                                        data_options=data_options, extra_grads=own, state_hooks=state_hooks)
        micro = -int(dist.all_reduce_max(torch.tensor([-micro])).item())
        accum = recipe.batch_size // (micro * world)
        if log is not None and probe["probed"]:
            log(f"{phase}: micro_batch_size auto -> {micro} (tried {', '.join(str(t['micro_batch_size']) + (' fits' if t['fits'] else ' out of memory') for t in probe['tried'])}); {accum} accumulation step(s) per optimizer step")
    synced = []   # data parallel: the tensors whose gradients are averaged over the ranks after each step
    if world > 1:
        log = log if main else None
        if twin is None:
            dist.broadcast_module(model)   # every rank starts from rank 0's weights
            synced = params + outside_tensors
        else:   # FSDP reduces the sharded gradients; the replicated 0-dim parameters and the masks are averaged here
            synced = twin.replicated + outside_tensors + extra_params
        if rank:   # each rank its own dropout / drop-path draws (the data order is the global one, sharded)
            torch.manual_seed(seed + 1000003 * rank)
    t0 = time.perf_counter()
    losses, lrs, clipped = [], [], 0
    start, drawn, seconds_before, resumed = 0, 0, 0.0, {}
    store = (TrainState(state_dir, phase, state_every_steps or 0, state_every_minutes or 0.0, log=log)
             if state_dir is not None and total else None)
    fp = (fingerprint(phase, recipe, total, steps_per_epoch, accum, seed, precision, dev_type, world=world)
          if store is not None else None)
    progress = None
    try:
        batches = dist.rank_batches(task, micro, seed, recipe=recipe, **data_options) if total else iter(())
        found = store.latest(fp) if store is not None and main else None
        if twin is not None and store is not None:   # rank 0 alone reads the file; the rest reaches the others
            head = dist.broadcast_object(None if found is None else (
                {k: v for k, v in found[0].items() if k not in ("model", "optimizer")}, str(found[1])))
            if head is not None:
                from pathlib import Path
                if main:
                    model.load_state_dict(found[0]["model"])
                dist.broadcast_module(model)     # the weights, tensor by tensor; each rank copies its shards
                twin.push()
                twin.load_optimizer_state(opt, found[0]["optimizer"] if main else None)
                found = (head[0], Path(head[1]))
        elif world > 1 and store is not None:   # the checkpoint rank 0 found, read by every rank
            where = dist.broadcast_object(str(found[1]) if found is not None else None)
            if where is not None and not main:
                from pathlib import Path
                found = (torch.load(where, map_location="cpu", weights_only=True), Path(where))
        if found is not None:
            state, path = found
            if twin is None:   # (sharded: loaded above)
                model.load_state_dict(state["model"])
                opt.load_state_dict(state["optimizer"])
            if scaler is not None and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            start, drawn = state["step"], state["batches_drawn"]
            losses, lrs, clipped = list(state["losses"]), list(state["lrs"]), state["clipped"]
            seconds_before = state["seconds"]
            tr = time.perf_counter()
            for _ in range(drawn):     # the iterator's position: made again from the seed, replayed
                next(batches)
            by_rank = state.get("rng_by_rank")
            set_rng_state(by_rank[rank] if by_rank is not None and rank < len(by_rank) else state["rng"])
            if state_hooks is not None:
                state_hooks[1](state["hooks"])
            resumed = {"resumed_from_step": start, "resume_replay_s": round(time.perf_counter() - tr, 3)}
            msg = (f"resuming {phase} at step {start}/{total} from {path} (replayed {drawn} batches in "
                   f"{resumed['resume_replay_s']:.1f} s)")
            if log is not None:
                log(msg)
            elif main:
                print(msg, file=sys.stderr, flush=True)
        progress = Progress(phase, total, recipe.batch_size, log=log, quiet=quiet or not main, start=start)
        for step in range(start, total):
            cur = lr_at(step, recipe, steps_per_epoch)
            for g in opt.param_groups:
                g["lr"] = cur
            opt.zero_grad(set_to_none=True)
            hook = getattr(task, "on_train_step", None)   # TaskAdapter.on_train_step (a duck-typed task may lack it)
            if hook is not None:
                hook(net, step, steps_per_epoch, recipe)
            step_loss = 0.0
            for i in range(accum):
                batch = next(batches)
                drawn += 1
                with autocast():
                    loss = (batch_loss(net, batch) if batch_loss is not None
                            else task.loss(net, batch, device, recipe=recipe))
                if accum > 1:
                    loss = loss / accum
                if extra_loss is not None and i == accum - 1:
                    loss = loss + extra_loss()
                if world == 1 and not torch.isfinite(loss):
                    where = f" (micro-batch {i + 1}/{accum})" if accum > 1 else ""
                    raise CellFailure(f"non-finite loss ({loss.item()}) at step {step}/{total}{where}")
                (scaler.scale(loss) if scaler is not None else loss).backward()
                step_loss += loss.item()
            if twin is not None and step == start and twin.caller_grads():
                leaked = twin.caller_grads()
                names = ", ".join(leaked[:3]) + (", ..." if len(leaked) > 3 else "")
                raise BenchError(f"training recipe ({phase}): sharding fsdp: the model's own parameters got gradients "
                                 f"outside the sharded copy ({names}): this phase's extra_loss reads the weights (e.g. "
                                 f"an ADMM penalty), which the sharded copy would not train; run this phase with "
                                 f"sharding: none")
            if world > 1:   # the step's loss is the mean over the ranks; all ranks stop together on a NaN
                per_rank = dist.per_rank_values(step_loss)
                bad = [r for r, v in enumerate(per_rank) if not math.isfinite(v)]
                if bad:
                    raise CellFailure(f"non-finite loss at step {step}/{total} on rank(s) "
                                      f"{', '.join(map(str, bad))} of {world} ({[per_rank[r] for r in bad]})")
                step_loss = sum(per_rank) / world
                dist.average_grads(synced + (list(sync_tensors()) if sync_tensors is not None else []))
            if recipe.clip_grad is not None:
                if scaler is not None:
                    scaler.unscale_(opt)
                clipped_set = params + (list(clip_tensors()) if clip_tensors is not None else [])
                norm = (twin.clip_grad_norm_(clipped_set, recipe.clip_grad) if twin is not None
                        else torch.nn.utils.clip_grad_norm_(clipped_set, recipe.clip_grad))
                clipped += int(bool(norm > recipe.clip_grad))
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            if on_step is not None:
                if twin is not None:   # on_step reads and may change the model: whole for it, its changes sharded again
                    twin.pull()
                on_step(step, total)
                if twin is not None:
                    twin.push()
            if after_step is not None:
                after_step(step, total)
            losses.append(step_loss)
            lrs.append(cur)
            le = recipe.log_every
            if log and le and (step + 1) % le == 0:
                progress.write(f"step {step + 1}/{total} loss {sum(losses[-le:]) / le:.4f} lr {cur:.2e}")
            progress.update(step + 1, step_loss, cur)
            if store is not None and dist.agree(store.due(step + 1, total) if main else False):
                rngs = dist.all_gather_object(rng_state()) if world > 1 else None
                opt_state = None
                if twin is not None:   # the non-sharded checkpoint: the whole weights and optimizer states, gathered
                    if on_step is None:
                        twin.pull()
                    opt_state = twin.gather_optimizer_state(opt)
                if main:
                    store.save({"fingerprint": fp, "step": step + 1, "batches_drawn": drawn,
                                "model": model.state_dict(),
                                "optimizer": opt_state if twin is not None else opt.state_dict(),
                                "scaler": scaler.state_dict() if scaler is not None else None, "rng": rng_state(),
                                "losses": losses, "lrs": lrs, "clipped": clipped,
                                "seconds": seconds_before + time.perf_counter() - t0,
                                "hooks": state_hooks[0]() if state_hooks is not None else None,
                                **({"rng_by_rank": rngs} if rngs is not None else {})}, step + 1)
        if twin is not None:   # the trained weights, whole, into the caller's model on every rank
            twin.pull()
    finally:
        if progress is not None:
            progress.close()
        if undo is not None:
            undo()
        if twin is not None:   # the sharded copy and its optimizer go; the model is back where it was
            twin.close()
            twin = net = opt = params = synced = None
            if offloaded:
                model.to(device)
    if store is not None and main:
        store.clear()
    if world > 1:
        dist.sync_rng()   # outside the phase every rank draws the same numbers again
    model.eval()
    tail = losses[-max(1, steps_per_epoch):]
    stats = {"steps": total, "epochs": recipe.epochs, "final_loss": sum(tail) / len(tail) if tail else None,
             "seconds": seconds_before + time.perf_counter() - t0, "optimizer": recipe.optimizer,
             "lr_first": lrs[0] if lrs else None, "lr_last": lrs[-1] if lrs else None,
             "param_groups": stats_groups, "precision": precision, "micro_batch_size": micro,
             "accumulation_steps": accum, "world_size": world, "sharding": sharded, **resumed,
             **({"sharding_note": sharding_note} if sharding_note is not None else {}),
             **({"micro_batch_probe": probe} if probe is not None else {})}
    if recipe.clip_grad is not None:
        stats["clipped_steps"] = clipped
    if recipe.drop_path is not None:
        stats["drop_path"] = recipe.drop_path
    return stats
