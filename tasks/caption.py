"""COCO Caption, Karpathy split, with BLIP (task "caption_coco"), as BLIP / UPop train and evaluate it.

Layout (BLIP's annotation files, configs/caption_coco.yaml):

    <root>/annotation/coco_karpathy_train.json    [{"image", "caption", "image_id"}, ...]
    <root>/annotation/coco_karpathy_val.json      [{"image", "caption": [5 captions]}, ...]
    <root>/annotation/coco_karpathy_test.json     (as val)
    <root>/annotation/coco_karpathy_val_gt.json   COCO caption format {"annotations": [{"image_id", "caption",
    <root>/annotation/coco_karpathy_test_gt.json   "id"}], "images": [{"id"}]} (what pycocoevalcap scores against)
    <root>/images/<image>
  root = <data_root>/coco (the same folder as retrieval_coco).

Training: prompt "a picture of " + pre_caption(caption, max_words 30) (BLIP's coco_karpathy_train), LM
loss without the prompt tokens (model.caption_loss). Training images: retrieval_coco's transform (BLIP's
crop + flip on the paper profile, the recipe's crop_scale and randaugment: tasks.common.blip_augment).
Generation: beam search, 3 beams, max_length 20, min_length 5 (docs/specs/upop.md §7), the prompt given and
stripped. image_id of a result = the number at the end of the image file name (BLIP's
coco_karpathy_caption_eval). Metrics (pycocoevalcap, PTB tokenizer): Bleu_4, METEOR, ROUGE_L, CIDEr on
"test" ("val" for selection); SPICE only when Stanford CoreNLP's jars are in pycocoevalcap/spice/lib (it
cannot be downloaded here), otherwise reported missing with the reason, never 0.
"""
from __future__ import annotations

from pathlib import Path

import torch
from pydantic import Field
from torch import nn

from bench.api import TaskAdapter
from bench.errors import BenchError
from bench.measure import eval_mode
from bench.options import PositiveInt
from bench.registry import register_task
from tasks.retrieval import COCO_KARPATHY_TRAIN, CocoRetrievalTask, RetrievalData, check_fields, normalise, read_json

PROMPT = "a picture of "
# The text of the official FLOPs protocol (UPop's utils.print_params_and_flops, fvcore, batch of one image) and
# its bert-base-uncased token count ([CLS] and [SEP] included). The ids themselves do not change the count, only
# the length matters:
CAPTION_SENTENCE = "a picture of car driving down a road behind a lot of sheep"
CAPTION_TOKENS = 15


class CaptionData(RetrievalData):
    """A profile's `data:` block for caption_coco: retrieval_coco's keys (the same data) and the generation."""

    prompt: str = Field(PROMPT, description="text the captions start with in training and generation (BLIP)")
    num_beams: PositiveInt = Field(3, description="beams of the beam search")
    max_length: PositiveInt = Field(20, description="most tokens of a generated caption")
    min_length: PositiveInt = Field(5, description="fewest tokens of a generated caption")
    spice: bool = Field(True, description="score SPICE too when Stanford CoreNLP is there (else reported missing)")


def spice_status() -> str | None:
    """None when SPICE can run, else why not (Stanford CoreNLP jars missing, or no java)."""
    import shutil
    try:
        import pycocoevalcap
    except ImportError:
        return "pycocoevalcap is not installed"
    lib = Path(list(pycocoevalcap.__path__)[0]) / "spice" / "lib"   # a namespace package: no __file__
    if not list(lib.glob("stanford-corenlp-*.jar")):
        return (f"SPICE needs Stanford CoreNLP 3.6.0 (stanford-corenlp-3.6.0.jar and its models jar) in {lib}; "
                "pycocoevalcap downloads them on first use, which is impossible offline: copy them there")
    if shutil.which("java") is None:
        return "SPICE needs java on PATH"
    return None


