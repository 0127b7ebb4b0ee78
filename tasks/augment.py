"""Data-side recipe keys shared by the image-classification tasks (imagenet, cifar10), built on timm.

- `mixup_for(recipe, num_classes, batch_size)`: timm.data.Mixup from the recipe's mixup/cutmix keys (it also
  applies label smoothing to the soft targets), or None when mixup and cutmix are off.
- `classification_loss(logits, targets, recipe)`: timm's SoftTargetCrossEntropy for soft (mixed) targets,
  else cross-entropy with the recipe's label smoothing (= timm's LabelSmoothingCrossEntropy).
- `PrivateRNG(seed)`: timm's transforms and Mixup draw from the global `random`, numpy and torch generators;
  a batch iterator swaps its own seeded states in around those calls, so a run is reproducible per seed and
  leaves the caller's generators alone.
"""
from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F

from bench.errors import BenchError


def mixup_on(recipe) -> bool:
    return recipe is not None and (recipe.mixup > 0 or recipe.cutmix > 0 or recipe.cutmix_minmax is not None)


def mixup_for(recipe, num_classes: int, batch_size: int):
    """timm.data.Mixup for the recipe (None when off). timm mixes pairs of a batch with its flipped order, so
    the batch size must be even: a BenchError says so rather than skipping the mix."""
    if not mixup_on(recipe):
        return None
    if batch_size % 2:
        raise BenchError(f"training recipe: mixup/cutmix need an even batch size (timm.data.Mixup), got "
                         f"{batch_size} images per batch")
    from timm.data import Mixup
    return Mixup(mixup_alpha=recipe.mixup, cutmix_alpha=recipe.cutmix,
                 cutmix_minmax=list(recipe.cutmix_minmax) if recipe.cutmix_minmax is not None else None,
                 prob=recipe.mixup_prob, switch_prob=recipe.mixup_switch_prob, mode=recipe.mixup_mode,
                 label_smoothing=recipe.label_smoothing, num_classes=int(num_classes))


def classification_loss(logits: torch.Tensor, targets: torch.Tensor, recipe=None) -> torch.Tensor:
    """Soft targets (B, C) from Mixup: timm SoftTargetCrossEntropy (label smoothing is already in them);
    class indices (B,): cross-entropy with the recipe's label_smoothing."""
    if targets.is_floating_point() and targets.ndim == logits.ndim:
        from timm.loss import SoftTargetCrossEntropy
        return SoftTargetCrossEntropy()(logits, targets)
    return F.cross_entropy(logits, targets, label_smoothing=recipe.label_smoothing if recipe is not None else 0.0)


class PrivateRNG:
    """Seeded states of the global python / numpy / torch (CPU) generators, swapped in by `with rng:`."""

    def __init__(self, seed: int):
        seed = int(seed)
        self._state = (random.Random(seed).getstate(), np.random.RandomState(seed % 2 ** 32).get_state(),
                       torch.Generator().manual_seed(seed).get_state())
        self._saved = None

    def __enter__(self):
        self._saved = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        random.setstate(self._state[0])
        np.random.set_state(self._state[1])
        torch.set_rng_state(self._state[2])
        return self

    def __exit__(self, *exc):
        self._state = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        random.setstate(self._saved[0])
        np.random.set_state(self._saved[1])
        torch.set_rng_state(self._saved[2])
        self._saved = None
        return False
