"""The embedded dataset: generated images in VOC layout that carry the difficulties CPAL targets.

See docs/pipeline.md, "The embedded dataset". A laptop must be able to run the whole pipeline, so the default
dataset is drawn here in seconds instead of downloaded; it is built to be hard in the ways real WSSS data is hard:

- cat and dog share body families (poses), textures and colour palettes and differ only by a small
  mark on the head (shape and colour), so only the mark separates them (on data like this, docs/method.md
  reports plain CAMs covering the mark far more than the body);
- boats nearly always sit on a water band (`context_rate`) and water also shows without boats
  (`context_distractor_rate`), so CAMs can leak onto the context;
- every class has at least three shape variants plus colour, texture, aspect, pose and size
  variation (the "attributes" CPAL's context prototypes are meant to capture);
- textured backgrounds with clutter shapes that are no class; one to three objects, overlapping
  but each mostly visible; object sizes follow VOC (`object_scale`, square-root area / image side).

`version: 2` (docs/testbed.md) draws the same scenes with photo-like surfaces and optics (`photo`): shading,
texture, faded rims, clutter in object colours, blur and noise; version 1 is byte-identical to what every
earlier table measured.

Everything is drawn from `seed` with numpy Generators derived per image from (seed, split, index), so
an image does not depend on the order of generation and the same seed gives byte-identical files.
Analysis files beside the VOC layout: `Parts/<id>.png` (0 none, 1 object body, 2 discriminative mark)
and `instances.json` (per image: objects with class, variant, bbox, areas; background texture; band).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cpal.core.config import PHOTO_OPTIONAL, check_embedded_version
from cpal.core.io import JsonMapWriter, save_jpeg, save_label_png, write_json, write_text
from cpal.core.runtime import process_pool_context

EMBEDDED_CLASSES: tuple[str, ...] = ("background", "bird", "boat", "bottle", "car", "cat", "dog")

_CLS = {name: i for i, name in enumerate(EMBEDDED_CLASSES)}
_SPLITS = ("train", "val")
_SPLIT_CODE = {"train": 0, "val": 1}
# Generator versions (data.embedded.version). 1: flat-coloured objects with crisp borders, the data every table
# before the photo-like testbed was measured on. 2: the same scenes (the same layout stream, so every object,
# pose and place is version 1's) rendered with what real photos have and flat shapes lack; each lever is a
# key of data.embedded.photo, motivated in docs/testbed.md:
#   shading  light that changes across a surface: one object is many colours (a dense CRF expands a seed
#            over a flat body, it stops at shading edges; semantic affinities do not);
#   texture  fine surface texture (fur, fabric, reflections) inside objects;
#   edge_fade  boundaries whose colour contrast is low or absent in places (a dark dog on a dark floor): the
#            object's rim blends into what is behind it along stretches of its border;
#   fade     how the rim blends (optional, default "surface"): "surface" takes what is behind it, pixel for
#            pixel, so the border vanishes in colour and texture alike; "colour" takes only its local colour
#            and keeps the object's own texture, as a dark dog's fur still differs from a dark floor;
#   clutter_match  background clutter in the objects' own colours (a red car on a red-brick street);
#   blur, noise  optical blur (Gaussian sigma, px at 128 px, scaled with the image) and sensor noise (grey levels).
_LAYOUT_VERSION = 1  # the scene stream both versions draw from

REQUIRED_KEYS = (
    "image_size", "n_train", "n_val", "min_objects", "max_objects", "object_scale", "context_rate",
    "context_distractor_rate", "mark_fraction", "border_width", "jpeg_quality",
)
# Optional keys (not in params.yaml): defaults used when absent.
OPTIONAL_DEFAULTS: dict[str, Any] = {"min_visible": 0.7, "version": 1, "photo": None}

BACKGROUNDS = ("grass", "sand", "bricks", "tiles", "wood", "carpet", "wall")

# Shared by cat and dog: body families (poses), ear styles, textures, palettes (base, secondary).
PET_FAMILIES = ("sitting", "standing", "lying")
PET_EARS = ("pointy", "round", "floppy")
PET_TEXTURES = ("plain", "stripes", "spots", "patches")
PET_PALETTES = (
    ((205, 125, 50), (245, 235, 220)),   # ginger / white
    ((125, 125, 130), (60, 60, 66)),     # grey / dark grey
    ((38, 34, 34), (232, 232, 226)),     # black / white
    ((140, 95, 60), (212, 182, 140)),    # brown / tan
    ((228, 212, 178), (150, 108, 70)),   # cream / brown
    ((92, 72, 56), (28, 24, 20)),        # dark brown / black
)
# The only thing that tells cat from dog: the head mark's shape and colour.
MARKS = {"cat": ("diamond", (250, 222, 40)), "dog": ("disk", (205, 40, 165))}

_CAR_COLOURS = ((190, 32, 32), (32, 62, 168), (228, 228, 228), (32, 32, 36), (228, 188, 32),
                (160, 165, 170), (40, 110, 62))
_BOAT_COLOURS = ((235, 235, 235), (180, 36, 36), (30, 40, 90), (130, 86, 48), (40, 100, 60),
                 (225, 180, 40))
_BIRD_COLOURS = (((120, 82, 50), (215, 190, 150)), ((105, 105, 110), (220, 220, 215)),
                 ((30, 30, 34), (200, 60, 40)), ((190, 30, 30), (120, 40, 30)),
                 ((50, 90, 170), (225, 225, 225)), ((225, 195, 40), (60, 60, 40)))
_BOTTLE_COLOURS = ((40, 110, 52), (112, 62, 26), (185, 205, 200), (40, 70, 150), (150, 40, 45))
_LABEL_COLOURS = ((240, 236, 220), (250, 250, 250), (200, 40, 40), (230, 200, 90), (30, 30, 30))

# Every colour an object of some class can take: what version 2's matched clutter draws from.
_OBJECT_COLOURS = (tuple(c for pal in PET_PALETTES for c in pal) + _CAR_COLOURS + _BOAT_COLOURS
                   + tuple(c for pair in _BIRD_COLOURS for c in pair) + _BOTTLE_COLOURS)

_REF_RANGE = 1.7   # shapes live in [-_REF_RANGE, _REF_RANGE]^2 normalised units
_REF_N = 96        # reference raster used to measure a shape's area and extent


# ----------------------------------------------------------------------------------------------
# primitives: each returns a boolean mask over arrays (u, v) of normalised object coordinates


def _rot(u: np.ndarray, v: np.ndarray, cx: float, cy: float, ang: float) -> tuple[np.ndarray, np.ndarray]:
    du, dv = u - cx, v - cy
    if ang == 0.0:
        return du, dv
    c, s = math.cos(ang), math.sin(ang)
    return du * c + dv * s, -du * s + dv * c


def _eval(kind: str, p: tuple, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    if kind == "ellipse":
        cx, cy, rx, ry, ang = p
        a, b = _rot(u, v, cx, cy, ang)
        return (a / rx) ** 2 + (b / ry) ** 2 <= 1.0
    if kind == "rect":
        cx, cy, hw, hh, ang = p
        a, b = _rot(u, v, cx, cy, ang)
        return (np.abs(a) <= hw) & (np.abs(b) <= hh)
    if kind == "diamond":
        cx, cy, d = p
        return np.abs(u - cx) + np.abs(v - cy) <= d
    if kind == "halfellipse":  # lower half (v >= cy) of an ellipse: hulls
        cx, cy, rx, ry = p
        return (((u - cx) / rx) ** 2 + ((v - cy) / ry) ** 2 <= 1.0) & (v >= cy)
    if kind == "ring":
        cx, cy, rx, ry, t = p
        r = ((u - cx) / rx) ** 2 + ((v - cy) / ry) ** 2
        inner = ((u - cx) / max(rx - t, 1e-3)) ** 2 + ((v - cy) / max(ry - t, 1e-3)) ** 2
        return (r <= 1.0) & (inner > 1.0)
    if kind == "poly":  # convex polygon, vertices in either orientation
        pts = p
        n = len(pts)
        area2 = sum(pts[i][0] * pts[(i + 1) % n][1] - pts[(i + 1) % n][0] * pts[i][1] for i in range(n))
        sign = 1.0 if area2 >= 0 else -1.0
        inside = np.ones(np.broadcast_shapes(u.shape, v.shape), dtype=bool)
        for i in range(n):
            x0, y0 = pts[i]
            x1, y1 = pts[(i + 1) % n]
            inside &= sign * ((x1 - x0) * (v - y0) - (y1 - y0) * (u - x0)) >= 0
        return inside
    raise ValueError(f"unknown primitive {kind!r}")


def _union(parts: list[tuple], u: np.ndarray, v: np.ndarray) -> np.ndarray:
    out = np.zeros(np.broadcast_shapes(u.shape, v.shape), dtype=bool)
    for kind, p, _role in parts:
        out |= _eval(kind, p, u, v)
    return out


# ----------------------------------------------------------------------------------------------
# noise and textures


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Zero-mean, unit-ish smooth noise: a cells x cells random grid resized bilinearly."""
    small = rng.standard_normal((cells + 1, cells + 1)).astype(np.float32)
    return np.asarray(Image.fromarray(small, mode="F").resize((w, h), Image.BILINEAR), dtype=np.float32)


