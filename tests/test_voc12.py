"""VOC 2012 + SBD source: archives built here in the real layouts, served by a loopback server."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import scipy.sparse
from PIL import Image

from cpal.core.io import load_label_png, save_label_png
from cpal.data.download import ArchiveError, ChecksumError
from cpal.data.voc12 import VOC_CLASSES, prepare_voc12

_spec = importlib.util.spec_from_file_location("_cpal_test_download",
                                               Path(__file__).with_name("test_download.py"))
_td = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_td)
LoopbackServer = _td.LoopbackServer

CLS = {name: i for i, name in enumerate(VOC_CLASSES)}

# id: (width, height, image mode, objects as (class, difficult))
IMAGES = {
    "2007_000032": (40, 30, "RGB", [("aeroplane", 0), ("person", 1)]),
    "2007_000039": (33, 21, "L", [("tvmonitor", 0)]),       # grayscale, odd size
    "2007_000033": (24, 16, "RGB", [("aeroplane", 0)]),
    "2008_000001": (27, 19, "CMYK", [("cat", 0), ("dog", 0)]),  # CMYK JPEG
    "2008_000002": (20, 20, "RGB", [("dog", 0)]),
    "2008_000003": (31, 17, "RGB", [("horse", 0), ("person", 0)]),
    "2008_000004": (18, 22, "RGB", [("sofa", 0)]),
    "2008_000005": (17, 13, "RGB", [("bird", 0)]),
    "2009_000001": (16, 16, "RGB", [("cow", 0)]),           # in no list: must not be written
}
VOC_TRAIN = ["2007_000032", "2007_000039"]
VOC_VAL = ["2007_000033", "2008_000001"]
SBD_TRAIN = ["2008_000002", "2008_000003", "2007_000032", "2007_000033"]  # 2007_000033 is VOC val
SBD_VAL = ["2008_000004", "2008_000005"]
TRAIN_AUG = sorted({"2008_000002", "2008_000003", "2007_000032", "2008_000004", "2008_000005", "2007_000039"})


def label_map(img_id: str, border: bool) -> np.ndarray:
    """A rectangle of the first object's class (VOC ground truth also gets a 255 border band)."""
    w, h, _, objects = IMAGES[img_id]
    label = np.zeros((h, w), np.uint8)
    label[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = CLS[objects[0][0]]
    if border:
        label[h // 4, w // 4: 3 * w // 4] = 255
    return label


def sbd_label(img_id: str) -> np.ndarray:
    # Deliberately different from the VOC mask, to see which one the build takes.
    w, h, _, objects = IMAGES[img_id]
    label = np.zeros((h, w), np.uint8)
    label[: h // 2, :] = CLS[objects[-1][0]]
    return label


def write_xml(path: Path, img_id: str) -> None:
    w, h, _, objects = IMAGES[img_id]
    objs = "".join(
        f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>"
        f"<difficult>{diff}</difficult><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax>"
        "</bndbox>" + ("<part><name>head</name></part>" if name == "person" else "") + "</object>"
        for name, diff in objects)
    path.write_text(f"<annotation><folder>VOC2012</folder><filename>{img_id}.jpg</filename><size>"
                    f"<width>{w}</width><height>{h}</height><depth>3</depth></size>{objs}</annotation>")


def write_jpeg(path: Path, img_id: str) -> None:
    w, h, mode, _ = IMAGES[img_id]
    rng = np.random.default_rng(zlib.crc32(img_id.encode()))
    channels = {"RGB": 3, "L": 1, "CMYK": 4}[mode]
    arr = rng.integers(0, 255, (h, w, channels), dtype=np.uint8)
    Image.fromarray(arr[..., 0] if channels == 1 else arr, mode).save(path, format="JPEG", quality=90)


def write_sbd_mat(path: Path, seg: np.ndarray) -> None:
    """Real SBD cls/*.mat layout: struct GTcls {Boundaries (20x1 cell), Segmentation, CategoriesPresent}."""
    bounds = np.empty((20, 1), dtype=object)
    for k in range(20):
        bounds[k, 0] = scipy.sparse.csc_matrix(seg.shape, dtype=np.float64)
    present = np.array(sorted(set(np.unique(seg).tolist()) - {0}), dtype=np.uint8).reshape(-1, 1)
    gt = {"Boundaries": bounds, "Segmentation": seg, "CategoriesPresent": present}
    scipy.io.savemat(path, {"GTcls": gt})


def build_sources(root: Path) -> tuple[Path, Path]:
    """Extracted VOC2012 and SBD trees in their real layouts; returns (VOCdevkit/.., benchmark_RELEASE/..)."""
    voc = root / "voc" / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "Annotations", "SegmentationClass", "ImageSets/Segmentation", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True)
    for img_id in IMAGES:
        write_jpeg(voc / "JPEGImages" / f"{img_id}.jpg", img_id)
        write_xml(voc / "Annotations" / f"{img_id}.xml", img_id)
    for img_id in VOC_TRAIN + VOC_VAL:
        save_label_png(voc / "SegmentationClass" / f"{img_id}.png", label_map(img_id, border=True))
    seg_lists = voc / "ImageSets" / "Segmentation"
    for name, ids in (("train", VOC_TRAIN), ("val", VOC_VAL), ("trainval", VOC_TRAIN + VOC_VAL)):
        (seg_lists / f"{name}.txt").write_text("".join(f"{i}\n" for i in ids))
    (voc / "ImageSets" / "Main" / "train.txt").write_text("2009_000001\n")
    sbd = root / "sbd" / "benchmark_RELEASE" / "dataset"
    for sub in ("cls", "img", "inst"):
        (sbd / sub).mkdir(parents=True)
    for img_id in SBD_TRAIN + SBD_VAL:
        write_sbd_mat(sbd / "cls" / f"{img_id}.mat", sbd_label(img_id))
        write_jpeg(sbd / "img" / f"{img_id}.jpg", img_id)
    (sbd / "train.txt").write_text("".join(f"{i}\n" for i in SBD_TRAIN))
    (sbd / "val.txt").write_text("".join(f"{i}\n" for i in SBD_VAL))
    return root / "voc", root / "sbd"


def tar_bytes(folder: Path, gz: bool, extra: list[tuple[str, bytes]] = ()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tar:
        for child in sorted(folder.iterdir()):
            tar.add(child, arcname=child.name)
        for name, data in extra:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def md5(data: bytes) -> str:
    return "md5:" + hashlib.md5(data).hexdigest()


@pytest.fixture
def served(tmp_path):
    """A loopback server with the VOC tar and SBD tgz, and a matching data config."""
    voc_src, sbd_src = build_sources(tmp_path / "src")
    voc_tar, sbd_tgz = tar_bytes(voc_src, gz=False), tar_bytes(sbd_src, gz=True)
    with LoopbackServer() as srv:
        srv.files["pascal/VOCtrainval_11-May-2012.tar"] = voc_tar
        srv.files["sbd/benchmark.tgz"] = sbd_tgz
        cfg = {"source": "voc12", "dir": str(tmp_path / "out"), "seed": 0, "voc12": {
            "download_dir": str(tmp_path / "dl"),
            "urls": {"voc": srv.url("pascal/VOCtrainval_11-May-2012.tar"),
                     "sbd": srv.url("sbd/benchmark.tgz")},
            "checksums": {"voc": md5(voc_tar), "sbd": md5(sbd_tgz)},
            "expected_train_aug": len(TRAIN_AUG), "retries": 0}}
        yield srv, cfg, tmp_path


def copy_cfg(tmp_path: Path, **over) -> dict:
    voc_src, sbd_src = build_sources(tmp_path / "src")
    vcfg = {"root": str(voc_src / "VOCdevkit"), "sbd_root": str(sbd_src),
            "expected_train_aug": len(TRAIN_AUG),
            "urls": {"voc": "http://127.0.0.1:9/unreachable.tar", "sbd": "http://127.0.0.1:9/unreachable.tgz"}}
    vcfg.update(over)
    return {"source": "voc12", "dir": str(tmp_path / "out"), "seed": 0, "voc12": vcfg}


def staging_leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name]


def test_download_and_build_layout(served):
    srv, cfg, tmp = served
    out = tmp / "out"
    meta = prepare_voc12(out, cfg, progress=False)
    assert meta["splits"] == {"train_aug": len(TRAIN_AUG), "train": 2, "val": 2}
    assert meta["classes"] == list(VOC_CLASSES) and len(meta["classes"]) == 21 and meta["ignore_index"] == 255
    assert json.loads((out / "dataset.json").read_text()) == meta
    split_dir = out / "ImageSets" / "Segmentation"
    assert (split_dir / "train_aug.txt").read_text().split() == TRAIN_AUG
    assert (split_dir / "train.txt").read_text().split() == sorted(VOC_TRAIN)
    assert (split_dir / "val.txt").read_text().split() == sorted(VOC_VAL)
    assert not set(TRAIN_AUG) & set(VOC_VAL)

    ids = sorted(set(TRAIN_AUG) | set(VOC_VAL))
    assert sorted(p.stem for p in (out / "JPEGImages").iterdir()) == ids  # 2009_000001 is not in any list
    assert sorted(p.stem for p in (out / "SegmentationClass").iterdir()) == ids
    for img_id in ids:
        w, h, _, objects = IMAGES[img_id]
        with Image.open(out / "JPEGImages" / f"{img_id}.jpg") as img:
            assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (w, h)), img_id
        with Image.open(out / "SegmentationClass" / f"{img_id}.png") as png:
            assert png.mode == "P"
        mask = load_label_png(out / "SegmentationClass" / f"{img_id}.png")
        # VOC's own mask (with its 255 band) wherever VOC has one, SBD's elsewhere.
        expected = label_map(img_id, border=True) if img_id in VOC_TRAIN + VOC_VAL else sbd_label(img_id)
        np.testing.assert_array_equal(mask, expected, err_msg=img_id)

    labels = json.loads((out / "cls_labels.json").read_text())
    assert sorted(labels) == ids
    assert labels["2007_000032"] == [CLS["aeroplane"], CLS["person"]]  # difficult person counted
    assert labels["2008_000001"] == [CLS["cat"], CLS["dog"]]
    assert labels["2008_000003"] == [CLS["horse"], CLS["person"]]  # the part name 'head' is not a class

    # Rerun: archives come from the extracted cache (no request), and the old output is replaced.
    n = len(srv.requests)
    (out / "stale.txt").write_text("from an earlier run")
    prepare_voc12(out, cfg, progress=False)
    assert len(srv.requests) == n and not (out / "stale.txt").exists()
    assert staging_leftovers(out.parent) == []


def test_reader_reads_the_output(served):
    voc = pytest.importorskip("cpal.data.voc")
    _, cfg, tmp = served
    prepare_voc12(tmp / "out", cfg, progress=False)
    for split in ("train_aug", "train", "val"):
        ds = voc.VOCDataset(tmp / "out", split)
        assert ds.num_classes == 21
        for img_id in ds.ids:
            image, mask = ds.image(img_id), ds.mask(img_id)
            assert image.ndim == 3 and image.shape[2] == 3 and image.shape[:2] == mask.shape
            assert len(ds.labels(img_id)) >= 1


def test_checksum_mismatch_leaves_no_dataset(served):
    srv, cfg, tmp = served
    cfg["voc12"]["checksums"]["sbd"] = "md5:" + "1" * 32
    with pytest.raises(ChecksumError,
                       match=r"checksum mismatch for benchmark\.tgz.*expected md5:1{32}, got md5:") as err:
        prepare_voc12(tmp / "out", cfg, progress=False)
    assert "data.voc12.checksums.sbd" in str(err.value) and "urls" not in str(err.value)  # the key to fix
    assert not (tmp / "out").exists() and staging_leftovers(tmp) == []
    dl = tmp / "dl"
    assert not (dl / "benchmark.tgz").exists() and not (dl / "benchmark.tgz.part").exists()
    assert not (dl / "extracted" / "benchmark").exists()


def test_archive_member_with_dotdot_is_rejected(served):
    srv, cfg, tmp = served
    bad = tar_bytes(tmp / "src" / "voc", gz=False, extra=[("VOCdevkit/../../evil.txt", b"pwned")])
    srv.files["pascal/VOCtrainval_11-May-2012.tar"] = bad
    cfg["voc12"]["checksums"]["voc"] = md5(bad)
    with pytest.raises(ArchiveError, match=r"contains '\.\.'"):
        prepare_voc12(tmp / "out", cfg, progress=False)
    assert not (tmp / "out").exists() and not (tmp / "evil.txt").exists()
    assert not (tmp / "dl" / "evil.txt").exists()
    assert not (tmp / "dl" / "extracted" / "VOCtrainval_11-May-2012").exists()


def test_existing_copy_needs_no_download(tmp_path):
    cfg = copy_cfg(tmp_path)
    meta = prepare_voc12(tmp_path / "out", cfg, progress=False)
    assert meta["splits"]["train_aug"] == len(TRAIN_AUG) and meta["origin"]["voc"] == "existing copy"
    assert not (tmp_path / "data").exists()  # nothing downloaded to the default download_dir
    # Hard links into the copy, not copies (same filesystem).
    src = tmp_path / "src" / "voc" / "VOCdevkit" / "VOC2012" / "JPEGImages" / "2008_000002.jpg"
    assert (tmp_path / "out" / "JPEGImages" / "2008_000002.jpg").stat().st_ino == src.stat().st_ino


def test_existing_copy_missing_annotation_is_named(tmp_path):
    cfg = copy_cfg(tmp_path)
    (tmp_path / "src/voc/VOCdevkit/VOC2012/Annotations/2008_000003.xml").unlink()
    with pytest.raises(FileNotFoundError, match=r"VOC copy at .*VOC2012 is incomplete: missing "
                                                r"Annotations/2008_000003\.xml; complete the copy"):
        prepare_voc12(tmp_path / "out", cfg, progress=False)
    assert not (tmp_path / "out").exists() and staging_leftovers(tmp_path) == []


def test_existing_copy_many_missing_files_are_summarised(tmp_path):
    cfg = copy_cfg(tmp_path)
    voc = tmp_path / "src/voc/VOCdevkit/VOC2012"
    for p in list((voc / "JPEGImages").iterdir()) + list((voc / "Annotations").iterdir()):
        p.unlink()
    with pytest.raises(FileNotFoundError, match=r"missing JPEGImages/2007_000032\.jpg, .* \(and 11 more\)"):
        prepare_voc12(tmp_path / "out", cfg, progress=False)


def test_existing_copy_with_segmentation_class_aug(tmp_path):
    cfg = copy_cfg(tmp_path, sbd_root=None)
    voc = tmp_path / "src/voc/VOCdevkit/VOC2012"
    for img_id in TRAIN_AUG + VOC_VAL:  # DrSleep-style SegmentationClassAug: train_aug + val
        save_label_png(voc / "SegmentationClassAug" / f"{img_id}.png", sbd_label(img_id))
    meta = prepare_voc12(tmp_path / "out", cfg, progress=False)
    assert meta["origin"]["masks"] == "SegmentationClassAug"
    assert (tmp_path / "out/ImageSets/Segmentation/train_aug.txt").read_text().split() == TRAIN_AUG
    np.testing.assert_array_equal(load_label_png(tmp_path / "out/SegmentationClass/2008_000004.png"),
                                  sbd_label("2008_000004"))


def test_sbd_mask_of_wrong_size_is_named(tmp_path):
    cfg = copy_cfg(tmp_path)
    bad = tmp_path / "src/sbd/benchmark_RELEASE/dataset/cls/2008_000004.mat"
    write_sbd_mat(bad, np.zeros((5, 7), np.uint8))
    with pytest.raises(ValueError,
                       match=r"2008_000004\.mat: mask size 7x5 differs from its image .*2008_000004"):
        prepare_voc12(tmp_path / "out", cfg, progress=False)
    assert not (tmp_path / "out").exists() and staging_leftovers(tmp_path) == []


def test_train_aug_count_is_checked(tmp_path):
    cfg = copy_cfg(tmp_path, expected_train_aug=10582)
    with pytest.raises(ValueError, match=r"train_aug has 6 ids, expected 10582"):
        prepare_voc12(tmp_path / "out", cfg, progress=False)


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"data\.voc12\.bogus is not a known key"):
        prepare_voc12(tmp_path / "out", {"voc12": {"bogus": 1}}, progress=False)
    with pytest.raises(ValueError, match=r"data\.voc12\.splits"):
        prepare_voc12(tmp_path / "out", {"voc12": {"splits": ["test"]}}, progress=False)
    with pytest.raises(FileNotFoundError, match=r"data\.voc12\.root = .*nowhere is not a folder"):
        prepare_voc12(tmp_path / "out", {"voc12": {"root": str(tmp_path / "nowhere")}}, progress=False)
