"""Your own photos and tags (`data.source: folder`) in the shared VOC layout.

Input (params `data.folder`, defaults in FOLDER_DEFAULTS):
- `images`: a folder of JPEG / PNG photos, any depth of sub-folders, any file names, any mode and size;
- `labels`: a UTF-8 CSV with the header `image,labels` and optionally `split`: `image` a path relative to
  `images`, `labels` class names joined by `;` (empty: none of the classes), `split` train | val;
- `classes`: the class names, ids 1..N in this order (0 is background);
- `masks` (optional): a folder mirroring the images' relative paths with `.png` class-id masks (0 background,
  255 ignore); per split, every image has one or none has (then that split is evaluated without ground truth).

Everything that can be checked without decoding pixels is checked first (`plan_folder`, which the
Snakefile also runs before any job): each problem names the CSV line and the user's path, all of them in
one message. Then every image is decoded and converted into a hidden folder beside `data.dir`, renamed
into place only when every image and mask went through (a truncated or unreadable file is named, never
skipped). Internal ids are stable (a slug of the path plus a hash of it) and `image_ids.csv` beside the
layout maps each id back to the user's file.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import re
import shutil
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from cpal.core.config import validate_section
from cpal.core.io import load_label_png, save_jpeg, save_label_png, write_text
from cpal.data.voc import IGNORE_INDEX
from cpal.data.voc12 import check_label_values, describe_missing, merge_source_config, run_tasks, staged_output, write_layout

log = logging.getLogger(__name__)

FOLDER_DEFAULTS: dict[str, Any] = {
    "images": None,        # folder of photos (required)
    "labels": None,        # CSV image,labels[,split] (required)
    "classes": None,       # class names, ids 1..N (required)
    "masks": None,         # optional folder of .png masks mirroring the images' relative paths
    "val_fraction": 0.2,   # without a split column: share of images put in val (deterministic, by data.seed)
    "max_side": 512,       # longer side above this is scaled down (masks: nearest); null keeps every size
    "jpeg_quality": 95,    # for images that are converted (not RGB JPEG, rotated by EXIF, or scaled)
    "workers": 0,          # processes for decoding and conversion; 0 = in this process
}
COLUMNS = ("image", "labels", "split")
SPLITS = ("train", "val")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
FORMATS = ("JPEG", "MPO", "PNG")  # MPO: the multi-picture JPEG many cameras and phones write
ID_FILE = "image_ids.csv"
_SHOW = 10
_ROTATED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


class FolderSourceError(ValueError):
    """The photo folder, tags CSV or masks break the contract; the message names the key, line and file."""


@dataclass(frozen=True)
class Item:
    """One CSV row that passed the checks."""

    line: int
    image: str             # the user's path relative to `images`, as written (normalised to NFC and /)
    src: Path
    labels: tuple[int, ...]
    split: str
    id: str
    mask: Path | None = None


@dataclass
class FolderPlan:
    """What `prepare_folder` will convert, found without decoding any pixel."""

    cfg: dict[str, Any]
    classes: list[str]
    items: list[Item]
    warnings: list[str] = field(default_factory=list)
    fingerprint: str = ""

    def ground_truth(self) -> dict[str, bool]:
        return {s: any(i.mask is not None for i in self.items if i.split == s) for s in SPLITS}


def image_id(rel: str) -> str:
    """Stable id of a user path: ASCII slug of it (for people) + 10 hex digits of its SHA-1 (for uniqueness)."""
    stem = PurePosixPath(rel).with_suffix("").as_posix()
    ascii_stem = unicodedata.normalize("NFKD", stem).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^A-Za-z0-9]+", "_", ascii_stem).strip("_")[:48] or "image"
    return f"{slug}-{hashlib.sha1(rel.encode()).hexdigest()[:10]}"


def _nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


def _index_files(root: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    """NFC relative POSIX path -> file, for every file with one of `suffixes` under `root`.

    Hidden entries (".DS_Store", macOS "._x.jpg" companions) are skipped; linked folders are followed once.
    """
    found: dict[str, Path] = {}
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(suffixes):
                path = Path(dirpath) / name
                found[_nfc(path.relative_to(root).as_posix())] = path
    return found


def read_labels_csv(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """(lower-cased header, [(line number, fields)]) of the tags CSV; not UTF-8 or not a CSV is an error."""
    key = "data.folder.labels"
    if not path.is_file():
        raise FolderSourceError(f"{key} = {path}: no such file")
    raw = path.read_bytes()
    nul = raw.find(b"\x00")
    if nul >= 0:
        line = raw[:nul].count(b"\n") + 1
        raise FolderSourceError(f"{key} = {path}: not a CSV text file (a NUL byte on line {line}); export the tags "
                                "as CSV UTF-8")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise FolderSourceError(f"{key} = {path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} on line {line}); "
                                "save the file as CSV UTF-8") from None
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    rows: list[tuple[int, list[str]]] = []
    try:
        header = next(reader, None)
        for fields in reader:
            if any(f.strip() for f in fields):
                rows.append((reader.line_num, fields))
    except csv.Error as exc:
        raise FolderSourceError(f"{key} = {path} line {reader.line_num}: not valid CSV ({exc})") from None
    if header is None:
        raise FolderSourceError(f"{key} = {path}: the file is empty; its first line must be the header image,labels")
    names = [h.strip().lower() for h in header]
    if "image" not in names or "labels" not in names:
        hint = ""
        if len(header) == 1:
            sep = next((s for s in (";", "\t", "|") if s in header[0]), None)
            hint = f" (the fields look separated by {sep!r}: use commas)" if sep else ""
        raise FolderSourceError(f"{key} = {path} line 1: the header must name the columns image,labels (and "
                                f"optionally split), got {','.join(header)!r}{hint}")
    unknown = [h for h in names if h not in COLUMNS]
    if unknown or len(set(names)) != len(names):
        what = f"unknown column(s) {unknown}" if unknown else "a column named twice"
        raise FolderSourceError(f"{key} = {path} line 1: {what}; the columns are image, labels and optionally split")
    return names, rows


def _relative(text: str) -> str | None:
    """The user's path normalised (NFC, '/', no './'); None when it is absolute or leaves the folder."""
    text = _nfc(text.strip())
    path = PurePosixPath(text)
    if not text or path.is_absolute() or ".." in path.parts:
        return None
    return path.as_posix()


