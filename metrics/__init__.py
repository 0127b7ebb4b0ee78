"""Every metric a task reports and a card may name, declared once.

    METRICS[name] -> MetricInfo(higher_is_better, description)

The card schema checks each card metric against it (bench.schema.check_against_registry): an unknown name
or a `higher_is_better` the other way round (e.g. `true` for perplexity) is a card error naming the metric
and the fix. The names are the keys the tasks' `evaluate` returns (and their `metrics` dicts list); a
plugin task with a metric of its own declares it with `register_metric(name, higher_is_better, description)`.

The metric functions live by concern: `metrics.segmentation` (confusion matrix, mIoU, pixel accuracy),
`metrics.glue` (GLUE's official accuracy / F1 / Matthews / Pearson / Spearman), `metrics.retrieval`
(BLIP's image-text recall@K). Metrics tied to one task's protocol stay with it: VQA accuracy (tasks.vqa),
the pycocoevalcap caption scores (tasks.caption), perplexity (tasks.lm_perplexity).
"""
from __future__ import annotations

from dataclasses import dataclass

from bench.errors import BenchError


@dataclass(frozen=True)
class MetricInfo:
    higher_is_better: bool
    description: str


METRICS: dict[str, MetricInfo] = {}


def register_metric(name: str, higher_is_better: bool, description: str) -> MetricInfo:
    """Declare a metric (once: declaring a name again with another direction is an error)."""
    info = MetricInfo(bool(higher_is_better), description)
    old = METRICS.get(name)
    if old is not None and old.higher_is_better != info.higher_is_better:
        raise BenchError(f"metric {name!r} is already declared with higher_is_better={old.higher_is_better} "
                         f"({old.description}); a metric has one direction")
    METRICS[name] = info
    return info


for _name, _up, _desc in (
    # classification (ImageNet, CIFAR-10)
    ("top1", True, "top-1 classification accuracy, %"),
    ("top5", True, "top-5 classification accuracy, %"),
    # semantic segmentation (ADE20K)
    ("miou", True, "mean IoU over the classes, single-scale sliding-window evaluation, %"),
    ("miou_ms", True, "mean IoU over the classes, multi-scale + flip evaluation, %"),
    ("pixel_acc", True, "pixel accuracy, single scale, %"),
    # GLUE
    ("acc", True, "accuracy, % (GLUE SST-2/MRPC/QQP/QNLI/RTE; NLVR2 on the evaluated split)"),
    ("acc_m", True, "MNLI accuracy on dev-matched, %"),
    ("acc_mm", True, "MNLI accuracy on dev-mismatched, %"),
    ("f1", True, "F1 of the positive class, % (MRPC, QQP)"),
    ("mcc", True, "Matthews correlation x 100 (CoLA)"),
    ("pearson", True, "Pearson correlation x 100 (STS-B)"),
    ("spearman", True, "Spearman rank correlation x 100 (STS-B)"),
    # vision-language
    ("dev_acc", True, "NLVR2 accuracy on dev, %"),
    ("test_acc", True, "NLVR2 accuracy on test-P, %"),
    ("vqa_acc", True, "VQA accuracy (vqaEval: min(1, matching human answers / 3), 10 leave-one-out subsets), %"),
    ("CIDEr", True, "CIDEr-D x 100 (pycocoevalcap)"),
    ("Bleu_4", True, "BLEU-4 x 100 (pycocoevalcap)"),
    ("METEOR", True, "METEOR x 100 (pycocoevalcap)"),
    ("ROUGE_L", True, "ROUGE-L x 100 (pycocoevalcap)"),
    ("SPICE", True, "SPICE x 100 (pycocoevalcap; needs Stanford CoreNLP and java)"),
    ("txt_r1", True, "image-to-text retrieval recall@1, %"),
    ("txt_r5", True, "image-to-text retrieval recall@5, %"),
    ("txt_r10", True, "image-to-text retrieval recall@10, %"),
    ("img_r1", True, "text-to-image retrieval recall@1, %"),
    ("img_r5", True, "text-to-image retrieval recall@5, %"),
    ("img_r10", True, "text-to-image retrieval recall@10, %"),
    ("r_mean", True, "mean of the six retrieval recalls (txt_r1/5/10, img_r1/5/10), %"),
    # language modelling
    ("ppl", False, "perplexity: exp(mean next-token negative log-likelihood)"),
    ("nll", False, "mean next-token negative log-likelihood, nats"),
):
    register_metric(_name, _up, _desc)
del _name, _up, _desc
