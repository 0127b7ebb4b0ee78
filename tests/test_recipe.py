"""Every key of the training recipe (bench.recipe.TrainRecipe) changes what training does.

Loop-side keys on tiny modules and a fake task, where the update can be computed by hand (SGD without
momentum moves a parameter with constant gradient c by exactly lr * c, so the lr of every step can be read
off the parameter); data-side keys on the micro ImageNet and CIFAR-10 tasks; drop_path on vit_micro,
segmenter_micro and BLIP's vision encoder.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from bench.api import ModelAdapter
from bench.errors import BenchError
from bench.recipe import TASK_RECIPE_KEYS, TrainRecipe
from bench.registry import MODELS
from bench.training import cosine_lr, lr_at, param_groups, train
from tasks.cifar10 import Cifar10Task
from tasks.imagenet import ImageNetTask, random_resized_crop_flip

SMALL = {"num_classes": 3, "train_per_class": 8, "val_per_class": 2, "image_size": 32, "seed": 7}


def R(**kw) -> TrainRecipe:
    return TrainRecipe(**{"epochs": 1, "lr": 0.1, "batch_size": 4, **kw})


# ------------------------------------------------------------------------------------------- fakes

class FakeTask:
    """n samples, batches of constant tensors; the loss is `loss_fn(model)`; records the recipe it gets."""

    name = "fake"

    def __init__(self, loss_fn, n=16, keys=()):
        self.loss_fn, self.n = loss_fn, n
        self.RECIPE_KEYS = frozenset(keys)
        self.seen = []

    def steps_per_epoch(self, bs):
        return self.n // bs

    def train_batches(self, bs, seed, recipe=None):
        self.seen.append(("batches", recipe))
        while True:
            yield torch.zeros(bs, 1)

    def loss(self, model, batch, device, recipe=None):
        if not self.seen or self.seen[-1][0] != "loss":
            self.seen.append(("loss", recipe))
        return self.loss_fn(model)


class Scalar(nn.Module):
    """One float64 vector parameter; the fake task's loss is (c * w).sum(), so the gradient is c."""

    def __init__(self, n=1, value=1.0):
        super().__init__()
        self.w = nn.Parameter(torch.full((n,), value, dtype=torch.float64))


def lr_trace(recipe, c=1.0, n=16):
    """The lr of every step as train() applied it: SGD, no momentum, gradient c: w_t - w_{t+1} = lr_t * c."""
    model = Scalar()
    ws = []
    task = FakeTask(lambda m: (c * m.w).sum(), n=n)
    stats = train(model, task, recipe.with_(optimizer="sgd", momentum=0.0, weight_decay=0.0), device="cpu", seed=0,
                  on_step=lambda s, t: ws.append(model.w.item()))
    w = [1.0] + ws
    return [(w[i] - w[i + 1]) / c for i in range(len(ws))], stats


# ------------------------------------------------------------------------------------------- schedule

def test_default_schedule_is_the_old_cosine_lr_bit_for_bit():
    for epochs, warm, min_lr, spe in [(3, 0.0, 0.0, 7), (2.5, 1.0, 1e-5, 4), (1, 0.5, 0.0, 10), (24, 1, 0.0, 7)]:
        r = R(epochs=epochs, warmup_epochs=warm, min_lr=min_lr, lr=2e-3)
        total = max(1, int(round(epochs * spe)))
        warmup = int(round(warm * spe))
        assert [lr_at(s, r, spe) for s in range(total)] == [cosine_lr(s, total, 2e-3, warmup, min_lr)
                                                            for s in range(total)]
    lrs, stats = lr_trace(R(epochs=2, warmup_epochs=0.5))        # train() applies exactly that sequence
    assert lrs == pytest.approx([cosine_lr(s, 8, 0.1, 2) for s in range(8)], rel=1e-9)
    assert stats["lr_first"] == cosine_lr(0, 8, 0.1, 2) and stats["lr_last"] == cosine_lr(7, 8, 0.1, 2)
    assert stats["optimizer"] == "sgd" and stats["steps"] == 8


