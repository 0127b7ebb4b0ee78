"""VQAv2 with BLIP (task "vqa"), as BLIP / UPop train and evaluate it.

Layout (BLIP's annotation files, configs/vqa.yaml):

    <root>/annotation/vqa_train.json   [{"question_id", "question", "answer": [answers], "image", "dataset": "vqa"}]
    <root>/annotation/vqa_val.json     (same; BLIP trains on it too, the micro profile evaluates on it)
    <root>/annotation/vg_qa.json       (Visual Genome QA, "dataset": "vg"; optional, train_files)
    <root>/annotation/vqa_test.json    [{"question_id", "question", "image"}] (test-dev/test-std, no answers)
    <root>/annotation/answer_list.json ["answer", ...]  (the candidate list of rank inference)
    <root>/images/<image>              (COCO images, "image" paths; vg images under images/ as well)
  root = <data_root>/vqa.

Training (BLIP's vqa_dataset + vqa_collate_fn): a VQA question's answers are weighted by their frequency
(each occurrence adds 1/len(answers)); a VG question has its one answer with weight 0.2. The model's
vqa_loss repeats each question n[i] times for its answers (weighted LM loss of the answer decoder).
Training images (BLIP's vqa_dataset with transform_train): the paper profile crops (RandomResizedCrop 0.5-1,
bicubic) and flips every image (torchvision's crop, tasks.common.blip_augment); the recipe keys `crop_scale` (the
crop's area range, default BLIP's min_scale 0.5) and `randaugment` (BLIP's RandomAugment(n, m) after the flip,
any profile) complete BLIP's transform_train; the micro profile does not crop or flip.
Evaluation (BLIP's rank inference, k_test 128): model.rank_answers over the tokenised answer list.
- a split with answers (micro: "val"): VQA accuracy with the official VQA evaluation (vqaEval.py):
  punctuation and digit/article/contraction normalisation, acc = mean over the 10 leave-one-out subsets of
  min(#matching humans / 3, 1), averaged over questions (percent).
- the official test splits have no answers: the result file [{"question_id", "answer"}] is written in the
  EvalAI format (`result_dir` setting, default <cache>/vqa_results/) and `vqa_acc` is reported missing
  (None) with the reason; the score comes from the evaluation server.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from typing import Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from bench.api import TaskAdapter
from bench.errors import BenchError
from bench.measure import eval_mode
from bench.options import NonNegInt, OptionsModel, PositiveInt
from bench.registry import register_task
from tasks.common.batching import generator, micro_batches
from tasks.common.blip_augment import TrainTransform
from tasks.micro_data import MARKER, generate_atomically, micro_folder
from tasks.retrieval import ImageStore, TextTokenizer, check_fields, coco_image_name, normalise, pre_question, read_json

GENERATOR_VERSION = 1

# The FLOPs protocol of the paper (UPop's utils.print_params_and_flops, fvcore): 32 VQAv2 questions padded to the
# longest ("are the names on the scoreboard the names of people?": 14 bert-base-uncased tokens, [CLS] and [SEP]
# included) and 47 answers padded to the longest ("newport beach sacramento": 5 tokens), n = [1], 1 image 480.
# The ids themselves do not change the count, only the lengths matter.
VQA_QUESTIONS, VQA_ANSWERS = 32, 47
VQA_QUESTION_TOKENS = 14
VQA_ANSWER_TOKENS = 5

# The public training files (`bench plan`): BLIP's annotation files, one entry per question
VQA_FILES = {
    "vqa_train": (443_757, True, "VQAv2 train questions"),
    "vqa_val": (214_354, True, "VQAv2 val questions"),
    "vg_qa": (1_700_000, False, "Visual Genome QA: its published ~1.7 M QA pairs; BLIP's vg_qa.json keeps only "
                                "questions with an answer in its list, so this is an upper bound"),
}

# ----------------------------------------------------------------------------------------------------
# the official VQA answer normalisation (VQA/PythonEvaluationTools/vqaEvaluation/vqaEval.py)
# ----------------------------------------------------------------------------------------------------

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've"}
MANUAL_MAP = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
              "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]


def process_punctuation(text: str) -> str:
    out = text
    for p in PUNCT:
        if (p + " " in text or " " + p in text) or re.search(COMMA_STRIP, text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD_STRIP.sub("", out, re.UNICODE)


def process_digit_article(text: str) -> str:
    words = []
    for w in text.lower().split():
        w = MANUAL_MAP.get(w, w)
        if w not in ARTICLES:
            words.append(w)
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalise_answer(ans: str) -> str:
    """Whitespace clean-up, punctuation, then digits/articles/contractions (vqaEval's processing)."""
    ans = ans.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(ans))


