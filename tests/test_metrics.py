"""The metric registry (metrics.METRICS): every metric a card names is declared once with its direction, a
card that says the other way round is one line naming the card, the metric and the fix, and the metric
functions moved out of the tasks give the values they gave there."""
from __future__ import annotations

import math

import pytest
import torch

from bench.cards import load_card, parse_card, table_names, validate_card
from bench.errors import BenchError
from bench.registry import TASKS
from bench.schema import Metric, metric_direction_errors
from metrics import METRICS, MetricInfo, register_metric
from metrics.glue import accuracy, f1_and_accuracy, f1_binary, matthews_corr, pearson_spearman
from metrics.retrieval import recall_at_k
from metrics.segmentation import IGNORE_INDEX, confusion_matrix, segmentation_metrics
from tests.test_card_schema import _copy, _fails, _write




# ------------------------------------------------------------------------------------------- the registry

def test_every_card_metric_is_declared_with_the_cards_direction():
    names = table_names()
    assert len(names) >= 15
    for name in names:
        for m in load_card(name)["metrics"]:
            assert m["name"] in METRICS, f"{name}: metric {m['name']!r} is not in metrics.METRICS"
            assert METRICS[m["name"]].higher_is_better == m["higher_is_better"], (name, m["name"])


def test_every_task_metric_is_declared_with_the_tasks_direction():
    for t in TASKS.names():
        for name, hib in TASKS.get(t).metrics.items():
            assert name in METRICS, f"task {t}: metric {name!r} is not in metrics.METRICS"
            assert METRICS[name].higher_is_better == hib, (t, name)


def test_entries_are_small_dataclasses_with_a_one_line_description():
    assert METRICS["ppl"] == MetricInfo(False, METRICS["ppl"].description)
    assert not METRICS["nll"].higher_is_better and METRICS["miou"].higher_is_better and METRICS["CIDEr"].higher_is_better
    for name, info in METRICS.items():
        assert isinstance(info.higher_is_better, bool) and info.description and "\n" not in info.description, name


def test_register_metric_refuses_a_second_direction():
    assert register_metric("top1", True, "top-1 classification accuracy, %") == METRICS["top1"]   # the same: fine
    with pytest.raises(BenchError, match="'top1' is already declared with higher_is_better=True"):
        register_metric("top1", False, "x")
    assert METRICS["top1"].higher_is_better


# ------------------------------------------------------------------------------------------- the card check

def test_a_card_with_perplexity_higher_is_better_is_one_line(own_cards, capsys, tmp_path):
    card = _copy("vtrans_gpt2", "bad_ppl")
    assert card["metrics"][0]["name"] == "ppl"
    card["metrics"][0]["higher_is_better"] = True
    name = _write(own_cards, card)
    errs = validate_card(load_card(name))
    assert errs == ["metrics[0].higher_is_better: metric 'ppl' (perplexity: exp(mean next-token negative "
                    "log-likelihood)) is lower is better: set higher_is_better: false"]
    with pytest.raises(BenchError) as e:
        parse_card(load_card(name))
    assert str(e.value).startswith("table card ") and "bad_ppl.yaml: metrics[0].higher_is_better" in str(e.value)
    assert "\n" not in str(e.value)
    # the CLI: exit 2, one line naming the card, the metric and the fix, nothing run or written
    _fails(capsys, ["run", "--table", name, "--methods", "dense"], "bad_ppl.yaml", "metrics[0].higher_is_better",
           "'ppl'", "set higher_is_better: false", out_dir=tmp_path / "out")


def test_a_card_with_top1_lower_is_better_is_refused(own_cards):
    card = _copy("upop_deit", "bad_top1")
    card["metrics"][1]["higher_is_better"] = False
    errs = validate_card(load_card(_write(own_cards, card)))
    assert len(errs) == 1 and errs[0].startswith("metrics[1].higher_is_better: metric 'top5'")
    assert errs[0].endswith("set higher_is_better: true")


