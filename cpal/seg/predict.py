"""`cpal-predict`: a trained model on your own images (a folder of any depth, or files), no dataset layout.

    cpal-predict --checkpoint outputs/seg/model.pt --classes data/embedded/dataset.json photos/ --out predictions
    cpal-predict --cams tags.csv --checkpoint outputs/train_cls/model.pt --classes data/embedded/dataset.json \
        --out cams

DeepLab (default): per image a VOC-palette PNG of class ids (`masks/`), a colour overlay with a legend of
class names (`overlays/`) and one row of class areas in `areas.csv`. `--cams`: the classifier's CAM and
PACAM heatmaps per tag (`heatmaps/`) and the seed argmax mask, for images with given tags. Outputs mirror
the input's sub-folders. Images larger than `--max-side` are predicted at that long side and the result
is resized back to the full image. The architecture comes from the checkpoint; `--classes` guards against
reading its channels as the wrong classes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cpal.backbone import for_inference
from cpal.core.training import CheckpointError, resolve_device
from cpal.data.images import ImageBatches, ImageError, InputImage, LabelWriter, find_images
from cpal.seg.evaluate import predict_batch
from cpal.seg.train import load_segmenter_as_trained

DEFAULT_MAX_SIDE = 512  # the VOC preset's training scale (long side 320-640); larger inputs are predicted at this
SEG_SCALES = [1.0]
CAM_SCALES = [1.0, 0.5, 1.5, 2.0]  # make_seeds' default


def upsample_argmax(probs: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Class ids (H, W) uint8 of (C, h, w) probabilities upsampled bilinearly to `size`, one class at a time
    (a 4000x3000 photo with 81 classes would need 4 GB at once; this needs two planes)."""
    if probs.shape[-2:] == tuple(size):
        return probs.argmax(dim=0).to(torch.uint8).numpy()
    best = torch.full(size, -1.0)
    label = torch.zeros(size, dtype=torch.uint8)
    for c in range(probs.shape[0]):
        plane = F.interpolate(probs[c][None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0]
        better = plane > best
        best[better], label[better] = plane[better], c
    return label.numpy()


@torch.no_grad()
def predict_images(model: torch.nn.Module, classes: list[str], images: list[InputImage], out: Path,
                   scales: list[float], flip: bool, device: torch.device, max_side: int | None, batch_size: int,
                   progress: bool = True) -> dict[str, Any]:
    """DeepLab masks, overlays and areas.csv for `images` into `out`; return counts and the skipped files."""
    model = for_inference(model)
    writer = LabelWriter(out, classes)
    batches = ImageBatches(images, max_side, batch_size, progress, desc="cpal-predict")
    for batch in batches:
        probs = predict_batch(model, [loaded.resized for loaded in batch], scales, flip, device)
        if probs.shape[1] != len(classes):
            raise CheckpointError(f"the model predicts {probs.shape[1]} classes but its class list has {len(classes)}")
        for loaded, p in zip(batch, probs, strict=True):
            writer.write(loaded, upsample_argmax(p, loaded.image.shape[:2]))
    areas = writer.finish()
    return {"images": len(writer.rows), "skipped": batches.skipped, "areas": areas}


def class_list(spec: str) -> list[str]:
    """`--classes`: a dataset.json (its `classes`, as the data stage writes it) or names joined by commas,
    background first, in the order the model was trained with."""
    path = Path(spec)
    if path.suffix == ".json" or path.is_file():
        try:
            return list(json.loads(path.read_text())["classes"])
        except FileNotFoundError:
            raise ImageError(f"--classes: file not found: {path}") from None
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ImageError(f"--classes: {path} holds no class list (expected JSON with 'classes'; {exc})") from exc
    names = [n.strip() for n in spec.split(",")]
    if len(names) < 2 or not all(names):
        raise ImageError(f"--classes {spec!r}: give at least two names (background first) joined by commas")
    return names


def _scales(text: str) -> list[float]:
    values = [float(v) for v in text.split(",")]
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"scales {text!r}: need positive numbers joined by commas")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cpal-predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="*", help="image files and/or folders (searched at any depth); not with --cams")
    p.add_argument("--checkpoint", required=True,
                   help="train_seg model.pt (outputs/seg/model.pt); with --cams a train_cls model.pt")
    p.add_argument("--out", required=True, help="output folder (masks/, overlays/, areas.csv; heatmaps/ with --cams)")
    p.add_argument("--classes", default=None,
                   help="the class list you expect: a dataset.json or names joined by commas, background first; "
                        "a checkpoint trained for another list is refused (default: the checkpoint's own list)")
    p.add_argument("--cams", metavar="TAGS_CSV", default=None,
                   help="CAM mode: a CSV with columns image,labels (class names joined by ';'); image paths are "
                        "relative to the CSV's folder")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--max-side", type=int, default=DEFAULT_MAX_SIDE,
                   help=f"predict at most at this long side in pixels, then resize back (default {DEFAULT_MAX_SIDE}; "
                        "0: full size)")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward (only images of one size share one)")
    p.add_argument("--scales", type=_scales, default=None,
                   help=f"comma-separated test scales (default {','.join(map(str, SEG_SCALES))}; with --cams "
                        f"{','.join(map(str, CAM_SCALES))})")
    p.add_argument("--no-flip", action="store_true", help="do not average with the mirrored image")
    p.add_argument("--bg-threshold", type=float, default=None,
                   help="--cams: background plane of the seed mask (default: PACAM's own background prototype; "
                        "0.45 for a plain CAM classifier)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    """Exit status 0 when every image was written, 1 when some were skipped (listed), 2 on a usage error."""
    p = build_parser()
    args = p.parse_args(argv)
    if bool(args.cams) == bool(args.inputs):
        p.error("give image files/folders, or --cams TAGS_CSV (which lists the images), not both")
    try:
        device = resolve_device(args.device)
    except RuntimeError as exc:  # cuda asked for, none present
        p.error(str(exc))
    try:
        classes = class_list(args.classes) if args.classes else None
        if args.cams:
            from cpal.cls.train import load_classifier_as_trained
            from cpal.seeds.predict import predict_cams, read_tags

            model, meta = load_classifier_as_trained(Path(args.checkpoint), classes, device)
            images = read_tags(Path(args.cams), meta["classes"])
            predict, scales, extra = predict_cams, args.scales or CAM_SCALES, {"bg_threshold": args.bg_threshold}
        else:
            model, meta = load_segmenter_as_trained(Path(args.checkpoint), classes, device)
            images = find_images(args.inputs)
            predict, scales, extra = predict_images, args.scales or SEG_SCALES, {}
        if not images:
            print(f"cpal-predict: no images in {', '.join(args.inputs) or args.cams}", file=sys.stderr)
            return 1
        result = predict(model, meta["classes"], images, Path(args.out), scales, not args.no_flip, device,
                         args.max_side or None, args.batch_size, progress=not args.quiet, **extra)
    except ValueError as exc:  # CheckpointError, ImageError: bad checkpoint, class list or input
        p.error(str(exc))
    print(f"cpal-predict: {result['images']} images on {device} -> {args.out} (masks/, overlays/"
          f"{', heatmaps/' if args.cams else ''}; class areas in {result['areas']})")
    for item, reason in result["skipped"]:
        print(f"skipped {item.path}: {reason}", file=sys.stderr)
    return 1 if result["skipped"] else 0


if __name__ == "__main__":
    sys.exit(main())
