"""Data errors name the file, early: truncated images are found at prepare (before any training) by
tasks.common.files.scan_images; a decode error at load time still names the file; annotation JSON that is not
UTF-8, has a syntax error or lacks a required field is a BenchError naming the file (line / record / field);
the CLI exits 2 with one line and no traceback."""
import json

import numpy as np
import pytest
from PIL import Image

from bench.cli import main
from bench.errors import BenchError, MissingData
from tasks.common.files import image_problem, load_image, read_json, require_fields, scan_images


def _jpeg(path, size=(24, 32), seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(a).save(path, quality=90)
    return path


def _cut(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def _imagenet(root, classes=("n01", "n02"), per_class=2):
    for split in ("train", "val"):
        for c in classes:
            for i in range(per_class):
                _jpeg(root / "imagenet" / split / c / f"{c}_{i}.JPEG", seed=hash((split, c, i)) % 1000)
    return root / "imagenet"


# ---------------------------------------------------------------------------------------------------
# the checks themselves

def test_image_problem_and_load_image(tmp_path):
    good = _jpeg(tmp_path / "a.jpg")
    assert image_problem(good) is None
    padded = _jpeg(tmp_path / "padded.jpg")
    padded.write_bytes(padded.read_bytes() + b"\x00" * 16)            # padding after the EOI marker: fine
    assert image_problem(padded) is None
    trailer = _jpeg(tmp_path / "trailer.jpg")
    trailer.write_bytes(trailer.read_bytes() + b"SEFT camera trailer data")   # decodes in full: fine
    assert image_problem(trailer) is None
    cut = _cut(_jpeg(tmp_path / "cut.jpg"))
    assert "FF D9" in image_problem(cut)
    png = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8), np.uint8), mode="L").save(png)
    assert image_problem(png) is None
    png.write_bytes(png.read_bytes()[:-12])                              # no IEND chunk
    assert "IEND" in image_problem(png)
    (tmp_path / "junk.jpg").write_bytes(b"not an image at all")
    assert "identify" in image_problem(tmp_path / "junk.jpg")
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert "empty" in image_problem(tmp_path / "empty.jpg")
    # the first bad file in the given order is named, with the fix
    with pytest.raises(BenchError) as e:
        scan_images([good, padded, cut, png], "the test images")
    assert str(e.value).startswith(f"{cut}: truncated or unreadable image (") and "replace or remove it" in str(e.value)
    with pytest.raises(MissingData, match="gone.jpg"):
        scan_images([good, tmp_path / "gone.jpg"], "the test images")
    # the loaders' decoder names the file too
    assert load_image(good).size == (32, 24)
    with pytest.raises(BenchError, match=r"cut.jpg: truncated or unreadable image .*replace or remove it"):
        load_image(cut)


def test_scan_with_worker_processes_names_the_first_bad_file(tmp_path):
    files = [_jpeg(tmp_path / f"{i}.jpg", seed=i) for i in range(6)]
    scan_images(files, "x", processes=True)
    _cut(files[4])
    with pytest.raises(BenchError, match=f"{files[4]}: truncated"):
        scan_images(files, "x", processes=True)


def test_scan_stamp_skips_a_rescan_until_a_file_changes(tmp_path):
    files = [_jpeg(tmp_path / "d" / f"{i}.jpg", seed=i) for i in range(3)]
    stamp = tmp_path / "cache" / "scan.txt"
    scan_images(files, "x", stamp=stamp)
    assert stamp.is_file()
    scan_images(files, "x", stamp=stamp)                                  # same list and folder: skipped
    _cut(files[1])                                                        # cut in place: its size changed
    with pytest.raises(BenchError, match=f"{files[1]}: truncated"):
        scan_images(files, "x", stamp=stamp)


def test_read_json_and_required_fields(tmp_path):
    p = tmp_path / "a.json"
    p.write_bytes('[{"caption": "caf\u00e9"}]'.encode("latin-1"))
    with pytest.raises(BenchError, match=r"a.json is not UTF-8 text .*line 1.*iconv"):
        read_json(p, "an annotation")
    p.write_text('[\n  {"caption": "x"},\n  {"caption": }\n]')
    with pytest.raises(BenchError, match=r"a.json is not valid JSON .*line 3, column 15.*download it again"):
        read_json(p, "an annotation")
    p.write_text('\ufeff[{"caption": "x"}]', encoding="utf-8")                 # a BOM is fine
    assert read_json(p, "an annotation") == [{"caption": "x"}]
    with pytest.raises(MissingData, match="nope.json"):
        read_json(tmp_path / "nope.json", "an annotation")
    recs = [{"image": "a.jpg", "label": 1}, {"image": "b.jpg"}]
    with pytest.raises(BenchError, match=r"a.json \(annotation\): record 1 has no field 'label'"):
        require_fields(recs, p, {"image": str, "label": int}, "annotation")
    with pytest.raises(BenchError, match=r"record 0 field 'label' is a str, expected int"):
        require_fields([{"image": "a", "label": "1"}], p, {"image": str, "label": int}, "annotation")


# ---------------------------------------------------------------------------------------------------
# the tasks, at prepare

