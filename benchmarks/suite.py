"""Performance suite: results/benchmarks.md (and .json), every figure measured side by side in one run.

Not a test. Measures the parts of a finished run of the pipeline (`--artifacts`: a folder where `bash run.sh` or
`dvc repro` ran; default this checkout), each `--repeats` times (medians quoted):

- train_cls images/s (the real training loop, one epoch per repeat) and its FLOP/s (FLOPs of one
  training step counted by torch's FlopCounterMode, x images/s) against a dense float32
  matrix-multiply FLOP/s measured in the same run;
- make_seeds images/s, batched (the stage) against a naive per-image, per-scale, per-flip loop, with
  the largest difference between their maps;
- CRF images/s with 1 and 2 workers; IRN random walk seconds per image; evaluation throughput;
- per stage of that run: wall time (process start to exit, imports included) and peak RSS, from its stage logs.

Whole runs are timed as DVC experiments instead (`s_` and `mib_` rows of cpal-bench, docs/results.md).

    bash run.sh && python benchmarks/suite.py       # the parts: about 25 min on 2 CPU cores
    python benchmarks/suite.py --artifacts /tmp/fresh --repeats 3 --before results/benchmarks.json
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cpal.backbone import for_inference
from cpal.core.io import write_json, write_text
from cpal.core.runtime import keep_freed_memory, machine_description
from cpal.core.training import channels_last
from cpal.report.bench import optimizer_step, stage_costs, timed

ROOT = Path(__file__).resolve().parents[1]
LOG = logging.getLogger("benchmarks")


def covered_seconds(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of intervals (stages may run in parallel)."""
    total, current_start, current_end = 0.0, None, None
    for start, end in sorted(intervals):
        if current_end is None or start > current_end:
            if current_end is not None:
                total += current_end - current_start
            current_start, current_end = start, end
        else:
            current_end = max(current_end, end)
    if current_end is not None:
        total += current_end - current_start
    return total



# ---------------------------------------------------------------------------------------------------
# Parts