def _split_assignment(items: list[dict[str, Any]], fraction: float, seed: int) -> None:
    """Without a split column: the round(fraction * n) images whose hash of (seed, path) comes first go to val."""
    n = len(items)
    order = sorted(range(n), key=lambda i: hashlib.sha1(f"{seed}:{items[i]['image']}".encode()).hexdigest())
    n_val = min(max(1, round(fraction * n)), n - 1)
    val = set(order[:n_val])
    for i, item in enumerate(items):
        item["split"] = "val" if i in val else "train"


def _fail(problems: list[str], what: str) -> None:
    if problems:
        more = f"\n  (and {len(problems) - _SHOW} more)" if len(problems) > _SHOW else ""
        raise FolderSourceError(f"{what}:\n  - " + "\n  - ".join(problems[:_SHOW]) + more)


def plan_folder(data_cfg: dict[str, Any]) -> FolderPlan:
    """Check the folder, CSV and masks without decoding pixels; every problem names its CSV line and path.

    Refused: unknown class names, listed images that are missing, duplicate rows, bad split values, masks
    covering only part of a split. Warned: photos present but not listed, masks of no listed image,
    classes without a training image.
    """
    validate_section("data", data_cfg, source="data.folder")
    cfg = merge_source_config(data_cfg, "folder", FOLDER_DEFAULTS)
    for key in ("images", "labels", "classes"):
        if cfg[key] is None:
            raise FolderSourceError(f"data.folder.{key} is required with data.source: folder")
    images_root, labels_path = Path(cfg["images"]), Path(cfg["labels"])
    if not images_root.is_dir():
        raise FolderSourceError(f"data.folder.images = {images_root}: no such folder")
    masks_root = Path(cfg["masks"]) if cfg["masks"] is not None else None
    if masks_root is not None and not masks_root.is_dir():
        raise FolderSourceError(f"data.folder.masks = {masks_root}: no such folder (null: no masks)")
    classes = list(cfg["classes"])
    index = {name: i + 1 for i, name in enumerate(classes)}
    lower = {name.lower(): name for name in classes}
    header, rows = read_labels_csv(labels_path)
    has_split = "split" in header
    files = _index_files(images_root, IMAGE_SUFFIXES)
    files_lower: dict[str, str] = {}
    for rel in files:
        files_lower.setdefault(rel.lower(), rel)
    mask_files = _index_files(masks_root, (".png",)) if masks_root is not None else {}

    csv_name = labels_path.name
    problems: list[str] = []
    first_line: dict[str, int] = {}
    rows_ok: list[dict[str, Any]] = []
    for line, fields in rows:
        where = f"{csv_name} line {line}"
        if len(fields) != len(header):
            problems.append(f"{where}: {len(fields)} field(s) where the header has {len(header)} "
                            "(quote a path that holds a comma)")
            continue
        row = dict(zip(header, fields, strict=True))
        rel = _relative(row["image"])
        if rel is None:
            problems.append(f"{where}: image {row['image']!r} must be a path inside data.folder.images "
                            "(relative, no '..')")
            continue
        where = f"{where}, image {rel!r}"
        if rel in first_line:
            problems.append(f"{where}: listed again (first on line {first_line[rel]})")
            continue
        first_line[rel] = line
        src = files.get(rel)
        if src is None and (images_root / rel).is_file():
            src = images_root / rel  # a hidden file or another suffix, listed on purpose: decoding decides
        if src is None:
            near = files_lower.get(rel.lower())
            hint = f" (there is {near!r}: names are case-sensitive)" if near else ""
            problems.append(f"{where}: no such file in {images_root}{hint}")
            continue
        labels, bad = set(), []
        for name in (n.strip() for n in row["labels"].split(";")):
            if not name:
                continue
            if name in index:
                labels.add(index[name])
            else:
                bad.append(name + (f" (did you mean {lower[name.lower()]!r}?)" if name.lower() in lower else ""))
        if bad:
            problems.append(f"{where}: unknown class name(s) {', '.join(bad)}; data.folder.classes are "
                            f"{', '.join(classes)}")
            continue
        split = row.get("split", "").strip().lower() if has_split else None
        if has_split and split not in SPLITS:
            problems.append(f"{where}: split {row['split']!r} is not train or val")
            continue
        mask = None
        if masks_root is not None:
            mask_rel = PurePosixPath(rel).with_suffix(".png").as_posix()
            mask = mask_files.get(mask_rel) or ((masks_root / mask_rel) if (masks_root / mask_rel).is_file() else None)
        rows_ok.append({"line": line, "image": rel, "src": src, "labels": tuple(sorted(labels)), "split": split,
                        "mask": mask})
    _fail(problems, f"{labels_path} has {len(problems)} problem(s)")
    if len(rows_ok) < 2:
        raise FolderSourceError(f"data.folder.labels = {labels_path} lists {len(rows_ok)} image(s); at least two "
                                "are needed (one for train, one for val)")
    if not has_split:
        _split_assignment(rows_ok, float(cfg["val_fraction"]), int(data_cfg.get("seed", 0)))
    for split in SPLITS:
        if not any(r["split"] == split for r in rows_ok):
            fix = f"give some rows split {split}" if has_split else "raise or lower data.folder.val_fraction"
            raise FolderSourceError(f"data.folder.labels = {labels_path}: no image is in split {split!r}; a run "
                                    f"needs train and val images ({fix})")

    warnings: list[str] = []
    if masks_root is not None:
        if not any(r["mask"] for r in rows_ok):
            example = masks_root / PurePosixPath(rows_ok[0]["image"]).with_suffix(".png")
            raise FolderSourceError(f"data.folder.masks = {masks_root}: no mask for any listed image (expected "
                                    f"for example {example}); set data.folder.masks to null to run without masks")
        for split in SPLITS:
            have = [r for r in rows_ok if r["split"] == split]
            missing = [f"{csv_name} line {r['line']}, image {r['image']!r}" for r in have if r["mask"] is None]
            if missing and len(missing) < len(have):
                raise FolderSourceError(
                    f"data.folder.masks = {masks_root}: {len(missing)} of the {len(have)} {split} images have no "
                    f"mask ({PurePosixPath(rows_ok[0]['image']).with_suffix('.png')} mirrors "
                    f"{rows_ok[0]['image']}), e.g. {describe_missing(missing)}; give every {split} image a mask "
                    "or none")
        used = {PurePosixPath(r["image"]).with_suffix(".png").as_posix() for r in rows_ok}
        orphans = sorted(set(mask_files) - used)
        if orphans:
            warnings.append(f"{len(orphans)} mask(s) in {masks_root} belong to no listed image, e.g. "
                            f"{describe_missing(orphans)}")
    unlisted = sorted(set(files) - set(first_line))
    if unlisted:
        warnings.append(f"{len(unlisted)} image(s) in {images_root} are not listed in {labels_path} and are left "
                        f"out, e.g. {describe_missing(unlisted)}")
    in_train = {c for r in rows_ok if r["split"] == "train" for c in r["labels"]}
    absent = [classes[c - 1] for c in range(1, len(classes) + 1) if c not in in_train]
    if absent:
        warnings.append(f"class(es) {', '.join(absent)} appear in no train image: the classifier cannot learn them")

    items, owner = [], {}
    for r in rows_ok:
        iid = image_id(r["image"])
        if iid in owner:  # a 40-bit hash collision; never seen, but never silently merged either
            raise FolderSourceError(f"{r['image']!r} and {owner[iid]!r} get the same id {iid}; rename one")
        owner[iid] = r["image"]
        items.append(Item(line=r["line"], image=r["image"], src=r["src"], labels=r["labels"], split=r["split"],
                          id=iid, mask=r["mask"]))
    digest = hashlib.sha256(labels_path.read_bytes())
    digest.update(repr(sorted(cfg.items())).encode())
    for it in items:
        for p in (it.src, it.mask):
            if p is not None:
                st = p.stat()
                digest.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return FolderPlan(cfg=cfg, classes=classes, items=items, warnings=warnings, fingerprint=digest.hexdigest()[:16])


