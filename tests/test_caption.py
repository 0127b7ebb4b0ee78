import json

import pytest

from bench.errors import BenchError
from tasks.caption import CaptionTask, caption_metrics, image_id_of, spice_status
from tasks.retrieval import generate_karpathy


def test_image_id_as_blip():
    assert image_id_of("val2014/COCO_val2014_000000391895.jpg") == 391895


def test_metrics_java_and_spice_missing_not_zero():
    gts = {1: ["a red circle left of a blue square", "two objects in blue and red"],
           2: ["a small green triangle on its own"]}
    perfect = caption_metrics(gts, {1: ["a red circle left of a blue square"], 2: ["a small green triangle on its own"]})
    worse = caption_metrics(gts, {1: ["a square"], 2: ["a triangle"]})
    assert perfect["CIDEr"] > worse["CIDEr"] and perfect["Bleu_4"] > 90 and perfect["METEOR"] > worse["METEOR"]
    if spice_status() is not None:
        assert perfect["SPICE"] is None and "CoreNLP" in perfect["missing"]["SPICE"]
    with pytest.raises(BenchError, match="must match"):
        caption_metrics(gts, {1: ["x"]})


def test_references_and_prompt(tmp_path):
    root = generate_karpathy(tmp_path / "coco", "coco_karpathy", 3, 1, 2, 32, 0)
    t = CaptionTask({"root": str(root), "tokenizer": "micro", "image_size": 32}, None, "paper", tmp_path)
    refs = t.references("test")
    assert len(refs) == 2 and all(len(v) == 5 for v in refs.values())
    assert t.prompt_len() == 4                       # [CLS] a picture of
    x, ids, mask = next(t.train_batches(2, 0))
    assert t.tokenizer().decode(ids[0]).startswith("a picture of ")
    t.prepare()                                      # again (as every accessor does): the prompt is added once
    x, ids, mask = next(t.train_batches(2, 0))
    assert not t.tokenizer().decode(ids[0]).startswith("a picture of a picture of")
    assert all(c.count("a picture of") == 1 for _, c, _ in t._data.train_pairs)
    (root / "annotation" / "coco_karpathy_test_gt.json").write_text(json.dumps([1, 2]))
    with pytest.raises(BenchError, match="COCO caption format"):
        t.references("test")