def vqa_accuracy_one(pred: str, gt_answers: list, always_normalise: bool = False) -> float:
    """One question, as vqaEval.evaluate: the answers are normalised when the human answers disagree
    (the official script only processes them then; `always_normalise` processes every question);
    acc = mean over each human answer left out of min(1, #other humans that gave the prediction / 3)."""
    pred = pred.replace("\n", " ").replace("\t", " ").strip()
    gts = [a.replace("\n", " ").replace("\t", " ").strip() for a in gt_answers]
    if always_normalise or len(set(gts)) > 1:
        gts = [normalise_answer(a) for a in gts]
        pred = normalise_answer(pred)
    accs = []
    for i in range(len(gts)):
        others = gts[:i] + gts[i + 1:]
        accs.append(min(1.0, sum(a == pred for a in others) / 3.0))
    return sum(accs) / len(accs) if accs else 0.0


def vqa_accuracy(preds: dict, gts: dict, always_normalise: bool = False) -> float:
    """Percent accuracy over the questions of `gts` ({qid: [10 answers]}); preds {qid: answer}."""
    missing = [q for q in gts if q not in preds]
    if missing:
        raise BenchError(f"no prediction for {len(missing)} questions (e.g. {missing[:3]})")
    return 100.0 * float(np.mean([vqa_accuracy_one(preds[q], gts[q], always_normalise) for q in gts]))


def answer_weights(answers: list, dataset: str = "vqa") -> tuple[list, list]:
    """BLIP's vqa_dataset: VQA answers weighted by frequency (1/len per occurrence); VG: one answer, 0.2."""
    if dataset == "vg":
        return [answers[0] if isinstance(answers, list) else answers], [0.2]
    w: dict = {}
    for a in answers:
        w[a] = w.get(a, 0.0) + 1.0 / len(answers)
    return list(w), list(w.values())


# ----------------------------------------------------------------------------------------------------
# micro generator
# ----------------------------------------------------------------------------------------------------

