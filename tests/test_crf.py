"""Dense CRF (cpal.crf.dense) and the refine_crf stage on synthetic images and a tiny hand-made VOC-layout dataset."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from cpal.core.io import load_label_png, save_jpeg, save_label_png, voc_palette
from cpal.crf.dense import crf_from_labels, dense_crf
from cpal.crf.refine import RefineError, probabilities, refine_image, refine_with_crf
from cpal.data.voc import VOCDataset
from cpal.seeds.store import load_seeds, save_seeds

CFG = {"iterations": 10, "gaussian_sxy": 3, "gaussian_compat": 3, "bilateral_sxy": 50, "bilateral_srgb": 5,
       "bilateral_compat": 10}
REFINE = {**CFG, "map": "cam", "bg_mode": "threshold", "bg_threshold": 0.3, "bg_power": 1.0}
LOG = logging.getLogger("test_crf")


def edge_image(h: int = 48, w: int = 64, edge: int = 32) -> np.ndarray:
    img = np.zeros((h, w, 3), np.uint8)
    img[:, :edge] = (30, 60, 200)
    img[:, edge:] = (230, 200, 40)
    return img


def blurred_probs(h: int, w: int, centre: float, width: float = 5.0) -> np.ndarray:
    """Two-class scores whose boundary sits at `centre`, smeared over several pixels."""
    p = 1.0 / (1.0 + np.exp(-(np.arange(w) - centre) / width))
    fg = np.broadcast_to(p, (h, w))
    return np.stack([1.0 - fg, fg]).astype(np.float32)


def first_fg_column(label: np.ndarray) -> np.ndarray:
    return (label != 0).argmax(axis=1)


@pytest.mark.parametrize("centre", [22.0, 42.0])
def test_dense_crf_moves_blurred_boundary_onto_colour_edge(centre: float) -> None:
    img = edge_image()
    probs = blurred_probs(*img.shape[:2], centre=centre)
    before = first_fg_column(probs.argmax(axis=0))
    assert np.all(np.abs(before - 32) >= 9)  # the unary alone puts the boundary far from the edge
    q = dense_crf(img, probs, CFG)
    assert q.shape == probs.shape and q.dtype == np.float32
    np.testing.assert_allclose(q.sum(axis=0), 1.0, atol=1e-4)
    assert np.all(first_fg_column(q.argmax(axis=0)) == 32)


def test_dense_crf_without_iterations_is_the_normalised_unary() -> None:
    img = edge_image()
    probs = blurred_probs(*img.shape[:2], centre=22.0)
    q = dense_crf(img, probs, {**CFG, "iterations": 0})
    np.testing.assert_allclose(q, probs / probs.sum(axis=0), atol=1e-4)


def test_dense_crf_rejects_mismatched_inputs() -> None:
    img = edge_image()
    with pytest.raises(ValueError, match="scores are"):
        dense_crf(img, blurred_probs(40, 64, 20.0), CFG)
    with pytest.raises(ValueError, match="uint8"):
        dense_crf(img.astype(np.float32), blurred_probs(48, 64, 20.0), CFG)
    with pytest.raises(KeyError, match="bilateral_srgb"):
        dense_crf(img, blurred_probs(48, 64, 20.0), {k: v for k, v in CFG.items() if k != "bilateral_srgb"})


def test_crf_from_labels_keeps_clean_map_and_fixes_flipped_pixels() -> None:
    img = edge_image()
    clean = np.zeros(img.shape[:2], np.int64)
    clean[:, 32:] = 2
    clean[:, 32:40] = 1  # a third label inside the right region, no colour edge: must survive as a block
    img[:, 32:40] = (200, 30, 30)
    out = crf_from_labels(img, clean, 3, 0.7, CFG)
    assert out.shape == clean.shape and out.dtype == np.int64
    np.testing.assert_array_equal(out, clean)
    noisy = clean.copy()
    rng = np.random.default_rng(0)
    flips = rng.choice(clean.size, 20, replace=False)
    noisy.flat[flips] = (noisy.flat[flips] + 1) % 3
    assert (noisy != clean).sum() == 20
    np.testing.assert_array_equal(crf_from_labels(img, noisy, 3, 0.7, CFG), clean)


def test_crf_from_labels_rejects_out_of_range_labels() -> None:
    with pytest.raises(ValueError, match=r"0\.\.1"):
        crf_from_labels(edge_image(), np.full((48, 64), 2), 2, 0.7, CFG)


def test_background_rules() -> None:
    maps = np.array([[[0.0, 0.5, 1.0]]], np.float32)
    p = probabilities(maps, {"bg_mode": "threshold", "bg_threshold": 0.3})
    np.testing.assert_allclose(p[0], 0.3)
    np.testing.assert_allclose(p[1], maps[0])
    p = probabilities(maps, {"bg_mode": "power", "bg_power": 2.0})
    np.testing.assert_allclose(p[0], [[1.0, 0.25, 0.0]])
    with pytest.raises(ValueError, match="bg_mode"):
        probabilities(maps, {"bg_mode": "mean"})


# --- a tiny VOC-layout dataset with hand-written seeds -------------------------------------------------

def make_dataset(root: Path, n: int = 6, size: int = 32) -> tuple[VOCDataset, Path]:
    """Images with one or two coloured squares (classes 1, 2) on grey, ground truth, and blurred CAM seeds."""
    classes = ["background", "red", "green"]
    colours = {1: (220, 30, 30), 2: (30, 200, 60)}
    seeds = root / "seeds"
    labels_json = {}
    rng = np.random.default_rng(1)
    ids = [f"img_{i:03d}" for i in range(n)]
    for i, image_id in enumerate(ids):
        img = np.full((size, size, 3), 120, np.uint8)
        mask = np.zeros((size, size), np.uint8)
        present = [1] if i % 3 == 0 else [2] if i % 3 == 1 else [1, 2]
        maps = []
        for k, cls in enumerate(present):
            y0, x0 = 4 + 14 * k, int(rng.integers(3, 12))
            img[y0:y0 + 10, x0:x0 + 12] = colours[cls]
            mask[y0:y0 + 10, x0:x0 + 12] = cls
            yy, xx = np.mgrid[:size, :size]
            cy, cx = y0 + 4.5, x0 + 5.5
            maps.append(np.exp(-(((yy - cy) / 7.0) ** 2 + ((xx - cx) / 8.0) ** 2)))  # blob beyond the square
        save_jpeg(root / "JPEGImages" / f"{image_id}.jpg", img, quality=95)
        save_label_png(root / "SegmentationClass" / f"{image_id}.png", mask)
        save_seeds(seeds / f"{image_id}.npz", np.array(present), (size, size), {"cam": np.stack(maps)})
        labels_json[image_id] = present
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(ids) + "\n")
    (root / "cls_labels.json").write_text(json.dumps(labels_json))
    (root / "dataset.json").write_text(json.dumps({"name": "toy", "source": "test", "classes": classes,
                                                   "ignore_index": 255, "splits": {"train": n}}))
    return VOCDataset(root, "train"), seeds


def read_set(folder: Path) -> dict[str, np.ndarray]:
    return {p.stem: load_label_png(p) for p in sorted(folder.glob("*.png"))}


def test_refine_writes_one_png_per_id_and_parallel_equals_serial(tmp_path: Path) -> None:
    dataset, seeds = make_dataset(tmp_path / "data")
    serial = refine_with_crf(dataset, seeds, tmp_path / "serial", REFINE, 1, LOG, progress=False)
    parallel = refine_with_crf(dataset, seeds, tmp_path / "parallel", REFINE, 2, LOG, progress=False)
    assert serial["images"] == parallel["images"] == len(dataset)
    assert serial["seconds_per_image_mean"] > 0 and parallel["workers"] == 2
    a, b = read_set(tmp_path / "serial"), read_set(tmp_path / "parallel")
    assert sorted(a) == sorted(dataset.ids)
    for image_id in dataset.ids:
        np.testing.assert_array_equal(a[image_id], b[image_id])
        allowed = {0, *dataset.labels(image_id).tolist()}
        assert set(np.unique(a[image_id]).tolist()) <= allowed
        assert set(np.unique(a[image_id]).tolist()) - {0}  # every image keeps its object
    # the blobs spill over the squares; the CRF should pull the labels back onto the coloured squares
    seed_hits = crf_hits = total = 0
    for image_id in dataset.ids:
        gt = dataset.mask(image_id)
        s = load_seeds(seeds / f"{image_id}.npz")
        seed_label = np.where(s["cam"].max(0) >= REFINE["bg_threshold"], s["keys"][s["cam"].argmax(0)], 0)
        seed_hits += int((seed_label == gt).sum())
        crf_hits += int((a[image_id] == gt).sum())
        total += gt.size
    assert crf_hits / total > seed_hits / total + 0.02  # measured: seeds 0.877, CRF 0.920 pixel accuracy
    assert not list(tmp_path.glob(".serial*")) and not list(tmp_path.glob(".parallel*"))


def test_png_round_trip_is_exact_and_uses_voc_palette(tmp_path: Path) -> None:
    dataset, seeds = make_dataset(tmp_path / "data", n=3)
    refine_with_crf(dataset, seeds, tmp_path / "out", REFINE, 1, LOG, progress=False)
    for image_id in dataset.ids:
        expected = refine_image(dataset.image(image_id), load_seeds(seeds / f"{image_id}.npz"), REFINE)
        path = tmp_path / "out" / f"{image_id}.png"
        np.testing.assert_array_equal(load_label_png(path), expected)
        with Image.open(path) as img:
            assert img.mode == "P"
            palette = np.array(img.getpalette()[:768], np.uint8).reshape(-1, 3)
        np.testing.assert_array_equal(palette, voc_palette(256))
    label = np.arange(256, dtype=np.uint8).reshape(16, 16)
    save_label_png(tmp_path / "all.png", label)
    np.testing.assert_array_equal(load_label_png(tmp_path / "all.png"), label)


def test_seed_of_wrong_size_names_the_id(tmp_path: Path) -> None:
    dataset, seeds = make_dataset(tmp_path / "data", n=4)
    save_seeds(seeds / "img_002.npz", np.array([2]), (16, 32), {"cam": np.ones((1, 16, 32), np.float32)})
    with pytest.raises(RefineError, match="img_002"):
        refine_with_crf(dataset, seeds, tmp_path / "out", REFINE, 1, LOG, progress=False)
    assert not (tmp_path / "out").exists()


def test_missing_map_kind_names_the_id(tmp_path: Path) -> None:
    dataset, seeds = make_dataset(tmp_path / "data", n=2)
    with pytest.raises(RefineError, match=r"img_000.*'pacam'"):
        refine_with_crf(dataset, seeds, tmp_path / "out", {**REFINE, "map": "pacam"}, 1, LOG, progress=False)


def test_failing_worker_fails_the_call_and_leaves_no_output(tmp_path: Path) -> None:
    dataset, seeds = make_dataset(tmp_path / "data", n=6)
    (seeds / "img_004.npz").write_bytes(b"PK\x03\x04 truncated")
    out = tmp_path / "out"
    out.mkdir()
    save_label_png(out / "stale.png", np.zeros((4, 4), np.uint8))  # an older run's output
    with pytest.raises(RefineError, match="img_004"):
        refine_with_crf(dataset, seeds, out, REFINE, 2, LOG, progress=False)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["data"]  # no partial sibling folder either


def test_refuses_to_replace_a_folder_that_is_not_label_maps(tmp_path: Path) -> None:
    dataset, seeds = make_dataset(tmp_path / "data", n=2)
    with pytest.raises(RefineError, match="non-PNG"):
        refine_with_crf(dataset, seeds, tmp_path / "data", REFINE, 1, LOG, progress=False)
    assert (tmp_path / "data" / "dataset.json").is_file()


def test_previous_output_is_replaced_as_a_whole(tmp_path: Path) -> None:
    dataset, seeds = make_dataset(tmp_path / "data", n=2)
    out = tmp_path / "out"
    out.mkdir()
    save_label_png(out / "stale.png", np.zeros((4, 4), np.uint8))
    refine_with_crf(dataset, seeds, out, REFINE, 1, LOG, progress=False)
    assert sorted(p.stem for p in out.iterdir()) == dataset.ids


def test_stage_entry_point(tmp_path: Path, tiny_params: dict) -> None:
    from cpal.core.config import merge
    from stages.refine_crf import main

    dataset, seeds = make_dataset(tmp_path / "data", n=2)
    params = merge(tiny_params, {"seeds": {"split": "train"}, "crf": REFINE})
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(params))
    rc = main(["--params", str(tmp_path / "p.yaml"), "--data", str(tmp_path / "data"), "--seeds", str(seeds),
               "--out", str(tmp_path / "crf"), "--workers", "1", "--timing", str(tmp_path / "t.json"),
               "--log", str(tmp_path / "log.txt"), "--no-progress"])
    assert rc == 0
    assert sorted(p.stem for p in (tmp_path / "crf").iterdir()) == dataset.ids
    timing = json.loads((tmp_path / "t.json").read_text())
    assert timing["images"] == 2 and timing["peak_rss_mib"] > 50  # what a benchmark reads of the stage's memory


def test_stage_map_option_refines_a_host_s_cam_only_seeds_under_a_prototype_method(tmp_path: Path,
                                                                                   tiny_params: dict) -> None:
    """AMN's seed files hold only `cam`; with params.method cpal, crf.map auto means pacam: the stage's --map
    cam (the AMN branch's refine_amn_crf) refines them, and without it the missing map is named."""
    from cpal.core.config import merge
    from stages.refine_crf import main

    _, seeds = make_dataset(tmp_path / "data", n=2)
    params = merge(tiny_params, {"seeds": {"split": "train"}, "crf": {**REFINE, "map": "auto"},
                                 "params": {"method": "cpal"}})
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(params))
    args = ["--params", str(tmp_path / "p.yaml"), "--data", str(tmp_path / "data"), "--seeds", str(seeds),
            "--workers", "1", "--timing", str(tmp_path / "t.json"), "--log", str(tmp_path / "log.txt"), "--no-progress"]
    with pytest.raises(RefineError, match="'pacam'"):
        main([*args, "--out", str(tmp_path / "without")])
    assert main([*args, "--out", str(tmp_path / "crf"), "--map", "cam"]) == 0
    assert len(list((tmp_path / "crf").glob("*.png"))) == 2


class DyingDataset(VOCDataset):
    """Kills the worker process (no exception, no cleanup) when it reaches one id."""

    def image(self, image_id: str) -> np.ndarray:
        if image_id == "img_003":
            import os

            os._exit(3)
        return super().image(image_id)


def test_worker_that_dies_fails_the_call_and_leaves_no_output(tmp_path: Path) -> None:
    _, seeds = make_dataset(tmp_path / "data", n=6)
    dataset = DyingDataset(tmp_path / "data", "train")
    with pytest.raises(RefineError, match="died.*img_003"):
        refine_with_crf(dataset, seeds, tmp_path / "out", REFINE, 2, LOG, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["data"]


def test_output_folder_has_ordinary_permissions(tmp_path: Path) -> None:
    import os

    dataset, seeds = make_dataset(tmp_path / "data", n=2)
    refine_with_crf(dataset, seeds, tmp_path / "out", REFINE, 1, LOG, progress=False)
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~mask
