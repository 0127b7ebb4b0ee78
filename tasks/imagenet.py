"""ImageNet-1k classification (DeiT / timm recipes), and its micro stand-in.

Layout (the standard torchvision/timm ImageFolder layout, the one the DeiT and timm training scripts read):

    <root>/train/<wnid>/*.JPEG            e.g. train/n01440764/n01440764_10026.JPEG
    <root>/val/<wnid>/*.JPEG              e.g. val/n01440764/ILSVRC2012_val_00000293.JPEG

The validation images must already be sorted into one folder per class (ImageNet ships them flat; the
usual `valprep.sh` sorts them). Class index = position of the wnid in sorted order (ImageFolder's rule).

Profiles
- paper: `<data_root>/imagenet` (data_root = `--data-root DIR` or $BENCH_DATA); torchvision ImageFolder +
  DataLoader with workers; train transform = timm `create_transform` (the DeiT recipe's RandAugment,
  random erasing, bicubic), eval transform = DeiT's Resize(S/0.875) + CenterCrop(S).
- micro: `<cache_dir>/data/imagenet_micro-<hash>`, generated on first use by `generate_micro` in exactly
  the same layout (real JPEG files): synthetic 32x32 scenes whose class is (shape, colour family), with
  random pose, size, clutter, distractors, noise and colour jitter. The splits are decoded once into
  uint8 tensors; training augmentation (random resized crop + flip) runs on the whole batch with torch ops,
  or, when the recipe sets auto_augment / color_jitter / reprob, the paper profile's timm transform per image.

Training recipe (bench.recipe, data side; every key of TASK_RECIPE_KEYS): crop_scale and hflip set the random
resized crop and the flip (defaults: scale (0.6, 1) on micro, timm's (0.08, 1) on paper; flip 0.5);
auto_augment, color_jitter (none: off), reprob / remode / recount go to timm `create_transform`; mixup,
cutmix, cutmix_minmax, mixup_prob / switch_prob / mode to timm `Mixup` (soft targets, SoftTargetCrossEntropy);
label_smoothing to the cross-entropy (or to Mixup's soft targets).
"""
from __future__ import annotations

import colorsys
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from typing import Annotated

from pydantic import Field

from bench.api import TaskAdapter
from bench.errors import BenchError, MissingData
from bench.options import NonNegInt, OptionsModel, PositiveInt
from bench.recipe import TASK_RECIPE_KEYS
from bench.registry import register_task
from tasks.augment import PrivateRNG, classification_loss, mixup_for
from tasks.common.batching import batch_seed, generator, micro_batches, seeded_batches
from tasks.common.files import load_image, scan_images
from tasks.common.scenes import contrast_and_noise
from tasks.micro_data import generate_atomically, micro_folder
from tasks.common.protocol_inputs import image_batch

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

LAYOUT_VERSION = 1
GENERATOR_VERSION = 1          # bump when the micro images change: it is part of the folder hash
DEFAULT_CROP_PCT = 0.875       # DeiT / timm eval: Resize(int(S / 0.875)) + CenterCrop(S)
EVAL_BATCH_SIZE = 256

LAYOUT = """\
  <root>/train/<wnid>/*.JPEG     e.g. train/n01440764/n01440764_10026.JPEG
  <root>/val/<wnid>/*.JPEG       e.g. val/n01440764/ILSVRC2012_val_00000293.JPEG
  (val sorted into the same class folders as train, as the DeiT/timm recipes expect;
   class index = sorted wnid order)"""

MICRO_DEFAULTS = {"num_classes": 10, "train_per_class": 160, "val_per_class": 40, "image_size": 32, "seed": 1234}
MICRO_KEYS = tuple(MICRO_DEFAULTS)
MICRO_TRAIN_SCALE = (0.6, 1.0)   # random-resized-crop area range of the micro profile (recipe: crop_scale)
PAPER_IMAGE_SIZE = 224
DEFAULT_WORKERS = 8              # the DeiT / timm training scripts' --num_workers / -j default


