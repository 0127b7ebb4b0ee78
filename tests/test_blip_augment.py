"""BLIP's training transform (tasks.common.blip_augment, issue 16): each RandomAugment op on hand-made images as the
official transform/randaugment.py computes it, the level -> argument mapping, determinism per seed, the recipe key
`randaugment` (declared, documented, refused where not implemented) and its effect on the four BLIP tasks' train
batches (never on their evaluation), and the UPop search taking it from the finetune block."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from bench.errors import BenchError
from bench.options import parse_block
from bench.recipe import BLIP_RECIPE_KEYS, DATA_RECIPE_KEYS, BlipRandAugment, TrainRecipe
from bench.registry import TASKS
from tasks.common import blip_augment as B


def R(**kw):
    return TrainRecipe(epochs=1, lr=1.0e-3, batch_size=4, **kw)


def _img(h=24, w=20, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (h, w, 3)).astype(np.uint8)


# ------------------------------------------------------------------------------------------------ (a) the ops
def test_level_args_are_the_official_arg_dict_at_m5():
    assert B.level_args("Identity", 5) == () and B.level_args("AutoContrast", 5) == () and B.level_args("Equalize", 5) == ()
    assert B.level_args("Brightness", 5) == (1.0,) and B.level_args("Sharpness", 5) == (1.0,)   # 5/10*1.8+0.1, exactly 1
    assert B.level_args("Brightness", 10) == (pytest.approx(1.9),) and B.level_args("Sharpness", 0) == (pytest.approx(0.1),)
    for seed in range(20):       # the sign coin: shear/translate negate when it is > 0.5, rotate when it is < 0.5
        u = float(torch.rand((), generator=torch.Generator().manual_seed(seed)))
        g = lambda: torch.Generator().manual_seed(seed)            # noqa: E731
        assert B.level_args("ShearX", 5, g()) == (pytest.approx(-0.15 if u > 0.5 else 0.15),)
        assert B.level_args("ShearY", 10, g()) == (pytest.approx(-0.3 if u > 0.5 else 0.3),)
        assert B.level_args("TranslateX", 5, g()) == (-5.0 if u > 0.5 else 5.0,)
        assert B.level_args("TranslateY", 3, g()) == (-3.0 if u > 0.5 else 3.0,)
        assert B.level_args("Rotate", 5, g()) == (-15.0 if u < 0.5 else 15.0,)      # 30 * level / 10 degrees
    with pytest.raises(BenchError, match="no op 'Solarise'"):
        B.level_args("Solarise", 5)


def test_identity_and_the_m5_enhance_ops_leave_the_image_unchanged():
    img = _img()
    for op in ("Identity", "Brightness", "Sharpness"):
        assert np.array_equal(B.apply_op(img, op, 5), img), op


def test_brightness_and_sharpness_tables():
    img = np.array([[[0, 3, 255]]], np.uint8)
    assert B.brightness(img, 0.5).tolist() == [[[0, 1, 127]]]        # float32 product, truncated
    assert B.brightness(img, 1.9).tolist() == [[[0, 5, 255]]]        # clipped at 255
    const = np.full((6, 5, 3), 77, np.uint8)
    assert np.array_equal(B.sharpness(const, 0.3), const)            # the blur of a constant image is itself
    x = _img(8, 8)
    out = B.sharpness(x, 1.54)
    assert np.array_equal(out[0], x[0]) and np.array_equal(out[:, -1], x[:, -1])   # border pixels keep the original
    assert not np.array_equal(out[1:-1, 1:-1], x[1:-1, 1:-1])


def test_translate_moves_the_content_by_whole_pixels_with_grey_fill():
    img = _img(10, 12)
    out = B.translate_x(img, 5.0)                                    # M = [[1, 0, -5], [0, 1, 0]]: content moves left
    assert np.array_equal(out[:, :7], img[:, 5:]) and (out[:, 7:] == 128).all()
    out = B.translate_y(img, -5.0)                                   # negative offset: content moves down
    assert np.array_equal(out[5:], img[:5]) and (out[:5] == 128).all()


def test_shear_moves_a_known_pixel():
    img = np.zeros((30, 30, 3), np.uint8)
    img[20, 2] = 255                                                 # (x=2, y=20)
    out = B.shear_x(img, 0.15)                                       # (x, y) -> (x + 0.15 y, y) = (5, 20)
    assert out[20, 5].tolist() == [255] * 3 and out[20, 4].tolist() == [0] * 3
    assert (out[20, :3] == 128).all()                                # the 3 px it uncovers: the fill
    assert np.array_equal(out[0], img[0])                            # row 0 does not move
    img = np.zeros((30, 30, 3), np.uint8)
    img[2, 20] = 255                                                 # (x=20, y=2) -> (20, 2 + 0.15 * 20) = (20, 5)
    out = B.shear_y(img, 0.15)
    assert out[5, 20].tolist() == [255] * 3 and out[4, 20].tolist() == [0] * 3 and (out[:3, 20] == 128).all()
    assert (B.shear_x(np.zeros((30, 30, 3), np.uint8), 0.3)[29, :8] == 128).all()   # uncovered corner: the fill


def test_rotate_is_counter_clockwise_about_w2_h2():
    img = _img(4, 4)
    out = B.rotate(img, 90.0)
    # cv2.getRotationMatrix2D((W/2, H/2), 90, 1) maps a pixel (x, y) to (y, 4 - x): out[y', x'] = img[x', 4 - y']
    assert np.array_equal(out[1:], img.transpose(1, 0, 2)[[3, 2, 1]]) and (out[0] == 128).all()
    g = torch.Generator().manual_seed(3)
    u = float(torch.rand((), generator=torch.Generator().manual_seed(3)))
    big = _img(32, 32)
    assert np.array_equal(B.apply_op(big, "Rotate", 5, g), B.rotate(big, -15.0 if u < 0.5 else 15.0))


def test_autocontrast_is_the_official_arithmetic():
    img = np.stack([np.array([[0, 10], [100, 200]]), np.array([[30, 40], [50, 60]]), np.full((2, 2), 7)], -1)
    out = B.autocontrast(img.astype(np.uint8))
    assert out[..., 0].tolist() == [[0, 12], [127, 254]]    # min 0: v * 255/200, truncated
    # min 30: the official offset -low is a numpy uint8, so it wraps to 226 and the channel saturates (as UPop ran)
    assert out[..., 1].tolist() == [[255, 255], [255, 255]]
    assert out[..., 2].tolist() == [[7, 7], [7, 7]]         # max == min: unchanged


def test_equalize_is_pils():
    for seed, (lo, hi) in enumerate(((0, 256), (40, 90), (0, 3))):
        img = np.random.RandomState(seed).randint(lo, hi, (17, 23, 3)).astype(np.uint8)
        assert np.array_equal(B.equalize(img), np.asarray(ImageOps.equalize(Image.fromarray(img)))), (lo, hi)


def test_geometric_ops_and_blur_match_opencv_where_installed():
    cv2 = pytest.importorskip("cv2")
    fill = (128, 128, 128)
    for h, w in ((32, 32), (37, 29)):
        img = _img(h, w, seed=h)
        for f in (0.15, -0.3, 0.03):
            assert np.array_equal(B.shear_x(img, f), cv2.warpAffine(img, np.float32([[1, f, 0], [0, 1, 0]]), (w, h),
                                                                   borderValue=fill, flags=cv2.INTER_LINEAR))
            assert np.array_equal(B.shear_y(img, f), cv2.warpAffine(img, np.float32([[1, 0, 0], [f, 1, 0]]), (w, h),
                                                                   borderValue=fill, flags=cv2.INTER_LINEAR))
        for o in (5.0, -2.5, 0.25):
            assert np.array_equal(B.translate_x(img, o), cv2.warpAffine(img, np.float32([[1, 0, -o], [0, 1, 0]]),
                                                                       (w, h), borderValue=fill, flags=cv2.INTER_LINEAR))
        for deg in (15.0, -15.0, 7.3, 90.0):
            M = cv2.getRotationMatrix2D((w / 2, h / 2), deg, 1)
            assert np.array_equal(B.rotate(img, deg), cv2.warpAffine(img, M, (w, h), borderValue=fill))
        k = np.ones((3, 3), np.float32)
        k[1][1] = 5
        blur = cv2.filter2D(img, -1, k / 13)
        want = img.astype(np.float32)
        want[1:-1, 1:-1] = blur[1:-1, 1:-1] + np.float32(1.54) * (want[1:-1, 1:-1] - blur[1:-1, 1:-1])
        assert np.array_equal(B.sharpness(img, 1.54), want.astype(np.uint8))


# ------------------------------------------------------------------------------------------------ (b) draws
def test_random_augment_is_deterministic_per_seed_and_differs_across_seeds():
    x = torch.from_numpy(np.stack([_img(32, 32, s) for s in range(8)])).permute(0, 3, 1, 2).contiguous()
    t = B.TrainTransform(crop=True, randaugment=B.RandomAugment(2, 5))
    a = t(x, torch.Generator().manual_seed(0))
    b = t(x, torch.Generator().manual_seed(0))
    c = t(x, torch.Generator().manual_seed(1))
    assert a.dtype == torch.uint8 and a.shape == x.shape
    assert torch.equal(a, b) and not torch.equal(a, c)
    ra = B.RandomAugment(2, 5)
    d, e = ra(x[0], torch.Generator().manual_seed(5)), ra(x[0], torch.Generator().manual_seed(5))
    assert torch.equal(d, e)


def test_draws_are_the_official_distribution():
    ra, g = B.RandomAugment(2, 5), torch.Generator().manual_seed(0)
    picks = [op for _ in range(3000) for op in ra.draw(g)]
    counts = {op: picks.count(op) for op in B.BLIP_OPS}
    assert len(picks) == 6000 and set(counts) == set(B.BLIP_OPS)        # N = 2 per image, with replacement
    assert all(abs(c / 6000 - 0.1) < 0.02 for c in counts.values())     # uniform over the 10 ops
    assert B.APPLY_PROB == 0.5 and B.FILL == 128 and B.TRANSLATE_CONST == 10 and B.MAX_LEVEL == 10


def test_random_resized_crop_is_torchvisions():
    import torchvision.transforms as T
    img = _img(50, 40, seed=4)
    for s in range(10):
        torch.manual_seed(s)
        want = np.asarray(T.RandomResizedCrop(50, scale=(0.5, 1.0), interpolation=T.InterpolationMode.BICUBIC)(
            Image.fromarray(img)))
        torch.manual_seed(s)
        assert np.array_equal(B.random_resized_crop(img, (0.5, 1.0), None, size=50), want)


# ------------------------------------------------------------------------------------------------ (c) the tasks
def _tasks(tmp_path):
    """The four BLIP tasks as the paper profile builds them (crop + flip), on tiny synthetic data in BLIP's layout."""
    from tasks.caption import CaptionTask
    from tasks.nlvr2 import Nlvr2Task, generate_micro as nlvr2_micro
    from tasks.retrieval import CocoRetrievalTask, generate_karpathy
    from tasks.vqa import VqaTask, generate_micro as vqa_micro
    from tests.test_nlvr2 import _FakeTok
    nlvr2_micro(tmp_path / "nlvr2", train_pairs=8, dev_pairs=4, test_pairs=4, image_size=32, seed=0)
    nlvr2 = Nlvr2Task({"image_size": 32}, tmp_path, "paper", tmp_path / "c1")
    nlvr2._tok = _FakeTok()
    coco = generate_karpathy(tmp_path / "coco", "coco_karpathy", 8, 2, 2, 32, 0)
    retrieval = CocoRetrievalTask({"root": str(coco), "tokenizer": "micro", "image_size": 32}, None, "paper", tmp_path / "c2")
    caption = CaptionTask({"root": str(coco), "tokenizer": "micro", "image_size": 32}, None, "paper", tmp_path / "c3")
    vroot = vqa_micro(tmp_path / "vqa", 8, 2, 1, 2, 32, 0)
    vqa = VqaTask({"root": str(vroot), "tokenizer": "micro", "image_size": 32, "train_files": ["vqa_train"]}, None,
                  "paper", tmp_path / "c4")
    return {"nlvr2": nlvr2, "retrieval_coco": retrieval, "caption_coco": caption, "vqa": vqa}