def _jitter(rng: np.random.Generator, colour: tuple[int, int, int], amount: float) -> np.ndarray:
    return np.clip(np.asarray(colour, np.float32) + rng.uniform(-amount, amount, 3), 0, 255)


def _background(rng: np.random.Generator, s: int) -> tuple[str, np.ndarray]:
    name = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    coarse = _smooth_noise(rng, s, s, 3)
    fine = _smooth_noise(rng, s, s, max(4, s // 6))
    if name == "grass":
        base = _jitter(rng, (75, 130, 45), 25)
        blades = np.sin(xx * rng.uniform(0.8, 1.4) + 3.0 * fine) * 0.5
        t = 0.18 * coarse + 0.10 * fine + 0.08 * blades
        img = base * (1.0 + t[..., None])
    elif name == "sand":
        base = _jitter(rng, (205, 180, 125), 20)
        dunes = np.sin(yy * rng.uniform(0.15, 0.35) + xx * rng.uniform(-0.1, 0.1) + 2.0 * coarse)
        t = 0.06 * dunes + 0.08 * coarse + 0.05 * rng.standard_normal((s, s)).astype(np.float32)
        img = base * (1.0 + t[..., None])
    elif name == "bricks":
        bw = s / rng.uniform(3.5, 7.0)
        bh = bw / rng.uniform(2.0, 3.0)
        mortar = max(1.0, s / 96)
        row = np.floor(yy / bh)
        off = (row % 2) * bw / 2
        col = np.floor((xx + off) / bw)
        joint = ((yy % bh) < mortar) | (((xx + off) % bw) < mortar)
        base = _jitter(rng, ((160, 72, 50), (128, 124, 118), (180, 150, 110))[int(rng.integers(3))], 20)
        table = rng.uniform(-0.15, 0.15, (int(s / bh) + 3, int(s / bw) + 3)).astype(np.float32)
        t = table[row.astype(int), col.astype(int)] + 0.06 * fine
        img = base * (1.0 + t[..., None])
        img[joint] = _jitter(rng, (200, 195, 185), 15)
    elif name == "tiles":
        palette = ((200, 190, 170), (120, 110, 100), (180, 80, 60), (90, 120, 70), (210, 200, 120),
                   (150, 150, 150), (60, 58, 55), (235, 230, 220))
        i, j = rng.choice(len(palette), 2, replace=False)
        c1, c2 = _jitter(rng, palette[i], 15), _jitter(rng, palette[j], 15)
        ang = rng.uniform(-0.6, 0.6)
        period = s / rng.uniform(3.0, 8.0)
        a = (xx * math.cos(ang) + yy * math.sin(ang)) / period
        b = (-xx * math.sin(ang) + yy * math.cos(ang)) / period
        check = ((np.floor(a) + np.floor(b)) % 2).astype(np.float32)
        img = c1 * (1 - check[..., None]) + c2 * check[..., None]
        img *= 1.0 + 0.05 * fine[..., None]
    elif name == "wood":
        base = _jitter(rng, (150, 100, 58), 25)
        f = rng.uniform(0.25, 0.6)
        grain = np.sin((yy + 6.0 * coarse + 1.5 * fine) * f)
        planks = (np.floor(yy / (s / rng.uniform(3, 6))) % 2) * 0.08
        img = base * (1.0 + (0.12 * grain + planks)[..., None])
    elif name == "carpet":
        tones = ((150, 60, 60), (110, 90, 60), (90, 100, 70), (170, 140, 100))
        base = _jitter(rng, tones[int(rng.integers(len(tones)))], 20)
        dots = (np.sin(xx * 0.9) * np.sin(yy * 0.9) > 0.6).astype(np.float32)
        t = 0.2 * coarse + 0.12 * fine + 0.1 * dots + 0.06 * rng.standard_normal((s, s)).astype(np.float32)
        img = base * (1.0 + t[..., None])
    else:  # wall: plain colour with a light gradient and stains
        tones = ((225, 215, 190), (200, 200, 190), (190, 205, 170), (215, 185, 160))
        base = _jitter(rng, tones[int(rng.integers(len(tones)))], 15)
        grad = (yy / s - 0.5) * rng.uniform(-0.25, 0.25)
        img = base * (1.0 + (grad + 0.05 * coarse + 0.03 * fine)[..., None])
    img = np.clip(img, 0, 255)
    img[..., 2] = np.minimum(img[..., 2], np.maximum(img[..., 0], img[..., 1]))
    return name, img.astype(np.float32)


def _draw_water(rng: np.random.Generator, img: np.ndarray, top: int) -> None:
    s = img.shape[1]
    h = img.shape[0] - top
    yy, xx = np.mgrid[0:h, 0:s].astype(np.float32)
    base = np.array([rng.uniform(20, 60), rng.uniform(85, 125), rng.uniform(150, 195)], np.float32)
    lam = rng.uniform(5.0, 9.0) * s / 128
    waves = np.sin(2 * math.pi * (yy / lam + 0.25 * np.sin(2 * math.pi * xx / (lam * 5) + rng.uniform(0, 6))))
    crest = np.clip(waves - 0.6, 0, None) * 2.5
    t = 0.08 * _smooth_noise(rng, h, s, 4) + 0.04 * waves
    water = base * (1.0 + t[..., None]) + crest[..., None] * np.array([70, 60, 40], np.float32)
    water[: max(1, s // 64)] += 40  # a light horizon line
    img[top:] = np.clip(water, 0, 255)


def _draw_clutter(rng: np.random.Generator, img: np.ndarray, photo_rng: np.random.Generator | None = None,
                  match: float = 0.0) -> None:
    """Shapes that belong to no class, behind the objects, labelled background. With `photo_rng`, each shape
    takes one of the objects' own colours with probability `match` (the scene layout stays version 1's)."""
    s = img.shape[0]
    for _ in range(int(rng.integers(3, 9))):
        r = rng.uniform(0.04, 0.14) * s
        cx, cy = rng.uniform(0, s, 2)
        x0, x1 = max(0, int(cx - 1.7 * r)), min(s, int(cx + 1.7 * r) + 2)   # every shape fits 1.7 r
        y0, y1 = max(0, int(cy - 1.7 * r)), min(s, int(cy + 1.7 * r) + 2)
        if x1 <= x0 or y1 <= y0:
            continue
        v = (np.arange(y0, y1, dtype=np.float32)[:, None] - cy) / r
        u = (np.arange(x0, x1, dtype=np.float32)[None, :] - cx) / r
        kind = int(rng.integers(5))
        ang = rng.uniform(0, math.pi)
        if kind == 0:
            m = _eval("rect", (0, 0, 1.0, rng.uniform(0.3, 1.0), ang), u, v)
        elif kind == 1:
            m = _eval("ellipse", (0, 0, 1.0, rng.uniform(0.4, 1.0), ang), u, v)
        elif kind == 2:
            m = _eval("ring", (0, 0, 1.0, 1.0, rng.uniform(0.2, 0.4)), u, v)
        elif kind == 3:
            m = _eval("rect", (0, 0, 1.6, rng.uniform(0.06, 0.12), ang), u, v)  # a stick
        else:
            pts = [(math.cos(ang + k * 2.0944), math.sin(ang + k * 2.0944)) for k in range(3)]
            m = _eval("poly", pts, u, v)
        colour = rng.uniform(0, 255, 3).astype(np.float32)
        if photo_rng is not None and photo_rng.random() < match:
            colour = _jitter(photo_rng, _OBJECT_COLOURS[int(photo_rng.integers(len(_OBJECT_COLOURS)))], 12)
        img[y0:y1, x0:x1][m] = colour


# ----------------------------------------------------------------------------------------------
# object specifications: parts in normalised coordinates (facing +u, y down), colour roles


def _pet(rng: np.random.Generator, cls_name: str) -> tuple[list[tuple], dict, dict]:
    fam = int(rng.integers(len(PET_FAMILIES)))
    ears = int(rng.integers(len(PET_EARS)))
    tex = PET_TEXTURES[int(rng.integers(len(PET_TEXTURES)))]
    pal = int(rng.integers(len(PET_PALETTES)))
    a = rng.uniform(0.85, 1.15)
    tail_ang = rng.uniform(-0.5, 0.5)
    parts: list[tuple] = []
    if fam == 0:    # sitting, upright
        hx, hy, hr = 0.08, -0.62, 0.36
        parts += [("ellipse", (0.0, 0.25, 0.52 * a, 0.72, 0.0), "body"),
                  ("rect", (-0.2, 0.9, 0.1, 0.14, 0.0), "body"),
                  ("rect", (0.22, 0.9, 0.1, 0.14, 0.0), "body"),
                  ("ellipse", (0.62, 0.72, 0.42, 0.08, -0.35 + tail_ang), "body")]
    elif fam == 1:  # standing on four legs
        hx, hy, hr = 0.86, -0.46, 0.34
        parts += [("ellipse", (0.0, 0.02, 0.86, 0.38 * a, 0.0), "body"),
                  ("ellipse", (0.62, -0.22, 0.3, 0.22, -0.6), "body")]
        parts += [("rect", (x, 0.55, 0.09, 0.3, 0.0), "body") for x in (-0.62, -0.36, 0.36, 0.6)]
        parts += [("ellipse", (-0.98, -0.28, 0.34, 0.08, 0.6 + tail_ang), "body")]
    else:           # lying
        hx, hy, hr = 0.82, -0.12, 0.34
        parts += [("ellipse", (-0.05, 0.25, 0.9, 0.34 * a, 0.0), "body"),
                  ("rect", (0.9, 0.5, 0.3, 0.09, 0.0), "body"),
                  ("ellipse", (-1.05, 0.42, 0.36, 0.08, -0.15 + tail_ang), "body")]
    parts.append(("ellipse", (hx, hy, hr, hr * 0.95, 0.0), "body"))
    if ears == 0:
        for dx in (-0.2, 0.2):
            parts.append(("poly", [(hx + dx - 0.14, hy - 0.2), (hx + dx + 0.14, hy - 0.2),
                                   (hx + dx * 1.3, hy - 0.62)], "body"))
    elif ears == 1:
        parts += [("ellipse", (hx + dx, hy - 0.3, 0.13, 0.13, 0.0), "body") for dx in (-0.22, 0.22)]
    else:
        parts += [("ellipse", (hx + dx, hy + 0.05, 0.1, 0.26, 0.3 * np.sign(dx)), "secondary")
                  for dx in (-0.36, 0.36)]
    parts.append(("ellipse", (hx + 0.22 * (1 if fam else 0.5), hy + 0.1, 0.06, 0.05, 0.0), "dark"))  # nose
    colours = {"base": _jitter(rng, PET_PALETTES[pal][0], 12),
               "secondary": _jitter(rng, PET_PALETTES[pal][1], 12),
               "dark": np.array([25, 20, 20], np.float32)}
    meta = {"variant": fam, "family": PET_FAMILIES[fam], "texture": tex, "palette": pal,
            "ears": PET_EARS[ears], "head": (hx, hy + 0.02)}
    return parts, colours, meta


def _car(rng: np.random.Generator) -> tuple[list[tuple], dict, dict]:
    var = int(rng.integers(3))
    a = rng.uniform(0.9, 1.1)
    if var == 0:    # sedan
        parts = [("rect", (0.0, 0.12, 1.0, 0.26 * a, 0.0), "body"),
                 ("poly", [(-0.58, -0.12), (0.5, -0.12), (0.26, -0.56 * a), (-0.42, -0.56 * a)], "body"),
                 ("poly", [(-0.48, -0.16), (0.4, -0.16), (0.22, -0.48 * a), (-0.36, -0.48 * a)], "window")]
        wy, wr, wx = 0.4, 0.21, 0.62
    elif var == 1:  # van
        parts = [("poly", [(-0.95, -0.62 * a), (0.55, -0.62 * a), (0.95, -0.1), (0.95, 0.38), (-0.95, 0.38)],
                  "body"),
                 ("poly", [(0.2, -0.52 * a), (0.52, -0.52 * a), (0.82, -0.12), (0.2, -0.12)], "window"),
                 ("rect", (-0.4, -0.32 * a, 0.4, 0.16, 0.0), "window")]
        wy, wr, wx = 0.42, 0.22, 0.6
    else:           # low sports car
        parts = [("poly", [(-1.05, -0.1), (0.2, -0.18), (1.1, 0.05), (1.1, 0.32), (-1.05, 0.32)], "body"),
                 ("poly", [(-0.5, -0.12), (0.25, -0.16), (0.0, -0.42 * a), (-0.35, -0.42 * a)], "body"),
                 ("poly", [(-0.42, -0.15), (0.15, -0.17), (-0.03, -0.36 * a), (-0.3, -0.36 * a)], "window")]
        wy, wr, wx = 0.34, 0.2, 0.66
    for x in (-wx, wx):
        parts += [("ellipse", (x, wy, wr, wr, 0.0), "dark"),
                  ("ellipse", (x, wy, wr * 0.45, wr * 0.45, 0.0), "light")]
    parts.append(("rect", (0.97 if var != 2 else 1.04, 0.12, 0.05, 0.06, 0.0), "accent"))
    tex = ("plain", "twotone", "stripes")[int(rng.integers(3))]
    base = _jitter(rng, _CAR_COLOURS[int(rng.integers(len(_CAR_COLOURS)))], 15)
    colours = {"base": base,
               "secondary": np.clip(base * rng.uniform(0.5, 0.8) + 60 * rng.uniform(0, 1), 0, 255),
               "window": _jitter(rng, (150, 180, 200), 20), "dark": np.array([25, 25, 28], np.float32),
               "light": _jitter(rng, (175, 175, 175), 15), "accent": np.array([250, 240, 180], np.float32)}
    return parts, colours, {"variant": var, "texture": tex}


def _boat(rng: np.random.Generator) -> tuple[list[tuple], dict, dict]:
    var = int(rng.integers(3))
    d = rng.uniform(0.9, 1.15)
    if var == 0:    # sailboat
        parts = [("poly", [(-1.0, 0.2), (1.05, 0.2), (0.72, 0.55 * d), (-0.8, 0.55 * d)], "body"),
                 ("rect", (0.0, -0.45, 0.035, 0.66, 0.0), "dark"),
                 ("poly", [(0.06, -1.05), (0.06, 0.12), (0.8, 0.12)], "sail"),
                 ("poly", [(-0.06, -0.85), (-0.06, 0.12), (-0.62, 0.12)], "sail")]
    elif var == 1:  # motorboat
        parts = [("poly", [(-1.0, -0.05), (0.85, -0.05), (1.15, -0.2), (0.8, 0.45 * d), (-0.95, 0.45 * d)],
                  "body"),
                 ("rect", (-0.25, -0.32, 0.45, 0.28, 0.0), "sail"),
                 ("poly", [(0.2, -0.05), (0.2, -0.5), (0.5, -0.05)], "window"),
                 ("rect", (-0.3, -0.35, 0.3, 0.1, 0.0), "window")]
    else:           # rowboat with oars and seats
        parts = [("halfellipse", (0.0, -0.1, 1.0, 0.6 * d), "body"),
                 ("rect", (0.0, -0.1, 1.0, 0.07, 0.0), "secondary"),
                 ("rect", (-0.35, -0.32, 0.05, 0.26, 0.0), "dark"),
                 ("rect", (0.35, -0.32, 0.05, 0.26, 0.0), "dark"),
                 ("rect", (0.1, 0.05, 0.85, 0.04, 0.5), "light")]
    tex = ("plain", "stripes", "twotone")[int(rng.integers(3))]
    base = _jitter(rng, _BOAT_COLOURS[int(rng.integers(len(_BOAT_COLOURS)))], 15)
    sails = ((240, 238, 228), (225, 200, 120), (220, 80, 70))
    colours = {"base": base, "secondary": _jitter(rng, (235, 235, 230), 20) if base.mean() < 150
               else _jitter(rng, (150, 40, 40), 20),
               "sail": _jitter(rng, sails[int(rng.integers(len(sails)))], 12),
               "window": _jitter(rng, (60, 80, 100), 20), "dark": _jitter(rng, (90, 65, 40), 15),
               "light": _jitter(rng, (170, 130, 80), 15)}
    return parts, colours, {"variant": var, "texture": tex}


def _bird(rng: np.random.Generator) -> tuple[list[tuple], dict, dict]:
    var = int(rng.integers(3))
    a = rng.uniform(0.85, 1.15)
    if var == 0:    # perched, upright
        parts = [("ellipse", (0.0, 0.15, 0.62 * a, 0.45, -0.45), "body"),
                 ("poly", [(-0.35, 0.4), (-0.55, 0.5), (-1.05, 1.05), (-0.75, 1.1)], "secondary"),
                 ("ellipse", (0.48, -0.52, 0.3, 0.3, 0.0), "body"),
                 ("poly", [(0.72, -0.6), (0.72, -0.44), (1.02, -0.5)], "accent"),
                 ("rect", (0.0, 0.72, 0.04, 0.22, 0.0), "accent"),
                 ("rect", (0.18, 0.7, 0.04, 0.22, 0.0), "accent")]
        eye = (0.55, -0.58)
    elif var == 1:  # flying, wings spread
        parts = [("ellipse", (0.0, 0.1, 0.72 * a, 0.26, 0.0), "body"),
                 ("poly", [(-0.3, 0.0), (0.35, 0.0), (-0.15, -1.05), (-0.55, -0.95)], "secondary"),
                 ("poly", [(-0.2, 0.2), (0.3, 0.2), (0.0, 0.95), (-0.45, 0.8)], "secondary"),
                 ("poly", [(-0.6, 0.05), (-0.6, 0.2), (-1.15, 0.38), (-1.15, -0.15)], "body"),
                 ("ellipse", (0.78, -0.02, 0.24, 0.22, 0.0), "body"),
                 ("poly", [(0.96, -0.08), (0.96, 0.06), (1.25, 0.0)], "accent")]
        eye = (0.84, -0.06)
    else:           # wader: long neck and legs
        parts = [("ellipse", (-0.1, -0.05, 0.6 * a, 0.34, -0.2), "body"),
                 ("poly", [(-0.65, -0.05), (-0.5, 0.18), (-1.05, 0.3)], "secondary"),
                 ("rect", (0.42, -0.5, 0.07, 0.36, -0.3), "body"),
                 ("ellipse", (0.56, -0.88, 0.2, 0.17, 0.0), "body"),
                 ("poly", [(0.72, -0.93), (0.72, -0.82), (1.15, -0.86)], "accent"),
                 ("rect", (-0.2, 0.65, 0.035, 0.42, 0.0), "accent"),
                 ("rect", (0.05, 0.65, 0.035, 0.42, 0.0), "accent")]
        eye = (0.6, -0.92)
    parts.append(("ellipse", (eye[0], eye[1], 0.05, 0.05, 0.0), "dark"))
    pal = _BIRD_COLOURS[int(rng.integers(len(_BIRD_COLOURS)))]
    tex = ("plain", "gradient", "spots")[int(rng.integers(3))]
    beaks = ((235, 150, 30), (230, 200, 40), (60, 50, 40))
    colours = {"base": _jitter(rng, pal[0], 15), "secondary": _jitter(rng, pal[1], 15),
               "accent": _jitter(rng, beaks[int(rng.integers(len(beaks)))], 10),
               "dark": np.array([15, 15, 15], np.float32)}
    return parts, colours, {"variant": var, "texture": tex}


def _bottle(rng: np.random.Generator) -> tuple[list[tuple], dict, dict]:
    var = int(rng.integers(3))
    a = rng.uniform(0.9, 1.1)
    if var == 0:    # wine bottle: tall body, shoulders, long neck
        w = 0.4 * a
        parts = [("rect", (0.0, 0.3, w, 0.72, 0.0), "body"), ("ellipse", (0.0, -0.42, w, 0.3, 0.0), "body"),
                 ("rect", (0.0, -0.8, 0.13, 0.3, 0.0), "body"),
                 ("rect", (0.0, -1.08, 0.15, 0.1, 0.0), "accent"),
                 ("rect", (0.0, 0.4, w, 0.28, 0.0), "label")]
    elif var == 1:  # jug with a handle
        w = 0.55 * a
        parts = [("rect", (0.0, 0.25, w, 0.62, 0.0), "body"), ("ellipse", (0.0, -0.38, w, 0.25, 0.0), "body"),
                 ("rect", (0.0, -0.65, 0.2, 0.16, 0.0), "body"),
                 ("rect", (0.0, -0.84, 0.23, 0.07, 0.0), "accent"),
                 ("ring", (w + 0.05, 0.05, 0.3, 0.38, 0.1), "body"),
                 ("rect", (0.0, 0.35, w, 0.2, 0.0), "label")]
    else:           # round flask with a long neck
        r = 0.62 * a
        parts = [("ellipse", (0.0, 0.38, r, r, 0.0), "body"), ("rect", (0.0, -0.42, 0.14, 0.42, 0.0), "body"),
                 ("rect", (0.0, -0.88, 0.17, 0.08, 0.0), "accent"),
                 ("ellipse", (0.0, 0.42, r * 0.55, r * 0.35, 0.0), "label")]
    tex = ("plain", "gradient", "stripes")[int(rng.integers(3))]
    base = _jitter(rng, _BOTTLE_COLOURS[int(rng.integers(len(_BOTTLE_COLOURS)))], 12)
    caps = ((200, 170, 60), (170, 30, 30), (30, 30, 30))
    colours = {"base": base, "secondary": np.clip(base * 0.6 + 90, 0, 255),
               "label": _jitter(rng, _LABEL_COLOURS[int(rng.integers(len(_LABEL_COLOURS)))], 10),
               "accent": _jitter(rng, caps[int(rng.integers(len(caps)))], 10)}
    return parts, colours, {"variant": var, "texture": tex}


def _spec(rng: np.random.Generator, cls: int) -> tuple[list[tuple], dict, dict]:
    name = EMBEDDED_CLASSES[cls]
    if name in ("cat", "dog"):
        return _pet(rng, name)
    return {"car": _car, "boat": _boat, "bird": _bird, "bottle": _bottle}[name](rng)


def _texture_mask(rng: np.random.Generator, tex: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Where the secondary colour shows (float 0..1) for the body texture `tex`."""
    if tex == "stripes":
        ang = rng.uniform(0, math.pi)
        f = rng.uniform(2.0, 3.5)
        return (np.sin(2 * math.pi * f * (u * math.cos(ang) + v * math.sin(ang)) + rng.uniform(0, 6)) > 0.35
                ).astype(np.float32)
    if tex in ("spots", "patches"):
        k, rlo, rhi = (10, 0.07, 0.15) if tex == "spots" else (3, 0.25, 0.5)
        out = np.zeros(np.broadcast_shapes(u.shape, v.shape), dtype=bool)
        cu, cv, radii = rng.uniform(-1.1, 1.1, k), rng.uniform(-1.1, 1.1, k), rng.uniform(rlo, rhi, k)
        for cx, cy, r in zip(cu, cv, radii, strict=True):
            out |= (u - cx) ** 2 + (v - cy) ** 2 <= r * r
        return out.astype(np.float32)
    if tex == "twotone":
        return (v > rng.uniform(0.0, 0.25)).astype(np.float32)
    if tex == "gradient":
        return np.clip((v + 0.8) / 1.6, 0, 1).astype(np.float32)
    return np.zeros(np.broadcast_shapes(u.shape, v.shape), dtype=np.float32)


# ----------------------------------------------------------------------------------------------
# version 2: what photos have and flat shapes lack


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of an (h, w) or (h, w, c) float array, edges reflected."""
    if sigma <= 0:
        return img
    r = max(1, int(math.ceil(3 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-r, r + 1, dtype=np.float32) / sigma) ** 2)
    taps /= taps.sum()
    out = img.astype(np.float32)
    for axis in (0, 1):
        pad = [(0, 0)] * out.ndim
        pad[axis] = (r, r)
        padded = np.pad(out, pad, mode="reflect")
        n = out.shape[axis]
        acc = np.zeros_like(out)
        for k, wk in enumerate(taps):
            acc += wk * np.take(padded, np.arange(k, k + n), axis=axis)
        out = acc
    return out


def _photo_object(prng: np.random.Generator, win: np.ndarray, behind: np.ndarray, obj: np.ndarray,
                  u: np.ndarray, v: np.ndarray, photo: dict) -> None:
    """Version 2's surface of one just-painted object, in place: light across it, fine texture, and stretches
    of its rim faded into what is behind it (the label does not change: the object is still there)."""
    h, w = obj.shape
    ang = prng.uniform(0, 2 * math.pi)
    light = np.clip((u * math.cos(ang) + v * math.sin(ang)) / 1.2, -1, 1)
    gain = 1.0 + float(photo["shading"]) * (0.6 * light + 0.4 * _smooth_noise(prng, h, w, 3))
    fine = _smooth_noise(prng, h, w, max(2, max(h, w) // 2))
    gain = gain * (1.0 + 0.5 * float(photo["texture"]) * fine)
    win[obj] = np.clip(win[obj] * np.clip(gain, 0.2, 2.0)[obj][:, None], 0, 255)
    if float(photo["edge_fade"]) > 0:
        inner = _blur(obj.astype(np.float32), max(1.0, 0.12 * math.sqrt(float(obj.sum()))))
        rim = np.clip(2.0 * (1.0 - inner), 0, 1)                           # 1 at the border, 0 deep inside
        stretch = np.clip(0.2 + 1.5 * _smooth_noise(prng, h, w, 4), 0, 1)  # where along the border it fades
        wgt = (float(photo["edge_fade"]) * rim * stretch)[obj][:, None]
        if photo.get("fade", PHOTO_OPTIONAL["fade"][0]) == "colour":
            # the rim takes the local colour of what is behind it and keeps its own surface (texture, pattern)
            sigma = max(1.5, 0.08 * math.sqrt(float(obj.sum())))
            mask = obj.astype(np.float32)
            own = _blur(win * mask[..., None], sigma) / np.maximum(_blur(mask, sigma), 1e-3)[..., None]
            win[obj] = np.clip(win[obj] + wgt * (_blur(behind, sigma) - own)[obj], 0, 255)
        else:
            win[obj] = win[obj] * (1 - wgt) + behind[obj] * wgt


def _photo_finish(prng: np.random.Generator, img: np.ndarray, photo: dict) -> np.ndarray:
    """Version 2's whole-image optics: uneven light, blur (sigma in px at 128 px, scaled), sensor noise."""
    s = img.shape[0]
    light = 1.0 + 0.5 * float(photo["shading"]) * _smooth_noise(prng, s, s, 2)
    img = np.clip(img * np.clip(light, 0.3, 1.7)[..., None], 0, 255)
    img = _blur(img, float(photo["blur"]) * s / 128)
    return img + float(photo["noise"]) * prng.standard_normal(img.shape, dtype=np.float32)


# ----------------------------------------------------------------------------------------------
# one image


def _check_cfg(cfg: dict) -> dict:
    if not isinstance(cfg, dict):
        raise ValueError(f"data.embedded must be a mapping, got {type(cfg).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in cfg]
    if missing:
        raise KeyError(f"data.embedded is missing key(s): {', '.join(missing)}")
    c = {**OPTIONAL_DEFAULTS, **cfg}
    n_fg = len(EMBEDDED_CLASSES) - 1

    def bad(key: str, why: str) -> ValueError:
        return ValueError(f"data.embedded.{key} = {c[key]!r}: {why}")

    if int(c["image_size"]) < 32:
        raise bad("image_size", "must be at least 32")
    for key in ("n_train", "n_val"):
        if int(c[key]) < n_fg:
            raise bad(key, f"must be at least {n_fg} so that every class appears in the split")
    if not 1 <= int(c["min_objects"]) <= int(c["max_objects"]) <= 3:
        max_obj = c["max_objects"]
        raise bad("min_objects", f"need 1 <= min_objects <= max_objects <= 3 (max_objects = {max_obj!r})")
    lo_hi = c["object_scale"]
    if not (isinstance(lo_hi, (list, tuple)) and len(lo_hi) == 2 and 0.05 <= lo_hi[0] <= lo_hi[1] <= 0.6):
        raise bad("object_scale", "must be [lo, hi] with 0.05 <= lo <= hi <= 0.6")
    for key in ("context_rate", "context_distractor_rate"):
        if not 0.0 <= float(c[key]) <= 1.0:
            raise bad(key, "must lie in [0, 1]")
    if not 0.0 < float(c["mark_fraction"]) <= 0.15:
        raise bad("mark_fraction", "must lie in (0, 0.15]: the mark must fit inside the head")
    if not 0 <= int(c["border_width"]) <= 10:
        raise bad("border_width", "must lie in 0..10 pixels")
    if not 1 <= int(c["jpeg_quality"]) <= 100:
        raise bad("jpeg_quality", "must lie in 1..100")
    if not 0.0 < float(c["min_visible"]) <= 1.0:
        raise bad("min_visible", "must lie in (0, 1]")
    check_embedded_version(c)
    return c


def _ignore_band(inst: np.ndarray, width: int) -> np.ndarray:
    """Pixels within about `width` px of a border between different instances (or an instance and
    background); odd widths mark one side of the edge, even widths both sides, then dilate."""
    band = np.zeros(inst.shape, dtype=bool)
    if width <= 0:
        return band
    dx = inst[:, 1:] != inst[:, :-1]
    dy = inst[1:, :] != inst[:-1, :]
    band[:, :-1] |= dx
    band[:-1, :] |= dy
    if width % 2 == 0:
        band[:, 1:] |= dx
        band[1:, :] |= dy
        grow = (width - 2) // 2
    else:
        grow = (width - 1) // 2
    for _ in range(grow):
        b = band.copy()
        b[1:] |= band[:-1]
        b[:-1] |= band[1:]
        b[:, 1:] |= band[:, :-1]
        b[:, :-1] |= band[:, 1:]
        band = b
    return band


def _render_image(seed: int, split: str, index: int, c: dict) -> dict:
    # one generator per image from (seed, split, index): no image depends on the order of generation
    key = [int(seed), _SPLIT_CODE[split], int(index), _LAYOUT_VERSION]
    rng = np.random.default_rng(np.random.SeedSequence(key))
    # version 2 draws its surfaces from a stream of its own: the scene (classes, places, poses) stays version 1's
    photo = c["photo"] if int(c["version"]) == 2 else None
    prng = np.random.default_rng(np.random.SeedSequence([*key, 2])) if photo else None
    s = int(c["image_size"])
    n_fg = len(EMBEDDED_CLASSES) - 1
    n_obj = int(rng.integers(int(c["min_objects"]), int(c["max_objects"]) + 1))
    classes = [1 + index % n_fg] + [int(x) for x in rng.integers(1, n_fg + 1, n_obj - 1)]
    has_boat = _CLS["boat"] in classes
    band_rate = float(c["context_rate"]) if has_boat else float(c["context_distractor_rate"])
    band = bool(rng.random() < band_rate)

    bg_name, img = _background(rng, s)
    band_top = int(round(rng.uniform(0.45, 0.62) * s)) if band else None
    if band:
        _draw_water(rng, img, band_top)
    _draw_clutter(rng, img, prng, float(photo["clutter_match"]) if photo else 0.0)

    inst = np.zeros((s, s), dtype=np.uint8)    # 0 = background, k + 1 = object k
    parts_map = np.zeros((s, s), dtype=np.uint8)
    full_areas: list[int] = []
    visible: list[int] = []
    objects: list[dict] = []
    lo, hi = (float(x) for x in c["object_scale"])
    ref = np.linspace(-_REF_RANGE, _REF_RANGE, _REF_N, dtype=np.float32)
    ref_u, ref_v = ref[None, :], ref[:, None]
    cell = (2 * _REF_RANGE / (_REF_N - 1)) ** 2
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)

    for cls in classes:
        parts, colours, meta = _spec(rng, cls)
        name = EMBEDDED_CLASSES[cls]
        flip = -1.0 if rng.random() < 0.5 else 1.0
        max_rot = {"boat": 0.08, "bottle": 0.15}.get(name, 0.25)
        rot = rng.uniform(-max_rot, max_rot)
        ref_mask = _union(parts, ref_u, ref_v)
        area_norm = float(ref_mask.sum()) * cell
        if name in MARKS:
            shape, mcol = MARKS[name]
            mark_area = float(c["mark_fraction"]) * area_norm
            hx, hy = meta.pop("head")
            radius = math.sqrt(mark_area / math.pi)
            mark = (("diamond", (hx, hy, math.sqrt(mark_area / 2))) if shape == "diamond"
                    else ("ellipse", (hx, hy, radius, radius, 0.0)))
            parts.append((mark[0], mark[1], "mark"))
            colours["mark"] = _jitter(rng, mcol, 8)
        ys, xs = np.nonzero(ref_mask)
        corners = np.array([[ref[xs.min()], ref[ys.min()]], [ref[xs.max()], ref[ys.min()]],
                            [ref[xs.min()], ref[ys.max()]], [ref[xs.max()], ref[ys.max()]]], np.float32)
        cr, sr = math.cos(rot), math.sin(rot)
        # pixel offset of each bbox corner per unit of scale:
        # x = cx + sc * (flip * u * cos - v * sin), y = cy + sc * (flip * u * sin + v * cos)
        offx = flip * corners[:, 0] * cr - corners[:, 1] * sr
        offy = flip * corners[:, 0] * sr + corners[:, 1] * cr
        tex_rng = np.random.default_rng(rng.integers(2**63))
        placed = False
        for _try in range(60):
            target = rng.uniform(lo, hi) * s
            sc = target / math.sqrt(area_norm)
            sc = min(sc, (s - 3) / float(offx.max() - offx.min()), (s - 3) / float(offy.max() - offy.min()))
            x_lo, x_hi = 1 - sc * offx.min(), s - 2 - sc * offx.max()
            y_lo, y_hi = 1 - sc * offy.min(), s - 2 - sc * offy.max()
            cx = rng.uniform(x_lo, max(x_lo, x_hi))
            if band and name == "boat":   # the hull sits in the water: bottom edge well inside the band
                bottom = rng.uniform(band_top + 0.35 * (s - band_top), s - 2)
                cy = min(max(bottom - sc * offy.max(), y_lo), max(y_lo, y_hi))
            else:
                cy = rng.uniform(y_lo, max(y_lo, y_hi))
            x0 = max(0, int(math.floor(cx + sc * offx.min())) - 1)
            x1 = min(s, int(math.ceil(cx + sc * offx.max())) + 2)
            y0 = max(0, int(math.floor(cy + sc * offy.min())) - 1)
            y1 = min(s, int(math.ceil(cy + sc * offy.max())) + 2)
            gx, gy = xx[y0:y1, x0:x1] - cx, yy[y0:y1, x0:x1] - cy
            u = flip * (gx * cr + gy * sr) / sc
            v = (-gx * sr + gy * cr) / sc
            masks = [_eval(kind, p, u, v) for kind, p, _role in parts]
            obj = np.zeros(u.shape, dtype=bool)
            for m in masks:
                obj |= m
            win_inst = inst[y0:y1, x0:x1]
            hidden = np.bincount(win_inst[obj], minlength=len(objects) + 1)[1:]
            min_vis = float(c["min_visible"])
            if all(visible[k] - hidden[k] >= min_vis * full_areas[k] for k in range(len(objects))):
                placed = True
                break
        if not placed:
            if len(objects) < int(c["min_objects"]):
                raise RuntimeError(
                    f"embedded image {split}/{index}: could not place {int(c['min_objects'])} objects with "
                    f"object_scale={c['object_scale']} and min_visible={c['min_visible']}; lower them")
            continue

        # paint: body texture, then parts in order (later parts over earlier)
        k = len(objects)
        win = img[y0:y1, x0:x1]
        behind = win.copy() if photo else None
        sec_t = _texture_mask(tex_rng, meta["texture"], u, v)[..., None]
        body_col = colours["base"] * (1 - sec_t) + colours["secondary"] * sec_t
        shade = (1.0 - 0.12 * np.clip(v, -1.2, 1.2))[..., None] * rng.uniform(0.88, 1.12)
        body_col = np.clip(body_col * shade, 0, 255)
        for (_kind, _p, role), m in zip(parts, masks, strict=True):
            if role == "body":
                win[m] = body_col[m]
            elif role == "mark":
                win[m] = colours[role]
            else:
                win[m] = np.clip(colours[role] * shade[m], 0, 255)
        if photo:
            _photo_object(prng, win, behind, obj, u, v, photo)
        for j in range(k):
            visible[j] -= int(hidden[j])
        visible.append(int(obj.sum()))
        win_inst[obj] = k + 1
        win_parts = parts_map[y0:y1, x0:x1]
        win_parts[obj] = 1
        if name in MARKS:
            win_parts[masks[-1] & obj] = 2
        full_areas.append(int(obj.sum()))
        objects.append({"class": cls, "variant": int(meta["variant"]), "texture": meta["texture"],
                        **{key: meta[key] for key in ("family", "palette", "ears") if key in meta},
                        "flip": bool(flip < 0), "full_area": int(obj.sum())})

    # mild optical blur and sensor noise, then labels
    if photo:
        img = _photo_finish(prng, img, photo)
    else:
        img = img.copy()
        img[1:-1] = 0.25 * img[:-2] + 0.5 * img[1:-1] + 0.25 * img[2:]
        img[:, 1:-1] = 0.25 * img[:, :-2] + 0.5 * img[:, 1:-1] + 0.25 * img[:, 2:]
        img += 3.0 * rng.standard_normal(img.shape, dtype=np.float32)
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)

    cls_lut = np.array([0] + [o["class"] for o in objects], dtype=np.uint8)
    label = cls_lut[inst]
    label[_ignore_band(inst, int(c["border_width"]))] = 255
    for k, o in enumerate(objects):
        m = inst == k + 1
        ys, xs = np.nonzero(m)
        o["bbox"] = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
        o["area"] = int(m.sum())
        o["mark_area"] = int((m & (parts_map == 2)).sum())
        o["on_context"] = bool(band and (ys >= band_top).mean() >= 0.3)
    return {"image": image, "label": label, "parts": parts_map,
            "meta": {"objects": objects, "background": bg_name, "context_band": band,
                     "context_band_top": band_top, "n_objects": len(objects)}}


# ----------------------------------------------------------------------------------------------
# the dataset


def _write_image(tmp: Path, seed: int, split: str, c: dict, index: int) -> tuple[str, dict]:
    """Render image `index` of `split` and write its JPEG, mask and parts under `tmp`; return (id, meta)."""
    image_id = f"{split}_{index:06d}"
    r = _render_image(seed, split, index, c)
    save_jpeg(tmp / "JPEGImages" / f"{image_id}.jpg", r["image"], quality=int(c["jpeg_quality"]))
    save_label_png(tmp / "SegmentationClass" / f"{image_id}.png", r["label"])
    save_label_png(tmp / "Parts" / f"{image_id}.png", r["parts"])
    return image_id, r["meta"]


@contextlib.contextmanager
def _image_writer(workers: int) -> Iterator[Callable[[Callable, range], Iterator[tuple[str, dict]]]]:
    """`map` in this process, or over `workers` processes (results in index order either way): every image
    is drawn from its own (seed, split, index) generator, so the files do not depend on the worker count."""
    if workers <= 1:
        yield map
        return
    with ProcessPoolExecutor(max_workers=workers, mp_context=process_pool_context()) as pool:
        yield lambda job, indices: pool.map(job, indices, chunksize=max(1, min(64, len(indices) // (4 * workers))))


def generate_embedded(out_dir: Path, cfg: dict, seed: int, progress: bool = True, workers: int = 0) -> dict:
    """Write the embedded dataset in VOC layout to out_dir (replacing it whole); return a summary.

    The folder is built beside out_dir under a temporary name and renamed into place at the end, so
    a killed run never leaves a half dataset that looks complete. `workers` > 1 draws the images in that
    many processes (run.num_workers: 320 px images take 36 ms each on one core); the output is the same.
    """
    from tqdm import tqdm

    c = _check_cfg(cfg)
    start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    for pattern in (f".{out_dir.name}.tmp-*", f".{out_dir.name}.old-*"):  # left by a killed run
        for stale in out_dir.parent.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the dataset should not be
    try:
        for sub in ("JPEGImages", "SegmentationClass", "Parts", "ImageSets/Segmentation"):
            (tmp / sub).mkdir(parents=True)
        counts = {sp: {n: 0 for n in EMBEDDED_CLASSES[1:]} for sp in _SPLITS}
        inst_counts = {sp: {n: 0 for n in EMBEDDED_CLASSES[1:]} for sp in _SPLITS}
        cls_labels: dict[str, list[int]] = {}
        instances = JsonMapWriter(tmp / "instances.json")  # streamed: 10,000 images' records need not sit in memory
        pet_px = mark_px = 0
        boat_imgs = boat_water = other_imgs = other_water = boat_inst = boat_inst_ctx = 0
        total = int(c["n_train"]) + int(c["n_val"])
        with tqdm(total=total, desc="embedded", unit="img", disable=not progress) as bar, \
                _image_writer(workers) as write_all, instances:
            for split in _SPLITS:
                ids = []
                for image_id, meta in write_all(functools.partial(_write_image, tmp, seed, split, c),
                                                range(int(c[f"n_{split}"]))):
                    present = sorted({o["class"] for o in meta["objects"]})
                    cls_labels[image_id] = present
                    instances.add(image_id, meta)
                    ids.append(image_id)
                    for cl in present:
                        counts[split][EMBEDDED_CLASSES[cl]] += 1
                    for o in meta["objects"]:
                        inst_counts[split][EMBEDDED_CLASSES[o["class"]]] += 1
                        if EMBEDDED_CLASSES[o["class"]] in MARKS:
                            pet_px += o["area"]
                            mark_px += o["mark_area"]
                        if o["class"] == _CLS["boat"]:
                            boat_inst += 1
                            boat_inst_ctx += int(o["on_context"])
                    if _CLS["boat"] in present:
                        boat_imgs += 1
                        boat_water += int(meta["context_band"])
                    else:
                        other_imgs += 1
                        other_water += int(meta["context_band"])
                    bar.update(1)
                write_text(tmp / "ImageSets" / "Segmentation" / f"{split}.txt", "\n".join(ids) + "\n")
        write_json(tmp / "cls_labels.json", cls_labels)
        write_json(tmp / "dataset.json", {
            "name": "embedded", "source": "embedded", "classes": list(EMBEDDED_CLASSES), "ignore_index": 255,
            "splits": {sp: int(c[f"n_{sp}"]) for sp in _SPLITS}, "seed": int(seed),
            "generator_version": int(c["version"]),
            # version 1's record as it always was (no version / photo keys): its datasets stay byte-identical
            "config": {k: c[k] for k in sorted(c) if int(c["version"]) > 1 or k not in ("version", "photo")},
            "parts": {"0": "not an object", "1": "object body", "2": "discriminative mark (cat, dog)"},
        })
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / "d")
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)

    def rate(a: int, b: int) -> float | None:
        return a / b if b else None

    return {
        "out_dir": str(out_dir),
        "images": {sp: int(c[f"n_{sp}"]) for sp in _SPLITS},
        "images_per_class": counts,
        "instances_per_class": inst_counts,
        "mark_fraction": rate(mark_px, pet_px),
        "context": {
            "boat_images": boat_imgs, "boat_images_on_water": boat_water,
            "boat_on_water_rate": rate(boat_water, boat_imgs),
            "boat_instances_on_context_rate": rate(boat_inst_ctx, boat_inst),
            "non_boat_images": other_imgs, "non_boat_with_water": other_water,
            "water_without_boat_rate": rate(other_water, other_imgs),
        },
        "seconds": time.perf_counter() - start,
    }
