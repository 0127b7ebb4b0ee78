"""The training recipe of a card's `dense:` and `finetune:` blocks (and of every training a method does).

One typed block; `bench.training.train` implements every key, the task implements the data-side keys
(augmentation, mixup/cutmix, label smoothing) and the model adapter the model-side ones (drop path). A key
that the cell's task or model cannot honour is refused when the card is validated, never dropped.
"""
from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, model_validator

from bench.errors import BenchError
from bench.options import Fraction, NonNegFloat, NonNegInt, OptionsModel, PositiveFloat, PositiveInt

# recipe keys that the task must implement (data side) or the model adapter (model side); the rest are the loop's.
# TASK_RECIPE_KEYS: the timm-style data-side keys (tasks.imagenet implements every one of them);
# BLIP_RECIPE_KEYS: BLIP's own training transform (tasks.common.blip_augment; the BLIP tasks implement it);
# DATA_RECIPE_KEYS: every data-side key, what the card check and the training loop refuse for a task not listing it.
TASK_RECIPE_KEYS = ("label_smoothing", "mixup", "cutmix", "cutmix_minmax", "mixup_prob", "mixup_switch_prob",
                    "mixup_mode", "auto_augment", "color_jitter", "crop_scale", "hflip", "reprob", "remode",
                    "recount")
BLIP_RECIPE_KEYS = ("randaugment",)
# DISTILL_RECIPE_KEYS: the ITC distillation of the retrieval tasks (TaskAdapter.on_train_step sets it per step)
DISTILL_RECIPE_KEYS = ("distill_alpha_warmup",)
DATA_RECIPE_KEYS = TASK_RECIPE_KEYS + BLIP_RECIPE_KEYS + DISTILL_RECIPE_KEYS
MODEL_RECIPE_KEYS = ("drop_path",)


class BlipRandAugment(OptionsModel):
    """The recipe's `randaugment` block: BLIP's RandomAugment(N, M) (transform/randaugment.py of BLIP and UPop)."""

    n: PositiveInt = Field(2, description="ops drawn per image, uniformly with replacement from BLIP's 10 "
                                          "(official N = 2, BLIP data/__init__.py transform_train)")
    m: Annotated[float, Field(ge=0, le=10)] = Field(
        5, description="magnitude level 0-10 of every op (official M = 5: shear 0.15, translate 5 px, rotate 15 "
                       "degrees, brightness/sharpness factor 1.0)")