def test_poly_schedule_matches_the_formula():
    lrs, _ = lr_trace(R(epochs=3, schedule="poly", poly_power=0.9, min_lr=1e-3))
    T = 12
    assert lrs == pytest.approx([1e-3 + (0.1 - 1e-3) * (1 - s / T) ** 0.9 for s in range(T)], rel=1e-9)
    cos, _ = lr_trace(R(epochs=3, min_lr=1e-3))
    assert lrs != pytest.approx(cos, rel=1e-3)


def test_constant_schedule_and_min_lr():
    lrs, _ = lr_trace(R(epochs=2, schedule="constant", min_lr=0.05))
    assert lrs == pytest.approx([0.1] * 8, rel=1e-12)
    a, sa = lr_trace(R(epochs=2, min_lr=0.0))
    b, sb = lr_trace(R(epochs=2, min_lr=0.05))
    assert sb["lr_last"] == pytest.approx(0.05 + 0.025 * (1 + math.cos(math.pi * 7 / 8)))
    assert sa["lr_last"] == pytest.approx(0.05 * (1 + math.cos(math.pi * 7 / 8)))
    assert all(x >= 0.05 - 1e-12 for x in b) and a[0] == pytest.approx(b[0])   # same peak, higher floor


def test_schedule_unit_epoch_is_constant_within_an_epoch_and_matches_timm():
    from timm.scheduler import CosineLRScheduler
    lrs, _ = lr_trace(R(epochs=3, schedule_unit="epoch", min_lr=1e-3))
    per_epoch = [lrs[i:i + 4] for i in range(0, 12, 4)]
    for e, chunk in enumerate(per_epoch):
        assert chunk == pytest.approx([chunk[0]] * 4, rel=1e-9)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = CosineLRScheduler(opt, t_initial=3, lr_min=1e-3)
    ref = []
    for e in range(3):
        sched.step(e)
        ref.append(opt.param_groups[0]["lr"])
    assert [c[0] for c in per_epoch] == pytest.approx(ref, rel=1e-9)
    step_lrs, _ = lr_trace(R(epochs=3, min_lr=1e-3))
    assert step_lrs[1] != pytest.approx(step_lrs[0], rel=1e-6)        # per step: changes every step


def test_warmup_lr_is_timms_linear_warmup():
    from timm.scheduler import CosineLRScheduler
    lrs, _ = lr_trace(R(epochs=3, warmup_epochs=1, warmup_lr=1e-3, min_lr=1e-4))
    assert lrs[:4] == pytest.approx([1e-3 + (0.1 - 1e-3) * s / 4 for s in range(4)], rel=1e-9)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = CosineLRScheduler(opt, t_initial=12 - 4, lr_min=1e-4, warmup_t=4, warmup_lr_init=1e-3,
                              warmup_prefix=True, t_in_epochs=False)
    ref = []
    for s in range(12):
        sched.step_update(s)
        ref.append(opt.param_groups[0]["lr"])
    assert lrs == pytest.approx(ref, rel=1e-9)
    zero, _ = lr_trace(R(epochs=3, warmup_epochs=1, min_lr=1e-4))       # warmup_lr 0: the suite's (s+1)/W
    assert zero[:4] == pytest.approx([0.1 * (s + 1) / 4 for s in range(4)], rel=1e-9)


# ------------------------------------------------------------------------------------------- optimizer

