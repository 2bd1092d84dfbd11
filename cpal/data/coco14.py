"""MS COCO 2014 as 81-class semantic segmentation (background + 80 things) in the shared VOC layout.

Instance annotations become one class map per image: crowd regions first (255 = ignore by default:
their outlines are rough), then objects from the largest to the smallest so that small objects lying
on larger ones stay visible. Image-level labels are the categories annotated in the image. Images
with no annotation at all are dropped by default (a WSSS classifier cannot learn from an empty label
set). Class index n is the n-th COCO category in id order (person = 1, ..., toothbrush = 80).
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from cpal.data.download import fetch_and_extract, filename_from_url
from cpal.data.voc import IGNORE_INDEX
from cpal.data.voc12 import (
    check_label_values,
    describe_missing,
    merge_source_config,
    place_jpeg,
    run_tasks,
    staged_output,
    write_layout,
)
from cpal.core.io import save_label_png

log = logging.getLogger(__name__)

# The 80 COCO 2014 categories in category-id order (ids 1..90 with gaps); instances_*2014.json must
# list exactly these names.
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase",
    "scissors", "teddy bear", "hair drier", "toothbrush",
)

# Official locations (cocodataset.org). md5 checksums, confirmed in public code (not measured here):
# - train2014.zip 0da8c0bd3d6becc4dcb32757491aca88 and val2014.zip a3d79f5ed8d289b7a7554ce06a5782b3:
#   salesforce/LAVIS lavis/datasets/download_scripts/download_coco.py (comments beside DATA_URL), and
#   the same pair in several other download scripts (PaddlePaddle's COCO download list among them).
# - annotations_trainval2014.zip 0a379cfc70b0e71301e0f377548639bd: PaddlePaddle's COCO download list
#   (url, md5) and other public scripts; it is also the file's S3 ETag as recorded in one public note.
#   The COCO website itself publishes no checksums. (One R package lists a different md5 for
#   train2014.zip, 0da8cfa0e090c266b78f30e2d2874f1a; every other source agrees on the one used here.)
COCO14_URLS = {
    "train": "http://images.cocodataset.org/zips/train2014.zip",
    "val": "http://images.cocodataset.org/zips/val2014.zip",
    "annotations": "http://images.cocodataset.org/annotations/annotations_trainval2014.zip",
}
COCO14_CHECKSUMS = {
    "train": "md5:0da8c0bd3d6becc4dcb32757491aca88",
    "val": "md5:a3d79f5ed8d289b7a7554ce06a5782b3",
    "annotations": "md5:0a379cfc70b0e71301e0f377548639bd",
}
COCO14_DEFAULTS: dict[str, Any] = {
    "root": None,              # existing copy: folder with train2014/, val2014/, annotations/
    "download_dir": "data/downloads",
    "urls": dict(COCO14_URLS),
    "checksums": dict(COCO14_CHECKSUMS),
    "splits": ["train", "val"],
    "crowd": "ignore",         # ignore (255) | label (as the class) | skip (as if not annotated)
    "drop_empty": True,        # leave out images with no annotation
    "link": "hardlink",
    "jpeg_quality": 95,
    "workers": 0,
    "timeout": 60,
    "retries": 3,
}
CROWD_MODES = ("ignore", "label", "skip")
COCO_SPLITS = {"train": "train2014", "val": "val2014"}


def ann_mask(segmentation: Any, h: int, w: int) -> np.ndarray:
    """Boolean mask of one COCO annotation (polygons, uncompressed or compressed RLE)."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):
        polys = [p for p in segmentation if len(p) >= 6 and len(p) % 2 == 0]  # degenerate ones exist
        if not polys:
            return np.zeros((h, w), dtype=bool)
        rle = mask_utils.merge(mask_utils.frPyObjects(polys, h, w))
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, h, w)
    elif isinstance(segmentation, dict):
        rle = dict(segmentation)
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode("ascii")
    else:
        raise ValueError(f"unknown segmentation format {type(segmentation).__name__}")
    with warnings.catch_warnings():
        # pycocotools 2.0.x under numpy 2 warns about copy=False inside decode; harmless, and noisy.
        warnings.simplefilter("ignore", DeprecationWarning)
        m = mask_utils.decode(rle)
    if m.shape[:2] != (h, w):
        raise ValueError(f"segmentation of size {m.shape[1]}x{m.shape[0]} on an image of {w}x{h}")
    return m.astype(bool)


