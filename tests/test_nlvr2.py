"""NLVR2 task: BLIP's annotation format (incl. malformed files), the micro generator's layout, batches,
loss, accuracy, and the FLOPs protocol without data on disk."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from bench.errors import BenchError, MissingData
from tasks.nlvr2 import Nlvr2Task, generate_micro, pre_caption, read_annotation, swap_left_right
from tests.conftest import build


def _write_official(root, n=6, missing=None):
    """A tiny NLVR2 in BLIP's layout (annotation/*.json + image folder)."""
    (root / "annotation").mkdir(parents=True)
    for split in ("train", "dev", "test"):
        anns = []
        for i in range(n):
            names = [f"images/{split}/{i}/{split}-{i}-0-img{j}.png" for j in (0, 1)]
            for nm in names:
                (root / nm).parent.mkdir(parents=True, exist_ok=True)
                if nm != missing:
                    Image.fromarray(np.full((40, 30, 3), 40 * i % 255, np.uint8)).save(root / nm)
            anns.append({"images": names, "sentence": f"The left image has {i} dogs.", "label": ["False", "True"][i % 2]})
        (root / "annotation" / f"nlvr_{split}.json").write_text(json.dumps(anns))


def _paper_task(tmp_path, **settings):
    return Nlvr2Task({"image_size": 32, **settings}, tmp_path, "paper", tmp_path / "cache")


def test_reads_blip_layout_and_batches(tmp_path):
    _write_official(tmp_path / "nlvr2")
    task = _paper_task(tmp_path)
    task.prepare()
    assert [a["label"] for a in task.split("dev")] == [0, 1, 0, 1, 0, 1]
    assert task.steps_per_epoch(4) == 1
    task._tok = _FakeTok()
    x0, x1, ids, mask, y = task._batch(task.split("dev")[:3])
    assert x0.shape == (3, 3, 32, 32) and x1.shape == x0.shape and y.tolist() == [0, 1, 0]
    assert ids.shape == mask.shape


class _FakeTok:           # the paper tokenizer needs a local bert-base-uncased; the loader test does not
    def __call__(self, texts, max_len=128):
        from tasks.vl_micro import MicroTokenizer
        return MicroTokenizer()(texts, max_len)


def test_missing_image_names_the_file(tmp_path):
    missing = "images/dev/2/dev-2-0-img1.png"
    _write_official(tmp_path / "nlvr2", missing=missing)
    task = _paper_task(tmp_path)
    task._tok = _FakeTok()
    with pytest.raises(MissingData, match="dev-2-0-img1.png"):
        task._batch(task.split("dev"))


def test_missing_annotation_and_bad_json_are_clear(tmp_path):
    with pytest.raises(MissingData, match="nlvr_train.json"):
        _paper_task(tmp_path).prepare()
    _write_official(tmp_path / "nlvr2")
    (tmp_path / "nlvr2" / "annotation" / "nlvr_dev.json").write_text('[{"images": ["a", "b"], "sentence": "x", ')
    with pytest.raises(BenchError, match=r"nlvr_dev.json is not valid JSON .*line 1"):
        _paper_task(tmp_path).prepare()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"images": ["a.png"], "sentence": "x", "label": "True"}]))
    with pytest.raises(BenchError, match="entry 0"):
        read_annotation(bad)
    bad.write_text(json.dumps([{"images": ["a.png", "b.png"], "sentence": "x", "label": "maybe"}]))
    with pytest.raises(BenchError, match="entry 0"):
        read_annotation(bad)
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(BenchError, match="JSON list"):
        read_annotation(bad)


def test_blip_text_rules():
    assert pre_caption("The LEFT image: has two dogs!") == "the left image has two dogs"
    assert swap_left_right("the left image has more dogs than the right image") == \
        "the right image has more dogs than the left image"


def test_micro_generator_layout_and_balance(tmp_path):
    root = generate_micro(tmp_path / "m", train_pairs=40, dev_pairs=10, test_pairs=10, image_size=32, seed=1)
    anns = read_annotation(root / "annotation" / "nlvr_train.json")
    assert len(anns) == 40 and 10 <= sum(a["label"] for a in anns) <= 30
    for a in anns[:3]:
        for p in a["images"]:
            assert Image.open(root / p).size == (32, 32)
    again = generate_micro(tmp_path / "m2", train_pairs=40, dev_pairs=10, test_pairs=10, image_size=32, seed=1)
    assert (again / "annotation" / "nlvr_dev.json").read_text() == (root / "annotation" / "nlvr_dev.json").read_text()


def test_micro_task_loss_accuracy_and_flops_inputs(tmp_path):
    task = Nlvr2Task({"train_pairs": 16, "dev_pairs": 8, "test_pairs": 8}, tmp_path, "micro", tmp_path / "cache")
    task.prepare()
    assert (task.root / "README.txt").is_file()
    adapter, model = build("blip_nlvr2_micro")
    batch = next(task.train_batches(8, 0))
    loss = task.loss(model, batch, "cpu")
    assert torch.isfinite(loss) and 0 < loss.item() < 3    # CE over 2 classes from a random model
    res = task.evaluate(model, "test", "cpu")
    assert set(res) == {"acc", "test_acc", "n"} and res["n"] == 8 and 0 <= res["acc"] <= 100
    fl = task.flops_forwards(adapter.config, "meta")
    labels = list(fl)
    assert labels[0].startswith("paper") and any(k.startswith("inference") for k in labels)
    args, kwargs = fl[labels[0]]
    with torch.device("meta"):
        meta_model = adapter.build()
    assert meta_model(*args, **kwargs).shape == (1, 2)


def test_paper_flops_protocol_needs_no_data(tmp_path):
    from bench.registry import MODELS
    _, cfg = MODELS.get("blip_nlvr2")
    task = Nlvr2Task({}, tmp_path / "nowhere", "paper", tmp_path / "cache")
    args, _ = next(iter(task.flops_forwards(cfg, "meta").values()))
    assert args[0].shape == (1, 3, 384, 384) and args[2].shape == (1, 36)
