"""WikiText-2 perplexity: the window protocol (count, remainder dropped, no overlap), the NLL by hand,
the datasets-style join of the raw file, presets, clear errors, and the micro corpus on tiny models."""
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from bench.errors import MissingData
from bench.registry import TASKS
from tasks.lm_perplexity import (LLAMA2_7B_DENSE_PPL, MICRO_VOCAB_SIZE, join_rows, perplexity, random_windows,
                                 raw_rows, window_nll, windows)
from tests.conftest import build


def test_windows_count_remainder_and_no_overlap():
    ids = torch.arange(103)
    w = windows(ids, 10)
    assert w.shape == (10, 10)                       # 103 // 10 windows, the last 3 tokens dropped
    assert torch.equal(w.reshape(-1), ids[:100])     # consecutive and disjoint: no overlap, no gap
    assert windows(torch.arange(20), 10).shape == (2, 10)
    r = random_windows(ids, 10, 5, seed=3)
    assert r.shape == (5, 10) and torch.equal(r, random_windows(ids, 10, 5, seed=3))
    assert all(torch.equal(row, torch.arange(int(row[0]), int(row[0]) + 10)) for row in r)


class Bigram(nn.Module):
    """logits[t] = table[token t]: a model whose NLL can be computed by hand."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def forward(self, x):
        return self.table[x]


def test_perplexity_is_exp_mean_nll_over_predicted_tokens():
    V = 7
    uniform = Bigram(torch.zeros(V, V))
    ids = torch.randint(0, V, (3, 12))
    assert perplexity(uniform, ids, "cpu", batch_size=2)["ppl"] == pytest.approx(V)
    torch.manual_seed(0)
    table = torch.randn(V, V)
    wins = torch.randint(0, V, (4, 6))
    res = perplexity(Bigram(table), wins, "cpu", batch_size=3)
    logp = torch.log_softmax(table, -1)
    nll = [-float(logp[w[t], w[t + 1]]) for w in wins for t in range(5)]
    assert res["predicted_tokens"] == 4 * 5 == len(nll)
    assert res["nll"] == pytest.approx(sum(nll) / len(nll), rel=1e-5)
    assert res["ppl"] == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-5)
    s, c = window_nll(table[wins], wins)
    assert c == 20 and s == pytest.approx(sum(nll), rel=1e-5)


def test_rows_and_join_follow_the_datasets_protocol(tmp_path):
    f = tmp_path / "wiki.test.raw"
    f.write_text(" \n = Robert Boulter = \n \n Robert Boulter is an actor . \n")
    rows = raw_rows(f)
    assert rows == ["", " = Robert Boulter = \n", "", " Robert Boulter is an actor . \n"]
    assert join_rows(rows) == "\n\n = Robert Boulter = \n" + "\n\n" + "\n\n" + " Robert Boulter is an actor . \n"


def test_presets_references_and_missing_file(tmp_path):
    T = TASKS.get("wikitext2_ppl")
    assert T({"preset": "gptq"}, tmp_path, "paper", tmp_path).seq_len == 2048
    assert T({"preset": "wanda"}, tmp_path, "paper", tmp_path).seq_len == 4096
    assert T({"preset": "llm_pruner"}, tmp_path, "paper", tmp_path).seq_len == 128
    assert T({"preset": "gptq", "seq_len": 1024}, tmp_path, "paper", tmp_path).seq_len == 1024
    assert LLAMA2_7B_DENSE_PPL == {2048: 5.47, 4096: 5.12}
    t = T({"preset": "gptq", "tokenizer": "tok"}, tmp_path, "paper", tmp_path)
    with pytest.raises(MissingData) as e:
        t.prepare()
    assert str(tmp_path / "wikitext-2-raw" / "wiki.test.raw") in str(e.value) and "wikitext-2-raw-v1" in str(e.value)
    (x,) = t.dummy_inputs({"vocab_size": 32000}, 1, "meta")          # FLOPs input: no data needed
    assert x.shape == (1, 2048) and x.is_meta
    assert next(iter(t.flops_forwards({"vocab_size": 32000}, "meta"))).startswith("inference")


@pytest.mark.parametrize("arch", ["gpt2_micro", "llama_micro"])
def test_micro_corpus_on_tiny_models(arch):
    task = TASKS.get("wikitext2_ppl")({"train_tokens": 3000, "eval_tokens": 700, "seq_len": 32}, None, "micro",
                                      Path(__import__("os").environ["BENCH_CACHE"]))
    task.prepare()
    n_test = task.ids("test").numel()
    assert task.eval_windows().shape == (n_test // 32, 32)
    assert task.train_size == task.ids("train").numel() // 32
    torch.manual_seed(0)
    adapter, model = build(arch, vocab_size=MICRO_VOCAB_SIZE)
    res = task.evaluate(model, "test", "cpu")
    assert res["windows"] == n_test // 32 and res["predicted_tokens"] == res["windows"] * 31
    # an untrained model is near uniform over the vocabulary; a few steps of training lower it
    assert 0.3 * MICRO_VOCAB_SIZE < res["ppl"] < 3 * MICRO_VOCAB_SIZE
    from bench.training import train
    train(model, task, epochs=4, lr=3e-3, batch_size=8, device="cpu", seed=0)
    assert task.evaluate(model, "test", "cpu")["ppl"] < 0.5 * res["ppl"]
    # calibration windows from the train split: size and seed in the fingerprint
    calib = TASKS.get("wikitext2_ppl")({"train_tokens": 3000, "eval_tokens": 700, "seq_len": 32,
                                        "calib_samples": 16, "calib_seed": 5}, None, "micro",
                                       Path(__import__("os").environ["BENCH_CACHE"]))
    assert calib.train_size == 16
    assert calib.fingerprint()["calib_samples"] == 16 and calib.fingerprint()["calib_seed"] == 5