def test_imagenet_truncated_jpeg_fails_at_prepare_naming_it(tmp_path):
    from tasks.imagenet import ImageNetTask
    root = _imagenet(tmp_path)
    ImageNetTask({"workers": 0}, tmp_path, "paper", tmp_path / "cache").prepare()      # all fine
    bad = _cut(root / "val" / "n02" / "n02_1.JPEG")
    t = ImageNetTask({"workers": 0}, tmp_path, "paper", tmp_path / "cache")
    with pytest.raises(BenchError) as e:
        t.prepare()
    assert str(e.value).startswith(f"{bad}: truncated or unreadable image") and "replace or remove it" in str(e.value)
    # a file cut in place after a successful scan: the stamp (sizes, times) sees it, the scan runs again
    bad.unlink()
    _jpeg(bad)
    t = ImageNetTask({"workers": 0, "image_size": 16}, tmp_path, "paper", tmp_path / "cache")
    t.prepare()
    bad.write_bytes(bad.read_bytes()[:300])
    with pytest.raises(BenchError, match=str(bad)):
        ImageNetTask({"workers": 0}, tmp_path, "paper", tmp_path / "cache").prepare()
    # one that slips past the scan (broken after it) still names itself when the loader decodes it
    ds = t._image_folder("val")
    with pytest.raises(BenchError, match=rf"{bad}: truncated or unreadable image"):
        ds[[p for p, _ in ds.samples].index(str(bad))]


def test_imagenet_cli_exits_2_with_one_line(tmp_path, monkeypatch, capsys):
    root = _imagenet(tmp_path)
    bad = _cut(root / "train" / "n01" / "n01_0.JPEG")
    code = main(["run", "--table", "upop_deit", "--profile", "paper", "--methods", "dense",
                 "--data-root", str(tmp_path), "--cache", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and err.strip().count("\n") == 0
    assert str(bad) in err and "truncated or unreadable image" in err and "replace or remove it" in err


def test_ade20k_png_without_iend_fails_at_prepare(tmp_path):
    from tasks.ade20k import ADE20KTask, read_label
    from tests.test_ade20k import write_ade
    base = write_ade(tmp_path)
    ann = base / "annotations" / "validation" / "ADE_val_00000002.png"
    ann.write_bytes(ann.read_bytes()[:-12])
    with pytest.raises(BenchError, match=rf"{ann}: truncated or unreadable image \(no PNG IEND chunk"):
        ADE20KTask({}, tmp_path, "paper", tmp_path / "cache").prepare()
    img = _cut(base / "images" / "training" / "ADE_train_00000001.jpg")
    with pytest.raises(BenchError, match=str(img)):
        ADE20KTask({}, tmp_path, "paper", tmp_path / "cache2").prepare()
    _cut(ann)
    with pytest.raises(BenchError, match=str(ann)):
        read_label(ann)


def _nlvr2(root, n=3):
    from tests.test_nlvr2 import _write_official
    _write_official(root / "nlvr2", n=n)
    return root / "nlvr2"


def test_nlvr2_annotation_errors_name_file_record_and_field(tmp_path):
    from tasks.nlvr2 import Nlvr2Task
    root = _nlvr2(tmp_path)
    dev = root / "annotation" / "nlvr_dev.json"
    entries = json.loads(dev.read_text())

    def prepare():
        Nlvr2Task({"image_size": 32}, tmp_path, "paper", tmp_path / "cache").prepare()

    prepare()
    del entries[1]["label"]
    dev.write_text(json.dumps(entries))
    with pytest.raises(BenchError, match=rf"{dev}: entry 1 has no field 'label'"):
        prepare()
    dev.write_bytes(json.dumps([{"images": ["a", "b"], "sentence": "caf\u00e9", "label": "True"}],
                               ensure_ascii=False).encode("latin-1"))
    with pytest.raises(BenchError, match=rf"{dev} is not UTF-8 text"):
        prepare()
    dev.write_text('[{"images": ["a", "b"],\n "sentence": "x" "label": "True"}]')
    with pytest.raises(BenchError, match=rf"{dev} is not valid JSON .*line 2"):
        prepare()


def test_nlvr2_truncated_image_fails_at_prepare(tmp_path):
    from tasks.nlvr2 import Nlvr2Task
    root = _nlvr2(tmp_path)
    img = sorted((root / "images" / "test").rglob("*.png"))[0]
    _cut(img, 0.6)
    with pytest.raises(BenchError, match=rf"{img}: truncated or unreadable image"):
        Nlvr2Task({"image_size": 32}, tmp_path, "paper", tmp_path / "cache").prepare()


def test_retrieval_and_vqa_json_and_images(tmp_path):
    from tasks.retrieval import CocoRetrievalTask, generate_karpathy
    root = generate_karpathy(tmp_path / "coco", "coco_karpathy", 3, 1, 2, 32, 0)
    t = CocoRetrievalTask({"root": str(root), "tokenizer": "micro", "image_size": 32}, None, "paper", tmp_path)
    t.prepare()
    test = root / "annotation" / "coco_karpathy_test.json"
    good = test.read_bytes()
    test.write_bytes(good.replace(b"]}", "\u00e9]}".encode("latin-1"), 1))
    with pytest.raises(BenchError, match=rf"{test} is not UTF-8 text"):
        CocoRetrievalTask({"root": str(root), "tokenizer": "micro"}, None, "paper", tmp_path).prepare()
    test.write_bytes(good)
    img = root / "images" / json.loads(good)[1]["image"]
    _cut(img)
    with pytest.raises(BenchError, match=rf"{img}: truncated or unreadable image"):
        CocoRetrievalTask({"root": str(root), "tokenizer": "micro"}, None, "paper", tmp_path / "c2").prepare()


def test_wikitext_not_utf8_names_the_file(tmp_path):
    from tasks.lm_perplexity import raw_rows
    f = tmp_path / "wiki.test.raw"
    f.write_bytes(" = Caf\u00e9 = \n".encode("latin-1"))
    with pytest.raises(BenchError, match=rf"{f} is not UTF-8 text"):
        raw_rows(f)
