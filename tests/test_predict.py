"""cpal-predict on a user's own images: any folder depth, odd names, any image mode and size, DeepLab and --cams."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cpal.cls.network import CAMNet
from cpal.cls.train import CHECKPOINT_FORMAT as CLS_FORMAT
from cpal.core.io import voc_palette
from cpal.core.training import save_checkpoint
from cpal.data.images import ImageBatches, find_images, read_rgb
from cpal.seg.evaluate import predict_probs
from cpal.seg.model import build_segmenter
from cpal.seg.predict import main, upsample_argmax
from cpal.seg.train import seg_meta

CLASSES = ["background", "cat", "dog"]
SEG_CFG = {"backbone": "resnet18", "head": "v2", "init": "none", "dilated": False}


@pytest.fixture(scope="module")
def seg_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = build_segmenter(SEG_CFG, len(CLASSES))
    path = tmp_path_factory.mktemp("seg") / "model.pt"
    save_checkpoint(path, {"model": model.state_dict(), "meta": seg_meta(SEG_CFG, CLASSES, "test")})
    return path


@pytest.fixture(scope="module")
def cls_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_params: dict) -> Path:
    torch.manual_seed(0)
    model = CAMNet(len(CLASSES) - 1, backbone="resnet18", method_cfg=tiny_params["params"], output_stride=16)
    meta = {"format": CLS_FORMAT, "method": tiny_params["params"]["method"], "backbone": "resnet18",
            "output_stride": 16, "num_classes": len(CLASSES) - 1, "classes": CLASSES, "params": tiny_params["params"]}
    path = tmp_path_factory.mktemp("cls") / "model.pt"
    save_checkpoint(path, {"model": model.state_dict(), "meta": meta})
    return path


def _noise(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture
def photos(tmp_path: Path) -> tuple[Path, dict[str, tuple[int, int]]]:
    """A folder of images in every mode and size, nested, with odd names; -> (folder, output name -> (h, w))."""
    root = tmp_path / "my photos"
    deep = root / "sub dir" / "deeper ü"
    deep.mkdir(parents=True)
    (root / ".hidden").mkdir()
    Image.fromarray(_noise(30, 40, 0)).save(root / "a.jpg")
    Image.fromarray(_noise(70, 50, 1)).convert("RGBA").save(root / "sub dir" / "ünïcode näme.png")
    Image.fromarray(_noise(30, 40, 2)).convert("P").save(deep / "x y.PNG")
    Image.fromarray((np.arange(20 * 33).reshape(20, 33) * 90).astype(np.uint16)).save(deep / "grey16.png")
    Image.fromarray(_noise(45, 45, 3)).convert("L").save(root / "grey.jpeg")
    Image.fromarray(_noise(30, 40, 4)).convert("CMYK").save(root / "photo.jpg")
    Image.fromarray(_noise(30, 40, 5)).save(root / "photo.png")
    Image.fromarray(_noise(300, 900, 6)).save(root / "big.png")
    Image.fromarray(_noise(30, 40, 7)).save(root / ".hidden" / "skip.png")
    (root / "notes.txt").write_text("not an image")
    sizes = {"a": (30, 40), "sub dir/ünïcode näme": (70, 50), "sub dir/deeper ü/x y": (30, 40),
             "sub dir/deeper ü/grey16": (20, 33), "grey": (45, 45), "photo.jpg": (30, 40), "photo.png": (30, 40),
             "big": (300, 900)}
    return root, sizes


def _areas(out: Path) -> list[dict[str, str]]:
    with open(out / "areas.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_find_images_mirrors_folders_and_keeps_names_apart(photos: tuple[Path, dict]) -> None:
    root, sizes = photos
    found = find_images([root])
    assert sorted(i.rel.as_posix() for i in found) == sorted(sizes)  # hidden folder and notes.txt left out
    assert all(read_rgb(i.path).shape == (*sizes[i.rel.as_posix()], 3) for i in found)  # every mode as RGB
    grey16 = read_rgb(next(i.path for i in found if i.rel.name == "grey16"))
    assert grey16.min() == 0 and grey16.max() == 255  # scaled by its range, not clipped white


def test_images_of_one_bounded_size_share_a_batch(photos: tuple[Path, dict]) -> None:
    root, _ = photos
    batches = ImageBatches(find_images([root]), max_side=128, batch_size=8, progress=False)
    sizes = [{loaded.resized.shape[:2] for loaded in batch} for batch in batches]
    assert all(len(s) == 1 for s in sizes)
    assert sum(len(b) for b in batches.batches) == 8 and len(batches.batches) == 5  # 4 of 30x40 together
    assert {(43, 128)} in sizes  # 900x300 predicted at --max-side, aspect kept


def test_predict_folder(photos: tuple[Path, dict], seg_checkpoint: Path, tmp_path: Path, capsys) -> None:
    root, sizes = photos
    out = tmp_path / "out"
    dataset_json = tmp_path / "dataset.json"
    dataset_json.write_text(json.dumps({"classes": CLASSES}))
    assert main(["--checkpoint", str(seg_checkpoint), "--classes", str(dataset_json), "--max-side", "128",
                 "--device", "cpu", "--quiet", str(root), "--out", str(out)]) == 0
    assert "8 images" in capsys.readouterr().out
    model = build_segmenter(SEG_CFG, len(CLASSES))
    model.load_state_dict(torch.load(seg_checkpoint, weights_only=True)["model"])
    model.eval()
    for name, (h, w) in sizes.items():
        with Image.open(out / "masks" / f"{name}.png") as mask:
            assert mask.mode == "P" and mask.size == (w, h), name
            assert mask.getpalette()[:9] == voc_palette()[:3].ravel().tolist()
            label = np.asarray(mask)
        assert label.max() < len(CLASSES)
        with Image.open(out / "overlays" / f"{name}.jpg") as overlay:
            assert overlay.size[0] > w and overlay.size[1] >= h, name  # the legend sits on the right
        if max(h, w) <= 128:  # batched prediction = the image on its own (no mix-up inside a batch)
            image = read_rgb(next(p for p in root.rglob("*") if p.is_file() and _rel(root, p) == name))
            alone = predict_probs(model, image, [1.0], True, torch.device("cpu")).argmax(0).numpy()
            assert (alone == label).mean() > 0.999, name
    rows = _areas(out)
    assert [r["image"] for r in rows] and sorted(r["image"] for r in rows) == sorted(sizes)
    for r in rows:
        h, w = sizes[r["image"]]
        assert (int(r["width"]), int(r["height"])) == (w, h)
        assert sum(int(r[f"pixels_{c}"]) for c in CLASSES) == h * w
        assert sum(float(r[f"fraction_{c}"]) for c in CLASSES) == pytest.approx(1.0, abs=1e-5)


def _rel(root: Path, path: Path) -> str:
    rel = path.relative_to(root)
    return rel.as_posix() if rel.stem == "photo" else rel.with_suffix("").as_posix()


def test_class_list_mismatch_is_refused_naming_both(seg_checkpoint: Path, photos: tuple[Path, dict],
                                                    tmp_path: Path, capsys) -> None:
    root, _ = photos
    with pytest.raises(SystemExit) as info:
        main(["--checkpoint", str(seg_checkpoint), "--classes", "background,dog,cat", str(root),
              "--out", str(tmp_path / "out")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert str(CLASSES) in err and "['background', 'dog', 'cat']" in err
    assert not (tmp_path / "out").exists()


def test_unreadable_image_is_skipped_and_named(seg_checkpoint: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "in").mkdir()
    Image.fromarray(_noise(20, 20, 0)).save(tmp_path / "in" / "good.png")
    (tmp_path / "in" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    assert main(["--checkpoint", str(seg_checkpoint), "--quiet", str(tmp_path / "in"),
                 "--out", str(tmp_path / "out")]) == 1
    assert "broken.jpg" in capsys.readouterr().err
    assert [r["image"] for r in _areas(tmp_path / "out")] == ["good"]


def test_upsample_argmax_agrees_with_full_interpolation() -> None:
    probs = torch.rand(4, 7, 9).softmax(0)
    full = torch.nn.functional.interpolate(probs[None], size=(30, 20), mode="bilinear", align_corners=False)[0]
    assert (upsample_argmax(probs, (30, 20)) == full.argmax(0).numpy()).all()
    assert (upsample_argmax(probs, (7, 9)) == probs.argmax(0).numpy()).all()


def test_cams_on_tagged_images(cls_checkpoint: Path, photos: tuple[Path, dict], tmp_path: Path) -> None:
    root, sizes = photos
    tags = root / "tags.csv"
    tags.write_text("image,labels\na.jpg,cat\nsub dir/ünïcode näme.png,cat;dog\nbig.png,dog\ngrey.jpeg,\n",
                    encoding="utf-8")
    out = tmp_path / "cams"
    assert main(["--cams", str(tags), "--checkpoint", str(cls_checkpoint), "--classes", ",".join(CLASSES),
                 "--max-side", "96", "--scales", "1.0", "--quiet", "--out", str(out)]) == 0
    expected = {"a": ["cat"], "sub dir/ünïcode näme": ["cat", "dog"], "big": ["dog"], "grey": []}
    for name, names in expected.items():
        h, w = sizes[name]
        for kind in ("cam", "pacam"):  # the tiny preset's method is cpal: PACAM too
            for tag in names:
                with Image.open(out / "heatmaps" / name / f"{kind}_{tag}.jpg") as heat:
                    assert heat.size[0] >= w and heat.size[1] > h  # caption strip above the image
        seed = np.asarray(Image.open(out / "masks" / f"{name}.png"))
        assert seed.shape == (h, w)
        assert set(np.unique(seed).tolist()) <= {0, *(CLASSES.index(t) for t in names)}
    assert not (out / "heatmaps" / "grey").exists()  # no tag, no heatmap
    assert len(_areas(out)) == 4


def test_cams_refuse_unknown_tags_and_other_classes(cls_checkpoint: Path, photos: tuple[Path, dict],
                                                    tmp_path: Path, capsys) -> None:
    root, _ = photos
    tags = root / "tags.csv"
    tags.write_text("image,labels\na.jpg,cat;horse\n")
    with pytest.raises(SystemExit):
        main(["--cams", str(tags), "--checkpoint", str(cls_checkpoint), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert "horse" in err and "'cat', 'dog'" in err
    with pytest.raises(SystemExit):
        main(["--cams", str(tags), "--checkpoint", str(cls_checkpoint), "--classes", "background,cat",
              "--out", str(tmp_path / "o")])
    assert "['background', 'cat']" in capsys.readouterr().err



def test_a_checkpoint_of_the_other_kind_is_refused(seg_checkpoint: Path, cls_checkpoint: Path, photos: tuple,
                                                   tmp_path: Path, capsys) -> None:
    root, _ = photos
    (root / "tags.csv").write_text("image,labels\na.jpg,cat\n")
    with pytest.raises(SystemExit):
        main(["--cams", str(root / "tags.csv"), "--checkpoint", str(seg_checkpoint), "--out", str(tmp_path / "o")])
    assert "train_cls checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(cls_checkpoint), str(root), "--out", str(tmp_path / "o")])
    assert "train_seg checkpoint" in capsys.readouterr().err
