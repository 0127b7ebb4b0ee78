"""GLUE (Wang et al. 2019): the eight tasks of the BERT/RoBERTa pruning tables, evaluated on dev.

Tasks (registered names, official metrics (metrics.glue), reported x100 as papers do):
    glue_cola  CoLA   Matthews correlation ("mcc")
    glue_sst2  SST-2  accuracy ("acc")
    glue_mrpc  MRPC   F1 of the positive class and accuracy ("f1", "acc")
    glue_stsb  STS-B  Pearson and Spearman correlation ("pearson", "spearman"); regression head
                      (num_labels = 1, MSE loss)
    glue_qqp   QQP    F1 and accuracy ("f1", "acc")
    glue_mnli  MNLI   accuracy on dev-matched and dev-mismatched ("acc_m", "acc_mm")
    glue_qnli  QNLI   accuracy ("acc")
    glue_rte   RTE    accuracy ("acc")
Evaluation is on the dev sets (the papers' convention: GLUE's test labels are not public). Splits:
`train`, `dev` (MNLI: both dev files), and `val` = the last `holdout` training examples (default 0: no val
split; set it when a method selects on validation, so nothing is ever selected on dev).

Layout (the standard GLUE folders written by the GLUE `download_glue_data.py` script):

    <data_root>/glue/CoLA/{train,dev}.tsv     no header: source, label, original label, sentence
    <data_root>/glue/SST-2/{train,dev}.tsv    header: sentence, label
    <data_root>/glue/MRPC/{train,dev}.tsv     header: Quality, #1 ID, #2 ID, #1 String, #2 String
    <data_root>/glue/STS-B/{train,dev}.tsv    header: index genre filename year old_index source1 source2
                                              sentence1 sentence2 score
    <data_root>/glue/QQP/{train,dev}.tsv      header: id qid1 qid2 question1 question2 is_duplicate
    <data_root>/glue/MNLI/train.tsv, dev_matched.tsv, dev_mismatched.tsv
                                              header: index promptID pairID genre ... sentence1 sentence2
                                              label1 [label2..label5] gold_label
    <data_root>/glue/QNLI/{train,dev}.tsv     header: index question sentence label
    <data_root>/glue/RTE/{train,dev}.tsv      header: index sentence1 sentence2 label

Files are read as the reference processors read them (tab-separated, no quoting). Columns are found by
their header names, CoLA by position; label strings map to ids in the order of transformers' GLUE
processors (MNLI: contradiction, entailment, neutral; QNLI/RTE: entailment, not_entailment), so fine-tuned
checkpoints keep their label order. QQP lines with missing fields are skipped, as the reference does.
Alternatively a `datasets` dump (`DatasetDict.save_to_disk`) at <data_root>/glue_hf/<config> (config = cola,
sst2, mrpc, stsb, qqp, mnli, qnli, rte) is read with `datasets.load_from_disk` when the TSV folder is absent
(the `datasets` package is optional); its integer labels are mapped through the ClassLabel names.

Tokenizer
- paper: `settings.tokenizer` = a local folder with a BERT or RoBERTa tokenizer (vocab.txt, or
  vocab.json + merges.txt), read with `AutoTokenizer.from_pretrained(folder, local_files_only=True)`;
  relative paths are under data_root. Pairs are encoded as the tokenizer does ([CLS] a [SEP] b [SEP]
  for BERT, <s> a </s></s> b </s> for RoBERTa), truncated to `max_len` (default 128, longest first).
- micro: a word-level tokenizer over the fixed micro vocabulary (`MICRO_VOCAB`, offline), the same
  [CLS] a [SEP] b [SEP] + segment ids layout; ids: [PAD] 0, [UNK] 1, [CLS] 2, [SEP] 3, [MASK] 4.

Micro generators write the same TSV files (same columns and headers) under
`<cache>/data/glue_<task>_micro-<hash>/glue/<Task>/`: synthetic tasks a two-layer BERT learns from scratch
in well under a minute (sentiment with negation and contrast, acceptability of word order and agreement, paraphrase,
entailment / contradiction / neutral, question answerability, graded similarity).
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

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
from metrics.glue import accuracy, f1_and_accuracy, matthews_corr, pearson_spearman
from tasks.common.tokenizers import WordVocab, check_vocab, word_vocab
from tasks.common.batching import micro_batches
from tasks.common.hf_outputs import hf_forward, token_shape
from tasks.micro_data import generate_atomically, micro_folder

LAYOUT_VERSION = 1
GENERATOR_VERSION = 4
EVAL_BATCH_SIZE = 128

# ------------------------------------------------------------------------------------------------
# micro vocabulary and word-level tokenizer

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
POS_ADJ = ["good", "great", "fine", "nice", "superb", "lovely", "brilliant", "charming"]
NEG_ADJ = ["bad", "awful", "poor", "dull", "boring", "terrible", "weak", "clumsy"]
NOUNS = ["movie", "film", "plot", "actor", "story", "music", "scene", "script", "cast", "ending",
         "cat", "dog", "car", "house", "tree", "river", "city", "book", "song", "garden"]
PLURALS = ["movies", "films", "plots", "actors", "stories", "songs", "scenes", "scripts", "cats", "dogs",
           "cars", "houses", "trees", "rivers", "cities", "books"]
COLOURS = ["red", "blue", "green", "black", "white", "small", "big", "old", "new", "tall"]
VERBS = ["sees", "likes", "finds", "follows", "watches", "helps", "visits", "paints"]
VERBS_PL = ["see", "like", "find", "follow", "watch", "help", "visit", "paint"]
SYN = {"sees": "watches", "likes": "enjoys", "finds": "discovers", "follows": "tracks", "helps": "assists",
       "visits": "tours", "paints": "draws", "big": "large", "small": "little", "old": "aged", "new": "fresh",
       "good": "fine", "bad": "poor", "great": "superb", "awful": "terrible", "movie": "film", "car": "auto",
       "house": "home", "city": "town", "book": "novel", "song": "tune"}
FILLER = ["really", "quite", "very", "truly", "somewhat", "rather", "honestly", "overall", "again", "today"]
FUNCTION = ["the", "a", "is", "was", "are", "were", "not", "and", "but", "it", "this", "that", "what", "who",
            "where", "which", "of", "in", "on", "with", "by", "?", ".", ",", "no", "never", "hardly",
            "near", "than", "there", "does", "do"]


MICRO_VOCAB = word_vocab(SPECIALS, POS_ADJ + NEG_ADJ + NOUNS + PLURALS + COLOURS + VERBS + VERBS_PL + FILLER
                         + FUNCTION + sorted(set(SYN.values())))
MICRO_VOCAB_SIZE = len(MICRO_VOCAB)


class WordTokenizer(WordVocab):
    """Word-level tokenizer over a fixed vocabulary: lower-cased whitespace split, BERT-style pair layout."""

    def __init__(self, vocab=MICRO_VOCAB):
        super().__init__(vocab, unk="[UNK]")
        self.pad_id, self.cls_id, self.sep_id = (self.index[t] for t in ("[PAD]", "[CLS]", "[SEP]"))

    def ids(self, text: str) -> list:
        return self.lookup(text.lower().split())

    def encode(self, a: str, b: str | None, max_len: int) -> tuple:
        ta, tb = self.ids(a), (self.ids(b) if b is not None else None)
        budget = max_len - (3 if tb is not None else 2)
        while len(ta) + len(tb or []) > budget:          # longest first, as transformers' truncation
            if tb is not None and len(tb) > len(ta):
                tb.pop()
            else:
                ta.pop()
        ids = [self.cls_id] + ta + [self.sep_id]
        types = [0] * len(ids)
        if tb is not None:
            ids += tb + [self.sep_id]
            types += [1] * (len(tb) + 1)
        return ids, types


# ------------------------------------------------------------------------------------------------
# TSV readers


def _read_tsv(path: Path) -> list:
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            return list(csv.reader(f, delimiter="\t", quotechar=None, quoting=csv.QUOTE_NONE))
    except UnicodeDecodeError as e:
        raise BenchError(f"{path} is not UTF-8 text ({e.reason}: byte 0x{e.object[e.start]:02x}): the GLUE "
                         "files are UTF-8; download the task's data again.") from e


def _by_header(rows, path, cols, label_col, skip_bad=False):
    if not rows:
        raise BenchError(f"{path} is empty")
    head = rows[0]
    try:
        idx = [head.index(c) for c in cols]
        lab = head.index(label_col) if label_col not in (None, -1) else len(head) - 1
    except ValueError:
        raise BenchError(f"{path}: header {head} lacks one of the columns {cols + [label_col]}; "
                         "is this the GLUE file of the right task?")
    out = []
    for n, r in enumerate(rows[1:], 2):
        try:
            texts = [r[i] for i in idx]
            label = r[lab] if label_col not in (None, -1) else r[-1]
        except IndexError:
            if skip_bad:
                continue
            raise BenchError(f"{path}: line {n} has {len(r)} fields, fewer than the header's {len(head)}")
        out.append((texts[0], texts[1] if len(texts) > 1 else None, label))
    return out


# ------------------------------------------------------------------------------------------------
# micro generators (same files, same columns)


def _rng_choice(rng, xs):
    return xs[int(rng.integers(len(xs)))]


def _subject(rng):
    return f"the {_rng_choice(rng, COLOURS)} {_rng_choice(rng, NOUNS)}"


def _polar_clause(rng):
    """(words, label) of one clause: the adjective's polarity flipped by a negation word; fillers around it."""
    pos = bool(rng.integers(2))
    adj = _rng_choice(rng, POS_ADJ if pos else NEG_ADJ)
    neg = bool(rng.random() < 0.4)
    words = ["the", _rng_choice(rng, NOUNS), _rng_choice(rng, ["is", "was"])]
    if rng.random() < 0.5:
        words.insert(0, _rng_choice(rng, FILLER))
    if neg:
        words.append(_rng_choice(rng, ["not", "never", "hardly"]))
    if rng.random() < 0.5:
        words.append(_rng_choice(rng, FILLER))
    words.append(adj)
    return words, int(pos != neg)