class ImageNetData(OptionsModel):
    """The `data:` block of the imagenet task. micro: the generated stand-in's settings; paper: how to read
    the real data set. Augmentation and mixup are training-recipe keys, not data keys."""

    num_classes: PositiveInt = Field(MICRO_DEFAULTS["num_classes"],
                                     description="micro: classes of the generated set (shape x colour family)")
    train_per_class: PositiveInt = Field(MICRO_DEFAULTS["train_per_class"], description="micro: training images per class")
    val_per_class: PositiveInt = Field(MICRO_DEFAULTS["val_per_class"], description="micro: validation images per class")
    image_size: Annotated[int, Field(ge=8)] | None = Field(
        None, description="input side S in pixels (none: 32 on micro, the generated size; 224 on paper)")
    seed: NonNegInt = Field(MICRO_DEFAULTS["seed"], description="micro: generator seed (same settings, same files)")
    crop_pct: Annotated[float, Field(gt=0, le=1)] = Field(
        DEFAULT_CROP_PCT, description="eval transform: Resize(S / crop_pct) + CenterCrop(S) (DeiT: 0.875)")
    workers: NonNegInt = Field(DEFAULT_WORKERS, description="paper: DataLoader worker processes for training and "
                                                            "evaluation (default 8, as the DeiT/timm scripts; 0: "
                                                            "load in the main process)")
    root: str | None = Field(None, description="folder: the folder holding train/ and val/ (any ImageFolder; "
                                               "~ expanded, relative: under --data-root); none: <data-root>/imagenet")

# Object shapes, in the order classes use them: 10 classes = 2 shapes (ring, triangle) x 5 colour families;
# more classes bring in more shapes (up to 5), then more colour families.
SHAPES = ("ring", "triangle", "circle", "cross", "square")
# Scene parameters (radii as fractions of the image side). They set the difficulty: with these, vit_micro
# trained by the card's dense recipe (AdamW 2e-3, batch 64, 20 epochs) reaches about 90 % top-1.
# Changing any of them changes the images: bump GENERATOR_VERSION (it is part of the cache folder name).
MICRO_SCENE = dict(
    obj_radius=(0.2, 0.34),          # the object
    obj_margin=(1.0, 0.07),          # centre >= r * a + S * b from the border: inside the eval centre crop
    hue_spread=0.6,                  # hue jitter, as a fraction of the distance between colour families
    n_lines=(1, 3),                  # clutter: random lines
    n_distractors=(0, 2),            # smaller shapes of any kind and colour
    distractor_radius=(0.08, 0.15),
    bg_sat=0.45,                     # background: blotches of low saturation
    noise=9.0,                       # pixel noise std (0..255)
)

# ----------------------------------------------------------------------------------------------------
# micro generator
# ----------------------------------------------------------------------------------------------------

def micro_wnid(c: int) -> str:
    """ImageNet-style synset id of micro class c: n00000000, n00000001, ..."""
    return f"n{c:08d}"


def micro_class_spec(c: int, num_classes: int) -> tuple[str, int, float]:
    """(shape, colour family, centre hue in [0, 1)) of micro class c: class = shape x colour family."""
    n_shapes = min(len(SHAPES), max(1, math.ceil(num_classes / 5)))
    fam = c // n_shapes
    return SHAPES[c % n_shapes], fam, (0.05 + fam / _n_families(num_classes)) % 1.0


def _n_families(num_classes: int) -> int:
    return math.ceil(num_classes / min(len(SHAPES), max(1, math.ceil(num_classes / 5))))


def _hsv(h, s, v):
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, float(np.clip(s, 0, 1)), float(np.clip(v, 0, 1)))
    return int(r * 255 + 0.5), int(g * 255 + 0.5), int(b * 255 + 0.5)


def _shape_polygons(shape: str, cx: float, cy: float, r: float, angle: float):
    """Polygons (list of point lists) and circles (cx, cy, r, filled) drawing `shape` of radius r."""
    def rot(points):
        ca, sa = math.cos(angle), math.sin(angle)
        return [(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in points]
    if shape == "square":
        a = r * 0.8
        return [rot([(-a, -a), (a, -a), (a, a), (-a, a)])], []
    if shape == "triangle":
        return [rot([(r * math.cos(t), r * math.sin(t)) for t in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)])], []
    if shape == "cross":
        w = r * 0.33
        return [rot([(-r, -w), (r, -w), (r, w), (-r, w)]), rot([(-w, -r), (w, -r), (w, r), (-w, r)])], []
    if shape == "circle":
        return [], [(cx, cy, r * 0.85, True)]
    if shape == "ring":
        return [], [(cx, cy, r, False)]
    raise ValueError(shape)


def _draw_shape(draw, shape, cx, cy, r, angle, color, ring_bg=None):
    polys, circles = _shape_polygons(shape, cx, cy, r, angle)
    for p in polys:
        draw.polygon(p, fill=color)
    for x, y, rr, filled in circles:
        box = [x - rr, y - rr, x + rr, y + rr]
        if filled:
            draw.ellipse(box, fill=color)
        else:
            draw.ellipse(box, outline=color, width=max(1, int(rr * 0.38)))


