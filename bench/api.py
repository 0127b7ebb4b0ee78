"""The declared contracts between the three kinds of plugin. Every member the harness or a method uses is
declared here, with what it must do; a new family, task or method implements these and nothing else.

- ModelAdapter  (models/<family>.py): builds an architecture, describes its prunable structure (`structure`),
                its shape (`geometry` -> Geometry), and the one mask mechanism (attach / set / clear / fold
                activation masks on the structure's groups). The only code that knows module names and
                config attributes.
- TaskAdapter   (tasks/<task>.py): data layout, micro generator, batches, loss, metrics, the model's inputs
                (`dummy_inputs`, `flops_forwards`, `sequence_length`, `token_shape`), what `bench plan` needs
                without the data (`public_train_size`, `plan_train_forward`) and, for methods that read model
                outputs (distillation), `forward` -> ModelOutput. The only code that opens a batch.
- Method        (methods/<name>.py): takes a CellContext (model, adapter, structure, task, target ratio) and
                returns a PruneResult (keep-masks per unit group, the structure they refer to, extraction
                options, what to record, whether the runner finetunes), training the model as its paper says.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from bench.options import OptionsModel
from bench.structure import Structure


class NoOptions(OptionsModel):
    """A block with no keys: anything set in it is refused as unknown."""


def model_no_weight_decay(model: nn.Module) -> set[str]:
    """The names a timm-style model exempts from weight decay (`model.no_weight_decay()`), else an empty set."""
    fn = getattr(model, "no_weight_decay", None)
    return set(fn()) if callable(fn) else set()


@dataclass(frozen=True)
class Geometry:
    """A Transformer's shape as methods need it: read from the adapter (`ModelAdapter.geometry`), never from a
    model's config attributes."""
    width: int         # the residual stream's hidden size
    heads: int         # attention heads per layer
    head_dim: int      # width of one head (heads * head_dim may differ from width: LLaMA's GQA keeps it equal)
    layers: int        # Transformer blocks


@dataclass
class ModelOutput:
    """What `TaskAdapter.forward` gives a method: the prediction logits and, when asked for, the hidden states
    of every layer (a tuple of (B, T, width) tensors, embeddings first)."""
    logits: torch.Tensor
    hidden_states: tuple | None = None


