import json

import numpy as np
import pytest
import torch

from bench.errors import BenchError, MissingData
from tasks.retrieval import CocoRetrievalTask, generate_karpathy, pre_caption, recall_at_k


def test_recall_on_hand_made_matrix():
    # 2 images x 4 captions (2 per image): image 0 -> captions 0, 1; image 1 -> captions 2, 3
    img2txt, txt2img = [[0, 1], [2, 3]], [0, 0, 1, 1]
    i2t = np.array([[0.1, 0.9, 0.5, 0.2],      # image 0: best gt caption (1) at rank 0
                    [0.8, 0.1, 0.3, 0.2]])     # image 1: best gt caption (2) at rank 1
    t2i = np.array([[0.9, 0.1], [0.2, 0.7], [0.1, 0.6], [0.5, 0.4]])   # ranks 0, 1, 0, 1
    r = recall_at_k(i2t, t2i, txt2img, img2txt)
    assert r["txt_r1"] == 50.0 and r["txt_r5"] == 100.0 and r["txt_r10"] == 100.0
    assert r["img_r1"] == 50.0 and r["img_r5"] == 100.0
    assert r["r_mean"] == pytest.approx(((50 + 100 + 100) / 3 + (50 + 100 + 100) / 3) / 2)


def test_pre_caption():
    assert pre_caption("A man (riding) a horse.  ", 30) == "a man riding a horse"
    assert pre_caption("one two three", 2) == "one two"


def test_micro_layout_and_clip_evaluation(tmp_path):
    root = generate_karpathy(tmp_path / "coco", "coco_karpathy", 4, 2, 3, 32, 0)
    test = json.loads((root / "annotation" / "coco_karpathy_test.json").read_text())
    assert len(test) == 3 and all(len(t["caption"]) == 5 for t in test)
    gt = json.loads((root / "annotation" / "coco_karpathy_test_gt.json").read_text())
    assert len(gt["annotations"]) == 15
    task = CocoRetrievalTask({"root": str(root), "tokenizer": "micro", "image_size": 32}, None, "paper", tmp_path)
    x, ids, mask, idx = next(task.train_batches(4, 0))
    assert x.shape == (4, 3, 32, 32) and ids[:, 0].eq(1).all() and idx.max() < 4
    from tests.conftest import build
    _, model = build("clip_micro")
    r = task.evaluate(model, "test")
    assert r["n_images"] == 3 and r["n_texts"] == 15 and 0 <= r["r_mean"] <= 100
    assert model(x, ids, mask, torch.as_tensor(idx), mode="train").ndim == 0


def test_malformed_annotations(tmp_path):
    root = generate_karpathy(tmp_path / "c", "coco_karpathy", 2, 1, 1, 32, 0)
    (root / "annotation" / "coco_karpathy_val.json").write_text('[{"image": "x.jpg", "caption": "not a list"}]')
    t = CocoRetrievalTask({"root": str(root), "tokenizer": "micro"}, None, "paper", tmp_path)
    with pytest.raises(BenchError, match="entry 0 has no field 'caption' of type list"):
        t.prepare()
    (root / "annotation" / "coco_karpathy_val.json").write_text('[{"image": "x.jpg", "caption": ["a"]}')
    with pytest.raises(BenchError, match="not valid JSON"):
        CocoRetrievalTask({"root": str(root), "tokenizer": "micro"}, None, "paper", tmp_path).prepare()
    (root / "annotation" / "coco_karpathy_val.json").write_text('[{"image": "gone.jpg", "caption": ["a"]}]')
    t = CocoRetrievalTask({"root": str(root), "tokenizer": "micro", "image_size": 32}, None, "paper", tmp_path)
    with pytest.raises(MissingData, match="gone.jpg"):
        t.evaluate(__import__("tests.conftest", fromlist=["build"]).build("clip_micro")[1], "val")
