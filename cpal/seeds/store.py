"""The seed file format (one float16 .npz per image), written by make_seeds and read downstream.

Keys: `cam` and, for prototype methods, `pacam`: (C, H, W) float16 in [0, 1] at the image's full
resolution, one channel per image-level (foreground) class; `keys`: (C,) int64 dataset class ids of
those channels (1..N-1); background is NOT in these maps (it comes from a threshold at evaluation or
from the refinement stages); `size`: (2,) int64 image (height, width). Prototype methods also store
`pacam_bg`: (H, W) float16 in [0, 1], the prototype map of the background prototype, which SIPE's own
seed protocol uses as the background score (argmax over background and classes, no threshold).
"""

from __future__ import annotations

import io
import os
import zipfile
import zlib
from pathlib import Path

import numpy as np

from cpal.core.io import atomic_path

MAP_KEYS = ("cam", "pacam")
BACKGROUND_KEY = "pacam_bg"


class SeedError(ValueError):
    """A seed file is missing, truncated or inconsistent with its image."""


def save_seeds(path: str | os.PathLike[str], keys: np.ndarray, size: tuple[int, int],
               maps: dict[str, np.ndarray]) -> None:
    arrays = {"keys": np.asarray(keys, dtype=np.int64), "size": np.asarray(size, dtype=np.int64)}
    for name, value in maps.items():
        if name not in (*MAP_KEYS, BACKGROUND_KEY):
            raise ValueError(f"unknown seed map {name!r}; allowed: {(*MAP_KEYS, BACKGROUND_KEY)}")
        want = tuple(size) if name == BACKGROUND_KEY else (len(keys), *size)
        if value.shape != want:
            raise ValueError(f"{path}: map {name} has shape {value.shape}, expected {want}")
        arrays[name] = value.astype(np.float16)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)


# What damage to an .npz can raise: zip structure, compression, CRC, encryption or method flags, npy header
_DAMAGE = (OSError, ValueError, SyntaxError, EOFError, zipfile.BadZipFile, zlib.error, RuntimeError,
           NotImplementedError)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every member is read whole (zipfile checks its CRC at the end) before numpy parses it.

    np.load parses a member's header before the CRC check is reached, so damage there raised a
    SyntaxError, or worse, a header with a damaged shape.
    """
    with zipfile.ZipFile(path) as zf:
        members = {name: zf.read(name) for name in zf.namelist()}
    return {name.removesuffix(".npy"): np.lib.format.read_array(io.BytesIO(raw), allow_pickle=False)
            for name, raw in members.items()}


def load_seeds(path: str | os.PathLike[str], expected_size: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """Read and check a seed file; `expected_size` is the image's (height, width)."""
    path = Path(path)
    try:
        data = _read_npz(path)
    except FileNotFoundError:
        raise SeedError(f"seed file not found: {path} (rerun make_seeds)") from None
    except _DAMAGE as exc:
        raise SeedError(f"unreadable or truncated seed file: {path} ({type(exc).__name__}: {exc})") from exc
    if "keys" not in data or "size" not in data or "cam" not in data:
        raise SeedError(f"{path}: not a seed file (needs keys, size, cam)")
    size = tuple(int(v) for v in data["size"])
    if expected_size is not None and size != tuple(expected_size):
        raise SeedError(f"{path}: seeds are {size[1]}x{size[0]} but the image is "
                        f"{expected_size[1]}x{expected_size[0]}")
    for name in MAP_KEYS:
        if name in data and data[name].shape != (len(data["keys"]), *size):
            raise SeedError(f"{path}: map {name} has shape {data[name].shape}, expected "
                            f"{(len(data['keys']), *size)}")
    if BACKGROUND_KEY in data and data[BACKGROUND_KEY].shape != size:
        raise SeedError(f"{path}: map {BACKGROUND_KEY} has shape {data[BACKGROUND_KEY].shape}, expected {size}")
    return data


def seed_path(seed_dir: str | os.PathLike[str], image_id: str) -> Path:
    return Path(seed_dir) / f"{image_id}.npz"


def labels_from_maps(maps: np.ndarray, keys: np.ndarray, bg_threshold: float) -> np.ndarray:
    """Seed label map: argmax over foreground maps, background where every map is below the threshold."""
    if maps.shape[0] == 0:
        return np.zeros(maps.shape[1:], dtype=np.uint8)
    maps = maps.astype(np.float32)
    best = maps.argmax(axis=0)
    label = np.asarray(keys, dtype=np.uint8)[best]
    label[maps.max(axis=0) < bg_threshold] = 0
    return label


def labels_with_background(maps: np.ndarray, background: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """SIPE's seed protocol: argmax over the map's own background channel and the classes' maps."""
    scores = np.concatenate([background[None].astype(np.float32), maps.astype(np.float32)])
    return np.concatenate([[0], np.asarray(keys)]).astype(np.uint8)[scores.argmax(axis=0)]


def check_complete(seed_dir: str | os.PathLike[str], ids: list[str]) -> None:
    """Every id of the split needs a seed file: name the missing ones (a killed make_seeds, another split)."""
    missing = [i for i in ids if not seed_path(seed_dir, i).is_file()]
    if missing:
        more = f" (and {len(missing) - 10} more)" if len(missing) > 10 else ""
        raise SeedError(f"{seed_dir}: no seeds for {len(missing)} of {len(ids)} images: "
                        f"{', '.join(missing[:10])}{more}; rerun make_seeds for this split")


def resolve_map(section: dict, method: str) -> dict:
    """A section's `map: auto` becomes `pacam` for the prototype methods and `cam` for the plain CAM.

    So `dvc exp run -S params.method=cam` stays a one-parameter change.
    """
    if section.get("map") != "auto":
        return section
    return {**section, "map": "cam" if method == "cam" else "pacam"}
