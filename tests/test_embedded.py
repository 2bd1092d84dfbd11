"""The embedded dataset: every difficulty docs/pipeline.md lists ("The embedded dataset") is checked on its files."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cpal.core.io import load_label_png
from cpal.data.embedded import EMBEDDED_CLASSES, generate_embedded

CAT, DOG, BOAT = (EMBEDDED_CLASSES.index(n) for n in ("cat", "dog", "boat"))
FG = range(1, len(EMBEDDED_CLASSES))

BASE_CFG = {
    "image_size": 96, "n_train": 100, "n_val": 40, "min_objects": 1, "max_objects": 3,
    "object_scale": [0.28, 0.41], "context_rate": 0.9, "context_distractor_rate": 0.1,
    "mark_fraction": 0.03, "border_width": 2, "jpeg_quality": 92,
}


class Loaded:
    """A generated dataset read back from disk: arrays and metadata per image id."""

    def __init__(self, root: Path, summary: dict) -> None:
        self.root = root
        self.summary = summary
        self.meta = json.loads((root / "dataset.json").read_text())
        self.instances = json.loads((root / "instances.json").read_text())
        self.cls_labels = json.loads((root / "cls_labels.json").read_text())
        self.splits = {sp: (root / "ImageSets" / "Segmentation" / f"{sp}.txt").read_text().split()
                       for sp in ("train", "val")}
        self.ids = self.splits["train"] + self.splits["val"]
        self.images = {i: np.asarray(Image.open(root / "JPEGImages" / f"{i}.jpg").convert("RGB"))
                       for i in self.ids}
        self.masks = {i: load_label_png(root / "SegmentationClass" / f"{i}.png") for i in self.ids}
        self.parts = {i: load_label_png(root / "Parts" / f"{i}.png") for i in self.ids}


def _make(tmp_path_factory: pytest.TempPathFactory, name: str, seed: int = 0, **over: object) -> Loaded:
    root = tmp_path_factory.mktemp(name) / "ds"
    summary = generate_embedded(root, {**BASE_CFG, **over}, seed=seed, progress=False)
    return Loaded(root, summary)


@pytest.fixture(scope="module")
def ds(tmp_path_factory: pytest.TempPathFactory) -> Loaded:
    return _make(tmp_path_factory, "main")


@pytest.fixture(scope="module")
def ds_low_context(tmp_path_factory: pytest.TempPathFactory) -> Loaded:
    return _make(tmp_path_factory, "low", image_size=64, n_train=140, n_val=30,
                 context_rate=0.3, context_distractor_rate=0.0)


def _blue(pixels: np.ndarray) -> np.ndarray:
    """Water is the only blue-dominant texture; clutter may be blue, so callers use fractions."""
    p = pixels.astype(int)
    return p[..., 2] > np.maximum(p[..., 0], p[..., 1]) + 8


def _image_has_water(d: Loaded, image_id: str) -> bool:
    """The bottom fifth of the image is water wherever it is background."""
    s = d.masks[image_id].shape[0]
    rows = slice(s - s // 5, s)
    bg = d.masks[image_id][rows] == 0
    return bool(bg.sum() > 0 and _blue(d.images[image_id][rows][bg]).mean() > 0.5)


def _boat_on_water(d: Loaded, image_id: str, bbox: list[int]) -> bool:
    """Background pixels in a strip along the boat's bottom edge are water."""
    s = d.masks[image_id].shape[0]
    x0, _y0, x1, y1 = bbox
    rows, cols = slice(max(0, y1 - 4), min(s, y1 + 4)), slice(max(0, x0 - 4), min(s, x1 + 4))
    bg = d.masks[image_id][rows, cols] == 0
    return bool(bg.sum() > 0 and _blue(d.images[image_id][rows, cols][bg]).mean() > 0.5)


def _boat_rate(d: Loaded) -> tuple[float, int]:
    boat_ids = [i for i in d.ids if BOAT in d.cls_labels[i]]
    on = [any(_boat_on_water(d, i, o["bbox"]) for o in d.instances[i]["objects"] if o["class"] == BOAT)
          for i in boat_ids]
    return float(np.mean(on)), len(boat_ids)


# ---------------------------------------------------------------------------------------------- layout


def test_layout_and_metadata(ds: Loaded) -> None:
    assert ds.meta["source"] == "embedded"
    assert ds.meta["classes"] == list(EMBEDDED_CLASSES)
    assert ds.meta["ignore_index"] == 255
    assert ds.meta["splits"] == {"train": 100, "val": 40}
    assert len(ds.splits["train"]) == 100 and len(ds.splits["val"]) == 40
    assert not set(ds.splits["train"]) & set(ds.splits["val"])
    assert set(ds.cls_labels) == set(ds.ids) == set(ds.instances)
    for i in ds.ids:
        assert ds.images[i].shape == (96, 96, 3)
        assert ds.masks[i].shape == ds.parts[i].shape == (96, 96)
        with Image.open(ds.root / "SegmentationClass" / f"{i}.png") as im:
            assert im.mode == "P"
        present = sorted(int(c) for c in np.unique(ds.masks[i]) if c not in (0, 255))
        assert present == ds.cls_labels[i], i
    leftovers = [p.name for p in ds.root.parent.iterdir() if p.name != "ds"]
    assert leftovers == []