class ModelAdapter:
    """One model family. `ARCHS` maps architecture names to config dicts (timm-style `arch` names)."""

    family: str = ""
    ARCHS: dict = {}
    UNIT_KINDS: tuple = ()          # unit kinds the family exposes
    MODALITIES: tuple = ("vision",)
    RECIPE_KEYS: frozenset = frozenset()   # model-side recipe keys (bench.recipe.MODEL_RECIPE_KEYS) it implements
    VERSION: int = 1
    """The adapter's code version, part of every cell's record hash: its author bumps it when a change alters
    results (the architecture, the structure, checkpoint loading), so that no record of the old code is reused."""
    DEFAULT_ATTENTION_SCALE: str = "fixed"
    """How attention is scaled once head_dim is pruned, when a method does not say: "fixed" (1/sqrt(original
    head_dim), the timm/ViT code), "sliced" (1/sqrt(kept head_dim), UPop's BERT/CLIP code) or "official" (BLIP:
    vision fixed, text sliced). Read by `fix_modules` through the extract options."""

    def __init__(self, arch: str, config: dict):
        self.arch = arch
        self.config = dict(config)

    def build(self) -> nn.Module:
        """Randomly initialised model (honours the current default device, e.g. `meta`)."""
        raise NotImplementedError

    def structure(self, model: nn.Module, kinds=None) -> Structure:
        """Unit groups of `model` (all kinds, or only `kinds`), with exact params per unit."""
        raise NotImplementedError

    def geometry(self, model: nn.Module) -> Geometry:
        """Width, heads, head size and depth of `model` (its language/text tower for multi-tower families)."""
        raise NotImplementedError(f"model family {self.family or type(self).__name__} does not declare its geometry")

    def fix_modules(self, model: nn.Module, structure: Structure, keep: dict, options: dict) -> None:
        """After generic slicing: fix head counts/dims, remove dropped sublayers, etc."""

    def load_checkpoint(self, model: nn.Module, path: Path) -> None:
        """Load an official checkpoint (paper profile) by mapping its key names."""
        raise NotImplementedError

    def no_weight_decay_names(self, model: nn.Module) -> set[str]:
        """Parameter names (as `model.named_parameters()` gives them) that the recipe's `no_norm_bias` weight-decay
        groups exempt besides 1-D tensors and biases: position embeddings, class tokens. Default: the model's
        own timm-style `model.no_weight_decay()` if it has one, else none."""
        return model_no_weight_decay(model)

    def set_drop_path(self, model: nn.Module, rate: float) -> None:
        """Set the stochastic-depth rate of the residual branches (the recipe's `drop_path`, model side): the
        last block gets `rate`, earlier ones the linear rule timm uses (`torch.linspace(0, rate, depth)`); rate
        0 removes it. Families that implement it list "drop_path" in RECIPE_KEYS."""
        from bench.errors import BenchError
        raise BenchError(f"model family {self.family or type(self).__name__} does not implement drop_path")

    def shard_units(self, model: nn.Module) -> list[nn.Module]:
        """The submodules that the recipe's `sharding: fsdp` shards one by one (bench.sharding: torch FSDP2's
        fully_shard on each, deepest first, then on the root): the repeated Transformer blocks, so that a block's
        weights are gathered whole only during its own forward and backward. Submodules of `model`, never the
        root. Default: none (the root is the only unit: the whole model is gathered for the forward, while the
        gradients and optimizer states stay sharded). A family whose forward cannot run on sharded parameters
        raises BenchError saying why."""
        return []

    def example_inputs(self, batch_size: int, device) -> tuple:
        """Inputs for `bench flops --model` / `bench speed --model` without a card (a family whose model takes
        one plain input, e.g. an image batch of its image size, implements it). Default: one clear line saying
        which command counts it instead."""
        from bench.errors import BenchError
        raise BenchError(f"{self.arch} does not take one plain input, so it cannot be counted without a card's "
                         f"inputs: use `python -m bench flops --table <card>` with a card that uses it")

    # unit kind -> attribute of the group's module that its forward multiplies (families with activation masks)
    MASK_ATTRS: dict = {}

    def attach_unit_masks(self, model: nn.Module, structure: Structure, kinds=("head_dim", "ffn")) -> dict:
        """Activation masks for search methods such as UPop: {group name: ones(size)} set on each group's module
        as `MASK_ATTRS[kind]`. They require grad but are not nn.Parameters, so no optimizer sees them."""
        if not self.MASK_ATTRS:
            raise NotImplementedError(f"{self.family} has no activation masks")
        masks = {}
        for g in structure:
            if g.kind not in kinds:
                continue
            mod = model.get_submodule(g.module)
            ref = next(mod.parameters())
            m = torch.ones(g.size, device=ref.device, dtype=ref.dtype, requires_grad=True)
            setattr(mod, self.MASK_ATTRS[g.kind], m)
            masks[g.name] = m
        return masks

    def set_unit_masks(self, model: nn.Module, structure: Structure, masks: dict) -> None:
        """Replace the activation masks the forward uses ({group name: tensor}), e.g. masks sampled anew at
        every step (VTrans)."""
        if not self.MASK_ATTRS:
            raise NotImplementedError(f"{self.family} cannot set activation masks")
        for g in structure:
            if g.name in masks:
                setattr(model.get_submodule(g.module), self.MASK_ATTRS[g.kind], masks[g.name])

    def clear_unit_masks(self, model: nn.Module) -> None:
        """Remove every activation mask: the forward is the plain model's again."""
        raise NotImplementedError(f"{self.family} cannot clear activation masks")

    def fold_unit_masks(self, model: nn.Module, structure: Structure, values: dict) -> None:
        """Multiply the kept units' mask values ({group name: tensor}) into the neighbouring weights, so that
        the plain model computes what the masked one did (VTrans's final step)."""
        raise NotImplementedError(f"{self.family} cannot fold activation masks into its weights")