def render_micro_image(rng: np.random.Generator, c: int, num_classes: int, size: int):
    """One synthetic scene of class c as an RGB PIL image of size x size."""
    from PIL import Image, ImageDraw

    P = MICRO_SCENE
    ss = 4                                   # supersampling factor (anti-aliased edges)
    S = size * ss
    shape, _, hue = micro_class_spec(c, num_classes)
    n_fam = _n_families(num_classes)

    # background: smooth blotches (a coarse random grid upsampled) in low-saturation colours + a gradient
    g = int(rng.integers(2, 5))
    base_h = rng.random()
    grid = np.empty((g, g, 3), np.float32)
    for i in range(g):
        for j in range(g):
            grid[i, j] = _hsv(base_h + rng.normal(0, 0.08), rng.uniform(0.0, P['bg_sat']), rng.uniform(0.2, 0.85))
    bg = Image.fromarray(grid.clip(0, 255).astype(np.uint8)).resize((S, S), Image.BICUBIC)
    draw = ImageDraw.Draw(bg)

    # clutter: thin lines and small blobs in random colours
    for _ in range(int(rng.integers(P['n_lines'][0], P['n_lines'][1] + 1))):
        x0, y0, x1, y1 = rng.uniform(0, S, 4)
        draw.line([(x0, y0), (x1, y1)], fill=_hsv(rng.random(), rng.uniform(0, 1), rng.uniform(0.2, 1)),
                  width=int(rng.integers(1, 3) * ss))
    # distractors: smaller shapes of any kind in any colour
    for _ in range(int(rng.integers(P['n_distractors'][0], P['n_distractors'][1] + 1))):
        dr = rng.uniform(*P['distractor_radius']) * S
        _draw_shape(draw, SHAPES[int(rng.integers(len(SHAPES)))], rng.uniform(dr, S - dr), rng.uniform(dr, S - dr),
                    dr, rng.uniform(0, 2 * math.pi), _hsv(rng.random(), rng.uniform(0.3, 1), rng.uniform(0.3, 1)))

    # the object: class shape, class colour family (hue jitter within the family), random pose and size
    r = rng.uniform(*P['obj_radius']) * S
    margin = r * P['obj_margin'][0] + P['obj_margin'][1] * S
    cx, cy = rng.uniform(margin, S - margin, 2)
    h = hue + rng.uniform(-0.5, 0.5) * (P['hue_spread'] / n_fam)
    color = _hsv(h, rng.uniform(0.45, 1.0), rng.uniform(0.45, 1.0))
    _draw_shape(draw, shape, cx, cy, r, rng.uniform(0, 2 * math.pi), color)

    img = bg.resize((size, size), Image.BOX)
    # pixel noise and a global brightness/contrast jitter
    return Image.fromarray(contrast_and_noise(np.asarray(img, np.float32), rng, (0.75, 1.15), P['noise']))


