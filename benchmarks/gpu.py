"""GPU benchmark: the CUDA-only tests, then train_cls, make_seeds and eval_seeds of cam, sipe and cpal (one
seed) at the 128 px default and at the GPU preset (configs/embedded_gpu.yaml); writes results/gpu.md.

Not a test. Every number in the report is measured by the run that writes it; a step the time budget
cuts is listed as cut, never filled in. Run it through benchmarks/gpu.sh, which installs the wheels
carried in .whl/ (scripts/gpu_wheels.sh) where the machine lacks them and runs this checkout from source:

    bash benchmarks/gpu.sh                      # one GPU: at most 7 minutes of work (--budget-s 420)
    bash benchmarks/gpu.sh --dry-run            # print the plan, run nothing
    bash benchmarks/gpu.sh --device cpu --no-tests --preset configs/tiny.yaml --baseline none --n-train 0 ...

Order: (1) `python -m pytest tests/gpu -rs`; (2) per preset, the baseline (params.yaml, 128 px) first, then
--preset: the data stage, then for each method train_cls and make_seeds as stage processes (as the pipeline
runs them: their logs carry wall time, peak RSS and CUDA peak) and the seed evaluation in a process of its
own (`--evaluate`: eval_seeds' computation without its plot, which would need matplotlib). Both presets get
the same run settings (--device, --workers, --threads). To fit 8 minutes the GPU preset trains on --n-train
4,000 of its 8,000 images, and make_seeds and the evaluation cover its first --seed-images 500 training
images (the evaluation runs on one CPU core at about 150 images/s at 128 px, so 8,000 images of 320 px
would take minutes); the report says what ran. The budget is checked before each step, and a running step
is stopped at it. Nothing here is tuned on a GPU yet: the defaults are estimates.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import yaml

from cpal.core.config import load_params, merge, validate_params
from cpal.core.io import write_json, write_text
from cpal.core.runtime import machine_description
from cpal.report.bench import stage_costs

ROOT = Path(__file__).resolve().parents[1]
LOG = logging.getLogger("benchmarks.gpu")
METHODS = ("cam", "sipe", "cpal")
CPU_REFERENCE = ROOT / "results" / "benchmarks.json"  # the 2-core CPU's stage rates (benchmarks/suite.py)
SPEED_GOAL = 20.0  # train_cls images/s at 128 px against the 2-core CPU's
COSTS = ("wall_s", "peak_rss_mib")  # from a stage log's last line (cpal.core.runtime.process_cost)


def stage_cmd(stage: str, *args: str) -> list[str]:
    return [sys.executable, "-m", f"stages.{stage}", *args, "--no-progress"]


class Runner:
    """Runs the steps in order within the budget; records what was cut or failed, and why."""

    def __init__(self, budget_s: float, dry_run: bool, out_dir: Path) -> None:
        self.deadline = time.monotonic() + budget_s
        self.started = time.monotonic()
        self.dry_run, self.out_dir = dry_run, out_dir
        self.cut: list[str] = []
        self.failed: list[str] = []

    def run(self, name: str, cmd: list[str], cap_s: float | None = None) -> bool:
        """True when the command ran to a zero exit; its output goes to <out_dir>/<name>.out."""
        if self.dry_run:
            print("$", shlex.join(cmd))
            return True
        left = self.deadline - time.monotonic()
        if left <= 1:
            self.cut.append(f"{name}: not started (budget spent)")
            return False
        limit = min(left, cap_s) if cap_s else left
        out = self.out_dir / f"{name.replace('/', '_')}.out"
        out.parent.mkdir(parents=True, exist_ok=True)
        print(f"[{time.monotonic() - self.started:6.0f} s] {name}", flush=True)
        with out.open("w") as fh:
            try:
                done = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, timeout=limit, check=False)
            except subprocess.TimeoutExpired:
                self.cut.append(f"{name}: stopped after {limit:.0f} s (budget)")
                return False
        if done.returncode != 0:
            tail = out.read_text(errors="replace").strip().splitlines()[-3:]
            self.failed.append(f"{name}: exit {done.returncode}: " + " / ".join(tail))
            return False
        return True

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started


def read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def junit_counts(junit: Path) -> dict[str, Any] | None:
    """pytest's junit XML -> counts and the names of failed tests."""
    if not junit.is_file():
        return None
    root = ET.parse(junit).getroot()
    counts = {"tests": 0, "failed": 0, "skipped": 0, "failures": []}
    for case in root.iter("testcase"):
        counts["tests"] += 1
        if case.find("skipped") is not None:
            counts["skipped"] += 1
        elif case.find("failure") is not None or case.find("error") is not None:
            counts["failed"] += 1
            counts["failures"].append(f"{case.get('classname')}::{case.get('name')}")
    counts["passed"] = counts["tests"] - counts["failed"] - counts["skipped"]
    return counts