def generate_micro(root, n_train: int, n_val: int, n_test: int, q_per_image: int, size: int, seed: int,
                   noise: float = 0.1) -> Path:
    """Synthetic scenes, q_per_image questions each, 10 "human" answers per question (each replaced by a
    random candidate with probability `noise`, so the leave-one-out accuracy is exercised)."""
    from tasks.vl_micro import render_scene, vqa_answer_list, vqa_question

    root = Path(root)
    (root / "annotation").mkdir(parents=True, exist_ok=True)
    cands = vqa_answer_list()
    qid = 0
    for split, n, sid in (("train", n_train, 0), ("val", n_val, 1), ("test", n_test, 2)):
        items = []
        for j in range(n):
            rng = np.random.default_rng([seed, sid, j])
            img, scene = render_scene(rng, size)
            iid = sid * 100000 + j + 1
            rel = coco_image_name(iid, "train2014" if split == "train" else "val2014")
            (root / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
            img.save(root / "images" / rel, quality=95)
            seen = set()
            for _ in range(q_per_image):
                q, a = vqa_question(scene, rng)
                if q in seen:
                    continue
                seen.add(q)
                qid += 1
                it = {"question_id": qid, "question": q, "image": rel, "dataset": "vqa"}
                if split != "test":
                    it["answer"] = [cands[int(rng.integers(len(cands)))] if rng.random() < noise else a
                                    for _ in range(10)]
                items.append(it)
        (root / "annotation" / f"vqa_{split}.json").write_text(json.dumps(items))
    (root / "annotation" / "answer_list.json").write_text(json.dumps(cands))
    (root / MARKER).write_text(f"Micro VQA: synthetic scenes and grammar questions in BLIP's VQA layout "
                               f"(tasks.vqa.generate_micro, generator {GENERATOR_VERSION}). Not comparable with VQAv2.\n")
    return root


# ----------------------------------------------------------------------------------------------------
# the task
# ----------------------------------------------------------------------------------------------------

LAYOUT = """\
  <root>/annotation/vqa_train.json, vqa_val.json, vg_qa.json  [{"question_id", "question", "answer": [...],
                                                               "image", "dataset"}, ...]
  <root>/annotation/vqa_test.json    [{"question_id", "question", "image"}, ...]
  <root>/annotation/answer_list.json ["answer", ...]
  <root>/images/<image path of the annotation>
  (root = <data_root>/vqa; BLIP's annotation files)"""


class VqaData(OptionsModel):
    """A profile's `data:` block for vqa."""

    image_size: PositiveInt | None = Field(None, description="side of the square images (null: 32 micro, 480 paper)")
    train_files: list[str] | None = Field(None, min_length=1, description="annotation files (without .json) trained on "
                                                                          "(null: vqa_train micro; vqa_train, vqa_val, vg_qa paper)")
    root: str | None = Field(None, description="paper: the data folder (null: <data_root>/vqa)")
    tokenizer: Literal["micro", "bert", "open_clip"] | None = Field(None, description="text tokenizer (null: micro "
                                                                                      "micro, bert paper)")
    tokenizer_path: str | None = Field(None, description="bert: local bert-base-uncased folder")
    k_test: PositiveInt = Field(128, description="answer candidates re-ranked per question (BLIP's k_test)")
    always_normalise: bool = Field(False, description="normalise the answers of every question (the official "
                                                                  "script: only where the human answers disagree)")
    result_dir: str | None = Field(None, description="where results of a split without answers are written for the "
                                                     "evaluation server (null: <cache>/vqa_results)")
    n_train: PositiveInt = Field(500, description="micro: training images the generator writes")
    n_val: PositiveInt = Field(60, description="micro: val images")
    n_test: PositiveInt = Field(20, description="micro: test images")
    q_per_image: PositiveInt = Field(4, description="micro: questions per image")
    seed: NonNegInt = Field(77, description="micro: generator seed")


@register_task("vqa")
class VqaTask(TaskAdapter):
    name = "vqa"
    VERSION = 2   # 2: one generator per micro-batch for its augmentation (tasks.common.batching)
    metrics = {"vqa_acc": True}
    layout = LAYOUT
    Data = VqaData
    MICRO_KEYS = ("n_train", "n_val", "n_test", "q_per_image", "image_size", "seed")   # generator settings
    RECIPE_KEYS = frozenset({"crop_scale", "randaugment"})   # BLIP's transform_train (tasks.common.blip_augment)

    def __init__(self, settings, data_root, profile, cache_dir):
        super().__init__(settings, data_root, profile, cache_dir)
        self._ann = None

    @property
    def micro(self) -> dict:
        return {**{k: getattr(self.settings, k) for k in self.MICRO_KEYS}, "image_size": self.image_size}

    @property
    def image_size(self) -> int:
        v = self.settings.image_size
        return v if v is not None else (32 if self.profile == "micro" else 480)

    @property
    def train_files(self) -> list:
        v = self.settings.train_files
        return list(v if v is not None else ["vqa_train"] if self.profile == "micro"
                    else ["vqa_train", "vqa_val", "vg_qa"])

    @property
    def root(self) -> Path:
        if self.profile == "paper":
            return Path(self.settings.root or self.data_root / "vqa")
        return micro_folder(self.cache_dir, "vqa", {**self.micro, "generator": GENERATOR_VERSION})

    def tokenizer(self) -> TextTokenizer:
        if not hasattr(self, "_tok"):
            kind = self.settings.tokenizer or ("micro" if self.profile == "micro" else "bert")
            self._tok = TextTokenizer(kind, self.settings.tokenizer_path)
        return self._tok

    def check_model(self, model) -> None:
        """Paper: the tokenizer's ids must fit the model's text embedding (BenchError naming both sizes)."""
        if self.profile == "paper":
            self.tokenizer().check_model(model)

    def prepare(self) -> None:
        if self._ann is not None:
            return
        if self.profile == "micro":
            s = self.micro
            generate_atomically(self.root, lambda tmp: generate_micro(
                tmp, s["n_train"], s["n_val"], s["n_test"], s["q_per_image"], s["image_size"], s["seed"]))
        ann = self.root / "annotation"
        self._ann = {}
        self.train_items = []
        for f in self.train_files:
            items = read_json(ann / f"{f}.json", f"VQA annotation {f}", self.layout)
            check_fields(items, ann / f"{f}.json", {"question": str, "answer": (list, str), "image": str}, self.layout)
            self.train_items += items
        self.answer_list = read_json(ann / "answer_list.json", "VQA answer list", self.layout)
        if not (isinstance(self.answer_list, list) and all(isinstance(a, str) for a in self.answer_list)):
            raise BenchError(f"{ann / 'answer_list.json'} must be a JSON list of answer strings")
        self._store = ImageStore(self.root / "images", self.image_size, self.profile == "micro", self.layout)
        if self.profile == "paper":      # real data: malformed eval annotations and cut images fail here
            names = {"val": "vqa_val", "test": "vqa_test"}
            evals = [self.split_items(k) for k, n in names.items() if (ann / f"{n}.json").is_file()]
            self._store.scan([it["image"] for items in [self.train_items, *evals] for it in items],
                             "the VQA images", self.cache_dir)

    def split_items(self, split: str) -> list:
        self.prepare()
        names = {"val": "vqa_val", "test": "vqa_test", "train": "vqa_train"}
        if split not in names:
            raise BenchError(f"vqa has splits 'train', 'val' and 'test', not {split!r}")
        if split not in self._ann:
            path = self.root / "annotation" / f"{names[split]}.json"
            items = read_json(path, f"VQA annotation {names[split]}", self.layout)
            check_fields(items, path, {"question_id": (int, str), "question": str, "image": str}, self.layout)
            self._ann[split] = items
        return self._ann[split]

    def steps_per_epoch(self, batch_size: int) -> int:
        self.prepare()
        return max(1, len(self.train_items) // int(batch_size))

    def train_batches(self, batch_size: int, seed: int, recipe=None, shard=None):
        """(images, q_ids, q_mask, a_ids, a_mask, weights, n) as BLIP's vqa_collate_fn, of
        `tasks.common.batching.micro_batches` (with `shard`: only this rank's, loaded and augmented)."""
        self.prepare()
        items = self.train_items
        tok = self.tokenizer()
        transform = TrainTransform.for_recipe(recipe, crop=self.profile == "paper", task=self.name)
        for idx, bseed in micro_batches(len(items), batch_size, seed, shard):
            chunk = [items[j] for j in idx.tolist()]
            answers, weights, n = [], [], []
            for it in chunk:
                a, w = answer_weights(it["answer"] if isinstance(it["answer"], list) else [it["answer"]],
                                      it.get("dataset", "vqa"))
                answers += a
                weights += w
                n.append(len(a))
            q = tok([pre_question(it["question"]) for it in chunk], 35)
            a = tok(answers, 10)
            x = transform(self._store.batch([it["image"] for it in chunk]), generator(bseed))   # paper: crop + flip
            yield (normalise(x), q["input_ids"],
                   q["attention_mask"], a["input_ids"], a["attention_mask"], torch.tensor(weights), torch.tensor(n))

    def loss(self, model: nn.Module, batch, device, recipe=None) -> torch.Tensor:
        x, qi, qm, ai, am, w, n = batch
        return model.vqa_loss(x.to(device), qi.to(device), qm.to(device), ai.to(device), am.to(device),
                              w.to(device), n.tolist())

    @torch.no_grad()
    def predict(self, model, split: str, device, batch_size: int = 64) -> dict:
        """{question_id: answer} by BLIP's rank inference over the answer list (k_test)."""
        items = self.split_items(split)
        tok = self.tokenizer()
        cand = tok(self.answer_list, 10)
        a_ids, a_mask = cand["input_ids"].to(device), cand["attention_mask"].to(device)
        k = min(self.settings.k_test, len(self.answer_list))
        preds = {}
        for i in range(0, len(items), batch_size):
            chunk = items[i:i + batch_size]
            q = tok([pre_question(it["question"]) for it in chunk], 35)
            x = normalise(self._store.batch([it["image"] for it in chunk])).to(device)
            idx = model.rank_answers(x, q["input_ids"].to(device), q["attention_mask"].to(device), a_ids, a_mask, k)
            for it, j in zip(chunk, idx.tolist()):
                preds[it["question_id"]] = self.answer_list[j]
        return preds

    def evaluate(self, model: nn.Module, split: str = "val", device="cpu") -> dict:
        with eval_mode(model):
            preds = self.predict(model, split, torch.device(device))
        items = self.split_items(split)
        result = [{"question_id": q, "answer": a} for q, a in preds.items()]
        out = {"n": len(items)}
        if all("answer" in it for it in items):
            gts = {it["question_id"]: it["answer"] if isinstance(it["answer"], list) else [it["answer"]]
                   for it in items}
            out["vqa_acc"] = vqa_accuracy(preds, gts, self.settings.always_normalise)
        else:
            rdir = Path(self.settings.result_dir or self.cache_dir / "vqa_results")
            rdir.mkdir(parents=True, exist_ok=True)
            path = rdir / f"vqa_result_{split}.json"
            path.write_text(json.dumps(result))
            out["vqa_acc"] = None
            out["missing"] = {"vqa_acc": f"{split} has no answers: submit {path} to the VQAv2 evaluation server "
                                         "(EvalAI); the score comes from there"}
            out["result_file"] = str(path)
        out["answer_counts"] = dict(Counter(preds.values()).most_common(5))
        return out

    def dummy_inputs(self, model_config: dict, batch_size: int, device) -> tuple:
        """Inference forward: B images, B questions (14 tokens), B answers (5 tokens) teacher-forced."""
        s = model_config.get("image_size", self.image_size)
        q = torch.ones(batch_size, 14, dtype=torch.long, device=device)
        a = torch.ones(batch_size, 5, dtype=torch.long, device=device)
        return (torch.randn(batch_size, 3, s, s, device=device), q, torch.ones_like(q), a, torch.ones_like(a))

    def flops_forwards(self, model_config: dict, device) -> dict:
        """Spec §5 (upop.md): the training forward on 1 image 480, 32 questions and 47 answers, n=[1]
        (VQA_QUESTIONS x VQA_QUESTION_TOKENS, VQA_ANSWERS x VQA_ANSWER_TOKENS), then an inference-only count.
        Image size from the model config."""
        from tasks.common.protocol_inputs import ids_of_length
        s = model_config["image_size"]
        q, qm = ids_of_length(VQA_QUESTION_TOKENS, VQA_QUESTIONS, model_config, device)
        a, am = ids_of_length(VQA_ANSWER_TOKENS, VQA_ANSWERS, model_config, device)
        w = torch.ones(VQA_ANSWERS, device=device)
        q1, qm1 = ids_of_length(VQA_QUESTION_TOKENS, 1, model_config, device)
        a1, am1 = ids_of_length(VQA_ANSWER_TOKENS, 1, model_config, device)
        return {f"paper: training forward, 1 image {s}, {VQA_QUESTIONS} questions x {VQA_QUESTION_TOKENS} tokens, "
                f"{VQA_ANSWERS} answers x {VQA_ANSWER_TOKENS} tokens, n=[1]":
                ((torch.randn(1, 3, s, s, device=device), q, qm, a, am), {"weights": w, "n": [1], "mode": "train"}),
                f"inference: 1 image {s} + 1 question ({VQA_QUESTION_TOKENS}) + 1 answer pass ({VQA_ANSWER_TOKENS})":
                ((torch.randn(1, 3, s, s, device=device), q1, qm1, a1, am1), {"mode": "inference"})}

    def plan_train_forward(self, model_config: dict, device) -> tuple:
        """The protocol's training forward cut to one question and one answer (the protocol has 32 questions x
        47 answers; a training sample is one question with its answers)."""
        label, (args, kwargs) = next(iter(self.flops_forwards(model_config, device).items()))
        img, q, qm, a, am = args
        kw = dict(kwargs)
        kw["weights"] = kw["weights"][:1]
        kw["n"] = [1]
        return (f"training forward, 1 image {img.shape[-1]} + 1 question ({q.shape[1]} tokens) + 1 answer "
                f"({a.shape[1]} tokens)"), ((img, q[:1], qm[:1], a[:1], am[:1]), kw)

    def public_train_size(self, data: dict) -> tuple:
        """The sum of the training files' sizes (VQA_FILES) under `train_files` (null: the paper's three)."""
        files = data.get("train_files") or ["vqa_train", "vqa_val", "vg_qa"]
        n, exact, parts = 0, True, []
        for f in files:
            if f not in VQA_FILES:
                raise BenchError(f"bench plan: the size of the VQA training file {f!r} is unknown; pass --train-size N")
            c, ex, what = VQA_FILES[f]
            n, exact = n + c, exact and ex
            parts.append(f"{f} {c:,} ({what}{'' if ex else ', approximate'})")
        return n, exact, "BLIP's VQA training files: " + " + ".join(parts)

    def fingerprint(self) -> dict:
        fp = {"task": self.name, "profile": self.profile, "image_size": self.image_size, "train_files": self.train_files}
        if self.profile == "micro":
            fp.update(generator="tasks.vqa.generate_micro", generator_version=GENERATOR_VERSION, **self.micro)
        else:
            fp["root"] = str(self.root.resolve())
        return fp
