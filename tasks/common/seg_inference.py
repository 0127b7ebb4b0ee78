"""Semantic-segmentation inference: Segmenter's sliding-window logits and the test-time augmentations
(multi-scale + flip) of segm/model/utils.py (`inference`, `sliding_window`, `merge_windows`, `resize`),
on one normalised image (3, H, W).

  window_anchors(size, window, stride)      Segmenter's window offsets along one side
  sliding_window_logits(model, im, ...)     logits (C, H, W), windows averaged where they overlap
  tta_inputs(im, scale=, window=, ...)      the resized (and flipped) inputs of mmseg's MultiScaleFlipAug
  predict_probs(model, im, scale=, ...)     summed softmax (C, H, W) over those inputs, at the original size
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tasks.common.seg_transforms import rescale_size


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
