"""ImageNet task adapter: micro generator, layout checks, loaders, metrics, batches."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import tasks.imagenet as tim
from bench.errors import BenchError, MissingData
from bench.recipe import TrainRecipe
from tasks.imagenet import ImageNetTask, generate_micro

REPO = Path(__file__).resolve().parents[1]
SMALL = {"num_classes": 3, "train_per_class": 8, "val_per_class": 2, "image_size": 32, "seed": 7}


def micro_task(cache, **over):
    return ImageNetTask({**SMALL, **over}, None, "micro", cache)


def write_folder(root: Path, classes, per_class=2, size=(40, 48), seed=0):
    """A hand-made ImageFolder: <root>/<split>/<wnid>/*.JPEG for train and val."""
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for wnid in classes:
            d = root / split / wnid
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                a = rng.integers(0, 256, (size[0], size[1], 3), dtype=np.uint8)
                Image.fromarray(a).save(d / f"{wnid}_{i}.JPEG", quality=95)
    return root


# ------------------------------------------------------------------------------------------- generator

def test_generate_micro_layout_and_determinism(tmp_path):
    a = generate_micro(tmp_path / "a", **SMALL)
    b = generate_micro(tmp_path / "b", **SMALL)
    c = generate_micro(tmp_path / "c", **{**SMALL, "seed": 8})
    wnids = ["n00000000", "n00000001", "n00000002"]
    assert sorted(p.name for p in (a / "train").iterdir()) == wnids
    assert sorted(p.name for p in (a / "val").iterdir()) == wnids
    train = sorted(p.name for p in (a / "train" / "n00000001").iterdir())
    assert train == sorted(f"n00000001_{i}.JPEG" for i in range(8))
    val = sorted(p.relative_to(a / "val").as_posix() for p in (a / "val").rglob("*.JPEG"))
    assert len(val) == 6 and all(v.split("/")[1].startswith("ILSVRC2012_val_000000") for v in val)
    assert len({v.split("/")[1] for v in val}) == 6            # val numbering runs over the whole split
    readme = (a / "README.txt").read_text()
    assert "generate_micro" in readme and '"seed": 7' in readme
    with Image.open(a / "train" / "n00000002" / "n00000002_3.JPEG") as im:
        assert im.format == "JPEG" and im.size == (32, 32) and im.mode == "RGB"
    for rel in ("train/n00000000/n00000000_0.JPEG", "val/" + val[-1], "README.txt"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes()
    assert (a / "train/n00000000/n00000000_0.JPEG").read_bytes() != (c / "train/n00000000/n00000000_0.JPEG").read_bytes()


def test_micro_images_differ_between_classes_and_samples(tmp_path):
    root = generate_micro(tmp_path / "d", **SMALL)
    arrs = [np.asarray(Image.open(p), np.float32) for p in sorted((root / "train").rglob("*.JPEG"))]
    assert len(arrs) == 24
    diffs = [np.abs(arrs[i] - arrs[j]).mean() for i in range(len(arrs)) for j in range(i)]
    assert min(diffs) > 5                                       # no duplicates, real variation


# ------------------------------------------------------------------------------------------- prepare (micro)

def test_micro_prepare_location_and_reuse(tmp_path):
    t = micro_task(tmp_path)
    t.prepare()
    root = t.root
    assert root.parent == tmp_path / "data" and root.name.startswith("imagenet_micro-")
    assert (root / "README.txt").is_file()
    assert [p.name for p in root.parent.iterdir()] == [root.name]      # no temp folder left
    stamp = (root / "README.txt").stat().st_mtime_ns
    t2 = micro_task(tmp_path)
    t2.prepare()
    assert t2.root == root and (root / "README.txt").stat().st_mtime_ns == stamp   # reused, not rewritten
    assert micro_task(tmp_path, seed=8).root != root                   # settings are part of the name
    assert t.classes == ["n00000000", "n00000001", "n00000002"] and t.num_classes == 3


def test_micro_interrupted_generation_is_not_used(tmp_path, monkeypatch):
    calls = {"n": 0}
    real_save = tim._save_jpeg

    def failing_save(img, path):
        calls["n"] += 1
        if calls["n"] > 5:
            raise OSError("disk full (simulated)")
        real_save(img, path)

    monkeypatch.setattr(tim, "_save_jpeg", failing_save)
    t = micro_task(tmp_path)
    with pytest.raises(OSError, match="simulated"):
        t.prepare()
    assert not t.root.exists()
    assert list((tmp_path / "data").iterdir()) == []                   # the temp folder was removed
    monkeypatch.setattr(tim, "_save_jpeg", real_save)
    t = micro_task(tmp_path)
    t.prepare()
    assert t.train_size == 24


def test_micro_stale_temp_and_incomplete_folder_are_replaced(tmp_path):
    t = micro_task(tmp_path)
    final = t.root
    final.parent.mkdir(parents=True)
    # what a `kill -9` during generation leaves behind: a temp sibling of a dead process
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = final.with_name(f".{final.name}.tmp-{socket.gethostname()}-{dead.pid}-abcdef")
    (stale / "train" / "n00000000").mkdir(parents=True)
    (stale / "train" / "n00000000" / "n00000000_0.JPEG").write_bytes(b"\xff\xd8 truncated")
    # a final folder that did not come from the atomic rename (no README.txt): not trusted
    (final / "train" / "n00000000").mkdir(parents=True)
    t.prepare()
    assert not stale.exists()
    assert (final / "README.txt").is_file()
    assert t.train_size == 24 and t.evaluate(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 3)), "val")["n"] == 6


def test_micro_kill9_during_generation(tmp_path):
    """A real SIGKILL mid-generation leaves no data set that a later run trusts."""
    code = (
        "import sys, time\n"
        "import tasks.imagenet as tim\n"
        "real = tim._save_jpeg\n"
        "def slow(img, path):\n"
        "    real(img, path); time.sleep(0.05)\n"
        "tim._save_jpeg = slow\n"
        f"tim.ImageNetTask({SMALL!r}, None, 'micro', sys.argv[1]).prepare()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, env=env)
    t = micro_task(tmp_path)
    deadline = time.time() + 60
    try:
        while time.time() < deadline and p.poll() is None:
            tmps = list((tmp_path / "data").glob(".imagenet_micro-*.tmp-*")) if (tmp_path / "data").exists() else []
            if tmps and len(list(tmps[0].rglob("*.JPEG"))) >= 3:
                break
            time.sleep(0.02)
        assert p.poll() is None, "generator finished before it could be killed"
        os.kill(p.pid, signal.SIGKILL)
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()
    assert not t.root.exists()
    t.prepare()
    assert t.train_size == 24
    assert [q.name for q in (tmp_path / "data").iterdir()] == [t.root.name]


# ------------------------------------------------------------------------------------------- paper profile

def test_paper_missing_data_set(tmp_path):
    t = ImageNetTask({}, tmp_path, "paper", tmp_path / "cache")
    with pytest.raises(MissingData) as e:
        t.prepare()
    msg = str(e.value)
    assert str(tmp_path / "imagenet") in msg and "train/<wnid>" in msg and "val/<wnid>" in msg
    assert "--data-root" in msg and "BENCH_DATA" in msg
    # train there, val missing: the message names the val folder
    write_folder(tmp_path / "imagenet", ["n01", "n02"])
    import shutil
    shutil.rmtree(tmp_path / "imagenet" / "val")
    with pytest.raises(MissingData, match=str(tmp_path / "imagenet" / "val")):
        ImageNetTask({}, tmp_path, "paper", tmp_path / "cache").prepare()
    # val folder without class folders
    (tmp_path / "imagenet" / "val").mkdir()
    with pytest.raises(MissingData, match="wnid"):
        ImageNetTask({}, tmp_path, "paper", tmp_path / "cache").prepare()


def test_paper_flat_val_and_class_mismatch(tmp_path):
    root = write_folder(tmp_path / "imagenet", ["n01", "n02", "n03"])
    import shutil
    shutil.rmtree(root / "val" / "n03")
    with pytest.raises(BenchError, match="val classes differ") as e:
        ImageNetTask({}, tmp_path, "paper", tmp_path / "c").prepare()
    assert not isinstance(e.value, MissingData) and "n03" in str(e.value)
    shutil.rmtree(root / "val")
    (root / "val").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "val" / "ILSVRC2012_val_00000001.JPEG")
    with pytest.raises(BenchError, match="not sorted into class folders"):
        ImageNetTask({}, tmp_path, "paper", tmp_path / "c").prepare()


def test_paper_loader_evaluate_and_train(tmp_path):
    write_folder(tmp_path / "imagenet", ["n01440764", "n01443537", "n01484850"])
    t = ImageNetTask({"workers": 0, "image_size": 32}, tmp_path, "paper", tmp_path / "cache")
    recipe = TrainRecipe(epochs=1, lr=1.0e-3, batch_size=4, auto_augment="rand-m9-mstd0.5-inc1", reprob=0.25)
    t.prepare()
    assert t.classes == ["n01440764", "n01443537", "n01484850"] and t.train_size == 6
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 3))
    r = t.evaluate(model, "val", "cpu")
    assert set(r) == {"top1", "top5", "n"} and 0 <= r["top1"] <= 100 and r["top5"] == 100.0 and r["n"] == 6
    assert model.training                                   # mode restored
    x, y = next(t.train_batches(4, seed=0, recipe=recipe))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.long
    assert t.steps_per_epoch(4) == 1
    assert torch.isfinite(t.loss(model, (x, y), "cpu", recipe=recipe))
    fp = t.fingerprint()
    assert fp["root"] == str((tmp_path / "imagenet").resolve()) and fp["layout_version"] == tim.LAYOUT_VERSION


def test_paper_mixup_loss(tmp_path):
    write_folder(tmp_path / "imagenet", ["n01", "n02", "n03"])
    t = ImageNetTask({"workers": 0, "image_size": 32}, tmp_path, "paper", tmp_path / "cache")
    recipe = TrainRecipe(epochs=1, lr=1.0e-3, batch_size=4, mixup=0.8, cutmix=1.0, label_smoothing=0.1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 3))
    x, y = next(t.train_batches(4, seed=0, recipe=recipe))
    assert y.shape == (4, 3) and torch.allclose(y.sum(1), torch.ones(4))     # soft targets
    loss = t.loss(model, (x, y), "cpu", recipe=recipe)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()


class FixedLogits(nn.Module):
    """Returns a fixed logit row per image, in the order the images come."""

    def __init__(self, rows):
        super().__init__()
        self.rows = rows
        self.i = 0

    def forward(self, x):
        out = self.rows[self.i:self.i + x.shape[0]]
        self.i += x.shape[0]
        return out


def test_topk_metrics_exact(tmp_path):
    classes = [f"n0{i}" for i in range(7)]
    write_folder(tmp_path / "imagenet", classes, per_class=1, size=(8, 8))
    t = ImageNetTask({"workers": 0, "image_size": 8}, tmp_path, "paper", tmp_path / "cache")
    # val image k has label k (one per class, sorted order); rank of the true class in each row:
    ranks = [0, 0, 1, 4, 5, 6, 2]                           # top-1: 2 of 7; top-5: 5 of 7
    rows = torch.zeros(7, 7)
    for k, rank in enumerate(ranks):
        order = [c for c in range(7) if c != k]
        order.insert(rank, k)                               # order[j] gets the j-th highest logit
        for j, c in enumerate(order):
            rows[k, c] = 10.0 - j
    r = t.evaluate(FixedLogits(rows), "val", "cpu")
    assert r["n"] == 7
    assert r["top1"] == pytest.approx(100 * 2 / 7) and r["top5"] == pytest.approx(100 * 5 / 7)
    with pytest.raises(BenchError, match="split"):
        t.evaluate(FixedLogits(rows), "test", "cpu")


# ------------------------------------------------------------------------------------------- micro batches

def test_micro_train_batches(tmp_path):
    t = micro_task(tmp_path)
    assert t.train_size == 24 and t.steps_per_epoch(8) == 3 and t.steps_per_epoch(64) == 1
    it = t.train_batches(8, seed=3)
    epoch = [next(it) for _ in range(3)]
    for x, y in epoch:
        assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.long
        assert torch.isfinite(x).all() and -3 < x.min() and x.max() < 3     # normalised
    labels = torch.cat([y for _, y in epoch])
    assert torch.bincount(labels, minlength=3).tolist() == [8, 8, 8]       # each image once per epoch
    again = t.train_batches(8, seed=3)
    x0, y0 = next(again)
    assert torch.equal(x0, epoch[0][0]) and torch.equal(y0, epoch[0][1])  # seeded
    x1, y1 = next(t.train_batches(8, seed=4))
    assert not torch.equal(x1, epoch[0][0])
    nxt = torch.cat([next(it)[1] for _ in range(3)])                        # endless, reshuffled
    assert torch.bincount(nxt, minlength=3).tolist() == [8, 8, 8]
    # a batch larger than the split still yields whole epochs
    xb, yb = next(t.train_batches(100, seed=0))
    assert xb.shape[0] == 24


def test_micro_eval_matches_per_image_transform(tmp_path):
    t = micro_task(tmp_path)
    t.prepare()
    path = sorted((t.root / "val" / "n00000001").iterdir())[0]
    with Image.open(path) as im:
        ref = t.eval_transform()(im.convert("RGB"))
    seen = []

    class Spy(nn.Module):
        def forward(self, x):
            seen.append(x.clone())
            return torch.zeros(x.shape[0], 3)

    r = t.evaluate(Spy(), "val", "cpu")
    assert r["n"] == 6 and r["top1"] == pytest.approx(100 / 3)            # all predicted class 0
    assert any(torch.allclose(ref, s, atol=1e-6) for s in torch.cat(seen))
    assert t.evaluate(Spy(), "train", "cpu")["n"] == 24


def test_micro_loss_and_label_smoothing(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 3))
    t = micro_task(tmp_path)
    batch = next(t.train_batches(8, seed=0))
    plain = t.loss(model, batch, "cpu")
    smooth = t.loss(model, batch, "cpu", recipe=TrainRecipe(epochs=1, lr=1.0e-3, batch_size=8, label_smoothing=0.1))
    assert plain.ndim == 0 and torch.isfinite(plain) and not torch.isclose(plain, smooth)


def test_random_resized_crop_flip_identity_and_range():
    x = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    out = tim.random_resized_crop_flip(x, 16, g, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0)
    assert torch.allclose(out * 255, x.float(), atol=1e-3)                # full crop, no flip = identity
    out = tim.random_resized_crop_flip(x, 16, g, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=1.0)
    assert torch.allclose(out * 255, x.flip(-1).float(), atol=1e-3)
    out = tim.random_resized_crop_flip(x, 8, g)
    assert out.shape == (4, 3, 8, 8) and 0 <= out.min() and out.max() <= 1


# ------------------------------------------------------------------------------------------- misc

def test_dummy_inputs_and_fingerprint(tmp_path):
    t = micro_task(tmp_path)
    (x,) = t.dummy_inputs({"img_size": 224}, 2, "meta")
    assert x.shape == (2, 3, 224, 224) and x.device.type == "meta"
    (x,) = t.dummy_inputs({"img_size": 32}, 5, "cpu")
    assert x.shape == (5, 3, 32, 32)
    fp = t.fingerprint()
    assert fp["generator_version"] == tim.GENERATOR_VERSION and fp["seed"] == 7 and fp["num_classes"] == 3
    assert micro_task(tmp_path, seed=8).fingerprint() != fp
    assert not (tmp_path / "data").exists()                                # fingerprint does not generate
    assert ImageNetTask.name == "imagenet" and ImageNetTask.metrics == {"top1": True, "top5": True}
    assert "train/<wnid>/*.JPEG" in ImageNetTask.layout and "val/<wnid>/*.JPEG" in ImageNetTask.layout


def test_unknown_profile(tmp_path):
    with pytest.raises(BenchError, match="profile"):
        ImageNetTask({}, tmp_path, "tiny", tmp_path)


# ------------------------------------------------------------------------------------------- slow

@pytest.mark.slow
def test_vit_micro_learns_micro_imagenet(tmp_path):
    """The card's dense recipe (AdamW 2e-3, batch 64, 20 epochs) on the default micro data: 80-99 % top-1:
    learnable, but not trivial (so pruning can hurt)."""
    from bench.registry import MODELS
    from bench.training import train
    cls, cfg = MODELS.get("vit_micro")
    torch.manual_seed(0)
    t = ImageNetTask(dict(tim.MICRO_DEFAULTS), None, "micro", tmp_path)
    t.prepare()
    model = cls("vit_micro", cfg).build()
    train(model, t, epochs=20, lr=2e-3, batch_size=64, device="cpu", seed=0, weight_decay=0.05, warmup_epochs=1)
    r = t.evaluate(model, "val", "cpu")
    assert 80 <= r["top1"] <= 99, r