def to_rgb(img: Image.Image) -> Image.Image:
    """Any JPEG / PNG mode as 8-bit RGB: 16-bit grey scaled (65535 -> 255), transparency composited over
    white, palette, CMYK, grey and 1-bit converted."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        grey = np.clip(np.round(np.asarray(img, dtype=np.float64) / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img.convert("RGB")


def fit_size(size: tuple[int, int], max_side: int | None) -> tuple[int, int] | None:
    """(w, h) scaled so that the longer side is `max_side`; None when it already fits."""
    w, h = size
    if not max_side or max(w, h) <= max_side:
        return None
    scale = max_side / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def place_image(src: Path, dst: Path, max_side: int | None, quality: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Write `src` as an RGB JPEG at `dst`; ((w, h) as displayed, i.e. after EXIF orientation, (w, h) written).

    A plain RGB JPEG that needs no rotation or scaling is copied byte for byte (same pixels as the user's
    file); anything else is decoded, oriented, converted, scaled and re-encoded. Every file is fully
    decoded, so a truncated one fails here.
    """
    with Image.open(src) as img:
        if img.format not in FORMATS:
            raise ValueError(f"{img.format or 'unknown'} image; JPEG or PNG expected")
        orientation = img.getexif().get(0x0112, 1)
        w, h = img.size
        shown = (h, w) if orientation in _ROTATED else (w, h)
        target = fit_size(shown, max_side)
        if img.format == "JPEG" and img.mode == "RGB" and orientation in (0, 1) and target is None:
            img.load()
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            return shown, shown
        if target is not None and img.format in ("JPEG", "MPO"):
            img.draft(None, (target[1], target[0]) if orientation in _ROTATED else target)  # DCT scaling: fast
        img.load()
        rgb = to_rgb(ImageOps.exif_transpose(img))
    if target is not None:
        rgb = rgb.resize(target, Image.Resampling.LANCZOS)
    save_jpeg(dst, np.asarray(rgb, dtype=np.uint8), quality=quality)
    return shown, rgb.size