class TrainRecipe(OptionsModel):
    """How to train: budget, optimizer, schedule, regularisation and augmentation."""

    # budget
    epochs: NonNegFloat = Field(description="passes over the training split (0: no training; fractions allowed)")
    lr: PositiveFloat = Field(description="peak learning rate (a number: write 1.0e-3, not 1e-3, which YAML reads as text)")
    batch_size: PositiveInt = Field(description="samples per optimizer step (the effective batch)")
    micro_batch_size: PositiveInt | Literal["auto"] | None = Field(
        None, description="samples per forward/backward; batch_size / micro_batch_size micro-batches are accumulated "
                          "into each optimizer step, so steps and schedule stay the card's (none: = batch_size, no "
                          "accumulation; must divide batch_size). auto: on CUDA the largest divisor of the per-rank "
                          "batch whose training step fits the GPU (probed at the start, bench.training."
                          "auto_micro_batch); on CPU the per-rank batch")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto: bf16 autocast on CUDA (fp32 where the GPU has no bf16), fp32 on CPU; bf16: "
                            "torch.autocast bfloat16 (CPU too); fp16: autocast float16 with a GradScaler (CUDA only); "
                            "fp32: no autocast")
    sharding: Literal["none", "fsdp"] = Field(
        "none", description="data parallel only (torchrun, world size > 1; ignored in one process). none: every rank "
                            "holds the whole model, its gradients and optimizer states; fsdp: the phase trains a "
                            "fully-sharded copy (torch FSDP2 fully_shard on the model family's repeated blocks, "
                            "bench.sharding): weights, gradients and optimizer states split over the ranks, the model "
                            "whole again on every rank after the phase; fp16 refused (use bf16)")
    # optimizer
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="adamw (DeiT, BLIP, UPop) or sgd with momentum (Segmenter)")
    weight_decay: NonNegFloat = Field(0.05, description="decoupled (AdamW) or L2 (SGD) weight decay")
    weight_decay_groups: Literal["no_norm_bias", "all"] = Field(
        "no_norm_bias", description="no_norm_bias: norms, biases and the adapter's no-decay tensors (position "
                                    "embeddings, class token) get none, as timm; all: every tensor, as the official BLIP code")
    betas: list[float] = Field([0.9, 0.999], min_length=2, max_length=2, description="AdamW betas")
    momentum: Fraction = Field(0.9, description="SGD momentum")
    nesterov: bool = Field(False, description="SGD with Nesterov momentum")
    clip_grad: PositiveFloat | None = Field(None, description="clip the gradient's global L2 norm to this value (none: no clipping)")
    # schedule
    schedule: Literal["cosine", "poly", "constant"] = Field("cosine", description="lr decay after the warm-up")
    schedule_unit: Literal["step", "epoch"] = Field("step", description="update the lr every optimizer step, or once "
                                                                        "per epoch (the official UPop retrain)")
    poly_power: PositiveFloat = Field(0.9, description="exponent of the poly schedule (Segmenter: 0.9)")
    warmup_epochs: NonNegFloat = Field(0.0, description="linear warm-up from warmup_lr to lr, in epochs")
    warmup_lr: NonNegFloat = Field(0.0, description="lr at the start of the warm-up")
    min_lr: NonNegFloat = Field(0.0, description="lr at the end of the decay")
    # model-side regularisation (the model adapter implements it)
    drop_path: Fraction | None = Field(None, description="stochastic depth rate of the residual branches (none: the model's own)")
    # data-side regularisation and augmentation (the task implements it)
    label_smoothing: Fraction = Field(0.0, description="label smoothing of the cross-entropy")
    mixup: NonNegFloat = Field(0.0, description="mixup alpha (timm.data.Mixup; 0: off)")
    cutmix: NonNegFloat = Field(0.0, description="cutmix alpha (timm.data.Mixup; 0: off)")
    cutmix_minmax: list[float] | None = Field(None, min_length=2, max_length=2, description="cutmix box ratio range (overrides alpha)")
    mixup_prob: Fraction = Field(1.0, description="probability of applying mixup or cutmix to a batch")
    mixup_switch_prob: Fraction = Field(0.5, description="probability of cutmix instead of mixup when both are on")
    mixup_mode: Literal["batch", "pair", "elem"] = Field("batch", description="mix per batch, per pair or per sample")
    auto_augment: str | None = Field(None, description="timm auto-augment policy, e.g. rand-m9-mstd0.5-inc1 (none: off)")
    color_jitter: NonNegFloat | None = Field(None, description="colour jitter strength (none: off)")
    crop_scale: list[float] | None = Field(None, min_length=2, max_length=2, description="random-resized-crop area range (none: the task's default)")
    hflip: Fraction | None = Field(None, description="horizontal flip probability (none: the task's default)")
    randaugment: BlipRandAugment | None = Field(
        None, description="BLIP's RandomAugment in the training transform, after the crop and flip (BLIP/UPop "
                          "data/__init__.py transform_train: {n: 2, m: 5}): n ops from Identity, AutoContrast, "
                          "Brightness, Sharpness, Equalize, ShearX/Y, TranslateX/Y, Rotate, each applied with "
                          "probability 0.5 at level m (tasks.common.blip_augment; the BLIP tasks nlvr2, vqa, "
                          "caption_coco, retrieval_coco/flickr implement it; none: off)")
    distill_alpha_warmup: Literal["none", "first_epoch"] = Field(
        "none", description="the ITC momentum-distillation weight alpha of the retrieval tasks (BLIP, CLIP). none: "
                            "the model's constant alpha; first_epoch: alpha x min(1, step / steps_per_epoch), a linear "
                            "ramp from 0 over the first epoch of every training phase, as the official train() "
                            "(sdc17/UPop compress_retrieval.py l. 88-91, compress_retrieval_clip.py l. 103-106: `alpha "
                            "= config['alpha']*min(1,i/len(data_loader))` in epoch 0); the UPop search takes it from "
                            "the finetune block (retrieval_coco/flickr implement it)")
    reprob: Fraction = Field(0.0, description="random erasing probability (timm.data.RandomErasing)")
    remode: Literal["pixel", "const", "rand"] = Field("pixel", description="random erasing fill")
    recount: PositiveInt = Field(1, description="random erasing count")
    # checkpoint selection (the runner's finetune only)
    selection: Literal["final", "paper"] = Field(
        "final", description="finetune only. final: the model after the last epoch (the clean protocol); paper: "
                             "evaluate after every epoch (or every selection_every-th) on selection_split and keep the "
                             "epoch with the best selection_metric, as the official scripts keep checkpoint_best (the "
                             "row is labelled '(best-epoch on <split>)' in the table and CSV: selection on an "
                             "evaluated split)")
    selection_every: PositiveInt = Field(
        1, description="selection paper: evaluate after every N-th epoch (epochs 1, N + 1, 2N + 1, ... counted from 1) "
                       "and after the last one, as Segmenter's `epoch % eval_freq == 0 or epoch == num_epochs - 1` "
                       "with 0-based epochs (sdc17/UPop compress_segmenter.py l. 420; eval_freq 2 for ADE20K, "
                       "rstrudel/segmenter segm/config.yml l. 108); 1: every epoch")
    selection_split: str | None = Field(
        None, description="selection paper: the split evaluated after every epoch (none: the split of the card's "
                          "primary metric, e.g. dev for NLVR2)")
    selection_metric: str | None = Field(
        None, description="selection paper: the metric that picks the epoch (none: the card's primary metric; its "
                          "higher_is_better gives the direction)")
    # reporting
    log_every: NonNegInt = Field(0, description="print the mean loss every N steps (0: quiet)")

    @model_validator(mode="after")
    def _ranges(self):
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr {self.min_lr} is above lr {self.lr}")
        if self.crop_scale is not None and not (0 < self.crop_scale[0] <= self.crop_scale[1] <= 1):
            raise ValueError(f"crop_scale must be 0 < low <= high <= 1, got {self.crop_scale}")
        if self.label_smoothing >= 1:
            raise ValueError("label_smoothing must be below 1")
        if self.selection == "final" and (self.selection_split is not None or self.selection_metric is not None
                                          or self.selection_every != 1):
            raise ValueError("selection_split / selection_metric / selection_every are for selection: paper "
                             "(selection is final)")
        if isinstance(self.micro_batch_size, int) and self.batch_size % self.micro_batch_size:
            raise ValueError(f"micro_batch_size {self.micro_batch_size} does not divide batch_size {self.batch_size} "
                             f"(batch_size is the effective batch: give a micro_batch_size that divides it)")
        return self

    # added after cells were recorded (OptionsModel.to_dict): at their defaults they keep every cell's hash
    HASH_STABLE_KEYS: ClassVar[tuple] = ("randaugment", "distill_alpha_warmup", "selection_every",
                                         "sharding")

    def changed_keys(self) -> set:
        """The keys set to something other than their default (what a task or model must honour)."""
        return {k for k, f in type(self).model_fields.items()
                if not f.is_required() and getattr(self, k) != f.get_default(call_default_factory=True)}

    def with_(self, **changes) -> "TrainRecipe":
        """A copy with some keys changed, validated again."""
        return type(self).model_validate({**self.model_dump(), **changes})


def parse_micro_batch(value):
    """--micro-batch: None, "auto" or a whole number >= 1 (one clear line otherwise)."""
    if value is None or value == "auto":
        return value
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1:
        raise BenchError(f"--micro-batch {value!r}: give a whole number >= 1 (samples per forward/backward) or auto")
    return n
