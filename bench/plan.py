"""`python -m bench plan`: what a table costs before it runs, counted on the `meta` device (no data, no weights).

For every cell of a card under a profile (`bench.runner.expand_cells`) the plan lists its training phases, and
for each phase: optimizer steps, training MACs, GPU-hours, peak memory per GPU and the micro-batch / gradient
accumulation that the card's effective batch needs on --gpus GPUs. Nothing trains, nothing is read from disk.

What is exact and what is estimated
-----------------------------------
- **Optimizer steps** (exact given the training-set size): `epochs x steps per epoch`, steps per epoch =
  `train_size // batch_size` (the last partial batch is dropped), at least 1, rounded as
  `bench.training.schedule_units` rounds: `max(1, round(epochs x steps_per_epoch))`, 0 for 0 epochs. Phases:
  the profile's `dense:` recipe (shared by the cells that use the same dense model: counted once, on its own
  line), the method's own training (UPop's search: `upop.search_epochs` at `upop.batch_size`; GOHSP's ADMM
  stage: `gohsp.admm_epochs` at `gohsp.batch_size`, plus its calibration forwards; VTrans's phase 1:
  `vtrans.epochs` at `vtrans.batch_size` on `subset` of the data; SGMP's gradual run: the finetune budget on the
  masked, still dense-size model) and the finetune after extraction (`finetune:`, per-ratio budgets included).
- **Training-set size**: tasks count it only with the data on disk, so a profile that reads a folder uses the
  public size the task declares (`TaskAdapter.public_train_size(data)`: samples per epoch under the cell's
  `data:` settings, with its source; "approximate" where the number is not exact); a synthetic (micro) profile
  asks the task (its generator is small and cached); `--train-size N` overrides both.
- **Training MACs per optimizer step** (estimate): `3 x forward MACs of one sample x effective batch`: the
  backward pass costs about 2x the forward (activation gradients + weight gradients), the usual convention
  (Kaplan et al. 2020: 6 FLOPs per parameter per token = 3 x the 2N forward). A phase whose weights are frozen
  (Faster-VTrans) costs 2x (no weight gradients); a distillation teacher adds 1x (forward only); calibration
  forwards cost 1x. The forward is the suite's own counter (`bench.measure.count_macs`, fvcore convention:
  1 multiply-add = 1 MAC, attention matmuls and norms included, element-wise ops free) on `meta`, of the
  paper-protocol forward of one sample (`task.flops_forwards`, first entry), except where the task says that
  is not one training sample and gives its own (`TaskAdapter.plan_train_forward`: a protocol of many questions
  cut to one, a training window of another length than the evaluation window, a full-length sequence as an
  upper bound; the task's docstring says which and why). A protocol forward that includes modules which run
  forward only in training (momentum encoders) is overcounted by the 3x convention: the task's
  `flops_forwards` says so where it applies.
  The dense model's MACs are used for dense phases (dense training, UPop's search, GOHSP's ADMM, VTrans's
  phase 1, SGMP's gradual run); after extraction the MACs of a model pruned on `meta` are used: every unit
  group of the method's kinds (head_dim or head, and ffn) keeps the same fraction of its units, chosen so that
  p of the ratio's basis (prunable or total params) is removed. The methods allocate the budget non-uniformly
  across layers, so this is an estimate; for transformers whose layers see the same token count, linear-layer
  MACs scale with their params and the allocation changes little. `dense MACs x (1 - p)` would be a lower
  bound (embeddings, heads and norms are not pruned), the dense MACs an upper bound.
- **GPU-hours** (estimate): `2 x MACs` FLOPs / (utilization x peak dense bf16 FLOP/s); defaults 40% of an
  A100's 312 TFLOPS. Evaluation, data loading and checkpointing are not counted. **Wall-clock** with --gpus N:
  GPU-hours / the ranks (the largest count up to N that divides the phase's batch; perfect data-parallel
  scaling), cells one after another.
- **Peak memory per GPU** (estimate): mixed precision with fp32 master weights: 16 bytes per trained param
  (fp32 weights 4 + fp32 grads 4 + AdamW exp_avg 4 + exp_avg_sq 4) + 2 bytes per param for the bf16 weight
  copies autocast keeps during the forward; a frozen param 4 + 2 bytes; a distillation teacher 4 bytes per
  param (fp32, no grads; none where the weights are frozen: VTrans's teacher is then the student without its
  masks); GOHSP's ADMM Z and U 8 bytes per prunable param. Activations per sample: the bytes of
  every distinct module output of one forward on `meta` (forward hooks; floating tensors; numel x 2 bytes,
  bf16), which approximates what autograd keeps for the backward: DeiT-S gives 33 MiB per image, LLaMA-2-7B
  2,096 MiB per 512-token window, against 29-43 MiB and 2,176-3,454 MiB by Korthikanti et al.'s (2022)
  per-layer 34sh bytes (flash attention) to 34sh + 5as^2 bytes (attention scores kept). Usable memory = 90% of
  --gpu-memory (CUDA context, allocator fragmentation, kernel workspaces). Largest micro-batch =
  floor((usable - state) / activations per sample); when the state alone does not fit, FSDP full sharding
  (state / N per GPU: the recipe key `sharding: fsdp`, bench.sharding) is tried, over the N = the largest GPU
  count up to --gpus that divides the phase's batch (the training loop gives each rank batch / N samples per
  step, so a batch-1 phase runs on one GPU and cannot be sharded), plus the model's whole fp32 copy
  (4 bytes per param) for phases whose per-step callback reads the model (UPop's search, SGMP's gradual run, a
  finetune with selection paper; VTrans's phase 1 shards its teacher with the student and reads neither whole);
  phases that cannot be sharded (GOHSP's ADMM, whose penalty reads the weights; Faster-VTrans, which trains no
  weight) are not. Gradient accumulation = ceil(per-GPU share of
  the batch / largest micro-batch).

Published costs this plan is compared with (in the output's notes)
-------------------------------------------------------------------
- DeiT (Touvron et al., ICML 2021, §5.6 "Training time"; checked in a secondary summary of the paper, the GPU
  model from memory): "DeiT-S and DeiT-Ti are trained in less than 3 days on 4 GPUs" for 300 epochs (the
  README's command: 4 GPUs x batch 256), DeiT-B in 53 hours on one node of 8 GPUs (37 hours on 2 nodes);
  V100 GPUs (the README's `--use_volta32`), AMP fp16 (V100 tensor-core peak 125 TFLOPS). The plan's count for
  DeiT-S 300 epochs (4.61 GMACs x 3 x 2 x 300 x 1,281,167 samples = 1.06e19 FLOPs) is 59 V100-hours at 40%,
  against < 288 V100-hours published (4 GPUs x < 72 h): the estimate at 40% is about 5x below the published
  bound, i.e. the published run used at most ~8% of the V100's fp16 peak (data loading and augmentation-bound
  on 4 GPUs; DeiT-B's 424 V100-hours imply ~21%). Use --utilization 0.1 to plan like the DeiT runs.
- UPop (Shi et al., ICML 2023): the README gives the commands for 8 A100 GPUs and no training time; no
  published duration is known to this suite, so none is compared.
"""
from __future__ import annotations