def _images(batch, name):
    return batch[:2] if name == "nlvr2" else batch[:1]


def test_blip_tasks_augment_train_batches_with_the_key_and_never_evaluation(tmp_path, monkeypatch):
    tasks = _tasks(tmp_path)
    ra = R(randaugment={"n": 2, "m": 5})
    for name, task in tasks.items():
        assert {"randaugment", "crop_scale"} <= task.RECIPE_KEYS, name
        plain = next(task.train_batches(4, 0, recipe=R()))
        aug = next(task.train_batches(4, 0, recipe=ra))
        again = next(task.train_batches(4, 0, recipe=ra))
        other = next(task.train_batches(4, 1, recipe=ra))
        for p, a, b, o in zip(_images(plain, name), _images(aug, name), _images(again, name), _images(other, name)):
            assert p.shape == a.shape and not torch.equal(p, a), name          # RandomAugment changed the images
            assert torch.equal(a, b) and not torch.equal(a, o), name           # reproducible per seed
        for t_plain, t_aug in zip(plain[len(_images(plain, name)):], aug[len(_images(aug, name)):]):
            assert torch.equal(t_plain, t_aug), name                           # the text side is untouched
    # evaluation never goes through the training transform
    calls = []
    monkeypatch.setattr(B.TrainTransform, "image_hwc", lambda self, hwc, gen: calls.append(1) or hwc)
    from tests.conftest import build
    n = tasks["nlvr2"]
    dev = n.split("dev")
    x0, x1, *_ = n._batch(dev)
    raw = torch.stack([n._image(a["images"][0]) for a in dev])
    assert torch.equal(x0, n._normalise(raw))
    assert 0 <= n.evaluate(build("blip_nlvr2_micro")[1], "dev")["acc"] <= 100
    assert 0 <= tasks["retrieval_coco"].evaluate(build("blip_retrieval_micro")[1], "test")["r_mean"] <= 100
    assert tasks["vqa"].evaluate(build("blip_vqa_micro")[1], "val")["vqa_acc"] is not None
    with torch.no_grad():
        assert len(tasks["caption_coco"].generate(build("blip_caption_micro")[1], "test", torch.device("cpu"))) == 2
    assert calls == []
    next(tasks["vqa"].train_batches(2, 0, recipe=ra))
    assert calls                                                               # (the spy does see training)


