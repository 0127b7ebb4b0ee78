"""Language-model perplexity on WikiText-2 ("wikitext2_ppl"), with the protocol as part of the card.

Protocol (GPTQ / SparseGPT / SliceGPT / Wanda / LLM-Pruner all use it, with different lengths):
  1. the raw WikiText-2 test split, its rows joined with "\\n\\n" (rows as the `datasets` wikitext loader
     yields them: every line of wiki.test.raw, the empty ones as "" and the others with their "\\n");
  2. tokenised once as one string (the tokenizer's defaults: LLaMA's adds one BOS at the very start);
  3. cut into NON-overlapping windows of `seq_len` tokens, the remainder (< seq_len tokens) dropped;
  4. every window is one forward; each of its seq_len - 1 next-token predictions is scored;
  5. perplexity = exp(mean NLL over all predicted tokens). Every window predicts the same number of
     tokens, so this equals GPTQ's exp(mean over windows of the window's mean NLL).
Presets (`data.preset`): gptq 2048 (GPTQ/SparseGPT/SliceGPT; LLaMA-2-7B dense 5.47), wanda 4096 (LLaMA-2-7B
dense 5.12), llm_pruner 128; `data.seq_len` overrides. The metric is "ppl" (lower is better); "nll" and
the window count come with it.

Training / calibration data (finetuning, distillation, VTrans's mask training) come from the train split,
tokenised the same way: by default all non-overlapping windows of `train_seq_len` (default seq_len);
with `calib_samples: N` instead N windows at uniformly random start positions drawn with `calib_seed`
(GPTQ's calibration sampler). Size, length and seed are part of the fingerprint (and so of the record).

Layout:
    <data_root>/wikitext-2-raw/wiki.train.raw, wiki.valid.raw, wiki.test.raw   (wikitext-2-raw-v1.zip)
  or a `datasets` dump (DatasetDict.save_to_disk of wikitext / wikitext-2-raw-v1) at
    <data_root>/wikitext2_hf                   (splits train / validation / test, column "text")

Tokenizer: paper = `data.tokenizer`, a local folder (e.g. a LLaMA-2 or GPT-2 tokenizer saved with
save_pretrained) read with AutoTokenizer(local_files_only=True); relative paths are under data_root.
micro = a word-level tokenizer over the micro grammar's vocabulary (offline; newline is a token).

Micro: `generate_micro` writes wiki.{train,valid,test}.raw in the same layout (" = Title = " headings,
blank lines, paragraphs of sentences from a small agreement grammar), so a two-layer GPT-2 or LLaMA
learns it in a minute and pruning visibly costs perplexity.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from bench.api import ModelOutput, TaskAdapter
from bench.errors import BenchError, MissingData
from bench.measure import eval_mode
from bench.options import NonNegInt, OptionsModel, PositiveInt
from bench.registry import register_task
from tasks.common.tokenizers import WordVocab, check_vocab, word_vocab
from tasks.common.batching import micro_batches
from tasks.common.hf_outputs import hf_forward, token_shape
from tasks.micro_data import generate_atomically, micro_folder

LAYOUT_VERSION = 1
GENERATOR_VERSION = 1
PRESETS = {"gptq": 2048, "wanda": 4096, "llm_pruner": 128}
# Dense LLaMA-2-7B WikiText-2 perplexity by sequence length (GPTQ/SliceGPT 2048, Wanda 4096)
LLAMA2_7B_DENSE_PPL = {2048: 5.47, 4096: 5.12}
FOLDER = "wikitext-2-raw"
FILES = {"train": "wiki.train.raw", "valid": "wiki.valid.raw", "test": "wiki.test.raw"}
HF_SPLITS = {"train": "train", "valid": "validation", "test": "test"}

LAYOUT = f"""\
  <data_root>/{FOLDER}/wiki.train.raw
  <data_root>/{FOLDER}/wiki.valid.raw
  <data_root>/{FOLDER}/wiki.test.raw        (the extracted wikitext-2-raw-v1.zip)
  or <data_root>/wikitext2_hf               (datasets' save_to_disk of wikitext-2-raw-v1)"""

# ------------------------------------------------------------------------------------------------
# micro corpus: a small agreement grammar

DET = ["the", "a", "every", "one"]
ADJ = ["old", "young", "quiet", "bright", "dark", "small", "large", "green", "happy", "tired"]
N_SG = ["king", "river", "city", "farmer", "ship", "bird", "song", "village", "soldier", "garden", "storm",
        "bridge"]
N_PL = ["kings", "rivers", "cities", "farmers", "ships", "birds", "songs", "villages", "soldiers", "gardens",
        "storms", "bridges"]
V_SG = ["builds", "sees", "follows", "crosses", "defends", "finds", "leaves", "praises"]
V_PL = ["build", "see", "follow", "cross", "defend", "find", "leave", "praise"]
PLACES = ["north", "south", "coast", "valley", "mountains", "harbour"]
YEARS = [str(y) for y in range(1800, 1830)]
WORDS = (DET + ADJ + N_SG + N_PL + V_SG + V_PL + PLACES + YEARS
         + ["in", "near", "and", "but", "because", "while", "it", "they", "was", "were", "is", "are", "of",
            "=", ".", ",", "history", "later", "then", "also"])
SPECIALS = ["<pad>", "<unk>", "<nl>"]


MICRO_VOCAB = word_vocab(SPECIALS, WORDS)
MICRO_VOCAB_SIZE = len(MICRO_VOCAB)

# The WikiText-2 raw train split in tokens (`bench plan`): the official 2,088,628 words; BPE tokenizers give more.
# Approximate: each tokenizer's known test-split count (GPT-2 287,644; LLaMA 341,469) x the train/test word ratio
# (8.505).
WIKITEXT2_TRAIN_TOKENS = {"gpt2": 2_446_000, "llama": 2_904_000, None: 2_088_628}


class WordTokenizer(WordVocab):
    """Word-level tokenizer of the micro corpus: whitespace split, newline -> <nl>, unknown -> <unk>."""

    def __init__(self, vocab=MICRO_VOCAB):
        super().__init__(vocab, unk="<unk>")

    def __call__(self, text: str) -> list:
        return self.lookup(text.replace("\n", " <nl> ").split())


def _np(rng, xs):
    return xs[int(rng.integers(len(xs)))]


def _sentence(rng) -> str:
    plural = bool(rng.integers(2))
    subj = ["the"] if plural else [_np(rng, DET)]
    if rng.random() < 0.6:
        subj.append(_np(rng, ADJ))
    k = int(rng.integers(len(V_SG)))
    subj.append(_np(rng, N_PL) if plural else _np(rng, N_SG))
    verb = V_PL[k] if plural else V_SG[k]
    obj = [_np(rng, DET[:2]), _np(rng, N_SG)]
    words = subj + [verb] + obj
    u = rng.random()
    if u < 0.25:
        words += ["in", _np(rng, YEARS)]
    elif u < 0.5:
        words += ["near", "the", _np(rng, PLACES)]
    elif u < 0.65:
        words += ["because", "they" if plural else "it", "were" if plural else "was", _np(rng, ADJ)]
    return " ".join(words) + " ."


def _article(rng) -> list:
    lines = [" ", f" = {_np(rng, N_SG)} of the {_np(rng, PLACES)} = ", " "]
    for _ in range(int(rng.integers(2, 5))):
        lines.append(" " + " ".join(_sentence(rng) for _ in range(int(rng.integers(3, 7)))) + " ")
        lines.append(" ")
    return lines


def generate_micro(root, train_tokens: int = 60000, eval_tokens: int = 8000, seed: int = 11) -> Path:
    """wiki.{train,valid,test}.raw of the micro grammar, about the given numbers of words each."""
    root = Path(root)
    d = root / FOLDER
    d.mkdir(parents=True, exist_ok=True)
    for k, (split, n) in enumerate((("train", train_tokens), ("valid", eval_tokens), ("test", eval_tokens))):
        rng = np.random.default_rng([seed, k])
        lines, count = [], 0
        while count < n:
            art = _article(rng)
            lines += art
            count += sum(len(x.split()) for x in art)
        (d / FILES[split]).write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "README.txt").write_text(
        f"Micro WikiText-2: synthetic stand-in written by tasks.lm_perplexity.generate_micro (generator "
        f"{GENERATOR_VERSION}); settings {json.dumps({'train_tokens': train_tokens, 'eval_tokens': eval_tokens, 'seed': seed})}."
        "\nSame file names and line format as wikitext-2-raw. Not comparable with WikiText-2 numbers.\n")
    return root


