"""GLUE's official metric definitions (the GLUE benchmark's, as scikit-learn / scipy compute them): accuracy,
F1 of the positive class, Matthews correlation, Pearson and Spearman correlation. They return fractions
(tasks.glue reports x 100), except f1_and_accuracy: MRPC's and QQP's pair, already in percent."""
from __future__ import annotations

import math

import numpy as np


def accuracy(pred, gold) -> float:
    pred, gold = np.asarray(pred), np.asarray(gold)
    return float((pred == gold).mean()) if len(gold) else float("nan")


def f1_and_accuracy(pred, gold) -> dict:
    """MRPC's and QQP's pair of metrics, x100."""
    return {"f1": 100 * f1_binary(pred, gold), "acc": 100 * accuracy(pred, gold)}


def f1_binary(pred, gold) -> float:
    """F1 of the positive class (label 1), as GLUE reports for MRPC and QQP (0 when nothing is positive)."""
    pred, gold = np.asarray(pred), np.asarray(gold)
    tp = float(((pred == 1) & (gold == 1)).sum())
    fp = float(((pred == 1) & (gold == 0)).sum())
    fn = float(((pred == 0) & (gold == 1)).sum())
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def matthews_corr(pred, gold) -> float:
    """Matthews correlation of binary predictions (0 when a margin is empty, as scikit-learn)."""
    pred, gold = np.asarray(pred), np.asarray(gold)
    tp = float(((pred == 1) & (gold == 1)).sum())
    tn = float(((pred == 0) & (gold == 0)).sum())
    fp = float(((pred == 1) & (gold == 0)).sum())
    fn = float(((pred == 0) & (gold == 1)).sum())
    den = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / den if den else 0.0


def pearson_spearman(pred, gold) -> tuple:
    from scipy.stats import pearsonr, spearmanr
    pred, gold = np.asarray(pred, dtype=np.float64), np.asarray(gold, dtype=np.float64)
    if len(gold) < 2 or pred.std() == 0 or gold.std() == 0:
        return float("nan"), float("nan")   # undefined (constant predictions): reported missing, never 0
    return float(pearsonr(pred, gold)[0]), float(spearmanr(pred, gold)[0])