def generate_micro(root, num_classes: int = 10, train_per_class: int = 160, val_per_class: int = 40,
                   image_size: int = 32, seed: int = 1234) -> Path:
    """Write a synthetic ImageNet-layout data set into `root` (created; should be empty).

    Deterministic: image i of class c in split s is drawn from numpy's Generator seeded with
    (seed, s, c, i), so the same settings give byte-identical JPEG files.
    """
    root = Path(root)
    num_classes, train_per_class, val_per_class = int(num_classes), int(train_per_class), int(val_per_class)
    image_size, seed = int(image_size), int(seed)
    if num_classes < 1 or train_per_class < 1 or val_per_class < 1 or image_size < 8:
        raise BenchError(f"bad micro ImageNet settings: num_classes={num_classes}, train_per_class="
                         f"{train_per_class}, val_per_class={val_per_class}, image_size={image_size}")
    # ImageNet numbers its val images over all classes in a random order
    val_ids = np.random.default_rng([seed, 2]).permutation(num_classes * val_per_class) + 1
    for c in range(num_classes):
        wnid = micro_wnid(c)
        (root / "train" / wnid).mkdir(parents=True, exist_ok=True)
        (root / "val" / wnid).mkdir(parents=True, exist_ok=True)
        for i in range(train_per_class):
            img = render_micro_image(np.random.default_rng([seed, 0, c, i]), c, num_classes, image_size)
            _save_jpeg(img, root / "train" / wnid / f"{wnid}_{i}.JPEG")
        for i in range(val_per_class):
            img = render_micro_image(np.random.default_rng([seed, 1, c, i]), c, num_classes, image_size)
            _save_jpeg(img, root / "val" / wnid / f"ILSVRC2012_val_{int(val_ids[c * val_per_class + i]):08d}.JPEG")
    settings = dict(num_classes=num_classes, train_per_class=train_per_class, val_per_class=val_per_class,
                    image_size=image_size, seed=seed)
    specs = [micro_class_spec(c, num_classes) for c in range(num_classes)]
    classes = "\n".join(f"  {micro_wnid(c)}  {shape:8s} colour family {fam} (hue {hue * 360:.0f} deg)"
                         for c, (shape, fam, hue) in enumerate(specs))
    (root / "README.txt").write_text(
        "Micro ImageNet: synthetic stand-in written by tasks.imagenet.generate_micro "
        f"(generator version {GENERATOR_VERSION}, layout version {LAYOUT_VERSION}).\n"
        f"Settings: {json.dumps(settings, sort_keys=True)}\n"
        f"Scene parameters: {json.dumps(MICRO_SCENE)}\n"
        "Same on-disk layout as ImageNet-1k (ImageFolder):\n" + LAYOUT + "\n"
        "Each image: one object whose shape and colour family give the class, at a random position, size,\n"
        "rotation and hue/saturation/brightness, on a blotchy background with lines, smaller distractor\n"
        "shapes and pixel noise; JPEG quality 95. Not comparable with ImageNet numbers.\n"
        f"Classes (index = sorted wnid order):\n{classes}\n")
    return root


def _save_jpeg(img, path: Path):
    img.save(path, format="JPEG", quality=95)


# ----------------------------------------------------------------------------------------------------
# layout reading
# ----------------------------------------------------------------------------------------------------

def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def list_classes(split_dir: Path, full: bool = False) -> dict[str, list[str]]:
    """{wnid: image file names} of one split folder. With full=False only the first image of each class
    is listed (a cheap layout check, even for ImageNet's 1000 x 1300 files)."""
    out = {}
    with os.scandir(split_dir) as it:
        for e in it:
            if not e.is_dir():
                continue
            files = []
            with os.scandir(e.path) as it2:
                for f in it2:
                    if _is_image(f.name) and f.is_file():
                        files.append(f.name)
                        if not full:
                            break
            out[e.name] = sorted(files)
    return dict(sorted(out.items()))


# ----------------------------------------------------------------------------------------------------
# batch-level augmentation for the in-memory micro splits
# ----------------------------------------------------------------------------------------------------

