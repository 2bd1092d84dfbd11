"""COCO 2014 source: image zips and an annotation zip built here in the real layout, served on loopback."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("pycocotools")
from pycocotools import mask as mask_utils  # noqa: E402

from cpal.core.io import load_label_png  # noqa: E402
from cpal.data.coco14 import COCO_CLASSES, prepare_coco14  # noqa: E402
from cpal.data.download import ArchiveError, ChecksumError  # noqa: E402

_spec = importlib.util.spec_from_file_location("_cpal_test_download",
                                               Path(__file__).with_name("test_download.py"))
_td = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_td)
LoopbackServer = _td.LoopbackServer

COCO_IDS = [*range(1, 12), *range(13, 26), 27, 28, *range(31, 45), *range(46, 66), 67, 70,
            *range(72, 83), *range(84, 91)]
assert len(COCO_IDS) == 80
CATEGORIES = [{"id": i, "name": n, "supercategory": "thing"}
              for i, n in zip(COCO_IDS, COCO_CLASSES, strict=True)]
PERSON, CAR, DOG, TEDDY, TOOTHBRUSH = 1, 3, 18, 88, 90  # COCO category ids
IDX = {cid: k + 1 for k, cid in enumerate(COCO_IDS)}     # -> class index in the output

# file name: (split, width, height, mode)
IMAGES = {
    "COCO_train2014_000000000009.jpg": ("train", 40, 30, "RGB"),
    "COCO_train2014_000000000025.jpg": ("train", 31, 17, "L"),     # grayscale, odd size
    "COCO_train2014_000000000030.jpg": ("train", 23, 29, "CMYK"),  # CMYK JPEG
    "COCO_train2014_000000000034.jpg": ("train", 16, 16, "RGB"),   # no annotation: dropped
    "COCO_val2014_000000000042.jpg": ("val", 37, 21, "RGB"),
    "COCO_val2014_000000000073.jpg": ("val", 20, 20, "RGB"),       # crowd only
}


def rect(x0, y0, x1, y1):
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def box_mask(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def rle_uncompressed(m):
    flat = m.flatten(order="F")
    counts, prev, run = [], 0, 0
    for v in flat:
        if v == prev:
            run += 1
        else:
            counts.append(run)
            prev, run = v, 1
    counts.append(run)
    return {"counts": counts, "size": list(m.shape)}


def rle_compressed(m):
    rle = mask_utils.encode(np.asfortranarray(m))
    return {"counts": rle["counts"].decode("ascii"), "size": list(m.shape)}


def annotations():
    """(image number, category id, segmentation, iscrowd, area) per annotation."""
    return [
        (9, DOG, [rect(5, 5, 15, 15)], 0, 100.0),            # listed first, smaller: must end up on top
        (9, PERSON, [rect(0, 0, 30, 20)], 0, 600.0),
        (9, PERSON, rle_uncompressed(box_mask(30, 40, 0, 30, 32, 40)), 1, 240.0),
        (25, TOOTHBRUSH, rle_compressed(box_mask(17, 31, 2, 10, 3, 20)), 0, 136.0),
        (30, CAR, [[1, 1, 2, 2], rect(2, 2, 20, 26)], 0, 432.0),  # a degenerate polygon first, as in COCO
        (42, TEDDY, [rect(4, 3, 30, 18)], 0, 390.0),
        (73, PERSON, rle_uncompressed(box_mask(20, 20, 10, 20, 0, 20)), 1, 200.0),
    ]


def build_sources(root: Path, *, width_lie: bool = False) -> Path:
    """train2014/, val2014/, annotations/ as the real zips unpack."""
    (root / "annotations").mkdir(parents=True)
    data = {s: {"info": {}, "licenses": [], "images": [], "annotations": [], "categories": CATEGORIES}
            for s in ("train", "val")}
    number = {}
    for name, (split, w, h, mode) in IMAGES.items():
        folder = root / f"{split}2014"
        folder.mkdir(exist_ok=True)
        channels = {"RGB": 3, "L": 1, "CMYK": 4}[mode]
        rng = np.random.default_rng(zlib.crc32(name.encode()))
        arr = rng.integers(0, 255, (h, w, channels), dtype=np.uint8)
        Image.fromarray(arr[..., 0] if channels == 1 else arr, mode).save(folder / name, format="JPEG")
        num = int(name[-10:-4])
        number[num] = split
        data[split]["images"].append({"id": num, "file_name": name, "height": h,
                                      "width": w + (1 if width_lie and num == 42 else 0)})
    for k, (num, cat, seg, crowd, area) in enumerate(annotations()):
        data[number[num]]["annotations"].append({"id": 1000 + k, "image_id": num, "category_id": cat,
                                                 "segmentation": seg, "iscrowd": crowd, "area": area,
                                                 "bbox": [0, 0, 1, 1]})
    for split in ("train", "val"):
        (root / "annotations" / f"instances_{split}2014.json").write_text(json.dumps(data[split]))
    (root / "annotations" / "captions_train2014.json").write_text("{}")
    return root


def zip_bytes(root: Path, folder: str, extra: list[tuple[str, bytes]] = ()) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted((root / folder).iterdir()):
            zf.write(path, f"{folder}/{path.name}")
        for name, data in extra:
            zf.writestr(zipfile.ZipInfo(name), data)
    return buf.getvalue()


def md5(data: bytes) -> str:
    return "md5:" + hashlib.md5(data).hexdigest()


@pytest.fixture
def served(tmp_path):
    src = build_sources(tmp_path / "src")
    archives = {"train": zip_bytes(src, "train2014"), "val": zip_bytes(src, "val2014"),
                "annotations": zip_bytes(src, "annotations")}
    names = {"train": "zips/train2014.zip", "val": "zips/val2014.zip",
             "annotations": "annotations/annotations_trainval2014.zip"}
    with LoopbackServer() as srv:
        for key, data in archives.items():
            srv.files[names[key]] = data
        cfg = {"source": "coco14", "dir": str(tmp_path / "out"), "seed": 0, "coco14": {
            "download_dir": str(tmp_path / "dl"), "retries": 0,
            "urls": {k: srv.url(v) for k, v in names.items()},
            "checksums": {k: md5(v) for k, v in archives.items()}}}
        yield srv, cfg, tmp_path


def copy_cfg(tmp_path: Path, **over) -> dict:
    src = build_sources(tmp_path / "src", width_lie=over.pop("width_lie", False))
    ccfg = {"root": str(src), "urls": {"train": "http://127.0.0.1:9/x.zip"}}
    ccfg.update(over)
    return {"source": "coco14", "dir": str(tmp_path / "out"), "seed": 0, "coco14": ccfg}


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name]


def test_download_and_build_layout(served):
    srv, cfg, tmp = served
    out = tmp / "out"
    meta = prepare_coco14(out, cfg, progress=False)
    train = ["COCO_train2014_000000000009", "COCO_train2014_000000000025", "COCO_train2014_000000000030"]
    val = ["COCO_val2014_000000000042", "COCO_val2014_000000000073"]
    assert meta["splits"] == {"train": 3, "val": 2}
    assert meta["classes"][0] == "background" and len(meta["classes"]) == 81 and meta["ignore_index"] == 255
    assert meta["classes"][IDX[TOOTHBRUSH]] == "toothbrush" and meta["classes"][IDX[DOG]] == "dog"
    assert json.loads((out / "dataset.json").read_text()) == meta
    assert (out / "ImageSets/Segmentation/train.txt").read_text().split() == train
    assert (out / "ImageSets/Segmentation/val.txt").read_text().split() == val
    for img_id in train + val:
        _, w, h, _ = IMAGES[img_id + ".jpg"]
        with Image.open(out / "JPEGImages" / f"{img_id}.jpg") as img:
            assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (w, h)), img_id
        with Image.open(out / "SegmentationClass" / f"{img_id}.png") as png:
            assert png.mode == "P" and png.size == (w, h)
    assert not (out / "JPEGImages" / "COCO_train2014_000000000034.jpg").exists()

    m = load_label_png(out / "SegmentationClass" / "COCO_train2014_000000000009.png")
    assert m[10, 10] == IDX[DOG]        # small dog drawn over the large person
    assert m[2, 25] == IDX[PERSON]
    assert m[25, 35] == 255             # crowd region ignored
    assert m[25, 5] == 0
    m = load_label_png(out / "SegmentationClass" / "COCO_train2014_000000000025.png")
    np.testing.assert_array_equal(m, box_mask(17, 31, 2, 10, 3, 20) * IDX[TOOTHBRUSH])  # compressed RLE
    m = load_label_png(out / "SegmentationClass" / "COCO_train2014_000000000030.png")
    assert m[14, 10] == IDX[CAR] and m[0, 0] == 0
    m = load_label_png(out / "SegmentationClass" / "COCO_val2014_000000000073.png")
    assert set(np.unique(m).tolist()) == {0, 255}

    labels = json.loads((out / "cls_labels.json").read_text())
    assert labels == {
        "COCO_train2014_000000000009": [IDX[PERSON], IDX[DOG]],
        "COCO_train2014_000000000025": [IDX[TOOTHBRUSH]],
        "COCO_train2014_000000000030": [IDX[CAR]],
        "COCO_val2014_000000000042": [IDX[TEDDY]],
        "COCO_val2014_000000000073": [IDX[PERSON]],
    }
    # Only the instance files were extracted from the annotation zip.
    ann = tmp / "dl/extracted/annotations_trainval2014/annotations"
    assert sorted(p.name for p in ann.iterdir()) == ["instances_train2014.json", "instances_val2014.json"]
    n = len(srv.requests)
    prepare_coco14(out, cfg, progress=False)  # rerun: cached, no request
    assert len(srv.requests) == n and leftovers(tmp) == []


def test_reader_reads_the_output(served):
    voc = pytest.importorskip("cpal.data.voc")
    _, cfg, tmp = served
    prepare_coco14(tmp / "out", cfg, progress=False)
    for split in ("train", "val"):
        ds = voc.VOCDataset(tmp / "out", split)
        assert ds.num_classes == 81
        for img_id in ds.ids:
            assert ds.image(img_id).shape[:2] == ds.mask(img_id).shape
            assert len(ds.labels(img_id)) >= 1


def test_checksum_mismatch_leaves_no_dataset(served):
    _, cfg, tmp = served
    cfg["coco14"]["checksums"]["val"] = "md5:" + "2" * 32
    with pytest.raises(ChecksumError,
                       match=r"checksum mismatch for val2014\.zip.*expected md5:2{32}, got md5:"):
        prepare_coco14(tmp / "out", cfg, progress=False)
    assert not (tmp / "out").exists() and leftovers(tmp) == []
    assert not (tmp / "dl/val2014.zip").exists() and not (tmp / "dl/val2014.zip.part").exists()


def test_zip_member_with_absolute_path_is_rejected(served):
    srv, cfg, tmp = served
    bad = zip_bytes(tmp / "src", "val2014", extra=[("/tmp/evil.jpg", b"x")])
    srv.files["zips/val2014.zip"] = bad
    cfg["coco14"]["checksums"]["val"] = md5(bad)
    with pytest.raises(ArchiveError, match="absolute path"):
        prepare_coco14(tmp / "out", cfg, progress=False)
    assert not (tmp / "out").exists() and not (tmp / "dl/extracted/val2014").exists()


def test_only_requested_splits_are_downloaded(served):
    srv, cfg, tmp = served
    cfg["coco14"]["splits"] = ["val"]
    meta = prepare_coco14(tmp / "out", cfg, progress=False)
    assert meta["splits"] == {"val": 2}
    assert {p for p, _ in srv.requests} == {"zips/val2014.zip", "annotations/annotations_trainval2014.zip"}


def test_crowd_modes(tmp_path):
    cfg = copy_cfg(tmp_path, crowd="label")
    prepare_coco14(tmp_path / "out", cfg, progress=False)
    mask = tmp_path / "out/SegmentationClass/COCO_train2014_000000000009.png"
    assert load_label_png(mask)[25, 35] == IDX[PERSON]
    cfg["coco14"]["crowd"] = "skip"
    meta = prepare_coco14(tmp_path / "out", cfg, progress=False)
    assert load_label_png(mask)[25, 35] == 0
    assert meta["splits"]["val"] == 1  # the crowd-only image has no annotation left: dropped
    cfg["coco14"].update(crowd="ignore", drop_empty=False)
    meta = prepare_coco14(tmp_path / "out", cfg, progress=False)
    assert meta["splits"] == {"train": 4, "val": 2}
    assert json.loads((tmp_path / "out/cls_labels.json").read_text())["COCO_train2014_000000000034"] == []


def test_missing_annotation_file_is_named(tmp_path):
    cfg = copy_cfg(tmp_path)
    (tmp_path / "src/annotations/instances_val2014.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"COCO copy at .* is incomplete: missing "
                                                r"annotations/instances_val2014\.json"):
        prepare_coco14(tmp_path / "out", cfg, progress=False)
    assert not (tmp_path / "out").exists()
    cfg["coco14"]["splits"] = ["train"]  # not needed for train only
    assert prepare_coco14(tmp_path / "out", cfg, progress=False)["splits"] == {"train": 3}


def test_missing_image_is_named(tmp_path):
    cfg = copy_cfg(tmp_path)
    (tmp_path / "src/val2014/COCO_val2014_000000000042.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing: val2014/COCO_val2014_000000000042\.jpg"):
        prepare_coco14(tmp_path / "out", cfg, progress=False)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_image_size_disagreeing_with_annotation_is_named(tmp_path):
    cfg = copy_cfg(tmp_path, width_lie=True)
    with pytest.raises(ValueError,
                       match=r"COCO_val2014_000000000042\.jpg is 37x21 but its annotation says 38x21"):
        prepare_coco14(tmp_path / "out", cfg, progress=False)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_wrong_categories_are_reported(tmp_path):
    cfg = copy_cfg(tmp_path)
    path = tmp_path / "src/annotations/instances_train2014.json"
    data = json.loads(path.read_text())
    data["categories"][0]["name"] = "human"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"instances_train2014\.json: categories differ"):
        prepare_coco14(tmp_path / "out", cfg, progress=False)


def test_worker_processes_give_identical_output(tmp_path):
    cfg = copy_cfg(tmp_path, link="copy")
    prepare_coco14(tmp_path / "a", cfg, progress=False)
    cfg["coco14"]["workers"] = 2
    prepare_coco14(tmp_path / "b", cfg, progress=False)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
