"""Synthetic scenes and their language for the micro vision-language tasks (NLVR2, VQA, caption, retrieval).

A scene is 1-4 objects (shape x colour x size) placed in distinct cells of a 2x2 grid over a noisy
background, so spatial relations ("left of", "above") are unambiguous. Everything the tasks say about a
scene comes from a small fixed grammar:

    caption(scene, rng)                   "a large red circle left of a small blue square"
    nlvr2_statement(scene0, scene1, rng)  ("the left image has more circles than the right image", False)
    vqa_question(scene, rng)              ("what color is the square ?", "red")

and `MicroTokenizer` is a word-level tokenizer over exactly that grammar's words (BERT-style ids: [CLS] at
position 0, [SEP] at the end, pad 0; the mechanism is tasks.common.tokenizers.BertStyleWordTokenizer). A tiny BLIP/CLIP learns these tasks in a couple of minutes because
the answer is a function of a few visual attributes; pruning too much of the vision tower loses colour,
size or position and the metrics drop.

Everything is deterministic given the numpy Generator passed in (np.random.default_rng([...])).
Bump `GENERATOR_VERSION` when any image or sentence changes: the tasks put it into their cache folder hash.
"""
from __future__ import annotations

import math

import numpy as np

from tasks.common.tokenizers import BertStyleWordTokenizer

GENERATOR_VERSION = 1

SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (220, 45, 40), "green": (40, 175, 60), "blue": (50, 90, 235), "yellow": (235, 210, 40)}
SIZES = ("small", "large")
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
RELATIONS = ("left of", "right of", "above", "below")

# Radii as a fraction of the image side (a grid cell is half the side).
RADIUS = {"small": (0.09, 0.12), "large": (0.17, 0.21)}
CELL_JITTER = 0.06            # centre jitter inside a grid cell (fraction of the side)
NOISE_STD = 8.0               # pixel noise (0..255)


# ----------------------------------------------------------------------------------------------------
# scenes
# ----------------------------------------------------------------------------------------------------

def sample_scene(rng: np.random.Generator, min_objects: int = 1, max_objects: int = 4) -> list[dict]:
    """1-4 objects in distinct cells of a 2x2 grid; x, y are normalised centres in [0, 1] (y down)."""
    n = int(rng.integers(min_objects, max_objects + 1))
    cells = rng.permutation(4)[:n]
    scene = []
    for c in cells:
        col, row = int(c) % 2, int(c) // 2
        x = 0.25 + 0.5 * col + rng.uniform(-CELL_JITTER, CELL_JITTER)
        y = 0.25 + 0.5 * row + rng.uniform(-CELL_JITTER, CELL_JITTER)
        scene.append(dict(shape=SHAPES[int(rng.integers(len(SHAPES)))],
                          color=list(COLORS)[int(rng.integers(len(COLORS)))],
                          size=SIZES[int(rng.integers(len(SIZES)))],
                          x=float(x), y=float(y), col=col, row=row))
    return scene


def draw_scene(scene: list[dict], rng: np.random.Generator, size: int = 32):
    """Render a scene (RGB PIL image, size x size): dark noisy background, anti-aliased shapes."""
    from PIL import Image, ImageDraw

    ss = 4
    S = size * ss
    bg = tuple(int(v) for v in rng.integers(20, 70, 3))
    img = Image.new("RGB", (S, S), bg)
    draw = ImageDraw.Draw(img)
    for o in scene:
        r = rng.uniform(*RADIUS[o["size"]]) * S
        cx, cy = o["x"] * S, o["y"] * S
        jitter = rng.integers(-20, 21, 3)
        color = tuple(int(np.clip(v + j, 0, 255)) for v, j in zip(COLORS[o["color"]], jitter))
        if o["shape"] == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
        elif o["shape"] == "square":
            h = r * 0.85
            draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=color)
        else:   # triangle pointing up
            pts = [(cx + r * math.cos(a), cy - r * math.sin(a)) for a in (math.pi / 2, math.pi * 7 / 6, math.pi * 11 / 6)]
            draw.polygon(pts, fill=color)
    img = img.resize((size, size), Image.BOX)
    arr = np.asarray(img, np.float32) + rng.normal(0, NOISE_STD, (size, size, 3))
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def render_scene(rng: np.random.Generator, size: int = 32, min_objects: int = 1, max_objects: int = 4):
    """-> (PIL RGB image size x size, scene: list of dict(shape, color, size, x, y, col, row))."""
    scene = sample_scene(rng, min_objects, max_objects)
    return draw_scene(scene, rng, size), scene