def subset_split(data: Path, n: int) -> str:
    """A split of the first `n` training images (written beside train.txt); `train` when n is 0 or covers all."""
    sets = data / "ImageSets" / "Segmentation"
    ids = (sets / "train.txt").read_text().split()
    if n <= 0 or n >= len(ids):
        return "train"
    write_text(sets / f"train_first{n}.txt", "\n".join(ids[:n]) + "\n")
    return f"train_first{n}"


def block_params(path: Path, run: dict[str, Any], n_train: int | None, epochs: int | None) -> dict[str, Any]:
    """A preset with this benchmark's run settings (and image count / epochs when given)."""
    over: dict[str, Any] = {"run": run}
    if n_train:
        over["data"] = {"embedded": {"n_train": n_train}}
    if epochs:
        over["train_cls"] = {"epochs": epochs}
    return validate_params(merge(load_params(path), over), source=str(path))


def run_block(runner: Runner, label: str, params: dict[str, Any], methods: list[str], seed_images: int,
              work: Path) -> list[dict[str, Any]]:
    """Data, then train_cls, make_seeds and the seed evaluation per method; one record per method."""
    data = work / "data"
    base_file = work / "params.yaml"
    if not runner.dry_run:
        write_text(base_file, yaml.safe_dump(params, sort_keys=False))
    records = []
    data_ok = runner.run(f"{label}/data", stage_cmd("data", "--params", str(base_file), "--out", str(data),
                                                    "--log", str(work / "logs" / "data.log")))
    split = "train" if runner.dry_run or not data_ok else subset_split(data, seed_images)
    for method in methods:
        folder = work / method
        p = merge(params, {"params": {"method": method}, "seeds": {"split": split}, "seg": {"train_split": split}})
        params_file, logs = folder / "params.yaml", folder / "logs"
        if not runner.dry_run:
            write_text(params_file, yaml.safe_dump(validate_params(p), sort_keys=False))
        record: dict[str, Any] = {"preset": label, "method": method, "split": split}
        records.append(record)
        if not data_ok:
            continue
        common = ["--params", str(params_file), "--data", str(data)]
        if not runner.run(f"{label}/{method}/train_cls", stage_cmd(
                "train_cls", *common, "--out", str(folder / "cls"), "--log", str(logs / "train_cls.log"))):
            continue
        seeds_ok = runner.run(f"{label}/{method}/make_seeds", stage_cmd(
            "make_seeds", *common, "--checkpoint", str(folder / "cls" / "model.pt"), "--out", str(folder / "seeds"),
            "--timing", str(folder / "seeds_timing.json"), "--log", str(logs / "make_seeds.log")))
        if seeds_ok:
            runner.run(f"{label}/{method}/eval_seeds", [sys.executable, str(Path(__file__).resolve()), "--evaluate",
                                                       str(params_file), str(data), str(folder / "seeds"),
                                                       str(folder / "eval_seeds.json")])
        if not runner.dry_run:
            record.update(collect(folder))
    return records