def coco_label_map(anns: list[dict], h: int, w: int, crowd: str = "ignore") -> np.ndarray:
    """Class map: crowd regions (ignore or class), then objects largest first (smaller ones on top)."""
    label = np.zeros((h, w), dtype=np.uint8)
    crowds = [a for a in anns if a["iscrowd"]]
    objects = sorted((a for a in anns if not a["iscrowd"]), key=lambda a: (-a["area"], a["id"]))
    if crowd != "skip":
        for a in crowds:
            label[ann_mask(a["segmentation"], h, w)] = IGNORE_INDEX if crowd == "ignore" else a["cls"]
    for a in objects:
        label[ann_mask(a["segmentation"], h, w)] = a["cls"]
    return label


def _coco_item(task: tuple) -> None:
    img_id, src, anns, h, w, out, crowd, link, quality = task
    got_w, got_h = place_jpeg(src, out / "JPEGImages" / f"{img_id}.jpg", link, quality)
    if (got_w, got_h) != (w, h):
        raise ValueError(f"{src} is {got_w}x{got_h} but its annotation says {w}x{h}")
    try:
        label = coco_label_map(anns, h, w, crowd)
    except ValueError as exc:
        raise ValueError(f"annotation of {src}: {exc}") from exc
    check_label_values(label, len(COCO_CLASSES) + 1, str(src))
    save_label_png(out / "SegmentationClass" / f"{img_id}.png", label)


def load_instances(path: Path) -> dict:
    """Parse instances_*2014.json and check that its categories are COCO's 80."""
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotation file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise ValueError(f"{path}: no '{key}' list; is this a COCO instances file?")
    names = tuple(c["name"] for c in sorted(data["categories"], key=lambda c: c["id"]))
    if names != COCO_CLASSES:
        diff = sorted(set(names) ^ set(COCO_CLASSES)) or ["(order)"]
        raise ValueError(f"{path}: categories differ from COCO 2014's 80 things ({describe_missing(diff)})")
    return data


def _split_sources(ccfg: dict[str, Any], wanted: list[str], progress: bool) -> tuple[dict, dict, dict]:
    """Per split: image folder and annotation file; plus an origin description for dataset.json."""
    if ccfg["root"] is not None:
        root = Path(ccfg["root"])
        if not root.is_dir():
            raise FileNotFoundError(f"data.coco14.root = {root} is not a folder; point it at an existing "
                                    "COCO 2014 copy (train2014/, val2014/, annotations/) or set it to null "
                                    "to download")
        needed = [p for s in wanted
                  for p in (f"{COCO_SPLITS[s]}/", f"annotations/instances_{COCO_SPLITS[s]}.json")]
        missing = [p for p in needed if not (root / p).exists()]
        if missing:
            raise FileNotFoundError(f"COCO copy at {root} is incomplete: missing {describe_missing(missing)}"
                                    "; complete the copy or set data.coco14.root to null to download")
        images = {s: root / COCO_SPLITS[s] for s in wanted}
        anns = {s: root / "annotations" / f"instances_{COCO_SPLITS[s]}.json" for s in wanted}
        return images, anns, {"coco": "existing copy"}
    download_dir = Path(ccfg["download_dir"])
    common = {"progress": progress, "timeout": ccfg["timeout"], "retries": ccfg["retries"]}
    wanted_json = tuple(f"annotations/instances_{COCO_SPLITS[s]}.json" for s in wanted)
    ann_dir = fetch_and_extract(ccfg["urls"]["annotations"], ccfg["checksums"]["annotations"], download_dir,
                                include=lambda n: n in wanted_json, url_key="data.coco14.urls.annotations",
                                checksum_key="data.coco14.checksums.annotations", **common)
    images, anns, origin = {}, {}, {}
    for s in wanted:
        folder = COCO_SPLITS[s]
        ex = fetch_and_extract(ccfg["urls"][s], ccfg["checksums"][s], download_dir,
                               include=lambda n, f=folder: n.startswith(f + "/"),
                               url_key=f"data.coco14.urls.{s}", checksum_key=f"data.coco14.checksums.{s}", **common)
        images[s] = ex / folder
        anns[s] = ann_dir / "annotations" / f"instances_{folder}.json"
        origin[s] = f"{filename_from_url(ccfg['urls'][s])} {ccfg['checksums'][s]}"
    ann_url, ann_sum = ccfg["urls"]["annotations"], ccfg["checksums"]["annotations"]
    origin["annotations"] = f"{filename_from_url(ann_url)} {ann_sum}"
    return images, anns, origin


