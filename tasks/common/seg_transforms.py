"""Semantic-segmentation training transforms: Segmenter's ADE20K train pipeline (mmseg 0.x ops re-implemented
with torch / PIL / numpy) on one image, its cheap batched version for in-memory micro splits, and the
normalisation they and the evaluation share.

  normalize(x, "vit" | "deit")               x in [0, 1], channels first
  rescale_size(h, w, scale)                  mmcv's keep-ratio imrescale size (training resize and evaluation)
  photometric_distortion(img, rng)           mmseg's PhotoMetricDistortion
  random_crop_bbox(label, crop, rng, ratio)  mmseg's RandomCrop with cat_max_ratio
  train_transform(img, label, rng, ...)      resize + crop + flip + distortion + normalise + pad, one pair
  batch_train_transform(x, y, g, ...)        the batched approximation (one grid_sample per batch)
"""
from __future__ import annotations

import math
import random

import numpy as np
import torch
import torch.nn.functional as F

from metrics.segmentation import IGNORE_INDEX

# Segmenter's normalisation statistics (segm/data/utils.py STATS); the ViT backbones use "vit"
NORMALIZATION = {"vit": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
                 "deit": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}


def rescale_size(h: int, w: int, scale) -> tuple[int, int]:
    """mmcv's imrescale size for a (long, short) scale with keep_ratio: factor = min(long / max(h, w),
    short / min(h, w)), new size int(x * factor + 0.5)."""
    long_edge, short_edge = max(scale), min(scale)
    f = min(long_edge / max(h, w), short_edge / min(h, w))
    return int(h * f + 0.5), int(w * f + 0.5)


def normalize(x: torch.Tensor, normalization: str) -> torch.Tensor:
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
    x = normalize(torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1).float() / 255, normalization)
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
    img = normalize(img, normalization) * valid[:, None]
    return img, lab


_RGB2YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def _hue_rotate(img: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    c, s = torch.cos(angle), torch.sin(angle)
    rot = torch.zeros(angle.shape[0], 3, 3)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = c, -s, s, c
    m = torch.linalg.inv(_RGB2YIQ) @ rot @ _RGB2YIQ                  # (B, 3, 3)
    return torch.einsum("bij,bjhw->bihw", m, img)