def collect(folder: Path) -> dict[str, Any]:
    """What one method's steps measured: timing files, stage log costs, metrics, seed mIoU."""
    costs = stage_costs(folder / "logs")
    out: dict[str, Any] = {}
    timing, metrics = read_json(folder / "cls" / "timing.json"), read_json(folder / "cls" / "metrics.json")
    if timing:
        out["train_cls"] = {"images_per_s": timing["images_per_s"], "cuda_peak_mib": timing.get("cuda_peak_mib"),
                            "amp": timing.get("amp"), "device": timing["device"],
                            "seconds": sum(timing["epoch_seconds"]), "val_map": (metrics or {}).get("val_map"),
                            **{k: v for k, v in costs.get("train_cls", {}).items() if k in COSTS}}
    seeds = read_json(folder / "seeds_timing.json")
    if seeds:
        out["make_seeds"] = {"images_per_s": seeds["images_per_s"], "cuda_peak_mib": seeds.get("cuda_peak_mib"),
                             "amp": seeds.get("amp"), "images": seeds["images"], "seconds": seeds["seconds"],
                             **{k: v for k, v in costs.get("make_seeds", {}).items() if k in COSTS}}
    evaluation = read_json(folder / "eval_seeds.json")
    if evaluation:
        out["eval_seeds"] = evaluation
    return out


def evaluate(params_file: Path, data: Path, seeds: Path, out: Path) -> int:
    """`--evaluate`: the seed mIoU eval_seeds computes (sweep and SIPE's protocol), timed, as JSON."""
    from cpal.data.voc import VOCDataset
    from cpal.seeds.evaluate import evaluate_seeds, thresholds_from

    params = load_params(params_file)
    dataset = VOCDataset(data, params["seeds"]["split"])
    t0 = time.perf_counter()
    results = evaluate_seeds(dataset, seeds, thresholds_from(params["seeds"]), LOG, progress=False)
    seconds = time.perf_counter() - t0
    summary = {"images": len(dataset), "seconds": seconds, "images_per_s": len(dataset) / max(seconds, 1e-9)}
    for kind in ("cam", "pacam", "pacam_argmax"):
        if kind in results:
            summary[kind] = results[kind]["miou"]
    write_json(out, summary)
    return 0


# ---------------------------------------------------------------------------------------------------
# The report


def _num(value: Any, fmt: str = "{:.1f}") -> str:
    return "" if value is None else fmt.format(value)


def _pct(value: Any) -> str:
    return "" if value is None else f"{100 * value:.1f}"


def context_part(records: list[dict[str, Any]], preset: str) -> float | None:
    """CPAL's PACAM minus SIPE's (points): the context part, at one preset."""
    seeds = {r["method"]: r.get("eval_seeds", {}).get("pacam") for r in records if r["preset"] == preset}
    if seeds.get("cpal") is None or seeds.get("sipe") is None:
        return None
    return 100 * (seeds["cpal"] - seeds["sipe"])