class TaskAdapter:
    """One task. Subclasses set `name`, `metrics` ({name: higher_is_better}) and implement the methods."""

    name: str = ""
    metrics: dict = {}
    layout: str = ""   # the on-disk layout, shown in errors and the README
    Data: type[OptionsModel] = NoOptions   # the keys of a profile's `data:` block for this task
    RECIPE_KEYS: frozenset = frozenset()    # data-side recipe keys (bench.recipe.DATA_RECIPE_KEYS) it implements
    PUBLISHED_TRAINING_COSTS: dict = {}
    """{architecture: published cost of training it on this task from scratch} for `bench plan`'s check of its
    conventions: epochs, batch, gpus, hours, bound ("less than" or ""), gpu, gpu_tflops, source."""
    model_config_overrides: dict = {}
    """Architecture config keys the task fixes (e.g. a micro vocabulary size, a number of labels), merged over
    the architecture's config before the model is built."""
    VERSION: int = 1
    """The task's code version (its data reading, micro generator, loss and metrics), part of every cell's record
    hash: its author bumps it when a change alters results, so that no record of the old code is reused."""

    def __init__(self, settings: dict, data_root: Path | None, profile: str, cache_dir: Path):
        if profile not in ("micro", "paper"):
            from bench.errors import BenchError
            raise BenchError(f"{self.name}: unknown profile {profile!r} (micro or paper)")
        if data_root is None:
            import os
            data_root = os.environ.get("BENCH_DATA") or "."
        # the profile's `data:` block as the task's typed Data block (every key known, typed, defaults filled in)
        from bench.options import parse_block
        self.settings = settings if isinstance(settings, OptionsModel) else parse_block(type(self).Data, settings, "data")
        self.data_root = Path(data_root)
        self.profile = profile
        self.cache_dir = Path(cache_dir)

    def prepare(self) -> None:
        """Make sure the data is there (micro: generate it; paper: check the layout, clear error if not)."""

    def check_model(self, model: nn.Module) -> None:
        """Called once the dense model is built/loaded, before any training: raise BenchError if the model
        cannot take this task's inputs (e.g. a tokenizer whose ids exceed the model's embedding rows)."""

    def train_batches(self, batch_size: int, seed: int, recipe=None, shard=None):
        """Endless iterator of training batches (on CPU). `recipe` (a bench.recipe.TrainRecipe, or None for the
        task's plain batches) carries the data-side keys the task implements (RECIPE_KEYS): augmentation,
        mixup/cutmix; `bench.training.train` always passes it as a keyword. `shard=(rank, world)`: only the
        micro-batches i with i mod world == rank of the same stream, each exactly as without shard, and only
        those are loaded (`tasks.common.batching.micro_batches` does both); a task may leave `shard` out of its
        signature, and then every rank draws the whole stream and keeps its share
        (`bench.distributed.rank_batches`)."""
        raise NotImplementedError

    def steps_per_epoch(self, batch_size: int) -> int:
        """Optimizer steps of one pass over the training split at `batch_size` (epoch-based recipes, schedules)."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch, device, recipe=None) -> torch.Tensor:
        """Training loss of one batch; `recipe` as for train_batches (e.g. label smoothing)."""
        raise NotImplementedError

    def on_train_step(self, model: nn.Module, step: int, steps_per_epoch: int, recipe=None) -> None:
        """Called by `bench.training.train` once per optimizer step, before its forward(s): `step` is the
        0-based optimizer step of this training phase (a resumed phase continues its count), `steps_per_epoch`
        that phase's, `recipe` its TrainRecipe. For a task's per-step state that depends on where the phase
        is, such as the retrieval tasks' distillation-alpha ramp over the first epoch (recipe
        `distill_alpha_warmup`). Default: nothing."""

    def evaluate_for_selection(self, model: nn.Module, split: str, device, metric: str) -> dict:
        """What `selection: paper` (bench.selection.EpochSelection) evaluates after an epoch; it reads `metric`
        from the result. Default: `evaluate(model, split, device)`. A task whose official scripts select with a
        cheaper or different evaluation than the reported one overrides it (ADE20K: single scale, the selection
        stride)."""
        return self.evaluate(model, split, device)

    def forward(self, model: nn.Module, batch, device, output_hidden_states: bool = False) -> ModelOutput:
        """The model on one batch, as a ModelOutput: what methods that read outputs (distillation) call instead
        of opening the batch or the model's output type. Tasks those methods run on implement it."""
        raise NotImplementedError(f"task {self.name} does not give model outputs to methods")

    def loss_from_output(self, out: ModelOutput, batch, device) -> torch.Tensor:
        """The task loss of a `forward` output (so a method adds its own terms to it)."""
        raise NotImplementedError(f"task {self.name} does not compute its loss from a model output")

    def token_shape(self, batch) -> tuple:
        """(samples, tokens) of a batch's token input: the leading shape of per-token masks."""
        raise NotImplementedError(f"task {self.name} has no token input")

    def sequence_length(self) -> int:
        """Tokens per sample in the FLOPs protocol (`dummy_inputs`' sequence length), for methods whose budget
        is a FLOPs model."""
        raise NotImplementedError(f"task {self.name} has no token sequence")

    def evaluate(self, model: nn.Module, split: str, device) -> dict:
        raise NotImplementedError

    def dummy_inputs(self, model_config: dict, batch_size: int, device) -> tuple:
        """Synthetic inputs for FLOPs and throughput (the card's protocol names the shape)."""
        raise NotImplementedError

    def flops_forwards(self, model_config: dict, device) -> dict:
        """The card's FLOPs protocols: {label: (args, kwargs)} for one `model(*args, **kwargs)` each. The first
        entry is the paper's protocol (some papers count a training-style forward); an entry whose label
        starts with "inference" is the inference-only count. Must not need the data on disk (the `flops`
        command builds the task without preparing it) and must run on `meta`."""
        return {"inference": (self.dummy_inputs(model_config, 1, device), {})}

    def public_train_size(self, data: dict) -> tuple:
        """(samples per epoch, exact?, source text) of the public training split under a cell's raw `data:`
        settings (the plain dict the card and profile give, unset keys absent), for `bench plan` when the data is
        not on disk: samples as this task counts them per epoch; exact False where the published number is an
        estimate; the source says where the number comes from. Must not need the data on disk. Default: not
        known (BenchError; `--train-size N` overrides)."""
        from bench.errors import BenchError
        raise BenchError(f"bench plan: no public training-set size for task {self.name!r}; pass --train-size N")

    def plan_train_forward(self, model_config: dict, device) -> tuple | None:
        """(label, (args, kwargs)) of one training sample's forward, for `bench plan`'s training MACs and
        activations, where the paper's FLOPs protocol (the first `flops_forwards` entry) is not one training
        sample (a protocol of many questions, an evaluation window of another length). Must not need the data
        on disk and must run on `meta`. Default None: the first `flops_forwards` entry."""
        return None

    def fingerprint(self) -> dict:
        """What identifies the data for caching (layout version, sizes, generator seed)."""
        return {"task": self.name, "profile": self.profile, "settings": self.settings.to_dict()}