def _sentiment(rng):
    """(sentence, label): sentiment with negation; in a third of the sentences "A but B", where B decides."""
    words, label = _polar_clause(rng)
    if rng.random() < 0.35:
        second, label = _polar_clause(rng)
        words = words + ["but"] + second
    elif rng.random() < 0.3:
        words += ["and", "the", _rng_choice(rng, NOUNS), "is", _rng_choice(rng, COLOURS)]
    return " ".join(words + ["."]), label


def _acceptability(rng):
    """(sentence, label): grammatical 'the ADJ N VERB the N .' vs agreement error or scrambled order."""
    sing = bool(rng.integers(2))
    subj = _rng_choice(rng, NOUNS) if sing else _rng_choice(rng, PLURALS)
    k = int(rng.integers(len(VERBS)))
    verb = VERBS[k] if sing else VERBS_PL[k]
    words = ["the", _rng_choice(rng, COLOURS), subj, verb, "the", _rng_choice(rng, NOUNS)]
    if rng.random() < 0.3:
        words.insert(3, _rng_choice(rng, ["really", "often"]))
    label = 1
    u = rng.random()
    if u < 0.25:                                          # agreement error
        j = words.index(verb)
        words[j] = VERBS_PL[k] if sing else VERBS[k]
        label = 0
    elif u < 0.5:                                         # scrambled order
        perm = rng.permutation(len(words))
        if list(perm) != list(range(len(words))):
            words = [words[i] for i in perm]
            label = 0
    return " ".join(words + ["."]), label


