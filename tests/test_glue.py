"""GLUE: official metrics on known cases, the official TSV formats, clear errors, and the micro tasks."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.errors import MissingData
from bench.registry import TASKS
from metrics.glue import accuracy, f1_binary, matthews_corr, pearson_spearman
from tasks.glue import MICRO_VOCAB_SIZE, WordTokenizer
from tests.conftest import build

GLUE = ["glue_cola", "glue_sst2", "glue_mrpc", "glue_stsb", "glue_qqp", "glue_mnli", "glue_qnli", "glue_rte"]


def test_metrics_on_known_cases():
    pred, gold = [1, 1, 1, 0, 0], [1, 1, 0, 0, 1]        # tp 2, fp 1, fn 1, tn 1
    assert accuracy(pred, gold) == pytest.approx(3 / 5)
    assert f1_binary(pred, gold) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert matthews_corr(pred, gold) == pytest.approx((2 * 1 - 1 * 1) / math.sqrt(3 * 3 * 2 * 2))
    assert matthews_corr([1, 0, 1, 0], [1, 0, 1, 0]) == pytest.approx(1.0)
    assert matthews_corr([0, 1, 0, 1], [1, 0, 1, 0]) == pytest.approx(-1.0)
    assert matthews_corr([1, 1, 1, 1], [1, 0, 1, 0]) == 0.0            # an empty margin: 0 (scikit-learn)
    assert f1_binary([0, 0], [1, 0]) == 0.0
    p, s = pearson_spearman([1, 2, 3, 4], [2, 4, 6, 8])
    assert p == pytest.approx(1.0) and s == pytest.approx(1.0)
    p, s = pearson_spearman([1, 2, 3, 10], [1, 2, 3, 4])               # monotone, not linear
    assert s == pytest.approx(1.0) and p < 0.95
    assert p == pytest.approx(np.corrcoef([1, 2, 3, 10], [1, 2, 3, 4])[0, 1])
    assert all(math.isnan(v) for v in pearson_spearman([1, 1, 1], [1, 2, 3]))   # undefined, never 0


def _write(path: Path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_reads_the_official_formats(tmp_path):
    g = tmp_path / "glue"
    # CoLA: no header; a quote inside the sentence must not start a quoted field
    _write(g / "CoLA" / "train.tsv", 'gj04\t1\t\tOur friends won\'t buy this "analysis".\ngj04\t0\t*\tOne more pseudo.\n')
    _write(g / "CoLA" / "dev.tsv", "gj04\t1\t\tThe sailors rode the breeze clear.\n")
    _write(g / "MRPC" / "train.tsv", "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t7\t8\tHe said \"yes\" .\tHe agreed .\n")
    _write(g / "MRPC" / "dev.tsv", "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n0\t1\t2\tA .\tB .\n")
    # QQP: a line with missing fields is skipped (as the reference processor does)
    head = "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
    _write(g / "QQP" / "train.tsv", head + "1\t2\t3\tWhy?\tHow?\t0\n9\t9\tbroken line\n4\t5\t6\tA?\tA?\t1\n")
    _write(g / "QQP" / "dev.tsv", head + "1\t2\t3\tQ?\tR?\t1\n")
    mh = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
          "sentence2_parse\tsentence1\tsentence2")
    _write(g / "MNLI" / "train.tsv", mh + "\tlabel1\tgold_label\n0\t1\t1n\tgov\t(\t(\t(\t(\tP one .\tH one .\tneutral\tneutral\n")
    for f in ("dev_matched", "dev_mismatched"):
        _write(g / "MNLI" / f"{f}.tsv", mh + "\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label\n"
               "0\t1\t1e\tfiction\t(\t(\t(\t(\tP .\tH .\tentailment\tneutral\tentailment\tentailment\tentailment\tentailment\n")
    sh = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    _write(g / "STS-B" / "train.tsv", sh + "0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\tA plane .\tAn air plane .\t5.000\n")
    _write(g / "STS-B" / "dev.tsv", sh + "0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\tA man .\tA dog .\t0.500\n")
    cache = tmp_path / "cache"
    cola = TASKS.get("glue_cola")({"tokenizer": "unused"}, tmp_path, "paper", cache)
    raw = cola._read_raw()
    assert raw["train"] == [('Our friends won\'t buy this "analysis".', None, 1), ("One more pseudo.", None, 0)]
    mrpc = TASKS.get("glue_mrpc")({}, tmp_path, "paper", cache)._read_raw()
    assert mrpc["train"] == [('He said "yes" .', "He agreed .", 1)]
    qqp = TASKS.get("glue_qqp")({}, tmp_path, "paper", cache)._read_raw()
    assert qqp["train"] == [("Why?", "How?", 0), ("A?", "A?", 1)]
    mnli = TASKS.get("glue_mnli")({}, tmp_path, "paper", cache)._read_raw()
    assert mnli["train"] == [("P one .", "H one .", 2)]                 # contradiction, entailment, neutral
    assert mnli["dev_matched"] == [("P .", "H .", 1)] and set(mnli) == {"train", "dev_matched", "dev_mismatched"}
    stsb = TASKS.get("glue_stsb")({}, tmp_path, "paper", cache)._read_raw()
    assert stsb["dev"] == [("A man .", "A dog .", 0.5)]


def test_missing_glue_folder_and_file_are_clear(tmp_path):
    t = TASKS.get("glue_rte")({"tokenizer": "tok"}, tmp_path, "paper", tmp_path / "cache")
    with pytest.raises(MissingData) as e:
        t.prepare()
    msg = str(e.value)
    assert str(tmp_path / "glue" / "RTE") in msg and "RTE/dev.tsv" in msg and "download_glue_data.py" in msg
    _write(tmp_path / "glue" / "RTE" / "train.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n")
    with pytest.raises(MissingData, match="dev.tsv"):
        t.prepare()
    _write(tmp_path / "glue" / "RTE" / "dev.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n")
    with pytest.raises(MissingData, match="tokenizer folder"):      # paper profile: a local tokenizer is needed
        t.prepare()


def test_word_tokenizer_pairs_and_truncation():
    tok = WordTokenizer()
    ids, types = tok.encode("the movie is good .", "the film is bad .", 9)
    assert ids[0] == tok.cls_id and ids.count(tok.sep_id) == 2 and len(ids) == 9
    assert types == [0] * (ids.index(tok.sep_id) + 1) + [1] * (9 - ids.index(tok.sep_id) - 1)
    assert tok.ids("zzz") == [tok.unk_id]


@pytest.mark.parametrize("name", GLUE)
def test_micro_tasks_generate_and_evaluate(name):
    task = TASKS.get(name)({"train_size": 60, "dev_size": 20}, None, "micro", Path(__import__("os").environ["BENCH_CACHE"]))
    task.prepare()
    nl = task.model_config_overrides["num_labels"]
    adapter, model = build("bert_micro", vocab_size=MICRO_VOCAB_SIZE, num_labels=nl)
    batch = next(task.train_batches(8, 0))
    assert batch["input_ids"].max() < MICRO_VOCAB_SIZE
    loss = task.loss(model, batch, "cpu")
    assert torch.isfinite(loss)
    res = task.evaluate(model, "dev", "cpu")
    assert set(task.metrics) <= set(res)
    assert res["n"] == (40 if name == "glue_mnli" else 20)
    (x,) = task.dummy_inputs({"vocab_size": MICRO_VOCAB_SIZE}, 2, "cpu")
    assert x.shape == (2, task.max_len)
    # a subset of 10% of 60 = 6 examples, batch 3: two steps per epoch
    assert task.steps_per_epoch(3, subset=0.1) == 2


def test_micro_sst2_is_learnable():
    from bench.training import train
    task = TASKS.get("glue_sst2")({"train_size": 1000, "dev_size": 200}, None, "micro",
                                  Path(__import__("os").environ["BENCH_CACHE"]))
    torch.manual_seed(0)
    adapter, model = build("bert_micro", vocab_size=MICRO_VOCAB_SIZE)
    train(model, task, epochs=6, lr=1e-3, batch_size=32, device="cpu", seed=0, warmup_epochs=0.5)
    assert task.evaluate(model, "dev", "cpu")["acc"] > 65.0     # chance is 50 (negation and contrast decide)
