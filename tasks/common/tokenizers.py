"""The tokenizers several tasks share, and the check that a tokenizer fits the model's embedding.

Micro (word-level, fixed vocabularies; the ids of the micro data sets and pinned results depend on them):
  word_vocab(specials, words) -> the vocabulary: the specials, then every word once, in first-seen order
  WordVocab(vocab, unk)          word -> id table, unknown words -> unk: the core of GLUE's and WikiText-2's
                                 `WordTokenizer` (tasks.glue, tasks.lm_perplexity; each keeps its own text
                                 splitting and layout) and of BertStyleWordTokenizer
  BertStyleWordTokenizer(words)  word-level with BERT-style batches ([CLS] .. [SEP], pad 0) and BLIP's
                                 [ENC] / [DEC] tokens; tasks.vl_micro.MicroTokenizer is it over the micro
                                 vision-language grammar's words (NLVR2, VQA, caption, retrieval)
Paper:
  BlipBertTokenizer(path)        bert-base-uncased from a local folder + BLIP's [DEC] (bos) and [ENC] (NLVR2,
                                 and the VL tasks' `bert` kind)
  TextTokenizer(kind, path)      the VL tasks' text tokenizer: micro, bert (BLIP) or open_clip (CLIP)
                                 (retrieval, VQA, caption)

A tokenizer must not produce ids the model's input embedding does not have (TaskAdapter.check_model):
  token_id_range(tok)   -> ids the tokenizer can produce: max(len(tok), highest id + 1) for transformers
                           tokenizers (added tokens included), `vocab_size` or the encoder size otherwise
  embedding_rows(model) -> (rows, name) of the text input embedding: `get_input_embeddings()` for
                           transformers models, else the smallest nn.Embedding called *word_embeddings /
                           *token_embedding (BLIP's text encoder and decoder, CLIP's token embedding)
  check_vocab(tok, model, source)  an id range larger than the embedding -> BenchError naming both sizes
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from bench.errors import BenchError, MissingData

# ----------------------------------------------------------------------------------------------------
# micro word-level tokenizers
# ----------------------------------------------------------------------------------------------------


def word_vocab(specials, words) -> list:
    """The specials, then each word once (first occurrence kept): ids never change unless the lists do."""
    out = list(specials)
    for w in words:
        if w not in out:
            out.append(w)
    return out


class WordVocab:
    """A fixed vocabulary: `vocab` (id -> word), `index` (word -> id), `lookup(words)` with unknown -> unk_id."""

    def __init__(self, vocab, unk: str):
        self.vocab = list(vocab)
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.unk_id = self.index[unk]

    def __len__(self) -> int:
        return len(self.vocab)

    def lookup(self, words) -> list:
        return [self.index.get(w, self.unk_id) for w in words]


_WORD_RE = re.compile(r"\[[A-Z]+\]|[a-z0-9]+|[^\sa-z0-9]")


class BertStyleWordTokenizer(WordVocab):
    """Word-level tokenizer over `words`, BERT-style output (the micro vision-language tasks').

    tok(texts, max_len) -> {"input_ids": (B, L) long, "attention_mask": (B, L) long} with [CLS] at 0, [SEP]
    last, pad 0; L = the longest sequence in the batch (BLIP's padding="longest") capped at max_len, or
    max_len with padding="max_length". Text is lower-cased and split into words, numbers and single
    punctuation marks; unknown words map to [UNK] (id 6). vocab_size = 512 (the micro model configs'
    embedding size; ids above len(vocab) are simply never produced)."""

    SPECIALS = ("[PAD]", "[CLS]", "[SEP]", "[MASK]", "[ENC]", "[DEC]", "[UNK]")
    vocab_size = 512
    pad_token_id, cls_token_id, sep_token_id, mask_token_id, enc_token_id, dec_token_id, unk_token_id = range(7)
    bos_token_id = dec_token_id

    def __init__(self, words):
        super().__init__(word_vocab(self.SPECIALS, words), unk="[UNK]")
        assert len(self.vocab) <= self.vocab_size

    @property
    def itos(self) -> list:      # torchtext's names for vocab / index
        return self.vocab

    @property
    def stoi(self) -> dict:
        return self.index

    def tokenize(self, text: str) -> list[str]:
        return _WORD_RE.findall(text.lower().replace("[pad]", " ").strip()) if text else []

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.lookup(self.tokenize(text))
        return [self.cls_token_id] + ids + [self.sep_token_id] if add_special_tokens else ids

    def __call__(self, texts, max_len: int = 32, padding: str = "longest", add_special_tokens: bool = True) -> dict:
        if isinstance(texts, str):
            texts = [texts]
        if max_len < 2 and add_special_tokens:
            raise ValueError("max_len must leave room for [CLS] and [SEP]")
        seqs = []
        for t in texts:
            ids = self.encode(t, add_special_tokens)
            if len(ids) > max_len:   # truncate, keeping [SEP] last (BERT's truncation)
                ids = ids[:max_len - 1] + [self.sep_token_id] if add_special_tokens else ids[:max_len]
            seqs.append(ids)
        L = max_len if padding == "max_length" else max((len(s) for s in seqs), default=0)
        input_ids = torch.full((len(seqs), L), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), L), dtype=torch.long)
        for i, s in enumerate(seqs):
            input_ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, :len(s)] = 1
        return {"input_ids": input_ids, "attention_mask": mask}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Words of the ids, special tokens dropped (stops at [SEP] or pad, like BLIP's decoding)."""
        if torch.is_tensor(ids):
            ids = ids.tolist()
        words = []
        for i in ids:
            i = int(i)
            if skip_special_tokens and i in (self.sep_token_id, self.pad_token_id):
                break
            if skip_special_tokens and i < len(self.SPECIALS):
                continue
            words.append(self.vocab[i] if 0 <= i < len(self.vocab) else "[UNK]")
        return " ".join(words)

    def batch_decode(self, seqs, skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(s, skip_special_tokens) for s in seqs]


# ----------------------------------------------------------------------------------------------------
# paper tokenizers (local folders; nothing is downloaded at run time)
# ----------------------------------------------------------------------------------------------------

class BlipBertTokenizer:
    """bert-base-uncased from a local folder + BLIP's init_tokenizer tokens: [DEC] as bos (id 30522) and
    [ENC] (30523). `tok(texts, max_len)` -> {"input_ids", "attention_mask"} (padding="longest", truncated);
    `.tok` is the transformers tokenizer, `.path` its folder. `setting` names the card key of the folder
    (data.<setting>) in the error when it is missing."""

    def __init__(self, path, setting: str = "tokenizer"):
        path = Path(path) if path else None
        if path is None or not (path / "vocab.txt").is_file():
            raise MissingData("bert-base-uncased tokenizer (vocab.txt)", path,
                              "  <folder>/vocab.txt (+ tokenizer_config.json), e.g. a saved bert-base-uncased",
                              "Save the tokenizer there (BertTokenizer.from_pretrained(...).save_pretrained(folder)) or "
                              f"set the card's data.{setting}; nothing is downloaded at run time.")
        from transformers import BertTokenizer
        self.path = path
        self.tok = BertTokenizer.from_pretrained(str(path))
        self.tok.add_special_tokens({"bos_token": "[DEC]"})
        self.tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})

    def __call__(self, texts, max_len: int = 128) -> dict:
        enc = self.tok(list(texts), padding="longest", truncation=True, max_length=max_len, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def decode(self, ids) -> str:
        return self.tok.decode(ids, skip_special_tokens=True).strip()


class TextTokenizer:
    """The vision-language tasks' text tokenizer: micro word-level (tasks.vl_micro.MicroTokenizer), BERT
    (BLIP, a local folder: BlipBertTokenizer) or open_clip's (CLIP). `tok(texts, max_len)` ->
    {"input_ids", "attention_mask"}; `decode(ids)` -> text."""

    def __init__(self, kind: str, path: str | None = None, context_length: int = 77, setting: str = "tokenizer_path"):
        self.kind = kind
        if kind == "micro":
            from tasks.vl_micro import MicroTokenizer
            self.tok = MicroTokenizer()
        elif kind == "bert":
            self.tok = BlipBertTokenizer(path, setting)
            self.path = self.tok.path
        elif kind == "open_clip":
            import open_clip
            self.tok = open_clip.get_tokenizer("ViT-L-14-336")   # the bundled BPE vocabulary: offline
            self.path = "open_clip's bundled ViT-L-14-336 tokenizer"
            self.context_length = context_length
        else:
            raise BenchError(f"tokenizer must be micro, bert or open_clip, not {kind!r}")

    def check_model(self, model) -> None:
        """The ids this tokenizer produces fit the model's text embedding (micro: the generator's vocabulary)."""
        if self.kind != "micro":
            check_vocab(self.tok, model, self.path, "tokenizer")

    def __call__(self, texts, max_len: int) -> dict:
        if self.kind in ("micro", "bert"):
            return self.tok(list(texts), max_len)
        ids = self.tok(list(texts), context_length=self.context_length)
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}

    def decode(self, ids) -> str:
        if self.kind in ("micro", "bert"):
            return self.tok.decode(ids)
        return self.tok.decode(ids, skip_special_tokens=True).strip()


