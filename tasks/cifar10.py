"""CIFAR-10 classification (GOHSP's ViT-Small table), and its micro stand-in.

Layout: the standard python-pickle release (cifar-10-python.tar.gz, extracted), the one torchvision's
CIFAR10 reads:

    <root>/cifar-10-batches-py/data_batch_1 ... data_batch_5   (10000 images each)
    <root>/cifar-10-batches-py/test_batch                      (10000 images)
    <root>/cifar-10-batches-py/batches.meta                    (label_names)

each batch a pickled dict {data: uint8 (N, 3072) row-major RGB planes, labels: [N], batch_label, filenames}.

Splits: `train` = the training batches without the last `holdout` images (default 5000, i.e. the last half
of data_batch_5), `val` = those held-out images (for any selection), `test` = test_batch (the reported
metric). Training augmentation: random crop 32 with 4-pixel zero padding + horizontal flip (the standard
CIFAR recipe), CIFAR mean/std normalisation; images are resized batch-wise (bilinear) when the model's
image size is not 32.

Profiles
- paper: `<data_root>/cifar10` read by torchvision.datasets.CIFAR10(download=False) (checksums included).
- micro: `<cache_dir>/data/cifar10_micro-<hash>`, written atomically by `generate_micro` in exactly the same
  pickle layout (5 training batches + test_batch + batches.meta) with the synthetic scenes of the micro
  ImageNet generator (class = shape x colour family). Read by the same torchvision reader with the md5
  checks of the official files switched off (they cannot match synthetic data).

Training recipe (bench.recipe, data side): hflip (the flip probability, default 0.5); auto_augment and
color_jitter (timm's RandAugment / AutoAugment / AugMix and ColorJitter, per image after the crop and flip, as
timm's `transforms_imagenet_train` secondary stage); reprob / remode / recount (timm RandomErasing on the
normalised batch); mixup, cutmix, cutmix_minmax, mixup_prob / switch_prob / mode (timm Mixup, soft targets);
label_smoothing. Not crop_scale: the CIFAR crop is the padded random crop (data.crop_padding), not a random
resized crop.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pydantic import Field

from bench.api import TaskAdapter
from bench.errors import BenchError, MissingData
from bench.options import NonNegInt, OptionsModel, PositiveInt
from bench.recipe import TASK_RECIPE_KEYS
from bench.registry import register_task
from tasks.augment import PrivateRNG, classification_loss, mixup_for
from tasks.micro_data import generate_atomically, micro_folder
from tasks.common.batching import generator, micro_batches
from tasks.common.protocol_inputs import image_batch

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
BASE = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
LAYOUT_VERSION = 1
GENERATOR_VERSION = 1
EVAL_BATCH_SIZE = 500
DEFAULT_HOLDOUT = 5000

LAYOUT = f"""\
  <root>/{BASE}/data_batch_1 ... data_batch_5   (python pickles, 10000 images each)
  <root>/{BASE}/test_batch
  <root>/{BASE}/batches.meta
  (the extracted cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html)"""

MICRO_DEFAULTS = {"train_per_class": 200, "test_per_class": 50, "holdout_per_class": 20, "seed": 4321}


class Cifar10Data(OptionsModel):
    """The `data:` block of the cifar10 task. Augmentation and mixup are training-recipe keys, not data keys."""

    train_per_class: PositiveInt = Field(MICRO_DEFAULTS["train_per_class"], description="micro: training images per class")
    test_per_class: PositiveInt = Field(MICRO_DEFAULTS["test_per_class"], description="micro: test images per class")
    holdout_per_class: NonNegInt = Field(MICRO_DEFAULTS["holdout_per_class"],
                                         description="micro: training images per class held out as the val split")
    seed: NonNegInt = Field(MICRO_DEFAULTS["seed"], description="micro: generator seed")
    holdout: NonNegInt = Field(DEFAULT_HOLDOUT, description="paper: the last N training images, held out as the "
                                                            "val split (5000: the second half of data_batch_5)")
    image_size: PositiveInt = Field(32, description="model input side; images are resized (bilinear) when not 32")
    crop_padding: NonNegInt = Field(4, description="training random crop: zero padding on each side (CIFAR: 4)")


def _write_pickle(path: Path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def generate_micro(root, train_per_class: int = 200, test_per_class: int = 50, seed: int = 4321) -> Path:
    """Write a synthetic CIFAR-10 in the python-pickle layout into `root`/cifar-10-batches-py.

    32x32 scenes from tasks.imagenet.render_micro_image (10 classes: 2 shapes x 5 colour families, random
    pose, clutter, noise): a tiny ViT learns them in a few epochs and loses accuracy when pruned hard.
    Training images are shuffled over the 5 batches (as in CIFAR); deterministic for given settings."""
    from tasks.imagenet import render_micro_image

    root = Path(root)
    d = root / BASE
    d.mkdir(parents=True, exist_ok=True)

    def make(split_id, per_class):
        imgs, labels = [], []
        for c in range(10):
            for i in range(per_class):
                img = render_micro_image(np.random.default_rng([seed, split_id, c, i]), c, 10, 32)
                imgs.append(np.asarray(img, np.uint8).transpose(2, 0, 1).reshape(-1))
                labels.append(c)
        perm = np.random.default_rng([seed, split_id, 99]).permutation(len(labels))
        return np.stack(imgs)[perm], [labels[i] for i in perm]

    x, y = make(0, int(train_per_class))
    for b, chunk in enumerate(np.array_split(np.arange(len(y)), 5)):
        _write_pickle(d / TRAIN_FILES[b], {"batch_label": f"training batch {b + 1} of 5", "data": x[chunk],
                                           "labels": [y[i] for i in chunk],
                                           "filenames": [f"micro_{b}_{i}.png" for i in range(len(chunk))]})
    xt, yt = make(1, int(test_per_class))
    _write_pickle(d / "test_batch", {"batch_label": "testing batch 1 of 1", "data": xt, "labels": yt,
                                     "filenames": [f"micro_test_{i}.png" for i in range(len(yt))]})
    _write_pickle(d / "batches.meta", {"label_names": list(CLASSES), "num_cases_per_batch": len(y) // 5,
                                       "num_vis": 3072})
    (root / "README.txt").write_text(
        "Micro CIFAR-10: synthetic stand-in written by tasks.cifar10.generate_micro "
        f"(generator {GENERATOR_VERSION}, layout {LAYOUT_VERSION}); settings "
        f"{json.dumps({'train_per_class': train_per_class, 'test_per_class': test_per_class, 'seed': seed})}.\n"
        "Same layout as the CIFAR-10 python release:\n" + LAYOUT + "\nNot comparable with CIFAR-10 numbers.\n")
    return root


def _reader(micro: bool):
    from torchvision.datasets import CIFAR10
    if not micro:
        return CIFAR10

    class MicroCIFAR10(CIFAR10):          # same reader, no md5 of the official files
        train_list = [[f, None] for f, _ in CIFAR10.train_list]
        test_list = [[f, None] for f, _ in CIFAR10.test_list]
        meta = {**CIFAR10.meta, "md5": None}
    return MicroCIFAR10


@register_task("cifar10")
class Cifar10Task(TaskAdapter):
    """CIFAR-10 top-1 (percent) on test_batch; validation = the last `holdout` training images."""

    name = "cifar10"
    VERSION = 2   # 2: one generator per micro-batch for its augmentation (tasks.common.batching)
    metrics = {"top1": True}
    layout = LAYOUT
    Data = Cifar10Data
    RECIPE_KEYS = frozenset(TASK_RECIPE_KEYS) - {"crop_scale"}

    def __init__(self, settings, data_root, profile, cache_dir):
        super().__init__(settings, data_root, profile, cache_dir)
        self._data = None

    @property
    def micro_settings(self) -> dict:
        return {k: int(getattr(self.settings, k)) for k in MICRO_DEFAULTS}

    @property
    def holdout(self) -> int:
        if self.profile == "micro":
            return 10 * self.micro_settings["holdout_per_class"]
        return self.settings.holdout

    @property
    def image_size(self) -> int:
        return self.settings.image_size

    @property
    def root(self) -> Path:
        if self.profile == "paper":
            return self.data_root / "cifar10"
        s = {k: v for k, v in self.micro_settings.items() if k != "holdout_per_class"}
        return micro_folder(self.cache_dir, "cifar10", {**s, "generator": GENERATOR_VERSION})

    # ---------------------------------------------------------------- prepare
    def prepare(self) -> None:
        if self._data is not None:
            return
        if self.profile == "micro":
            self._prepare_micro()
        d = self.root / BASE
        for f in TRAIN_FILES + ("test_batch", "batches.meta"):
            if not (d / f).is_file():
                how = ("Extract cifar-10-python.tar.gz into <data_root>/cifar10/ (data_root = --data-root DIR or "
                       "BENCH_DATA); nothing is downloaded at run time. The micro profile needs no data.")
                raise MissingData(f"CIFAR-10 file {f}", d / f, self.layout, how)
        reader = _reader(self.profile == "micro")
        try:
            tr = reader(str(self.root), train=True, download=False)
            te = reader(str(self.root), train=False, download=False)
        except RuntimeError as e:
            raise BenchError(f"CIFAR-10 at {self.root} cannot be read ({e}). Expected layout:\n{self.layout}")
        x = torch.from_numpy(np.ascontiguousarray(tr.data)).permute(0, 3, 1, 2).contiguous()
        y = torch.tensor(tr.targets, dtype=torch.long)
        n_hold = self.holdout
        if not 0 <= n_hold < len(y):
            raise BenchError(f"cifar10 holdout {n_hold} must be in [0, {len(y)})")
        cut = len(y) - n_hold
        xt = torch.from_numpy(np.ascontiguousarray(te.data)).permute(0, 3, 1, 2).contiguous()
        self._data = {"train": (x[:cut], y[:cut]), "val": (x[cut:], y[cut:]),
                      "test": (xt, torch.tensor(te.targets, dtype=torch.long))}

    def _prepare_micro(self) -> None:
        s = self.micro_settings
        generate_atomically(self.root, lambda tmp: generate_micro(tmp, s["train_per_class"], s["test_per_class"],
                                                                  s["seed"]))

    def split(self, split: str):
        if split not in ("train", "val", "test"):
            raise BenchError(f"cifar10 has splits 'train', 'val' (held out from training) and 'test', not {split!r}")
        self.prepare()
        return self._data[split]

    @property
    def train_size(self) -> int:
        return int(self.split("train")[1].shape[0])

    def steps_per_epoch(self, batch_size: int) -> int:
        return max(1, self.train_size // int(batch_size))

    # ---------------------------------------------------------------- batches
    def _to_input(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().div_(255)
        if x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
        return (x - mean) / std

    def secondary_transform(self, recipe=None):
        """The recipe's per-image colour stage (PIL -> PIL) or None: timm `transforms_imagenet_train`'s
        secondary transforms (auto_augment, else color_jitter) at CIFAR's 32 px and mean."""
        if recipe is None or not (recipe.auto_augment or recipe.color_jitter):
            return None
        from timm.data.transforms_factory import transforms_imagenet_train
        _, secondary, _ = transforms_imagenet_train(32, auto_augment=recipe.auto_augment,
                                                    color_jitter=recipe.color_jitter or None,
                                                    interpolation="bicubic", mean=CIFAR10_MEAN, std=CIFAR10_STD,
                                                    separate=True)
        return secondary

    def train_batches(self, batch_size: int, seed: int, recipe=None, shard=None):
        """Endless (images (B,3,S,S) normalised, labels) with random crop (pad 4) + flip, reshuffled per epoch;
        then the recipe's auto_augment / color_jitter per image, random erasing and mixup/cutmix (labels become
        soft targets (B, 10)). The micro-batches of `tasks.common.batching.micro_batches`, each augmented from
        its own seed (crop and flip on a torch Generator, the timm transforms on `PrivateRNG`); with `shard`,
        only this rank's are made."""
        x, y = self.split("train")
        n = x.shape[0]
        bs = min(int(batch_size), n)
        hflip = recipe.hflip if recipe is not None and recipe.hflip is not None else 0.5
        secondary = self.secondary_transform(recipe)
        erase = None
        if recipe is not None and recipe.reprob > 0:
            from timm.data.random_erasing import RandomErasing
            erase = RandomErasing(recipe.reprob, mode=recipe.remode, max_count=recipe.recount, device="cpu")
        mix = mixup_for(recipe, len(CLASSES), bs)
        return self._batches(x, y, micro_batches(n, bs, int(seed), shard), self.settings.crop_padding, hflip,
                             secondary, erase, mix)

    def _batches(self, x, y, stream, pad, hflip, secondary, erase, mix):
        import contextlib
        plain = secondary is None and erase is None and mix is None   # draws only from the batch's generator
        for idx, bseed in stream:
            g, bs = generator(bseed), len(idx)
            xb = F.pad(x[idx], (pad, pad, pad, pad))
            H = x.shape[-1]
            ox = torch.randint(0, 2 * pad + 1, (bs,), generator=g)
            oy = torch.randint(0, 2 * pad + 1, (bs,), generator=g)
            flip = torch.rand(bs, generator=g) < hflip
            out = torch.empty_like(x[idx])
            for j in range(bs):
                crop = xb[j, :, oy[j]:oy[j] + H, ox[j]:ox[j] + H]
                out[j] = crop.flip(-1) if flip[j] else crop
            labels = y[idx]
            with contextlib.nullcontext() if plain else PrivateRNG(bseed):
                if secondary is not None:
                    from PIL import Image
                    out = torch.stack([torch.from_numpy(np.asarray(secondary(Image.fromarray(
                        a.permute(1, 2, 0).numpy())), dtype=np.uint8).copy()).permute(2, 0, 1) for a in out])
                imgs = self._to_input(out)
                if erase is not None:
                    imgs = erase(imgs)
                if mix is not None:
                    imgs, labels = mix(imgs, labels)
            yield imgs, labels

    def loss(self, model: nn.Module, batch, device, recipe=None) -> torch.Tensor:
        """Cross-entropy with the recipe's label smoothing; soft (mixup) targets: timm SoftTargetCrossEntropy."""
        images, targets = batch
        return classification_loss(model(images.to(device)), targets.to(device), recipe)

    def evaluate(self, model: nn.Module, split: str = "test", device="cpu") -> dict:
        """{"top1": %, "n": images} on `split` (test: the reported metric; val: for selection)."""
        x, y = self.split(split)
        device = torch.device(device)
        was = model.training
        model.eval()
        correct = 0
        try:
            with torch.inference_mode():
                for i in range(0, x.shape[0], EVAL_BATCH_SIZE):
                    logits = model(self._to_input(x[i:i + EVAL_BATCH_SIZE]).to(device)).float()
                    correct += int((logits.argmax(-1).cpu() == y[i:i + EVAL_BATCH_SIZE]).sum())
        finally:
            model.train(was)
        if x.shape[0] == 0:
            raise BenchError(f"cifar10 {split} split is empty")
        return {"top1": 100.0 * correct / x.shape[0], "n": int(x.shape[0])}

    def dummy_inputs(self, model_config: dict, batch_size: int, device) -> tuple:
        return image_batch(model_config, batch_size, device, self.image_size)

    def public_train_size(self, data: dict) -> tuple:
        """The 50,000 images of data_batch_1..5 minus the cell's `holdout` (default DEFAULT_HOLDOUT)."""
        hold = int(data.get("holdout", DEFAULT_HOLDOUT) or 0)
        return 50_000 - hold, True, f"CIFAR-10 train 50,000 minus the suite's holdout of {hold:,}"

    def fingerprint(self) -> dict:
        fp = {"task": self.name, "profile": self.profile, "layout_version": LAYOUT_VERSION,
              "holdout": self.holdout, "image_size": self.image_size}
        if self.profile == "micro":
            fp.update(generator="tasks.cifar10.generate_micro", generator_version=GENERATOR_VERSION,
                      **self.micro_settings)
        else:
            fp["root"] = str(self.root.resolve())
        return fp