# ----------------------------------------------------------------------------------------------------
# language
# ----------------------------------------------------------------------------------------------------

def _plural(shape: str) -> str:
    return shape + "s"


def _phrase(o: dict, parts=("size", "color", "shape")) -> str:
    return " ".join(o[p] for p in parts)


def relation_holds(a: dict, rel: str, b: dict) -> bool:
    """Spatial relation between two objects of one scene (grid cells, so never ambiguous when it holds)."""
    if rel == "left of":
        return a["col"] < b["col"]
    if rel == "right of":
        return a["col"] > b["col"]
    if rel == "above":
        return a["row"] < b["row"]
    if rel == "below":
        return a["row"] > b["row"]
    raise ValueError(rel)


def caption(scene: list[dict], rng: np.random.Generator) -> str:
    """One true description of the scene; different rng draws give different captions of the same scene
    (the task draws 5 for its 5 references). Templates: a relation between two objects, one object with
    all attributes, the object count, a count of one shape."""
    kinds = ["object", "count", "shape_count"]
    pairs = [(a, rel, b) for a in scene for b in scene if a is not b for rel in RELATIONS if relation_holds(a, rel, b)]
    if pairs:
        kinds += ["relation", "relation"]
    kind = kinds[int(rng.integers(len(kinds)))]
    if kind == "relation":
        a, rel, b = pairs[int(rng.integers(len(pairs)))]
        return f"a {_phrase(a)} {rel} a {_phrase(b)}"
    if kind == "object":
        o = scene[int(rng.integers(len(scene)))]
        return f"a {_phrase(o)}" + (" on its own" if len(scene) == 1 else f" and {NUMBER_WORDS[len(scene) - 1]} other objects"
                                    if len(scene) > 2 else " and one other object")
    if kind == "count":
        cols = sorted({o["color"] for o in scene})
        noun = "object" if len(scene) == 1 else "objects"
        return f"{NUMBER_WORDS[len(scene)]} {noun} in " + " and ".join(cols)
    shape = scene[int(rng.integers(len(scene)))]["shape"]
    k = sum(o["shape"] == shape for o in scene)
    return f"{NUMBER_WORDS[k]} {shape if k == 1 else _plural(shape)} and {NUMBER_WORDS[len(scene) - k]} other " \
           f"{'object' if len(scene) - k == 1 else 'objects'}"


def _count(scene, shape=None, color=None, size=None) -> int:
    return sum((shape is None or o["shape"] == shape) and (color is None or o["color"] == color)
               and (size is None or o["size"] == size) for o in scene)


def nlvr2_statement(scene0: list[dict], scene1: list[dict], rng: np.random.Generator) -> tuple[str, bool]:
    """A statement about an image pair and whether it is true. The truth value is drawn first (50/50) and
    templates are sampled until one with that value comes up, so labels stay balanced."""
    want = bool(rng.integers(2))
    sides = (("left", scene0), ("right", scene1))
    colors = list(COLORS)
    st, truth = "", False
    for _ in range(50):
        kind = int(rng.integers(5))
        s_name, s = sides[int(rng.integers(2))]
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        color = colors[int(rng.integers(len(colors)))]
        if kind == 0:
            st = f"the left image has more {_plural(shape)} than the right image"
            truth = _count(scene0, shape=shape) > _count(scene1, shape=shape)
        elif kind == 1:
            st = f"the {s_name} image contains a {color} {shape}"
            truth = _count(s, shape=shape, color=color) > 0
        elif kind == 2:
            st = f"both images contain a {color} object"
            truth = _count(scene0, color=color) > 0 and _count(scene1, color=color) > 0
        elif kind == 3:
            k = int(rng.integers(1, 5))
            st = f"the {s_name} image contains exactly {NUMBER_WORDS[k]} {'object' if k == 1 else 'objects'}"
            truth = len(s) == k
        else:
            size = SIZES[int(rng.integers(2))]
            st = f"there is a {size} {shape} in the {s_name} image"
            truth = _count(s, shape=shape, size=size) > 0
        if truth == want:
            break
    return st, bool(truth)


