"""CPAL added to your own CAM classifier: a timm backbone, a 1x1-conv CAM head, and the plug-in's L_self.

The lines between the two markers are all a host writes; docs/plugin.md explains each. Runs on any
VOC-layout folder (JPEGImages/, ImageSets/Segmentation/<split>.txt, masks or a labels file), e.g. the
embedded dataset the pipeline generates:

    python examples/cpal_in_timm.py --data data/embedded --steps 50 --out outputs/example
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from cpal.data.torch_data import ClassificationData  # the project's loader; any (images, multi-hot) loader works
from cpal.data.voc import VOCDataset


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="a VOC-layout dataset folder")
    p.add_argument("--split", default="train")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", type=Path, default=Path("outputs/example"))
    args = p.parse_args(argv)
    dataset = VOCDataset(args.data, args.split)
    loader = torch.utils.data.DataLoader(ClassificationData(dataset, 128, (0.9, 1.1), seed=0),
                                         batch_size=args.batch_size, shuffle=True, drop_last=True)
    num_classes = dataset.num_classes - 1  # foreground classes
    torch.manual_seed(0)

    # ---- your code with CPAL: from here ----
    import timm
    import torch.nn.functional as F
    from torch import nn

    from cpal.plugin import ContextPrototypes

    class Host(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = timm.create_model("resnet18", pretrained=False, features_only=True, out_indices=[4])
            width = self.backbone.feature_info.channels()[-1]
            self.cam_head = nn.Conv2d(width, num_classes, 1, bias=False)
            self.cpal = ContextPrototypes(num_classes, feature_dim=width, cfg={"K": 5, "bank_size": 100})

        def forward(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            feats = self.backbone(x)[-1]
            maps = self.cam_head(feats)  # raw class activation maps (B, N, h, w)
            logits = F.adaptive_avg_pool2d(maps, 1).flatten(1)
            out = self.cpal(F.normalize(feats.detach(), dim=1), maps, labels)  # PACAM + L_self; bank updated
            return logits, out.loss_self

    model = Host()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step, (images, labels, _valid, _index) in zip(range(args.steps), loader, strict=False):
        logits, loss_self = model(images, labels)
        loss = F.multilabel_soft_margin_loss(logits, labels) + 0.5 * loss_self
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 10 == 0:
            print(f"step {step}: loss {loss.item():.4f} (L_self {loss_self.item():.4f})")
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out / "host.pt")  # the support bank is in it: cpal.bank.*
    # ---- to here ----
    return float(loss.detach())


if __name__ == "__main__":
    main()