def prepare_coco14(out_dir: Path, cfg: dict, progress: bool = True) -> dict:
    """Write COCO 2014 (train2014 -> train, val2014 -> val) into `out_dir` in VOC layout; return dataset.json.

    `cfg` is the whole `data` section; settings live in `cfg['coco14']` (see COCO14_DEFAULTS).
    """
    ccfg = merge_source_config(cfg, "coco14", COCO14_DEFAULTS)
    wanted = list(ccfg["splits"])
    if not wanted or any(s not in COCO_SPLITS for s in wanted):
        raise ValueError(f"data.coco14.splits = {wanted}: allowed splits are {list(COCO_SPLITS)}")
    if ccfg["crowd"] not in CROWD_MODES:
        raise ValueError(f"data.coco14.crowd = {ccfg['crowd']!r}; allowed: {', '.join(CROWD_MODES)}")
    images, ann_files, origin = _split_sources(ccfg, wanted, progress)

    # Read and check everything before writing anything.
    per_split: dict[str, list[tuple]] = {}
    labels: dict[str, list[int]] = {}
    for s in wanted:
        data = load_instances(ann_files[s])
        cls_of = {c["id"]: i + 1 for i, c in enumerate(sorted(data["categories"], key=lambda c: c["id"]))}
        by_image: dict[int, list[dict]] = {}
        for a in data["annotations"]:
            if ccfg["crowd"] == "skip" and a.get("iscrowd", 0):
                continue
            if a["category_id"] not in cls_of:
                raise ValueError(f"{ann_files[s]}: annotation {a.get('id')} has unknown category "
                                 f"{a['category_id']}")
            by_image.setdefault(a["image_id"], []).append({
                "id": a["id"], "segmentation": a["segmentation"], "iscrowd": int(a.get("iscrowd", 0)),
                "area": float(a.get("area", 0.0)), "cls": cls_of[a["category_id"]]})
        items, missing = [], []
        for img in sorted(data["images"], key=lambda im: im["file_name"]):
            anns = by_image.get(img["id"], [])
            if not anns and ccfg["drop_empty"]:
                continue
            src = images[s] / img["file_name"]
            if not src.is_file():
                missing.append(f"{images[s].name}/{img['file_name']}")
                continue
            img_id = Path(img["file_name"]).stem
            if img_id in labels:
                raise ValueError(f"{ann_files[s]}: image id {img_id} appears twice (or in two splits)")
            labels[img_id] = sorted({a["cls"] for a in anns})
            items.append((img_id, src, anns, int(img["height"]), int(img["width"])))
        if missing:
            raise FileNotFoundError(f"COCO images listed in {ann_files[s]} are missing: "
                                    f"{describe_missing(missing)}; complete the image folder (or delete the "
                                    "extracted folder and rerun)")
        per_split[s] = items
        del data

    splits = {s: [it[0] for it in per_split[s]] for s in wanted}
    meta = {
        "name": "coco14",
        "source": "coco14",
        "classes": ["background", *COCO_CLASSES],
        "ignore_index": IGNORE_INDEX,
        "splits": {s: len(v) for s, v in splits.items()},
        "origin": {**origin, "crowd": ccfg["crowd"], "drop_empty": ccfg["drop_empty"]},
    }
    with staged_output(Path(out_dir)) as tmp:
        for s in wanted:
            tasks = [(*it, tmp, ccfg["crowd"], ccfg["link"], ccfg["jpeg_quality"]) for it in per_split[s]]
            run_tasks(_coco_item, tasks, int(ccfg["workers"]), progress, f"coco14 {s} images + masks")
        write_layout(tmp, splits, labels, meta)
    log.info("COCO 2014 written to %s: %s", out_dir, meta["splits"])
    return meta
