"""Your own data (`data.source: folder`): conversion of odd folders and modes, and every refusal with its message.

Fast: small images made here, the converter called directly (no pipeline). The end-to-end runs are in
tests/test_pipeline_e2e.py.
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cpal.core.config import ParamsError, validate_params
from cpal.core.io import load_label_png, save_label_png
from cpal.data.folder import FolderSourceError, image_id, plan_folder, prepare_folder
from cpal.data.voc import VOCDataset

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["cat", "dog", "boat"]


def _rgb(w: int, h: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save(path: Path, img: Image.Image, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)


def _png16_rgb(path: Path, w: int, h: int) -> None:
    """A 48-bit RGB PNG (Pillow cannot write one), written chunk by chunk."""
    import struct
    import zlib

    data = np.full((h, w, 3), 0x8000, dtype=">u2")
    raw = b"".join(b"\x00" + data[y].tobytes() for y in range(h))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


# path -> (labels, writer)
def _photos(root: Path) -> dict[str, str]:
    """Nested albums, odd names, every mode of the contract; returns path -> labels as the CSV gives them."""
    plain = root / "Ferien 2019" / "Strand & Meer" / "IMG 0001.JPG"
    _save(plain, Image.fromarray(_rgb(40, 30, 1)), quality=90)
    _save(root / "Ünïcödé" / "фото, 2.jpeg", Image.fromarray(_rgb(36, 28, 2)).convert("L"))
    _save(root / "cmyk.jpg", Image.fromarray(_rgb(32, 24, 3)).convert("CMYK"))
    rgba = np.dstack([np.zeros((24, 32, 3), np.uint8), np.full((24, 32), 255, np.uint8)])
    rgba[:8, :8, 3] = 0  # a transparent corner, black underneath: composited over white
    _save(root / "png" / "rgba.png", Image.fromarray(rgba))
    _save(root / "png" / "palette.png", Image.fromarray(_rgb(24, 24, 5)).convert("P", palette=Image.Palette.ADAPTIVE))
    _save(root / "png" / "grey16.png", Image.fromarray(np.full((20, 26), 65535, np.uint16)))
    _png16_rgb(root / "png" / "rgb48.png", 22, 18)
    rotated = Image.fromarray(_rgb(40, 20, 6))
    exif = rotated.getexif()
    exif[0x0112] = 6  # shown rotated by 90 degrees: 20 x 40
    _save(root / "deep" / "a" / "b" / "c" / "rotated.jpg", rotated, exif=exif)
    _save(root / "big.png", Image.fromarray(_rgb(200, 100, 7)))
    return {
        "Ferien 2019/Strand & Meer/IMG 0001.JPG": "cat",
        "Ünïcödé/фото, 2.jpeg": "dog;cat",
        "cmyk.jpg": "boat",
        "png/rgba.png": "cat",
        "png/palette.png": "",
        "png/grey16.png": "dog",
        "png/rgb48.png": "boat ; cat",
        "deep/a/b/c/rotated.jpg": "dog",
        "big.png": "boat",
    }


def _write_csv(path: Path, rows: list[list[str]], header: list[str] | None = None) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header or ["image", "labels", "split"])
        writer.writerows(rows)
    return path


@pytest.fixture
def photos(tmp_path: Path, tiny_params: dict) -> dict:
    """A photo folder, its tags CSV (with a split column) and a `data` section pointing at them."""
    images = tmp_path / "photos"
    tags = _photos(images)
    splits = ["val" if i % 3 == 2 else "train" for i in range(len(tags))]
    rows = [[p, lab, s] for (p, lab), s in zip(tags.items(), splits, strict=True)]
    labels = _write_csv(tmp_path / "tags.csv", rows)
    data = copy.deepcopy(tiny_params["data"])
    data.update(source="folder", dir=str(tmp_path / "data"),
                folder={"images": str(images), "labels": str(labels), "classes": list(CLASSES), "max_side": 64})
    return {"data": data, "images": images, "labels": labels, "rows": rows, "out": tmp_path / "data",
            "tmp": tmp_path}


def _nothing_written(out: Path) -> None:
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")] == []


def _refused(photos: dict, *patterns: str) -> str:
    with pytest.raises((FolderSourceError, ParamsError)) as info:
        prepare_folder(photos["out"], photos["data"], progress=False)
    message = str(info.value)
    for pattern in patterns:
        assert pattern in message, f"{pattern!r} not in:\n{message}"
    _nothing_written(photos["out"])
    return message


# ---------------------------------------------------------------------------------------------------
# conversion


def test_converts_every_mode_into_the_voc_layout(photos: dict) -> None:
    meta = prepare_folder(photos["out"], photos["data"], progress=False)
    out = photos["out"]
    assert meta["classes"] == ["background", *CLASSES] and meta["ground_truth"] == {"train": False, "val": False}
    assert not (out / "SegmentationClass").exists()
    table = {r["image"]: r for r in csv.DictReader(open(out / "image_ids.csv", encoding="utf-8"))}
    assert set(table) == {r[0] for r in photos["rows"]}
    labels = json.loads((out / "cls_labels.json").read_text())
    for rel, lab, split in photos["rows"]:
        row = table[rel]
        assert row["id"] == image_id(rel) and row["split"] == split
        assert labels[row["id"]] == sorted(CLASSES.index(n.strip()) + 1 for n in lab.split(";") if n.strip())
    for split in ("train", "val"):
        ds = VOCDataset(out, split)
        assert ds.ids == [table[r[0]]["id"] for r in photos["rows"] if r[2] == split]  # the CSV's order
        for i in ds.ids:
            assert ds.image(i).shape[2] == 3 and max(ds.image_size(i)) <= 64
    img = {rel: np.asarray(Image.open(out / "JPEGImages" / f"{table[rel]['id']}.jpg")) for rel in table}
    src = photos["images"] / "Ferien 2019/Strand & Meer/IMG 0001.JPG"
    assert (out / "JPEGImages" / f"{table['Ferien 2019/Strand & Meer/IMG 0001.JPG']['id']}.jpg").read_bytes() \
        == src.read_bytes()  # a plain RGB JPEG is copied: the very pixels of the user's file
    assert img["deep/a/b/c/rotated.jpg"].shape == (40, 20, 3)  # EXIF orientation applied
    assert img["big.png"].shape == (32, 64, 3)  # longer side scaled to max_side
    row = table["big.png"]
    assert (row["width"], row["height"], row["original_width"], row["original_height"]) == ("64", "32", "200", "100")
    assert abs(int(img["png/grey16.png"].mean()) - 255) <= 2  # 16 bit: 65535 -> 255, not clipped garbage
    assert abs(int(img["png/rgb48.png"].mean()) - 128) <= 2
    assert img["png/rgba.png"][2, 2].min() >= 240 and img["png/rgba.png"][20, 20].max() <= 15  # over white
    assert meta["resized"] == 1 and meta["splits"] == {"train": 6, "val": 3}


def test_ids_are_stable_and_readable() -> None:
    a = image_id("Ferien 2019/Strand & Meer/IMG 0001.JPG")
    assert a == image_id("Ferien 2019/Strand & Meer/IMG 0001.JPG")
    assert re.fullmatch(r"Ferien_2019_Strand_Meer_IMG_0001-[0-9a-f]{10}", a)
    assert image_id("a/b.jpg") != image_id("a/b.png") != image_id("a_b.png")
    assert re.fullmatch(r"[A-Za-z0-9_-]+", image_id("фото/😀.jpg"))


def test_without_split_column_the_split_is_deterministic(photos: dict) -> None:
    _write_csv(photos["labels"], [r[:2] for r in photos["rows"]], header=["image", "labels"])
    photos["data"]["folder"]["val_fraction"] = 0.34
    first = {s: [i.id for i in plan_folder(photos["data"]).items if i.split == s] for s in ("train", "val")}
    assert len(first["val"]) == 3 and len(first["train"]) == 6
    assert first == {s: [i.id for i in plan_folder(photos["data"]).items if i.split == s] for s in ("train", "val")}
    photos["data"]["seed"] = 1
    other = [i.id for i in plan_folder(photos["data"]).items if i.split == "val"]
    assert len(other) == 3


def test_masks_are_checked_scaled_and_written(photos: dict) -> None:
    masks = photos["tmp"] / "masks"
    for rel, *_ in photos["rows"]:
        with Image.open(photos["images"] / rel) as im:
            from PIL import ImageOps

            w, h = ImageOps.exif_transpose(im).size
        label = np.zeros((h, w), np.uint8)
        label[: h // 2] = 2
        label[-h // 5:] = 255
        save_label_png(masks / Path(rel).with_suffix(".png"), label)
    photos["data"]["folder"]["masks"] = str(masks)
    meta = prepare_folder(photos["out"], photos["data"], progress=False)
    assert meta["ground_truth"] == {"train": True, "val": True}
    ds = VOCDataset(photos["out"], "train")
    for i in ds.ids:
        mask = ds.mask(i)  # checks size against the written image
        assert set(np.unique(mask)) <= {0, 2, 255}
    big = load_label_png(photos["out"] / "SegmentationClass" / f"{image_id('big.png')}.png")
    assert big.shape == (32, 64) and big[0, 0] == 2 and big[-1, 0] == 255


def test_masks_for_val_only_mean_val_has_ground_truth(photos: dict) -> None:
    masks = photos["tmp"] / "masks"
    for rel, _, split in photos["rows"]:
        if split == "val":
            with Image.open(photos["images"] / rel) as im:
                w, h = im.size
            save_label_png(masks / Path(rel).with_suffix(".png"), np.zeros((h, w), np.uint8))
    photos["data"]["folder"]["masks"] = str(masks)
    meta = prepare_folder(photos["out"], photos["data"], progress=False)
    assert meta["ground_truth"] == {"train": False, "val": True}
    assert not VOCDataset(photos["out"], "train").has_ground_truth()
    assert VOCDataset(photos["out"], "val").has_ground_truth()


def test_unlisted_photos_are_a_warning_with_the_count(photos: dict, caplog: pytest.LogCaptureFixture) -> None:
    for name in ("extra 1.jpg", "album/extra 2.png"):
        _save(photos["images"] / name, Image.fromarray(_rgb(8, 8, 9)))
    (photos["images"] / ".DS_Store").write_bytes(b"\0")
    (photos["images"] / "._IMG 0001.JPG").write_bytes(b"\0")  # macOS companion files are not photos
    with caplog.at_level(logging.WARNING, logger="cpal.data.folder"):
        meta = prepare_folder(photos["out"], photos["data"], progress=False)
    assert any("2 image(s) in" in r.getMessage() and "not listed" in r.getMessage() and "extra 1.jpg" in r.getMessage()
               for r in caplog.records)
    assert meta["splits"]["train"] + meta["splits"]["val"] == len(photos["rows"])


def test_unicode_normalisation_and_dot_paths_are_forgiven(photos: dict) -> None:
    import unicodedata

    rows = [[("./" if i == 0 else "") + unicodedata.normalize("NFD", r[0]), *r[1:]]
            for i, r in enumerate(photos["rows"])]
    _write_csv(photos["labels"], rows)
    plan = plan_folder(photos["data"])
    assert [i.image for i in plan.items] == [r[0] for r in photos["rows"]]


# ---------------------------------------------------------------------------------------------------
# refusals: each names the key or the CSV line and the user's path, and leaves nothing in data.dir


def _rows_with(photos: dict, *extra: list[str]) -> None:
    _write_csv(photos["labels"], [*photos["rows"], *extra])


def test_unknown_class_names_line_and_path(photos: dict) -> None:
    photos["rows"][1][1] = "Cat;kat"
    _write_csv(photos["labels"], photos["rows"])
    _refused(photos, "tags.csv line 3, image 'Ünïcödé/фото, 2.jpeg': unknown class name(s) Cat (did you mean 'cat'?), "
                     "kat; data.folder.classes are cat, dog, boat")


def test_missing_image_names_line_and_path(photos: dict) -> None:
    _rows_with(photos, ["Ferien 2019/img 0002.jpg", "cat", "train"], ["CMYK.JPG", "boat", "val"])
    _refused(photos, "tags.csv line 11, image 'Ferien 2019/img 0002.jpg': no such file in",
             "tags.csv line 12, image 'CMYK.JPG': no such file", "(there is 'cmyk.jpg': names are case-sensitive)")


def test_duplicate_row_names_both_lines(photos: dict) -> None:
    _rows_with(photos, ["./png/rgba.png", "dog", "val"])
    _refused(photos, "tags.csv line 11, image 'png/rgba.png': listed again (first on line 5)")


def test_path_outside_the_folder_and_bad_split(photos: dict) -> None:
    photos["rows"][-1][2] = "test"
    _rows_with(photos, ["../secret.jpg", "cat", "train"])
    _refused(photos, "tags.csv line 10, image 'big.png': split 'test' is not train or val",
             "tags.csv line 11: image '../secret.jpg' must be a path inside data.folder.images")


def test_wrong_field_count_names_the_line(photos: dict) -> None:
    photos["labels"].write_text("image,labels\nbig.png,boat,extra\ncmyk.jpg,boat\n", encoding="utf-8")
    _refused(photos, "tags.csv line 2: 3 field(s) where the header has 2")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_unreadable_or_truncated_image_is_named(photos: dict, damage: str) -> None:
    for rel in ("Ferien 2019/Strand & Meer/IMG 0001.JPG", "png/rgba.png"):
        path = photos["images"] / rel
        good = path.read_bytes()
        path.write_bytes(b"\xff\xd8" + bytes(range(256)) * 4 if damage == "garbage" else good[: len(good) // 2])
    message = _refused(photos, "2 of 9 listed image(s) could not be converted; nothing was written",
                       "tags.csv line 2, image 'Ferien 2019/Strand & Meer/IMG 0001.JPG': unreadable or truncated image",
                       "tags.csv line 5, image 'png/rgba.png': unreadable or truncated image")
    assert "line 3" not in message


def test_not_jpeg_or_png_is_named(photos: dict) -> None:
    Image.fromarray(_rgb(10, 10, 1)).save(photos["images"] / "cmyk.jpg", format="BMP")
    _refused(photos, "tags.csv line 4, image 'cmyk.jpg': unreadable or truncated image (BMP image; JPEG or PNG "
                     "expected)")


def _masks_for_all(photos: dict, make) -> Path:
    masks = photos["tmp"] / "masks"
    for rel, *_ in photos["rows"]:
        with Image.open(photos["images"] / rel) as im:
            from PIL import ImageOps

            w, h = ImageOps.exif_transpose(im).size
        save_label_png(masks / Path(rel).with_suffix(".png"), make(rel, w, h))
    photos["data"]["folder"]["masks"] = str(masks)
    return masks


def test_mask_of_another_size_is_named(photos: dict) -> None:
    masks = _masks_for_all(photos, lambda rel, w, h: np.zeros((h + (rel == "cmyk.jpg"), w), np.uint8))
    _refused(photos, f"tags.csv line 4, image 'cmyk.jpg': mask {masks / 'cmyk.png'} is 32x25, its image 32x24")


def test_mask_drawn_before_exif_rotation_gets_a_hint(photos: dict) -> None:
    _masks_for_all(photos, lambda rel, w, h: np.zeros((w, h) if "rotated" in rel else (h, w), np.uint8))
    _refused(photos, "image 'deep/a/b/c/rotated.jpg': mask", "is 40x20, its image 20x40 (it matches the photo "
             "before its EXIF rotation")


def test_mask_values_outside_the_classes_are_named(photos: dict) -> None:
    masks = _masks_for_all(photos, lambda rel, w, h: np.full((h, w), 7 if rel == "big.png" else 3, np.uint8))
    _refused(photos, f"tags.csv line 10, image 'big.png': mask {masks / 'big.png'}: label value(s) [7] outside 0..3 "
                     "and 255")


def test_masks_covering_part_of_a_split_are_refused(photos: dict) -> None:
    masks = _masks_for_all(photos, lambda rel, w, h: np.zeros((h, w), np.uint8))
    (masks / "cmyk.png").unlink()
    _refused(photos, "data.folder.masks = ", "1 of the 3 val images have no mask", "tags.csv line 4, image 'cmyk.jpg'")
    photos["data"]["folder"]["masks"] = str(photos["tmp"] / "empty")
    (photos["tmp"] / "empty").mkdir()
    _refused(photos, "no mask for any listed image (expected for example", "set data.folder.masks to null")


def test_labels_file_not_utf8(photos: dict) -> None:
    photos["labels"].write_bytes("image,labels\nMüller.jpg,cat\n".encode("latin-1"))
    _refused(photos, f"data.folder.labels = {photos['labels']}: not UTF-8 text (byte 0xfc on line 2); save the file "
                     "as CSV UTF-8")


@pytest.mark.parametrize(("content", "expected"), [
    (b"PK\x03\x04\x00\x00binary", "not a CSV text file (a NUL byte on line 1)"),
    (b"", "the file is empty"),
    (b"file;tags\nbig.png;boat\n", "line 1: the header must name the columns image,labels (and optionally split), "
                                   "got 'file;tags' (the fields look separated by ';': use commas)"),
    (b"image,labels,Split,notes\n", "line 1: unknown column(s) ['notes']"),
    (b'image,labels\n"big.png,boat\n', "line 2: not valid CSV (unexpected end of data)"),
])
def test_labels_file_not_csv(photos: dict, content: bytes, expected: str) -> None:
    photos["labels"].write_bytes(content)
    _refused(photos, f"data.folder.labels = {photos['labels']}", expected)


def test_folders_that_do_not_exist_name_their_key(photos: dict) -> None:
    photos["data"]["folder"]["images"] = str(photos["tmp"] / "nope")
    _refused(photos, f"data.folder.images = {photos['tmp'] / 'nope'}: no such folder")
    photos["data"]["folder"].update(images=str(photos["images"]), masks=str(photos["tmp"] / "nomasks"))
    _refused(photos, "data.folder.masks = ", "no such folder (null: no masks)")
    photos["data"]["folder"].update(masks=None, labels=str(photos["tmp"] / "none.csv"))
    _refused(photos, f"data.folder.labels = {photos['tmp'] / 'none.csv'}: no such file")


@pytest.mark.parametrize(("classes", "expected"), [
    ([], "data.folder.classes = [] is invalid: [] should be non-empty"),
    (["cat", "dog", "cat"], "data.folder.classes = ['cat', 'dog', 'cat'] is invalid: ['cat', 'dog', 'cat'] has "
                            "non-unique elements"),
    (["cat", "dog;cat"], "data.folder.classes.1 = 'dog;cat' is invalid"),
    (["background", "cat"], "data.folder.classes must not name 'background'"),
])
def test_bad_class_lists_are_refused_by_the_schema(photos: dict, tiny_params: dict, classes: list, expected: str):
    photos["data"]["folder"]["classes"] = classes
    _refused(photos, expected)
    params = copy.deepcopy(tiny_params)
    params["data"] = photos["data"]
    with pytest.raises(ParamsError, match=re.escape(expected)):
        validate_params(params)


def test_required_keys_and_split_sizes(photos: dict, tiny_params: dict) -> None:
    params = copy.deepcopy(tiny_params)
    params["data"] = {**photos["data"], "folder": {"images": "x", "classes": ["cat"]}}
    with pytest.raises(ParamsError, match=re.escape("data.folder.labels: missing required key")):
        validate_params(params)
    _write_csv(photos["labels"], [r[:2] + ["train"] for r in photos["rows"]])
    _refused(photos, "no image is in split 'val'; a run needs train and val images (give some rows split val)")
    _write_csv(photos["labels"], [photos["rows"][0]])
    _refused(photos, "lists 1 image(s); at least two are needed")


def test_snakemake_refuses_a_bad_folder_before_any_job(photos: dict, tmp_path: Path) -> None:
    """The Snakefile checks the folder at parse time: a dry run already fails, naming the CSV line."""
    import yaml

    _rows_with(photos, ["big.png", "giraffe", "train"])
    override = tmp_path / "my.yaml"
    override.write_text(yaml.safe_dump({"data": photos["data"]}))
    res = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--configfile", str(override)],
                         cwd=ROOT, capture_output=True, text=True)
    out = res.stdout + res.stderr
    assert res.returncode != 0
    assert "tags.csv line 11, image 'big.png': listed again (first on line 10)" in out, out[-3000:]
