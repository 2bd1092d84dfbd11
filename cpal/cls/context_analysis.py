"""Why the context part adds little: what a trained CPAL model's support bank holds and retrieves.

For the instance prototypes of training images (one scale, no flip, seed-time retrieval: no alignment shift),
per foreground class: cosine of the instance prototype to its nearest bank entry, to the mean of its top-K,
to its own class's bank and to the most similar other class's bank; the cosine between the instance and the
context prototype P^C it retrieves; how far the PACAM prototype moves, ||P - P^I|| / ||P^I||; and how diverse
each bank is (mean pairwise cosine). Writes a markdown table (default results/context_analysis.md).

    python -m cpal.cls.context_analysis --model outputs/train_cls/model.pt --images 200
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cpal.cls.train import load_trained_model
from cpal.core.config import load_params
from cpal.core.io import write_text
from cpal.core.runtime import machine_description
from cpal.data.torch_data import to_tensor
from cpal.data.voc import VOCDataset
from cpal.plugin import (
    cam_with_background,
    context_prototypes,
    instance_prototypes,
    seeds_from_cam,
    similarity,
)


@torch.no_grad()
def analyse(model: torch.nn.Module, dataset: VOCDataset, ids: list[str]) -> dict[str, dict[str, list[float]]]:
    """Per class name: the figures of the module's docstring, one value per instance (bank_pairwise per bank)."""
    cfg = model.cfg
    stats: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    banks = {n: F.normalize(model.bank.get(n).float(), dim=1) for n in range(model.num_classes)
             if int(model.bank.count[n]) > 0}
    for image_id in ids:
        x = to_tensor(dataset.image(image_id))[None]
        labels = torch.from_numpy(dataset.multi_hot(image_id))[None]
        present = labels > 0.5
        stages = model.backbone(x)
        cam = cam_with_background(model.classifier(stages[3]), present)
        present_all = F.pad(present, (1, 0), value=True)
        feats = model.hierarchical_features(stages)
        sem = stages[3] if cfg.seed_mode == "structure" else None  # the seeds the model trained with
        seeds = seeds_from_cam(cam, present_all, features=sem, bg_scale=cfg.seed_bg_scale)
        inst, counts = instance_prototypes(feats, seeds, cam.shape[1])
        for n in range(1, cam.shape[1]):
            if not present_all[0, n] or counts[0, n] == 0 or (n - 1) not in banks:
                continue
            name = dataset.classes[n]
            p = inst[0, n].float()
            pn = F.normalize(p, dim=0)
            own = banks[n - 1] @ pn
            k = min(cfg.K, own.numel())
            picked = similarity(p[None], model.bank.get(n - 1).float(), cfg.metric)[0].topk(k).indices  # retrieval
            ctx = context_prototypes(p[None], model.bank.get(n - 1).float(), cfg.K, cfg.metric, cfg.temperature,
                                     cfg.tau, cfg.use_positiveness)[0]
            mixed = (1 - cfg.context_weight) * p + cfg.context_weight * ctx
            others = [float((banks[m] @ pn).mean()) for m in banks if m != n - 1]
            stats[name]["nearest"].append(float(own.max()))
            stats[name]["top_k"].append(float(own[picked].mean()))
            stats[name]["own_bank"].append(float(own.mean()))
            stats[name]["other_bank_max"].append(max(others) if others else float("nan"))
            stats[name]["instance_vs_context"].append(float(F.cosine_similarity(p, ctx, dim=0)))
            stats[name]["relative_move"].append(float((mixed - p).norm() / p.norm().clamp_min(1e-8)))
    for n, keys in banks.items():
        sims = keys @ keys.T
        off = sims[~torch.eye(len(keys), dtype=torch.bool)]
        stats[dataset.classes[n + 1]]["bank_pairwise"].append(float(off.mean()) if off.numel() else float("nan"))
    return stats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cpal.cls.context_analysis", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--data", default="data/embedded")
    p.add_argument("--model", required=True, help="a train_cls checkpoint of method cpal")
    p.add_argument("--images", type=int, default=200, help="first N images of the seed split")
    p.add_argument("--out", default="results/context_analysis.md")
    args = p.parse_args(argv)
    params = load_params(args.params)
    dataset = VOCDataset(args.data, params["seeds"]["split"])
    model = load_trained_model(Path(args.model), params, dataset, torch.device("cpu"))
    if model.cfg.method != "cpal":
        raise SystemExit(f"{args.model}: method {model.cfg.method!r}; the analysis needs a cpal model (its bank)")
    stats = analyse(model, dataset, dataset.ids[:args.images])
    cols = ("nearest", "top_k", "own_bank", "other_bank_max", "instance_vs_context", "relative_move", "bank_pairwise")
    lines = [
        "# What the support bank holds and retrieves",
        "",
        f"Machine: {machine_description()}. One trained model ({args.model}, `run.seed` "
        f"{params['run']['seed']}), the first {args.images} images of the `{params['seeds']['split']}` split, one "
        f"scale, retrieval as at seed time (no alignment shift). K {model.cfg.K}, bank size "
        f"{model.cfg.bank_size}, metric {model.cfg.metric}, context weight {model.cfg.context_weight}.",
        "",
        "Reproduce: `python -m cpal.cls.context_analysis "
        + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])) + "`",
        "",
        "Cosines of an image's instance prototype P^I: to its nearest bank entry, to the top-K it retrieves",
        "(ranked by the retrieval metric), to "
        "its own class's bank (mean) and to the closest other class's bank (mean); cosine of P^I to the context",
        "prototype P^C it retrieves; relative move of the PACAM prototype, ||P - P^I|| / ||P^I||; mean pairwise",
        "cosine inside the class's bank. Means over the instances (± std).",
        "",
        "| class | instances | " + " | ".join(cols) + " |",
        "| --- | --- | " + " | ".join("---" for _ in cols) + " |",
    ]
    for name in sorted(stats):
        s = stats[name]
        cells = []
        for c in cols:
            v = np.array(s.get(c, []), dtype=float)
            spread = f" ± {v.std():.3f}" if v.size > 1 else ""
            cells.append(f"{v.mean():.3f}{spread}" if v.size else "–")
        lines.append(f"| {name} | {len(s.get('nearest', []))} | " + " | ".join(cells) + " |")
    write_text(args.out, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
