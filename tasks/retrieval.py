"""Image-text retrieval on COCO (Karpathy 5K test) and Flickr30K (1K test), as BLIP / UPop evaluate it.

Tasks "retrieval_coco" and "retrieval_flickr". Generic over models with the VL contract API
(models/blip.py, models/clip.py): image_features, text_features, has_itm, itm_scores, retrieval_loss.

Layout (BLIP's annotation files, https://github.com/salesforce/BLIP configs/retrieval_*.yaml):

    <root>/annotation/coco_karpathy_train.json   [{"image": "val2014/COCO_val2014_000000391895.jpg",
                                                    "caption": "...", "image_id": "coco_391895"}, ...]
    <root>/annotation/coco_karpathy_val.json     [{"image": "...", "caption": ["5 captions", ...]}, ...]
    <root>/annotation/coco_karpathy_test.json    (same as val)
    <root>/images/<image>                        (the "image" paths above; image_root in BLIP's config)
  root = <data_root>/coco; Flickr30K: <data_root>/flickr30k with flickr30k_{train,val,test}.json and
  images under images/flickr30k-images/.

Evaluation (BLIP's `evaluation` + `itm_eval`, docs/specs/upop.md §8): all image and text embeddings, the cosine
similarity matrix; for BLIP (has_itm) each image's top-k texts and each text's top-k images are re-scored
with score = ITM match logit + ITC similarity (k = `k_test`: 256 COCO, 128 Flickr), every other entry -100;
CLIP uses the cosine matrix as is. Recall@1/5/10 in both directions: image->text ranks an image's best
ground-truth caption (any of its 5), text->image ranks the caption's image; r_mean = mean of the six.
Metrics (metrics.retrieval.recall_at_k): txt_r1 txt_r5 txt_r10 img_r1 img_r5 img_r10 r_mean (percent) on
"test"; "val" is there for selection.

Training batches: (images, input_ids, attention_mask, idx) with idx = the image's index (positives of ITC
across captions of the same image), loss = model.retrieval_loss. Text: BLIP's pre_caption (lower case,
punctuation stripped, max_words 30 for COCO/Flickr) then the tokenizer (tasks.common.tokenizers.TextTokenizer):
micro = tasks.vl_micro.MicroTokenizer, paper = BERT (BLIP; `tokenizer_path`, a local bert-base-uncased folder)
or open_clip's (CLIP; `tokenizer: open_clip`).
Images: resize to the model's size (bicubic) and normalise with the CLIP/BLIP mean/std; paper training adds
BLIP's RandomResizedCrop(0.5-1, bicubic) + flip (torchvision's crop, tasks.common.blip_augment); micro trains
without augmentation (a flip would falsify "left of" captions; data.augment switches the crop + flip). Recipe
keys: `crop_scale` (the crop's area range, default BLIP's min_scale 0.5) and `randaugment` (BLIP's
RandomAugment(n, m) after the flip, any profile), BLIP's transform_train; `distill_alpha_warmup` (first_epoch:
the ITC distillation alpha ramps from 0 over each phase's first epoch, as the official BLIP and CLIP retrieval
train(); `on_train_step` sets it on the model before every optimizer step).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from typing import Literal

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
from metrics.retrieval import recall_at_k
from tasks.common import files
from tasks.common.batching import generator, micro_batches
from tasks.common.blip_augment import TrainTransform
from tasks.common.tokenizers import TextTokenizer
from tasks.micro_data import MARKER, generate_atomically, micro_folder

MEAN = (0.48145466, 0.4578275, 0.40821073)     # BLIP and CLIP normalisation
STD = (0.26862954, 0.26130258, 0.27577711)
GENERATOR_VERSION = 1
# The text of the official FLOPs protocol (UPop's utils.print_params_and_flops, fvcore, batch of one image) and
# its bert-base-uncased token count. The ids themselves do not change the count, only the length matters:
RETRIEVAL_SENTENCE = "car driving down a road behind a lot of sheep"
RETRIEVAL_TOKENS = 35          # BLIP retrieval pads captions to max_length 35 in training

# public training-set sizes (`bench plan`): (samples per epoch as this task counts them, exact?, source)
COCO_KARPATHY_TRAIN = (566_747, True, "COCO Karpathy train captions (BLIP's coco_karpathy_train.json: one entry "
                                      "per caption, 113,287 images)")
FLICKR30K_TRAIN = (145_000, True, "Flickr30k train captions (29,000 images x 5, BLIP's flickr30k_train.json)")

# ----------------------------------------------------------------------------------------------------
# shared by the VL tasks (retrieval, caption, vqa)
# ----------------------------------------------------------------------------------------------------

def pre_caption(caption: str, max_words: int = 50) -> str:
    """BLIP's data/utils.pre_caption: lower case, strip punctuation, collapse spaces, cap the word count."""
    caption = re.sub(r"([.!\"()*#:;~])", " ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption).rstrip("\n").strip(" ")
    words = caption.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else caption


def pre_question(question: str, max_ques_words: int = 50) -> str:
    """BLIP's pre_question: lower case, strip ,.!?"\'; drop a trailing '?'... (BLIP removes the punctuation)."""
    question = re.sub(r"([.!\"()*#:;~])", "", question.lower()).rstrip(" ")
    words = question.split(" ")
    return " ".join(words[:max_ques_words]) if len(words) > max_ques_words else question


def read_json(path: Path, what: str, layout: str):
    """A BLIP annotation file, with clear errors for a missing file, bytes that are not UTF-8 or broken JSON
    (tasks.common.files.read_json: the file and the line are named)."""
    path = Path(path)
    if not path.is_file():
        raise MissingData(what, path, layout, "Download BLIP's annotation files (see the README) into that folder; "
                          "the micro profile generates its own.")
    return files.read_json(path, what, layout)


def check_fields(items, path, fields: dict, layout: str):
    """Every entry is a dict with the given fields of the given types (first offending entry named)."""
    if not isinstance(items, list):
        raise BenchError(f"{path}: expected a JSON list of entries, got {type(items).__name__}. Layout:\n{layout}")
    for i, it in enumerate(items):
        for f, typ in fields.items():
            if not isinstance(it, dict) or f not in it or not isinstance(it[f], typ):
                raise BenchError(f"{path}: entry {i} has no field {f!r} of type "
                                 f"{getattr(typ, '__name__', typ)} ({str(it)[:120]}). Layout:\n{layout}")


class ImageStore:
    """Decodes images from an image root on demand (resized to `size`, uint8 CHW); keeps them in memory
    when `cache` (the micro sets are small). A missing or unreadable image is a clear error."""

    def __init__(self, root: Path, size: int, cache: bool, layout: str):
        self.root, self.size, self.cache, self.layout = Path(root), int(size), cache, layout
        self._mem: dict = {}

    def load(self, rel: str, size: int | None = None) -> torch.Tensor:
        size = int(size or self.size)
        key = (rel, size)
        if key in self._mem:
            return self._mem[key]
        from PIL import Image, UnidentifiedImageError
        path = self.root / rel
        if not path.is_file():
            raise MissingData(f"image {rel!r} named in the annotation", path, self.layout,
                              "The image folder is incomplete (or image_root points elsewhere).")
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                if im.size != (size, size):
                    im = im.resize((size, size), Image.BICUBIC)
                t = torch.from_numpy(np.asarray(im, np.uint8).copy()).permute(2, 0, 1).contiguous()
        except (UnidentifiedImageError, OSError) as e:
            raise BenchError(f"image {path} cannot be decoded ({e}); the file is corrupt.")
        if self.cache:
            self._mem[key] = t
        return t

    def batch(self, rels, size: int | None = None) -> torch.Tensor:
        return torch.stack([self.load(r, size) for r in rels])

    def scan(self, rels, what: str, cache_dir: Path | None = None) -> None:
        """Check every named image once (tasks.common.files.scan_images: opens, not cut), before any training;
        remembered under `cache_dir` for the same files, sizes and times."""
        import hashlib
        rels = list(dict.fromkeys(rels))
        stamp = None
        if cache_dir is not None:
            tag = hashlib.sha256(f"{self.root.resolve()}|{what}".encode()).hexdigest()[:16]
            stamp = Path(cache_dir) / "scans" / f"images-{tag}.txt"
        files.scan_images([self.root / r for r in rels], what, stamp=stamp)


def normalise(x: torch.Tensor) -> torch.Tensor:
    x = x.float().div(255)
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


# ----------------------------------------------------------------------------------------------------
# micro generator (Karpathy-split layout)
# ----------------------------------------------------------------------------------------------------

def coco_image_name(i: int, split_dir: str = "val2014") -> str:
    return f"{split_dir}/COCO_{split_dir}_{i:012d}.jpg"


def generate_karpathy(root, prefix: str, n_train: int, n_val: int, n_test: int, size: int, seed: int,
                      captions_per_image: int = 5) -> Path:
    """Write synthetic scenes + 5 captions each in BLIP's Karpathy-split layout (prefix coco_karpathy or
    flickr30k), plus the COCO-format ground-truth files of val/test (coco_karpathy_{val,test}_gt.json, which
    BLIP's caption evaluation reads). Images are JPEG (quality 95)."""
    from tasks.vl_micro import caption, render_scene

    root = Path(root)
    (root / "annotation").mkdir(parents=True, exist_ok=True)
    flickr = prefix.startswith("flickr")
    next_id = [1]

    def make(split, n, split_id):
        train, evals, gt_imgs, gt_anns = [], [], [], []
        for j in range(n):
            rng = np.random.default_rng([seed, split_id, j])
            img, scene = render_scene(rng, size)
            caps = []
            for _ in range(20):                     # 5 distinct captions where the scene allows
                c = caption(scene, rng)
                if c not in caps:
                    caps.append(c)
                if len(caps) == captions_per_image:
                    break
            while len(caps) < captions_per_image:
                caps.append(caption(scene, rng))
            iid = next_id[0]
            next_id[0] += 1
            rel = f"flickr30k-images/{iid:010d}.jpg" if flickr else coco_image_name(iid)
            (root / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
            img.save(root / "images" / rel, quality=95)
            if split == "train":
                key = f"{iid:010d}.jpg" if flickr else f"coco_{iid}"
                train += [{"image": rel, "caption": c, "image_id": key} for c in caps]
            else:
                evals.append({"image": rel, "caption": caps})
                gt_imgs.append({"id": iid})
                gt_anns += [{"image_id": iid, "caption": c, "id": len(gt_anns) + k} for k, c in enumerate(caps)]
        return (train if split == "train" else evals), {"annotations": gt_anns, "images": gt_imgs}

    for split, n, sid in (("train", n_train, 0), ("val", n_val, 1), ("test", n_test, 2)):
        items, gt = make(split, n, sid)
        (root / "annotation" / f"{prefix}_{split}.json").write_text(json.dumps(items))
        if split != "train":
            (root / "annotation" / f"{prefix}_{split}_gt.json").write_text(json.dumps(gt))
    (root / MARKER).write_text(f"Micro {prefix}: synthetic scenes with 5 captions each, written by "
                               f"tasks.retrieval.generate_karpathy (generator {GENERATOR_VERSION}); BLIP's layout.\n"
                               "Not comparable with COCO / Flickr30K numbers.\n")
    return root


# ----------------------------------------------------------------------------------------------------
# the task
# ----------------------------------------------------------------------------------------------------

class _KarpathyData:
    """The train pairs and the val/test image+caption lists of a Karpathy-style split."""

    def __init__(self, ann_root: Path, prefix: str, layout: str, max_words: int):
        self.train = read_json(ann_root / f"{prefix}_train.json", f"{prefix} train annotation", layout)
        check_fields(self.train, ann_root / f"{prefix}_train.json", {"image": str, "caption": str}, layout)
        ids = {}
        for it in self.train:
            ids.setdefault(it.get("image_id", it["image"]), len(ids))
        self.train_pairs = [(it["image"], pre_caption(it["caption"], max_words), ids[it.get("image_id", it["image"])])
                            for it in self.train]
        self.evals = {}
        for split in ("val", "test"):
            path = ann_root / f"{prefix}_{split}.json"
            items = read_json(path, f"{prefix} {split} annotation", layout)
            check_fields(items, path, {"image": str, "caption": list}, layout)
            images, texts, txt2img, img2txt = [], [], [], []
            for i, it in enumerate(items):
                images.append(it["image"])
                img2txt.append([])
                for c in it["caption"]:
                    texts.append(pre_caption(c, max_words))
                    img2txt[i].append(len(texts) - 1)
                    txt2img.append(i)
            self.evals[split] = {"images": images, "texts": texts, "txt2img": txt2img, "img2txt": img2txt}


class RetrievalData(OptionsModel):
    """A profile's `data:` block for retrieval_coco / retrieval_flickr (caption_coco adds its own keys)."""

    image_size: PositiveInt | None = Field(None, description="side of the square images (null: 32 micro, 384 paper)")
    root: str | None = Field(None, description="paper: the data folder (null: <data_root>/coco or <data_root>/flickr30k)")
    tokenizer: Literal["micro", "bert", "open_clip"] | None = Field(
        None, description="text tokenizer: BLIP's BERT, CLIP's open_clip (null: micro micro, bert paper)")
    tokenizer_path: str | None = Field(None, description="bert: local bert-base-uncased folder")
    context_length: PositiveInt = Field(77, description="open_clip: tokens per text")
    max_words: PositiveInt = Field(30, description="words a caption keeps (BLIP's pre_caption)")
    max_len: PositiveInt = Field(35, description="bert / micro: tokens per text")
    k_test: PositiveInt | None = Field(None, description="candidates re-ranked by ITM per query (null: 256 COCO, 128 Flickr)")
    augment: bool | None = Field(None, description="BLIP's RandomResizedCrop + flip in training (null: paper yes, micro no)")
    flops_text_len: PositiveInt = Field(35, description="BLIP: caption tokens of the FLOPs / throughput input")
    n_train: PositiveInt = Field(400, description="micro: training images the generator writes")
    n_val: PositiveInt = Field(50, description="micro: val images")
    n_test: PositiveInt = Field(100, description="micro: test images")
    seed: NonNegInt = Field(2024, description="micro: generator seed")


class RetrievalTask(TaskAdapter):
    VERSION = 2   # 2: one generator per micro-batch for its augmentation (tasks.common.batching; micro unchanged)
    prefix = "coco_karpathy"
    folder = "coco"
    default_k = 256
    metrics = {"txt_r1": True, "txt_r5": True, "txt_r10": True, "img_r1": True, "img_r5": True,
               "img_r10": True, "r_mean": True}
    Data = RetrievalData
    MICRO_KEYS = ("n_train", "n_val", "n_test", "image_size", "seed")   # the micro generator's settings
    # BLIP's transform_train (tasks.common.blip_augment) and the ITC alpha ramp (on_train_step)
    RECIPE_KEYS = frozenset({"crop_scale", "randaugment", "distill_alpha_warmup"})

    def __init__(self, settings, data_root, profile, cache_dir):
        super().__init__(settings, data_root, profile, cache_dir)
        self.layout = self._layout()
        self._data = None
        self._store = None

    def _layout(self):
        return (f"  <root>/annotation/{self.prefix}_train.json  [{{\"image\", \"caption\", \"image_id\"}}, ...]\n"
                f"  <root>/annotation/{self.prefix}_val.json    [{{\"image\", \"caption\": [5 captions]}}, ...]\n"
                f"  <root>/annotation/{self.prefix}_test.json   (as val)\n"
                f"  <root>/images/<image path of the annotation>\n"
                f"  (root = <data_root>/{self.folder}; BLIP's annotation files)")

    # ----------------------------------------------------------------- settings
    @property
    def micro(self) -> dict:
        return {**{k: getattr(self.settings, k) for k in self.MICRO_KEYS}, "image_size": self.image_size}

    @property
    def image_size(self) -> int:
        v = self.settings.image_size
        return v if v is not None else (32 if self.profile == "micro" else 384)

    @property
    def max_words(self) -> int:
        return self.settings.max_words

    @property
    def max_len(self) -> int:
        return self.settings.max_len

    @property
    def k_test(self) -> int:
        return self.settings.k_test if self.settings.k_test is not None else self.default_k

    @property
    def tokenizer_kind(self) -> str:
        return self.settings.tokenizer or ("micro" if self.profile == "micro" else "bert")

    @property
    def root(self) -> Path:
        if self.profile == "paper":
            return Path(self.settings.root or self.data_root / self.folder)
        return micro_folder(self.cache_dir, f"{self.name}", {**self.micro, "generator": GENERATOR_VERSION,
                                                             "prefix": self.prefix})

    def tokenizer(self) -> TextTokenizer:
        if not hasattr(self, "_tok"):
            self._tok = TextTokenizer(self.tokenizer_kind, self.settings.tokenizer_path, self.settings.context_length)
        return self._tok

    def check_model(self, model) -> None:
        """Paper: the tokenizer's ids must fit the model's text embedding (BenchError naming both sizes)."""
        if self.profile == "paper":
            self.tokenizer().check_model(model)

    # ----------------------------------------------------------------- data
    def prepare(self) -> None:
        if self._data is not None:
            return
        if self.profile == "micro":
            s = self.micro
            generate_atomically(self.root, lambda tmp: generate_karpathy(
                tmp, self.prefix, s["n_train"], s["n_val"], s["n_test"], s["image_size"], s["seed"]))
        self._data = _KarpathyData(self.root / "annotation", self.prefix, self.layout, self.max_words)
        self._store = ImageStore(self.root / "images", self.image_size, self.profile == "micro", self.layout)
        if self.profile == "paper":      # real data: a cut or unreadable image fails here, naming itself
            d = self._data
            self._store.scan([p[0] for p in d.train_pairs] + [i for e in d.evals.values() for i in e["images"]],
                             f"the {self.name} images", self.cache_dir)

    def steps_per_epoch(self, batch_size: int) -> int:
        self.prepare()
        return max(1, len(self._data.train_pairs) // int(batch_size))

    def train_batches(self, batch_size: int, seed: int, recipe=None, shard=None):
        """(images, ids, mask, image ids) of `tasks.common.batching.micro_batches` (drop_last, as BLIP's
        loader); with `shard`, only this rank's micro-batches are loaded and augmented."""
        self.prepare()
        pairs = self._data.train_pairs
        tok = self.tokenizer()
        augment = self.settings.augment if self.settings.augment is not None else self.profile == "paper"
        transform = TrainTransform.for_recipe(recipe, crop=augment, task=self.name)
        for idx, bseed in micro_batches(len(pairs), batch_size, seed, shard):
            chunk = [pairs[j] for j in idx.tolist()]
            x = self._store.batch([c[0] for c in chunk])
            x = transform(x, generator(bseed))       # crop + flip (augment), RandomAugment (randaugment)
            enc = tok([c[1] for c in chunk], self.max_len)
            yield normalise(x), enc["input_ids"], enc["attention_mask"], torch.tensor([c[2] for c in chunk])

    def loss(self, model: nn.Module, batch, device, recipe=None) -> torch.Tensor:
        x, ids, mask, idx = (t.to(device) for t in batch)
        return model.retrieval_loss(x, ids, mask, idx)

    def on_train_step(self, model: nn.Module, step: int, steps_per_epoch: int, recipe=None) -> None:
        """The ITC distillation alpha of this step (recipe `distill_alpha_warmup`). first_epoch: alpha x min(1,
        step / steps_per_epoch), the official train() of BLIP and CLIP retrieval, search and retrain alike
        (sdc17/UPop compress_retrieval.py l. 88-91, compress_retrieval_flickr.py l. 88-91, compress_retrieval_clip.py
        l. 103-106: `if epoch>0: alpha = config['alpha'] else: alpha = config['alpha']*min(1,i/len(data_loader))`,
        i the batch index of the epoch and len(data_loader) its batches, one optimizer step each); none: alpha."""
        warmup = getattr(recipe, "distill_alpha_warmup", "none") if recipe is not None else "none"
        scale = min(1.0, step / max(1, int(steps_per_epoch))) if warmup == "first_epoch" else 1.0
        set_scale = getattr(model, "set_distill_alpha_scale", None)
        if set_scale is None:
            if warmup != "none":
                raise BenchError(f"{self.name}: distill_alpha_warmup {warmup} needs a retrieval model with an ITC "
                                 f"distillation alpha (set_distill_alpha_scale); {type(model).__name__} has none")
            return
        set_scale(scale)     # every step, so a phase without the ramp trains at the full alpha again

    # ----------------------------------------------------------------- evaluation
    @torch.no_grad()
    def similarity(self, model, split: str, device, batch_size: int = 128):
        """(scores_i2t, scores_t2i, split data): cosine matrix, re-ranked with ITM for models that have it."""
        self.prepare()
        if split not in self._data.evals:
            raise BenchError(f"{self.name} has evaluation splits 'val' and 'test', not {split!r}")
        d = self._data.evals[split]
        tok = self.tokenizer()
        t_emb, t_ids, t_mask = [], [], []
        for i in range(0, len(d["texts"]), batch_size):
            enc = tok(d["texts"][i:i + batch_size], self.max_len)
            ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
            t_emb.append(model.text_features(ids, mask)["embed"].float().cpu())
            t_ids += list(enc["input_ids"])
            t_mask += list(enc["attention_mask"])
        i_emb, i_tok = [], []
        for i in range(0, len(d["images"]), batch_size):
            out = model.image_features(normalise(self._store.batch(d["images"][i:i + batch_size])).to(device))
            i_emb.append(out["embed"].float().cpu())
            if getattr(model, "has_itm", False):
                i_tok.append(out["tokens"])
        sims = torch.cat(i_emb) @ torch.cat(t_emb).t()
        if not getattr(model, "has_itm", False):
            return sims.numpy(), sims.t().numpy(), d
        img_tokens = torch.cat(i_tok)
        L = max(len(x) for x in t_ids)
        ids_all = torch.stack([F.pad(x, (0, L - len(x))) for x in t_ids]).to(device)
        mask_all = torch.stack([F.pad(x, (0, L - len(x))) for x in t_mask]).to(device)
        k = min(self.k_test, sims.shape[1])
        i2t = torch.full_like(sims, -100.0)
        for i in range(sims.shape[0]):   # each image: its top-k texts re-scored by ITM
            top_sim, top_idx = sims[i].topk(k)
            tok_i = img_tokens[i:i + 1].expand(k, -1, -1)
            score = model.itm_scores(tok_i, ids_all[top_idx.to(device)], mask_all[top_idx.to(device)]).float().cpu()
            i2t[i, top_idx] = score + top_sim
        simt = sims.t()
        k = min(self.k_test, simt.shape[1])
        t2i = torch.full_like(simt, -100.0)
        for t in range(simt.shape[0]):   # each text: its top-k images
            top_sim, top_idx = simt[t].topk(k)
            score = model.itm_scores(img_tokens[top_idx.to(img_tokens.device)], ids_all[t:t + 1].expand(k, -1),
                                     mask_all[t:t + 1].expand(k, -1)).float().cpu()
            t2i[t, top_idx] = score + top_sim
        return i2t.numpy(), t2i.numpy(), d

    def evaluate(self, model: nn.Module, split: str = "test", device="cpu") -> dict:
        with eval_mode(model):
            i2t, t2i, d = self.similarity(model, split, torch.device(device))
        out = recall_at_k(i2t, t2i, d["txt2img"], d["img2txt"])
        out.update(n_images=len(d["images"]), n_texts=len(d["texts"]))
        return out

    # ----------------------------------------------------------------- FLOPs / throughput
    def _is_clip(self, cfg) -> bool:
        return "text_cfg" in cfg

    def _text_len(self, cfg) -> int:
        return int(cfg["text_cfg"]["context_length"]) if self._is_clip(cfg) else self.settings.flops_text_len

    def dummy_inputs(self, model_config: dict, batch_size: int, device) -> tuple:
        """Inference forward: B images and B captions (CLIP: the full context; BLIP: 35 tokens)."""
        size = model_config.get("img_size") or model_config.get("image_size") or self.image_size
        L = self._text_len(model_config)
        ids = torch.ones(batch_size, L, dtype=torch.long, device=device)
        return (torch.randn(batch_size, 3, size, size, device=device), ids, torch.ones_like(ids))

    def flops_forwards(self, model_config: dict, device) -> dict:
        """Spec §5: the paper measured the full training forward (ITC with the momentum encoders; BLIP adds
        the ITM passes) on 1 image + 1 caption; then the inference forward (image + text embedding) alone.
        BLIP: 1 image of the config's image_size + 1 caption of RETRIEVAL_TOKENS tokens (UPop's protocol).
        `bench plan` uses the first entry as the training forward of one sample: it includes the momentum
        encoders, which run forward only, so its 3x training convention overcounts their share (about 1/3 of it)."""
        if not self._is_clip(model_config):
            return self._blip_flops_forwards(model_config, device)
        x, ids, mask = self.dummy_inputs(model_config, 1, device)
        idx = torch.zeros(1, dtype=torch.long, device=device)
        size, L = x.shape[-1], ids.shape[1]
        return {f"paper: training-style forward incl. momentum encoder, 1 image {size} + 1 caption ({L} tokens)":
                ((x, ids, mask), {"idx": idx, "mode": "train"}),
                f"inference: image + text embeddings, 1 image {size} + 1 caption ({L} tokens)":
                ((x, ids, mask), {"mode": "inference"})}

    @staticmethod
    def _blip_flops_forwards(model_config: dict, device) -> dict:
        from tasks.common.protocol_inputs import ids_of_length
        s = model_config["image_size"]
        ids, mask = ids_of_length(RETRIEVAL_TOKENS, 1, model_config, device)
        return {f"paper: training forward incl. momentum encoders and ITM pos + 2 negatives, 1 image {s} + "
                f"1 caption ({RETRIEVAL_TOKENS} tokens)":
                ((torch.randn(1, 3, s, s, device=device), ids, mask),
                 {"idx": torch.zeros(1, dtype=torch.long, device=device), "mode": "train"}),
                f"inference: image + text features + 1 ITM pass, 1 image {s} + 1 caption ({RETRIEVAL_TOKENS} tokens)":
                ((torch.randn(1, 3, s, s, device=device), ids, mask), {"mode": "inference"})}

    def fingerprint(self) -> dict:
        fp = {"task": self.name, "profile": self.profile, "image_size": self.image_size, "max_words": self.max_words,
              "max_len": self.max_len, "tokenizer": self.tokenizer_kind}
        if self.profile == "micro":
            fp.update(generator="tasks.retrieval.generate_karpathy", generator_version=GENERATOR_VERSION, **self.micro)
        else:
            fp["root"] = str(self.root.resolve())
        return fp


@register_task("retrieval_coco")
class CocoRetrievalTask(RetrievalTask):
    """COCO Karpathy 5K test retrieval (BLIP k_test 256)."""
    name = "retrieval_coco"
    prefix = "coco_karpathy"
    folder = "coco"
    default_k = 256

    def public_train_size(self, data: dict) -> tuple:
        return COCO_KARPATHY_TRAIN


@register_task("retrieval_flickr")
class FlickrRetrievalTask(RetrievalTask):
    """Flickr30K 1K test retrieval (BLIP k_test 128)."""
    name = "retrieval_flickr"
    prefix = "flickr30k"
    folder = "flickr30k"
    default_k = 128

    def public_train_size(self, data: dict) -> tuple:
        return FLICKR30K_TRAIN