def test_sgd_momentum_nesterov_and_adamw_betas_by_hand():
    c, lr = 2.0, 0.1
    r = R(epochs=0.5, lr=lr, optimizer="sgd", momentum=0.9, weight_decay=0.0, schedule="constant")   # 2 steps

    def run(recipe):
        m = Scalar()
        train(m, FakeTask(lambda mm: (c * mm.w).sum()), recipe, device="cpu", seed=0)
        return m.w.item()

    # heavy ball: v1 = g, v2 = 0.9 g + g -> w = 1 - lr g (1 + 1.9); Nesterov: steps g + 0.9 v: 1.9 g, 2.71 g
    assert run(r) == pytest.approx(1 - lr * c * 2.9, rel=1e-12)
    assert run(r.with_(nesterov=True)) == pytest.approx(1 - lr * c * (1.9 + 2.71), rel=1e-12)
    assert run(r.with_(momentum=0.0)) == pytest.approx(1 - lr * c * 2, rel=1e-12)
    # SGD weight decay is L2 on the gradient (Scalar's w is 1-D: under no_norm_bias it gets none; all: it does)
    wd = r.with_(momentum=0.0, weight_decay=0.5, weight_decay_groups="all", epochs=0.25)
    assert run(wd) == pytest.approx(1 - lr * (c + 0.5 * 1.0), rel=1e-12)
    # AdamW: the first step moves every coordinate by lr (m/sqrt(v) = sign(g)); betas change the second
    a = r.with_(optimizer="adamw")
    ref = nn.Parameter(torch.ones(1, dtype=torch.float64))
    opt = torch.optim.AdamW([ref], lr=lr, betas=(0.5, 0.6), weight_decay=0.0)
    for _ in range(2):
        opt.zero_grad()
        (c * ref).sum().backward()
        opt.step()
    assert run(a.with_(betas=[0.5, 0.6])) == pytest.approx(ref.item(), rel=1e-12)
    assert run(a) != pytest.approx(run(r), rel=1e-6)                   # adamw and sgd differ


def test_weight_decay_groups():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)
            self.norm = nn.LayerNorm(3)
            nn.init.constant_(self.norm.bias, 0.5)                  # nonzero, so decay would show
            self.pos_embed = nn.Parameter(torch.ones(1, 2, 3))
            self.embed = nn.Parameter(torch.ones(2, 3))

    class Adapter(ModelAdapter):
        family = "fake"

        def no_weight_decay_names(self, model):
            return {"pos_embed"}

    def zero_grad_loss(m):                  # every gradient exactly 0 (not None): AdamW only decays
        return sum((p * 0).sum() for p in m.parameters())

    def after(groups, adapter):
        torch.manual_seed(0)
        m = Net()
        before = {n: p.detach().clone() for n, p in m.named_parameters()}
        train(m, FakeTask(zero_grad_loss, n=4), R(lr=0.1, weight_decay=0.5, weight_decay_groups=groups),
              device="cpu", seed=0, adapter=adapter)
        return {n: bool(torch.allclose(p.detach(), before[n] * 0.95, atol=1e-7, rtol=0) and
                        not torch.equal(p.detach(), before[n])) for n, p in m.named_parameters()}

    nnb = after("no_norm_bias", Adapter("x", {}))
    assert nnb == {"fc.weight": True, "fc.bias": False, "norm.weight": False, "norm.bias": False,
                   "pos_embed": False, "embed": True}
    assert all(after("all", Adapter("x", {})).values())              # the official BLIP code: everything
    assert after("no_norm_bias", None)["pos_embed"] is True           # no adapter, no model.no_weight_decay()
    # the ViT adapter's default: timm's own VisionTransformer.no_weight_decay()
    cls, cfg = MODELS.get("vit_micro")
    ad = cls("vit_micro", cfg)
    vit = ad.build()
    g = param_groups(vit, R(), ad)
    assert {"pos_embed", "cls_token"} <= set(g[1]["names"]) and "blocks.0.attn.qkv.weight" in g[0]["names"]
    assert len(param_groups(vit, R(weight_decay_groups="all"), ad)) == 1


def test_clip_grad_bounds_the_gradient_the_optimizer_sees():
    c = torch.tensor([30.0, 40.0, 0.0], dtype=torch.float64)              # |g| = 50

    def step(**kw):
        m = Scalar(3)
        stats = train(m, FakeTask(lambda mm: (c * mm.w).sum(), n=4),
                      R(optimizer="sgd", momentum=0.0, weight_decay=0.0, schedule="constant", **kw),
                      device="cpu", seed=0)
        return (1.0 - m.w.detach()), stats

    d, stats = step(clip_grad=1.0)
    assert torch.allclose(d, 0.1 * c / 50, atol=1e-12) and stats["clipped_steps"] == 1   # norm 1 after clipping
    d, stats = step()
    assert torch.allclose(d, 0.1 * c, atol=1e-12) and "clipped_steps" not in stats
    d, _ = step(clip_grad=100.0)
    assert torch.allclose(d, 0.1 * c, atol=1e-12)                          # under the bound: untouched


