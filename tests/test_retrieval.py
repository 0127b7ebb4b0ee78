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


# ---------------------------------------------------------------- the ITC alpha ramp (recipe distill_alpha_warmup)
def _recipe(**keys):
    from bench.options import parse_block
    from bench.recipe import TrainRecipe
    return parse_block(TrainRecipe, {"epochs": 1, "lr": 1.0e-3, "batch_size": 4, **keys}, "finetune")


def _coco(tmp_path, n_images=4):
    """n_images x 5 captions in BLIP's layout: at batch 4, n_images * 5 // 4 optimizer steps per epoch."""
    root = generate_karpathy(tmp_path / "coco", "coco_karpathy", n_images, 2, 2, 32, 0)
    return CocoRetrievalTask({"root": str(root), "tokenizer": "micro", "image_size": 32, "augment": False}, None,
                             "paper", tmp_path / "cache")


def _official_alpha(epoch, i, n_batches, alpha=0.4):
    """sdc17/UPop compress_retrieval.py l. 88-91 / compress_retrieval_clip.py l. 103-106, verbatim."""
    if epoch > 0:
        return alpha
    return alpha * min(1, i / n_batches)


@pytest.mark.parametrize("arch", ["clip_micro", "blip_retrieval_micro"])
def test_alpha_ramp_is_the_official_formula(tmp_path, arch):
    from tests.conftest import build
    task, (_, model) = _coco(tmp_path), build(arch)
    spe = 5
    ramp = _recipe(distill_alpha_warmup="first_epoch")
    for step in (0, 1, 2, spe - 1, spe, spe + 3, 4 * spe):      # step 0, mid-epoch 0, epoch 1 and later
        task.on_train_step(model, step, spe, ramp)
        assert model.alpha == pytest.approx(_official_alpha(step // spe, step % spe, spe)), step
    assert model.alpha == 0.4
    task.on_train_step(model, 2, spe, ramp)
    assert model.alpha == pytest.approx(0.16)
    task.on_train_step(model, 0, spe, _recipe())                 # none: the constant alpha, at step 0 too
    assert model.alpha == 0.4


def test_train_ramps_alpha_once_per_optimizer_step(tmp_path):
    """train() calls the task's on_train_step before every optimizer step: with 2 micro-batches per step both
    forwards see that step's alpha, over the first epoch only."""
    from bench.training import train
    from tests.conftest import build
    task = _coco(tmp_path)
    adapter, model = build("clip_micro")
    seen, orig = [], model.retrieval_loss
    model.retrieval_loss = lambda *a, **k: seen.append(model.alpha) or orig(*a, **k)
    train(model, task, device="cpu", seed=0, adapter=adapter, quiet=True, epochs=2, lr=1.0e-4, batch_size=4,
          micro_batch_size=2, distill_alpha_warmup="first_epoch")
    spe = task.steps_per_epoch(4)
    assert spe == 5
    assert seen == pytest.approx([_official_alpha(s // spe, s % spe, spe) for s in range(2 * spe) for _ in range(2)])
    seen.clear()
    train(model, task, device="cpu", seed=0, adapter=adapter, quiet=True, epochs=1, lr=1.0e-4, batch_size=4)
    assert seen == [0.4] * spe                                   # the next phase without the key: full alpha again


def test_upop_search_takes_the_ramp_from_the_finetune_block(tmp_path):
    """The official search and retrain share one train() that ramps alpha in epoch 0 of each."""
    import functools
    from bench.api import CellContext, RatioSpec
    from bench.options import parse_block
    from bench.registry import METHODS
    from bench.training import train
    from tests.conftest import build
    task = _coco(tmp_path)
    adapter, model = build("clip_micro")
    seen, orig = [], model.retrieval_loss
    model.retrieval_loss = lambda *a, **k: seen.append(model.alpha) or orig(*a, **k)
    M = METHODS.get("upop")
    s = parse_block(M.Settings, {"search_epochs": 1.4, "lr": 1.0e-4, "batch_size": 4, "interval": 2,
                                 "w_sp_attn": 1.0e-3, "w_sp_mlp": 1.0e-3}, "upop")
    ctx = CellContext(model=model, adapter=adapter, structure=adapter.structure(model), task=task,
                      ratio=RatioSpec("2x", 0.5), options=M.Options(weights="official_36"),
                      settings={"finetune": _recipe(distill_alpha_warmup="first_epoch"), "method": s},
                      device=torch.device("cpu"), seed=0,
                      train=functools.partial(train, task=task, device="cpu", seed=0, adapter=adapter, quiet=True),
                      log=lambda m: None)
    M().prune(ctx)
    assert seen == pytest.approx([_official_alpha(st // 5, st % 5, 5) for st in range(7)])   # 1.4 epochs x 5 steps


def test_only_the_retrieval_tasks_implement_the_ramp():
    from bench.registry import TASKS
    from bench.training import check_recipe
    for name in TASKS.names():      # caption's LM loss and VQA / NLVR2 have no ITC distillation (their train())
        assert ("distill_alpha_warmup" in TASKS.get(name).RECIPE_KEYS) == name.startswith("retrieval_"), name
    with pytest.raises(BenchError, match="task caption_coco does not implement distill_alpha_warmup"):
        check_recipe(_recipe(distill_alpha_warmup="first_epoch"), TASKS.get("caption_coco"))
    assert "distill_alpha_warmup" not in _recipe().to_dict()          # at its default: every cell keeps its hash
    with pytest.raises(BenchError, match=r"^finetune\.distill_alpha_warmup: input should be 'none' or 'first_epoch'"):
        _recipe(distill_alpha_warmup="first_step")


def test_the_retrieval_cards_ramp_alpha_on_the_paper_profile_only():
    from bench.cards import load_card, parse_card
    for table in ("upop_clip_retrieval_coco", "upop_clip_retrieval_flickr", "upop_retrieval_coco",
                  "upop_retrieval_flickr"):
        card = parse_card(load_card(table))
        assert card.profile("paper").finetune.distill_alpha_warmup == "first_epoch", table
        assert card.profile("micro").finetune.distill_alpha_warmup == "none", table
        official = next(n for n in card.notes if n.startswith("Official recipe"))
        deviations = next(n for n in card.notes if n.startswith("Remaining deviations"))
        assert "alpha = config['alpha']*min(1,i/len(data_loader))" in official, table
        assert "ITC alpha ramp:" not in deviations and "ITC queue content:" not in deviations, table
    for table in ("upop_caption", "upop_vqa", "upop_nlvr2"):
        assert parse_card(load_card(table)).profile("paper").finetune.distill_alpha_warmup == "none", table
    for table in ("upop_clip_retrieval_coco", "upop_clip_retrieval_flickr"):   # one deviation left, numbered (1)
        deviations = next(n for n in parse_card(load_card(table)).notes if n.startswith("Remaining deviations"))
        assert "(1) Crop source" in deviations and " (2) " not in deviations and " (3) " not in deviations
