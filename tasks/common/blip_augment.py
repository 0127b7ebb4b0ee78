"""BLIP's training transform, as BLIP and UPop train NLVR2, VQA, COCO caption and image-text retrieval.

The official `transform_train` (salesforce/BLIP data/__init__.py `create_dataset`; the same transform in sdc17/UPop
data/__init__.py l. 19-29, whose one train_loader every compress_*.py uses for the search and for the retrain, e.g.
compress_nlvr.py l. 172, 181, 208, 250):

    RandomResizedCrop(image_size, scale=(min_scale, 1.0), interpolation=BICUBIC)   # min_scale=0.5 (l. 19, 23)
    RandomHorizontalFlip()                                                         # l. 24
    RandomAugment(2, 5, isPIL=True, augs=['Identity', 'AutoContrast', 'Brightness', 'Sharpness', 'Equalize',
                                          'ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'Rotate'])  # l. 25-26
    ToTensor(), Normalize(CLIP mean, std)                                          # l. 27-28 (the task's job)

RandomAugment is BLIP's own (transform/randaugment.py in both repositories; line numbers below are sdc17/UPop's
copy), not timm's RandAugment: `get_random_ops` (l. 321-323) draws N op names uniformly *with replacement* from
`augs`, each op is then applied when a uniform draw is <= 0.5 (l. 330: `if np.random.random() > prob: continue`),
with the arguments of `arg_dict` (l. 288-307) at level M (MAX_LEVEL 10, translate_const 10, replace_value 128,
l. 285-287):

    Identity, AutoContrast, Equalize     no argument
    Brightness, Sharpness                factor = M/10 * 1.8 + 0.1           (l. 210; M = 5: exactly 1.0)
    ShearX, ShearY                       factor = M/10 * 0.3, negated when a draw is > 0.5   (l. 216-217)
    TranslateX, TranslateY               offset = M/10 * 10 px (absolute), negated when a draw is > 0.5 (l. 225-226)
    Rotate                               degrees = M/10 * 30, negated when a draw is < 0.5  (l. 260-262)
    fill of the geometric ops            (128, 128, 128)

and the op functions (`func_dict`, l. 268-283) on the HWC uint8 array of the (cropped, flipped) image:

    autocontrast_func (l. 10)   per channel: table = arange(256) * 255/(high-low) + (-low) * 255/(high-low),
                                clipped, truncated to uint8. `low` is a numpy uint8, so `-low` wraps to 256 - low:
                                a channel whose minimum is above 0 becomes all 255 (a channel with minimum 0 is
                                stretched to 0..255; max == min is left alone). Reproduced as the official code
                                computes it (numpy 1.22 / any numpy: unsigned negation wraps).
    equalize_func (l. 43)       PIL's equalize: step = (pixels - count of the last non-empty bin) // 255, lut =
                                (step // 2 + cumulative count below the value) // step (identity when step is 0).
    brightness_func (l. 122)    lut = trunc(float32(v) * factor) clipped to 255.
    sharpness_func (l. 131)     factor 1.0: the image itself (M = 5); otherwise the 3x3 kernel [1 1 1; 1 5 1;
                                1 1 1]/13 by cv2.filter2D (reflect-101 border, rounded), blended into the interior
                                (border pixels keep the original) as float32 and cast to uint8 (truncation; values
                                outside 0..255 wrap as numpy's cast does on x86).
    shear_x/y, translate_x/y, rotate (l. 152, 159, 169, 187, 66)   cv2.warpAffine with INTER_LINEAR and a constant
                                border of the fill: ShearX M = [[1, f, 0], [0, 1, 0]] (a source pixel (x, y) lands
                                at (x + f*y, y)), ShearY [[1, 0, 0], [f, 1, 0]], TranslateX [[1, 0, -o], [0, 1, 0]]
                                (the content moves left by o), TranslateY likewise, Rotate
                                cv2.getRotationMatrix2D((W/2, H/2), degrees, 1) (positive = counter-clockwise on
                                screen, centre at W/2, H/2 in pixel-centre coordinates).

Precision of this port: every op was run against the official functions (sdc17/UPop transform/randaugment.py) with
OpenCV 4.6.0 and numpy 1.26 (UPop's environment.yml pins opencv 4.6.0, numpy 1.22) and again with OpenCV 4.12.0, on
15 images (random, smooth, channel minimum above 0; 17x40 to 384x384 px) at every level 0-10 and both signs plus
odd angles and sub-pixel shifts: 2,205 cases, all bit-exact (tests/test_blip_augment.py keeps hand-made cases and,
where cv2 is installed, the OpenCV comparison of the geometric ops and the blur).
- Identity, AutoContrast, Equalize, Brightness: the same lookup tables and casts.
- the five geometric ops: cv2.warpAffine's fixed-point arithmetic is reproduced (the inverse map scaled by 1024 and
  rounded half-to-even per row and per column, 1/32-pixel coordinates, bilinear weights in units of 1/32768,
  rounded sum, the fill wherever a neighbour is outside the image). Where it could still differ: an OpenCV build
  whose warpAffine takes another path (IPP, OpenCL on a UMat, a future rewrite) by a grey level at rounding ties.
- Sharpness at a factor other than 1 (M != 5): the blur is summed in float32 and rounded half-to-even, as
  cv2.filter2D's 8-bit path; another summation order could differ at an exact .5 tie. Unused at the official M = 5,
  where Sharpness is the identity (factor exactly 1.0), as Brightness is.
- randomness: the same draws in the same order (N op indices, then per op the 0.5 coin and, for the signed ops,
  the sign coin) from a torch.Generator instead of numpy's global state, so a run is reproducible from its seed;
  the distribution is the official one, the stream is not numpy's.

RandomResizedCrop is torchvision's (`RandomResizedCrop.get_params`: 10 tries of area in `scale` x log-uniform
aspect ratio in (3/4, 4/3), else the central crop) and crops with PIL's bicubic resize, as torchvision does on the
PIL image; the flip is a 0.5 coin. One deviation stays: the suite's tasks decode every image once, resized
(bicubic) to the model's S x S, and crop from that S x S image, where BLIP crops the original image (of its own
aspect ratio) and resizes once.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

from bench.errors import BenchError

# BLIP data/__init__.py l. 25-26: the op list of the training transform, in its order (the draw indexes it)
BLIP_OPS = ("Identity", "AutoContrast", "Brightness", "Sharpness", "Equalize",
            "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
MAX_LEVEL = 10          # transform/randaugment.py l. 286
TRANSLATE_CONST = 10    # l. 285
FILL = 128              # replace_value (128, 128, 128), l. 287
APPLY_PROB = 0.5        # get_random_ops: (op, 0.5, M), l. 323
DEFAULT_SCALE = (0.5, 1.0)   # create_dataset(..., min_scale=0.5): scale=(min_scale, 1.0)
RATIO = (3 / 4, 4 / 3)       # torchvision RandomResizedCrop's default ratio


# ---------------------------------------------------------------------------------------------- level -> args
def level_args(op: str, level: float, gen: torch.Generator | None = None) -> tuple:
    """`arg_dict[op](level)` of transform/randaugment.py: the op's arguments at `level` (0..10). The signed ops
    draw their sign from `gen` exactly where the official code draws np.random.random()."""
    if op in ("Identity", "AutoContrast", "Equalize"):
        return ()
    if op in ("Brightness", "Sharpness"):
        return ((level / MAX_LEVEL) * 1.8 + 0.1,)
    u = float(torch.rand((), generator=gen))
    if op in ("ShearX", "ShearY"):
        v = (level / MAX_LEVEL) * 0.3
        return (-v if u > 0.5 else v,)
    if op in ("TranslateX", "TranslateY"):
        v = (level / MAX_LEVEL) * float(TRANSLATE_CONST)
        return (-v if u > 0.5 else v,)
    if op == "Rotate":
        v = (level / MAX_LEVEL) * 30
        return (-v if u < 0.5 else v,)
    raise BenchError(f"BLIP RandomAugment has no op {op!r} (ops: {', '.join(BLIP_OPS)})")


# ---------------------------------------------------------------------------------------------- pixel ops (HWC uint8)
def _per_channel_lut(img: np.ndarray, lut_of) -> np.ndarray:
    out = np.empty_like(img)
    for c in range(img.shape[2]):
        out[..., c] = lut_of(img[..., c])[img[..., c]]
    return out


def autocontrast(img: np.ndarray) -> np.ndarray:
    """autocontrast_func (cutoff 0) as the official code computes it, `-low` wrapping as a numpy uint8."""
    def lut(ch):
        high, low = int(ch.max()), int(ch.min())
        if high <= low:
            return np.arange(256).astype(np.uint8)
        scale = 255 / (high - low)
        offset = ((-low) % 256) * scale          # -np.uint8(low): 256 - low for low > 0
        table = np.arange(256) * scale + offset
        return table.clip(0, 255).astype(np.uint8)
    return _per_channel_lut(img, lut)


def equalize(img: np.ndarray) -> np.ndarray:
    """equalize_func: PIL.ImageOps.equalize's table (exact integers; the official float32 arithmetic is exact
    below 2**24 pixels)."""
    def lut(ch):
        hist = np.bincount(ch.reshape(-1), minlength=256).astype(np.int64)
        nz = hist[hist != 0]
        step = int(nz[:-1].sum()) // 255
        if step == 0:
            return np.arange(256).astype(np.uint8)
        n = np.concatenate([[step // 2], hist[:-1]])
        return (np.cumsum(n) // step).clip(0, 255).astype(np.uint8)
    return _per_channel_lut(img, lut)


def brightness(img: np.ndarray, factor: float) -> np.ndarray:
    """brightness_func: float32 table, truncated."""
    table = (np.arange(256, dtype=np.float32) * np.float32(factor)).clip(0, 255).astype(np.uint8)
    return table[img]


def sharpness(img: np.ndarray, factor: float) -> np.ndarray:
    """sharpness_func: factor 1.0 is the image itself; otherwise blur with [1 1 1; 1 5 1; 1 1 1]/13 (reflect-101
    border, rounded like cv2.filter2D), interior blended in float32, cast to uint8 as numpy does on x86."""
    if factor == 1.0:
        return img
    kernel = np.ones((3, 3), dtype=np.float32)
    kernel[1][1] = 5
    kernel /= 13
    p = np.pad(img.astype(np.float32), ((1, 1), (1, 1), (0, 0)), mode="reflect")   # numpy reflect = reflect-101
    H, W = img.shape[:2]
    acc = np.zeros(img.shape, np.float32)
    for dy in range(3):
        for dx in range(3):
            acc += kernel[dy, dx] * p[dy:dy + H, dx:dx + W]
    degenerate = np.rint(acc).clip(0, 255).astype(np.uint8)
    if factor == 0.0:
        return degenerate
    out = img.astype(np.float32)
    d = degenerate.astype(np.float32)[1:-1, 1:-1, :]
    out[1:-1, 1:-1, :] = d + np.float32(factor) * (out[1:-1, 1:-1, :] - d)
    return (np.trunc(out).astype(np.int64) % 256).astype(np.uint8)


# ---------------------------------------------------------------------------------------------- cv2.warpAffine
def _inverse(M) -> tuple:
    """cv2.warpAffine's inversion of a forward 2x3 matrix (imgwarp.cpp, no WARP_INVERSE_MAP), in double."""
    m0, m1, m2, m3, m4, m5 = (float(v) for v in M)
    D = m0 * m4 - m1 * m3
    D = 1.0 / D if D != 0 else 0.0
    a11, a22 = m4 * D, m0 * D
    m1, m3 = m1 * -D, m3 * -D
    b1 = -a11 * m2 - m1 * m5
    b2 = -m3 * m2 - a22 * m5
    return a11, m1, b1, m3, a22, b2