def test_voc_reader_reads_it(ds: Loaded) -> None:
    from cpal.data.voc import VOCDataset

    reader = VOCDataset(ds.root, "val")
    assert reader.classes == list(EMBEDDED_CLASSES) and reader.num_classes == 7
    i = reader.ids[3]
    assert list(reader.labels(i)) == ds.cls_labels[i]
    assert np.array_equal(reader.mask(i), ds.masks[i])


# ---------------------------------------------------------------------------------------------- difficulties


def test_mark_is_small_and_near_the_parameter(ds: Loaded) -> None:
    mark_px = sum(int((p == 2).sum()) for p in ds.parts.values())
    pet_area = sum(o["area"] for m in ds.instances.values() for o in m["objects"] if o["class"] in (CAT, DOG))
    frac = mark_px / pet_area
    assert frac < 0.06
    assert abs(frac - 0.03) < 0.01, frac
    assert ds.summary["mark_fraction"] == pytest.approx(frac)
    # Parts agree with instances.json, and marks lie only on cats and dogs
    for i in ds.ids:
        objs = ds.instances[i]["objects"]
        assert int((ds.parts[i] > 0).sum()) == sum(o["area"] for o in objs)
        assert int((ds.parts[i] == 2).sum()) == sum(o["mark_area"] for o in objs)
        on_mark = ds.masks[i][ds.parts[i] == 2]
        assert set(np.unique(on_mark).tolist()) <= {CAT, DOG, 255}
        assert all(o["mark_area"] == 0 for o in objs if o["class"] not in (CAT, DOG))


def test_cat_and_dog_differ_only_by_the_mark(ds: Loaded) -> None:
    attrs = defaultdict(lambda: defaultdict(set))
    for m in ds.instances.values():
        for o in m["objects"]:
            if o["class"] in (CAT, DOG):
                for key in ("family", "texture", "palette", "variant"):
                    attrs[key][o["class"]].add(o[key])
    assert len(attrs["family"][CAT]) >= 3
    for key in ("family", "texture", "palette", "variant"):
        assert attrs[key][CAT] == attrs[key][DOG], key
    # in pixels: bodies share colours, marks do not
    body, mark = defaultdict(list), defaultdict(list)
    for i in ds.ids:
        for c in (CAT, DOG):
            sel = (ds.masks[i] == c) & (ds.parts[i] == 1)
            body[c].append(ds.images[i][sel])
            sel = (ds.masks[i] == c) & (ds.parts[i] == 2)
            mark[c].append(ds.images[i][sel])
    body_mean = {c: np.concatenate(body[c]).mean(0) for c in (CAT, DOG)}
    mark_mean = {c: np.concatenate(mark[c]).mean(0) for c in (CAT, DOG)}
    assert np.abs(body_mean[CAT] - body_mean[DOG]).max() < 35, body_mean
    assert np.abs(mark_mean[CAT] - mark_mean[DOG]).max() > 100, mark_mean


def test_boat_context_rate_follows_the_parameter(ds: Loaded, ds_low_context: Loaded) -> None:
    high, n_high = _boat_rate(ds)
    low, n_low = _boat_rate(ds_low_context)
    assert n_high >= 30 and n_low >= 30
    for rate, p, n in ((high, 0.9, n_high), (low, 0.3, n_low)):  # within 3 binomial standard deviations
        assert abs(rate - p) < 3 * math.sqrt(p * (1 - p) / n) + 0.02, (rate, p, n)
    assert high - low > 0.4
    # the metadata tells the same story as the pixels
    for d in (ds, ds_low_context):
        for i in d.ids:
            assert _image_has_water(d, i) == d.instances[i]["context_band"], i
    assert ds.summary["context"]["boat_on_water_rate"] == pytest.approx(
        np.mean([ds.instances[i]["context_band"] for i in ds.ids if BOAT in ds.cls_labels[i]]))


def test_water_without_boats_only_when_asked(ds: Loaded, ds_low_context: Loaded) -> None:
    def water_without_boat(d: Loaded) -> int:
        return sum(_image_has_water(d, i) for i in d.ids if BOAT not in d.cls_labels[i])

    assert water_without_boat(ds) >= 3          # context_distractor_rate = 0.1
    assert water_without_boat(ds_low_context) == 0  # context_distractor_rate = 0.0


