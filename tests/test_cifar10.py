"""CIFAR-10 task: micro data in the pickle layout (read by torchvision's reader), splits, missing data."""
import pickle

import pytest
import torch

from bench.errors import MissingData
from tasks.cifar10 import BASE, TRAIN_FILES, Cifar10Task


def _task(tmp_path, profile="micro", **s):
    return Cifar10Task({"train_per_class": 12, "test_per_class": 4, "holdout_per_class": 2, **s},
                       tmp_path / "data", profile, tmp_path / "cache")


def test_micro_layout_splits_and_batches(tmp_path):
    t = _task(tmp_path)
    t.prepare()
    d = t.root / BASE
    for f in TRAIN_FILES + ("test_batch", "batches.meta"):
        assert (d / f).is_file()
    with open(d / "data_batch_1", "rb") as f:
        b = pickle.load(f, encoding="latin1")     # as torchvision reads the release
    assert b["data"].dtype.name == "uint8" and b["data"].shape[1] == 3072
    assert not list(t.root.parent.glob(".*tmp*"))                     # atomic: no leftovers
    assert t.train_size == 120 - 20 and t.split("val")[1].numel() == 20 and t.split("test")[1].numel() == 40
    x, y = next(t.train_batches(16, 0))
    assert x.shape == (16, 3, 32, 32) and y.shape == (16,)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    r = t.evaluate(model, "test")
    assert r["n"] == 40 and 0 <= r["top1"] <= 100
    assert t.dummy_inputs({"img_size": 48}, 2, "cpu")[0].shape == (2, 3, 48, 48)
    again = _task(tmp_path)                                           # cached folder reused, same data
    assert torch.equal(again.split("test")[0], t.split("test")[0])


def test_missing_paper_data_names_path_and_layout(tmp_path):
    t = _task(tmp_path, profile="paper")
    with pytest.raises(MissingData) as e:
        t.prepare()
    msg = str(e.value)
    assert str(tmp_path / "data" / "cifar10") in msg and "data_batch_1" in msg and "batches.meta" in msg