@dataclass
class RatioSpec:
    label: str
    p: float
    meaning: str = ""


@dataclass
class PruneResult:
    """What `Method.prune` gives back (the runner reads nothing else from the method)."""
    keep: dict                       # {group name: bool tensor}: the units to keep
    structure: Structure             # the structure `keep` refers to (the kinds the method pruned)
    extract_options: dict = field(default_factory=dict)   # passed to the adapter's fix_modules and the manifest
    info: dict = field(default_factory=dict)              # what the method wants recorded (schedules, residuals)
    finetune: bool | None = None     # does the runner finetune after extraction (None: the method's `finetune`)


@dataclass
class CellContext:
    """Everything a method may use. Methods call `train` for any training they do."""

    model: nn.Module
    adapter: ModelAdapter
    structure: Structure
    task: TaskAdapter
    ratio: RatioSpec
    options: Any                     # the method's Options block (an OptionsModel; see Method.typed_blocks)
    settings: dict                   # {"method": its Settings block, "finetune": a bench.recipe.TrainRecipe or None}
    device: torch.device
    seed: int
    train: Callable[..., dict]       # train(model, steps, lr, on_step=None, log_prefix="") -> stats
    log: Callable[[str], None] = print


class Method:
    """A pruning method. `impl` is 'official' (matches the paper's code), 'reimpl' or 'baseline'."""

    name: str = ""
    impl: str = "reimpl"
    finetune: bool = True            # does the runner finetune after extraction
    uses_finetune_budget: bool = False   # gets the card's finetune block although the runner does not finetune
    settings_key: str = ""           # profile block with the method's settings (default: its own name)
    description: str = ""
    Options: type[OptionsModel] = NoOptions    # the card's `method_options.<name>` block
    Settings: type[OptionsModel] = NoOptions   # a profile's `<settings_key or name>:` block (budgets, schedules)
    VERSION: int = 1
    """The method's code version, part of every cell's record hash: its author bumps it when a change alters the
    masks or the training it does, so that no record of the old code is reused (`bench report` lists them stale)."""

    @classmethod
    def compress_epochs(cls, settings) -> float:
        """Epochs of training the method does before the runner's finetune (UPop's search, GOHSP's ADMM stage,
        VTrans's mask phase), from its typed Settings: with the finetune's epochs, a row's training budget, and
        what `budget: matched` evens out. 0 for one-shot methods."""
        return 0.0

    def prune(self, ctx: CellContext) -> PruneResult:
        """Choose the units to keep (a PruneResult). May train ctx.model in place, through ctx.train."""
        raise NotImplementedError

    def typed_blocks(self, ctx: CellContext) -> tuple:
        """(options, method settings, finetune recipe or None) of the cell as this method's typed blocks, also
        stored back into `ctx`. The runner hands them typed; a plain dict (a hand-built context) or a block of
        another class is validated here the same way, so a method reads every key by attribute, never with a
        default of its own."""
        from bench.options import parse_block
        from bench.recipe import TrainRecipe

        def typed(cls, data, where):
            if isinstance(data, cls):
                return data
            if isinstance(data, OptionsModel):
                data = data.model_dump(exclude_unset=True)
            return parse_block(cls, data, where)

        key = self.settings_key or self.name
        ctx.options = typed(type(self).Options, ctx.options, f"method_options.{self.name}")
        settings = dict(ctx.settings or {})
        settings["method"] = typed(type(self).Settings, settings.get("method"), key)
        if settings.get("finetune") is not None:
            settings["finetune"] = typed(TrainRecipe, settings["finetune"], "finetune")
        else:
            settings["finetune"] = None
        ctx.settings = settings
        return ctx.options, settings["method"], settings["finetune"]