def test_epochs_zero_trains_nothing():
    m = Scalar()
    stats = train(m, FakeTask(lambda mm: mm.w.sum()), R(epochs=0), device="cpu", seed=0)
    assert stats["steps"] == 0 and stats["lr_first"] is None and m.w.item() == 1.0


# ------------------------------------------------------------------------------------------- validation

def test_keyword_fields_unknown_key_and_refused_keys():
    m = Scalar()
    task = FakeTask(lambda mm: mm.w.sum())
    stats = train(m, task, epochs=1, lr=0.1, batch_size=4, device="cpu", seed=0, log_every=2,
                  log=lambda s: None)                                  # what the methods and the runner pass
    assert stats["steps"] == 4
    with pytest.raises(BenchError, match="mixupp: unknown key, did you mean mixup"):
        train(m, task, epochs=1, lr=0.1, batch_size=4, device="cpu", seed=0, mixupp=0.8)
    with pytest.raises(BenchError, match="lr"):
        train(m, task, epochs=1, lr="1e-3", batch_size=4, device="cpu", seed=0)
    with pytest.raises(BenchError, match=r"task fake does not implement label_smoothing, mixup \(it implements "
                                         r"no data-side keys\)"):
        train(m, task, R(mixup=0.8, label_smoothing=0.1), device="cpu", seed=0)
    with pytest.raises(BenchError, match="drop_path needs the model adapter"):
        train(m, task, R(drop_path=0.1), device="cpu", seed=0)
    cls, cfg = MODELS.get("bert_micro")
    with pytest.raises(BenchError, match=r"model family bert \(bert_micro\) does not implement drop_path"):
        train(m, task, R(drop_path=0.1), device="cpu", seed=0, adapter=cls("bert_micro", cfg))
    # a task that declares a key gets the recipe in both calls; keys at their default are never refused
    ok = FakeTask(lambda mm: mm.w.sum(), keys={"label_smoothing"})
    r = R(label_smoothing=0.1, mixup=0.0)
    train(Scalar(), ok, r, device="cpu", seed=0)
    assert ok.seen == [("batches", r), ("loss", r)]


def test_cifar10_refuses_crop_scale(tmp_path):
    t = Cifar10Task({"train_per_class": 12, "test_per_class": 4, "holdout_per_class": 2}, None, "micro", tmp_path)
    assert Cifar10Task.RECIPE_KEYS == frozenset(TASK_RECIPE_KEYS) - {"crop_scale"}
    with pytest.raises(BenchError, match=r"task cifar10 does not implement crop_scale \(it implements auto_augment"):
        train(nn.Linear(2, 2), t, R(crop_scale=[0.5, 1.0]), device="cpu", seed=0)


def test_data_blocks_are_typed():
    assert ImageNetTask.RECIPE_KEYS == frozenset(TASK_RECIPE_KEYS)
    with pytest.raises(BenchError, match="data.mixup: unknown key"):
        ImageNetTask({"mixup": 0.8}, None, "micro", "/nonexistent")
    with pytest.raises(BenchError, match="data.label_smoothing: unknown key"):
        Cifar10Task({"label_smoothing": 0.1}, None, "micro", "/nonexistent")
    t = ImageNetTask({}, None, "paper", "/nonexistent")
    assert t.settings.workers == 8 and t.image_size == 224 and t.settings.crop_pct == 0.875
    assert "8" in ImageNetTask.Data.model_fields["workers"].description
    assert ImageNetTask({}, None, "micro", "/x").micro_settings == {"num_classes": 10, "train_per_class": 160,
                                                                    "val_per_class": 40, "image_size": 32, "seed": 1234}
    assert all(f.description for D in (ImageNetTask.Data, Cifar10Task.Data) for f in D.model_fields.values())


