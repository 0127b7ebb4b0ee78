"""ADE20K (SceneParsing, 150 classes) semantic segmentation with Segmenter's recipe, and its micro stand-in.

Layout (the public `ADEChallengeData2016.zip`, the one mmseg and Segmenter read):

    <root>/ADEChallengeData2016/images/training/ADE_train_00000001.jpg
    <root>/ADEChallengeData2016/images/validation/ADE_val_00000001.jpg
    <root>/ADEChallengeData2016/annotations/training/ADE_train_00000001.png
    <root>/ADEChallengeData2016/annotations/validation/ADE_val_00000001.png

Every image needs the annotation of the same stem (a missing one is an error naming the file). Annotation
PNG values: 0 = "other / unlabelled" (ignored), 1..150 = the classes; as mmseg's `reduce_zero_label`, they
become 0..149 and 0 becomes the ignore index 255.

Profiles
- paper: root = `<data_root>/ade20k` (data_root = `--data-root DIR` or $BENCH_DATA); Segmenter's ADE20K
  pipeline (segm/data/config/ade20k.py, mmseg 0.x ops) re-implemented with torch/PIL/numpy:
  train = random resize to ratio 0.5-2.0 of the (2048, 512) scale (keep ratio), random 512 crop with
  cat_max_ratio 0.75, horizontal flip, PhotoMetricDistortion, normalise (Segmenter's "vit" statistics,
  mean = std = 0.5), pad to 512 (image 0, label 255); eval = resize (keep ratio) to the (2048, 512) scale
  x each ratio, optional flip, Segmenter's `inference` (short side raised to the window, sliding windows of
  512 with stride 480 = crop - 32, logits averaged over overlaps, resized to the original size, softmax,
  summed over the augmentations), argmax. Single scale = ratio 1.0 without flip; multi-scale = ratios
  0.5, 0.75, 1.0, 1.25, 1.5, 1.75, each with and without flip (docs/specs/upop.md §6.6).
- micro: `<cache_dir>/data/ade20k_micro-<hash>/ADEChallengeData2016/...`, written on first use by
  `generate_micro` in exactly the same layout (real JPEG images and PNG annotations): synthetic 64x96
  scenes (sky, ground, buildings, and objects of 5 shape classes with overlapping colour families, plus
  unlabelled clutter). The splits are decoded once into uint8 tensors; training augmentation is a cheap
  batched version of the paper's (random resize 0.5-2.0 + crop + pad via one grid_sample, flip,
  brightness / contrast / saturation / hue jitter; no cat_max_ratio); evaluation is the paper's code.

Metrics (percent): `miou` (single scale), `miou_ms` (multi-scale + flip), `pixel_acc` (single scale), from
confusion matrices accumulated over the whole split (ignore pixels excluded); IoU of a class that is
neither in the ground truth nor predicted is undefined and left out of the mean (mmseg's nanmean).
`evaluate` also returns `per_class_iou` / `per_class_iou_ms` (lists, None = undefined) and `n`.

This module is the task adapter (settings, layout reading, the micro generator's files, loaders, training
batches, loss, evaluation); the parts by concern: the micro scenes in tasks.common.scenes, the training
transforms and normalisation in tasks.common.seg_transforms, sliding-window / multi-scale inference in
tasks.common.seg_inference, the confusion matrix and mIoU in metrics.segmentation.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

from typing import ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from bench.api import TaskAdapter
from bench.errors import BenchError, MissingData
from bench.options import Fraction, NonNegInt, OptionsModel, PositiveFloat, PositiveInt
from bench.registry import register_task
from metrics.segmentation import IGNORE_INDEX, confusion_matrix, segmentation_metrics
from tasks.common.files import load_image, scan_images
from tasks.common.scenes import MICRO_CLASSES, MICRO_SCENE, render_micro_scene
from tasks.common.batching import generator, micro_batches, seeded_batches
from tasks.common.seg_inference import predict_probs
from tasks.common.seg_transforms import batch_train_transform, normalize, train_transform
from tasks.micro_data import generate_atomically, micro_folder
from tasks.common.protocol_inputs import image_batch

LAYOUT_VERSION = 1
GENERATOR_VERSION = 1          # bump when the micro scenes (tasks.common.scenes) change: part of the folder hash
DATASET_DIR = "ADEChallengeData2016"
SPLITS = {"training": "training", "train": "training", "validation": "validation", "val": "validation"}
FILE_PREFIX = {"training": "ADE_train_", "validation": "ADE_val_"}

LAYOUT = """\
  <root>/ade20k/ADEChallengeData2016/images/training/*.jpg       e.g. ADE_train_00000001.jpg
  <root>/ade20k/ADEChallengeData2016/images/validation/*.jpg     e.g. ADE_val_00000001.jpg
  <root>/ade20k/ADEChallengeData2016/annotations/training/*.png  same stem as the image
  <root>/ade20k/ADEChallengeData2016/annotations/validation/*.png
  (annotation PNG values: 0 = unlabelled (ignored), 1..150 = classes)"""

# the defaults that differ between the profiles (a null in the data block); the others are ADE20KData's
PAPER_DEFAULTS = dict(num_classes=150, image_size=512, crop_size=512, cat_max_ratio=0.75, eval_batch_size=8)
MICRO_TASK_DEFAULTS = dict(num_classes=8, image_size=64, crop_size=64, cat_max_ratio=None, eval_batch_size=128)
MICRO_KEYS = ("num_classes", "train_images", "val_images", "height", "width", "seed")   # generator settings


class ADE20KData(OptionsModel):
    """A profile's `data:` block for ade20k: Segmenter's pipeline and the micro generator."""

    num_classes: PositiveInt | None = Field(None, description="classes (null: 8 micro, the generator's; 150 paper)")
    image_size: PositiveInt | None = Field(None, description="short side of the resize scale (max_ratio x it, it) "
                                                             "(null: 64 micro, 512 paper)")
    crop_size: PositiveInt | None = Field(None, description="training crop (null: 64 micro, 512 paper)")
    max_ratio: PositiveInt = Field(4, description="long side of the resize scale over its short side (2048 / 512)")
    ratio_range: list[PositiveFloat] = Field([0.5, 2.0], min_length=2, max_length=2,
                                             description="random resize range of the training scale")
    cat_max_ratio: Fraction | None = Field(None, description="paper: redraw a crop where one class covers more than "
                                                             "this (1: off; null: 0.75 paper, off micro)")
    ms_ratios: list[PositiveFloat] = Field([0.5, 0.75, 1.0, 1.25, 1.5, 1.75], min_length=1,
                                           description="scales of the multi-scale evaluation (miou_ms)")
    ms_flip: bool = Field(True, description="the multi-scale evaluation adds the flipped images")
    normalization: Literal["vit", "deit"] = Field("vit", description="Segmenter's normalisation statistics (vit: mean = std = 0.5)")
    workers: NonNegInt = Field(8, description="paper: DataLoader worker processes")
    eval_batch_size: PositiveInt | None = Field(None, description="sliding windows per forward (null: 128 micro, 8 paper)")
    window_size: PositiveInt | None = Field(None, description="sliding-window evaluation window (null: crop_size)")
    window_stride: PositiveInt | None = Field(None, description="its stride (null: window - 32 paper, 15/16 window micro)")
    selection_window_stride: PositiveInt | None = Field(
        None, description="the stride of the evaluation selection: paper runs after an epoch (single scale; "
                          "evaluate_for_selection); the official retrain's is Segmenter's config window_stride 512 "
                          "(rstrudel/segmenter segm/config.yml l. 114, read at sdc17/UPop compress_segmenter.py "
                          "l. 129), the reported miou.py's 480 (null: window_stride)")
    train_images: PositiveInt = Field(256, description="micro: training images the generator writes")
    val_images: PositiveInt = Field(40, description="micro: validation images")
    height: PositiveInt = Field(64, description="micro: image height")
    width: PositiveInt = Field(96, description="micro: image width")
    seed: NonNegInt = Field(1234, description="micro: generator seed")

    HASH_STABLE_KEYS: ClassVar[tuple] = ("selection_window_stride",)   # added after cells were recorded

# ----------------------------------------------------------------------------------------------------
# micro generator
# ----------------------------------------------------------------------------------------------------

def generate_micro(root, num_classes: int = 8, train_images: int = 256, val_images: int = 48, height: int = 64,
                   width: int = 96, seed: int = 1234) -> Path:
    """Write a synthetic ADE20K-layout data set under `root` (root/ADEChallengeData2016/...).

    Deterministic: scene i of split s is drawn from numpy's Generator seeded with (seed, s, i)."""
    from PIL import Image

    root = Path(root)
    num_classes, train_images, val_images = int(num_classes), int(train_images), int(val_images)
    height, width, seed = int(height), int(width), int(seed)
    if not 2 <= num_classes <= len(MICRO_CLASSES) or train_images < 1 or val_images < 1 or min(height, width) < 16:
        raise BenchError(f"bad micro ADE20K settings: num_classes={num_classes} (2..{len(MICRO_CLASSES)}), "
                         f"train_images={train_images}, val_images={val_images}, height={height}, width={width}")
    base = root / DATASET_DIR
    for s, (split, n) in enumerate((("training", train_images), ("validation", val_images))):
        (base / "images" / split).mkdir(parents=True, exist_ok=True)
        (base / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img, ann = render_micro_scene(np.random.default_rng([seed, s, i]), num_classes, height, width)
            stem = f"{FILE_PREFIX[split]}{i + 1:08d}"
            Image.fromarray(img).save(base / "images" / split / f"{stem}.jpg", format="JPEG", quality=95)
            Image.fromarray(ann, mode="L").save(base / "annotations" / split / f"{stem}.png", format="PNG")
    settings = dict(num_classes=num_classes, train_images=train_images, val_images=val_images, height=height,
                    width=width, seed=seed)
    (base / "objectInfo150.txt").write_text(
        "Idx\tName\n" + "".join(f"{i + 1}\t{n}\n" for i, n in enumerate(MICRO_CLASSES[:num_classes])))
    (root / "README.txt").write_text(
        "Micro ADE20K: synthetic stand-in written by tasks.ade20k.generate_micro "
        f"(generator version {GENERATOR_VERSION}, layout version {LAYOUT_VERSION}).\n"
        f"Settings: {json.dumps(settings, sort_keys=True)}\n"
        f"Scene parameters: {json.dumps(MICRO_SCENE)}\n"
        "Same on-disk layout as ADEChallengeData2016:\n" + LAYOUT + "\n"
        "Each scene: sky above a wavy horizon and textured ground, buildings with window grids, objects whose\n"
        "shape gives the class (their colour families overlap), unlabelled clutter (annotation 0), brightness/\n"
        "contrast jitter and pixel noise. Images JPEG quality 95, annotations PNG (mode L).\n"
        "Classes (annotation value: name): " + ", ".join(f"{i + 1}: {n}" for i, n in enumerate(MICRO_CLASSES[:num_classes]))
        + "\nNot comparable with ADE20K numbers.\n")
    return root


# ----------------------------------------------------------------------------------------------------
# layout reading, labels
# ----------------------------------------------------------------------------------------------------

def list_pairs(base: Path, split: str) -> list[tuple[Path, Path]]:
    """(image, annotation) paths of one split, sorted by file name; a missing annotation is an error."""
    img_dir, ann_dir = base / "images" / split, base / "annotations" / split
    if not img_dir.is_dir():
        raise MissingData(f"ADE20K {split} images", img_dir, LAYOUT, _HOW)
    if not ann_dir.is_dir():
        raise MissingData(f"ADE20K {split} annotations", ann_dir, LAYOUT, _HOW)
    images = sorted(e.name for e in os.scandir(img_dir) if e.name.lower().endswith((".jpg", ".jpeg", ".png"))
                    and e.is_file())
    if not images:
        raise MissingData(f"ADE20K {split} images (*.jpg)", img_dir, LAYOUT, _HOW)
    anns = {e.name for e in os.scandir(ann_dir) if e.name.endswith(".png")}
    missing = [n for n in images if Path(n).stem + ".png" not in anns]
    if missing:
        first = ann_dir / (Path(missing[0]).stem + ".png")
        raise BenchError(f"ADE20K {split}: annotation {first} is missing (the annotation of image "
                         f"{img_dir / missing[0]}); {len(missing)} image(s) of {len(images)} have no annotation"
                         f"{', e.g. ' + ', '.join(missing[1:4]) if len(missing) > 1 else ''}. Every image needs "
                         f"annotations/{split}/<same stem>.png. Expected layout:\n{LAYOUT}")
    return [(img_dir / n, ann_dir / (Path(n).stem + ".png")) for n in images]


_HOW = ("Point the suite at the folder that contains `ade20k/ADEChallengeData2016/` with `--data-root DIR` or the "
        "BENCH_DATA environment variable (unzip the public ADEChallengeData2016.zip there; nothing is downloaded). "
        "The micro profile needs no data.")


def reduce_zero_label(ann: np.ndarray) -> np.ndarray:
    """mmseg's reduce_zero_label: 0 -> 255 (ignore), v -> v - 1."""
    out = ann.astype(np.int16) - 1
    out[ann == 0] = IGNORE_INDEX
    return out.astype(np.uint8)


def read_image(path: Path) -> np.ndarray:
    return np.array(load_image(path, "RGB"))      # a decode error names the file


def read_label(path: Path) -> np.ndarray:
    """Annotation PNG -> uint8 labels 0..n-1, 255 = ignore."""
    a = np.asarray(load_image(path, None))        # class indices as stored (mode L / P); errors name the file
    if a.ndim != 2:
        raise BenchError(f"{path}: an ADE20K annotation is a single-channel PNG of class indices, got shape {a.shape}")
    return reduce_zero_label(a)


# ----------------------------------------------------------------------------------------------------
# paper-profile datasets (DataLoader workers)
# ----------------------------------------------------------------------------------------------------

class _TrainSet(torch.utils.data.Dataset):
    """The training pairs indexed by (index, seed): each sample's transform draws from its own seed
    (tasks.common.batching.seeded_batches)."""

    def __init__(self, pairs, opts: dict):
        self.pairs, self.opts = pairs, opts

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, item):
        i, seed = item
        rng = random.Random(seed)
        img_path, ann_path = self.pairs[i]
        return train_transform(read_image(img_path), read_label(ann_path), rng, **self.opts)


class _EvalSet(torch.utils.data.Dataset):
    def __init__(self, pairs):
        self.pairs = pairs

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        img_path, ann_path = self.pairs[i]
        img = torch.from_numpy(np.ascontiguousarray(read_image(img_path))).permute(2, 0, 1)
        return img, torch.from_numpy(read_label(ann_path))


# ----------------------------------------------------------------------------------------------------
# the task adapter
# ----------------------------------------------------------------------------------------------------

@register_task("ade20k")
class ADE20KTask(TaskAdapter):
    """ADE20K semantic segmentation: mIoU single-/multi-scale and pixel accuracy (percent)."""

    name = "ade20k"
    VERSION = 2   # 2: one generator per micro-batch (paper: per image) for its augmentation (tasks.common.batching)
    metrics = {"miou": True, "miou_ms": True, "pixel_acc": True}
    layout = LAYOUT
    Data = ADE20KData

    def __init__(self, settings, data_root, profile, cache_dir):
        super().__init__(settings, data_root, profile, cache_dir)
        self._prepared = False
        self._pairs: dict = {}
        self._mem: dict = {}

    # ---------------------------------------------------------------- settings and paths
    @property
    def micro_settings(self) -> dict:
        s = {k: getattr(self.settings, k) for k in MICRO_KEYS}
        if s["num_classes"] is None:
            s["num_classes"] = MICRO_TASK_DEFAULTS["num_classes"]
        return s

    def opt(self, key):
        """A data setting; where the block leaves it null, the profile's default."""
        v = getattr(self.settings, key)
        if v is not None:
            return v
        return (PAPER_DEFAULTS if self.profile == "paper" else MICRO_TASK_DEFAULTS).get(key)

    @property
    def num_classes(self) -> int:
        return int(self.opt("num_classes"))

    @property
    def crop_size(self) -> int:
        return int(self.opt("crop_size"))

    @property
    def scale(self) -> tuple:
        """(long, short) resize scale: Segmenter's (max_ratio x image_size, image_size), (2048, 512) on ADE20K."""
        s = int(self.opt("image_size"))
        return (int(self.opt("max_ratio")) * s, s)

    @property
    def window(self) -> tuple[int, int]:
        """(window, stride) of the sliding-window evaluation: Segmenter's window = crop and stride = crop - 32
        (512 / 480) on the paper profile; on the micro profile the same proportion, stride = 15/16 window."""
        ws = self.settings.window_size if self.settings.window_size is not None else self.crop_size
        default = ws - 32 if self.profile == "paper" else max(1, round(ws * 15 / 16))
        return ws, self.settings.window_stride if self.settings.window_stride is not None else default

    @property
    def base(self) -> Path:
        if self.profile == "paper":
            return self.data_root / "ade20k"
        return micro_folder(self.cache_dir, "ade20k",
                            {**self.micro_settings, "generator": GENERATOR_VERSION, "scene": MICRO_SCENE})

    @property
    def root(self) -> Path:
        return self.base / DATASET_DIR

    # ---------------------------------------------------------------- prepare
    def prepare(self) -> None:
        if self._prepared:
            return
        if self.profile == "micro":
            self._prepare_micro()
        if not self.root.is_dir():
            raise MissingData("ADE20K data set", self.root, LAYOUT, _HOW)
        for split in ("training", "validation"):
            self._pairs[split] = list_pairs(self.root, split)
        if self.profile == "paper":        # real data: a truncated image or annotation fails here, naming itself
            import hashlib
            tag = hashlib.sha256(str(self.root.resolve()).encode()).hexdigest()[:16]
            scan_images([p for pairs in self._pairs.values() for pair in pairs for p in pair], "the ADE20K images and annotations",
                        stamp=self.cache_dir / "scans" / f"ade20k-{tag}.txt")
        self._prepared = True

    def _prepare_micro(self) -> None:
        generate_atomically(self.base, lambda tmp: generate_micro(tmp, **self.micro_settings))

    def _split(self, split: str) -> str:
        if split not in SPLITS:
            raise BenchError(f"ade20k has splits 'validation' (the labelled evaluation split, alias 'val') and "
                             f"'training' (alias 'train'), not {split!r}")
        return SPLITS[split]

    def pairs(self, split: str) -> list:
        self.prepare()
        return self._pairs[self._split(split)]

    def _micro_split(self, split: str):
        """Decoded uint8 images (N, 3, H, W) and labels (N, H, W) (255 = ignore) of a micro split."""
        split = self._split(split)
        if split not in self._mem:
            imgs, labs = [], []
            for ip, ap in self.pairs(split):
                imgs.append(read_image(ip))
                labs.append(read_label(ap))
            shapes = {a.shape for a in imgs}
            if len(shapes) != 1:
                raise BenchError(f"micro ADE20K at {self.root}: images of different sizes {sorted(shapes)[:3]}")
            x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()
            self._mem[split] = (x, torch.from_numpy(np.stack(labs)))
        return self._mem[split]

    # ---------------------------------------------------------------- training
    @property
    def train_size(self) -> int:
        return len(self.pairs("training"))

    def steps_per_epoch(self, batch_size: int) -> int:
        """Optimizer steps in one epoch of `train_batches(batch_size, ...)` (last partial batch dropped)."""
        return max(1, self.train_size // int(batch_size))

    def train_batches(self, batch_size: int, seed: int, recipe=None, shard=None):
        """Endless iterator of (images float (B, 3, crop, crop) normalised, labels long (B, crop, crop), 255 =
        ignore) on the CPU: the micro-batches of `tasks.common.batching.micro_batches` (each epoch has
        `steps_per_epoch(batch_size)` of them; with `shard`, only this rank's are loaded), each augmented from
        its own seed (paper: one seed per image, whatever the loader's workers)."""
        self.prepare()
        if self.profile == "micro":
            return self._micro_train_batches(int(batch_size), int(seed), shard)
        return self._paper_train_batches(int(batch_size), int(seed), shard)

    def _micro_train_batches(self, batch_size, seed, shard=None):
        x, y = self._micro_split("training")
        ratio_range = tuple(self.opt("ratio_range"))
        for idx, bseed in micro_batches(x.shape[0], batch_size, seed, shard):
            yield batch_train_transform(x[idx], y[idx], generator(bseed), scale=self.scale, crop=self.crop_size,
                                        ratio_range=ratio_range, normalization=self.opt("normalization"))

    def _paper_train_batches(self, batch_size, seed, shard=None):
        from torch.utils.data import DataLoader
        opts = dict(scale=self.scale, crop=self.crop_size, ratio_range=tuple(self.opt("ratio_range")),
                    cat_max_ratio=self.opt("cat_max_ratio"), normalization=self.opt("normalization"))
        ds = _TrainSet(self.pairs("training"), opts)
        loader = DataLoader(ds, batch_sampler=seeded_batches(len(ds), batch_size, seed, shard),
                            num_workers=int(self.opt("workers")), pin_memory=torch.cuda.is_available())
        yield from loader

    def loss(self, model: nn.Module, batch, device, recipe=None) -> torch.Tensor:
        """Pixel cross-entropy, ignore index 255 (Segmenter's criterion)."""
        images, labels = batch
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        logits = model(images)
        if not bool((labels != IGNORE_INDEX).any()):
            return logits.sum() * 0.0               # an all-ignore batch (rare): no signal, not NaN
        return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)

    # ---------------------------------------------------------------- evaluation
    def _eval_items(self, split: str):
        if self.profile == "micro":
            x, y = self._micro_split(split)
            for i in range(x.shape[0]):
                yield x[i], y[i]
        else:
            from torch.utils.data import DataLoader
            workers = int(self.opt("workers"))
            yield from DataLoader(_EvalSet(self.pairs(split)), batch_size=None, shuffle=False, num_workers=workers)

    def evaluate(self, model: nn.Module, split: str = "validation", device="cpu", multiscale: bool = True,
                 stride: int | None = None) -> dict:
        """{"miou", "miou_ms", "pixel_acc" (percent), "per_class_iou", "per_class_iou_ms", "n"} on `split`.
        Single scale: ratio 1.0, sliding window; multi-scale: the `ms_ratios` with flip (skipped when
        multiscale=False). `stride`: the sliding window's (None: the data block's window_stride)."""
        split = self._split(split)
        self.prepare()
        device = torch.device(device)
        n_cls = self.num_classes
        window, stride = self.window[0], stride or self.window[1]
        ms_ratios, ms_flip = tuple(self.opt("ms_ratios")), bool(self.opt("ms_flip"))
        bs = int(self.opt("eval_batch_size"))
        norm = self.opt("normalization")
        cm_ss = torch.zeros(n_cls, n_cls, dtype=torch.long)
        cm_ms = torch.zeros(n_cls, n_cls, dtype=torch.long)
        was_training = model.training
        model.eval()
        n = 0
        try:
            with torch.inference_mode():
                for img, lab in self._eval_items(split):
                    im = normalize(img.to(device).float() / 255, norm)
                    probs = predict_probs(model, im, scale=self.scale, window=window, stride=stride, device=device,
                                          batch_size=bs)
                    if probs.shape[0] != n_cls:
                        raise BenchError(f"the model predicts {probs.shape[0]} classes, the {self.profile} ADE20K "
                                         f"data has {n_cls}: set the model's n_cls to {n_cls}")
                    cm_ss += confusion_matrix(probs.argmax(0).cpu(), lab, n_cls)
                    if multiscale:
                        probs = predict_probs(model, im, scale=self.scale, window=window, stride=stride,
                                              ratios=ms_ratios, flip=ms_flip, device=device, batch_size=bs)
                        cm_ms += confusion_matrix(probs.argmax(0).cpu(), lab, n_cls)
                    n += 1
        finally:
            model.train(was_training)
        if n == 0:
            raise BenchError(f"ade20k {split} split at {self.root} has no images")
        ss = segmentation_metrics(cm_ss)
        out = {"miou": ss["miou"], "pixel_acc": ss["pixel_acc"], "per_class_iou": ss["per_class_iou"], "n": n}
        if multiscale:
            ms = segmentation_metrics(cm_ms)
            out.update(miou_ms=ms["miou"], pixel_acc_ms=ms["pixel_acc"], per_class_iou_ms=ms["per_class_iou"])
        return out

    def evaluate_for_selection(self, model: nn.Module, split: str, device, metric: str) -> dict:
        """selection: paper's evaluation after an epoch, as the official retrain's `evaluate(model, val_loader,
        val_seg_gt, window_size, window_stride, amp_autocast)` (sdc17/UPop compress_segmenter.py l. 420 ff.;
        segm/engine.py evaluate: single scale): the multi-scale pass only for a multi-scale metric (miou_ms), the
        stride `selection_window_stride` (official: the config's 512; null: window_stride, as reported)."""
        return self.evaluate(model, split, device, multiscale=metric.endswith("_ms"),
                             stride=self.settings.selection_window_stride)

    # ---------------------------------------------------------------- measuring and caching
    def dummy_inputs(self, model_config: dict, batch_size: int, device) -> tuple:
        return image_batch(model_config, batch_size, device, self.crop_size)

    def public_train_size(self, data: dict) -> tuple:
        return 20_210, True, "ADE20K (SceneParsing 2016) training images"

    def fingerprint(self) -> dict:
        fp = {"task": self.name, "profile": self.profile, "layout_version": LAYOUT_VERSION,
              "settings": self.settings.to_dict()}
        if self.profile == "micro":
            fp.update(generator="tasks.ade20k.generate_micro", generator_version=GENERATOR_VERSION,
                      scene=json.loads(json.dumps(MICRO_SCENE)), **self.micro_settings)
        else:
            fp.update(root=str(self.root.resolve()))
        return fp
