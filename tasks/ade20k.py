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
"""
from __future__ import annotations

import colorsys
import json
import math
import os
import random
from pathlib import Path

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from bench.api import TaskAdapter
from bench.errors import BenchError, MissingData
from bench.options import Fraction, NonNegInt, OptionsModel, PositiveFloat, PositiveInt
from bench.registry import register_task
from tasks.common.files import load_image, scan_images
from tasks.micro_data import generate_atomically, micro_folder

IGNORE_INDEX = 255
LAYOUT_VERSION = 1
GENERATOR_VERSION = 1          # bump when the micro scenes change: it is part of the folder hash
DATASET_DIR = "ADEChallengeData2016"
SPLITS = {"training": "training", "train": "training", "validation": "validation", "val": "validation"}
FILE_PREFIX = {"training": "ADE_train_", "validation": "ADE_val_"}

LAYOUT = """\
  <root>/ade20k/ADEChallengeData2016/images/training/*.jpg       e.g. ADE_train_00000001.jpg
  <root>/ade20k/ADEChallengeData2016/images/validation/*.jpg     e.g. ADE_val_00000001.jpg
  <root>/ade20k/ADEChallengeData2016/annotations/training/*.png  same stem as the image
  <root>/ade20k/ADEChallengeData2016/annotations/validation/*.png
  (annotation PNG values: 0 = unlabelled (ignored), 1..150 = classes)"""

# Segmenter's normalisation statistics (segm/data/utils.py STATS); the ViT backbones use "vit"
NORMALIZATION = {"vit": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
                 "deit": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}

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
    train_images: PositiveInt = Field(256, description="micro: training images the generator writes")
    val_images: PositiveInt = Field(40, description="micro: validation images")
    height: PositiveInt = Field(64, description="micro: image height")
    width: PositiveInt = Field(96, description="micro: image width")
    seed: NonNegInt = Field(1234, description="micro: generator seed")

# ----------------------------------------------------------------------------------------------------
# micro generator
# ----------------------------------------------------------------------------------------------------

MICRO_CLASSES = ("sky", "ground", "building", "ball", "box", "tree", "sign", "ring")
THING_SHAPES = ("circle", "square", "triangle", "cross", "ring")   # classes 3.. (0-based), in this order
# Scene parameters (fractions of the image height unless said otherwise). Changing any of them changes the
# images: bump GENERATOR_VERSION (it is part of the cache folder name).
MICRO_SCENE = dict(
    horizon=(0.3, 0.6),            # mean horizon height
    horizon_wave=(0.0, 0.1),       # its sinusoidal amplitude
    n_buildings=(0, 2),
    building_width=(0.15, 0.35),   # fraction of the width
    n_things=(1, 3),
    thing_radius=(0.1, 0.2),
    hue_spread=1.0,                # thing hue jitter, in units of the distance between colour families
    n_clutter=(0, 1),              # unlabelled blobs (label 0 -> ignore)
    clutter_radius=(0.05, 0.12),
    noise=7.0,                     # pixel noise std (0..255)
)


def _hsv(h, s, v):
    return np.array(colorsys.hsv_to_rgb(h % 1.0, float(np.clip(s, 0, 1)), float(np.clip(v, 0, 1))), np.float32)


def _shape_mask(shape: str, dx, dy, r: float, angle: float):
    ca, sa = math.cos(angle), math.sin(angle)
    u, v = dx * ca + dy * sa, -dx * sa + dy * ca
    if shape == "circle":
        return u * u + v * v < (0.9 * r) ** 2
    if shape == "ring":
        d2 = u * u + v * v
        return (d2 < r * r) & (d2 > (0.55 * r) ** 2)
    if shape == "square":
        a = 0.8 * r
        return (np.abs(u) < a) & (np.abs(v) < a)
    if shape == "cross":
        w = 0.33 * r
        return ((np.abs(u) < r) & (np.abs(v) < w)) | ((np.abs(u) < w) & (np.abs(v) < r))
    if shape == "triangle":
        m = np.ones_like(u, dtype=bool)
        for t in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6):        # three half-planes at distance r/2:
            m &= (u * math.cos(t) + v * math.sin(t)) < 0.5 * r        # an equilateral triangle of circumradius r
        return m
    raise ValueError(shape)


def render_micro_scene(rng: np.random.Generator, num_classes: int, height: int, width: int):
    """One synthetic scene: (RGB uint8 (H, W, 3), annotation uint8 (H, W) with 0 = unlabelled, 1..n = classes)."""
    P = MICRO_SCENE
    H, W = height, width
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32) + 0.5
    img = np.zeros((H, W, 3), np.float32)
    ann = np.zeros((H, W), np.uint8)

    # sky (class 1) above a wavy horizon, ground (class 2) below
    h0 = rng.uniform(*P["horizon"]) * H
    horizon = h0 + rng.uniform(*P["horizon_wave"]) * H * np.sin(
        2 * math.pi * rng.uniform(0.5, 1.5) * xx / W + rng.uniform(0, 2 * math.pi))
    sky = yy < horizon
    top = _hsv(rng.uniform(0.55, 0.67), rng.uniform(0.4, 0.8), rng.uniform(0.6, 0.9))
    low = _hsv(rng.uniform(0.5, 0.62), rng.uniform(0.1, 0.4), rng.uniform(0.8, 1.0))
    t = (yy / H)[..., None]
    img[sky] = ((1 - t) * top + t * low)[sky]
    ann[sky] = 1
    g_col = _hsv(rng.uniform(0.05, 0.35), rng.uniform(0.4, 0.8), rng.uniform(0.3, 0.6))
    period = rng.uniform(3, 6)
    furrows = 0.12 * np.sin(2 * math.pi * (yy + 0.3 * xx * rng.uniform(-1, 1)) / period)[..., None]
    grain = rng.normal(0, 0.08, (H, W, 1)).astype(np.float32)
    img[~sky] = (g_col * (1 + furrows + grain))[~sky]
    ann[~sky] = 2

    # buildings (class 3): rectangles standing on the horizon, with a grid of darker windows
    if num_classes >= 3:
        for _ in range(int(rng.integers(P["n_buildings"][0], P["n_buildings"][1] + 1))):
            bw = rng.uniform(*P["building_width"]) * W
            x0 = rng.uniform(0, W - bw)
            btop = rng.uniform(0.05, 0.8) * h0
            bottom = horizon + rng.uniform(0.02, 0.1) * H
            m = (xx >= x0) & (xx < x0 + bw) & (yy >= btop) & (yy < bottom)
            col = _hsv(rng.uniform(0.02, 0.15), rng.uniform(0.0, 0.3), rng.uniform(0.35, 0.8))
            px, py = rng.uniform(5, 8), rng.uniform(6, 9)
            win = (((xx - x0) % px) < px / 2) & (((yy - btop) % py) < py / 2)
            shade = np.where(win, 0.55, 1.0)[..., None]
            img[m] = (col * shade)[m]
            ann[m] = 3

    # unlabelled clutter (annotation 0: ignored, as ADE20K's "other")
    for _ in range(int(rng.integers(P["n_clutter"][0], P["n_clutter"][1] + 1))):
        r = rng.uniform(*P["clutter_radius"]) * H
        cx, cy = rng.uniform(0, W), rng.uniform(0, H)
        m = ((xx - cx) / (1.6 * r)) ** 2 + ((yy - cy) / r) ** 2 < 1
        img[m] = _hsv(rng.random(), rng.uniform(0, 1), rng.uniform(0.2, 1))
        ann[m] = 0

    # things (classes 4..n): shapes; the colour family of a class overlaps its neighbours' (hue_spread)
    n_things = max(0, num_classes - 3)
    if n_things:
        for _ in range(int(rng.integers(P["n_things"][0], P["n_things"][1] + 1))):
            k = int(rng.integers(n_things))
            r = rng.uniform(*P["thing_radius"]) * H
            cx, cy = rng.uniform(r, W - r), rng.uniform(r, H - r)
            m = _shape_mask(THING_SHAPES[k], xx - cx, yy - cy, r, rng.uniform(0, 2 * math.pi))
            hue = k / n_things + rng.uniform(-0.5, 0.5) * P["hue_spread"] / n_things
            col = _hsv(hue, rng.uniform(0.5, 1.0), rng.uniform(0.5, 1.0))
            shade = (1 + 0.25 * ((xx - cx) * rng.uniform(-1, 1) + (yy - cy) * rng.uniform(-1, 1)) / (2 * r))[..., None]
            img[m] = (col * shade)[m]
            ann[m] = 4 + k

    a = img * 255
    a = (a - 128) * rng.uniform(0.8, 1.15) + 128 + rng.normal(0, 10)
    a = a + rng.normal(0, P["noise"], a.shape)
    return a.round().clip(0, 255).astype(np.uint8), ann


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
# metrics
# ----------------------------------------------------------------------------------------------------

def confusion_matrix(pred: torch.Tensor, gt: torch.Tensor, n_cls: int, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(n_cls, n_cls) int64 counts, rows = ground truth, columns = prediction; ignore pixels excluded."""
    gt = gt.reshape(-1).long()
    pred = pred.reshape(-1).long()
    valid = gt != ignore_index
    if bool((gt[valid] >= n_cls).any()) or bool((gt[valid] < 0).any()):
        bad = int(gt[valid][(gt[valid] >= n_cls) | (gt[valid] < 0)][0])
        raise BenchError(f"label {bad} outside 0..{n_cls - 1} (and not the ignore index {ignore_index}): the "
                         f"annotations have more classes than the model's {n_cls}")
    idx = gt[valid] * n_cls + pred[valid].clamp(0, n_cls - 1)
    return torch.bincount(idx, minlength=n_cls * n_cls).reshape(n_cls, n_cls).cpu()


def segmentation_metrics(cm: torch.Tensor) -> dict:
    """mIoU (mean over classes whose IoU is defined, i.e. present in the ground truth or predicted),
    pixel accuracy, per-class IoU; percent."""
    cm = cm.double()
    inter = cm.diag()
    union = cm.sum(0) + cm.sum(1) - inter
    iou = inter / union                      # nan where union == 0
    defined = union > 0
    total = cm.sum()
    return {"miou": float(100 * iou[defined].mean()) if bool(defined.any()) else float("nan"),
            "pixel_acc": float(100 * inter.sum() / total) if total > 0 else float("nan"),
            "per_class_iou": [float(100 * v) if d else None for v, d in zip(iou.tolist(), defined.tolist())]}


# ----------------------------------------------------------------------------------------------------
# inference (Segmenter's segm/model/utils.py `inference`, `sliding_window`, `merge_windows`, `resize`)
# ----------------------------------------------------------------------------------------------------

def window_anchors(size: int, window: int, stride: int) -> list[int]:
    """Segmenter's anchors: 0, stride, ... below size - window, then size - window (one window if it covers)."""
    window = min(window, size)
    return [a for a in range(0, size, stride) if a < size - window] + [size - window]


def _forward(model, x, device, batch_size):
    outs = []
    for i in range(0, x.shape[0], batch_size):
        chunk = x[i:i + batch_size].to(device, non_blocking=True)
        if torch.device(device).type == "cuda":
            with torch.autocast("cuda"):
                outs.append(model(chunk).float())
        else:
            outs.append(model(chunk).float())
    return torch.cat(outs)


def _windows(im: torch.Tensor, window: int, stride: int):
    _, H, W = im.shape
    wh, ww = min(window, H), min(window, W)
    anchors = [(a, b) for a in window_anchors(H, window, stride) for b in window_anchors(W, window, stride)]
    return [im[:, a:a + wh, b:b + ww] for a, b in anchors], anchors, (wh, ww)


def _merge(outs, anchors, wsize, shape):
    """Segmenter's `merge_windows` before its resize: window logits summed into place, divided by the count."""
    (wh, ww), (H, W) = wsize, shape
    logit = torch.zeros(outs.shape[1], H, W, device=outs.device)
    count = torch.zeros(1, H, W, device=outs.device)
    for o, (a, b) in zip(outs, anchors):
        logit[:, a:a + wh, b:b + ww] += o
        count[:, a:a + wh, b:b + ww] += 1
    return logit / count


def sliding_window_logits(model, im: torch.Tensor, window: int, stride: int, device="cpu", batch_size: int = 8):
    """Logits (C, H, W) of one normalised image (3, H, W) from windows of `window` pixels (clipped to the
    image) at `stride`, averaged where windows overlap (Segmenter's `sliding_window` + `merge_windows`
    before its resize and softmax)."""
    crops, anchors, wsize = _windows(im, window, stride)
    return _merge(_forward(model, torch.stack(crops), device, batch_size), anchors, wsize, im.shape[-2:])


def rescale_size(h: int, w: int, scale) -> tuple[int, int]:
    """mmcv's imrescale size for a (long, short) scale with keep_ratio: factor = min(long / max(h, w),
    short / min(h, w)), new size int(x * factor + 0.5)."""
    long_edge, short_edge = max(scale), min(scale)
    f = min(long_edge / max(h, w), short_edge / min(h, w))
    return int(h * f + 0.5), int(w * f + 0.5)


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x[None], size=tuple(size), mode="bilinear", align_corners=False)[0]


def tta_inputs(im: torch.Tensor, *, scale, window: int, ratios=(1.0,), flip: bool = False):
    """The test-time inputs of one normalised image (3, H, W), as [(image, flipped)]: for each ratio r,
    resized keep-ratio to (long, short) = scale x r (mmseg's MultiScaleFlipAug + Resize), the short side
    raised to the window if it is smaller (Segmenter's `resize(im, window_size)`), then with and without
    a horizontal flip if `flip`."""
    _, H0, W0 = im.shape
    out = []
    for r in ratios:
        h, w = rescale_size(H0, W0, (int(scale[0] * r), int(scale[1] * r)))
        x = _resize(im, (h, w))
        if min(h, w) < window:
            h2, w2 = (window, (w / h) * window) if h < w else ((h / w) * window, window)
            x = _resize(x, (int(h2), int(w2)))
        out.append((x, False))
        if flip:
            out.append((torch.flip(x, (2,)), True))
    return out


def predict_probs(model, im: torch.Tensor, *, scale, window: int, stride: int, ratios=(1.0,), flip: bool = False,
                  device="cpu", batch_size: int = 8) -> torch.Tensor:
    """Summed softmax (C, H, W) over the test-time augmentations (`tta_inputs`) of one normalised image
    (3, H, W), at its original size: sliding-window logits of each input, resized back to the original size,
    un-flipped, softmax (Segmenter's `inference`). The windows of all augmentations go through the model
    together, `batch_size` at a time."""
    H0, W0 = im.shape[-2:]
    inputs = tta_inputs(im, scale=scale, window=window, ratios=ratios, flip=flip)
    crops, meta = [], []
    for x, fl in inputs:
        c, anchors, wsize = _windows(x, window, stride)
        meta.append((len(c), anchors, wsize, x.shape[-2:], fl))
        crops += c
    if len({tuple(c.shape) for c in crops}) == 1:
        outs = _forward(model, torch.stack(crops), device, batch_size)
    else:                                   # windows of different sizes (an image smaller than the window)
        outs = [_forward(model, c[None], device, 1)[0] for c in crops]
    total, i = None, 0
    for n, anchors, wsize, shape, fl in meta:
        logit = _resize(_merge(outs[i:i + n] if torch.is_tensor(outs) else torch.stack(outs[i:i + n]),
                               anchors, wsize, shape), (H0, W0))
        i += n
        if fl:
            logit = torch.flip(logit, (2,))
        p = F.softmax(logit, 0)
        total = p if total is None else total + p
    return total


# ----------------------------------------------------------------------------------------------------
# training augmentation
# ----------------------------------------------------------------------------------------------------

def _normalize(x: torch.Tensor, normalization: str) -> torch.Tensor:
    """x in [0, 1], channels first (..., 3, H, W)."""
    mean, std = NORMALIZATION[normalization]
    shape = (3, 1, 1)
    kw = dict(dtype=x.dtype, device=x.device)
    return (x - torch.tensor(mean, **kw).view(shape)) / torch.tensor(std, **kw).view(shape)


def photometric_distortion(img: np.ndarray, rng: random.Random, brightness_delta: int = 32, contrast=(0.5, 1.5),
                           saturation=(0.5, 1.5), hue_delta: int = 18) -> np.ndarray:
    """mmseg's PhotoMetricDistortion on an RGB uint8 image: each step with probability 0.5, clipping to uint8
    after each: brightness + U(-32, 32); contrast x U(0.5, 1.5) before or after (random mode) saturation
    x U(0.5, 1.5) and hue + randint(-18, 18) on OpenCV's 0..180 hue scale (PIL's HSV, rescaled)."""
    from PIL import Image

    def convert(a, alpha=1.0, beta=0.0):
        return np.clip(a.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    if rng.randint(0, 1):
        img = convert(img, beta=rng.uniform(-brightness_delta, brightness_delta))
    mode = rng.randint(0, 1)
    if mode == 1 and rng.randint(0, 1):
        img = convert(img, alpha=rng.uniform(*contrast))
    do_sat, do_hue = rng.randint(0, 1), rng.randint(0, 1)
    if do_sat or do_hue:
        hsv = np.asarray(Image.fromarray(img).convert("HSV")).copy()
        if do_sat:
            hsv[..., 1] = convert(hsv[..., 1], alpha=rng.uniform(*saturation))
        if do_hue:
            d = rng.randint(-hue_delta, hue_delta) * 256.0 / 180.0
            hsv[..., 0] = ((hsv[..., 0].astype(np.float32) + d) % 256).astype(np.uint8)
        img = np.array(Image.fromarray(hsv, mode="HSV").convert("RGB"))
    if mode == 0 and rng.randint(0, 1):
        img = convert(img, alpha=rng.uniform(*contrast))
    return img


def random_crop_bbox(label: np.ndarray, crop: int, rng: random.Random, cat_max_ratio) -> tuple[int, int]:
    """mmseg's RandomCrop offsets: uniform within the margin; with cat_max_ratio < 1, up to 10 draws until no
    single class (ignore excluded) covers cat_max_ratio of the crop."""
    H, W = label.shape

    def draw():
        return rng.randint(0, max(H - crop, 0)), rng.randint(0, max(W - crop, 0))

    oy, ox = draw()
    if cat_max_ratio is not None and cat_max_ratio < 1.0:
        for _ in range(10):
            seg = label[oy:oy + crop, ox:ox + crop]
            labels, cnt = np.unique(seg, return_counts=True)
            cnt = cnt[labels != IGNORE_INDEX]
            if len(cnt) > 1 and cnt.max() / cnt.sum() < cat_max_ratio:
                break
            oy, ox = draw()
    return oy, ox


def train_transform(img: np.ndarray, label: np.ndarray, rng: random.Random, *, scale, crop: int, ratio_range,
                    cat_max_ratio, normalization: str):
    """Segmenter's ADE20K train pipeline on one (RGB uint8 (H, W, 3), label uint8 (H, W)) pair ->
    (float (3, crop, crop), long (crop, crop)). Resizes with torch's bilinear / nearest (OpenCV's
    INTER_LINEAR / INTER_NEAREST conventions, no antialias), as mmcv does."""
    H, W = label.shape
    r = rng.uniform(*ratio_range)
    h, w = rescale_size(H, W, (int(scale[0] * r), int(scale[1] * r)))     # mmseg Resize with ratio_range
    x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float()[None]
    x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)[0].round_().clamp_(0, 255).to(torch.uint8)
    y = F.interpolate(torch.from_numpy(label)[None, None].float(), size=(h, w), mode="nearest")[0, 0].to(torch.uint8)
    y = y.numpy()
    oy, ox = random_crop_bbox(y, crop, rng, cat_max_ratio)
    x = x[:, oy:oy + crop, ox:ox + crop]
    y = y[oy:oy + crop, ox:ox + crop]
    if rng.random() < 0.5:
        x = torch.flip(x, (2,))
        y = y[:, ::-1]
    x = photometric_distortion(x.permute(1, 2, 0).numpy(), rng)
    x = _normalize(torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1).float() / 255, normalization)
    out_x = torch.zeros(3, crop, crop)
    out_y = torch.full((crop, crop), IGNORE_INDEX, dtype=torch.long)
    out_x[:, :x.shape[1], :x.shape[2]] = x                   # Pad: image 0, label 255
    out_y[:y.shape[0], :y.shape[1]] = torch.from_numpy(np.ascontiguousarray(y)).long()
    return out_x, out_y


def batch_train_transform(x: torch.Tensor, y: torch.Tensor, g: torch.Generator, *, scale, crop: int, ratio_range,
                          normalization: str):
    """Cheap batched version of `train_transform` for the in-memory micro splits: uint8 (B, 3, H, W) images
    and uint8 (B, H, W) labels (255 = ignore) -> (float (B, 3, crop, crop), long (B, crop, crop)).

    One affine grid_sample per batch does the random keep-ratio resize (ratio_range of `scale`), the random
    crop (padding outside the resized image: image 0 after normalisation, label 255) and the flip; then
    brightness, contrast (x), saturation and hue (YIQ rotation, +-36 deg) jitter, each with probability 0.5.
    No cat_max_ratio."""
    B, _, H, W = x.shape
    r = torch.empty(B).uniform_(ratio_range[0], ratio_range[1], generator=g)
    f = torch.minimum(max(scale) * r / max(H, W), min(scale) * r / min(H, W))   # resize factor
    Hr, Wr = (H * f + 0.5).floor(), (W * f + 0.5).floor()
    oy = (torch.rand(B, generator=g) * ((Hr - crop).clamp(min=0) + 1)).floor()
    ox = (torch.rand(B, generator=g) * ((Wr - crop).clamp(min=0) + 1)).floor()
    flip = torch.rand(B, generator=g) < 0.5
    sx = crop / (f * W)
    sy = crop / (f * H)
    theta = torch.zeros(B, 2, 3)
    theta[:, 0, 0] = torch.where(flip, -sx, sx)
    theta[:, 0, 2] = (2 * ox + crop) / (f * W) - 1
    theta[:, 1, 1] = sy
    theta[:, 1, 2] = (2 * oy + crop) / (f * H) - 1
    grid = F.affine_grid(theta, (B, 1, crop, crop), align_corners=False)
    img = F.grid_sample(x.float() / 255, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    lab = torch.where(y == IGNORE_INDEX, torch.zeros_like(y, dtype=torch.float32), y.float() + 1)[:, None]
    inside = F.grid_sample(torch.ones(B, 1, H, W), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    lab = F.grid_sample(lab, grid, mode="nearest", padding_mode="zeros", align_corners=False)[:, 0].round().long()
    valid = inside[:, 0] > 0.5
    lab = torch.where(valid & (lab > 0), lab - 1, torch.full_like(lab, IGNORE_INDEX))
    # photometric distortion
    def coin():
        return (torch.rand(B, 1, 1, 1, generator=g) < 0.5).float()
    img = (img + coin() * torch.empty(B, 1, 1, 1).uniform_(-32 / 255, 32 / 255, generator=g)).clamp(0, 1)
    img = (img * (1 + coin() * (torch.empty(B, 1, 1, 1).uniform_(0.5, 1.5, generator=g) - 1))).clamp(0, 1)
    gray = (img * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    sat = 1 + coin() * (torch.empty(B, 1, 1, 1).uniform_(0.5, 1.5, generator=g) - 1)
    img = (gray + (img - gray) * sat).clamp(0, 1)
    angle = coin().view(B) * torch.empty(B).uniform_(-0.2 * math.pi, 0.2 * math.pi, generator=g)
    img = _hue_rotate(img, angle).clamp(0, 1)
    img = _normalize(img, normalization) * valid[:, None]
    return img, lab


_RGB2YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def _hue_rotate(img: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    c, s = torch.cos(angle), torch.sin(angle)
    rot = torch.zeros(angle.shape[0], 3, 3)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = c, -s, s, c
    m = torch.linalg.inv(_RGB2YIQ) @ rot @ _RGB2YIQ                  # (B, 3, 3)
    return torch.einsum("bij,bjhw->bihw", m, img)


# ----------------------------------------------------------------------------------------------------
# paper-profile datasets (DataLoader workers)
# ----------------------------------------------------------------------------------------------------

class _TrainSet(torch.utils.data.Dataset):
    def __init__(self, pairs, opts: dict, seed: int):
        self.pairs, self.opts, self.seed = pairs, opts, seed
        self.epoch = 0

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        rng = random.Random(hash((self.seed, self.epoch, i, torch.initial_seed())))
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

    def train_batches(self, batch_size: int, seed: int, recipe=None):
        """Endless iterator of (images float (B, 3, crop, crop) normalised, labels long (B, crop, crop), 255 =
        ignore) on the CPU; each epoch has `steps_per_epoch(batch_size)` batches."""
        self.prepare()
        if self.profile == "micro":
            return self._micro_train_batches(int(batch_size), int(seed))
        return self._paper_train_batches(int(batch_size), int(seed))

    def _micro_train_batches(self, batch_size, seed):
        x, y = self._micro_split("training")
        n = x.shape[0]
        g = torch.Generator().manual_seed(seed)
        bs = min(batch_size, n)
        ratio_range = tuple(self.opt("ratio_range"))
        while True:
            perm = torch.randperm(n, generator=g)
            for i in range(0, n - bs + 1, bs):
                idx = perm[i:i + bs]
                yield batch_train_transform(x[idx], y[idx], g, scale=self.scale, crop=self.crop_size,
                                            ratio_range=ratio_range, normalization=self.opt("normalization"))

    def _paper_train_batches(self, batch_size, seed):
        from torch.utils.data import DataLoader
        opts = dict(scale=self.scale, crop=self.crop_size, ratio_range=tuple(self.opt("ratio_range")),
                    cat_max_ratio=self.opt("cat_max_ratio"), normalization=self.opt("normalization"))
        ds = _TrainSet(self.pairs("training"), opts, seed)
        workers = int(self.opt("workers"))
        g = torch.Generator().manual_seed(seed)
        loader = DataLoader(ds, batch_size=batch_size, shuffle=True, generator=g, drop_last=len(ds) >= batch_size,
                            num_workers=workers, pin_memory=torch.cuda.is_available(), persistent_workers=False)
        while True:
            yield from loader
            ds.epoch += 1

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

    def evaluate(self, model: nn.Module, split: str = "validation", device="cpu", multiscale: bool = True) -> dict:
        """{"miou", "miou_ms", "pixel_acc" (percent), "per_class_iou", "per_class_iou_ms", "n"} on `split`.
        Single scale: ratio 1.0, sliding window; multi-scale: the `ms_ratios` with flip (skipped when
        multiscale=False)."""
        split = self._split(split)
        self.prepare()
        device = torch.device(device)
        n_cls = self.num_classes
        window, stride = self.window
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
                    im = _normalize(img.to(device).float() / 255, norm)
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

    # ---------------------------------------------------------------- measuring and caching
    def dummy_inputs(self, model_config: dict, batch_size: int, device) -> tuple:
        return self.image_inputs(model_config, batch_size, device, self.crop_size)

    def fingerprint(self) -> dict:
        fp = {"task": self.name, "profile": self.profile, "layout_version": LAYOUT_VERSION,
              "settings": self.settings.to_dict()}
        if self.profile == "micro":
            fp.update(generator="tasks.ade20k.generate_micro", generator_version=GENERATOR_VERSION,
                      scene=json.loads(json.dumps(MICRO_SCENE)), **self.micro_settings)
        else:
            fp.update(root=str(self.root.resolve()))
        return fp
