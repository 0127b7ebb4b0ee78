"""Synthetic scenes of the micro data sets.

- `render_micro_scene`: the micro ADE20K's street-like scenes with a per-pixel annotation (sky above a
  wavy horizon, textured ground, buildings with window grids, things whose shape gives the class, unlabelled
  clutter), drawn with numpy masks. Written to disk by tasks.ade20k.generate_micro.
- `contrast_and_noise`: the last step of every micro renderer here and in tasks.imagenet (a global
  brightness / contrast jitter and pixel noise, rounded to uint8).

The other micro renderers are of another kind and stay with their tasks: tasks.imagenet.render_micro_image
(one PIL-drawn object whose shape x colour family is the class; also CIFAR-10's) and tasks.vl_micro.draw_scene
(PIL shapes in a 2x2 grid, described by the vision-language grammar). Their shapes are drawn differently
(polygons vs masks), so the images differ: they are not merged.

Everything is deterministic given the numpy Generator passed in; any change changes the micro data bytes
(bump the owning task's GENERATOR_VERSION).
"""
from __future__ import annotations

import colorsys
import math

import numpy as np


def contrast_and_noise(a: np.ndarray, rng: np.random.Generator, contrast: tuple, noise: float) -> np.ndarray:
    """float RGB in 0..255 -> uint8: contrast x U(contrast) around 128, brightness + N(0, 10), pixel noise
    N(0, noise), rounded and clipped."""
    a = (a - 128) * rng.uniform(*contrast) + 128 + rng.normal(0, 10)
    a = a + rng.normal(0, noise, a.shape)
    return a.round().clip(0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------
# micro ADE20K scenes
# ----------------------------------------------------------------------------------------------------

MICRO_CLASSES = ("sky", "ground", "building", "ball", "box", "tree", "sign", "ring")
THING_SHAPES = ("circle", "square", "triangle", "cross", "ring")   # classes 3.. (0-based), in this order
# Scene parameters (fractions of the image height unless said otherwise). Changing any of them (or the code
# below) changes the images: bump tasks.ade20k.GENERATOR_VERSION (it is part of the cache folder name).
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

    return contrast_and_noise(img * 255, rng, (0.8, 1.15), P["noise"]), ann