def report(info: dict[str, Any], tests: dict[str, Any] | None, records: list[dict[str, Any]],
           cut: list[str], failed: list[str]) -> str:
    """results/gpu.md from what this run measured (empty cells: not measured)."""
    lines = [
        "# GPU benchmark: CUDA-only tests, speed, memory and seeds of cam, sipe and cpal",
        "",
        f"Command: `{info['command']}` ({info['date']}, {info['wall_s']:.0f} s of the {info['budget_s']:.0f} s "
        "budget, start-up and wheel installation not counted).",
        f"Machine: {info['machine']}.",
        f"Device: {info['device']}" + (f" ({info['gpu']})" if info.get("gpu") else "") + ".",
        "",
    ]
    if not info["device"].startswith("cuda"):
        lines += ["**Not a GPU measurement**: this run checked the script on the CPU.", ""]
    lines += ["## CUDA-only tests (`python -m pytest tests/gpu -rs`)", ""]
    if tests is None:
        lines += ["Not run.", ""]
    else:
        lines += [f"{tests['passed']} passed, {tests['failed']} failed, {tests['skipped']} skipped "
                  f"of {tests['tests']}." + ("" if not tests["failures"] else " Failed: " +
                                             ", ".join(f"`{t}`" for t in tests["failures"]) + "."), ""]
    lines += [
        "## Speed and memory (one seed)",
        "",
        "images/s: train_cls median over epochs (training images, augmented crops), make_seeds over the images",
        "it wrote (every scale of seeds.scales, with flips); CUDA peak: torch's peak allocation in the stage",
        "process (its timing file; the stage log's last line has it too); wall s: the stage process, start to exit.",
        "",
        "| preset | method | stage | images/s | seconds | wall s | CUDA peak MiB | peak RSS MiB | AMP |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in records:
        for stage in ("train_cls", "make_seeds"):
            s = r.get(stage)
            if s:
                lines.append(f"| {r['preset']} | {r['method']} | {stage} | {_num(s['images_per_s'])} | "
                             f"{_num(s['seconds'])} | {_num(s.get('wall_s'))} | "
                             f"{_num(s.get('cuda_peak_mib'), '{:.0f}')} | {_num(s.get('peak_rss_mib'), '{:.0f}')} | "
                             f"{s.get('amp')} |")
        e = r.get("eval_seeds")
        if e:
            lines.append(f"| {r['preset']} | {r['method']} | eval_seeds (CPU) | {_num(e['images_per_s'])} | "
                         f"{_num(e['seconds'])} |  |  |  |  |")
    cpu = info.get("cpu_reference")
    baseline = [r for r in records if r["preset"] == info.get("baseline_label") and r.get("train_cls")]
    if cpu and baseline:
        rates = [r["train_cls"]["images_per_s"] for r in baseline]
        ratio = min(rates) / cpu["train_cls"]
        lines += ["", f"train_cls at 128 px: {min(rates):.0f} to {max(rates):.0f} images/s here against "
                      f"{cpu['train_cls']:.1f} on the 2-core CPU ({cpu['machine']}; results/benchmarks.json): "
                      f"{ratio:.1f}x at least (goal {SPEED_GOAL:.0f}x: {'met' if ratio >= SPEED_GOAL else 'NOT met'})."]
    lines += [
        "",
        "## Seed mIoU (%), one seed",
        "",
        "CAM and PACAM: best background threshold of the sweep; own bg: PACAM with its own background channel "
        "(SIPE's protocol).",
        "",
        "| preset | method | seed images | CAM | PACAM | PACAM own bg | classifier val mAP |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in records:
        e = r.get("eval_seeds") or {}
        lines.append(f"| {r['preset']} | {r['method']} | {e.get('images', '')} ({r['split']}) | {_pct(e.get('cam'))} | "
                     f"{_pct(e.get('pacam'))} | {_pct(e.get('pacam_argmax'))} | "
                     f"{_pct((r.get('train_cls') or {}).get('val_map'))} |")
    parts = {label: context_part(records, label) for label in info["presets"]}
    measured = {k: v for k, v in parts.items() if v is not None}
    if measured:
        lines += ["", "Context part (CPAL's PACAM minus SIPE's, points): " +
                  "; ".join(f"{k}: {v:+.1f}" for k, v in measured.items()) + "."]
        if len(measured) == 2:
            (a, va), (b, vb) = measured.items()
            lines.append(f"Larger at {b} than at {a}: {'yes' if vb > va else 'no'} (one seed: the CPU's "
                         "seed-to-seed std of PACAM is 0.8 points, results/seeds.md, so a difference under about "
                         "2 points is not evidence).")
    if cut or failed:
        lines += ["", "## Not measured", ""] + [f"- cut: {c}" for c in cut] + [f"- failed: {f}" for f in failed]
    lines += ["", "Settings: " + info["settings"], ""]
    return "\n".join(lines)


def cpu_reference() -> dict[str, Any] | None:
    """train_cls images/s of the embedded default on the 2-core CPU, from the committed suite run."""
    ref = read_json(CPU_REFERENCE)
    if not ref:
        return None
    return {"train_cls": ref["parts"]["stage_rates"]["train_cls images/s"], "machine": ref["machine"]}


def gpu_name(device: str) -> str | None:
    import torch

    if not device.startswith("cuda") or not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return f"{props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", type=Path, default=ROOT / "configs" / "embedded_gpu.yaml")
    p.add_argument("--baseline", default=str(ROOT / "params.yaml"), help="the 128 px comparison; 'none' skips it")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--n-train", type=int, default=4000,
                   help="training images of --preset (4000: half the GPU preset's, to fit 8 minutes; 0: the preset's)")
    p.add_argument("--epochs", type=int, default=None, help="train_cls epochs of both presets (default: theirs)")
    p.add_argument("--seed-images", type=int, default=500,
                   help="make_seeds / evaluation of --preset on the first N training images (0: all)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu", "auto"])
    p.add_argument("--workers", type=int, default=12, help="run.num_workers of both presets")
    p.add_argument("--threads", type=int, default=4, help="run.torch_threads of both presets")
    p.add_argument("--budget-s", type=float, default=420.0, help="wall seconds for all steps (7 min)")
    p.add_argument("--work", type=Path, default=ROOT / "outputs" / "benchmarks" / "gpu")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "gpu.md")
    p.add_argument("--no-tests", action="store_true", help="skip tests/gpu")
    p.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    p.add_argument("--evaluate", nargs=4, metavar=("PARAMS", "DATA", "SEEDS", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.evaluate:
        return evaluate(*map(Path, args.evaluate))
    logging.basicConfig(level=logging.WARNING)

    if args.device == "cuda" and not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("benchmarks/gpu.py: no CUDA device here, nothing measured; results/gpu.md left as it is "
                  "(--device cpu checks the script on the CPU)", file=sys.stderr)
            return 3
    run = {"device": args.device, "num_workers": args.workers, "torch_threads": args.threads}
    blocks = []
    if args.baseline != "none":
        base = block_params(Path(args.baseline), run, None, args.epochs)
        blocks.append((f"{base['data']['embedded']['image_size']} px default", base, 0))
    gpu = block_params(args.preset, run, args.n_train or None, args.epochs)
    blocks.append((f"{gpu['data']['embedded']['image_size']} px {args.preset.stem}", gpu, args.seed_images))
    if len(blocks) == 2 and blocks[0][0] == blocks[1][0]:
        blocks[1] = (blocks[1][0] + " (preset)", *blocks[1][1:])

    runner = Runner(args.budget_s, args.dry_run, args.work / "steps")
    tests = None
    if not args.no_tests:
        junit = args.work / "gpu_tests.xml"
        runner.run("tests_gpu", [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                                 str(ROOT / "tests" / "gpu"), f"--junitxml={junit}"], cap_s=240)
        tests = None if args.dry_run else junit_counts(junit)
    records = []
    for label, params, seed_images in blocks:
        records += run_block(runner, label, params, args.methods, seed_images, args.work / label.replace(" ", "_"))
    if args.dry_run:
        return 0

    gpu_params = blocks[-1][1]
    info = {
        "command": "bash benchmarks/gpu.sh " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "wall_s": runner.elapsed, "budget_s": args.budget_s, "machine": machine_description(),
        "device": args.device if args.device != "auto" else ("cuda" if gpu_name("cuda") else "cpu"),
        "gpu": gpu_name(args.device), "cpu_reference": cpu_reference(),
        "baseline_label": blocks[0][0] if args.baseline != "none" else None,
        "presets": [b[0] for b in blocks],
        "settings": (f"run {run}; {args.preset.name}: {gpu_params['data']['embedded']['n_train']} training images "
                     f"(the preset has {load_params(args.preset)['data']['embedded']['n_train']}), "
                     f"{gpu_params['train_cls']['epochs']} epochs, batch {gpu_params['train_cls']['batch_size']}, "
                     f"seeds on {args.seed_images or 'all'} of them"
                     + ("; the baseline as in params.yaml" if args.baseline != "none" else "") + "."),
    }
    write_text(args.out, report(info, tests, records, runner.cut, runner.failed))
    write_json(args.work / "records.json", {"info": info, "tests": tests, "records": records,
                                            "cut": runner.cut, "failed": runner.failed})
    print(f"wrote {args.out} ({runner.elapsed:.0f} s)")
    return 0 if not runner.failed and not (tests and tests["failed"]) else 1


if __name__ == "__main__":
    sys.exit(main())
