"""Write configs/voc12.yaml, coco14.yaml, embedded_gpu.yaml and folder_example.yaml from params.yaml plus the
overrides below.

Presets are complete params files; deriving them keeps every new key of params.yaml in them.
tests/test_config.py checks that the committed presets equal what this script writes.

    python scripts/make_presets.py            # rewrite the three presets
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from cpal.core.config import merge, validate_params

ROOT = Path(__file__).resolve().parents[1]

VOC12 = {
    # SIPE's own settings where CPAL is silent (docs/method.md); the embedded default measured otherwise
    "params": {"bank_size": 1000, "seed_mode": "structure", "seed_bg_scale": 0.5, "lambda_self": 1.0,
               "center_features": False},
    "data": {"source": "voc12", "dir": "data/voc12", "voc12": {"root": None, "download_dir": "data/downloads"}},
    "train_cls": {"backbone": "resnet50", "pretrained": True, "output_stride": 16, "freeze_stages": 2,
                  "freeze_bn": True, "grad_clip": 1.0, "mask_padding": True, "epochs": 5, "batch_size": 16,
                  "optimizer": "sgd",
                  "lr": 0.1, "new_layer_lr_mult": 10.0, "momentum": 0.9, "weight_decay": 1.0e-4, "warmup_steps": 0,
                  "crop_size": 512, "scale_range": [0.625, 1.25], "cache_images": False, "train_split": "train_aug",
                  "val_split": "val"},
    # Pseudo-masks are made for the split DeepLab trains on; seed mIoU is then reported on train_aug
    # (a superset of VOC train, where the paper reports it; SBD masks are coarser than VOC's).
    "seeds": {"split": "train_aug", "scales": [1.0, 0.5, 1.5, 2.0], "flip": True, "batch_size": 4},
    "seg": {"backbone": "resnet101", "head": "v2", "init": "imagenet", "dilated": True, "optimizer": "sgd",
            "epochs": 20, "iterations": 20000, "batch_size": 10, "crop_size": 321, "scale_range": [0.5, 1.5],
            "lr": 2.5e-4, "head_lr_mult": 10.0, "momentum": 0.9, "weight_decay": 5.0e-4, "poly_power": 0.9,
            "cache_images": False, "train_split": "train_aug", "val_split": "val", "scales": [1.0, 0.75, 0.5],
            "flip": False},
    "irn": {"fg_threshold": 0.30, "bg_threshold": 0.05, "backbone_from": "imagenet", "radius": 10, "crop": 512,
            "batch_size": 32, "epochs": 3, "walk_radius": 5, "exp_times": 8, "sem_seg_bg_thres": 0.25},
    # AMN's own settings (github gaviotas/AMN), its dropout-at-inference quirk included; L_self weighted as SIPE's
    "amn": {"backbone": "resnet50", "crop_size": 512, "keep_dropout_at_inference": True, "lambda_self": 1.0,
            "scales": [1.0, 0.5, 1.5, 2.0]},
    "run": {"device": "auto", "num_workers": 8, "torch_threads": 0},
}
COCO14 = {
    "data": {"source": "coco14", "dir": "data/coco14", "coco14": {"root": None, "download_dir": "data/downloads"}},
    "train_cls": {"train_split": "train", "val_split": "val"},
    "seeds": {"split": "train"},
    "seg": {"train_split": "train"},
}
# The embedded data scaled for one GPU: the method's settings stay the default's (so a difference from the
# 128 px runs comes from the scale alone); only sizes, batches, AMP and workers change. None of it is
# measured on a GPU yet (benchmarks/gpu.sh measures it; results/gpu.md).
EMBEDDED_GPU = {
    "data": {"dir": "data/embedded_gpu", "embedded": {"image_size": 320, "n_train": 8000, "n_val": 1000}},
    "train_cls": {"crop_size": 320, "batch_size": 64, "lr": 0.001, "warmup_steps": 125, "cache_images": False,
                  "amp": True},
    "seeds": {"batch_size": 32, "amp": True},
    "irn": {"crop": 320, "batch_size": 32, "walk_radius": 5, "exp_times": 8, "amp": True},
    "seg": {"crop_size": 240, "batch_size": 32, "cache_images": False, "amp": True},
    "run": {"device": "cuda", "num_workers": 12, "torch_threads": 4},
}
EMBEDDED_GPU_HEAD = """\
# Preset: the embedded dataset scaled for one GPU (written for an H200: 16 CPU cores, 140 GB).
# 8,000 + 1,000 generated images of 320 px, crop 320 = the image, as the paper's crop 512 covers a VOC image:
# at output stride 16 the CAM grid is 20x20 (8x8 at the 128 px default), closer to VOC's 32x32.
# Method settings are the embedded default's, so a difference from the 128 px runs comes from the scale.
# Lite0 with ImageNet weights, AMP on (train_cls, make_seeds, train_irn, DeepLab), batch 64 at lr 1e-3
# (the default's 32 at 5e-4, scaled linearly), warm-up one epoch (125 steps, as the default's 25),
# no image cache (12 loader workers decode instead), IRN crop 320 with IRN's walk (radius 5, 2^8 steps),
# DeepLab crop 240 (the default's 96/128), batch 32. run.device cuda: on a CPU machine it stops at once.
# NOT YET MEASURED ON A GPU: sizes, batches, learning rate, workers and AMP are choices, not results;
# benchmarks/gpu.sh measures them (results/gpu.md). Run it with either engine:
#   snakemake --cores 16 --configfile configs/embedded_gpu.yaml
#   cp configs/embedded_gpu.yaml params.yaml && dvc repro
# Generated by scripts/make_presets.py from params.yaml: edit the script, not this file.
"""
# Your own photos (README, "Your own data"): edit the three paths / names, keep the rest. Without masks
# nothing can tune a threshold on ground truth, so the two the default chain uses are derived from the
# seeds themselves (Otsu; docs/method.md, "Without ground truth"), as the IRN planes already are.
FOLDER = {
    "data": {"source": "folder", "dir": "data/folder",
             "folder": {"images": "my_photos", "labels": "my_photos/tags.csv", "classes": ["cat", "dog"],
                        "masks": None, "val_fraction": 0.2, "max_side": 512}},
    "crf": {"bg_threshold": "auto"},
    "pseudo": {"bg_threshold": "auto"},
}
VOC_HEAD = """\
# Preset: PASCAL VOC 2012 + SBD (train_aug, 10,582 images), the paper's CAM-based setting.
# ResNet-50 with ImageNet weights, crop 512, random long-side resize 320-640, 5 epochs, batch 16,
# SGD lr 0.1 (x10 on new layers), weight decay 1e-4, poly schedule (IRN / SIPE);
# support bank of 1000 prototypes per class (paper). Seeds and pseudo-masks on train_aug (the paper reports
# seed mIoU on VOC train, a 1,464-image subset). DeepLab-v2 ASPP on ResNet-101 (ImageNet), deeplab-pytorch's
# schedule (20k iterations, batch 10, crop 321, lr 2.5e-4); its COCO-segmentation init is not used.
# Needs a GPU for reasonable times. Run it with either engine:
#   snakemake --cores 8 --configfile configs/voc12.yaml      (add --use-conda with conda)
#   cp configs/voc12.yaml params.yaml && dvc repro
# data.voc12.root: point it at an existing VOC copy to skip the download (see docs/real-data.md).
# Generated by scripts/make_presets.py from params.yaml: edit the script, not this file.
"""
COCO_HEAD = """\
# Preset: MS COCO 2014 (81 classes with background), the VOC preset's classifier recipe.
# Needs a GPU and about 20 GB of disk for the images. Run it with either engine:
#   snakemake --cores 8 --configfile configs/coco14.yaml
#   cp configs/coco14.yaml params.yaml && dvc repro
# Generated by scripts/make_presets.py from params.yaml: edit the script, not this file.
"""
FOLDER_HEAD = """\
# Preset: your own photos and tags (data.source: folder), the embedded default's CPU recipe otherwise.
# Copy it, set data.folder.images / labels / classes (and masks, if you have any), then run:
#   snakemake --cores 2 --configfile my.yaml        (or: cp my.yaml params.yaml && dvc repro)
# Tags CSV: header image,labels[,split]; image = path inside data.folder.images, labels = class names joined
# by ';'. Without masks every evaluation records "no ground truth" and the upper bound is skipped; the
# thresholds are derived without masks (auto). README, "Your own data", and docs/own-data.md have the details.
# Generated by scripts/make_presets.py from params.yaml: edit the script, not this file.
"""


def presets(base: dict) -> dict[str, str]:
    """File name -> text of each preset."""
    voc = validate_params(merge(base, VOC12))
    coco = merge(voc, COCO14)
    coco["data"].pop("voc12")
    validate_params(coco)
    gpu = validate_params(merge(base, EMBEDDED_GPU))
    folder = merge(base, FOLDER)
    folder["data"].pop("embedded")
    validate_params(folder)
    dump = lambda cfg: yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None, allow_unicode=True)  # noqa: E731
    return {"voc12.yaml": VOC_HEAD + dump(voc), "coco14.yaml": COCO_HEAD + dump(coco),
            "embedded_gpu.yaml": EMBEDDED_GPU_HEAD + dump(gpu), "folder_example.yaml": FOLDER_HEAD + dump(folder)}


def main() -> int:
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    for name, text in presets(base).items():
        (ROOT / "configs" / name).write_text(text)
        print(f"wrote configs/{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