# ------------------------------------------------------------------------------------------- drop path

def _vit():
    cls, cfg = MODELS.get("vit_micro")
    ad = cls("vit_micro", cfg)
    torch.manual_seed(0)
    return ad, ad.build().eval()


def test_drop_path_vit_per_block_rates_and_train_vs_eval():
    from timm.layers import DropPath
    ad, model = _vit()
    ref = copy.deepcopy(model)
    x = torch.randn(4, 3, 32, 32)
    ad.set_drop_path(model, 0.3)
    rates = torch.linspace(0, 0.3, 4).tolist()
    for blk, r in zip(model.blocks, rates):
        for dp in (blk.drop_path1, blk.drop_path2):
            assert (isinstance(dp, nn.Identity) and r == 0) or (isinstance(dp, DropPath) and dp.drop_prob == r)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))                             # eval: unchanged
        model.train()
        torch.manual_seed(1)
        a = model(x)
        b = model(x)
        ref.train()
        assert not torch.allclose(a, b) and not torch.allclose(a, ref(x))
    ad.set_drop_path(model, 0.0)
    assert all(isinstance(b.drop_path1, nn.Identity) for b in model.blocks)
    assert ad.RECIPE_KEYS == frozenset({"drop_path"})
    with pytest.raises(BenchError, match="does not implement drop_path"):
        ModelAdapter("x", {}).set_drop_path(model, 0.1)


def test_drop_path_in_train_is_applied_during_training_only(tmp_path):
    from timm.layers import DropPath
    ad, model = _vit()
    t = ImageNetTask(SMALL, None, "micro", tmp_path)
    seen = []
    stats = train(model, t, R(epochs=1, lr=1e-3, batch_size=8, drop_path=0.2), device="cpu", seed=0, adapter=ad,
                  on_step=lambda s, n: seen.append(model.blocks[-1].drop_path1))
    assert len(seen) == 3 and all(isinstance(d, DropPath) and d.drop_prob == pytest.approx(0.2) for d in seen)
    assert stats["drop_path"] == 0.2
    assert isinstance(model.blocks[-1].drop_path1, nn.Identity)          # the model's own again afterwards
    _, plain = _vit()
    train(plain, t, R(epochs=1, lr=1e-3, batch_size=8), device="cpu", seed=0, adapter=ad)
    assert not torch.equal(plain.blocks[-1].mlp.fc2.weight, model.blocks[-1].mlp.fc2.weight)


def test_drop_path_segmenter_encoder_and_blip_vision():
    from timm.layers import DropPath
    cls, cfg = MODELS.get("segmenter_micro")
    ad = cls("segmenter_micro", cfg)
    seg = ad.build()
    ad.set_drop_path(seg, 0.1)
    assert isinstance(seg.encoder.blocks[-1].drop_path2, DropPath) and seg.encoder.blocks[-1].drop_path2.drop_prob == \
        pytest.approx(0.1)
    assert all(isinstance(b.drop_path1, nn.Identity) for b in seg.decoder.blocks)   # official: decoder rate 0
    assert {"encoder.pos_embed", "encoder.cls_token"} <= ad.no_weight_decay_names(seg)

    cls, cfg = MODELS.get("blip_nlvr2_micro")
    ad = cls("blip_nlvr2_micro", cfg)
    torch.manual_seed(0)
    blip = ad.build().eval()
    enc = blip.visual_encoder
    x = torch.randn(2, 3, 32, 32)
    from transformers.models.blip.modeling_blip import BlipEncoderLayer
    h = enc.embeddings(x)
    with torch.no_grad():
        assert torch.equal(enc.layers[0](h), BlipEncoderLayer.forward(enc.layers[0], h))   # transformers' forward
        before = enc(x)
        ad.set_drop_path(blip, 0.2)
        n = len(enc.layers)
        assert [getattr(b.drop_path, "drop_prob", 0.0) for b in enc.layers] == pytest.approx(
            torch.linspace(0, 0.2, n).tolist())
        assert torch.equal(enc(x), before)
        enc.train()
        assert not torch.allclose(enc(x), enc(x))