def test_micro_batches_are_unchanged_without_the_key(tmp_path):
    """Micro profiles keep their batches draw for draw (no crop, no RandomAugment unless a recipe sets it)."""
    from tasks.retrieval import CocoRetrievalTask, generate_karpathy
    coco = generate_karpathy(tmp_path / "coco", "coco_karpathy", 8, 2, 2, 32, 0)
    t = CocoRetrievalTask({"root": str(coco), "tokenizer": "micro", "image_size": 32}, None, "paper", tmp_path)
    t.settings = t.settings.model_copy(update={"augment": False})
    x, *_ = next(t.train_batches(4, 0, recipe=R()))
    y, *_ = next(t.train_batches(4, 0))
    assert torch.equal(x, y)
    with pytest.raises(BenchError, match="crop_scale .* does not crop"):
        next(t.train_batches(4, 0, recipe=R(crop_scale=[0.3, 1.0])))
    z, *_ = next(t.train_batches(4, 0, recipe=R(randaugment={"n": 2, "m": 5})))   # RandomAugment alone: honoured
    assert not torch.equal(x, z)


def test_crop_scale_sets_blips_min_scale(tmp_path):
    tasks = _tasks(tmp_path)
    t = tasks["retrieval_coco"]
    a = next(t.train_batches(4, 0, recipe=R()))[0]
    b = next(t.train_batches(4, 0, recipe=R(crop_scale=[0.5, 1.0])))[0]
    c = next(t.train_batches(4, 0, recipe=R(crop_scale=[0.08, 0.1])))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)     # default = BLIP's min_scale 0.5


