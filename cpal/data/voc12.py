"""PASCAL VOC 2012 + SBD ("SegmentationClassAug") in the shared VOC layout.

WSSS on VOC trains on `train_aug`: the 10,582 images of SBD (train + val) and VOC train, minus VOC val.
Masks come from VOC's own SegmentationClass where an image has one (all of train and val, with the 255
border band) and from SBD's `cls/*.mat` otherwise, as mmsegmentation's voc_aug converter and the
common SegmentationClassAug do. Image-level labels come from the XML annotations (every `object`,
including those marked difficult, as IRN's make_cls_labels does).

This module also holds the helpers every real-data source uses to write the layout (placing RGB JPEGs,
building in a temporary folder renamed into place, reporting missing files).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import shutil
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cpal.data.download import fetch_and_extract, filename_from_url
from cpal.data.voc import IGNORE_INDEX, VOC_CLASSES
from cpal.core.io import load_label_png, save_jpeg, save_label_png, write_json, write_text

log = logging.getLogger(__name__)

# Official locations. Checksums, each confirmed in public code (not measured here):
# - VOCtrainval_11-May-2012.tar md5 6cd6e144f989b92b3379bac3b3de84fd: pytorch/vision
#   torchvision/datasets/voc.py (DATASET_YEAR_DICT['2012']) and PaddlePaddle/PaddleDetection
#   ppdet/utils/download.py (DATASETS['voc']).
# - benchmark.tgz (SBD) md5 82b4d87ceb2ed10f6038a1cba92111cb: pytorch/vision torchvision/datasets/sbd.py
#   (SBDataset.md5). torchvision names the host www.eecs...; other public code uses www2.eecs..., which
#   it reports as the one that works. Same file name and md5 either way; `urls.sbd` can switch.
VOC12_URL = "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar"
VOC12_MD5 = "md5:6cd6e144f989b92b3379bac3b3de84fd"
SBD_URL = "https://www2.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/benchmark.tgz"
SBD_MD5 = "md5:82b4d87ceb2ed10f6038a1cba92111cb"

VOC12_DEFAULTS: dict[str, Any] = {
    "root": None,              # existing VOC2012 copy (folder with JPEGImages/, or VOCdevkit/ or its parent)
    "sbd_root": None,          # existing SBD copy (benchmark_RELEASE/dataset, or a parent of it)
    "download_dir": "data/downloads",
    "urls": {"voc": VOC12_URL, "sbd": SBD_URL},
    "checksums": {"voc": VOC12_MD5, "sbd": SBD_MD5},
    "splits": ["train_aug", "train", "val"],
    "expected_train_aug": 10582,  # size of the standard list; null skips the check
    "include_difficult": True,
    "link": "hardlink",        # hardlink | symlink | copy (hardlink falls back to copy across filesystems)
    "jpeg_quality": 95,        # for sources that must be re-encoded (grayscale, CMYK, not JPEG)
    "workers": 0,              # processes for images and masks; 0 = in this process
    "timeout": 60,             # seconds without data before a download attempt fails
    "retries": 3,              # resumptions of an interrupted download within one run
}
VOC_SPLITS = ("train_aug", "train", "val")
LINK_MODES = ("hardlink", "symlink", "copy")
_SHOW_MISSING = 5


# ---------------------------------------------------------------------------------------------------
# Helpers shared by the real-data sources


def merge_source_config(cfg: dict[str, Any], section: str, defaults: dict[str, Any]) -> dict[str, Any]:
    """`cfg[section]` over `defaults` (nested dicts merged); unknown keys are an error naming the key."""
    given = cfg.get(section) or {}
    if not isinstance(given, dict):
        raise ValueError(f"data.{section} must be a mapping, got {type(given).__name__}")
    out = copy.deepcopy(defaults)
    for key, value in given.items():
        if key not in defaults:
            raise ValueError(f"data.{section}.{key} is not a known key; known: {', '.join(defaults)}")
        if isinstance(defaults[key], dict):
            if not isinstance(value, dict):
                raise ValueError(f"data.{section}.{key} must be a mapping, got {value!r}")
            unknown = sorted(set(value) - set(defaults[key]))
            if unknown:
                raise ValueError(f"data.{section}.{key}: unknown key(s) {unknown}; "
                                 f"known: {sorted(defaults[key])}")
            out[key].update(value)
        else:
            out[key] = value
    if "link" in out and out["link"] not in LINK_MODES:
        raise ValueError(f"data.{section}.link = {out['link']!r}; allowed: {', '.join(LINK_MODES)}")
    return out


def describe_missing(missing: list[str], limit: int = _SHOW_MISSING) -> str:
    """'a, b, c (and 12 more)': enough to act on without flooding the log."""
    more = f" (and {len(missing) - limit} more)" if len(missing) > limit else ""
    return ", ".join(missing[:limit]) + more


def read_id_list(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"split list not found: {path}")
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def link_or_copy(src: Path, dst: Path, mode: str) -> None:
    """Place `src` at `dst` as a hard link, symbolic link or copy; hard links fall back to a copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if mode == "hardlink":
        try:
            os.link(src, dst)
            return
        except OSError:
            pass
    elif mode == "symlink":
        os.symlink(os.path.realpath(src), dst)
        return
    shutil.copyfile(src, dst)