# ------------------------------------------------------------------------------------------- data side: imagenet

@pytest.fixture(scope="module")
def inet(tmp_path_factory):
    t = ImageNetTask(SMALL, None, "micro", tmp_path_factory.mktemp("inet"))
    t.prepare()
    return t


def _first(task, recipe=None, seed=3, bs=8):
    return next(task.train_batches(bs, seed, recipe=recipe))


def test_micro_batches_without_augmentation_keys_are_unchanged(inet):
    """No augmentation key: the batch-wise crop + flip, draw for draw: the order from Generator(seed), the
    first micro-batch's crops from its own generator (tasks.common.batching)."""
    from tasks.common.batching import batch_seed
    x, y = inet._micro_split("train")
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(3))
    idx = perm[:8]
    from tasks.imagenet import _normalize
    g = torch.Generator().manual_seed(batch_seed(3, 0))
    ref = _normalize(random_resized_crop_flip(x[idx], 32, g, scale=(0.6, 1.0)))
    for recipe in (None, R(), R(crop_scale=[0.6, 1.0], hflip=0.5, label_smoothing=0.1)):
        xb, yb = _first(inet, recipe)
        assert torch.equal(xb, ref) and torch.equal(yb, y[idx])


def test_crop_scale_and_hflip(inet):
    plain, _ = _first(inet, R(hflip=0.0))
    flipped, _ = _first(inet, R(hflip=1.0))
    assert torch.allclose(flipped, plain.flip(-1), atol=1e-4)            # same crops, mirrored
    assert not torch.allclose(_first(inet, R(crop_scale=[0.2, 0.3]))[0], _first(inet)[0])
    tf = inet.train_transform(R(crop_scale=[0.2, 0.3], hflip=0.0))
    assert tf.transforms[0].scale == (0.2, 0.3) and tf.transforms[1].p == 0.0


def test_augmentation_keys_build_timms_transform_and_change_micro_batches(inet):
    from timm.data.auto_augment import RandAugment
    from timm.data.random_erasing import RandomErasing
    from torchvision.transforms import ColorJitter
    r = R(auto_augment="rand-m9-mstd0.5-inc1", reprob=0.25, remode="const", recount=2, crop_scale=[0.3, 1.0],
          hflip=0.2)
    tf = inet.train_transform(r).transforms
    kinds = [type(t).__name__ for t in tf]
    assert kinds[0] == "RandomResizedCropAndInterpolation" and tf[0].scale == (0.3, 1.0)
    assert tf[1].p == 0.2 and any(isinstance(t, RandAugment) for t in tf)
    er = next(t for t in tf if isinstance(t, RandomErasing))
    assert er.probability == 0.25 and er.mode == "const" and er.max_count == 2
    cj = next(t for t in inet.train_transform(R(color_jitter=0.4)).transforms if isinstance(t, ColorJitter))
    assert cj.brightness == (0.6, 1.4)
    assert not any(isinstance(t, ColorJitter) for t in inet.train_transform(R(reprob=0.5)).transforms)

    plain, y0 = _first(inet)
    state = (np.random.get_state()[1].copy(), torch.get_rng_state().clone())
    for recipe in (R(auto_augment="rand-m9-mstd0.5-inc1"), R(color_jitter=0.4)):
        a, ya = _first(inet, recipe)
        assert a.shape == plain.shape and not torch.allclose(a, plain) and torch.equal(ya, y0)
        assert torch.equal(a, _first(inet, recipe)[0])                   # seeded: the same batch again
        assert not torch.equal(a, _first(inet, recipe, seed=4)[0])
    assert np.array_equal(np.random.get_state()[1], state[0]) and torch.equal(torch.get_rng_state(), state[1])
    erased, _ = _first(inet, R(reprob=1.0, remode="const"))
    assert all(int((img == 0).all(0).sum()) > 0 for img in erased)     # every image has an erased (0) box