def test_every_class_varies(ds: Loaded) -> None:
    variants, colours = defaultdict(set), defaultdict(list)
    for i in ds.ids:
        for o in ds.instances[i]["objects"]:
            variants[o["class"]].add(o["variant"])
            if o["area"] == o["full_area"] and o["area"] > 200:
                x0, y0, x1, y1 = o["bbox"]
                sel = ds.masks[i][y0:y1, x0:x1] == o["class"]
                colours[o["class"]].append(ds.images[i][y0:y1, x0:x1][sel].mean(0))
    for c in FG:
        assert len(variants[c]) >= 3, EMBEDDED_CLASSES[c]
        # colour attributes differ between instances of one class
        assert np.std(np.array(colours[c]), axis=0).max() > 20, EMBEDDED_CLASSES[c]


def test_backgrounds_are_textured_and_varied(ds: Loaded) -> None:
    assert len({m["background"] for m in ds.instances.values()}) >= 5
    stds = [ds.images[i][ds.masks[i] == 0].std(0).mean() for i in ds.ids]
    assert np.median(stds) > 10


def test_objects_per_image_and_visibility(ds: Loaded) -> None:
    counts = [len(m["objects"]) for m in ds.instances.values()]
    assert min(counts) >= 1 and max(counts) <= 3
    assert set(counts) == {1, 2, 3}
    occluded = 0
    for i in ds.ids:
        inst_area = sum(o["area"] for o in ds.instances[i]["objects"])
        assert inst_area == int((ds.parts[i] > 0).sum())
        for o in ds.instances[i]["objects"]:
            assert o["area"] >= 0.7 * o["full_area"]
            occluded += o["area"] < o["full_area"]
    assert occluded > 0  # overlap really happens


def test_every_class_in_both_splits(ds: Loaded) -> None:
    for sp, ids in ds.splits.items():
        seen = set()
        for i in ids:
            seen |= set(np.unique(ds.masks[i]).tolist())
        assert set(FG) <= seen, sp


def test_every_class_even_in_minimal_splits(tmp_path: Path) -> None:
    """With as many images as classes, chance alone would miss a class: the guarantee is by construction."""
    for seed in range(5):
        root = _gen(tmp_path / f"s{seed}", {**SMALL, "n_train": 6, "n_val": 6}, seed)
        for sp in ("train", "val"):
            ids = (root / "ImageSets" / "Segmentation" / f"{sp}.txt").read_text().split()
            seen = set().union(*(np.unique(load_label_png(root / "SegmentationClass" / f"{i}.png")).tolist()
                                 for i in ids))
            assert set(FG) <= seen, (seed, sp)


def test_ignore_band_on_every_border(ds: Loaded) -> None:
    for i in ds.ids:
        m = ds.masks[i]
        assert (m == 255).any()
        for a, b in ((m[:, 1:], m[:, :-1]), (m[1:, :], m[:-1, :])):
            touching = (a != b) & (a != 255) & (b != 255)
            assert not touching.any(), f"{i}: two labels touch without an ignore band"
        assert set(np.unique(m).tolist()) <= set(range(len(EMBEDDED_CLASSES))) | {255}


def test_object_sizes_follow_object_scale(ds: Loaded) -> None:
    fr = np.array([math.sqrt(o["full_area"]) / 96 for m in ds.instances.values() for o in m["objects"]])
    vis = np.array([math.sqrt(o["area"]) / 96 for m in ds.instances.values() for o in m["objects"]])
    assert fr.min() > 0.28 - 0.02 and fr.max() < 0.41 + 0.02
    assert vis.min() > 0.28 * math.sqrt(0.7) - 0.02
    assert fr.max() - fr.min() > 0.08  # sizes vary across the range
    for m in ds.instances.values():
        for o in m["objects"]:
            x0, y0, x1, y1 = o["bbox"]
            assert 0 <= x0 < x1 <= 96 and 0 <= y0 < y1 <= 96


# ---------------------------------------------------------------------------------------------- determinism


SMALL = {**BASE_CFG, "image_size": 64, "n_train": 12, "n_val": 6}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_and_different_seed_differs(tmp_path: Path) -> None:
    a = _files(_gen(tmp_path / "a", SMALL, 3))
    b = _files(_gen(tmp_path / "b", SMALL, 3))
    c = _files(_gen(tmp_path / "c", SMALL, 4))
    assert a == b
    assert a.keys() == c.keys()
    assert a["JPEGImages/train_000000.jpg"] != c["JPEGImages/train_000000.jpg"]
    assert sum(a[k] != c[k] for k in a if k.startswith("JPEGImages")) == 18