# ----------------------------------------------------------------------------------------------------
# the tokenizer fits the model
# ----------------------------------------------------------------------------------------------------

_TEXT_EMBEDDINGS = ("word_embeddings", "token_embedding", "embed_tokens", "wte")


def token_id_range(tok) -> int | None:
    tok = getattr(tok, "tok", tok)          # the tasks' wrappers keep the transformers tokenizer in .tok
    if hasattr(tok, "get_vocab"):
        try:
            vocab = tok.get_vocab()
            return max(len(tok), (max(vocab.values()) + 1) if vocab else 0)
        except (TypeError, ValueError, NotImplementedError):
            pass
    for attr in ("vocab_size", "n_vocab"):
        n = getattr(tok, attr, None)
        if isinstance(n, int):
            return n
    enc = getattr(tok, "encoder", None)
    if isinstance(enc, dict) and enc:
        return max(len(enc), max(v for v in enc.values() if isinstance(v, int)) + 1)
    return None


def embedding_rows(model: nn.Module) -> tuple[int | None, str]:
    get = getattr(model, "get_input_embeddings", None)
    if callable(get):
        try:
            emb = get()
        except (NotImplementedError, AttributeError):
            emb = None
        if isinstance(emb, nn.Embedding):
            name = next((n for n, m in model.named_modules() if m is emb), "input embedding")
            return emb.num_embeddings, name
    found = [(m.num_embeddings, n) for n, m in model.named_modules()
             if isinstance(m, nn.Embedding) and n.rsplit(".", 1)[-1] in _TEXT_EMBEDDINGS]
    if found:
        return min(found)
    return None, ""


def check_vocab(tok, model: nn.Module, source, what: str = "tokenizer") -> None:
    """BenchError if `tok` can produce ids beyond the rows of the model's text embedding (they would index
    past it: a CUDA assert or an IndexError in the middle of a run)."""
    n_tok = token_id_range(tok)
    rows, name = embedding_rows(model)
    if n_tok is None or rows is None or n_tok <= rows:
        return
    raise BenchError(f"{what} {source} has {n_tok} token ids but the model's input embedding {name} has {rows} rows: "
                     f"ids {rows}..{n_tok - 1} would index past it. Use the tokenizer released with the checkpoint "
                     f"(the same model), or set the card's model_config vocab_size to at least {n_tok} for a model "
                     "trained with this tokenizer.")