def place_jpeg(src: Path, dst: Path, link: str, quality: int) -> tuple[int, int]:
    """Put an RGB JPEG at `dst` (linked when the source already is one, re-encoded otherwise); (w, h).

    COCO has grayscale and a few CMYK JPEGs; the reader and every model expect 3-channel RGB.
    """
    try:
        with Image.open(src) as img:
            size = img.size
            if img.format == "JPEG" and img.mode == "RGB":
                link_or_copy(src, dst, link)
                return size
            rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {src}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"unreadable image: {src} ({exc})") from exc
    save_jpeg(dst, rgb, quality=quality)
    return size


def run_tasks(fn: Callable[[Any], Any], tasks: list[Any], workers: int, progress: bool,
              desc: str) -> list[Any]:
    """Map `fn` over `tasks` in this process or in `workers` processes, with a progress bar."""
    from tqdm import tqdm

    if workers and workers > 1 and len(tasks) > 1:
        chunk = max(1, min(64, len(tasks) // (workers * 4)))
        with ProcessPoolExecutor(max_workers=workers) as pool:
            return list(tqdm(pool.map(fn, tasks, chunksize=chunk), total=len(tasks), desc=desc,
                             disable=not progress))
    return [fn(t) for t in tqdm(tasks, desc=desc, disable=not progress)]


@contextlib.contextmanager
def staged_output(out_dir: Path) -> Iterator[Path]:
    """Yield an empty folder beside `out_dir`; on success it replaces `out_dir`, on failure it vanishes."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = out_dir.parent / f".{out_dir.name}.partial-{tag}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out_dir.parent / f".{out_dir.name}.old-{tag}"
    if out_dir.exists() or out_dir.is_symlink():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old.exists() or old.is_symlink():
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()


def write_layout(tmp: Path, splits: dict[str, list[str]], labels: dict[str, list[int]],
                 meta: dict[str, Any]) -> None:
    """Split lists, cls_labels.json and dataset.json (images and masks are written by the caller)."""
    for name, ids in splits.items():
        write_text(tmp / "ImageSets" / "Segmentation" / f"{name}.txt", "".join(f"{i}\n" for i in ids))
    write_json(tmp / "cls_labels.json", labels)
    write_json(tmp / "dataset.json", meta)


def check_label_values(label: np.ndarray, num_classes: int, where: str) -> None:
    bad = (label >= num_classes) & (label != IGNORE_INDEX)
    if bad.any():
        values = sorted(np.unique(label[bad]).tolist())
        raise ValueError(f"{where}: label value(s) {values} outside 0..{num_classes - 1} and {IGNORE_INDEX}")


# ---------------------------------------------------------------------------------------------------
# VOC 2012 specifics


def load_sbd_mat(path: Path) -> np.ndarray:
    """Class map from an SBD `cls/<id>.mat` (struct GTcls with fields Segmentation, Boundaries, ...)."""
    from scipy.io import loadmat

    try:
        mat = loadmat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"SBD annotation not found: {path}") from None
    except Exception as exc:  # scipy raises several unrelated types for damaged files
        raise ValueError(f"{path}: unreadable .mat file ({exc})") from exc
    try:
        seg = np.asarray(mat["GTcls"][0]["Segmentation"][0])
    except (KeyError, IndexError, ValueError, TypeError):
        raise ValueError(f"{path}: not an SBD class annotation (expected a struct GTcls with a field "
                         "Segmentation)") from None
    if seg.ndim != 2:
        raise ValueError(f"{path}: GTcls.Segmentation must be 2-D, got shape {seg.shape}")
    if seg.size and (seg.min() < 0 or seg.max() > 255):
        raise ValueError(f"{path}: GTcls.Segmentation values {seg.min()}..{seg.max()} are not class indices")
    return seg.astype(np.uint8)


def voc_xml_labels(path: Path, include_difficult: bool = True) -> list[int]:
    """Sorted foreground class indices of the `object`s named in a VOC XML annotation."""
    index = {name: i for i, name in enumerate(VOC_CLASSES)}
    try:
        root = ET.parse(path).getroot()
    except FileNotFoundError:
        raise FileNotFoundError(f"annotation not found: {path}") from None
    except ET.ParseError as exc:
        raise ValueError(f"{path}: unreadable XML annotation ({exc})") from exc
    found = set()
    for obj in root.findall("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in index or name == "background":
            raise ValueError(f"{path}: unknown object class {name!r}; expected one of the 20 VOC classes")
        if not include_difficult and (obj.findtext("difficult") or "0").strip() == "1":
            continue
        found.add(index[name])
    return sorted(found)


def _find_dir(root: Path, candidates: Iterable[str], marker: str) -> Path | None:
    for rel in candidates:
        path = root / rel if rel else root
        if (path / marker).is_dir():
            return path
    return None


def _voc_item(task: tuple) -> None:
    """Write one image and its mask (runs in worker processes: module-level, plain arguments)."""
    img_id, jpg, mask_kind, mask_src, out, link, quality = task
    w, h = place_jpeg(jpg, out / "JPEGImages" / f"{img_id}.jpg", link, quality)
    dst = out / "SegmentationClass" / f"{img_id}.png"
    if mask_kind == "mat":
        label = load_sbd_mat(mask_src)
    else:
        label = load_label_png(mask_src)
    if label.shape != (h, w):
        raise ValueError(f"{mask_src}: mask size {label.shape[1]}x{label.shape[0]} differs from its image "
                         f"{jpg} ({w}x{h})")
    check_label_values(label, len(VOC_CLASSES), str(mask_src))
    if mask_kind == "png":
        with Image.open(mask_src) as img:
            is_palette = img.mode == "P"
        if is_palette:
            link_or_copy(mask_src, dst, link)
            return
    save_label_png(dst, label)


def _resolve_sources(vcfg: dict[str, Any], progress: bool) -> tuple[Path, str, Path, dict[str, str]]:
    """(VOC2012 folder, mask source kind 'sbd' | 'aug', its folder, origin description)."""
    if vcfg["root"] is not None:
        given = Path(vcfg["root"])
        if not given.is_dir():
            raise FileNotFoundError(f"data.voc12.root = {given} is not a folder; point it at an existing "
                                    "VOC2012 copy or set it to null to download")
        voc = _find_dir(given, ("", "VOC2012", "VOCdevkit/VOC2012"), "JPEGImages")
        if voc is None:
            raise FileNotFoundError(f"data.voc12.root = {given}: no JPEGImages/ there nor in VOC2012/ or "
                                    "VOCdevkit/VOC2012/; point it at the folder that holds JPEGImages/")
        origin = {"voc": "existing copy"}
        if vcfg["sbd_root"] is not None:
            sbd_given = Path(vcfg["sbd_root"])
            sbd = _find_dir(sbd_given, ("", "dataset", "benchmark_RELEASE/dataset"), "cls")
            if sbd is None:
                raise FileNotFoundError(f"data.voc12.sbd_root = {sbd_given}: no cls/ there nor in dataset/ "
                                        "or benchmark_RELEASE/dataset/; point it at SBD's dataset folder")
            return voc, "sbd", sbd, {**origin, "masks": "SBD existing copy"}
        if (voc / "SegmentationClassAug").is_dir():
            return voc, "aug", voc / "SegmentationClassAug", {**origin, "masks": "SegmentationClassAug"}
        raise FileNotFoundError(f"data.voc12.root = {given} has no SegmentationClassAug/ and "
                                "data.voc12.sbd_root is null: set sbd_root to an extracted SBD "
                                "(benchmark_RELEASE/dataset), or set root to null to download both")
    if vcfg["sbd_root"] is not None:
        raise ValueError("data.voc12.sbd_root is set but data.voc12.root is null: give both existing copies, "
                         "or neither to download")
    download_dir = Path(vcfg["download_dir"])
    common = {"progress": progress, "timeout": vcfg["timeout"], "retries": vcfg["retries"]}
    voc_parts = tuple(f"VOCdevkit/VOC2012/{d}/" for d in
                      ("JPEGImages", "Annotations", "SegmentationClass", "ImageSets/Segmentation"))
    voc_dir = fetch_and_extract(vcfg["urls"]["voc"], vcfg["checksums"]["voc"], download_dir,
                                include=lambda n: n.startswith(voc_parts), url_key="data.voc12.urls.voc",
                                checksum_key="data.voc12.checksums.voc",
                                **common)
    sbd_parts = ("benchmark_RELEASE/dataset/cls/", "benchmark_RELEASE/dataset/train.txt",
                 "benchmark_RELEASE/dataset/val.txt")
    sbd_dir = fetch_and_extract(vcfg["urls"]["sbd"], vcfg["checksums"]["sbd"], download_dir,
                                include=lambda n: n.startswith(sbd_parts), url_key="data.voc12.urls.sbd",
                                checksum_key="data.voc12.checksums.sbd",
                                **common)
    origin = {"voc": f"{filename_from_url(vcfg['urls']['voc'])} {vcfg['checksums']['voc']}",
              "masks": f"SBD {filename_from_url(vcfg['urls']['sbd'])} {vcfg['checksums']['sbd']}"}
    return voc_dir / "VOCdevkit" / "VOC2012", "sbd", sbd_dir / "benchmark_RELEASE" / "dataset", origin


def prepare_voc12(out_dir: Path, cfg: dict, progress: bool = True) -> dict:
    """Write VOC 2012 with the SBD augmentation into `out_dir` (VOC layout); return dataset.json's content.

    `cfg` is the whole `data` section; settings live in `cfg['voc12']` (see VOC12_DEFAULTS). Downloads
    (or reuses) and verifies the archives unless `root` names an existing copy; checks that every file
    the splits need is there before writing anything; builds in a temporary folder renamed into place.
    """
    vcfg = merge_source_config(cfg, "voc12", VOC12_DEFAULTS)
    wanted = list(vcfg["splits"])
    bad = [s for s in wanted if s not in VOC_SPLITS]
    if bad or not wanted:
        raise ValueError(f"data.voc12.splits = {wanted}: allowed splits are {list(VOC_SPLITS)}")
    voc, mask_kind, mask_root, origin = _resolve_sources(vcfg, progress)
    from_copy = vcfg["root"] is not None
    what = f"VOC copy at {voc}" if from_copy else f"extracted VOC archive at {voc}"
    fix = ("; complete the copy or set data.voc12.root to null to download" if from_copy else
           "; delete the extracted folder and rerun")

    seg_lists = voc / "ImageSets" / "Segmentation"
    missing = [f"ImageSets/Segmentation/{n}.txt" for n in ("train", "val")
               if not (seg_lists / f"{n}.txt").is_file()]
    if missing:
        raise FileNotFoundError(f"{what} is incomplete: missing {describe_missing(missing)}{fix}")
    voc_train, voc_val = read_id_list(seg_lists / "train.txt"), read_id_list(seg_lists / "val.txt")
    val_set = set(voc_val)

    if mask_kind == "sbd":
        sbd_missing = [f for f in ("train.txt", "val.txt") if not (mask_root / f).is_file()]
        if sbd_missing:
            raise FileNotFoundError(f"SBD copy at {mask_root} is incomplete: missing "
                                    f"{describe_missing(sbd_missing)}")
        aug_ids = set(read_id_list(mask_root / "train.txt")) | set(read_id_list(mask_root / "val.txt"))
        train_aug = sorted((aug_ids | set(voc_train)) - val_set)
    else:
        listed = [seg_lists / n for n in ("train_aug.txt", "trainaug.txt") if (seg_lists / n).is_file()]
        if listed:
            train_aug = sorted(set(read_id_list(listed[0])))
            leak = sorted(set(train_aug) & val_set)
            if leak:
                raise ValueError(f"{listed[0]} lists {len(leak)} val image(s), e.g. "
                                 f"{describe_missing(leak)}; train_aug must not overlap val")
        else:
            train_aug = sorted({p.stem for p in mask_root.glob("*.png")} - val_set)
    expected = vcfg["expected_train_aug"]
    if "train_aug" in wanted and expected is not None and len(train_aug) != expected:
        raise ValueError(f"train_aug has {len(train_aug)} ids, expected {expected} (the standard SBD + VOC "
                         f"train list); the VOC or SBD lists look incomplete. Set "
                         f"data.voc12.expected_train_aug: null to accept this")

    all_splits = {"train_aug": train_aug, "train": sorted(voc_train), "val": sorted(voc_val)}
    splits = {name: all_splits[name] for name in wanted}
    ids = sorted(set().union(*splits.values()))
    voc_seg = set(voc_train) | val_set

    def mask_source(i: str) -> tuple[str, Path]:
        if i in voc_seg:
            return "png", voc / "SegmentationClass" / f"{i}.png"
        if mask_kind == "sbd":
            return "mat", mask_root / "cls" / f"{i}.mat"
        return "png", mask_root / f"{i}.png"

    missing = []
    for i in ids:
        for rel in (f"JPEGImages/{i}.jpg", f"Annotations/{i}.xml"):
            if not (voc / rel).is_file():
                missing.append(rel)
        src = mask_source(i)[1]
        if not src.is_file():
            missing.append(str(src.relative_to(voc)) if src.is_relative_to(voc) else str(src))
    if missing:
        raise FileNotFoundError(f"{what} is incomplete: missing {describe_missing(missing)}{fix}")

    labels = {i: voc_xml_labels(voc / "Annotations" / f"{i}.xml", vcfg["include_difficult"]) for i in ids}
    meta = {
        "name": "voc12",
        "source": "voc12",
        "classes": list(VOC_CLASSES),
        "ignore_index": IGNORE_INDEX,
        "splits": {name: len(v) for name, v in splits.items()},
        "origin": origin,
    }
    with staged_output(Path(out_dir)) as tmp:
        tasks = [(i, voc / "JPEGImages" / f"{i}.jpg", *mask_source(i), tmp, vcfg["link"],
                  vcfg["jpeg_quality"]) for i in ids]
        run_tasks(_voc_item, tasks, int(vcfg["workers"]), progress, "voc12 images + masks")
        write_layout(tmp, splits, labels, meta)
    log.info("VOC 2012 written to %s: %s", out_dir, meta["splits"])
    return meta