def test_images_do_not_depend_on_generation_order(tmp_path: Path) -> None:
    a = _files(_gen(tmp_path / "a", SMALL, 5))
    b = _files(_gen(tmp_path / "b", {**SMALL, "n_train": 18}, 5))
    for k in ("JPEGImages/train_000011.jpg", "JPEGImages/val_000000.jpg", "SegmentationClass/val_000005.png"):
        assert a[k] == b[k]


def _gen(root: Path, cfg: dict, seed: int, workers: int = 0) -> Path:
    generate_embedded(root, cfg, seed=seed, progress=False, workers=workers)
    return root


def test_worker_processes_write_the_same_files(tmp_path: Path) -> None:
    """run.num_workers > 1 draws images in a process pool (the GPU preset's 9,000 images of 320 px)."""
    assert _files(_gen(tmp_path / "one", SMALL, 3)) == _files(_gen(tmp_path / "pool", SMALL, 3, workers=2))


def test_overwrites_cleanly_and_leaves_no_temporaries(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    (root / "JPEGImages").mkdir(parents=True)
    (tmp_path / ".ds.tmp-killed" / "JPEGImages").mkdir(parents=True)  # what a killed run leaves
    (root / "stale.txt").write_text("old")
    (root / "JPEGImages" / "train_999999.jpg").write_bytes(b"old")
    summary = generate_embedded(root, SMALL, seed=0, progress=False)
    assert not (root / "stale.txt").exists()
    assert not (root / "JPEGImages" / "train_999999.jpg").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]
    assert summary["images"] == {"train": 12, "val": 6}
    assert sum(summary["images_per_class"]["val"].values()) >= 6
    assert summary["seconds"] > 0


def test_bad_config_is_named(tmp_path: Path) -> None:
    cfg = dict(SMALL)
    del cfg["mark_fraction"]
    with pytest.raises(KeyError, match="mark_fraction"):
        generate_embedded(tmp_path / "x", cfg, seed=0, progress=False)
    with pytest.raises(ValueError, match="n_val"):
        generate_embedded(tmp_path / "x", {**SMALL, "n_val": 3}, seed=0, progress=False)
    with pytest.raises(ValueError, match="object_scale"):
        generate_embedded(tmp_path / "x", {**SMALL, "object_scale": [0.5, 0.3]}, seed=0, progress=False)
    assert not (tmp_path / "x").exists()


def test_border_width_controls_the_band(tmp_path: Path) -> None:
    widths = {}
    for bw in (1, 2, 4):
        root = _gen(tmp_path / f"bw{bw}", {**SMALL, "n_train": 6, "n_val": 6, "border_width": bw}, 0)
        masks = [load_label_png(p) for p in (root / "SegmentationClass").glob("*.png")]
        widths[bw] = np.mean([(m == 255).mean() for m in masks])
    assert widths[1] < widths[2] < widths[4]
    root = _gen(tmp_path / "bw0", {**SMALL, "n_train": 6, "n_val": 6, "border_width": 0}, 0)
    assert not any((load_label_png(p) == 255).any() for p in (root / "SegmentationClass").glob("*.png"))


# ---------------------------------------------------------------------------------------------- figure


def test_plot_dataset_samples_writes_a_png(ds: Loaded, tmp_path: Path) -> None:
    from cpal.data.figure import plot_dataset_samples

    out = tmp_path / "fig" / "samples.png"
    plot_dataset_samples(ds.root, "val", out, n=6, footer="machine: test; seed 0; command: pytest")
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 400 and im.size[1] > 400
    assert [p.name for p in out.parent.iterdir()] == ["samples.png"]
    with pytest.raises(FileNotFoundError, match="nosuchsplit"):
        plot_dataset_samples(ds.root, "nosuchsplit", tmp_path / "x.png")


def test_instances_are_streamed_byte_identical_to_one_json_dump(tmp_path) -> None:
    """instances.json is written image by image (flat memory at 10,000 images) and reads as write_json wrote it."""
    from cpal.core.io import JsonMapWriter, write_json

    records = {f"train_{i:06d}": {"objects": [{"class": i % 3, "bbox": [0, 1, 2, 3]}], "band": i % 2 == 0}
               for i in range(5)}
    with JsonMapWriter(tmp_path / "streamed.json") as out:
        for key, value in records.items():
            out.add(key, value)
    write_json(tmp_path / "whole.json", records)
    assert (tmp_path / "streamed.json").read_bytes() == (tmp_path / "whole.json").read_bytes()
    with JsonMapWriter(tmp_path / "empty.json"):
        pass
    write_json(tmp_path / "empty_whole.json", {})
    assert (tmp_path / "empty.json").read_bytes() == (tmp_path / "empty_whole.json").read_bytes()
    import pytest

    with pytest.raises(ValueError, match="sorted order"), JsonMapWriter(tmp_path / "bad.json") as out:
        out.add("b", 1)
        out.add("a", 2)
    assert not (tmp_path / "bad.json").exists()  # a failed write leaves no file
