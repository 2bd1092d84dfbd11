"""Generator versions of the embedded data: version 1 stays byte-for-byte what every earlier table measured,
version 2 draws the same scenes with photo-like surfaces and optics, and a wrong version or setting is refused
before any work."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cpal.core.config import PHOTO_KEYS, validate_params
from cpal.core.io import load_label_png
from cpal.data.embedded import _check_cfg, _photo_object, _render_image, generate_embedded

SMALL = {"image_size": 64, "n_train": 12, "n_val": 6, "min_objects": 1, "max_objects": 3,
         "object_scale": [0.28, 0.41], "context_rate": 0.9, "context_distractor_rate": 0.1,
         "mark_fraction": 0.03, "border_width": 2, "jpeg_quality": 92}
PHOTO = {"shading": 0.6, "texture": 0.5, "edge_fade": 0.8, "clutter_match": 0.5, "blur": 0.8, "noise": 5}
# Every file of SMALL at seed 3 as the generator wrote it before versions existed (computed on that code).
V1_DIGEST = "63a906383bf53f9e81876a68ede6e2606e7cbd82f74f9420eca854a3c481de9f"
# The same for version 2 with PHOTO, computed before data.embedded.photo.fade existed: its default keeps it.
V2_DIGEST = "0f1af4f695058dcec0f43ac5e4c0a784b611e19b92cf1bcdfb27fcfb9f1a9288"


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("extra", [{}, {"version": 1, "photo": None}])
def test_version_1_is_the_old_generator_byte_for_byte(tmp_path: Path, extra: dict) -> None:
    generate_embedded(tmp_path / "ds", {**SMALL, **extra}, seed=3, progress=False)
    assert _digest(tmp_path / "ds") == V1_DIGEST


def test_version_2_draws_the_same_scenes_photo_like(tmp_path: Path) -> None:
    v1 = tmp_path / "v1"
    v2 = tmp_path / "v2"
    generate_embedded(v1, SMALL, seed=3, progress=False)
    generate_embedded(v2, {**SMALL, "version": 2, "photo": PHOTO}, seed=3, progress=False)
    for sub in ("SegmentationClass", "Parts"):
        for f in sorted((v1 / sub).iterdir()):
            assert np.array_equal(load_label_png(f), load_label_png(v2 / sub / f.name)), f.name
    assert (v1 / "instances.json").read_bytes() == (v2 / "instances.json").read_bytes()
    jpgs = sorted((v1 / "JPEGImages").iterdir())
    assert all(f.read_bytes() != (v2 / "JPEGImages" / f.name).read_bytes() for f in jpgs)
    meta = (v2 / "dataset.json").read_text()
    assert '"generator_version": 2' in meta and '"edge_fade": 0.8' in meta
    again = tmp_path / "again"
    generate_embedded(again, {**SMALL, "version": 2, "photo": PHOTO}, seed=3, progress=False, workers=2)
    assert _digest(again) == _digest(v2)


def test_version_2_default_fade_is_the_generator_before_the_fade_setting(tmp_path: Path) -> None:
    generate_embedded(tmp_path / "v2", {**SMALL, "version": 2, "photo": PHOTO}, seed=3, progress=False)
    assert _digest(tmp_path / "v2") == V2_DIGEST
    generate_embedded(tmp_path / "s", {**SMALL, "version": 2, "photo": {**PHOTO, "fade": "surface"}}, seed=3,
                      progress=False)
    generate_embedded(tmp_path / "c", {**SMALL, "version": 2, "photo": {**PHOTO, "fade": "colour"}}, seed=3,
                      progress=False)
    assert _digest(tmp_path / "s" / "JPEGImages") == _digest(tmp_path / "v2" / "JPEGImages")
    assert _digest(tmp_path / "c" / "JPEGImages") != _digest(tmp_path / "v2" / "JPEGImages")
    assert _digest(tmp_path / "c" / "SegmentationClass") == _digest(tmp_path / "v2" / "SegmentationClass")


def test_colour_fade_takes_the_background_colour_and_keeps_the_object_texture() -> None:
    """A striped disc on a flat, darker background: "surface" fades the rim into the background (stripes gone),
    "colour" moves the rim's colour to the background's and keeps the stripes."""
    n = 64
    v, u = np.mgrid[-1:1:n * 1j, -1:1:n * 1j].astype(np.float32)
    obj = u ** 2 + v ** 2 < 0.6 ** 2
    stripes = np.where(np.arange(n) % 2 == 0, 30.0, -30.0)[:, None, None].repeat(n, 1).repeat(3, 2)
    base = (np.full((n, n, 3), 200.0, np.float32) + stripes).astype(np.float32)
    behind = np.full((n, n, 3), 60.0, np.float32)
    flat = {"shading": 0.0, "texture": 0.0, "edge_fade": 1.0}
    out = {}
    for fade in ("surface", "colour"):
        win = np.where(obj[..., None], base, behind).astype(np.float32)
        _photo_object(np.random.default_rng(5), win, behind, obj, u, v, {**flat, "fade": fade})
        out[fade] = win
    faded = obj & (np.abs(out["surface"] - base).mean(-1) > 70)  # where the rim took most of the background
    assert faded.sum() > 50

    def stripe_amplitude(img: np.ndarray) -> float:  # half the step between a row and the next, on faded pixels
        step = np.abs(img[1:] - img[:-1]).mean(-1)
        return float(step[faded[1:] & faded[:-1]].mean() / 2)

    assert stripe_amplitude(out["colour"]) > 0.8 * 30 > 2 * stripe_amplitude(out["surface"])
    assert abs(out["colour"][faded].mean() - 60) < 0.5 * (200 - 60)  # its colour moved to the background's


def _stats(photo: dict | None, n: int = 24) -> tuple[float, float]:
    """(mean colour step between neighbours inside objects, mean colour step across object borders) over n
    images of 128 px."""
    c = _check_cfg({**SMALL, "image_size": 128, **({"version": 2, "photo": photo} if photo else {})})
    inside, step = [], []
    for i in range(n):
        r = _render_image(0, "train", i, c)
        img, lab = r["image"].astype(np.float32), r["label"]
        obj = (lab > 0) & (lab < 255)
        both = obj[:, :-1] & obj[:, 1:]
        inside.append(np.abs(img[:, 1:] - img[:, :-1])[both].mean())
        # the colour step across the ignore band: 3 px outside vs 3 px inside, along image rows
        band = lab == 255
        a, b = img[:, :-6], img[:, 6:]
        pair = band[:, 3:-3] & (((lab[:, :-6] == 0) & obj[:, 6:]) | (obj[:, :-6] & (lab[:, 6:] == 0)))
        step.append(np.abs(a - b)[pair].mean())
    return float(np.mean(inside)), float(np.mean(step))


def test_photo_levers_do_what_they_say() -> None:
    flat = dict.fromkeys(PHOTO_KEYS, 0)
    v1_inside, v1_step = _stats(None)
    shaded_inside, _ = _stats({**flat, "shading": 1.0, "texture": 1.0})
    _, faded_step = _stats({**flat, "edge_fade": 1.0})
    assert shaded_inside > 1.3 * v1_inside      # one object, many colours
    assert faded_step < 0.85 * v1_step          # weaker colour contrast across borders


def test_version_2_images_look_like_images(tmp_path: Path) -> None:
    generate_embedded(tmp_path / "ds", {**SMALL, "version": 2, "photo": PHOTO}, seed=0, progress=False)
    img = np.asarray(Image.open(tmp_path / "ds" / "JPEGImages" / "train_000000.jpg"))
    assert img.shape == (64, 64, 3) and 20 < img.mean() < 235 and img.std() > 10


@pytest.mark.parametrize(("change", "needle"), [
    ({"version": 3}, "data.embedded.version = 3 is invalid: 3 is not one of [1, 2]"),
    ({"version": 1, "photo": PHOTO}, "data.embedded.photo is a setting of version 2; version 1 does not use it"),
    ({"version": 2, "photo": None}, "data.embedded.version 2 needs data.embedded.photo with keys shading, texture"),
    ({"version": 2, "photo": {**PHOTO, "glare": 1}}, "unknown key(s) 'glare'; allowed keys: blur, clutter_match"),
    ({"version": 2, "photo": {**PHOTO, "blur": 9}}, "data.embedded.photo.blur = 9 is invalid"),
    ({"version": 2, "photo": {**PHOTO, "fade": "paint"}}, "data.embedded.photo.fade = 'paint' is invalid"),
])
def test_a_wrong_version_or_setting_is_refused_naming_what_is_allowed(default_params: dict, change: dict,
                                                                     needle: str, tmp_path: Path) -> None:
    p = copy.deepcopy(default_params)
    p["data"]["embedded"].update(change)
    with pytest.raises(ValueError) as error:
        validate_params(p)
    assert needle in str(error.value)
    with pytest.raises(ValueError):  # the generator refuses it too, before writing anything
        generate_embedded(tmp_path / "x", {**SMALL, **change}, seed=0, progress=False)
    assert not (tmp_path / "x").exists()