import json
import math

import torch
from torch import nn

from bench.errors import BenchError

# ---------------------------------------------------------------------------------------------
# conventions

TRAIN_FACTOR = 3          # forward + backward (~2x forward) per sample
FROZEN_FACTOR = 2         # forward + activation gradients (weights frozen)
FLOPS_PER_MAC = 2
TRAINED_STATE_BYTES = 16  # fp32 weights + fp32 grads + AdamW exp_avg + exp_avg_sq
AUTOCAST_COPY_BYTES = 2   # bf16 weight copies autocast caches during the forward
FROZEN_STATE_BYTES = 4    # fp32 weights of a frozen model (teacher, frozen student)
ADMM_BYTES = 8            # GOHSP: Z and U, fp32, per prunable param
ACT_BYTES = 2             # bf16 activations
HEADROOM = 0.9            # usable fraction of the GPU's memory
GIB = 2 ** 30

DEFAULT_GPUS = 1
DEFAULT_GPU_MEMORY = 80.0     # GiB (an "80GB" A100 has 80 x 2^30 bytes)
DEFAULT_UTILIZATION = 0.4
DEFAULT_GPU_TFLOPS = 312.0    # A100 dense bf16 tensor-core peak

def optimizer_steps(epochs: float, train_size: int, batch_size: int) -> int:
    """Optimizer steps of `epochs` passes over `train_size` samples at `batch_size` per step, as
    `bench.training` counts them: steps per epoch = train_size // batch_size (at least 1), total =
    max(1, round(epochs x steps per epoch)), 0 for 0 epochs."""
    if epochs <= 0:
        return 0
    spe = max(1, int(train_size) // int(batch_size))
    return max(1, int(round(float(epochs) * spe)))


def train_macs_per_step(forward_macs_per_sample: int, batch_size: int, factor: int = TRAIN_FACTOR) -> int:
    """Training MACs of one optimizer step: factor (3: forward + backward) x forward MACs x effective batch."""
    return int(factor) * int(forward_macs_per_sample) * int(batch_size)


def gpu_hours(macs: float, utilization: float, gpu_tflops: float) -> float:
    return FLOPS_PER_MAC * float(macs) / (utilization * gpu_tflops * 1e12) / 3600.0


# ---------------------------------------------------------------------------------------------
# memory

def peak_memory_bytes(state_bytes: float, act_bytes_per_sample: float, micro_batch: int) -> float:
    """Estimated peak memory of one training micro-batch: the state (params, grads, optimizer, copies)
    + micro_batch x the activations of one sample."""
    return float(state_bytes) + int(micro_batch) * float(act_bytes_per_sample)


def largest_micro_batch(state_bytes: float, act_bytes_per_sample: float, gpu_memory_gib: float) -> int:
    """The largest micro-batch whose estimated peak fits in HEADROOM x gpu_memory_gib (0: none fits)."""
    usable = HEADROOM * float(gpu_memory_gib) * GIB
    if act_bytes_per_sample <= 0:
        return 0 if state_bytes > usable else 1 << 30
    return max(0, int(math.floor((usable - state_bytes) / act_bytes_per_sample)))


def fit_batch(state_bytes: float, act_bytes_per_sample: float, batch_size: int, gpus: int,
              gpu_memory_gib: float, no_sharding: str | None = None, whole_bytes: float = 0.0) -> dict:
    """Micro-batch and gradient accumulation for an effective batch on `gpus` GPUs.
    DDP (state replicated) if it fits, else FSDP full sharding (state / gpus, plus `whole_bytes` replicated: the
    model's whole copy a per-step callback reads), unless `no_sharding` says why the phase cannot be sharded,
    else it does not fit. The ranks are the largest number of GPUs up to `gpus` that divides the batch (the
    training loop refuses a world size that does not: each rank takes batch / world samples per step), so a
    batch-1 phase runs on one GPU, its state not shardable."""
    n_eff = max(d for d in range(1, max(1, min(int(gpus), int(batch_size))) + 1) if int(batch_size) % d == 0)
    share = math.ceil(int(batch_size) / n_eff)
    mode, state = "ddp", float(state_bytes)
    max_micro = largest_micro_batch(state, act_bytes_per_sample, gpu_memory_gib)
    if max_micro < 1 and n_eff > 1 and not no_sharding:
        mode, state = "fsdp", state_bytes / n_eff + whole_bytes
        max_micro = largest_micro_batch(state, act_bytes_per_sample, gpu_memory_gib)
    if max_micro < 1:
        if no_sharding is None and n_eff < 2 <= gpus:
            no_sharding = f"a batch of {batch_size} cannot be split over {gpus} ranks"
        return {"fits": False, "mode": mode, "no_sharding": no_sharding, "state_bytes": state,
                "act_bytes": act_bytes_per_sample,
                "share": share, "max_micro": 0, "micro": None, "accum": None,
                "peak_bytes": peak_memory_bytes(state, act_bytes_per_sample, 1), "gpus_used": n_eff}
    accum = math.ceil(share / max_micro)
    micro = math.ceil(share / accum)
    return {"fits": True, "mode": mode, "state_bytes": state, "act_bytes": act_bytes_per_sample, "share": share,
            "max_micro": max_micro, "micro": micro, "accum": accum, "gpus_used": n_eff,
            "peak_bytes": peak_memory_bytes(state, act_bytes_per_sample, micro)}


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def activation_bytes(model: nn.Module, args: tuple, kwargs: dict | None = None, bytes_per_elem: int = ACT_BYTES) -> int:
    """Activation bytes of one forward: every distinct floating tensor that a module returns (forward hooks on
    every module, a tensor passed through several modules counted once), numel x bytes_per_elem. Runs on any
    device including `meta` (eval mode, no grad; the train/eval flags are restored)."""
    from bench.measure import eval_mode
    seen: dict = {}
    alive = []   # keep the outputs alive so that their ids are not reused during the forward

    def hook(_mod, _inp, out):
        for t in _tensors(out):
            if t.is_floating_point() and id(t) not in seen:
                seen[id(t)] = t.numel()
                alive.append(t)

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with eval_mode(model), torch.no_grad():
            model(*args, **(kwargs or {}))
    finally:
        for h in handles:
            h.remove()
    return int(sum(seen.values())) * int(bytes_per_elem)


# ---------------------------------------------------------------------------------------------
# the per-sample training forward

def train_forward(task, config: dict, device) -> tuple:
    """(label, (args, kwargs)) of one training sample's forward: the task's `plan_train_forward(config, device)`,
    or where it gives None, the paper FLOPs protocol (the first `flops_forwards` entry)."""
    own = task.plan_train_forward(config, device)
    if own is not None:
        return own
    label, fw = next(iter(task.flops_forwards(config, device).items()))
    return label, fw


# ---------------------------------------------------------------------------------------------
# models on meta: params, forward MACs and activations, dense and pruned

PRUNE_KINDS = ("head_dim", "head", "ffn")


def _prune_kinds(available, method_kinds) -> list:
    """The unit kinds pruned on meta: the method's (head_dim or head, ffn) where the model has them, else
    head_dim (or head) and ffn. head and head_dim cut the same matrices: head_dim wins."""
    base = tuple(method_kinds or ("head_dim", "ffn"))
    want = [k for k in base if k in PRUNE_KINDS and k in available]
    if "head_dim" in want and "head" in want:
        want.remove("head")
    if "head_dim" in base and "head_dim" not in available and "head" in available and "head" not in want:
        want.insert(0, "head")
    if not want:
        want = [k for k in ("head_dim", "ffn") if k in available] or [k for k in ("head", "ffn") if k in available]
    return want


def _uniform_keep(structure, frac_removed: float) -> dict:
    keep = {}
    for g in structure:
        n = max(min(g.min_keep, g.size), g.size - int(round(frac_removed * g.size)))
        k = torch.zeros(g.size, dtype=torch.bool)
        k[:n] = True
        keep[g.name] = k
    return keep


def prune_on_meta(model: nn.Module, adapter, p: float, basis: str = "prunable", method_kinds=None) -> dict:
    """Extract `model` (on meta) in place with every unit group of the chosen kinds keeping the same fraction,
    so that p of the basis (the chosen kinds' params, or all params) is removed. Returns what was done."""
    from bench.measure import count_params
    from bench.structure import extract, kept_param_count

    full = adapter.structure(model)
    kinds = _prune_kinds(full.kinds(), method_kinds)
    st = adapter.structure(model, kinds)
    total = count_params(model)
    prunable = kept_param_count(model, st, st.full_keep())["prunable_dense"]
    target = p * (total if basis == "total" else prunable)

    def removed(f):
        return kept_param_count(model, st, _uniform_keep(st, f))["removed"]

    if basis == "total":
        lo, hi = 0.0, 1.0
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if removed(mid) < target else (lo, mid)
        f = (lo + hi) / 2
    else:
        f = p
    keep = _uniform_keep(st, f)
    got = removed(f)
    extract(model, adapter, st, keep, {})
    return {"kinds": kinds, "fraction_removed": f, "removed": got, "target": target, "basis": basis}


class ModelCosts:
    """Params, forward MACs and activation bytes of one training sample, dense or pruned, cached."""

    def __init__(self):
        self._cache: dict = {}
        self._models: dict = {}

    def get(self, arch: str, config: dict, task, task_name: str, prune: dict | None = None) -> dict:
        from bench.registry import MODELS

        if prune is not None:   # the same effective kinds, p and basis give the same pruned model
            kinds = _prune_kinds(MODELS.get(arch)[0].UNIT_KINDS, prune.get("kinds"))
            prune = {"p": float(prune["p"]), "basis": prune.get("basis", "prunable"), "kinds": kinds}
        cfg_key = json.dumps(config, sort_keys=True, default=str)
        key = (arch, cfg_key, task_name, id(task), json.dumps(prune, sort_keys=True))
        if key not in self._cache:
            self._cache[key] = self._count(arch, config, cfg_key, task, prune)
        return self._cache[key]

    def _dense_model(self, arch, config, cfg_key):
        """A fresh copy of the architecture built on meta (built once, copied: building is the slow part)."""
        import copy

        from bench.registry import MODELS
        if (arch, cfg_key) not in self._models:
            cls, _ = MODELS.get(arch)
            adapter = cls(arch, config)
            with torch.device("meta"):
                self._models[(arch, cfg_key)] = (adapter, adapter.build())
        adapter, model = self._models[(arch, cfg_key)]
        return adapter, copy.deepcopy(model)

    def _count(self, arch, config, cfg_key, task, prune):
        import warnings

        from bench.measure import count_macs, count_params
        from bench.structure import kept_param_count

        meta = torch.device("meta")
        adapter, model = self._dense_model(arch, config, cfg_key)
        out = {"prune": None, "note": None}
        dense_params = count_params(model)
        if prune is not None:
            try:
                st = adapter.structure(model, _prune_kinds(adapter.structure(model).kinds(), prune.get("kinds")))
                out["prunable_params"] = kept_param_count(model, st, st.full_keep())["prunable_dense"]
                out["prune"] = prune_on_meta(model, adapter, prune["p"], prune.get("basis", "prunable"),
                                             prune.get("kinds"))
            except Exception as e:  # noqa: BLE001 - an adapter that cannot extract on meta: dense = upper bound
                out["note"] = f"pruning on meta failed ({type(e).__name__}: {e}); dense MACs used (upper bound)"
                adapter, model = self._dense_model(arch, config, cfg_key)
        else:
            try:
                st = adapter.structure(model)
                out["prunable_params"] = kept_param_count(model, st, st.full_keep())["prunable_dense"]
            except Exception:  # noqa: BLE001
                out["prunable_params"] = dense_params
        label, (args, kwargs) = train_forward(task, config, meta)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out["fwd_macs"] = count_macs(model, args, kwargs)["macs"]
            out["act_bytes"] = activation_bytes(model, args, kwargs)
        out.update(params=count_params(model), dense_params=dense_params, forward=label)
        return out


# ---------------------------------------------------------------------------------------------
# phases of a cell

def _method_phases(cfg: dict) -> list:
    """[(name, epochs, batch, model "dense"|"pruned", dict of extras)] of a cell's training, in order."""
    from bench.registry import METHODS

    m = cfg["method"]
    cls = METHODS.get(m)
    s = cfg.get("method_settings") or {}
    o = dict(cfg.get("method_options") or {})
    ft = cfg.get("finetune")
    phases = []
    finetune = bool(cls.finetune)
    key = cls.settings_key or m
    if key == "upop":
        phases.append(("search", float(s["search_epochs"]), int(s["batch_size"]), "dense", {"whole_copy": True}))
    elif key == "gohsp":
        bs = s.get("batch_size") or (ft["batch_size"] if ft else 64)
        phases.append(("calibration", None, int(s["calib_batch_size"]), "dense",
                       {"forward_only": True, "batches": int(s["calib_batches"])}))
        phases.append(("admm", float(s["admm_epochs"]), int(bs), "dense",
                       {"admm": True, "no_sharding": "GOHSP's ADMM penalty reads the weights"}))
    elif "epochs" in s and "batch_size" in s and m.endswith("vtrans"):
        o.update({k: v for k, v in s.items() if k in o and v is not None})   # profile overrides of options
        finetune = bool(o.get("weight_finetune", True))
        frozen, teacher = not o.get("train_weights", True), o.get("distill", "logits+hidden") != "none"
        phases.append(("phase1", float(s["epochs"]), int(s["batch_size"]), "dense",
                       {"subset": o.get("subset"), "frozen": frozen, "teacher": teacher,
                        # frozen weights: the teacher is the student without its masks (no copy), nothing to shard
                        "teacher_copy": teacher and not frozen,
                        **({"no_sharding": "Faster-VTrans trains no weight: nothing to shard"} if frozen else {})}))
    if cls.uses_finetune_budget and not cls.finetune and ft:   # SGMP: the gradual run is the finetune, dense-size
        phases.append(("gradual", float(ft["epochs"]), int(ft["batch_size"]), "dense", {"whole_copy": True}))
    elif finetune and ft:
        phases.append(("finetune", float(ft["epochs"]), int(ft["batch_size"]), "pruned",
                       {"whole_copy": ft.get("selection") == "paper"}))
    return phases


def _basis(cfg: dict) -> str:
    o = cfg.get("method_options") or {}
    s = cfg.get("method_settings") or {}
    if s.get("ratio_basis"):
        return s["ratio_basis"]
    return o.get("ratio_basis") or cfg.get("ratio_basis") or "prunable"


def _phase_cost(name, epochs, batch, extras, costs, train_n, settings) -> dict:
    util, tflops, gpus, mem = settings["utilization"], settings["gpu_tflops"], settings["gpus"], settings["gpu_memory"]
    n = train_n
    if extras.get("subset"):
        n = max(1, int(round(float(extras["subset"]) * train_n)))
    if extras.get("forward_only"):
        steps, samples, factor = 0, extras["batches"] * batch, 1
    else:
        steps = optimizer_steps(epochs, n, batch)
        samples = steps * batch
        factor = FROZEN_FACTOR if extras.get("frozen") else TRAIN_FACTOR
    teacher_macs = costs["fwd_macs"] if extras.get("teacher") else 0
    macs_per_sample = factor * costs["fwd_macs"] + teacher_macs
    macs = macs_per_sample * samples
    params = costs["params"]
    if extras.get("forward_only"):
        state = params * (FROZEN_STATE_BYTES + AUTOCAST_COPY_BYTES)
    elif extras.get("frozen"):
        state = params * (FROZEN_STATE_BYTES + AUTOCAST_COPY_BYTES)
    else:
        state = params * (TRAINED_STATE_BYTES + AUTOCAST_COPY_BYTES)
    if extras.get("teacher_copy"):
        state += params * FROZEN_STATE_BYTES
    if extras.get("admm"):
        state += costs.get("prunable_params", params) * ADMM_BYTES
    fit = fit_batch(state, costs["act_bytes"], batch, gpus, mem, no_sharding=extras.get("no_sharding"),
                    whole_bytes=params * FROZEN_STATE_BYTES if extras.get("whole_copy") else 0.0)
    gh = gpu_hours(macs, util, tflops)
    return {"name": name, "epochs": epochs, "batch": batch, "train_size": n, "steps": steps,
            "steps_per_epoch": None if extras.get("forward_only") else max(1, n // batch),
            "samples": samples, "factor": factor, "teacher": bool(teacher_macs), "fwd_macs": costs["fwd_macs"],
            "macs_per_step": (macs_per_sample * batch) if steps else None, "macs": macs,
            "gpu_hours": gh, "wall_hours": gh / fit["gpus_used"], "memory": fit, "model_params": params,
            "forward": costs["forward"], "prune": costs.get("prune"), "note": costs.get("note")}


def plan_table(table: str, profile: str = "paper", gpus: int = DEFAULT_GPUS, gpu_memory: float = DEFAULT_GPU_MEMORY,
               utilization: float = DEFAULT_UTILIZATION, gpu_tflops: float = DEFAULT_GPU_TFLOPS, methods=None,
               ratios=None, train_size: int | None = None) -> dict:
    """The plan of every cell of `table` under `profile` (see the module docstring). Plain data."""
    from bench.cards import load_checked_card, parse_card
    from bench.config import Paths
    from bench.registry import TASKS
    from bench.runner import expand_cells, task_profile

    check_settings(gpus, gpu_memory, utilization, gpu_tflops, train_size)
    card = parse_card(load_checked_card(table))
    cells = expand_cells(card, profile, methods, ratios, None, "cpu")
    paths = Paths.resolve()
    settings = {"gpus": int(gpus), "gpu_memory": float(gpu_memory), "utilization": float(utilization),
                "gpu_tflops": float(gpu_tflops)}
    costs = ModelCosts()
    tasks: dict = {}
    sizes: dict = {}
    out_cells, dense_runs, parts = [], {}, {}

    for cfg in cells:
        tkey = (cfg["task"], json.dumps(cfg["data"], sort_keys=True, default=str), task_profile(cfg))
        if tkey not in tasks:
            tasks[tkey] = TASKS.get(cfg["task"])(cfg["data"], paths.data_root, task_profile(cfg), paths.cache)
        task = tasks[tkey]
        if tkey not in sizes:
            sizes[tkey] = _train_size(task, cfg, train_size)
        n, exact, source = sizes[tkey]
        dense = costs.get(cfg["model"], cfg["model_config"], task, cfg["task"])
        parts.setdefault((cfg.get("part"), cfg["task"], cfg["model"]),
                         {"task": cfg["task"], "arch": cfg["model"], "part": cfg.get("part"), "dense": dense,
                          "train_size": n, "exact": exact, "source": source})
        if cfg.get("dense_training"):
            r = cfg["dense_training"]
            dkey = (cfg["model"], json.dumps(cfg["model_config"], sort_keys=True), cfg["task"], tkey[1],
                    json.dumps(r, sort_keys=True), cfg["seed"])
            if dkey not in dense_runs:
                ph = _phase_cost("dense", float(r["epochs"]), int(r["batch_size"]), {}, dense, n, settings)
                dense_runs[dkey] = {"label": f"{cfg.get('part') + ': ' if cfg.get('part') else ''}dense {cfg['model']} "
                                             f"seed {cfg['seed']}", "phases": [ph], "cells": 0}
            dense_runs[dkey]["cells"] += 1
        phases = []
        pruned = None
        for name, epochs, batch, which, extras in _method_phases(cfg):
            if which == "pruned":
                if pruned is None:
                    kinds = (cfg.get("method_options") or {}).get("unit_kinds")
                    pruned = costs.get(cfg["model"], cfg["model_config"], task, cfg["task"],
                                       {"p": float(cfg["ratio"]["p"]), "basis": _basis(cfg), "kinds": kinds})
                c = pruned
            else:
                c = dense
            phases.append(_phase_cost(name, epochs, batch, extras, c, n, settings))
        out_cells.append({"cell_id": cfg["cell_id"], "method": cfg["method"], "ratio": cfg["ratio"], "part": cfg.get("part"),
                          "task": cfg["task"], "arch": cfg["model"], "phases": phases,
                          "macs": sum(p["macs"] for p in phases), "gpu_hours": sum(p["gpu_hours"] for p in phases),
                          "wall_hours": sum(p["wall_hours"] for p in phases),
                          "steps": sum(p["steps"] for p in phases)})
    shared = list(dense_runs.values())
    for d in shared:
        d.update(macs=sum(p["macs"] for p in d["phases"]), gpu_hours=sum(p["gpu_hours"] for p in d["phases"]),
                 wall_hours=sum(p["wall_hours"] for p in d["phases"]), steps=sum(p["steps"] for p in d["phases"]))
    everything = out_cells + shared
    all_phases = [p for c in everything for p in c["phases"]]
    totals = {"cells": len(out_cells), "shared_dense": len(shared),
              "steps": sum(c["steps"] for c in everything), "macs": sum(c["macs"] for c in everything),
              "gpu_hours": sum(c["gpu_hours"] for c in everything),
              "wall_hours": sum(c["wall_hours"] for c in everything),
              "peak_bytes": max((p["memory"]["peak_bytes"] for p in all_phases), default=0.0),
              "all_fit": all(p["memory"]["fits"] for p in all_phases)}
    result = {"table": card.table, "profile": profile, "paper": card.paper, "settings": settings,
              "cells": out_cells, "shared": shared, "parts": list(parts.values()), "totals": totals}
    result["notes"] = published_notes(result)
    return result


def _train_size(task, cfg, override) -> tuple:
    if override:
        return int(override), True, "--train-size"
    if cfg.get("data_source") == "synthetic":
        # the micro generator's own count (generates the small synthetic set into the cache once)
        return int(task.steps_per_epoch(1)), True, f"{cfg['task']} synthetic (micro) training split"
    return task.public_train_size(cfg.get("data") or {})


def check_settings(gpus, gpu_memory, utilization, gpu_tflops, train_size=None) -> None:
    if not isinstance(gpus, int) or isinstance(gpus, bool) or gpus < 1:
        raise BenchError(f"--gpus: {gpus!r} is not a whole number of GPUs >= 1, e.g. --gpus 8")
    if not gpu_memory > 0:
        raise BenchError(f"--gpu-memory: {gpu_memory!r} must be a positive number of GiB, e.g. --gpu-memory 80")
    if not 0 < utilization <= 1:
        raise BenchError(f"--utilization: {utilization!r} must be in (0, 1], e.g. --utilization 0.4")
    if not gpu_tflops > 0:
        raise BenchError(f"--gpu-tflops: {gpu_tflops!r} must be a positive number, e.g. --gpu-tflops 312")
    if train_size is not None and (not isinstance(train_size, int) or train_size < 1):
        raise BenchError(f"--train-size: {train_size!r} must be a whole number >= 1")


# ---------------------------------------------------------------------------------------------
# published costs

def published_notes(plan: dict) -> list:
    """Lines comparing the plan's conventions with published training costs of the table's models."""
    s = plan["settings"]
    notes = []
    for part in plan["parts"]:
        from bench.registry import TASKS   # the costs a task's own training runs were published with
        pub = (TASKS.get(part["task"]).PUBLISHED_TRAINING_COSTS or {}).get(part["arch"])
        if not pub:
            continue
        steps = optimizer_steps(pub["epochs"], part["train_size"], pub["batch"])
        macs = train_macs_per_step(part["dense"]["fwd_macs"], pub["batch"]) * steps
        est_pub_gpu = gpu_hours(macs, s["utilization"], pub["gpu_tflops"])
        est_here = gpu_hours(macs, s["utilization"], s["gpu_tflops"])
        published = pub["gpus"] * pub["hours"]
        ratio = published / est_pub_gpu
        implied = s["utilization"] / ratio
        bound = pub["bound"] + " " if pub["bound"] else ""
        notes.append(
            f"published: {pub['source']} = {bound}{published:,.0f} {pub['gpu']}-hours. This plan's count of that run "
            f"({pub['epochs']} epochs x {part['train_size']:,} samples, dense {part['dense']['fwd_macs'] / 1e9:.2f} "
            f"GMACs x 3 x 2 = {FLOPS_PER_MAC * macs:.3g} FLOPs): {est_pub_gpu:,.0f} {pub['gpu']}-hours at "
            f"{s['utilization']:.0%} of {pub['gpu_tflops']:g} TFLOPS ({est_here:,.1f} GPU-hours at this plan's "
            f"{s['gpu_tflops']:g} TFLOPS); the estimate is {ratio:.1f}x {'below' if ratio > 1 else 'above'} the "
            f"published {'bound' if bound else 'figure'}: the published run used "
            f"{'at most ' if bound else ''}{implied:.1%} of the GPU's peak.")
    if "UPop" in (plan.get("paper") or ""):
        notes.append("published: the UPop README gives its commands for 8 A100 GPUs (torch.distributed.run "
                     "--nproc_per_node=8) and no training time; no published duration is known to this suite, so the "
                     "UPop cells are not compared.")
    if not notes:
        notes.append("published: no published training cost of this table's model is known to this suite.")
    return notes


# ---------------------------------------------------------------------------------------------
# text output

def _num(x: float) -> str:
    if x >= 100:
        return f"{x:,.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def _gib(b: float) -> str:
    return f"{b / GIB:.1f}"


def _phase_short(p: dict) -> str:
    if p["steps"] == 0 and p["factor"] == 1:
        return f"{p['name']} {p['samples']:,} fwd"
    return f"{p['name']} {p['steps']:,}x{p['batch']}@{p['fwd_macs'] / 1e9:.3g}G"


def _binding(phases: list) -> dict | None:
    """The phase whose memory constrains the cell most (no fit, else most accumulation, else highest peak)."""
    if not phases:
        return None
    return max(phases, key=lambda p: (not p["memory"]["fits"], p["memory"]["accum"] or 0, p["memory"]["peak_bytes"]))


def _mem_cols(p: dict | None) -> tuple:
    if p is None:
        return "-", "-", "-"
    m = p["memory"]
    if not m["fits"]:
        return f"{_gib(m['peak_bytes'])} (micro 1)", "0", "does not fit"
    mode = "" if m["mode"] == "ddp" else f" {m['mode']} over {m['gpus_used']}"
    return (f"{_gib(m['peak_bytes'])}", f"{m['max_micro']:,}" if m["max_micro"] < 1 << 29 else "any",
            f"{m['micro']}x{m['accum']}x{m['gpus_used']}{mode}")


def format_plan(plan: dict, phases: bool = False) -> str:
    s = plan["settings"]
    gpus = s["gpus"]
    lines = [f"bench plan: table {plan['table']}, {plan['profile']} profile, {plan['totals']['cells']} cells; "
             f"{gpus} GPU{'s' if gpus > 1 else ''} x {s['gpu_memory']:g} GiB, {s['gpu_tflops']:g} TFLOPS peak dense "
             f"bf16, {s['utilization']:.0%} utilization",
             "conventions: training MACs/step = 3 x forward MACs of one sample x effective batch (backward ~ 2x "
             "forward; fvcore MACs from the suite's counter on meta; 1 MAC = 2 FLOPs); memory = 18 B/param (fp32 "
             "weights, grads, AdamW m and v + bf16 autocast copies) + bf16 module outputs per sample, 90% of the GPU "
             "usable; after pruning, the MACs of a model pruned uniformly on meta (estimate)"]
    for part in plan["parts"]:
        d = part["dense"]
        name = f"{part['part']}: " if part["part"] and part["part"] != part["task"] else ""
        lines.append(f"{name}{part['task']}: {part['train_size']:,} training samples per epoch "
                     f"[{'exact' if part['exact'] else 'approximate'}: {part['source']}]; {part['arch']} "
                     f"{d['params'] / 1e6:.2f} M params, {d['fwd_macs'] / 1e9:.2f} GMACs forward per sample "
                     f"({d['forward']}), activations {d['act_bytes'] / 2 ** 20:,.0f} MiB per sample")
    rows = [("cell", "phases (steps x batch @ forward GMACs/sample)", "PFLOP", "GPU-h", f"wall-h/{gpus}",
             "peak GiB/GPU", "max micro", "micro x accum x GPUs")]
    for c in plan["cells"] + [dict(d, cell_id=f"[shared] {d['label']} (used by {d['cells']} cells)")
                              for d in plan["shared"]]:
        ph = " + ".join(_phase_short(p) for p in c["phases"]) or "no training of its own (the dense model)"
        rows.append((c["cell_id"], ph, _num(FLOPS_PER_MAC * c["macs"] / 1e15), _num(c["gpu_hours"]),
                     _num(c["wall_hours"]), *_mem_cols(_binding(c["phases"]))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    right = {2, 3, 4, 5, 6}
    for j, r in enumerate(rows):
        lines.append("  ".join(v.rjust(w) if i in right else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths))).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
        elif phases:
            c = (plan["cells"] + plan["shared"])[j - 1]
            for p in c["phases"]:
                lines.append("    " + _phase_detail(p))
    t = plan["totals"]
    shared = f" + {t['shared_dense']} shared dense trainings" if t["shared_dense"] else ""
    lines.append(f"total: {t['cells']} cells{shared}: {t['steps']:,} optimizer steps, "
                 f"{FLOPS_PER_MAC * t['macs']:.3g} FLOPs, {_num(t['gpu_hours'])} GPU-hours, {_num(t['wall_hours'])} h "
                 f"wall-clock on {gpus} GPU{'s' if gpus > 1 else ''} ({t['wall_hours'] / 24:.1f} days, cells one after "
                 f"another), peak memory {_gib(t['peak_bytes'])} GiB per GPU"
                 + ("" if t["all_fit"] else "; some phases do not fit (see 'does not fit')"))
    for c in plan["cells"]:
        for p in c["phases"]:
            if p.get("note"):
                lines.append(f"note: {c['cell_id']} {p['name']}: {p['note']}")
    for n in plan["notes"]:
        lines.append(f"note: {n}")
    return "\n".join(lines)


def _phase_detail(p: dict) -> str:
    m = p["memory"]
    if p["steps"] == 0 and p["factor"] == 1:
        head = f"{p['name']}: {p['samples']:,} samples forward only"
    else:
        head = (f"{p['name']}: {p['epochs']:g} epochs x {p['steps_per_epoch']:,} steps/epoch ({p['train_size']:,} // "
                f"{p['batch']}) = {p['steps']:,} steps; {p['factor']}x{' + teacher 1x' if p['teacher'] else ''} forward "
                f"{p['fwd_macs'] / 1e9:.3g} GMACs x {p['batch']} = {p['macs_per_step'] / 1e12:.3g} TMACs/step")
    mem = (f"state {_gib(m['state_bytes'])} GiB{' (fsdp-sharded: sharding: fsdp)' if m['mode'] == 'fsdp' else ''} + "
           f"{m['act_bytes'] / 2 ** 20:,.0f} MiB/sample")
    if m["fits"]:
        mem += f", micro {m['micro']} x accum {m['accum']} x {m['gpus_used']} GPUs, peak {_gib(m['peak_bytes'])} GiB"
    else:
        mem += ", does not fit even at micro-batch 1" + (f" (no sharding: {m['no_sharding']})"
                                                        if m.get("no_sharding") else "")
    return f"{head}; {_num(p['gpu_hours'])} GPU-h; {mem}"
