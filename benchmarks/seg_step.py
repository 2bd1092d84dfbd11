"""Milliseconds per DeepLab training step (forward, backward, AdamW step) for the encoder dilated or not and
the ASPP-v2 1x1 shortcut on or off: what `seg.dilated: false` and the shortcut buy on this machine.

Not a test. Random images and labels of the training crop's size (the step's cost does not depend on the
values); the best of `--repeats` means over 10 steps after 2 warm-up steps, alone on the machine.

    python benchmarks/seg_step.py --threads 2
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from cpal.backbone import ASPPv2
from cpal.core.runtime import keep_freed_memory, machine_description
from cpal.core.training import channels_last
from cpal.report.bench import optimizer_step, timed
from cpal.seg.model import build_segmenter


def _full_branch(conv: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return conv(x)


def step_ms(dilated: bool, shortcut: bool, batch: int, crop: int, repeats: int, classes: int = 7) -> float:
    """Best mean step time (ms) of a Lite0 / ASPP-v2 DeepLab with ImageNet weights, channels_last as train_seg."""
    shortcut_branch = ASPPv2.__dict__["_branch"]
    ASPPv2._branch = shortcut_branch if shortcut else staticmethod(_full_branch)
    try:
        torch.manual_seed(0)
        cfg = {"backbone": "efficientnet_lite0", "head": "v2", "init": "imagenet", "dilated": dilated}
        model = channels_last(build_segmenter(cfg, classes)).train()
        x = channels_last(torch.randn(batch, 3, crop, crop))
        y = torch.randint(0, classes, (batch, crop, crop))
        step = optimizer_step(lambda: F.cross_entropy(model(x), y), torch.optim.AdamW(model.parameters(), lr=1e-4))
        means = []
        for _ in range(repeats):
            times = timed(step, 12)[2:]  # the first two: warm-up
            means.append(sum(times) / len(times))
        return 1000 * min(means)
    finally:
        ASPPv2._branch = shortcut_branch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=8, help="seg.batch_size")
    p.add_argument("--crop", type=int, default=96, help="seg.crop_size")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    print(f"{machine_description()}; {args.threads} threads, batch {args.batch}, crop {args.crop}\n")
    print("| seg.dilated | ASPP 1x1 shortcut | ms per step |\n| --- | --- | --- |")
    for dilated in (True, False):
        for shortcut in (False, True):
            ms = step_ms(dilated, shortcut, args.batch, args.crop, args.repeats)
            print(f"| {str(dilated).lower()} | {'on' if shortcut else 'off'} | {ms:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