@functools.lru_cache(maxsize=64)
def _warp_map(M: tuple, H: int, W: int) -> tuple:
    """((flat gather index, bilinear weight), ...) of cv2.warpAffine(INTER_LINEAR, BORDER_CONSTANT) with forward
    matrix M on an H x W image: indices into the image padded by one fill pixel, weights in units of 1/32768 (as
    float32 columns: every product and sum stays an integer below 2**24, so float32 is exact); neighbours whose
    weight is 0 everywhere (an integer shift, a shear along one axis) are left out, which changes no sum."""
    im = _inverse(M)
    AB, round_delta = 1 << 10, (1 << 10) // 32 // 2        # AB_BITS 10, INTER_TAB_SIZE 32
    xs, ys = np.arange(W, dtype=np.float64), np.arange(H, dtype=np.float64)
    adelta = np.rint(im[0] * xs * AB).astype(np.int64)     # saturate_cast<int>(double) = cvRound: half to even
    bdelta = np.rint(im[3] * xs * AB).astype(np.int64)
    X0 = np.rint((im[1] * ys + im[2]) * AB).astype(np.int64) + round_delta
    Y0 = np.rint((im[4] * ys + im[5]) * AB).astype(np.int64) + round_delta
    X = (X0[:, None] + adelta[None, :]) >> 5               # AB_BITS - INTER_BITS
    Y = (Y0[:, None] + bdelta[None, :]) >> 5
    sx, fx, sy, fy = X >> 5, X & 31, Y >> 5, Y & 31
    Wp = W + 2
    ix0, ix1 = np.clip(sx, -1, W) + 1, np.clip(sx + 1, -1, W) + 1
    iy0, iy1 = np.clip(sy, -1, H) + 1, np.clip(sy + 1, -1, H) + 1
    terms = []
    for (iy, ix), w in zip(((iy0, ix0), (iy0, ix1), (iy1, ix0), (iy1, ix1)),
                           ((32 - fy) * (32 - fx), (32 - fy) * fx, fy * (32 - fx), fy * fx)):
        if w.any():
            terms.append(((iy * Wp + ix).reshape(-1).astype(np.intp), (w * 32).reshape(-1, 1).astype(np.float32)))
    return tuple(terms)