def vqa_question(scene: list[dict], rng: np.random.Generator) -> tuple[str, str]:
    """A question and its answer. Answers: colours, shapes, sizes, yes/no and number words ("two")."""
    for _ in range(50):
        kind = int(rng.integers(5))
        o = scene[int(rng.integers(len(scene)))]
        if kind == 0 and _count(scene, shape=o["shape"]) == 1:
            return f"what color is the {o['shape']} ?", o["color"]
        if kind == 1 and _count(scene, color=o["color"]) == 1:
            return f"what shape is the {o['color']} object ?", o["shape"]
        if kind == 2:
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            return f"how many {_plural(shape)} are there ?", NUMBER_WORDS[_count(scene, shape=shape)]
        if kind == 3:
            if rng.integers(2):   # a present object, or a random (maybe absent) combination
                shape, color = o["shape"], o["color"]
            else:
                shape = SHAPES[int(rng.integers(len(SHAPES)))]
                color = list(COLORS)[int(rng.integers(len(COLORS)))]
            return f"is there a {color} {shape} ?", "yes" if _count(scene, shape=shape, color=color) else "no"
        if kind == 4 and _count(scene, shape=o["shape"], color=o["color"]) == 1:
            return f"what size is the {o['color']} {o['shape']} ?", o["size"]
    return "how many objects are there ?", NUMBER_WORDS[len(scene)]


def vqa_answer_list() -> list[str]:
    """Every answer vqa_question can give (the micro answer_list.json)."""
    return list(COLORS) + list(SHAPES) + list(SIZES) + ["yes", "no"] + list(NUMBER_WORDS)


# ----------------------------------------------------------------------------------------------------
# tokenizer
# ----------------------------------------------------------------------------------------------------

_T = BertStyleWordTokenizer        # the mechanism and its special ids (tasks.common.tokenizers)
SPECIALS = _T.SPECIALS
PAD_ID, CLS_ID, SEP_ID, MASK_ID = _T.pad_token_id, _T.cls_token_id, _T.sep_token_id, _T.mask_token_id
ENC_ID, DEC_ID, UNK_ID = _T.enc_token_id, _T.dec_token_id, _T.unk_token_id

# Every word the grammar above uses (plus the caption prompt "a picture of" and the digits the VQA
# normalisation produces), in a fixed order: ids never change unless this list changes.
WORDS = (
    "a", "an", "the", "of", "picture", "is", "there", "are", "in", "and", "on", "its", "own", "other",
    "object", "objects", "image", "images", "left", "right", "above", "below", "than", "more", "has",
    "both", "contain", "contains", "exactly", "what", "color", "shape", "size", "how", "many", "?", ".", ",",
    "yes", "no",
    *SHAPES, *(_plural(s) for s in SHAPES), *COLORS, *SIZES, *NUMBER_WORDS,
    "0", "1", "2", "3", "4", "5", "6", "7", "8", "9",
)


class MicroTokenizer(BertStyleWordTokenizer):
    """The micro grammar's tokenizer: tasks.common.tokenizers.BertStyleWordTokenizer over exactly WORDS.

    tok(texts, max_len) -> {"input_ids": (B, L) long, "attention_mask": (B, L) long} with [CLS] at 0, [SEP]
    last, pad 0; unknown words map to [UNK] (id 6); vocab_size = 512 (the micro model configs')."""

    def __init__(self):
        super().__init__(WORDS)