# ------------------------------------------------------------------------------------------------
# protocol pieces (pure functions, tested on their own)


def join_rows(lines) -> str:
    """The common protocol's text: the dataset rows joined with blank lines ("\\n\\n".join(rows))."""
    return "\n\n".join(lines)


def raw_rows(path: Path) -> list:
    """Rows of a wiki.*.raw file as the `datasets` wikitext loader yields them (empty lines -> "")."""
    try:
        with open(path, encoding="utf-8") as f:
            return [line if line.strip() else "" for line in f]
    except UnicodeDecodeError as e:
        raise BenchError(f"{path} is not UTF-8 text ({e.reason}: byte 0x{e.object[e.start]:02x}): the "
                         "wikitext-2-raw-v1 files are UTF-8; download them again.") from e


def windows(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(n, seq_len) non-overlapping windows of a 1-D token tensor; the remainder is dropped."""
    ids = ids.view(-1)
    n = ids.numel() // int(seq_len)
    if n == 0:
        raise BenchError(f"{ids.numel()} tokens give no window of {seq_len} tokens")
    return ids[: n * seq_len].view(n, seq_len)


def random_windows(ids: torch.Tensor, seq_len: int, n: int, seed: int) -> torch.Tensor:
    """GPTQ's calibration sampler: n windows at uniformly random starts (seeded)."""
    ids = ids.view(-1)
    if ids.numel() <= seq_len:
        raise BenchError(f"{ids.numel()} training tokens are too few for windows of {seq_len}")
    g = torch.Generator().manual_seed(int(seed))
    starts = torch.randint(0, ids.numel() - seq_len, (int(n),), generator=g)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


def window_nll(logits: torch.Tensor, ids: torch.Tensor) -> tuple:
    """(sum of next-token NLL, number of predicted tokens) of windows `ids` (B, L) given logits (B, L, V)."""
    lp = logits[:, :-1].float()
    tgt = ids[:, 1:].to(lp.device)
    nll = F.cross_entropy(lp.reshape(-1, lp.shape[-1]), tgt.reshape(-1), reduction="sum")
    return float(nll), int(tgt.numel())


def perplexity(model: nn.Module, wins: torch.Tensor, device, batch_size: int = 1) -> dict:
    """exp(mean NLL over all predicted tokens) of `model` on the windows (B = batch_size per forward)."""
    total, count = 0.0, 0
    with eval_mode(model), torch.inference_mode():
        for i in range(0, wins.shape[0], batch_size):
            x = wins[i:i + batch_size].to(device)
            out = model(x)
            s, c = window_nll(out.logits if hasattr(out, "logits") else out, x)
            total, count = total + s, count + c
    nll = total / count
    return {"ppl": math.exp(nll), "nll": nll, "windows": int(wins.shape[0]), "predicted_tokens": count}


# ------------------------------------------------------------------------------------------------


class WikiText2Data(OptionsModel):
    """A profile's `data:` block for wikitext2_ppl: the perplexity protocol and the training windows."""

    preset: Literal["gptq", "wanda", "llm_pruner"] | None = Field(
        None, description="window length of a published protocol: gptq 2048, wanda 4096, llm_pruner 128")
    seq_len: PositiveInt | None = Field(None, description="evaluation window in tokens, overrides the preset "
                                                          "(null: the preset's, else 64 micro, 2048 paper)")
    train_seq_len: PositiveInt | None = Field(None, description="training / calibration window in tokens (null: seq_len)")
    calib_samples: PositiveInt | Literal["all"] = Field(
        "all", description="all: every non-overlapping training window; N: N windows at random starts (GPTQ's sampler)")
    calib_seed: NonNegInt = Field(0, description="seed of the random calibration windows")
    eval_batch_size: PositiveInt | None = Field(None, description="windows per evaluation forward (null: 8 micro, 1 paper)")
    tokenizer: str | None = Field(None, description="paper: local folder with the model's tokenizer (relative: "
                                                    "under data_root); required there")
    train_tokens: PositiveInt = Field(60000, description="micro: tokens of the generated training split")
    eval_tokens: PositiveInt = Field(8000, description="micro: tokens of the generated valid and test splits")
    seed: NonNegInt = Field(11, description="micro: generator seed")


@register_task("wikitext2_ppl")
class WikiText2Perplexity(TaskAdapter):
    """WikiText-2 raw perplexity with non-overlapping windows (see the module docstring)."""

    name = "wikitext2_ppl"
    metrics = {"ppl": False, "nll": False}
    layout = LAYOUT
    Data = WikiText2Data
    MICRO_KEYS = ("train_tokens", "eval_tokens", "seed")   # the micro generator's settings

    def __init__(self, settings, data_root, profile, cache_dir):
        super().__init__(settings, data_root, profile, cache_dir)
        self._tok = None
        self._ids: dict = {}
        self._train = None

    # ---------------------------------------------------------------- protocol settings
    @property
    def seq_len(self) -> int:
        if self.settings.seq_len is not None:
            return self.settings.seq_len
        preset = self.settings.preset
        if preset is not None:
            if preset not in PRESETS:
                raise BenchError(f"wikitext2_ppl preset {preset!r} is not one of {sorted(PRESETS)}")
            return PRESETS[preset]
        return 64 if self.profile == "micro" else 2048

    @property
    def train_seq_len(self) -> int:
        v = self.settings.train_seq_len
        return v if v is not None else self.seq_len

    @property
    def micro_settings(self) -> dict:
        return {k: getattr(self.settings, k) for k in self.MICRO_KEYS}

    @property
    def root(self) -> Path:
        if self.profile == "paper":
            return self.data_root
        return micro_folder(self.cache_dir, "wikitext2", {**self.micro_settings, "generator": GENERATOR_VERSION})

    def tokenizer(self):
        if self._tok is not None:
            return self._tok
        if self.profile == "micro":
            self._tok = WordTokenizer()
            return self._tok
        name = self.settings.tokenizer
        if not name:
            raise BenchError("wikitext2_ppl: the paper profile needs `data.tokenizer`, a local folder with the "
                             "model's tokenizer (e.g. LLaMA-2's tokenizer.model + tokenizer_config.json, or GPT-2's "
                             "vocab.json + merges.txt). Nothing is downloaded at run time.")
        path = Path(name).expanduser()
        path = path if path.is_absolute() else self.data_root / path
        if not path.is_dir():
            raise MissingData("tokenizer folder", path, "  <folder>/tokenizer files (tokenizer.save_pretrained)",
                              "Save the model's tokenizer there or set data.tokenizer.")
        from transformers import AutoTokenizer
        try:
            hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as e:  # noqa: BLE001
            raise BenchError(f"cannot load a tokenizer from {path}: {e}")
        self._hf_tok, self._tok_path = hf, path
        self._tok = lambda text: hf(text, return_tensors="pt").input_ids.view(-1).tolist()
        return self._tok

    def check_model(self, model) -> None:
        """Paper: the tokenizer's ids must fit the model's input embedding (BenchError naming both sizes)."""
        if self.profile == "paper":
            self.tokenizer()
            check_vocab(self._hf_tok, model, self._tok_path, "wikitext2_ppl tokenizer")

    # ---------------------------------------------------------------- data
    def _rows(self, split: str) -> list:
        d = self.root / FOLDER
        path = d / FILES[split]
        if path.is_file():
            return raw_rows(path)
        hf = self.data_root / "wikitext2_hf"
        if self.profile == "paper" and hf.is_dir():
            try:
                from datasets import load_from_disk
            except ImportError:
                raise BenchError(f"{hf} is a `datasets` dump but the `datasets` package is not installed.")
            return list(load_from_disk(str(hf))[HF_SPLITS[split]]["text"])
        raise MissingData(f"WikiText-2 file {FILES[split]}", path, LAYOUT,
                          "Extract wikitext-2-raw-v1.zip into <data_root> (data_root = --data-root or BENCH_DATA). "
                          "Nothing is downloaded at run time. The micro profile needs no data.")

    def prepare(self) -> None:
        if self.profile == "micro":
            s = self.micro_settings
            generate_atomically(self.root, lambda tmp: generate_micro(tmp, s["train_tokens"], s["eval_tokens"],
                                                                      s["seed"]))
        for split in ("test", "train"):
            self.ids(split)

    def ids(self, split: str) -> torch.Tensor:
        """The split tokenised once, as one sequence (the joined text)."""
        if split not in FILES:
            raise BenchError(f"wikitext2_ppl has splits {sorted(FILES)}, not {split!r}")
        if split not in self._ids:
            text = join_rows(self._rows(split))      # the data first: a missing file is the clearer error
            self._ids[split] = torch.tensor(self.tokenizer()(text), dtype=torch.long)
        return self._ids[split]

    def eval_windows(self, split: str = "test") -> torch.Tensor:
        return windows(self.ids(split), self.seq_len)

    def train_windows(self) -> torch.Tensor:
        if self._train is None:
            n = self.settings.calib_samples
            ids = self.ids("train")
            self._train = (windows(ids, self.train_seq_len) if n == "all"
                           else random_windows(ids, self.train_seq_len, n, self.settings.calib_seed))
        return self._train

    @property
    def train_size(self) -> int:
        return int(self.train_windows().shape[0])

    def subset_size(self, fraction: float) -> int:
        return max(1, int(round(float(fraction) * self.train_size)))

    def steps_per_epoch(self, batch_size: int, subset: float | None = None) -> int:
        n = self.train_size if subset is None else self.subset_size(subset)
        return max(1, n // int(batch_size))

    def train_batches(self, batch_size: int, seed: int, subset: float | None = None, subset_seed: int = 0,
                      recipe=None, shard=None):
        """Endless shuffled batches {"input_ids": (B, train_seq_len)} of training windows
        (`tasks.common.batching.micro_batches`; with `shard`, only this rank's); `subset` = a fixed random
        fraction of them (Fast-VTrans), drawn with `subset_seed`."""
        w = self.train_windows()
        pool = torch.arange(w.shape[0])
        if subset is not None:
            pool = torch.randperm(w.shape[0], generator=torch.Generator().manual_seed(int(subset_seed)))
            pool = pool[: self.subset_size(subset)]
        for idx, _ in micro_batches(len(pool), batch_size, seed, shard):
            yield {"input_ids": w[pool[idx]]}

    # ---------------------------------------------------------------- model calls
    @staticmethod
    def model_inputs(model, batch, device) -> dict:
        return {"input_ids": batch["input_ids"].to(device)}

    def forward(self, model, batch, device, output_hidden_states: bool = False) -> ModelOutput:
        return hf_forward(model, self.model_inputs(model, batch, device), output_hidden_states)

    def token_shape(self, batch) -> tuple:
        return token_shape(batch)

    def sequence_length(self) -> int:
        return int(self.seq_len)

    def loss_from_output(self, out, batch, device) -> torch.Tensor:
        logits = (out.logits if hasattr(out, "logits") else out)[:, :-1].float()
        tgt = batch["input_ids"][:, 1:].to(logits.device)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1))

    def loss(self, model, batch, device, recipe=None) -> torch.Tensor:
        return self.loss_from_output(self.forward(model, batch, device), batch, device)

    def evaluate(self, model, split: str = "test", device="cpu") -> dict:
        bs = self.settings.eval_batch_size
        bs = bs if bs is not None else (8 if self.profile == "micro" else 1)
        res = perplexity(model, self.eval_windows(split), device, bs)
        res["seq_len"] = self.seq_len
        return res

    # ---------------------------------------------------------------- FLOPs / throughput
    def dummy_inputs(self, model_config: dict, batch_size: int, device) -> tuple:
        """(input_ids (B, seq_len),): the protocol's window length."""
        vocab = int(model_config.get("vocab_size", MICRO_VOCAB_SIZE))
        return (torch.full((batch_size, self.seq_len), min(3, vocab - 1), dtype=torch.long, device=device),)

    def flops_forwards(self, model_config: dict, device) -> dict:
        return {f"inference: 1 sequence of {self.seq_len} tokens (one perplexity window, logits of every token)":
                (self.dummy_inputs(model_config, 1, device), {})}

    def plan_train_forward(self, model_config: dict, device) -> tuple:
        """One training window of `train_seq_len` tokens (not the evaluation window of the FLOPs protocol)."""
        seq = int(self.train_seq_len)
        vocab = int(model_config.get("vocab_size", 8))
        return (f"training forward, 1 window of {seq} tokens (train_seq_len)",
                ((torch.full((1, seq), min(3, vocab - 1), dtype=torch.long, device=device),), {}))

    def public_train_size(self, data: dict) -> tuple:
        """`calib_samples` windows when it is a number, else the train split's tokens (WIKITEXT2_TRAIN_TOKENS, by
        the tokenizer named in `tokenizer`) in windows of `train_seq_len`."""
        seq = int(self.train_seq_len or data.get("train_seq_len") or data.get("seq_len") or 2048)
        calib = data.get("calib_samples", "all")
        if isinstance(calib, int):
            return calib, True, f"WikiText-2: calib_samples {calib:,} random windows of {seq} tokens"
        tok = str(data.get("tokenizer") or "").lower()
        key = "llama" if "llama" in tok else "gpt2" if "gpt2" in tok else None
        tokens = WIKITEXT2_TRAIN_TOKENS[key]
        return tokens // seq, False, (f"WikiText-2 raw train: ~{tokens:,} {key or 'word'} tokens (approximate) / "
                                      f"{seq}-token windows")

    def fingerprint(self) -> dict:
        fp = {"task": self.name, "profile": self.profile, "layout_version": LAYOUT_VERSION,
              "protocol": "join \\n\\n, tokenise once, non-overlapping windows, remainder dropped",
              "seq_len": self.seq_len, "train_seq_len": self.train_seq_len,
              "calib_samples": self.settings.calib_samples,
              "calib_seed": self.settings.calib_seed}
        if self.profile == "micro":
            fp.update(generator="tasks.lm_perplexity.generate_micro", generator_version=GENERATOR_VERSION,
                      vocab_size=MICRO_VOCAB_SIZE, **self.micro_settings)
        else:
            fp.update(root=str(self.root.resolve()), tokenizer=str(self.settings.tokenizer))
        return fp