def warp_affine(img: np.ndarray, M, fill: int = FILL) -> np.ndarray:
    """cv2.warpAffine(img, M, (W, H), flags=INTER_LINEAR, borderValue=(fill,)*3) on HWC uint8, M forward 2x3:
    out = (sum of weight x neighbour + 2**14) >> 15, a neighbour outside the image being the fill."""
    H, W, C = img.shape
    terms = _warp_map(tuple(float(v) for v in np.asarray(M, np.float64).reshape(-1)), H, W)
    p = np.full((H + 2, W + 2, C), fill, np.uint8)
    p[1:-1, 1:-1] = img
    p = p.reshape(-1, C)
    acc = np.full((H * W, C), 1 << 14, np.float32)
    for idx, w in terms:
        t = np.take(p, idx, axis=0).astype(np.float32)
        t *= w
        acc += t
    acc *= np.float32(1 / 32768)
    return np.floor(acc, out=acc).astype(np.uint8).reshape(H, W, C)


def rotation_matrix(center, degrees: float) -> tuple:
    """cv2.getRotationMatrix2D(center, degrees, 1.0) (center as cv::Point2f, the angle via CV_PI / 180)."""
    cx, cy = (float(np.float32(c)) for c in center)
    a = degrees * (math.pi / 180)
    alpha, beta = math.cos(a), math.sin(a)
    return (alpha, beta, (1 - alpha) * cx - beta * cy, -beta, alpha, beta * cx + (1 - alpha) * cy)