def _clause(rng):
    return ["the", _rng_choice(rng, COLOURS), _rng_choice(rng, NOUNS), _rng_choice(rng, VERBS), "the",
            _rng_choice(rng, COLOURS), _rng_choice(rng, NOUNS)]


def _paraphrase(rng, question=False):
    """(s1, s2, label): s2 = s1 with some synonyms (and maybe a filler) -> 1; two or three of its five
    content words replaced by other words -> 0."""
    c = _clause(rng)
    s1 = list(c)
    s2 = [SYN.get(w, w) if rng.random() < 0.3 else w for w in c]
    label = int(rng.random() < 0.5)
    if not label:
        pools = {1: COLOURS, 2: NOUNS, 3: VERBS, 5: COLOURS, 6: NOUNS}
        for j in rng.choice([1, 2, 3, 5, 6], int(rng.integers(2, 4)), replace=False).tolist():
            s2[j] = _rng_choice(rng, [w for w in pools[j] if w != c[j] and w != SYN.get(c[j])])
    if rng.random() < 0.3:
        s2.insert(0, _rng_choice(rng, FILLER))
    end = ["?"] if question else ["."]
    if question:
        s1, s2 = ["does"] + s1, ["does"] + s2
    return " ".join(s1 + end), " ".join(s2 + end), label


NLI_NOUNS = 8    # the inference tasks draw their nouns from the first 8: easier to bind across segments


def _nli(rng, three_way=True):
    """(premise, hypothesis, label in entailment / neutral / contradiction)."""
    n1, n2 = rng.choice(NLI_NOUNS, 2, replace=False)
    a1, a2 = _rng_choice(rng, COLOURS), _rng_choice(rng, COLOURS)
    premise = ["the", NOUNS[n1], "is", a1, "and", "the", NOUNS[n2], "is", a2]
    u = rng.integers(3)
    which = int(rng.integers(2))
    noun, adj = (NOUNS[n1], a1) if which == 0 else (NOUNS[n2], a2)
    if u == 0:
        hyp, label = ["the", noun, "is", adj], "entailment"
    elif u == 1:
        if rng.random() < 0.5:
            hyp = ["the", noun, "is", "not", adj]
        else:
            hyp = ["the", noun, "is", _rng_choice(rng, [c for c in COLOURS if c != adj])]
        label = "contradiction"
    else:
        # mostly a noun the premises never use (a lexical cue, like MNLI's own artifacts), else an absent one
        other = _rng_choice(rng, NOUNS[NLI_NOUNS:] if rng.random() < 0.6
                            else [NOUNS[i] for i in range(NLI_NOUNS) if i not in (n1, n2)])
        hyp, label = ["the", other, "is", _rng_choice(rng, COLOURS)], "neutral"
    if rng.random() < 0.3:
        premise = [_rng_choice(rng, FILLER)] + premise
    if not three_way and label != "entailment":
        label = "not_entailment"
    return " ".join(premise + ["."]), " ".join(hyp + ["."]), label