def place_mask(src: Path, dst: Path, shown: tuple[int, int], size: tuple[int, int], num_classes: int) -> None:
    """Check a mask against its image as displayed (size) and the classes (values), scale it like the image."""
    label = load_label_png(src)
    if label.shape != (shown[1], shown[0]):
        rotated = " (it matches the photo before its EXIF rotation: draw masks on the photo as shown)" \
            if label.shape == (shown[0], shown[1]) else ""
        raise ValueError(f"mask {src} is {label.shape[1]}x{label.shape[0]}, its image {shown[0]}x{shown[1]}{rotated}")
    check_label_values(label, num_classes, f"mask {src}")
    if size != shown:
        label = np.asarray(Image.fromarray(label).resize(size, Image.Resampling.NEAREST))
    save_label_png(dst, label)


def _convert(task: tuple) -> tuple[str, str | tuple[int, int, int, int]]:
    """One image (and mask): (id, (shown w, h, written w, h)) or (id, error message). Runs in worker processes."""
    item_id, src, mask, out, max_side, quality, num_classes, where = task
    try:
        shown, size = place_image(src, out / "JPEGImages" / f"{item_id}.jpg", max_side, quality)
    except FileNotFoundError:
        return item_id, f"{where}: the file disappeared"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        return item_id, f"{where}: unreadable or truncated image ({exc})"
    if mask is not None:
        try:
            place_mask(mask, out / "SegmentationClass" / f"{item_id}.png", shown, size, num_classes)
        except (OSError, ValueError) as exc:
            return item_id, f"{where}: {exc}"
    return item_id, (*shown, *size)