def caption_metrics(gts: dict, res: dict, spice: bool = True) -> dict:
    """pycocoevalcap as COCOEvalCap: gts {image_id: [reference strings]}, res {image_id: [one string]}.
    Returns Bleu_1..4, METEOR, ROUGE_L, CIDEr (x100, as BLIP/UPop print them), SPICE or a `missing` entry."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    if set(gts) != set(res):
        raise BenchError(f"caption results cover {len(res)} images, the references {len(gts)}: they must match")
    tok = PTBTokenizer()
    g = tok.tokenize({k: [{"caption": c} for c in v] for k, v in gts.items()})
    r = tok.tokenize({k: [{"caption": c} for c in v] for k, v in res.items()})
    out: dict = {}
    bleu, _ = Bleu(4).compute_score(g, r, verbose=0)
    for i, b in enumerate(bleu):
        out[f"Bleu_{i + 1}"] = 100.0 * b
    for name, scorer in (("METEOR", Meteor()), ("ROUGE_L", Rouge()), ("CIDEr", Cider())):
        out[name] = 100.0 * float(scorer.compute_score(g, r)[0])
    why = spice_status() if spice else "SPICE not requested"
    if why is None:
        from pycocoevalcap.spice.spice import Spice
        out["SPICE"] = 100.0 * float(Spice().compute_score(g, r)[0])
    else:
        out["SPICE"] = None
        out.setdefault("missing", {})["SPICE"] = why
    return out


def image_id_of(path: str) -> int | str:
    """BLIP: int(img.split('_')[-1].strip('.jpg')); falls back to the file name for other names."""
    stem = Path(path).stem
    tail = stem.split("_")[-1]
    return int(tail) if tail.isdigit() else stem


@register_task("caption_coco")
class CaptionTask(CocoRetrievalTask):
    """Karpathy-split COCO captioning; shares the data folder and the micro generator of retrieval_coco."""

    name = "caption_coco"
    metrics = {"CIDEr": True, "Bleu_4": True, "METEOR": True, "ROUGE_L": True, "SPICE": True}
    Data = CaptionData
    # no ITC distillation (the LM loss; compress_caption.py train() passes no alpha): no distill_alpha_warmup
    RECIPE_KEYS = frozenset({"crop_scale", "randaugment"})
    on_train_step = TaskAdapter.on_train_step

    @property
    def root(self) -> Path:
        if self.profile == "paper":
            return Path(self.settings.root or self.data_root / "coco")
        from tasks.micro_data import micro_folder
        from tasks.retrieval import GENERATOR_VERSION
        return micro_folder(self.cache_dir, "caption_coco", {**self.micro, "generator": GENERATOR_VERSION,
                                                              "prefix": self.prefix})

    @property
    def prompt(self) -> str:
        return self.settings.prompt

    def prompt_len(self) -> int:
        """Tokens of the prompt incl. [CLS] (BLIP: len(tokenizer(prompt).input_ids) - 1, i.e. without [SEP])."""
        return int(self.tokenizer()([self.prompt], 64)["attention_mask"].sum()) - 1

    def references(self, split: str) -> dict:
        """{image_id: [captions]} from coco_karpathy_<split>_gt.json (COCO format)."""
        path = self.root / "annotation" / f"{self.prefix}_{split}_gt.json"
        gt = read_json(path, f"COCO-format ground truth of {split}", self.layout +
                       f"\n  <root>/annotation/{self.prefix}_{{val,test}}_gt.json (COCO caption format)")
        if not isinstance(gt, dict) or "annotations" not in gt:
            raise BenchError(f"{path}: expected COCO caption format {{'annotations': [...], 'images': [...]}}")
        check_fields(gt["annotations"], path, {"image_id": (int, str), "caption": str}, self.layout)
        refs: dict = {}
        for a in gt["annotations"]:
            refs.setdefault(a["image_id"], []).append(a["caption"])
        return refs

    def train_batches(self, batch_size: int, seed: int, recipe=None, shard=None):
        """(images, input_ids, attention_mask) of prompt + caption; the model masks the prompt's labels. Images:
        retrieval_coco's training transform (BLIP's crop + flip, the recipe's crop_scale / randaugment)."""
        for x, _ids, _mask, _idx in super().train_batches(batch_size, seed, recipe=recipe, shard=shard):
            yield x, _ids, _mask

    def prepare(self) -> None:
        if self._data is not None:      # once: prepare() runs again from every accessor
            return
        super().prepare()
        # prompt + caption, as BLIP's coco_karpathy_train
        self._data.train_pairs = [(img, self.prompt + cap, idx) for img, cap, idx in self._data.train_pairs]

    def loss(self, model: nn.Module, batch, device, recipe=None) -> torch.Tensor:
        x, ids, mask = (t.to(device) for t in batch)
        return model.caption_loss(x, ids, mask, self.prompt_len())

    @torch.no_grad()
    def generate(self, model, split: str, device, batch_size: int = 64) -> dict:
        self.prepare()
        d = self._data.evals[split]
        tok = self.tokenizer()
        enc = tok([self.prompt], 64)
        plen = int(enc["attention_mask"].sum()) - 1
        prompt_ids = enc["input_ids"][:, :plen].to(device)        # no [SEP]
        res = {}
        for i in range(0, len(d["images"]), batch_size):
            rels = d["images"][i:i + batch_size]
            x = normalise(self._store.batch(rels)).to(device)
            out = model.generate_captions(x, prompt_ids.expand(len(rels), -1),
                                          max_length=self.settings.max_length,
                                          min_length=self.settings.min_length,
                                          num_beams=self.settings.num_beams)
            for rel, ids in zip(rels, out):
                res[image_id_of(rel)] = [tok.decode(ids)]
        return res

    def evaluate(self, model: nn.Module, split: str = "test", device="cpu") -> dict:
        with eval_mode(model):
            res = self.generate(model, split, torch.device(device))
        refs = self.references(split)
        out = caption_metrics(refs, res, spice=self.settings.spice)
        out["n"] = len(res)
        out["examples"] = {str(k): v[0] for k, v in list(res.items())[:3]}
        return out

    def dummy_inputs(self, model_config: dict, batch_size: int, device) -> tuple:
        s = model_config.get("image_size", self.image_size)
        ids = torch.ones(batch_size, 15, dtype=torch.long, device=device)
        return (torch.randn(batch_size, 3, s, s, device=device), ids, torch.ones_like(ids))

    def flops_forwards(self, model_config: dict, device) -> dict:
        """Spec §5 (upop.md): the teacher-forced LM-loss forward on 1 image 384 + "a picture of car driving down
        a road behind a lot of sheep" (CAPTION_SENTENCE, CAPTION_TOKENS tokens), then the inference-only count.
        Image size from the model config."""
        from tasks.common.protocol_inputs import ids_of_length
        s = model_config["image_size"]
        ids, mask = ids_of_length(CAPTION_TOKENS, 1, model_config, device)
        return {f"paper: training-style forward (LM loss), 1 image {s} + 1 caption ({CAPTION_TOKENS} tokens)":
                ((torch.randn(1, 3, s, s, device=device), ids, mask), {"mode": "train"}),
                f"inference: encoder + one teacher-forced decoder pass, 1 image {s} + {CAPTION_TOKENS} tokens":
                ((torch.randn(1, 3, s, s, device=device), ids, mask), {"mode": "inference"})}

    def public_train_size(self, data: dict) -> tuple:
        """BLIP's coco_karpathy_train.json, the file retrieval_coco trains on (COCO_KARPATHY_TRAIN)."""
        return COCO_KARPATHY_TRAIN

    def fingerprint(self) -> dict:
        fp = super().fingerprint()
        fp.update(task=self.name, prompt=self.prompt)
        return fp