# ------------------------------------------------------------------------------------------------ (d) the key
def test_randaugment_key_is_declared_documented_and_typed():
    from pathlib import Path
    assert "randaugment" in TrainRecipe.model_fields and BLIP_RECIPE_KEYS == ("randaugment",)
    assert "randaugment" in DATA_RECIPE_KEYS and TrainRecipe.model_fields["randaugment"].description
    assert all(f.description for f in BlipRandAugment.model_fields.values())
    r = parse_block(TrainRecipe, {"epochs": 1, "lr": 1.0e-3, "batch_size": 4, "randaugment": {"n": 2, "m": 5}}, "finetune")
    assert (r.randaugment.n, r.randaugment.m) == (2, 5.0) and "randaugment" in r.changed_keys()
    assert parse_block(TrainRecipe, r.to_dict(), "finetune") == r
    assert "randaugment" not in R().to_dict()           # unset: the cells of other cards keep their hash
    docs = (Path(__file__).resolve().parent.parent / "docs" / "card_keys.md").read_text()
    assert "| `randaugment` |" in docs and "finetune.randaugment" in docs


def test_misspelled_or_bad_randaugment_fails_with_one_line():
    base = {"epochs": 1, "lr": 1.0e-3, "batch_size": 4}
    for bad, msg in (({"randaugmnet": {"n": 2}}, r"^finetune\.randaugmnet: unknown key, did you mean randaugment\?$"),
                     ({"randaugment": {"n": 2, "mm": 5}}, r"^finetune\.randaugment\.mm: unknown key, did you mean m\?$"),
                     ({"randaugment": {"m": 11}}, r"^finetune\.randaugment\.m: input should be less than or equal to 10"),
                     ({"randaugment": {"n": "2"}}, r"^finetune\.randaugment\.n: input should be a valid integer")):
        with pytest.raises(BenchError, match=msg) as e:
            parse_block(TrainRecipe, {**base, **bad}, "finetune")
        assert "\n" not in str(e.value)