def prepare_folder(out_dir: Path, data_cfg: dict[str, Any], progress: bool = True) -> dict[str, Any]:
    """Convert the user's folder into the VOC layout at `out_dir`; return dataset.json's content.

    Checks everything first (plan_folder), then decodes every image into a hidden sibling folder that
    replaces `out_dir` only when all of them went through; otherwise every bad file is named and nothing
    is written.
    """
    plan = plan_folder(data_cfg)
    for warning in plan.warnings:
        log.warning("%s", warning)
    cfg, items = plan.cfg, plan.items
    csv_name = Path(cfg["labels"]).name
    num_classes = len(plan.classes) + 1
    with staged_output(Path(out_dir)) as tmp:
        tasks = [(it.id, it.src, it.mask, tmp, cfg["max_side"], cfg["jpeg_quality"], num_classes,
                  f"{csv_name} line {it.line}, image {it.image!r}") for it in items]
        results = dict(run_tasks(_convert, tasks, int(cfg["workers"]), progress, "folder images"))
        errors = [r for r in results.values() if isinstance(r, str)]
        _fail(errors, f"{len(errors)} of {len(items)} listed image(s) could not be converted; nothing was written "
                      f"to {out_dir}")
        splits = {s: [it.id for it in items if it.split == s] for s in SPLITS}
        table = io.StringIO()
        writer = csv.writer(table, lineterminator="\n")
        writer.writerow(["id", "split", "image", "mask", "width", "height", "original_width", "original_height"])
        for it in items:
            w0, h0, w, h = results[it.id]
            mask = it.mask.relative_to(Path(cfg["masks"])).as_posix() if it.mask is not None else ""
            writer.writerow([it.id, it.split, it.image, mask, w, h, w0, h0])
        write_text(tmp / ID_FILE, table.getvalue())
        resized = sum(1 for r in results.values() if r[:2] != r[2:])
        meta = {
            "name": "folder",
            "source": "folder",
            "classes": ["background", *plan.classes],
            "ignore_index": IGNORE_INDEX,
            "splits": {s: len(v) for s, v in splits.items()},
            "ground_truth": plan.ground_truth(),
            "ids": ID_FILE,
            "origin": {"images": str(Path(cfg["images"]).resolve()), "labels": str(Path(cfg["labels"]).resolve()),
                       "masks": str(Path(cfg["masks"]).resolve()) if cfg["masks"] is not None else None,
                       "fingerprint": plan.fingerprint},
            "max_side": cfg["max_side"],
            "resized": resized,
            "warnings": plan.warnings,
        }
        write_layout(tmp, splits, {it.id: list(it.labels) for it in items}, meta)
    log.info("folder %s written to %s: %s (%d scaled down to max_side %s; ground truth %s)", cfg["images"], out_dir,
             meta["splits"], resized, cfg["max_side"], meta["ground_truth"])
    return meta