def matmul_flops(repeats: int, n: int = 2048) -> dict[str, Any]:
    """Dense n x n x n float32 GEMM two ways: torch.mm (BLAS: MKL in these wheels) and the same GEMM as a
    1x1 convolution (oneDNN, the library the training convolutions use). MKL is slow on AMD CPUs, so the
    faster of the two is the machine's reference."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up
    mm = timed(lambda: torch.mm(a, b), max(repeats, 5))
    x, w = torch.randn(1, n, 32, n // 32), torch.randn(n, n, 1, 1)  # (C_out x C_in) . (C_in x 32 * n/32)
    torch.nn.functional.conv2d(x, w)
    conv = timed(lambda: torch.nn.functional.conv2d(x, w), max(repeats, 5))
    rates = {"mm": 2 * n ** 3 / statistics.median(mm), "conv1x1": 2 * n ** 3 / statistics.median(conv)}
    return {"n": n, "seconds": mm, "conv1x1_seconds": conv, "mm_flops_per_s": rates["mm"],
            "conv1x1_flops_per_s": rates["conv1x1"], "flops_per_s": max(rates.values())}


def training_flops_per_image(params: dict[str, Any], data_dir: Path) -> float:
    """FLOPs (forward + backward) of one training step per image, with the real model and batch size."""
    from torch.utils.flop_counter import FlopCounterMode

    from cpal.cls.train import build_model
    from cpal.data.voc import VOCDataset

    cfg = params["train_cls"]
    dataset = VOCDataset(data_dir, cfg["train_split"])
    model = build_model(params, dataset.num_classes - 1)
    model.train()
    batch = cfg["batch_size"]
    images = torch.randn(batch, 3, cfg["crop_size"], cfg["crop_size"])
    labels = torch.zeros(batch, dataset.num_classes - 1)
    labels[torch.arange(batch), torch.arange(batch) % (dataset.num_classes - 1)] = 1
    model(images, labels)  # fill the bank a little so the CPAL branch does its retrieval
    with FlopCounterMode(display=False) as counter:
        out = model(images, labels)
        out["loss"].backward()
    return counter.get_total_flops() / batch


def train_images_per_s(params: dict[str, Any], data_dir: Path, work: Path, epochs: int) -> list[float]:
    """Images/s of each epoch of the real training loop (data loading and the optimizer included)."""
    from cpal.cls.train import train_classifier
    from cpal.data.voc import VOCDataset

    p = json.loads(json.dumps(params))
    p["train_cls"]["epochs"] = epochs
    out = work / "bench_train"
    shutil.rmtree(out, ignore_errors=True)
    train_classifier(p, data_dir, out, LOG, progress=False)
    seconds = json.loads((out / "timing.json").read_text())["epoch_seconds"]
    batch = p["train_cls"]["batch_size"]
    images = len(VOCDataset(data_dir, p["train_cls"]["train_split"])) // batch * batch
    return [images / s for s in seconds]


def subset_split(data_dir: Path, split: str, n: int, name: str) -> str:
    ids = (data_dir / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()[:n]
    (data_dir / "ImageSets" / "Segmentation" / f"{name}.txt").write_text("\n".join(ids) + "\n")
    return name


@torch.no_grad()
def naive_seeds(model, dataset, cfg: dict[str, Any]) -> dict[str, dict[str, np.ndarray]]:
    """The loop a first implementation writes: one image, one scale, one flip at a time."""
    import torch.nn.functional as F

    from cpal.data.torch_data import image_batch

    out = {}
    for image_id in dataset.ids:
        image = image_batch([dataset.image(image_id)])  # as the stage
        labels = torch.from_numpy(dataset.multi_hot(image_id))[None]
        keys = dataset.labels(image_id)
        size = image.shape[2:]
        sums: dict[str, torch.Tensor] = {}
        for scale in cfg["scales"]:
            x = image if scale == 1.0 else F.interpolate(image, scale_factor=scale, mode="bilinear",
                                                         align_corners=False, recompute_scale_factor=False)
            for flip in ([False, True] if cfg["flip"] else [False]):
                view = x.flip(-1) if flip else x
                cam, pacam = model.infer(view, labels, align=False)  # as make_seeds (cpal/seeds/make.py)
                maps = {"cam": cam} if pacam is None else {"cam": cam, "pacam": pacam[:, 1:]}
                for kind, m in maps.items():
                    m = F.interpolate(m.float(), size=size, mode="bilinear", align_corners=False)
                    m = m.flip(-1) if flip else m
                    sums[kind] = m if kind not in sums else sums[kind] + m
        result = {}
        for kind, m in sums.items():
            sel = m[0][torch.as_tensor(keys - 1, dtype=torch.long)]
            peak = sel.flatten(1).amax(dim=1).clamp_min(1e-5)[:, None, None]
            result[kind] = (sel / peak).clamp(0, 1).numpy()
        out[image_id] = result
    return out


def seeds_batched_vs_naive(params: dict[str, Any], ws: Path, n: int, repeats: int) -> dict[str, Any]:
    from cpal.cls.train import load_trained_model
    from cpal.data.voc import VOCDataset
    from cpal.seeds.make import make_seeds
    from cpal.seeds.store import load_seeds, seed_path

    data_dir = ws / params["data"]["dir"]
    split = subset_split(data_dir, params["seeds"]["split"], n, "bench_seeds")
    dataset = VOCDataset(data_dir, split)
    model = load_trained_model(ws / "outputs" / "train_cls" / "model.pt", params, dataset, torch.device("cpu"))
    out = ws / "outputs" / "bench_seeds"
    batched = timed(lambda: make_seeds(model, dataset, out, params["seeds"], torch.device("cpu"), LOG,
                                       progress=False), repeats)
    naive_maps: dict = {}
    prepared = for_inference(model)  # as make_seeds runs it: the ratio is batching alone
    naive = timed(lambda: naive_maps.update(naive_seeds(prepared, dataset, params["seeds"])), repeats)
    diff = 0.0
    for image_id, maps in naive_maps.items():
        stored = load_seeds(seed_path(out, image_id))
        for kind, m in maps.items():  # stored as float16: compare at that precision
            diff = max(diff, float(np.abs(stored[kind].astype(np.float32) - m.astype(np.float16)).max()))
    b, v = statistics.median(batched), statistics.median(naive)
    return {"images": n, "batched_s": batched, "naive_s": naive, "batched_images_per_s": n / b,
            "naive_images_per_s": n / v, "speedup": v / b, "max_abs_diff": diff,
            "batch_size": params["seeds"]["batch_size"]}


def bare_seed_forward(params: dict[str, Any], ws: Path, n: int, repeats: int) -> list[float]:
    """make_seeds' own limit: only the backbone's forward over the same batches, scales and flips."""
    import torch.nn.functional as F

    from cpal.cls.train import load_trained_model
    from cpal.data.torch_data import image_batch
    from cpal.data.voc import VOCDataset
    from cpal.seeds.make import seed_views

    data_dir = ws / params["data"]["dir"]
    dataset = VOCDataset(data_dir, subset_split(data_dir, params["seeds"]["split"], n, "bench_seeds"))
    model = load_trained_model(ws / "outputs" / "train_cls" / "model.pt", params, dataset, torch.device("cpu"))
    cfg = params["seeds"]
    model = for_inference(model)  # as the stage runs it (cpal/seeds/make.py): folded BatchNorm, channels_last
    batches = [image_batch(dataset.image(i) for i in ids) for ids in dataset.size_batches(cfg["batch_size"])]

    def run() -> None:
        with torch.inference_mode():
            for images in batches:
                for scale in cfg["scales"]:
                    x = images if scale == 1.0 else F.interpolate(images, scale_factor=scale, mode="bilinear",
                                                                  align_corners=False, recompute_scale_factor=False)
                    for view in seed_views(x, cfg["flip"]):
                        model.backbone(view)

    run()  # warm-up
    return timed(run, repeats)


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [q for q in model.parameters() if q.requires_grad]


def step_ratios(params: dict[str, Any], data_dir: Path, repeats: int, steps: int = 4) -> dict[str, Any]:
    """Seconds per training step: the configured method's, plain CAM's and the bare backbone's forward and
    backward, same backbone, batch and crop (random images, real image labels); optimizer step included
    for the two methods, as in the training loop."""
    from cpal.cls.train import build_model
    from cpal.data.voc import VOCDataset

    cfg = params["train_cls"]
    dataset = VOCDataset(data_dir, cfg["train_split"])
    batch, crop = cfg["batch_size"], cfg["crop_size"]
    gen = torch.Generator().manual_seed(0)
    images = channels_last(torch.randn(batch, 3, crop, crop, generator=gen))  # the stage's layout
    labels = torch.from_numpy(np.stack([dataset.multi_hot(i) for i in dataset.ids[:batch]]))
    out: dict[str, Any] = {"batch": batch, "crop": crop, "steps": steps}
    bare = None
    for method in dict.fromkeys(("cam", params["params"]["method"])):
        p = json.loads(json.dumps(params))
        p["params"]["method"] = method
        torch.manual_seed(0)
        model = channels_last(build_model(p, dataset.num_classes - 1)).train()
        step = optimizer_step(lambda model=model: model(images, labels)["loss"],
                              torch.optim.AdamW(trainable(model), lr=1e-7))
        for _ in range(2):  # warm-up; fills the CPAL bank
            step()
        out[f"{method}_step_s"] = [t / steps for t in timed(lambda step=step: [step() for _ in range(steps)],
                                                             repeats)]
        if bare is None:
            backbone = model.backbone

            def fwd_bwd(backbone=backbone) -> None:
                feats = backbone(images)
                sum(f.float().mean() for f in feats).backward()

            fwd_bwd()
            bare = [t / steps for t in timed(lambda: [fwd_bwd() for _ in range(steps)], repeats)]
    out["bare_step_s"] = bare
    method = params["params"]["method"]
    out["method"] = method
    out["method_over_cam"] = med(out[f"{method}_step_s"]) / med(out["cam_step_s"])
    out["bare_over_cam"] = med(bare) / med(out["cam_step_s"])
    return out


def hotspots(fn, top: int = 6) -> list[dict[str, Any]]:
    """The operators with the most self CPU time in one call of `fn` (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    fn()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return [{"op": e.key, "self_ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total,
             "calls": e.count} for e in events[:top]]


def stage_hotspots(params: dict[str, Any], ws: Path) -> dict[str, list[dict[str, Any]]]:
    """Profiles of one unit of work of each network stage on the run's artifacts."""
    from cpal.cls.train import build_model, load_trained_model
    from cpal.data.torch_data import image_batch
    from cpal.data.voc import VOCDataset
    from cpal.irn.labels import IGNORE
    from cpal.irn.path_index import PathIndex
    from cpal.irn.train import affinity_loss, build_boundary_net, runnable
    from cpal.seeds.make import multiscale_maps
    from cpal.seg.model import build_segmenter
    from cpal.seg.train import seg_config

    data_dir = ws / params["data"]["dir"]
    dataset = VOCDataset(data_dir, params["seeds"]["split"])
    out: dict[str, list[dict[str, Any]]] = {}
    cfg = params["train_cls"]
    batch, crop = cfg["batch_size"], cfg["crop_size"]
    images = image_batch(dataset.image(i) for i in dataset.ids[:batch])  # as the stages
    labels = torch.from_numpy(np.stack([dataset.multi_hot(i) for i in dataset.ids[:batch]]))
    model = channels_last(build_model(params, dataset.num_classes - 1)).train()
    cls_step = optimizer_step(lambda: model(images[:, :, :crop, :crop], labels)["loss"],
                              torch.optim.AdamW(trainable(model), lr=1e-7))
    out[f"train_cls ({params['params']['method']} step, batch {batch})"] = hotspots(cls_step)
    trained = load_trained_model(ws / "outputs" / "train_cls" / "model.pt", params, dataset, torch.device("cpu"))
    sb = params["seeds"]["batch_size"]
    trained, seed_images = for_inference(trained), channels_last(images[:sb])  # as make_seeds
    out[f"make_seeds (one batch of {sb}, every scale and flip)"] = hotspots(
        lambda: multiscale_maps(trained, seed_images, labels[:sb], params["seeds"]["scales"], params["seeds"]["flip"]))
    net, _ = build_boundary_net(params, ws / "outputs" / "train_cls" / "model.pt")
    net = runnable(net)[0].train()  # as train_irn runs it
    index = PathIndex.of(params["irn"]["radius"])
    ib = params["irn"]["batch_size"]
    grid = torch.full((ib, images.shape[2] // 4, images.shape[3] // 4), IGNORE, dtype=torch.long)
    grid[:, ::2] = 0
    grid[:, 1::2] = 1
    irn_step = optimizer_step(lambda: affinity_loss(net, images[:ib], grid, index)["loss"],
                              torch.optim.SGD(net.head_parameters(), lr=1e-7))
    out[f"train_irn (step, batch {ib})"] = hotspots(irn_step)
    scfg = seg_config(params)
    seg = channels_last(build_segmenter(scfg, dataset.num_classes)).train()
    scrop, sbatch = scfg["crop_size"], scfg["batch_size"]
    target = torch.randint(0, dataset.num_classes, (sbatch, scrop, scrop))
    seg_step = optimizer_step(
        lambda: torch.nn.functional.cross_entropy(seg(channels_last(images[:sbatch, :, :scrop, :scrop])), target,
                                                  ignore_index=255),
        torch.optim.AdamW(seg.parameters(), lr=1e-7))
    out[f"train_seg (step, batch {sbatch}, {scrop} px)"] = hotspots(seg_step)
    return out


def stage_rates(ws: Path) -> dict[str, float]:
    """Throughput each stage recorded in its own timing file during the pipeline run (absent: left out)."""
    def read(rel: str) -> dict[str, Any]:
        path = ws / rel
        return json.loads(path.read_text()) if path.is_file() else {}

    rates = {
        "train_cls images/s": read("outputs/train_cls/timing.json").get("images_per_s"),
        "make_seeds images/s": read("outputs/seeds/timing.json").get("images_per_s"),
        "refine_crf images/s": (1 / t if (t := read("outputs/crf/timing.json").get("wall_seconds_per_image"))
                                else None),
        "train_irn images/s": read("outputs/irn/timing.json").get("images_per_s"),
        "refine_irn images/s (boundary + walk)": (1 / t if (t := read("outputs/irn/refine_timing.json")
                                                              .get("seconds_per_image")) else None),
        "train_seg images/s": read("outputs/seg/timing.json").get("images_per_s"),
        "train_seg_full images/s": read("outputs/seg_full/timing.json").get("images_per_s"),
    }
    return {k: float(v) for k, v in rates.items() if v}


def crf_workers(params: dict[str, Any], ws: Path, repeats: int) -> dict[str, Any]:
    from cpal.crf.refine import refine_with_crf
    from cpal.data.voc import VOCDataset
    from cpal.seeds.store import resolve_map

    data_dir = ws / params["data"]["dir"]
    dataset = VOCDataset(data_dir, params["seeds"]["split"])
    cfg = resolve_map(params["crf"], params["params"]["method"])
    result = {"images": len(dataset)}
    for workers in (1, 2):
        out = ws / "outputs" / f"bench_crf_{workers}"
        times = [refine_with_crf(dataset, ws / "outputs" / "seeds" / "maps", out, cfg, workers, LOG,
                                 progress=False)["wall_seconds"] for _ in range(repeats)]
        result[f"workers_{workers}_s"] = times
        result[f"workers_{workers}_images_per_s"] = len(dataset) / statistics.median(times)
    result["speedup_2_over_1"] = result["workers_2_images_per_s"] / result["workers_1_images_per_s"]
    return result


def random_walk(params: dict[str, Any], ws: Path, n: int, repeats: int) -> dict[str, Any]:
    from cpal.irn.refine import refine_irn

    p = json.loads(json.dumps(params))
    data_dir = ws / params["data"]["dir"]
    p["seeds"]["split"] = subset_split(data_dir, params["seeds"]["split"], n, "bench_irn")
    walks, totals = [], []
    for r in range(repeats):
        timing = refine_irn(p, data_dir, ws / "outputs" / "seeds" / "maps", ws / "outputs" / "irn" / "model.pt",
                            ws / "outputs" / f"bench_irn_{r}", LOG, progress=False)
        walks.append(timing["walk_seconds_per_image"])
        totals.append(timing["seconds_per_image"])
    return {"images": n, "walk_s_per_image": walks, "total_s_per_image": totals,
            "walk_s_per_image_median": statistics.median(walks)}


def evaluation(params: dict[str, Any], ws: Path, repeats: int) -> dict[str, Any]:
    from cpal.data.voc import VOCDataset
    from cpal.pseudo.labels import evaluate_pseudo_labels
    from cpal.seeds.evaluate import evaluate_seeds, thresholds_from

    data_dir = ws / params["data"]["dir"]
    dataset = VOCDataset(data_dir, params["seeds"]["split"])
    thresholds = thresholds_from(params["seeds"])
    seeds = timed(lambda: evaluate_seeds(dataset, ws / "outputs" / "seeds" / "maps", thresholds, LOG,
                                         progress=False), repeats)
    masks = timed(lambda: evaluate_pseudo_labels(dataset, ws / "outputs" / "crf" / "maps"), repeats)
    return {"images": len(dataset), "thresholds": len(thresholds),
            "seed_eval_images_per_s": len(dataset) / statistics.median(seeds),
            "mask_eval_images_per_s": len(dataset) / statistics.median(masks),
            "seed_eval_s": seeds, "mask_eval_s": masks}


# ---------------------------------------------------------------------------------------------------
# Report


def med(values: list[float]) -> float:
    return float(statistics.median(values))


def goals_of(r: dict[str, Any]) -> list[tuple[str, str, str, bool]]:
    """(goal, measured, target, met) of one result (this run's, or an earlier --before one)."""
    parts = r["parts"]
    seeds, steps = parts["seeds"], parts["steps"]
    method = steps["method"]
    goals = [
        ("make_seeds batched vs naive loop", f"{seeds['speedup']:.2f}x (max map difference "
         f"{seeds['max_abs_diff']:.1e})", ">= 2x at equal output", seeds["speedup"] >= 2),
        ("make_seeds: bare backbone forward over the same views / the stage", f"{seeds['bare_over_batched']:.2f}",
         ">= 0.8", seeds["bare_over_batched"] >= 0.8),
        (f"train_cls: {method} step / plain-CAM step", f"{steps['method_over_cam']:.2f}x", "<= 1.3x",
         steps["method_over_cam"] <= 1.3),
        ("train_cls: bare backbone forward+backward / plain-CAM step", f"{steps['bare_over_cam']:.2f}", ">= 0.85",
         steps["bare_over_cam"] >= 0.85),
    ]
    if r.get("artifact_stages"):
        wall = covered_seconds([(c["start"], c["end"]) for c in r["artifact_stages"].values()])
        goals.append(("whole embedded default (the artifacts' own run: time its stages cover)", f"{wall:.0f} s",
                      "<= 360 s (ceiling 600)", wall <= 360))
    return goals


def markdown(r: dict[str, Any]) -> str:
    parts = r["parts"]
    train, mm = parts["train"], parts["matmul"]
    seeds, crf, walk, ev, steps = parts["seeds"], parts["crf"], parts["walk"], parts["eval"], parts["steps"]
    method = steps["method"]
    goals = goals_of(r)
    before = r.get("before")
    earlier = {g: m for g, m, _, _ in goals_of(before)} if before else {}
    source = f"parts measured on the artifacts of `{r['artifacts']}`"
    lines = [
        "# Performance benchmarks", "",
        f"Machine: {r['machine']}. torch threads: {r['torch_threads']}.",
        f"Command: `{r['command']}` ({r['date']}; {source}, {r['repeats']} repeats of each"
        " part; medians quoted, every sample in benchmarks.json; nothing else ran on the machine).", "",
        "## Goals", "",
    ]
    if before:
        lines += [f"Before: `{before['command']}` ({before['date']}), the code before this run's changes.", "",
                  "| goal | before | measured | target | met |", "|---|---|---|---|---|"]
        lines += [f"| {g} | {earlier.get(g, '')} | {m} | {t} | {'yes' if ok else 'no'} |" for g, m, t, ok in goals]
    else:
        lines += ["| goal | measured | target | met |", "|---|---|---|---|"]
        lines += [f"| {g} | {m} | {t} | {'yes' if ok else 'no'} |" for g, m, t, ok in goals]
    lines += [
        "", "## Parts", "", "| what | median | samples |", "|---|---|---|",
    ]
    tc = r["params"]["train_cls"]
    rows = [
        (f"train_cls images/s (embedded default, batch {tc['batch_size']}, {tc['crop_size']} px)",
         train["images_per_s"], ".1f", 1),
        (f"train_cls step s, {method} (batch {steps['batch']}, {steps['crop']} px)", steps[f"{method}_step_s"],
         ".3f", 1),
        ("train_cls step s, plain CAM (same backbone and batch)", steps["cam_step_s"], ".3f", 1),
        ("bare backbone forward + backward s (same batch)", steps["bare_step_s"], ".3f", 1),
        ("training FLOPs per image, G (FlopCounterMode; counts grouped convolutions as dense, so overstated for"
         " the depthwise layers: no roofline bound here)", [train["flops_per_image"]], ".2f", 1e-9),
        ("training FLOP/s, G (FLOPs per image x median images/s)", [train["flops_per_s"]], ".1f", 1e-9),
        (f"dense matmul FLOP/s, G (float32 {mm['n']}^3, torch.mm: MKL)",
         [2 * mm["n"] ** 3 / t for t in mm["seconds"]], ".1f", 1e-9),
        ("dense matmul FLOP/s, G (the same GEMM as a 1x1 convolution: oneDNN)",
         [2 * mm["n"] ** 3 / t for t in mm["conv1x1_seconds"]], ".1f", 1e-9),
        (f"make_seeds images/s, batched (batch {seeds['batch_size']}, {seeds['images']} images)",
         [seeds["images"] / t for t in seeds["batched_s"]], ".2f", 1),
        ("make_seeds images/s, naive per-image, per-scale, per-flip loop",
         [seeds["images"] / t for t in seeds["naive_s"]], ".2f", 1),
        ("make_seeds images/s, bare backbone forward over the same views (the limit)",
         [seeds["images"] / t for t in seeds["bare_s"]], ".2f", 1),
        (f"CRF images/s, 1 worker ({crf['images']} images)", [crf["images"] / t for t in crf["workers_1_s"]], ".1f", 1),
        ("CRF images/s, 2 workers", [crf["images"] / t for t in crf["workers_2_s"]], ".1f", 1),
        (f"IRN random walk s/image ({walk['images']} images)", walk["walk_s_per_image"], ".4f", 1),
        (f"seed evaluation images/s ({ev['thresholds']} thresholds, CAM and PACAM)",
         [ev["images"] / t for t in ev["seed_eval_s"]], ".1f", 1),
        ("pseudo-mask evaluation images/s", [ev["images"] / t for t in ev["mask_eval_s"]], ".1f", 1),
    ]
    for what, values, spec, scale in rows:
        samples = ", ".join(format(v * scale, spec) for v in values) if len(values) > 1 else ""
        lines.append(f"| {what} | {format(med(values) * scale, spec)} | {samples} |")
    if parts.get("stage_rates"):
        lines += ["", "## Throughput the stages recorded in the pipeline run", "", "| stage | rate |", "|---|---|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in parts["stage_rates"].items()]
    if parts.get("hotspots"):
        lines += ["", "## Hotspots (torch.profiler, self CPU time of one unit of work)", ""]
        for unit, ops in parts["hotspots"].items():
            lines += [f"**{unit}**", "", "| operator | self ms | share | calls |", "|---|---|---|---|"]
            lines += [f"| `{o['op']}` | {o['self_ms']:.1f} | {100 * o['share']:.0f}% | {o['calls']} |" for o in ops]
            lines.append("")
    if before and before["parts"].get("hotspots"):
        lines += ["## Hotspots before", "", f"The same units profiled by `{before['command']}` ({before['date']}).", ""]
        for unit, ops in before["parts"]["hotspots"].items():
            lines += [f"**{unit}**", "", "| operator | self ms | share | calls |", "|---|---|---|---|"]
            lines += [f"| `{o['op']}` | {o['self_ms']:.1f} | {100 * o['share']:.0f}% | {o['calls']} |" for o in ops]
            lines.append("")
    if r.get("artifact_stages"):
        costs = r["artifact_stages"]
        lines += ["## Stages of the artifacts' pipeline run", "",
                  "From its stage logs: wall time from process start to exit, peak RSS of the stage process.", "",
                  "| stage | wall s | peak RSS MiB |", "|---|---|---|"]
        for name, c in sorted(costs.items(), key=lambda kv: kv[1]["start"]):
            lines.append(f"| {name} | {c['wall_s']:.1f} | {c['peak_rss_mib']:.0f} |")
        lines += [f"| time covered by at least one stage | "
                  f"{covered_seconds([(c['start'], c['end']) for c in costs.values()]):.1f} | |", ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", type=Path, default=ROOT,
                    help="a folder where the pipeline ran (its params.yaml, data and outputs; default: here)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/cpal-bench"), help="scratch folder")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "benchmarks.md")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed-images", type=int, default=96, help="images for the batched vs naive seed timing")
    ap.add_argument("--walk-images", type=int, default=100)
    ap.add_argument("--before", type=Path, default=None,
                    help="an earlier benchmarks.json: its goals and hotspots are shown beside this run's")
    args = ap.parse_args(argv)
    before = json.loads(args.before.read_text()) if args.before else None  # read before --out overwrites it
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from cpal.core.config import load_params

    ws = args.artifacts
    params = load_params(ws / "params.yaml")
    data_dir = ws / params["data"]["dir"]
    keep_freed_memory()  # as every stage does (stages/common.py), so the parts are timed as they run
    torch.set_num_threads(params["run"]["torch_threads"] or torch.get_num_threads())
    torch.manual_seed(0)
    parts: dict[str, Any] = {"matmul": matmul_flops(args.repeats)}
    flops = training_flops_per_image(params, data_dir)
    ips = train_images_per_s(params, data_dir, args.work, args.repeats)
    parts["train"] = {"images_per_s": ips, "flops_per_image": flops, "flops_per_s": flops * med(ips)}
    parts["seeds"] = seeds_batched_vs_naive(params, ws, args.seed_images, args.repeats)
    parts["seeds"]["bare_s"] = bare_seed_forward(params, ws, args.seed_images, args.repeats)
    parts["seeds"]["bare_over_batched"] = med(parts["seeds"]["bare_s"]) / med(parts["seeds"]["batched_s"])
    parts["steps"] = step_ratios(params, data_dir, args.repeats)
    parts["hotspots"] = stage_hotspots(params, ws)
    parts["stage_rates"] = stage_rates(ws)
    parts["crf"] = crf_workers(params, ws, args.repeats)
    parts["walk"] = random_walk(params, ws, args.walk_images, args.repeats)
    parts["eval"] = evaluation(params, ws, args.repeats)
    result = {
        "machine": machine_description(), "torch_threads": torch.get_num_threads(),
        "command": "python benchmarks/suite.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "date": time.strftime("%Y-%m-%d %H:%M"), "artifacts": str(ws),
        "repeats": args.repeats, "params": {k: params[k] for k in ("train_cls", "seeds")}, "parts": parts,
        "artifact_stages": stage_costs(ws / "outputs" / "logs"),
        "before": {k: before[k] for k in ("command", "date", "parts", "artifact_stages") if k in before}
        if before else None,
    }
    write_json(args.out.with_suffix(".json"), result)
    write_text(args.out, markdown(result))
    print(args.out.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