def _f32(v: float) -> float:
    return float(np.float32(v))        # the official shear/translate matrices are np.float32


def shear_x(img, factor, fill=FILL):
    return warp_affine(img, (1, _f32(factor), 0, 0, 1, 0), fill)


def shear_y(img, factor, fill=FILL):
    return warp_affine(img, (1, 0, 0, _f32(factor), 1, 0), fill)


def translate_x(img, offset, fill=FILL):
    return warp_affine(img, (1, 0, _f32(-offset), 0, 1, 0), fill)


def translate_y(img, offset, fill=FILL):
    return warp_affine(img, (1, 0, 0, 0, 1, _f32(-offset)), fill)


def rotate(img, degrees, fill=FILL):
    H, W = img.shape[:2]
    return warp_affine(img, rotation_matrix((W / 2, H / 2), degrees), fill)


OP_FUNCS = {
    "Identity": lambda img: img,
    "AutoContrast": autocontrast,
    "Equalize": equalize,
    "Brightness": brightness,
    "Sharpness": sharpness,
    "ShearX": shear_x,
    "ShearY": shear_y,
    "TranslateX": translate_x,
    "TranslateY": translate_y,
    "Rotate": rotate,
}


def apply_op(img: np.ndarray, op: str, level: float, gen: torch.Generator | None = None) -> np.ndarray:
    """One official op at `level` on an HWC uint8 array (`arg_dict[op](level)` then `func_dict[op]`)."""
    return OP_FUNCS[op](img, *level_args(op, level, gen))


