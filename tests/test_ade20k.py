"""ADE20K task adapter: layout reading and errors, labels, mIoU from the confusion matrix, sliding-window
and multi-scale inference, augmentation, the micro generator and the card."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import tasks.ade20k as ade
from bench.errors import BenchError, MissingData
from metrics.segmentation import IGNORE_INDEX, confusion_matrix, segmentation_metrics
from tasks.ade20k import ADE20KTask, generate_micro, read_label
from tasks.common.seg_inference import predict_probs, sliding_window_logits, tta_inputs, window_anchors
from tasks.common.seg_transforms import batch_train_transform, rescale_size, train_transform
from tests.conftest import build

SMALL = {"num_classes": 8, "train_images": 6, "val_images": 3, "height": 32, "width": 48, "seed": 3}


def write_ade(root: Path, n_train=3, n_val=2, size=(20, 30), n_cls=4, seed=0) -> Path:
    """A hand-made ADE20K layout under root/ade20k/ADEChallengeData2016."""
    rng = np.random.default_rng(seed)
    base = root / "ade20k" / "ADEChallengeData2016"
    for split, n, prefix in (("training", n_train, "ADE_train_"), ("validation", n_val, "ADE_val_")):
        (base / "images" / split).mkdir(parents=True)
        (base / "annotations" / split).mkdir(parents=True)
        for i in range(n):
            stem = f"{prefix}{i + 1:08d}"
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(base / "images" / split / f"{stem}.jpg")
            Image.fromarray(rng.integers(0, n_cls + 1, size, dtype=np.uint8), mode="L").save(
                base / "annotations" / split / f"{stem}.png")
    return base


# ------------------------------------------------------------------------------------------- layout

def test_loader_reads_the_ade20k_layout(tmp_path):
    base = write_ade(tmp_path)
    task = ADE20KTask({"num_classes": 4}, tmp_path, "paper", tmp_path / "cache")
    task.prepare()
    pairs = task.pairs("validation")
    assert [(p.name, a.name) for p, a in pairs] == [("ADE_val_00000001.jpg", "ADE_val_00000001.png"),
                                                      ("ADE_val_00000002.jpg", "ADE_val_00000002.png")]
    assert task.pairs("val") == pairs and len(task.pairs("train")) == 3 and task.steps_per_epoch(2) == 1
    raw = np.asarray(Image.open(base / "annotations" / "training" / "ADE_train_00000001.png"))
    lab = read_label(base / "annotations" / "training" / "ADE_train_00000001.png")
    assert lab.dtype == np.uint8 and lab.shape == (20, 30)
    assert np.array_equal(lab == IGNORE_INDEX, raw == 0)                    # 0 = unlabelled -> ignore
    assert np.array_equal(lab[raw > 0], raw[raw > 0] - 1)                   # 1..n -> 0..n-1
    img, y = ade._EvalSet(pairs)[1]
    assert img.shape == (3, 20, 30) and img.dtype == torch.uint8 and y.shape == (20, 30)
    x, t = ade._TrainSet(task.pairs("training"), dict(scale=(64, 16), crop=16, ratio_range=(0.5, 2.0),
                                                        cat_max_ratio=0.75, normalization="vit"))[(0, 123)]
    assert x.shape == (3, 16, 16) and t.shape == (16, 16) and t.dtype == torch.long
    with pytest.raises(BenchError, match="splits 'validation'"):
        task.pairs("test")


def test_missing_annotation_is_a_clear_error(tmp_path):
    base = write_ade(tmp_path)
    (base / "annotations" / "validation" / "ADE_val_00000002.png").unlink()
    task = ADE20KTask({}, tmp_path, "paper", tmp_path / "cache")
    with pytest.raises(BenchError, match=r"annotations/validation/ADE_val_00000002\.png is missing"):
        task.prepare()


def test_missing_data_set_names_the_path(tmp_path):
    with pytest.raises(MissingData, match="ADEChallengeData2016"):
        ADE20KTask({}, tmp_path, "paper", tmp_path / "cache").prepare()


# ------------------------------------------------------------------------------------------- metrics

def test_miou_on_hand_made_label_maps_with_ignore_pixels():
    gt = torch.tensor([[0, 0, 1, 1],
                       [2, 2, IGNORE_INDEX, IGNORE_INDEX]])
    pred = torch.tensor([[0, 1, 1, 1],
                         [2, 0, 3, 1]])                   # predictions on ignore pixels never count
    cm = confusion_matrix(pred, gt, 4)
    assert cm.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    m = segmentation_metrics(cm)
    # IoU: class 0 = 1/(2+2-1), class 1 = 2/(2+3-2), class 2 = 1/(2+1-1); class 3: neither in gt nor predicted
    assert m["per_class_iou"][:3] == pytest.approx([100 / 3, 200 / 3, 50.0])
    assert m["per_class_iou"][3] is None
    assert m["miou"] == pytest.approx(50.0)
    assert m["pixel_acc"] == pytest.approx(400 / 6)
    # a class predicted but absent from the ground truth counts, with IoU 0
    pred2 = pred.clone()
    pred2[0, 0] = 3
    m2 = segmentation_metrics(confusion_matrix(pred2, gt, 4))
    assert m2["per_class_iou"][3] == 0.0
    assert m2["miou"] == pytest.approx((0 + 200 / 3 + 50 + 0) / 4)
    # accumulating image by image = one big image
    both = confusion_matrix(pred, gt, 4) + confusion_matrix(pred2, gt, 4)
    assert torch.equal(both, confusion_matrix(torch.cat([pred, pred2]), torch.cat([gt, gt]), 4))
    with pytest.raises(BenchError, match="label 7 outside"):
        confusion_matrix(pred, torch.full_like(gt, 7), 4)


# ------------------------------------------------------------------------------------------- inference

@pytest.fixture(scope="module")
def micro_seg():
    return build("segmenter_micro")[1]


def test_sliding_window_equals_whole_image_when_the_window_covers_it(micro_seg):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for h, w in ((64, 64), (48, 56)):                       # window = image, window larger than image
            x = torch.randn(3, h, w, generator=g)
            whole = micro_seg(x[None])[0]
            assert torch.equal(sliding_window_logits(micro_seg, x, 64, 60), whole)
        # single scale, image already at the (256, 64) scale and the window's size: one window, no resize
        x = torch.randn(3, 64, 64, generator=g)
        probs = predict_probs(micro_seg, x, scale=(256, 64), window=64, stride=60)
        assert torch.allclose(probs, micro_seg(x[None])[0].softmax(0), atol=1e-6)


def test_sliding_windows_are_averaged_where_they_overlap():
    conv = nn.Conv2d(3, 5, 1)                 # per-pixel model: any tiling must give the whole-image logits
    x = torch.randn(3, 50, 70)
    with torch.no_grad():
        whole = conv(x[None])[0]
        assert torch.allclose(sliding_window_logits(conv, x, 32, 20), whole, atol=1e-6)
    assert window_anchors(70, 32, 20) == [0, 20, 38]        # Segmenter: < size - window, then size - window
    assert window_anchors(64, 64, 60) == [0] and window_anchors(50, 64, 60) == [0]


def test_multiscale_inputs_follow_mmseg_and_segmenter():
    im = torch.randn(3, 40, 60)
    sizes = [tuple(x.shape[-2:]) for x, _ in tta_inputs(im, scale=(256, 64), window=64, ratios=(0.5, 1.0, 1.75))]
    # (long, short) = (256, 64) x r, keep ratio, then the short side is raised to the 64-pixel window
    assert rescale_size(40, 60, (128, 32)) == (32, 48) and sizes[0] == (64, 96)
    assert sizes[1] == (64, 96) and sizes[2] == rescale_size(40, 60, (448, 112)) == (112, 168)
    flips = [f for _, f in tta_inputs(im, scale=(256, 64), window=64, ratios=(1.0, 1.5), flip=True)]
    assert flips == [False, True, False, True]
    conv = nn.Conv2d(3, 4, 1)
    with torch.no_grad():
        p = predict_probs(conv, im, scale=(256, 64), window=64, stride=60, ratios=(0.5, 1.0, 1.75), flip=True)
    assert p.shape == (4, 40, 60) and torch.allclose(p.sum(0), torch.full((40, 60), 6.0), atol=1e-4)


# ------------------------------------------------------------------------------------------- augmentation

def test_paper_train_transform_crops_pads_and_keeps_labels():
    import random
    rng = random.Random(0)
    img = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    lab = np.random.default_rng(1).integers(0, 3, (30, 40)).astype(np.uint8)
    lab[:5] = IGNORE_INDEX
    for _ in range(5):
        x, y = train_transform(img, lab, rng, scale=(128, 32), crop=32, ratio_range=(0.5, 2.0),
                               cat_max_ratio=0.75, normalization="vit")
        assert x.shape == (3, 32, 32) and y.shape == (32, 32)
        assert set(y.unique().tolist()) <= {0, 1, 2, IGNORE_INDEX}
        assert float(x.abs().max()) <= 1.0 + 1e-6                     # vit normalisation of [0, 1] -> [-1, 1]
    # a resize below the crop size is padded: image 0, label ignore
    x, y = train_transform(img, lab, rng, scale=(64, 16), crop=32, ratio_range=(1.0, 1.0), cat_max_ratio=None,
                           normalization="vit")
    assert (y[16:] == IGNORE_INDEX).all() and (x[:, 16:] == 0).all()


def test_micro_batch_augmentation():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (4, 3, 32, 48), dtype=torch.uint8)
    y = torch.randint(0, 5, (4, 32, 48), dtype=torch.uint8)
    y[:, :, :4] = IGNORE_INDEX
    img, lab = batch_train_transform(x, y, g, scale=(128, 32), crop=32, ratio_range=(0.5, 2.0), normalization="vit")
    assert img.shape == (4, 3, 32, 32) and lab.shape == (4, 32, 32) and lab.dtype == torch.long
    assert set(lab.unique().tolist()) <= {0, 1, 2, 3, 4, IGNORE_INDEX}
    # ratio 1, no padding needed: labels are a crop of the original (possibly flipped)
    img, lab = batch_train_transform(x, y, g, scale=(128, 32), crop=32, ratio_range=(1.0, 1.0), normalization="vit")
    for b in range(4):
        found = any(torch.equal(lab[b], t[:, o:o + 32].long()) for t in (y[b], y[b].flip(-1)) for o in range(17))
        assert found
    # half size: the bottom half of the crop is padding (ignore, image 0)
    img, lab = batch_train_transform(x, y, g, scale=(64, 16), crop=32, ratio_range=(1.0, 1.0), normalization="vit")
    assert (lab[:, 17:] == IGNORE_INDEX).all() and (img[:, :, 17:] == 0).all()


# ------------------------------------------------------------------------------------------- micro data, task

def test_generate_micro_layout_and_determinism(tmp_path):
    a = generate_micro(tmp_path / "a", **SMALL)
    b = generate_micro(tmp_path / "b", **SMALL)
    base = a / "ADEChallengeData2016"
    assert sorted(p.name for p in (base / "images" / "training").iterdir()) == \
        [f"ADE_train_{i:08d}.jpg" for i in range(1, 7)]
    assert sorted(p.name for p in (base / "annotations" / "validation").iterdir()) == \
        [f"ADE_val_{i:08d}.png" for i in range(1, 4)]
    with Image.open(base / "annotations" / "training" / "ADE_train_00000002.png") as im:
        assert im.mode == "L" and im.size == (48, 32)
        assert int(np.asarray(im).max()) <= 8
    for rel in ("ADEChallengeData2016/images/training/ADE_train_00000001.jpg",
                "ADEChallengeData2016/annotations/validation/ADE_val_00000003.png", "README.txt"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes()


def test_micro_task_evaluate_with_a_constant_model(tmp_path):
    task = ADE20KTask(SMALL, None, "micro", tmp_path / "cache")
    task.prepare()
    assert task.root.parent.parent == tmp_path / "cache" / "data"
    x, y = task._micro_split("validation")
    assert x.shape == (3, 3, 32, 48) and y.shape == (3, 32, 48)

    class Ground(nn.Module):          # predicts class 1 everywhere
        def forward(self, im):
            out = torch.zeros(im.shape[0], 8, *im.shape[-2:])
            out[:, 1] = 1.0
            return out

    res = task.evaluate(Ground(), "validation")
    valid = y != IGNORE_INDEX
    present = set(y[valid].unique().tolist()) | {1}
    iou1 = float((y == 1).sum()) / float(valid.sum())
    assert res["pixel_acc"] == pytest.approx(100 * iou1)
    assert res["miou"] == pytest.approx(100 * iou1 / len(present))
    assert res["miou_ms"] == pytest.approx(res["miou"]) and res["n"] == 3
    assert sum(v is not None for v in res["per_class_iou"]) == len(present)
    batch = next(task.train_batches(4, 0))
    assert batch[0].shape == (4, 3, 64, 64) and batch[1].shape == (4, 64, 64)
    model = build("segmenter_micro")[1]
    assert torch.isfinite(task.loss(model, batch, "cpu"))
    assert task.dummy_inputs({"img_size": 64}, 2, "cpu")[0].shape == (2, 3, 64, 64)


def test_card_is_valid():
    from bench.cards import load_card, validate_card
    assert validate_card(load_card("upop_ade20k")) == []


class _Ground(nn.Module):          # predicts class 1 everywhere
    def forward(self, im):
        out = torch.zeros(im.shape[0], 8, *im.shape[-2:])
        out[:, 1] = 1.0
        return out


def test_selection_evaluates_single_scale_with_the_selection_stride(tmp_path, monkeypatch):
    """selection: paper evaluates as the official retrain (compress_segmenter.py l. 420 ff., segm/engine.py
    evaluate): single scale, stride selection_window_stride; the reported evaluation keeps window_stride."""
    task = ADE20KTask({**SMALL, "selection_window_stride": 32}, None, "micro", tmp_path / "cache")
    calls = []
    real = ade.predict_probs
    monkeypatch.setattr(ade, "predict_probs",
                        lambda *a, **k: calls.append((k["stride"], k.get("ratios"))) or real(*a, **k))
    res = task.evaluate_for_selection(_Ground(), "validation", "cpu", "miou")
    assert calls == [(32, None)] * 3 and "miou_ms" not in res and res["n"] == 3
    calls.clear()
    res_ms = task.evaluate_for_selection(_Ground(), "validation", "cpu", "miou_ms")     # a multi-scale metric
    assert [c[0] for c in calls] == [32] * 6 and sum(c[1] is not None for c in calls) == 3 and "miou_ms" in res_ms
    calls.clear()
    full = task.evaluate(_Ground(), "validation")
    assert {c[0] for c in calls} == {60}                 # the reported one: window 64, stride 15/16 of it
    assert full["miou"] == pytest.approx(res["miou"])
    plain = ADE20KTask(SMALL, None, "micro", tmp_path / "cache")
    calls.clear()
    plain.evaluate_for_selection(_Ground(), "validation", "cpu", "miou")
    assert calls == [(60, None)] * 3                       # unset: the evaluation's stride
    assert "selection_window_stride" not in plain.settings.to_dict()     # at its default: the hash is unchanged


def test_paper_profile_selects_as_the_official_retrain():
    from bench.cards import load_card, parse_card
    card = parse_card(load_card("upop_ade20k"))
    paper, micro = card.profile("paper"), card.profile("micro")
    assert (paper.finetune.selection, paper.finetune.selection_every) == ("paper", 2)
    assert paper.data["selection_window_stride"] == 512 and paper.data["window_stride"] == 480
    assert micro.finetune.selection_every == 1 and "selection_window_stride" not in micro.data
    deviations = next(n for n in card.notes if n.startswith("Remaining deviations"))
    assert "Selection cadence:" not in deviations and " (3) " not in deviations