def test_an_unknown_metric_name_is_one_line(own_cards):
    card = _copy("vtrans_gpt2", "bad_name")
    card["metrics"][1]["name"] = "perplexity"
    errs = validate_card(load_card(_write(own_cards, card)))
    assert len(errs) == 1 and errs[0].startswith("metrics[1].name: task wikitext2_ppl does not compute 'perplexity'")
    # a metric a (plugin) task computes but nobody declared: the registry's own line, with the fix
    errs = metric_direction_errors(Metric(name="my_score", split="test", higher_is_better=True), "metrics[0]")
    assert len(errs) == 1 and "unknown metric 'my_score'" in errs[0]
    assert "metrics.register_metric(name, higher_is_better, description)" in errs[0] and "\n" not in errs[0]


# ------------------------------------------------------------------------------------------- moved functions

def test_the_tasks_use_the_moved_functions():
    import tasks.ade20k as ade
    import tasks.glue as glue
    import tasks.retrieval as retrieval
    assert ade.confusion_matrix is confusion_matrix and ade.segmentation_metrics is segmentation_metrics
    assert ade.IGNORE_INDEX == IGNORE_INDEX == 255
    assert glue.matthews_corr is matthews_corr and glue.pearson_spearman is pearson_spearman
    assert glue.accuracy is accuracy and glue.f1_and_accuracy is f1_and_accuracy
    assert retrieval.recall_at_k is recall_at_k


def test_miou_of_a_hand_made_two_class_confusion():
    cm = torch.tensor([[3, 1], [2, 4]])          # rows = ground truth, columns = prediction
    m = segmentation_metrics(cm)
    iou = [3 / (3 + 1 + 2), 4 / (4 + 2 + 1)]
    assert m["per_class_iou"] == pytest.approx([100 * v for v in iou])
    assert m["miou"] == pytest.approx(100 * sum(iou) / 2)          # 53.571428...
    assert m["pixel_acc"] == pytest.approx(70.0)
    # the same confusion from pixels, with ignore pixels that count nowhere
    gt = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1, 1, IGNORE_INDEX, IGNORE_INDEX])
    pred = torch.tensor([0, 0, 0, 1, 0, 0, 1, 1, 1, 1, 0, 1])
    assert torch.equal(confusion_matrix(pred, gt, 2), cm)
    # a class neither in the ground truth nor predicted is undefined: left out of the mean, None per class
    m3 = segmentation_metrics(torch.tensor([[3, 1, 0], [2, 4, 0], [0, 0, 0]]))
    assert m3["miou"] == pytest.approx(m["miou"]) and m3["per_class_iou"][2] is None
    with pytest.raises(BenchError, match="label 2 outside 0..1"):
        confusion_matrix(torch.tensor([0]), torch.tensor([2]), 2)


def test_glue_metrics_on_a_small_exact_example():
    pred, gold = [1, 1, 0, 0, 1, 0], [1, 0, 0, 1, 1, 0]          # tp 2, fp 1, fn 1, tn 2
    assert accuracy(pred, gold) == pytest.approx(4 / 6)
    assert f1_binary(pred, gold) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert f1_and_accuracy(pred, gold) == pytest.approx({"f1": 100 * 2 / 3, "acc": 100 * 4 / 6})
    assert matthews_corr(pred, gold) == pytest.approx((2 * 2 - 1 * 1) / math.sqrt(3 * 3 * 3 * 3))
    assert math.isnan(accuracy([], []))
    p, s = pearson_spearman([1, 2, 3, 10], [1, 2, 3, 4])
    assert s == pytest.approx(1.0) and p == pytest.approx(0.8854377448471463)


def test_recall_at_k_on_a_small_exact_example():
    # 2 images x 4 captions (captions 0, 1 of image 0; 2, 3 of image 1)
    i2t = [[0.9, 0.1, 0.8, 0.0],        # image 0: its best caption (0) first -> rank 0
           [0.7, 0.6, 0.5, 0.2]]        # image 1: its best caption (2) third -> rank 2
    t2i = [[0.9, 0.1], [0.2, 0.3], [0.1, 0.8], [0.6, 0.4]]     # caption 1 and 3 rank their image second
    r = recall_at_k(i2t, t2i, txt2img=[0, 0, 1, 1], img2txt=[[0, 1], [2, 3]])
    assert (r["txt_r1"], r["txt_r5"], r["txt_r10"]) == (50.0, 100.0, 100.0)
    assert (r["img_r1"], r["img_r5"], r["img_r10"]) == (50.0, 100.0, 100.0)
    assert r["txt_r_mean"] == pytest.approx(250 / 3) and r["r_mean"] == pytest.approx(250 / 3)