class RandomAugment:
    """BLIP's RandomAugment(N, M, isPIL=True, augs=BLIP_OPS) on uint8 images (C, H, W) or (H, W, C) numpy, with its
    draws from a torch.Generator (see the module docstring for how each op matches the official one)."""

    def __init__(self, n: int = 2, m: float = 5, ops=BLIP_OPS):
        unknown = [o for o in ops if o not in OP_FUNCS]
        if unknown:
            raise BenchError(f"BLIP RandomAugment has no op {unknown[0]!r} (ops: {', '.join(OP_FUNCS)})")
        self.n, self.m, self.ops = int(n), float(m), tuple(ops)

    def draw(self, gen: torch.Generator | None) -> list:
        """The N op names of one image, drawn uniformly with replacement (get_random_ops, l. 321-323)."""
        picks = torch.randint(len(self.ops), (self.n,), generator=gen).tolist()
        return [self.ops[i] for i in picks]

    def augment_hwc(self, img: np.ndarray, gen: torch.Generator | None) -> np.ndarray:
        """RandomAugment.__call__ (l. 325-334): the N ops, each skipped when its coin is > 0.5, else applied with
        its level's arguments (the signed ops draw their sign then)."""
        for op in self.draw(gen):
            if float(torch.rand((), generator=gen)) > APPLY_PROB:
                continue
            img = apply_op(img, op, self.m, gen)
        return img

    def __call__(self, img: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        """uint8 (C, H, W) tensor in, uint8 (C, H, W) tensor out."""
        hwc = np.ascontiguousarray(img.permute(1, 2, 0).numpy())
        out = self.augment_hwc(hwc, gen)
        return torch.from_numpy(np.ascontiguousarray(out)).permute(2, 0, 1).contiguous()

    def describe(self) -> str:
        return f"blip_randaugment(n={self.n}, m={self.m:g})"


# ---------------------------------------------------------------------------------------------- crop + flip
def rrc_params(height: int, width: int, scale, gen, ratio=RATIO) -> tuple:
    """torchvision RandomResizedCrop.get_params (top, left, h, w), its draws from `gen`."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * float(torch.empty(1).uniform_(scale[0], scale[1], generator=gen))
        aspect = math.exp(float(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=gen)))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = int(torch.randint(0, height - h + 1, size=(1,), generator=gen))
            j = int(torch.randint(0, width - w + 1, size=(1,), generator=gen))
            return i, j, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(img: np.ndarray, scale, gen, size=None) -> np.ndarray:
    """RandomResizedCrop(size, scale, BICUBIC) on an HWC uint8 array, as torchvision on a PIL image: crop, then
    PIL's bicubic resize to size x size (default: the image's own height)."""
    from PIL import Image
    H, W = img.shape[:2]
    size = int(size or H)
    top, left, h, w = rrc_params(H, W, scale, gen)
    pil = Image.fromarray(img).crop((left, top, left + w, top + h)).resize((size, size), Image.BICUBIC)
    return np.array(pil, np.uint8)


class TrainTransform:
    """BLIP's transform_train up to ToTensor for one task: RandomResizedCrop(scale) + flip when `crop`, then
    RandomAugment when the recipe sets `randaugment`; uint8 batches (B, C, S, S) in and out."""

    def __init__(self, crop: bool, scale=DEFAULT_SCALE, randaugment: RandomAugment | None = None):
        self.crop, self.scale, self.randaugment = bool(crop), tuple(float(s) for s in scale), randaugment

    @classmethod
    def for_recipe(cls, recipe, crop: bool, task: str) -> "TrainTransform":
        """The recipe's `crop_scale` (None: BLIP's min_scale 0.5, i.e. (0.5, 1.0)) and `randaugment` ({n, m}).
        crop_scale on a profile that does not crop is refused (it would be dropped)."""
        scale = getattr(recipe, "crop_scale", None) if recipe is not None else None
        if scale is not None and not crop:
            raise BenchError(f"training recipe: crop_scale {list(scale)} is set, but task {task} does not crop in "
                             "this profile (the random resized crop is the paper profile's, or data.augment: true for "
                             "the retrieval tasks); remove crop_scale or turn the crop on")
        ra = getattr(recipe, "randaugment", None) if recipe is not None else None
        return cls(crop, scale if scale is not None else DEFAULT_SCALE,
                   RandomAugment(ra.n, ra.m) if ra is not None else None)

    @property
    def active(self) -> bool:
        return self.crop or self.randaugment is not None

    def image_hwc(self, hwc: np.ndarray, gen: torch.Generator | None) -> np.ndarray:
        """One HWC uint8 image: crop + flip (if on), then RandomAugment (if on), in the official order."""
        if self.crop:
            hwc = random_resized_crop(hwc, self.scale, gen)
            if float(torch.rand(1, generator=gen)) < 0.5:          # RandomHorizontalFlip: torch.rand(1) < p
                hwc = hwc[:, ::-1]
        if self.randaugment is not None:
            hwc = self.randaugment.augment_hwc(np.ascontiguousarray(hwc), gen)
        return hwc

    def image(self, img: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        """One uint8 (C, H, W) image."""
        if not self.active:
            return img
        out = self.image_hwc(np.ascontiguousarray(img.numpy().transpose(1, 2, 0)), gen)
        return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1)))

    def __call__(self, x: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        """A uint8 batch (B, C, H, W), each image on its own draws, in batch order."""
        if not self.active:
            return x
        out = np.empty(tuple(x.shape), np.uint8)
        for i, img in enumerate(x.numpy()):
            out[i] = self.image_hwc(np.ascontiguousarray(img.transpose(1, 2, 0)), gen).transpose(2, 0, 1)
        return torch.from_numpy(out)

    def describe(self) -> str:
        parts = [f"rrc{self.scale[0]:g}-{self.scale[1]:g}_bicubic+flip"] if self.crop else []
        if self.randaugment is not None:
            parts.append(self.randaugment.describe())
        return "+".join(parts) or "none"
