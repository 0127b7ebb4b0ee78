"""NLVR2 (Suhr et al., 2019) as BLIP and UPop run it: is a statement true of an image pair? Accuracy on
dev and test-P.

Layout (BLIP's configs/nlvr.yaml: `ann_root` with BLIP's annotation files, `image_root` with the images):

    <root>/annotation/nlvr_train.json     [{"images": ["images/train/.../train-10171-0-img0.png",
    <root>/annotation/nlvr_dev.json          "images/train/.../train-10171-0-img1.png"],
    <root>/annotation/nlvr_test.json         "sentence": "...", "label": "True" | "False"}, ...]
    <root>/<the paths in "images">          (relative to <root>, BLIP's image_root)

<root> = <data_root>/nlvr2 in the paper profile (settings `ann_root` / `image_root` override the two
folders). nlvr_test.json is test-P (the public test set), the split UPop reports as "Test Acc".

What BLIP does (and this task reproduces): sentences through `pre_caption` (lower case, punctuation
stripped, at most 40 words); images 384x384 bicubic, CLIP mean/std; training augmentation = the pair
swap of BLIP's NLVR dataset (with probability 0.5 the two images are exchanged and the words "left" and
"right" in the sentence are swapped); the paper profile also uses BLIP's RandomResizedCrop(0.5-1, bicubic) +
flip on each image (torchvision's crop, tasks.common.blip_augment), and the recipe keys `crop_scale` (the crop's
area range, default BLIP's min_scale 0.5) and `randaugment` (BLIP's RandomAugment(n, m) after the flip, any
profile) complete BLIP's transform_train. Loss: cross-entropy over the two classes of the model's logits. Metrics: accuracy in percent (`acc`, plus `dev_acc` / `test_acc` so a card
can report both splits).

Tokenisation: the task's job. Micro: tasks.vl_micro.MicroTokenizer. Paper: transformers' BertTokenizer
from a local bert-base-uncased folder (setting `tokenizer`, default <data_root>/bert-base-uncased) with
BLIP's added [DEC] and [ENC] tokens (tasks.common.tokenizers.BlipBertTokenizer); nothing is downloaded.

Micro profile: `<cache>/data/nlvr2_micro-<hash>`, generated atomically in exactly the layout above
(PNG image pairs of synthetic scenes and statements about them from tasks.vl_micro). Images are decoded
lazily on first use and kept in memory (small sets).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from bench.api import TaskAdapter
from bench.errors import BenchError, MissingData
from bench.measure import eval_mode
from bench.options import NonNegInt, OptionsModel, PositiveInt
from bench.registry import register_task
from tasks.common import files
from tasks.common.batching import generator, micro_batches
from tasks.common.blip_augment import TrainTransform
from tasks.common.tokenizers import BlipBertTokenizer, check_vocab
from tasks.micro_data import generate_atomically, micro_folder
from tasks.retrieval import pre_caption

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SPLITS = {"train": "nlvr_train.json", "dev": "nlvr_dev.json", "test": "nlvr_test.json"}
LAYOUT_VERSION = 1
GENERATOR_VERSION = 2   # 2: statements chosen first, scenes sampled to the drawn truth value
EVAL_BATCH_SIZE = 128
MAX_WORDS = 40
# The text of the official FLOPs protocol (UPop's utils.print_params_and_flops, fvcore, batch of one image pair)
# and its bert-base-uncased token count ([CLS] and [SEP] included). The ids themselves do not change the count,
# only the length matters:
NLVR2_SENTENCE = ("Params and FLOPs test, test params and FLOPs, params and FLOPs test, test params and FLOPs, "
                  "params and FLOPs test")      # 20 words + 4 commas, "params"/"flops" 2 WordPieces each
NLVR2_TOKENS = 36

LAYOUT = """\
  <root>/annotation/nlvr_train.json   (BLIP's annotation files: a JSON list of
  <root>/annotation/nlvr_dev.json      {"images": [img0, img1], "sentence": str, "label": "True"|"False"})
  <root>/annotation/nlvr_test.json    (test-P)
  <root>/<img0>, <root>/<img1>        (image paths in the JSON are relative to <root>, BLIP's image_root)"""

MICRO_KEYS = ("train_pairs", "dev_pairs", "test_pairs", "image_size", "max_objects", "seed")   # generator settings


class Nlvr2Data(OptionsModel):
    """A profile's `data:` block for nlvr2."""

    image_size: PositiveInt | None = Field(None, description="side of the square images fed to the model (null: 32 "
                                                             "micro, 384 paper)")
    max_tokens: PositiveInt | None = Field(None, description="sentence length in tokens (null: 64 micro, 128 paper)")
    tokenizer: str | None = Field(None, description="paper: local bert-base-uncased folder (null: "
                                                    "<data_root>/bert-base-uncased)")
    image_root: str | None = Field(None, description="paper: folder the annotation's image paths are relative to "
                                                     "(null: <data_root>/nlvr2)")
    ann_root: str | None = Field(None, description="paper: folder of nlvr_{train,dev,test}.json (null: <image root>/annotation)")
    image_cache: NonNegInt = Field(2000, description="paper: decoded images kept in memory")
    train_pairs: PositiveInt = Field(3000, description="micro: training image pairs the generator writes")
    dev_pairs: PositiveInt = Field(400, description="micro: dev image pairs")
    test_pairs: PositiveInt = Field(400, description="micro: test-P image pairs")
    max_objects: PositiveInt = Field(4, description="micro: most objects in one generated scene")
    seed: NonNegInt = Field(2024, description="micro: generator seed")


def swap_left_right(sentence: str) -> str:
    return " ".join({"left": "right", "right": "left"}.get(w, w) for w in sentence.split(" "))


def read_annotation(path: Path) -> list:
    """Read and check one BLIP NLVR2 annotation file; errors name the file, the entry, the field and the fix
    (bytes that are not UTF-8 and JSON syntax errors too: tasks.common.files.read_json)."""
    path = Path(path)
    data = files.read_json(path, "an NLVR2 annotation file: replace it with BLIP's released nlvr_*.json", LAYOUT)
    if not isinstance(data, list):
        raise BenchError(f"{path} must be a JSON list of {{images, sentence, label}} entries (BLIP's format), "
                         f"got a {type(data).__name__}.")
    out = []
    entry = '{"images": [two paths], "sentence": str, "label": "True"|"False"}'
    for i, a in enumerate(data):
        if not isinstance(a, dict):
            problem = f"is a {type(a).__name__}, not an object"
        elif any(f not in a for f in ("images", "sentence", "label")):
            problem = f"has no field {next(f for f in ('images', 'sentence', 'label') if f not in a)!r}"
        elif not (isinstance(a["images"], list) and len(a["images"]) == 2 and all(isinstance(x, str) for x in a["images"])):
            problem = "has a field 'images' that is not a list of two image paths"
        elif not isinstance(a["sentence"], str):
            problem = "has a field 'sentence' that is not a string"
        elif str(a["label"]) not in ("True", "False"):
            problem = f"has a field 'label' of {a['label']!r}, not \"True\" or \"False\""
        else:
            out.append({"images": a["images"], "sentence": a["sentence"], "label": int(str(a["label"]) == "True")})
            continue
        raise BenchError(f"{path}: entry {i} {problem}; an NLVR2 entry is {entry}: {json.dumps(a, default=str)[:200]}. "
                         "Fix or remove that entry, or use BLIP's released file.")
    if not out:
        raise BenchError(f"{path} has no entries.")
    return out


def grounded_statement(rng: np.random.Generator):
    """A statement about an image pair and its truth function. Only colours and object counts: what a
    micro BLIP can learn to ground in a few minutes."""
    from tasks import vl_micro

    colour = list(vl_micro.COLORS)[int(rng.integers(len(vl_micro.COLORS)))]
    side = ("left", "right")[int(rng.integers(2))]
    kind = int(rng.integers(3))
    if kind == 0:
        return (f"the {side} image contains a {colour} object",
                lambda a, b: vl_micro._count(a if side == "left" else b, color=colour) > 0)
    if kind == 1:
        return (f"both images contain a {colour} object",
                lambda a, b: vl_micro._count(a, color=colour) > 0 and vl_micro._count(b, color=colour) > 0)
    return "the left image has more objects than the right image", lambda a, b: len(a) > len(b)


def grounded_pair(rng: np.random.Generator, image_size: int, max_objects: int):
    """The statement and the wanted truth value are drawn first, then scene pairs are sampled until the
    statement has that value: every sentence is true half the time, so the sentence alone gives 50%
    and a model above that must look at the images (template-level label bias made an earlier generator
    learnable from text alone)."""
    from tasks import vl_micro

    sentence, holds = grounded_statement(rng)
    want = bool(rng.integers(2))
    for _ in range(1000):
        sc0, sc1 = (vl_micro.sample_scene(rng, 1, max_objects) for _ in range(2))
        if holds(sc0, sc1) == want:
            break
    return (vl_micro.draw_scene(sc0, rng, image_size), vl_micro.draw_scene(sc1, rng, image_size)), sentence, \
        holds(sc0, sc1)


def generate_micro(root, train_pairs=3000, dev_pairs=400, test_pairs=400, image_size=32, seed=2024,
                   max_objects=4) -> Path:
    """Write a synthetic NLVR2 in BLIP's layout: PNG pairs of tasks.vl_micro scenes + statements (balanced
    True/False per sentence, see grounded_pair), `annotation/nlvr_{train,dev,test}.json`. Deterministic for
    given settings."""
    root = Path(root)
    (root / "annotation").mkdir(parents=True, exist_ok=True)
    for s_id, (split, n) in enumerate((("train", train_pairs), ("dev", dev_pairs), ("test", test_pairs))):
        folder = root / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        anns = []
        for i in range(int(n)):
            rng = np.random.default_rng([int(seed), s_id, i])
            (img0, img1), sentence, truth = grounded_pair(rng, int(image_size), int(max_objects))
            names = [f"images/{split}/{split}-{i}-{j}-img{j}.png" for j in (0, 1)]
            img0.save(root / names[0])
            img1.save(root / names[1])
            anns.append({"images": names, "sentence": sentence, "label": "True" if truth else "False"})
        (root / "annotation" / SPLITS[split]).write_text(json.dumps(anns))
    (root / "README.txt").write_text(
        f"Micro NLVR2: synthetic stand-in written by tasks.nlvr2.generate_micro (generator {GENERATOR_VERSION}, "
        f"layout {LAYOUT_VERSION}); {train_pairs}/{dev_pairs}/{test_pairs} pairs, {image_size} px, 1-{max_objects} "
        f"objects per image, seed {seed}.\n"
        "Same layout as BLIP's NLVR2 data:\n" + LAYOUT + "\nNot comparable with NLVR2 numbers.\n")
    return root


@register_task("nlvr2")
class Nlvr2Task(TaskAdapter):
    """NLVR2 accuracy (percent) on dev and test-P with a BLIP NLVR2 model (two images + a sentence -> 2 logits)."""

    name = "nlvr2"
    VERSION = 2   # 2: one generator per micro-batch for its augmentation (tasks.common.batching)
    metrics = {"acc": True, "dev_acc": True, "test_acc": True}
    layout = LAYOUT
    Data = Nlvr2Data
    RECIPE_KEYS = frozenset({"crop_scale", "randaugment"})   # BLIP's transform_train (tasks.common.blip_augment)

    def __init__(self, settings, data_root, profile, cache_dir):
        super().__init__(settings, data_root, profile, cache_dir)
        self._ann: dict = {}
        self._img_cache: dict = {}
        self._tok = None

    # ---------------------------------------------------------------- settings / folders
    @property
    def micro_settings(self) -> dict:
        return {**{k: getattr(self.settings, k) for k in MICRO_KEYS}, "image_size": self.image_size}

    @property
    def image_size(self) -> int:
        v = self.settings.image_size
        return v if v is not None else (32 if self.profile == "micro" else 384)

    @property
    def root(self) -> Path:
        if self.profile == "paper":
            return Path(self.settings.image_root) if self.settings.image_root is not None else self.data_root / "nlvr2"
        return micro_folder(self.cache_dir, "nlvr2", {**self.micro_settings, "generator": GENERATOR_VERSION})

    @property
    def ann_root(self) -> Path:
        if self.profile == "paper" and self.settings.ann_root is not None:
            return Path(self.settings.ann_root)
        return self.root / "annotation"

    # ---------------------------------------------------------------- data
    def prepare(self) -> None:
        if self._ann:
            return
        if self.profile == "micro":
            s = self.micro_settings
            generate_atomically(self.root, lambda tmp: generate_micro(tmp, **s))
        for split, fname in SPLITS.items():
            path = self.ann_root / fname
            if not path.is_file():
                raise MissingData(f"NLVR2 annotation file {fname}", path, self.layout,
                                  "Put BLIP's nlvr_*.json files (https://github.com/salesforce/BLIP data) there, or "
                                  "point --data-root DIR / the card's data.ann_root at them. The micro profile needs "
                                  "no data.")
            self._ann[split] = read_annotation(path)
        if self.profile == "paper":      # real data: a missing, cut or unreadable image fails here, naming itself
            import hashlib
            rels = list(dict.fromkeys(r for anns in self._ann.values() for a in anns for r in a["images"]))
            tag = hashlib.sha256(str(self.root.resolve()).encode()).hexdigest()[:16]
            files.scan_images([self.root / r for r in rels], "the NLVR2 images", layout=self.layout,
                              stamp=self.cache_dir / "scans" / f"nlvr2-{tag}.txt")

    def split(self, split: str) -> list:
        if split not in SPLITS:
            raise BenchError(f"nlvr2 has splits {sorted(SPLITS)} (test = test-P), not {split!r}")
        self.prepare()
        return self._ann[split]

    def steps_per_epoch(self, batch_size: int) -> int:
        return max(1, len(self.split("train")) // int(batch_size))

    def _image(self, rel: str) -> torch.Tensor:
        """uint8 (3, S, S) of one image, resized (bicubic) to the model's size; missing file -> MissingData."""
        if rel in self._img_cache:
            return self._img_cache[rel]
        from PIL import Image

        path = self.root / rel
        if not path.is_file():
            raise MissingData(f"NLVR2 image {rel}", path, self.layout,
                              "The annotation names an image that is not in the image folder: copy the NLVR2 images "
                              "there (the paths in the JSON are relative to the image root).")
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                if im.size != (self.image_size, self.image_size):
                    im = im.resize((self.image_size, self.image_size), Image.BICUBIC)
                t = torch.from_numpy(np.asarray(im, np.uint8).copy()).permute(2, 0, 1).contiguous()
        except OSError as e:
            raise BenchError(f"NLVR2 image {path} cannot be decoded ({e}); the file is corrupt.") from e
        if self.profile == "micro" or len(self._img_cache) < self.settings.image_cache:
            self._img_cache[rel] = t
        return t

    @staticmethod
    def _normalise(x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        return (x.float() / 255 - mean) / std

    # ---------------------------------------------------------------- tokeniser
    @property
    def tokenizer(self):
        if self._tok is None:
            if self.profile == "micro":
                from tasks.vl_micro import MicroTokenizer
                self._tok = MicroTokenizer()
            else:
                tok = self.settings.tokenizer
                self._tok = BlipBertTokenizer(tok if tok is not None else self.data_root / "bert-base-uncased")
        return self._tok

    def check_model(self, model) -> None:
        """Paper: the BERT tokenizer's ids (BLIP's [DEC]/[ENC] included) must fit the text embedding."""
        if self.profile == "paper":
            check_vocab(self.tokenizer.tok, model, self.tokenizer.path, "NLVR2 tokenizer")

    def tokenize(self, sentences: list) -> tuple:
        n = self.settings.max_tokens
        enc = self.tokenizer(sentences, max_len=n if n is not None else (64 if self.profile == "micro" else 128))
        return enc["input_ids"], enc["attention_mask"]

    # ---------------------------------------------------------------- batches
    def _batch(self, anns, augment=False, gen=None, transform=None):
        img0, img1, sents, labels = [], [], [], []
        for a in anns:
            i0, i1 = self._image(a["images"][0]), self._image(a["images"][1])
            s = pre_caption(a["sentence"], MAX_WORDS)
            if augment and float(torch.rand((), generator=gen)) < 0.5:   # BLIP's pair swap (+ left/right words)
                i0, i1, s = i1, i0, swap_left_right(s)
            img0.append(i0)
            img1.append(i1)
            sents.append(s)
            labels.append(a["label"])
        x0, x1 = torch.stack(img0), torch.stack(img1)
        if augment and transform is not None:     # BLIP's transform_train, each image on its own
            x0, x1 = transform(x0, gen), transform(x1, gen)
        ids, mask = self.tokenize(sents)
        return self._normalise(x0), self._normalise(x1), ids, mask, torch.tensor(labels, dtype=torch.long)

    def train_batches(self, batch_size: int, seed: int, recipe=None, shard=None):
        """(image0, image1, ids, mask, labels) of `tasks.common.batching.micro_batches` (drop_last, as BLIP's
        loader); with `shard`, only this rank's micro-batches are loaded and augmented."""
        anns = self.split("train")
        # paper: RandomResizedCrop + flip; the recipe's randaugment adds BLIP's RandomAugment (micro: none unless set)
        transform = TrainTransform.for_recipe(recipe, crop=self.profile == "paper", task=self.name)
        for idx, bseed in micro_batches(len(anns), batch_size, seed, shard):
            yield self._batch([anns[j] for j in idx.tolist()], augment=True, gen=generator(bseed), transform=transform)

    def loss(self, model: nn.Module, batch, device, recipe=None) -> torch.Tensor:
        x0, x1, ids, mask, y = batch
        logits = model(x0.to(device), x1.to(device), ids.to(device), mask.to(device), mode="train")
        return F.cross_entropy(logits, y.to(device))

    def evaluate(self, model: nn.Module, split: str = "dev", device="cpu") -> dict:
        """{"acc", "<split>_acc": percent, "n": pairs} on dev or test (test-P)."""
        anns = self.split(split)
        device = torch.device(device)
        correct = 0
        with eval_mode(model), torch.inference_mode():
            for i in range(0, len(anns), EVAL_BATCH_SIZE):
                x0, x1, ids, mask, y = self._batch(anns[i:i + EVAL_BATCH_SIZE])
                logits = model(x0.to(device), x1.to(device), ids.to(device), mask.to(device))
                correct += int((logits.argmax(-1).cpu() == y).sum())
        acc = 100.0 * correct / len(anns)
        return {"acc": acc, f"{split}_acc": acc, "n": len(anns)}

    # ---------------------------------------------------------------- FLOPs / throughput inputs
    MICRO_SENTENCE = "the left image has more circles than the right image"

    @staticmethod
    def _speaks_micro(model_config: dict) -> bool:
        """Does the model read MicroTokenizer's ids: the [CLS] / [SEP] ids its config declares are the micro
        tokenizer's and its vocabulary holds every micro id (the micro archs; undeclared keys count as the micro
        tokenizer's)? A micro-profile task is also built for a paper-size model (a profile with `data_source:
        synthetic` and a paper arch: the cells' FLOPs, `bench flops`): that model declares a BERT vocabulary
        ([CLS] 101, [SEP] 102, 30,524 ids), a micro statement is not a sentence of it, and its count must be the
        paper protocol's, so it gets NLVR2_SENTENCE's length in its own special ids."""
        from tasks.vl_micro import MicroTokenizer as T
        return (model_config.get("cls_token_id", T.cls_token_id) == T.cls_token_id
                and model_config.get("sep_token_id", T.sep_token_id) == T.sep_token_id
                and int(model_config.get("vocab_size", T.vocab_size)) >= T.vocab_size)

    def dummy_inputs(self, model_config: dict, batch_size: int, device) -> tuple:
        """(image0, image1, input_ids, attention_mask): 2 images + a fixed sentence per sample (the inference
        forward). Paper: the 36-token sentence of UPop's FLOPs protocol (NLVR2_SENTENCE, in the model's special
        ids); micro: a micro statement (also the paper sentence for a model that does not read the micro
        tokenizer's ids, see _speaks_micro)."""
        s = int(model_config.get("image_size", self.image_size))
        if self.profile == "paper" or not self._speaks_micro(model_config):
            from tasks.common.protocol_inputs import ids_of_length
            ids, mask = ids_of_length(NLVR2_TOKENS, batch_size, model_config, device)
        else:
            from tasks.vl_micro import MicroTokenizer
            enc = MicroTokenizer()([self.MICRO_SENTENCE] * batch_size, max_len=64)
            ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        return (torch.randn(batch_size, 3, s, s, device=device), torch.randn(batch_size, 3, s, s, device=device),
                ids, mask)

    def flops_forwards(self, model_config: dict, device) -> dict:
        """UPop's NLVR2 FLOPs protocol is the inference forward on one image pair + one sentence (upop.md §5),
        so the paper entry and the inference entry are the same forward."""
        args = self.dummy_inputs(model_config, 1, device)
        s, L = args[0].shape[-1], args[2].shape[1]
        return {f"paper: inference forward, 2 images {s} + 1 sentence ({L} tokens)": (args, {}),
                f"inference: 2 images {s} + 1 sentence ({L} tokens)": (args, {})}

    def public_train_size(self, data: dict) -> tuple:
        return 86_373, True, "NLVR2 train pairs (BLIP's nlvr_train.json)"

    def fingerprint(self) -> dict:
        fp = {"task": self.name, "profile": self.profile, "layout_version": LAYOUT_VERSION,
              "image_size": self.image_size, "augment": "pair_swap" + ("+rrc_flip" if self.profile == "paper" else "")}
        if self.profile == "micro":
            fp.update(generator="tasks.nlvr2.generate_micro", generator_version=GENERATOR_VERSION,
                      **self.micro_settings)
        else:
            fp["root"] = str(self.root.resolve())
        return fp