def test_mixup_cutmix_soft_targets_and_loss(inet):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 3))
    plain, y = _first(inet)
    hard = inet.loss(model, (plain, y), "cpu")
    for r in (R(mixup=0.8), R(cutmix=1.0), R(cutmix_minmax=[0.3, 0.6]), R(mixup=0.8, cutmix=1.0, mixup_mode="elem")):
        x, t = _first(inet, r)
        assert t.shape == (8, 3) and t.dtype == torch.float32
        assert torch.allclose(t.sum(1), torch.ones(8)) and not torch.equal(t, torch.eye(3)[y])
        assert not torch.allclose(x, plain)
        assert torch.equal(x, _first(inet, r)[0])                          # seeded
        loss = inet.loss(model, (x, t), "cpu", recipe=r)
        ref = -(t * torch.log_softmax(model(x), -1)).sum(1).mean()       # soft-target cross-entropy
        assert torch.allclose(loss, ref) and not torch.isclose(loss, hard)
    # cutmix pastes the flipped batch's pixels: each pixel is the image's own or its partner's
    x, t = _first(inet, R(cutmix=1.0))
    own, partner = (x - plain).abs().sum(1) < 1e-6, (x - plain.flip(0)).abs().sum(1) < 1e-6
    assert bool((own | partner).all()) and bool(partner.any())
    # mixup_prob 0: never mixed (only smoothing of the one-hot targets); switch_prob 1: always cutmix
    x, t = _first(inet, R(mixup=0.8, mixup_prob=0.0, label_smoothing=0.3))
    assert torch.equal(x, plain) and torch.allclose(t, torch.eye(3)[y] * 0.7 + 0.1)
    x, _ = _first(inet, R(mixup=0.8, cutmix=1.0, mixup_switch_prob=1.0))
    assert bool((((x - plain).abs().sum(1) < 1e-6) | ((x - plain.flip(0)).abs().sum(1) < 1e-6)).all())
    with pytest.raises(BenchError, match="even batch size"):
        inet.train_batches(7, 0, recipe=R(mixup=0.8))


def test_label_smoothing_changes_the_loss_by_the_expected_amount(inet):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 3))
    x, y = _first(inet)
    logp = torch.log_softmax(model(x), -1)
    nll, uniform = -logp.gather(1, y[:, None]).mean(), -logp.mean()
    for eps in (0.0, 0.1, 0.4):
        loss = inet.loss(model, (x, y), "cpu", recipe=R(label_smoothing=eps))
        assert torch.allclose(loss, (1 - eps) * nll + eps * uniform)


# ------------------------------------------------------------------------------------------- data side: cifar10

@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    t = Cifar10Task({"train_per_class": 12, "test_per_class": 4, "holdout_per_class": 2}, None, "micro",
                    tmp_path_factory.mktemp("cifar"))
    t.prepare()
    return t


def test_cifar10_recipe_keys_change_batches_and_loss(cifar):
    plain, y = _first(cifar, bs=10)
    assert torch.equal(plain, _first(cifar, R(), bs=10)[0])              # defaults: the batches of before
    for r in (R(hflip=0.0), R(auto_augment="rand-m9-mstd0.5-inc1"), R(color_jitter=0.4), R(reprob=1.0)):
        x, yy = _first(cifar, r, bs=10)
        assert x.shape == plain.shape and not torch.allclose(x, plain) and torch.equal(yy, y)
        assert torch.equal(x, _first(cifar, r, bs=10)[0])
    x, t = _first(cifar, R(mixup=0.8, label_smoothing=0.1), bs=10)
    assert t.shape == (10, 10) and torch.allclose(t.sum(1), torch.ones(10))
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    assert torch.isfinite(cifar.loss(model, (x, t), "cpu"))
    logp = torch.log_softmax(model(plain), -1)
    nll, uniform = -logp.gather(1, y[:, None]).mean(), -logp.mean()
    assert torch.allclose(cifar.loss(model, (plain, y), "cpu", recipe=R(label_smoothing=0.2)),
                          0.8 * nll + 0.2 * uniform)
