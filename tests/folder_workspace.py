"""A VOC-layout dataset exported as a user's photo folder + tags CSV (+ masks), for the `folder` source tests.

Shared by tests/test_pipeline_e2e.py; pytest puts tests/ on sys.path, so it is imported as `folder_workspace`.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

# Each image of a mixed export is saved in the next of these forms (what a photo folder really holds); one, the
# eighth, as a photo ten times larger than the others (scaled back down by data.folder.max_side).
MODES = ("png rgb", "jpeg grey", "jpeg cmyk", "png rgba", "png palette", "png 16-bit grey", "jpeg exif-rotated",
         "jpeg copy")
LARGE = 7


def _save_mixed(image: np.ndarray, mode: str, dest: Path) -> Path:
    """`image` saved in form `mode` under `dest` (suffix set here); the photo shown is `image` again, up to the
    form's loss (grey, palette, JPEG, scale)."""
    img = Image.fromarray(image)
    if mode.startswith("png"):
        dest = dest.with_suffix(".png")
        if mode == "png rgba":
            img = Image.fromarray(np.dstack([image, np.full(image.shape[:2], 255, np.uint8)]))
        elif mode == "png palette":
            img = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
        elif mode == "png 16-bit grey":
            img = Image.fromarray(np.asarray(img.convert("L"), dtype=np.uint16) * 257)
        img.save(dest)
        return dest
    dest = dest.with_suffix(".JPG" if mode == "jpeg large" else ".jpeg")
    if mode == "jpeg grey":
        img.convert("L").save(dest, quality=95)
    elif mode == "jpeg cmyk":
        img.convert("CMYK").save(dest, quality=95)
    elif mode == "jpeg exif-rotated":
        exif = Image.Exif()
        exif[0x0112] = 6  # shown after a quarter turn clockwise: store it a quarter turn anticlockwise
        img.transpose(Image.Transpose.ROTATE_90).save(dest, quality=95, exif=exif)
    elif mode == "jpeg large":
        img.resize((img.width * 10, img.height * 10), Image.Resampling.BICUBIC).save(dest, quality=90)
    else:
        img.save(dest, quality=95)
    return dest


def export_folder(voc_root: Path, dest: Path, mixed: bool, masks: bool, split_column: bool) -> dict:
    """Write `voc_root` (train and val) as nested albums with odd names under `dest/photos`, a tags CSV with class
    names (and a split column if asked), and masks mirroring the photos if asked.

    Unmixed: every JPEG is copied byte for byte and the CSV lists the images in the dataset's split order, so the
    folder source must rebuild exactly the same dataset. Mixed: every image is re-saved in the next form of MODES.
    Returns the paths and the class list for a params `data.folder` section.
    """
    meta = json.loads((voc_root / "dataset.json").read_text())
    labels = json.loads((voc_root / "cls_labels.json").read_text())
    classes = meta["classes"][1:]
    photos, mask_dir = dest / "photos", dest / "masks"
    rows = []
    k = 0
    for split in ("train", "val"):
        for image_id in (voc_root / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split():
            album = f"Ferien {2019 + k % 3}/Strand & Meer ({k % 2})" if k % 4 else "Ünïcödé Album/фото"
            target = photos / album / f"IMG {k:04d}, {image_id} ü"
            target.parent.mkdir(parents=True, exist_ok=True)
            src = voc_root / "JPEGImages" / f"{image_id}.jpg"
            if mixed:
                with Image.open(src) as im:
                    mode = "jpeg large" if k == LARGE else MODES[k % len(MODES)]
                    path = _save_mixed(np.asarray(im.convert("RGB")), mode, target)
            else:
                path = target.with_suffix(".jpg")
                shutil.copyfile(src, path)
            rel = path.relative_to(photos).as_posix()
            if masks:
                mask = mask_dir / Path(rel).with_suffix(".png")
                mask.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(voc_root / "SegmentationClass" / f"{image_id}.png", mask)
            rows.append([rel, ";".join(meta["classes"][c] for c in labels[image_id]), split])
            k += 1
    tags = dest / "tags.csv"
    with open(tags, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "labels", "split"] if split_column else ["image", "labels"])
        writer.writerows(rows if split_column else [r[:2] for r in rows])
    return {"images": str(photos), "labels": str(tags), "classes": classes,
            "masks": str(mask_dir) if masks else None, "rows": rows}
