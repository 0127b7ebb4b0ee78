import json

import pytest

from bench.errors import BenchError, MissingData
from tasks.vqa import VqaTask, answer_weights, normalise_answer, vqa_accuracy, vqa_accuracy_one


def test_normalisation_known_cases():
    assert normalise_answer("Two") == "2"
    assert normalise_answer("the dog") == "dog"
    assert normalise_answer("dont") == "don't"
    assert normalise_answer("yes!") == "yes"
    assert normalise_answer("1,000") == "1000"
    assert normalise_answer("a  red-ish car.") == "red ish car"


def test_accuracy_leave_one_out():
    gts = ["red"] * 10
    assert vqa_accuracy_one("red", gts) == 1.0
    two = ["red"] * 2 + ["blue"] * 8     # 2 humans: each subset has 2 or 1 matches -> (8*2/3 + 2*1/3) / 10
    assert vqa_accuracy_one("red", two) == pytest.approx((8 * 2 / 3 + 2 * 1 / 3) / 10)
    assert vqa_accuracy_one("two", ["2"] * 3 + ["3"] * 7) == pytest.approx((7 * 1 + 3 * 2 / 3) / 10)
    assert vqa_accuracy({1: "red", 2: "no"}, {1: gts, 2: ["yes"] * 10}) == pytest.approx(50.0)


def test_answer_weights_as_blip():
    a, w = answer_weights(["red", "red", "blue", "red"])
    assert dict(zip(a, w)) == {"red": 0.75, "blue": 0.25}
    assert answer_weights(["tree"], "vg") == (["tree"], [0.2])


def _write(root, train):
    ann = root / "annotation"
    ann.mkdir(parents=True)
    (ann / "vqa_train.json").write_text(train)
    (ann / "answer_list.json").write_text(json.dumps(["red", "blue"]))
    return root


def test_loaders_malformed(tmp_path):
    t = VqaTask({"root": str(_write(tmp_path / "a", '[{"question_id": 1, "question": "q", "answer": ["red"],\n'
                                                     ' "image": "x.jpg"}, oops]')), "tokenizer": "micro"},
                None, "paper", tmp_path)
    with pytest.raises(BenchError, match="not valid JSON.*line 2"):
        t.prepare()
    good = json.dumps([{"question_id": 1, "question": "what color ?", "answer": ["red"] * 10, "image": "missing.jpg",
                        "dataset": "vqa"}])
    t = VqaTask({"root": str(_write(tmp_path / "b", good)), "tokenizer": "micro", "image_size": 32,
                 "train_files": ["vqa_train"]}, None, "paper",
                tmp_path)
    with pytest.raises(MissingData, match="missing.jpg"):
        next(t.train_batches(1, 0))
    t = VqaTask({"root": str(tmp_path / "none"), "tokenizer": "micro"}, None, "paper", tmp_path)
    with pytest.raises(MissingData, match="vqa_train"):
        t.prepare()