def random_resized_crop_flip(x: torch.Tensor, size: int, generator: torch.Generator,
                             scale=(0.6, 1.0), ratio=(3 / 4, 4 / 3), hflip: float = 0.5) -> torch.Tensor:
    """torchvision's RandomResizedCrop(size, scale, ratio, bicubic) + RandomHorizontalFlip on a uint8 batch
    (B, 3, H, W) -> float (B, 3, size, size) in [0, 1]. One affine grid_sample for the whole batch."""
    B, _, H, W = x.shape
    area = torch.empty(B).uniform_(scale[0], scale[1], generator=generator)
    logr = torch.empty(B).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    ar = torch.exp(logr)
    # crop width/height as fractions of the image side; a crop wider/taller than the image is clamped to it
    # (torchvision re-draws such crops; at scale >= 0.6 and ratio 3/4..4/3 the difference is negligible)
    w = torch.sqrt(area * ar).clamp(max=1.0)
    h = torch.sqrt(area / ar).clamp(max=1.0)
    u = torch.rand(B, 2, generator=generator)
    cx = (u[:, 0] * (1 - w) + w / 2) * 2 - 1        # crop centre in [-1, 1] coordinates
    cy = (u[:, 1] * (1 - h) + h / 2) * 2 - 1
    flip = torch.rand(B, generator=generator) < hflip
    sx = torch.where(flip, -w, w)
    theta = torch.zeros(B, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, cx, h, cy
    grid = F.affine_grid(theta, (B, 3, size, size), align_corners=False)
    out = F.grid_sample(x.float(), grid, mode="bicubic", padding_mode="border", align_corners=False)
    return out.clamp_(0, 255).div_(255)


def _normalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


# ----------------------------------------------------------------------------------------------------
# the task adapter
# ----------------------------------------------------------------------------------------------------

class _SeededImages(torch.utils.data.Dataset):
    """An image folder indexed by (index, seed): the transforms of each image draw from its own seed."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, item):
        i, seed = item
        with PrivateRNG(seed):
            return self.ds[i]


@register_task("imagenet")
class ImageNetTask(TaskAdapter):
    """ImageNet-1k top-1/top-5 classification (percent). Micro profile: a generated stand-in, same layout."""

    VERSION = 2   # 2: one generator per micro-batch for its augmentation (tasks.common.batching)

    PUBLISHED_TRAINING_COSTS = {   # DeiT's published training costs (bench plan compares its estimate)
        "deit_small_patch16_224": {"epochs": 300, "batch": 1024, "gpus": 4, "hours": 72.0, "bound": "less than",
                                   "gpu": "V100", "gpu_tflops": 125.0,
                                   "source": "DeiT paper §5.6: DeiT-S trains 300 epochs in less than 3 days on 4 GPUs "
                                             "(README: 4 GPUs x batch 256; V100 with AMP, GPU model from memory)"},
        "deit_tiny_patch16_224": {"epochs": 300, "batch": 1024, "gpus": 4, "hours": 72.0, "bound": "less than",
                                  "gpu": "V100", "gpu_tflops": 125.0,
                                  "source": "DeiT paper §5.6: DeiT-Ti trains 300 epochs in less than 3 days on 4 GPUs "
                                            "(README: 4 GPUs x batch 256; V100 with AMP, GPU model from memory)"},
        "deit_base_patch16_224": {"epochs": 300, "batch": 1024, "gpus": 8, "hours": 53.0, "bound": "",
                                  "gpu": "V100", "gpu_tflops": 125.0,
                                  "source": "DeiT paper §5.6: DeiT-B trains 300 epochs in 53 hours on one node of 8 GPUs "
                                            "(37 h on 2 nodes; V100 with AMP, GPU model from memory)"},
    }

    name = "imagenet"
    metrics = {"top1": True, "top5": True}
    layout = LAYOUT
    Data = ImageNetData
    RECIPE_KEYS = frozenset(TASK_RECIPE_KEYS)

    def __init__(self, settings, data_root, profile, cache_dir):
        super().__init__(settings, data_root, profile, cache_dir)
        self._prepared = False
        self._classes: list[str] | None = None
        self._mem: dict = {}          # micro: decoded splits {"train": (uint8 images, labels), ...}
        self._eval_cache: dict = {}   # micro: eval-transformed float tensors per split
        self._train_size: int | None = None

    # ---------------------------------------------------------------- settings and paths
    @property
    def micro_settings(self) -> dict:
        s = {k: getattr(self.settings, k) for k in MICRO_DEFAULTS}
        return {k: int(MICRO_DEFAULTS[k] if v is None else v) for k, v in s.items()}

    @property
    def image_size(self) -> int:
        if self.profile == "micro":
            return self.micro_settings["image_size"]
        return self.settings.image_size or PAPER_IMAGE_SIZE

    @property
    def root(self) -> Path:
        if self.profile == "paper":
            if self.settings.root:
                return self.data_root / Path(self.settings.root).expanduser()   # an absolute root replaces data_root
            return self.data_root / "imagenet"
        return micro_folder(self.cache_dir, "imagenet",
                            {**self.micro_settings, "generator": GENERATOR_VERSION, "scene": MICRO_SCENE})

    @property
    def classes(self) -> list[str]:
        self.prepare()
        return list(self._classes)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    # ---------------------------------------------------------------- prepare
    def prepare(self) -> None:
        if self._prepared:
            return
        if self.profile == "micro":
            self._prepare_micro()
        self._check_layout()
        self._prepared = True

    def _prepare_micro(self) -> None:
        generate_atomically(self.root, lambda tmp: generate_micro(tmp, **self.micro_settings))

    def _missing(self, path: Path, what: str):
        how = ("Point the suite at the folder that contains `imagenet/` with `--data-root DIR` or the BENCH_DATA "
               "environment variable (the data set is never downloaded). The micro profile needs no data.")
        return MissingData(what, path, self.layout, how)

    def _check_layout(self) -> None:
        root = self.root
        if not root.is_dir():
            raise self._missing(root, "ImageNet data set")
        classes = {}
        for split in ("train", "val"):
            d = root / split
            if not d.is_dir():
                raise self._missing(d, f"ImageNet {split} split")
            cls = list_classes(d)
            if not cls:
                flat = any(_is_image(n) for n in os.listdir(d))
                if flat and split == "val":
                    raise BenchError(
                        f"ImageNet val images in {d} are not sorted into class folders. Sort them into "
                        f"val/<wnid>/ (e.g. with the usual valprep.sh script). Expected layout:\n{self.layout}")
                raise self._missing(d / "<wnid>", f"ImageNet {split} class folders with images")
            empty = [k for k, v in cls.items() if not v]
            if empty:
                raise BenchError(f"ImageNet {split} class folder(s) without images in {d}: {empty[:5]}"
                                 f"{' ...' if len(empty) > 5 else ''}. Expected layout:\n{self.layout}")
            classes[split] = list(cls)
        if classes["train"] != classes["val"]:
            tr, va = set(classes["train"]), set(classes["val"])
            raise BenchError(
                f"ImageNet at {root}: val classes differ from train classes ({len(va)} vs {len(tr)} folders; "
                f"only in train: {sorted(tr - va)[:5]}, only in val: {sorted(va - tr)[:5]}). The class index is "
                f"the sorted wnid order, so both splits must have the same class folders.")
        self._classes = classes["train"]
        if self.profile == "paper":
            self._scan_images()

    def _scan_images(self) -> None:
        """Real data: every image of both splits opens and is complete (tasks.common.files.scan_images: the
        header and the last bytes), so a truncated file fails here, before any training, naming itself. A
        successful scan is remembered under the cache for the same files, sizes and times."""
        import hashlib
        paths = []
        for split in ("train", "val"):
            d = self.root / split
            paths += [d / c / f for c, files in list_classes(d, full=True).items() for f in files]
        tag = hashlib.sha256(str(self.root.resolve()).encode()).hexdigest()[:16]
        scan_images(paths, "the ImageNet images", stamp=self.cache_dir / "scans" / f"imagenet-{tag}.txt")

    # ---------------------------------------------------------------- transforms
    def eval_transform(self):
        from torchvision import transforms as T
        S = self.image_size
        crop_pct = self.settings.crop_pct
        return T.Compose([
            T.Resize(int(S / crop_pct), interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(S),
            T.ToTensor(),
            T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
        ])

    @staticmethod
    def per_image_augmentation(recipe) -> bool:
        """Does the recipe need timm's per-image transform (RandAugment, colour jitter, random erasing)? The
        micro profile then runs it instead of its batch-wise crop + flip."""
        return recipe is not None and bool(recipe.auto_augment or recipe.color_jitter or recipe.reprob > 0)

    def _crop_scale(self, recipe):
        if recipe is not None and recipe.crop_scale is not None:
            return tuple(recipe.crop_scale)
        return MICRO_TRAIN_SCALE if self.profile == "micro" else None      # None: timm's (0.08, 1.0)

    @staticmethod
    def _hflip(recipe) -> float:
        return recipe.hflip if recipe is not None and recipe.hflip is not None else 0.5

    def train_transform(self, recipe=None):
        """Per-image train transform (PIL -> normalised tensor) for the recipe's augmentation keys: timm
        `create_transform(is_training=True)` (random resized crop at crop_scale, flip at hflip, auto_augment,
        color_jitter (none: off), random erasing reprob/remode/recount, bicubic) on paper, and on micro when
        `per_image_augmentation(recipe)`. Otherwise, on micro, the per-image equivalent of the batch-wise
        `random_resized_crop_flip` the micro batches use."""
        S = self.image_size
        if self.profile == "paper" or self.per_image_augmentation(recipe):
            from timm.data import create_transform
            r = recipe
            return create_transform(S, is_training=True, scale=self._crop_scale(r), hflip=self._hflip(r),
                                    color_jitter=(r.color_jitter or None) if r is not None else None,
                                    auto_augment=r.auto_augment if r is not None else None,
                                    re_prob=r.reprob if r is not None else 0.0,
                                    re_mode=r.remode if r is not None else "pixel",
                                    re_count=r.recount if r is not None else 1,
                                    interpolation="bicubic", mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)
        from torchvision import transforms as T
        return T.Compose([
            T.RandomResizedCrop(S, scale=self._crop_scale(recipe), interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(self._hflip(recipe)),
            T.ToTensor(),
            T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
        ])

    # ---------------------------------------------------------------- data access
    def _files(self, split: str) -> list[tuple[Path, int]]:
        d = self.root / split
        cls = list_classes(d, full=True)
        idx = {c: i for i, c in enumerate(self.classes)}
        return [(d / c / f, idx[c]) for c in cls for f in cls[c]]

    def _micro_split(self, split: str):
        """Decoded uint8 images (N, 3, H, W) and labels (N,) of a micro split, cached on the instance."""
        if split not in self._mem:
            from PIL import Image
            files = self._files(split)
            imgs, labels = [], []
            for path, y in files:
                with Image.open(path) as im:
                    imgs.append(np.asarray(im.convert("RGB")))
                labels.append(y)
            shapes = {a.shape for a in imgs}
            if len(shapes) != 1:
                raise BenchError(f"micro ImageNet at {self.root}: images of different sizes {sorted(shapes)[:3]}")
            x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()
            self._mem[split] = (x, torch.tensor(labels, dtype=torch.long))
        return self._mem[split]

    def _split_name(self, split: str) -> str:
        if split not in ("train", "val"):
            raise BenchError(f"imagenet has splits 'val' (the labelled evaluation split) and 'train', not {split!r}")
        return split

    @property
    def train_size(self) -> int:
        self.prepare()
        if self.profile == "micro":
            return int(self._micro_split("train")[0].shape[0])
        if self._train_size is None:
            self._train_size = len(self._image_folder("train"))
        return self._train_size

    def steps_per_epoch(self, batch_size: int) -> int:
        """Optimizer steps in one epoch of `train_batches(batch_size, ...)` (last partial batch dropped)."""
        return max(1, self.train_size // int(batch_size))

    def _image_folder(self, split: str, transform=None):
        from torchvision.datasets import ImageFolder
        ds = ImageFolder(str(self.root / split), transform=transform, loader=load_image)   # errors name the file
        if ds.classes != self.classes:
            raise BenchError(f"ImageNet {split} classes changed on disk under {self.root}")
        return ds

    def train_batches(self, batch_size: int, seed: int, recipe=None, shard=None):
        """Endless iterator of (images float (B, 3, S, S) normalised, labels long (B,)) on the CPU: the
        micro-batches of `tasks.common.batching.micro_batches` (reshuffled every epoch; each epoch has
        `steps_per_epoch(batch_size)` of them; with `shard`, only this rank's are loaded). With the recipe's
        mixup/cutmix the labels are timm Mixup's soft targets (B, num_classes) instead. Every micro-batch draws
        its augmentation from its own seed: the crop and flip from a torch Generator, the per-image timm
        transforms and Mixup from `tasks.augment.PrivateRNG` (paper: one seed per image, so the DataLoader's
        worker count does not change the images)."""
        self.prepare()
        if self.profile == "micro":
            return self._micro_train_batches(int(batch_size), int(seed), recipe, shard)
        return self._paper_train_batches(int(batch_size), int(seed), recipe, shard)

    def _micro_train_batches(self, batch_size, seed, recipe=None, shard=None):
        x, y = self._micro_split("train")
        n = x.shape[0]
        S = self.image_size
        scale, hflip = self._crop_scale(recipe), self._hflip(recipe)
        mix = mixup_for(recipe, self.num_classes, min(batch_size, n))
        tf = self.train_transform(recipe) if self.per_image_augmentation(recipe) else None
        return self._micro_batches(x, y, micro_batches(n, batch_size, seed, shard), S, scale, hflip, tf, mix)

    @staticmethod
    def _micro_batches(x, y, stream, S, scale, hflip, tf, mix):
        for idx, bseed in stream:
            if tf is None:
                imgs = _normalize(random_resized_crop_flip(x[idx], S, generator(bseed), scale=scale, hflip=hflip))
            else:
                from PIL import Image
                with PrivateRNG(bseed):
                    imgs = torch.stack([tf(Image.fromarray(a.permute(1, 2, 0).numpy())) for a in x[idx]])
            labels = y[idx]
            if mix is not None:
                with PrivateRNG(batch_seed(bseed, -1)):
                    imgs, labels = mix(imgs, labels)
            yield imgs, labels

    def _paper_train_batches(self, batch_size, seed, recipe=None, shard=None):
        from torch.utils.data import DataLoader
        ds = self._image_folder("train", transform=self.train_transform(recipe))
        workers = self.settings.workers
        # the batch sampler hands every image its own seed: (index, seed) pairs of this rank's micro-batches
        loader = DataLoader(_SeededImages(ds), batch_sampler=seeded_batches(len(ds), batch_size, seed, shard),
                            num_workers=workers,
                            pin_memory=torch.cuda.is_available())
        mix = mixup_for(recipe, self.num_classes, min(batch_size, len(ds)))
        seeds = (bseed for _, bseed in micro_batches(len(ds), batch_size, seed, shard))   # the same stream's seeds
        for batch, bseed in zip(loader, seeds):
            if mix is not None:
                with PrivateRNG(batch_seed(bseed, -1)):
                    batch = mix(*batch)
            yield batch

    # ---------------------------------------------------------------- loss
    def loss(self, model: nn.Module, batch, device, recipe=None) -> torch.Tensor:
        """Cross-entropy with the recipe's label smoothing; soft targets (the batches' mixup/cutmix) get timm's
        SoftTargetCrossEntropy."""
        images, targets = batch
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        return classification_loss(model(images), targets, recipe)

    # ---------------------------------------------------------------- evaluation
    def _eval_batches(self, split: str):
        if self.profile == "micro":
            if split not in self._eval_cache:
                from PIL import Image
                x, y = self._micro_split(split)
                tf = self.eval_transform()
                xs = torch.stack([tf(Image.fromarray(a.permute(1, 2, 0).numpy())) for a in x])
                self._eval_cache[split] = (xs, y)
            xs, y = self._eval_cache[split]
            for i in range(0, xs.shape[0], EVAL_BATCH_SIZE):
                yield xs[i:i + EVAL_BATCH_SIZE], y[i:i + EVAL_BATCH_SIZE]
        else:
            from torch.utils.data import DataLoader
            ds = self._image_folder(split, transform=self.eval_transform())
            workers = self.settings.workers
            yield from DataLoader(ds, batch_size=EVAL_BATCH_SIZE, shuffle=False, num_workers=workers,
                                  pin_memory=torch.cuda.is_available())

    def evaluate(self, model: nn.Module, split: str = "val", device="cpu") -> dict:
        """{"top1": %, "top5": %, "n": images} on `split` ("val"; "train" for diagnostics), eval transform."""
        split = self._split_name(split)
        self.prepare()
        device = torch.device(device)
        was_training = model.training
        model.eval()
        correct1 = correct5 = n = 0
        try:
            with torch.inference_mode():
                for images, labels in self._eval_batches(split):
                    images = images.to(device, non_blocking=True)
                    labels = labels.to(device, non_blocking=True)
                    if device.type == "cuda":
                        with torch.autocast("cuda"):
                            logits = model(images)
                    else:
                        logits = model(images)
                    logits = logits.float()
                    k = min(5, logits.shape[-1])
                    top = logits.topk(k, dim=-1).indices
                    hit = top == labels[:, None]
                    correct1 += int(hit[:, 0].sum())
                    correct5 += int(hit.any(dim=-1).sum())
                    n += int(labels.shape[0])
        finally:
            model.train(was_training)
        if n == 0:
            raise BenchError(f"imagenet {split} split at {self.root} has no images")
        return {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n, "n": n}

    # ---------------------------------------------------------------- measuring and caching
    def check_model(self, model: nn.Module) -> None:
        """Before any training: one image of the task's size goes through the model (on the meta device when the
        model is there, else in eval mode without grad) and its outputs must cover the task's classes."""
        size = self.image_size
        ref = next(model.parameters())
        x = torch.zeros(1, 3, size, size, device=ref.device, dtype=ref.dtype)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = model(x)
        except Exception as e:  # noqa: BLE001 - any failure here is a shape mismatch the user can fix
            raise BenchError(f"imagenet: a {size}x{size} image does not fit the model ({' '.join(str(e).split())[:160]}); set data.image_size to the model's input size, or model_config.img_size to {size}") from None
        finally:
            model.train(was_training)
        if out.shape[-1] < self.num_classes:
            raise BenchError(f"imagenet: the data has {self.num_classes} classes but the model has {out.shape[-1]} outputs; "
                             f"set model_config.num_classes: {self.num_classes} in the profile")

    def dummy_inputs(self, model_config: dict, batch_size: int, device) -> tuple:
        return image_batch(model_config, batch_size, device, self.image_size)

    def public_train_size(self, data: dict) -> tuple:
        return 1_281_167, True, "ImageNet-1k (ILSVRC-2012) train images"

    def fingerprint(self) -> dict:
        fp = {"task": self.name, "profile": self.profile, "layout_version": LAYOUT_VERSION}
        if self.profile == "micro":
            fp.update(generator="tasks.imagenet.generate_micro", generator_version=GENERATOR_VERSION,
                      scene=json.loads(json.dumps(MICRO_SCENE)), **self.micro_settings)
        else:
            fp.update(root=str(self.root.resolve()), image_size=self.image_size)
        return fp