def _qnli(rng):
    """(question, sentence, label): is the answer to 'what is the N ?' in the sentence."""
    n1, n2, n3 = rng.choice(NLI_NOUNS, 3, replace=False)
    a1, a2 = _rng_choice(rng, COLOURS), _rng_choice(rng, COLOURS)
    sentence = ["the", NOUNS[n1], "is", a1, "and", "the", NOUNS[n2], "is", a2, "."]
    ok = bool(rng.integers(2))
    asked = NOUNS[_rng_choice(rng, [n1, n2])] if ok else (NOUNS[n3] if rng.random() < 0.4
                                                          else _rng_choice(rng, NOUNS[NLI_NOUNS:]))
    q = ["what", "is", "the", asked, "?"]
    return " ".join(q), " ".join(sentence), "entailment" if ok else "not_entailment"


def _similarity(rng):
    """(s1, s2, score in [0, 5]): five content slots, score = 5 x fraction shared (synonyms count)."""
    c1 = _clause(rng)
    slots = [1, 2, 3, 5, 6]
    shared = int(rng.integers(6))
    keep = set(rng.choice(slots, shared, replace=False).tolist()) if shared else set()
    c2 = list(c1)
    for j in slots:
        if j in keep:
            c2[j] = SYN.get(c1[j], c1[j]) if rng.random() < 0.2 else c1[j]
        else:
            pool = {1: COLOURS, 2: NOUNS, 3: VERBS, 5: COLOURS, 6: NOUNS}[j]
            c2[j] = _rng_choice(rng, [w for w in pool if w != c1[j] and w != SYN.get(c1[j])])
    score = min(5.0, max(0.0, shared + rng.normal(0, 0.2)))
    return " ".join(c1 + ["."]), " ".join(c2 + ["."]), f"{score:.3f}"


def _write(path: Path, header, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        if header:
            f.write("\t".join(header) + "\n")
        for r in rows:
            f.write("\t".join(str(x) for x in r) + "\n")


MNLI_PREFIX = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
               "sentence1_parse", "sentence2_parse", "sentence1", "sentence2"]


