import numpy as np
import torch

from tasks.vl_micro import (CLS_ID, PAD_ID, SEP_ID, UNK_ID, MicroTokenizer, caption, nlvr2_statement, relation_holds,
                            render_scene, vqa_answer_list, vqa_question)


def test_deterministic_and_sized():
    a, sa = render_scene(np.random.default_rng([1, 2]), 40)
    b, sb = render_scene(np.random.default_rng([1, 2]), 40)
    assert a.size == (40, 40) and a.mode == "RGB" and sa == sb
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert 1 <= len(sa) <= 4


def test_language_is_true_and_in_vocabulary():
    tok = MicroTokenizer()
    labels = []
    for i in range(200):
        rng = np.random.default_rng([7, i])
        _, s0 = render_scene(rng, 32)
        _, s1 = render_scene(rng, 32)
        st, truth = nlvr2_statement(s0, s1, rng)
        q, a = vqa_question(s0, rng)
        labels.append(truth)
        assert a in vqa_answer_list()
        for text in (caption(s0, rng), st, q, a):
            ids = tok.encode(text)
            assert UNK_ID not in ids and tok.decode(ids) == text
    assert 0.35 < np.mean(labels) < 0.65            # balanced statements


def test_relation_and_answers_on_a_known_scene():
    scene = [dict(shape="circle", color="red", size="large", x=0.25, y=0.25, col=0, row=0),
             dict(shape="square", color="blue", size="small", x=0.75, y=0.75, col=1, row=1)]
    assert relation_holds(scene[0], "left of", scene[1]) and relation_holds(scene[0], "above", scene[1])
    assert not relation_holds(scene[0], "right of", scene[1])
    rng = np.random.default_rng(0)
    for _ in range(30):
        q, a = vqa_question(scene, rng)
        if q == "what color is the circle ?":
            assert a == "red"
        if q.startswith("how many circles"):
            assert a == "one"


def test_tokenizer_format():
    tok = MicroTokenizer()
    out = tok(["a picture of a red circle", "yes"], max_len=5)
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids.shape == (2, 5) and ids.dtype == torch.long
    assert ids[0, 0] == CLS_ID and ids[0, -1] == SEP_ID            # truncated, [SEP] kept last
    assert ids[1].tolist()[:3] == [CLS_ID, tok.stoi["yes"], SEP_ID] and ids[1, 3] == PAD_ID
    assert mask[1].tolist() == [1, 1, 1, 0, 0]
    assert tok(["a b"], 8, padding="max_length")["input_ids"].shape == (1, 8)
    assert len(tok) < tok.vocab_size == 512
