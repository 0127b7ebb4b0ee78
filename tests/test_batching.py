"""Per-rank data loading (tasks.common.batching): under data parallelism a rank makes only its own
micro-batches, and each is exactly the micro-batch of the one-process stream (same samples, same
augmentation draws), so an optimizer step on N ranks sees what one process with that micro-batch sees."""
from __future__ import annotations

import itertools

import pytest
import torch

from bench.recipe import TrainRecipe
from tasks.common.batching import batch_seed, micro_batches
from tests.test_imagenet import write_folder


def interleave(streams, n):
    """Micro-batches 0..n-1 of the global stream, taken from the ranks' streams in turn (i mod world)."""
    its = [iter(s) for s in streams]
    return [next(its[i % len(its)]) for i in range(n)]


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def test_micro_batches_are_one_global_order_cut_by_rank():
    whole = list(itertools.islice(micro_batches(10, 3, seed=5), 9))        # 3 batches per epoch, 3 epochs
    assert all(len(i) == 3 for i, _ in whole)
    for e in range(3):                                                      # each epoch: no sample twice
        idx = torch.cat([i for i, _ in whole[3 * e:3 * e + 3]])
        assert len(set(idx.tolist())) == 9
    assert [s for _, s in whole] == [batch_seed(5, k) for k in range(9)]
    ranks = [micro_batches(10, 3, seed=5, shard=(r, 2)) for r in range(2)]
    assert same(interleave(ranks, 9), whole)
    with pytest.raises(ValueError, match="0 <= rank < world"):
        next(micro_batches(10, 3, seed=5, shard=(2, 2)))


def _imagenet_micro(tmp_path):
    from tasks.imagenet import ImageNetTask
    return ImageNetTask({"num_classes": 3, "train_per_class": 8, "val_per_class": 2, "image_size": 32, "seed": 7},
                        None, "micro", tmp_path / "cache"), TrainRecipe(epochs=1, lr=1e-3, batch_size=4, mixup=0.8)


def _imagenet_paper(tmp_path, workers=0):
    from tasks.imagenet import ImageNetTask
    write_folder(tmp_path / "imagenet", ["n01440764", "n01443537", "n01484850"], per_class=3)
    return (ImageNetTask({"workers": workers, "image_size": 32}, tmp_path, "paper", tmp_path / "cache"),
            TrainRecipe(epochs=1, lr=1e-3, batch_size=4, auto_augment="rand-m9-mstd0.5-inc1", reprob=0.25))


def _cifar10(tmp_path):
    from tasks.cifar10 import Cifar10Task
    return (Cifar10Task({"train_per_class": 6, "test_per_class": 2, "holdout_per_class": 1}, tmp_path / "data",
                        "micro", tmp_path / "cache"), TrainRecipe(epochs=1, lr=1e-3, batch_size=4, reprob=0.5))


def _nlvr2(tmp_path):
    from tasks.nlvr2 import Nlvr2Task
    return (Nlvr2Task({"train_pairs": 16, "dev_pairs": 8, "test_pairs": 8}, tmp_path, "micro", tmp_path / "cache"),
            TrainRecipe(epochs=1, lr=1e-3, batch_size=4, randaugment={"n": 2, "m": 5}))


def _vqa(tmp_path):
    from bench.registry import TASKS
    task = TASKS.get("vqa")({}, None, "micro", tmp_path / "cache")
    return task, TrainRecipe(epochs=1, lr=1e-3, batch_size=4, randaugment={"n": 2, "m": 5})


def _retrieval(tmp_path):
    from bench.registry import TASKS
    task = TASKS.get("retrieval_coco")({"augment": True}, None, "micro", tmp_path / "cache")
    return task, TrainRecipe(epochs=1, lr=1e-3, batch_size=4, randaugment={"n": 2, "m": 5})


def _ade20k(tmp_path):
    from bench.registry import TASKS
    return TASKS.get("ade20k")({}, None, "micro", tmp_path / "cache"), None


def _ade20k_paper(tmp_path):
    from tasks.ade20k import ADE20KTask
    from tests.test_ade20k import write_ade
    write_ade(tmp_path)
    return ADE20KTask({"workers": 0}, tmp_path, "paper", tmp_path / "cache"), None


def _glue(tmp_path):
    from bench.registry import TASKS
    return TASKS.get("glue_sst2")({"train_size": 60, "dev_size": 20}, None, "micro", tmp_path / "cache"), None


@pytest.mark.parametrize("make", [_imagenet_micro, _imagenet_paper, _cifar10, _nlvr2, _vqa, _retrieval,
                                  _ade20k, _ade20k_paper, _glue],
                         ids=["imagenet-micro", "imagenet-paper", "cifar10", "nlvr2", "vqa", "retrieval", "ade20k-micro",
                              "ade20k-paper", "glue"])
def test_each_rank_makes_exactly_its_micro_batches_of_the_one_process_stream(tmp_path, make):
    task, recipe = make(tmp_path)
    kw = {"recipe": recipe} if recipe is not None else {}
    n = 6   # more than one epoch of the smaller sets
    whole = list(itertools.islice(task.train_batches(2, 3, **kw), n))
    ranks = [task.train_batches(2, 3, shard=(r, 2), **kw) for r in range(2)]
    assert same(interleave(ranks, n), whole)
    assert not same(whole[0], whole[1])                       # a real stream, not one batch repeated


def test_paper_images_do_not_depend_on_the_loader_workers(tmp_path):
    task, recipe = _imagenet_paper(tmp_path)
    one = list(itertools.islice(task.train_batches(4, 1, recipe=recipe), 3))
    task.settings = task.settings.model_copy(update={"workers": 2})
    two = list(itertools.islice(task.train_batches(4, 1, recipe=recipe), 3))
    assert same(one, two)