def test_tasks_without_it_refuse_the_key():
    from bench.training import check_recipe
    blip = {"nlvr2", "vqa", "caption_coco", "retrieval_coco", "retrieval_flickr"}
    for name in TASKS.names():
        implements = "randaugment" in TASKS.get(name).RECIPE_KEYS
        assert implements == (name in blip), name
    with pytest.raises(BenchError, match="task imagenet does not implement randaugment"):
        check_recipe(R(randaugment={"n": 2, "m": 5}), TASKS.get("imagenet"))
    from bench.cards import load_card, validate_card
    raw = load_card("upop_deit")
    raw["profiles"]["paper"]["finetune"] = {**raw["profiles"]["paper"]["finetune"], "randaugment": {"n": 2, "m": 5}}
    assert any("paper.finetune.randaugment: task imagenet does not implement randaugment" in e for e in validate_card(raw))


def test_the_blip_cards_set_it_in_paper_finetune_only_and_notes_no_longer_list_it():
    from bench.cards import load_card, parse_card
    for table in ("upop_nlvr2", "upop_vqa", "upop_caption", "upop_retrieval_coco", "upop_retrieval_flickr"):
        card = parse_card(load_card(table))
        paper, micro = card.profile("paper"), card.profile("micro")
        assert (paper.finetune.randaugment.n, paper.finetune.randaugment.m) == (2, 5.0), table
        assert micro.finetune.randaugment is None, table
        deviations = next(n for n in card.notes if n.startswith("Remaining deviations"))
        assert "RandomAugment(2, 5) (its own op list) is not reproduced" not in deviations
        assert "not reproduced: the nlvr2 task implements no data-side recipe key" not in deviations


# ------------------------------------------------------------------------------------------------ UPop's search
def test_upop_search_draws_batches_with_the_finetune_randaugment(tmp_path):
    """The official search iterates the retrain's train_loader (BLIP's transform_train): the suite's search gets
    the finetune block's randaugment."""
    import functools
    from bench.api import CellContext, RatioSpec
    from bench.registry import METHODS
    from bench.training import train
    from tests.conftest import build
    task = _tasks(tmp_path)["retrieval_coco"]
    adapter, model = build("blip_retrieval_micro")
    seen = []
    orig = type(task).train_batches

    def spy(self, batch_size, seed, recipe=None):
        seen.append(recipe.randaugment if recipe is not None else None)
        return orig(self, batch_size, seed, recipe=recipe)
    type(task).train_batches = spy
    try:
        M = METHODS.get("upop")
        s = parse_block(M.Settings, {"search_epochs": 0.5, "lr": 1.0e-4, "batch_size": 4, "interval": 1,
                                     "w_sp_attn": 1.0e-3, "w_sp_mlp": 1.0e-3}, "upop")
        ctx = CellContext(model=model, adapter=adapter, structure=adapter.structure(model), task=task,
                          ratio=RatioSpec("2x", 0.5), options=M.Options(weights="official_36"),
                          settings={"finetune": R(randaugment={"n": 2, "m": 5}), "method": s},
                          device=torch.device("cpu"), seed=0,
                          train=functools.partial(train, task=task, device="cpu", seed=0, adapter=adapter, quiet=True),
                          log=lambda m: None)
        M().prune(ctx)
    finally:
        type(task).train_batches = orig
    assert seen and all(r is not None and (r.n, r.m) == (2, 5.0) for r in seen)