def write_micro_files(task: str, folder: Path, split: str, n: int, rng) -> None:
    """Write one split of a micro GLUE task in the official file format into `folder` (the task folder)."""
    files = {"dev_matched": "dev_matched.tsv", "dev_mismatched": "dev_mismatched.tsv"}
    fname = files.get(split, f"{split}.tsv")
    rows = []
    if task == "CoLA":
        for i in range(n):
            s, lab = _acceptability(rng)
            rows.append(["micro", lab, "" if lab else "*", s])
        _write(folder / fname, None, rows)
    elif task == "SST-2":
        for i in range(n):
            s, lab = _sentiment(rng)
            rows.append([s, lab])
        _write(folder / fname, ["sentence", "label"], rows)
    elif task == "MRPC":
        for i in range(n):
            a, b, lab = _paraphrase(rng)
            rows.append([lab, 2 * i, 2 * i + 1, a, b])
        _write(folder / fname, ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"], rows)
    elif task == "QQP":
        for i in range(n):
            a, b, lab = _paraphrase(rng, question=True)
            rows.append([i, 2 * i, 2 * i + 1, a, b, lab])
        _write(folder / fname, ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"], rows)
    elif task == "STS-B":
        for i in range(n):
            a, b, score = _similarity(rng)
            rows.append([i, "micro", "micro", "2024", i, "micro", "micro", a, b, score])
        _write(folder / fname, ["index", "genre", "filename", "year", "old_index", "source1", "source2",
                                "sentence1", "sentence2", "score"], rows)
    elif task == "MNLI":
        dev = split.startswith("dev")
        for i in range(n):
            a, b, lab = _nli(rng)
            labels = [lab] * (5 if dev else 1)
            rows.append([i, i, f"{i}n", "micro" if split != "dev_mismatched" else "micro_mm", "", "", "", "",
                         a, b, *labels, lab])
        extra = ["label1", "label2", "label3", "label4", "label5"] if dev else ["label1"]
        _write(folder / fname, MNLI_PREFIX + extra + ["gold_label"], rows)
    elif task == "QNLI":
        for i in range(n):
            q, s, lab = _qnli(rng)
            rows.append([i, q, s, lab])
        _write(folder / fname, ["index", "question", "sentence", "label"], rows)
    elif task == "RTE":
        for i in range(n):
            a, b, lab = _nli(rng, three_way=False)
            rows.append([i, a, b, lab])
        _write(folder / fname, ["index", "sentence1", "sentence2", "label"], rows)
    else:
        raise BenchError(f"no micro generator for GLUE task {task}")


def generate_micro(root, task: str, dev_files, train_size: int, dev_size: int, seed: int) -> Path:
    root = Path(root)
    folder = root / "glue" / task
    write_micro_files(task, folder, "train", train_size, np.random.default_rng([seed, 0]))
    for k, split in enumerate(dev_files, 1):
        write_micro_files(task, folder, split, dev_size, np.random.default_rng([seed, k]))
    (root / "README.txt").write_text(
        f"Micro GLUE {task}: synthetic stand-in written by tasks.glue.generate_micro (generator "
        f"{GENERATOR_VERSION}); settings {json.dumps({'train_size': train_size, 'dev_size': dev_size, 'seed': seed})}."
        "\nSame files and columns as the official GLUE release. Not comparable with GLUE numbers.\n")
    return root


# ------------------------------------------------------------------------------------------------
# the task adapter


class GlueData(OptionsModel):
    """A profile's `data:` block for the GLUE tasks (one block for all the tasks of a card)."""

    train_size: PositiveInt = Field(2000, description="micro: training examples the generator writes")
    dev_size: PositiveInt = Field(400, description="micro: examples of every dev file the generator writes")
    seed: NonNegInt = Field(2024, description="micro: generator seed")
    max_len: PositiveInt | None = Field(None, description="tokens per sequence or pair, longest first truncated "
                                                          "(null: 32 micro, 128 paper)")
    tokenizer: str | None = Field(None, description="paper: local folder with the model's tokenizer (relative: "
                                                    "under data_root); required there")
    holdout: NonNegInt = Field(0, description="the last N training examples become the `val` split (selection)")


class GlueTask(TaskAdapter):
    """One GLUE task. Subclasses set the folder, files, columns, labels and metrics."""

    Data = GlueData

    folder = ""            # GLUE folder name, e.g. "SST-2"
    hf_config = ""         # datasets config name, e.g. "sst2"
    columns: tuple = ()    # header names of the text columns (CoLA: by position)
    label_column = None    # header name of the label (None: last column)
    labels: tuple = ("0", "1")
    regression = False
    train_examples = 0     # the train split as distributed (GLUE benchmark / HF `glue`), examples (`bench plan`)
    dev_files = ("dev",)
    hf_dev = {"dev": "validation"}
    primary = "acc"
    columns_doc = ""
    skip_bad_lines = False
    model_config_overrides = {"num_labels": 2}   # what the classifier head needs (the card may override)

    MICRO_KEYS = ("train_size", "dev_size", "seed")   # the micro generator's settings (GlueData)

    def __init__(self, settings, data_root, profile, cache_dir):
        super().__init__(settings, data_root, profile, cache_dir)
        self._data = None
        self._tok = None

    # ---------------------------------------------------------------- where and how
    @property
    def layout(self) -> str:   # noqa: D401 - shown in errors
        files = "\n".join(f"  <data_root>/glue/{self.folder}/{f}.tsv" for f in ("train",) + tuple(self.dev_files))
        cols = self.columns_doc or next((line.split(".tsv", 1)[-1].strip() for line in __doc__.splitlines()
                                         if f"/glue/{self.folder}/" in line), "")
        return f"{files}\n  ({self.folder}: {cols}; the GLUE release of download_glue_data.py)"

    @property
    def max_len(self) -> int:
        v = self.settings.max_len
        return v if v is not None else (32 if self.profile == "micro" else 128)

    @property
    def micro_settings(self) -> dict:
        return {k: getattr(self.settings, k) for k in self.MICRO_KEYS}

    @property
    def root(self) -> Path:
        if self.profile == "paper":
            return self.data_root
        return micro_folder(self.cache_dir, f"glue_{self.folder.lower().replace('-', '')}",
                            {**self.micro_settings, "generator": GENERATOR_VERSION})

    @property
    def task_dir(self) -> Path:
        return self.root / "glue" / self.folder

    def tokenizer(self):
        if self._tok is not None:
            return self._tok
        if self.profile == "micro":
            self._tok = WordTokenizer()
            return self._tok
        name = self.settings.tokenizer
        if not name:
            raise BenchError(f"{self.name}: the paper profile needs `data.tokenizer`: a local folder with the "
                             "model's tokenizer files (bert-base-uncased: vocab.txt; roberta-base: vocab.json + "
                             "merges.txt). Nothing is downloaded at run time.")
        path = Path(name).expanduser()
        path = path if path.is_absolute() else self.data_root / path
        if not path.is_dir():
            raise MissingData("tokenizer folder", path,
                              "  <folder>/vocab.txt (+ tokenizer_config.json)   BERT\n"
                              "  <folder>/vocab.json, merges.txt               RoBERTa",
                              "Save the tokenizer there (tokenizer.save_pretrained(folder)) or set data.tokenizer.")
        from transformers import AutoTokenizer
        try:
            self._tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as e:  # noqa: BLE001 - any failure means an incomplete folder
            raise BenchError(f"cannot load a tokenizer from {path}: {e}")
        self._tok_path = path
        return self._tok

    def check_model(self, model) -> None:
        """Paper: the tokenizer's ids must fit the model's input embedding (BenchError naming both sizes)."""
        if self.profile == "paper":
            tok = self.tokenizer()
            check_vocab(tok, model, getattr(self, "_tok_path", "(tokenizer)"), f"{self.name} tokenizer")

    # ---------------------------------------------------------------- reading
    def prepare(self) -> None:
        if self._data is not None:
            return
        if self.profile == "micro":
            s = self.micro_settings
            generate_atomically(self.root, lambda tmp: generate_micro(tmp, self.folder, self.dev_files,
                                                                      s["train_size"], s["dev_size"], s["seed"]))
        raw = self._read_raw()
        holdout = self.settings.holdout
        if not 0 <= holdout < len(raw["train"]):
            raise BenchError(f"{self.name}: holdout {holdout} must be in [0, {len(raw['train'])})")
        if holdout:
            raw["val"] = raw["train"][-holdout:]
            raw["train"] = raw["train"][:-holdout]
        self._data = {k: self._encode(v) for k, v in raw.items()}

    def _read_raw(self) -> dict:
        d = self.task_dir
        if not d.is_dir():
            hf = self.data_root / "glue_hf" / self.hf_config
            if self.profile == "paper" and hf.is_dir():
                return self._read_hf(hf)
            raise MissingData(f"GLUE {self.folder} folder", d, self.layout,
                              "Run GLUE's download_glue_data.py into <data_root>/glue (data_root = --data-root or "
                              "BENCH_DATA), or save the `datasets` GLUE config with save_to_disk into "
                              f"<data_root>/glue_hf/{self.hf_config}. Nothing is downloaded at run time.")
        out = {}
        for split in ("train",) + tuple(self.dev_files):
            path = d / f"{split}.tsv"
            if not path.is_file():
                raise MissingData(f"GLUE {self.folder} file {path.name}", path, self.layout,
                                  "The GLUE folder is incomplete: re-extract the task's archive.")
            out[split] = self._parse(_read_tsv(path), path)
        return out

    def _parse(self, rows, path) -> list:
        if self.folder == "CoLA":   # no header: source, label, original label, sentence
            try:
                ex = [(r[3], None, r[1]) for r in rows]
            except IndexError:
                raise BenchError(f"{path}: CoLA lines have 4 tab-separated fields (source, label, original "
                                 "label, sentence)")
        else:
            ex = _by_header(rows, path, list(self.columns), self.label_column, self.skip_bad_lines)
        return [(a, b, self._label(lab, path)) for a, b, lab in ex]

    def _label(self, lab, path):
        if self.regression:
            return float(lab)
        lab = str(lab).strip()
        if lab not in self.labels:
            raise BenchError(f"{path}: label {lab!r} is not one of {list(self.labels)}")
        return self.labels.index(lab)

    def _read_hf(self, folder: Path) -> dict:
        try:
            from datasets import load_from_disk
        except ImportError:
            raise BenchError(f"{folder} is a `datasets` dump but the `datasets` package is not installed; "
                             "pip install datasets, or use the GLUE TSV folders.")
        dd = load_from_disk(str(folder))
        out = {}
        for split, hf_split in {"train": "train", **self.hf_dev}.items():
            ds = dd[hf_split]
            cols = [c for c in ds.column_names if c not in ("label", "idx")]
            feat = ds.features["label"]
            names = getattr(feat, "names", None)
            rows = []
            for ex in ds:
                lab = ex["label"]
                lab = float(lab) if self.regression else (names[lab] if names else str(lab))
                rows.append((ex[cols[0]], ex[cols[1]] if len(cols) > 1 else None,
                             lab if self.regression else self._label(lab, folder)))
            out[split] = rows
        return out

    def _encode(self, examples) -> dict:
        tok = self.tokenizer()
        if isinstance(tok, WordTokenizer):
            enc = [tok.encode(a, b, self.max_len) for a, b, _ in examples]
            ids, types = [e[0] for e in enc], [e[1] for e in enc]
            self.pad_id = tok.pad_id
        else:
            firsts = [a for a, _, _ in examples]
            seconds = [b for _, b, _ in examples]
            kw = dict(truncation=True, max_length=self.max_len)
            res = tok(firsts, seconds, **kw) if seconds and seconds[0] is not None else tok(firsts, **kw)
            ids = res["input_ids"]
            types = res.get("token_type_ids") or [[0] * len(x) for x in ids]
            self.pad_id = tok.pad_token_id
        dtype = torch.float32 if self.regression else torch.long
        return {"ids": ids, "types": types, "labels": torch.tensor([y for _, _, y in examples], dtype=dtype)}

    def split(self, split: str) -> dict:
        self.prepare()
        if split not in self._data:
            raise BenchError(f"{self.name} has splits {sorted(self._data)} (val only with a holdout), not {split!r}")
        return self._data[split]

    # ---------------------------------------------------------------- batches
    @property
    def train_size(self) -> int:
        return len(self.split("train")["ids"])

    def steps_per_epoch(self, batch_size: int, subset: float | None = None) -> int:
        n = self.train_size if subset is None else self.subset_size(subset)
        return max(1, n // int(batch_size))

    def subset_size(self, fraction: float) -> int:
        return max(1, int(round(float(fraction) * self.train_size)))

    def collate(self, data: dict, idx) -> dict:
        ids = [data["ids"][i] for i in idx]
        types = [data["types"][i] for i in idx]
        L = max(len(x) for x in ids)
        pad = getattr(self, "pad_id", 0)
        input_ids = torch.full((len(ids), L), pad, dtype=torch.long)
        tt = torch.zeros((len(ids), L), dtype=torch.long)
        att = torch.zeros((len(ids), L), dtype=torch.long)
        for j, (x, t) in enumerate(zip(ids, types)):
            input_ids[j, :len(x)] = torch.tensor(x)
            tt[j, :len(t)] = torch.tensor(t)
            att[j, :len(x)] = 1
        return {"input_ids": input_ids, "attention_mask": att, "token_type_ids": tt,
                "labels": data["labels"][torch.as_tensor(list(idx), dtype=torch.long)]}

    def train_batches(self, batch_size: int, seed: int, subset: float | None = None, subset_seed: int = 0,
                      recipe=None, shard=None):
        """Endless shuffled batches of the train split (`tasks.common.batching.micro_batches`; with `shard`,
        only this rank's are collated). `subset`: a fixed uniformly random fraction of the training examples
        (Fast-VTrans's 3 %), drawn with `subset_seed`."""
        data = self.split("train")
        n = len(data["ids"])
        pool = torch.arange(n)
        if subset is not None:
            g0 = torch.Generator().manual_seed(int(subset_seed))
            pool = torch.randperm(n, generator=g0)[: self.subset_size(subset)]
        for idx, _ in micro_batches(len(pool), batch_size, seed, shard):
            yield self.collate(data, pool[idx].tolist())

    # ---------------------------------------------------------------- model calls
    @staticmethod
    def model_inputs(model, batch, device) -> dict:
        kw = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}
        cfg = getattr(model, "config", None)
        if getattr(cfg, "type_vocab_size", 1) > 1:   # BERT has segment embeddings; RoBERTa has one type
            kw["token_type_ids"] = batch["token_type_ids"].to(device)
        return kw

    def forward(self, model, batch, device, output_hidden_states: bool = False) -> ModelOutput:
        return hf_forward(model, self.model_inputs(model, batch, device), output_hidden_states)

    def token_shape(self, batch) -> tuple:
        return token_shape(batch)

    def sequence_length(self) -> int:
        return int(self.max_len)

    def loss_from_output(self, out, batch, device) -> torch.Tensor:
        logits = out.logits if hasattr(out, "logits") else out
        labels = batch["labels"].to(device)
        if self.regression:
            return F.mse_loss(logits.view(-1).float(), labels.float())
        return F.cross_entropy(logits.float(), labels)

    def loss(self, model: nn.Module, batch, device, recipe=None) -> torch.Tensor:
        return self.loss_from_output(self.forward(model, batch, device), batch, device)

    @torch.no_grad()
    def predict(self, model, split: str, device) -> tuple:
        data = self.split(split)
        n = len(data["ids"])
        preds = []
        with eval_mode(model), torch.inference_mode():
            for i in range(0, n, EVAL_BATCH_SIZE):
                b = self.collate(data, range(i, min(n, i + EVAL_BATCH_SIZE)))
                logits = self.forward(model, b, device).logits.float().cpu()
                preds.append(logits.view(-1) if self.regression else logits.argmax(-1))
        if n == 0:
            raise BenchError(f"{self.name} {split} split is empty")
        return torch.cat(preds).numpy(), data["labels"].numpy()

    def score(self, pred, gold) -> dict:
        return {"acc": 100 * accuracy(pred, gold)}

    def evaluate(self, model: nn.Module, split: str = "dev", device="cpu") -> dict:
        pred, gold = self.predict(model, split, device)
        return {**self.score(pred, gold), "n": int(len(gold))}

    # ---------------------------------------------------------------- FLOPs / throughput
    def dummy_inputs(self, model_config: dict, batch_size: int, device) -> tuple:
        """(input_ids (B, max_len),): one full-length sequence per sample (a constant, valid token id)."""
        vocab = int(model_config.get("vocab_size", MICRO_VOCAB_SIZE))
        return (torch.full((batch_size, self.max_len), min(5, vocab - 1), dtype=torch.long, device=device),)

    def flops_forwards(self, model_config: dict, device) -> dict:
        return {f"inference: 1 sequence of {self.max_len} tokens (batch 1, no padding)":
                (self.dummy_inputs(model_config, 1, device), {})}

    def plan_train_forward(self, model_config: dict, device) -> tuple:
        """One sequence of max_len tokens: an upper bound, training pads to the batch's longest."""
        label, fw = next(iter(self.flops_forwards(model_config, device).items()))
        return f"{label}; upper bound: training pads to the batch's longest", fw

    def public_train_size(self, data: dict) -> tuple:
        """The distributed train split (`train_examples`) minus the cell's `holdout`."""
        if not self.train_examples:
            return super().public_train_size(data)
        hold = int(data.get("holdout", 0) or 0)
        n = self.train_examples - hold
        return n, True, f"GLUE {self.name[5:].upper()} train {self.train_examples:,}" + \
            (f" minus the holdout of {hold:,}" if hold else "")

    def fingerprint(self) -> dict:
        fp = {"task": self.name, "profile": self.profile, "layout_version": LAYOUT_VERSION,
              "max_len": self.max_len, "holdout": self.settings.holdout}
        if self.profile == "micro":
            fp.update(generator="tasks.glue.generate_micro", generator_version=GENERATOR_VERSION,
                      vocab_size=MICRO_VOCAB_SIZE, **self.micro_settings)
        else:
            fp.update(root=str(self.task_dir.resolve()), tokenizer=str(self.settings.tokenizer))
        return fp


@register_task("glue_cola")
class Cola(GlueTask):
    name, folder, hf_config = "glue_cola", "CoLA", "cola"
    train_examples = 8_551
    metrics = {"mcc": True}
    primary = "mcc"

    def score(self, pred, gold):
        return {"mcc": 100 * matthews_corr(pred, gold)}


@register_task("glue_sst2")
class Sst2(GlueTask):
    name, folder, hf_config = "glue_sst2", "SST-2", "sst2"
    train_examples = 67_349
    metrics = {"acc": True}
    columns, label_column = ("sentence",), "label"


@register_task("glue_mrpc")
class Mrpc(GlueTask):
    name, folder, hf_config = "glue_mrpc", "MRPC", "mrpc"
    train_examples = 3_668
    metrics = {"f1": True, "acc": True}
    columns, label_column = ("#1 String", "#2 String"), "Quality"
    primary = "f1"

    def score(self, pred, gold):
        return f1_and_accuracy(pred, gold)


@register_task("glue_stsb")
class Stsb(GlueTask):
    name, folder, hf_config = "glue_stsb", "STS-B", "stsb"
    train_examples = 5_749
    metrics = {"pearson": True, "spearman": True}
    columns, label_column = ("sentence1", "sentence2"), "score"
    regression = True
    primary = "pearson"
    model_config_overrides = {"num_labels": 1}

    def score(self, pred, gold):
        p, s = pearson_spearman(pred, gold)
        return {"pearson": 100 * p, "spearman": 100 * s}


@register_task("glue_qqp")
class Qqp(GlueTask):
    name, folder, hf_config = "glue_qqp", "QQP", "qqp"
    train_examples = 363_846
    metrics = {"f1": True, "acc": True}
    columns, label_column = ("question1", "question2"), "is_duplicate"
    skip_bad_lines = True
    primary = "f1"

    def score(self, pred, gold):
        return f1_and_accuracy(pred, gold)


@register_task("glue_mnli")
class Mnli(GlueTask):
    """MNLI: `dev` evaluates dev_matched (acc_m) and dev_mismatched (acc_mm)."""
    name, folder, hf_config = "glue_mnli", "MNLI", "mnli"
    train_examples = 392_702
    metrics = {"acc_m": True, "acc_mm": True}
    columns, label_column = ("sentence1", "sentence2"), "gold_label"
    labels = ("contradiction", "entailment", "neutral")
    dev_files = ("dev_matched", "dev_mismatched")
    columns_doc = "header: index promptID pairID genre ... sentence1 sentence2 label1 [label2..label5] gold_label"
    hf_dev = {"dev_matched": "validation_matched", "dev_mismatched": "validation_mismatched"}
    primary = "acc_m"
    model_config_overrides = {"num_labels": 3}

    def evaluate(self, model, split="dev", device="cpu"):
        if split == "dev":
            m = self.evaluate(model, "dev_matched", device)
            mm = self.evaluate(model, "dev_mismatched", device)
            return {"acc_m": m["acc"], "acc_mm": mm["acc"], "n": m["n"] + mm["n"]}
        pred, gold = self.predict(model, split, device)
        acc = 100 * accuracy(pred, gold)
        return {"acc": acc, "acc_m": acc, "n": int(len(gold))}


@register_task("glue_qnli")
class Qnli(GlueTask):
    name, folder, hf_config = "glue_qnli", "QNLI", "qnli"
    train_examples = 104_743
    metrics = {"acc": True}
    columns, label_column = ("question", "sentence"), "label"
    labels = ("entailment", "not_entailment")


@register_task("glue_rte")
class Rte(GlueTask):
    name, folder, hf_config = "glue_rte", "RTE", "rte"
    train_examples = 2_490
    metrics = {"acc": True}
    columns, label_column = ("sentence1", "sentence2"), "label"
    labels = ("entailment", "not_entailment")
