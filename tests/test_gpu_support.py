"""What of the GPU path can be checked without a GPU: the gpu tests skip with their reason, the CUDA fields
stay absent on CPU, the GPU preset says what its comments claim, the benchmark script runs (a dry run, and
the tiny preset on CPU end to end), and the wheels it needs are named consistently."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cpal.core.config import load_params

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["PYTHON"] = sys.executable
    return env


@pytest.fixture(scope="module")
def gpu_bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "benchmarks" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is here: the gpu tests run instead of skipping")
def test_gpu_tests_are_collected_and_skipped_with_the_reason() -> None:
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/gpu"],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = done.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"\d+ skipped in [\d.]+s( \(.*\))?", summary), summary  # none passed, none failed
    assert int(summary.split()[0]) >= 10
    assert "needs a CUDA device" in done.stdout


def test_cuda_fields_are_absent_on_the_cpu() -> None:
    from cpal.core.runtime import cuda_peak_mib, process_cost
    from cpal.core.training import timing_summary

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        pytest.skip("this process already uses CUDA")
    assert cuda_peak_mib() is None
    assert "cuda_peak_mib" not in process_cost() and "peak_rss_mib=" in process_cost()
    timing = timing_summary([{"seconds": 2.0, "images_per_s": 16.0}], torch.device("cpu"), amp=False)
    assert timing["cuda_peak_mib"] is None and timing["amp"] is False and timing["images_per_s"] == 16.0
    assert timing["peak_rss_mib"] > 50  # this process holds torch


def test_the_gpu_preset_is_what_its_comments_say() -> None:
    """configs/embedded_gpu.yaml: 320 px, crop = image, a 20x20 CAM grid, AMP on, CUDA; the method settings and
    everything else of the data are the 128 px default's, so a difference comes from the scale."""
    gpu, default = load_params(ROOT / "configs" / "embedded_gpu.yaml"), load_params(ROOT / "params.yaml")
    emb, cls = gpu["data"]["embedded"], gpu["train_cls"]
    assert emb["image_size"] == cls["crop_size"] == 320 and cls["crop_size"] // cls["output_stride"] == 20
    assert default["train_cls"]["crop_size"] // default["train_cls"]["output_stride"] == 8
    assert (emb["n_train"], emb["n_val"]) == (8000, 1000)
    assert gpu["params"] == default["params"]
    assert {k: v for k, v in emb.items() if k not in ("image_size", "n_train", "n_val")} == {
        k: v for k, v in default["data"]["embedded"].items() if k not in ("image_size", "n_train", "n_val")}
    assert cls["amp"] and gpu["seeds"]["amp"] and gpu["irn"]["amp"] and gpu["seg"]["amp"]
    assert gpu["run"]["device"] == "cuda" and gpu["data"]["dir"] != default["data"]["dir"]
    assert "NOT YET MEASURED ON A GPU" in (ROOT / "configs" / "embedded_gpu.yaml").read_text()


def test_benchmark_dry_run_plans_every_step() -> None:
    done = subprocess.run(["bash", "benchmarks/gpu.sh", "--dry-run", "--work", "/nonexistent/gpu"], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    plan = [line for line in done.stdout.splitlines() if line.startswith("$ ")]
    assert "-m pytest" in plan[0] and "tests/gpu" in plan[0]
    for stage, count in (("stages.data", 2), ("stages.train_cls", 6), ("stages.make_seeds", 6), ("--evaluate", 6)):
        assert sum(stage in line for line in plan) == count, (stage, plan)
    assert any("/128_px_default/" in line for line in plan) and any("/320_px_embedded_gpu/" in line for line in plan)
    assert not Path("/nonexistent").exists()  # a dry run writes nothing


def test_benchmark_without_cuda_measures_nothing(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is here")
    done = subprocess.run(["bash", "benchmarks/gpu.sh", "--out", str(tmp_path / "gpu.md"), "--work", str(tmp_path)],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 3 and "no CUDA device" in done.stderr
    assert not (tmp_path / "gpu.md").exists()


@pytest.mark.slow
def test_benchmark_runs_the_tiny_preset_on_cpu(tmp_path: Path) -> None:
    """The whole script on CPU (one method, the tiny preset): the steps run and the report shows them."""
    out = tmp_path / "gpu.md"
    cmd = ["bash", "benchmarks/gpu.sh", "--device", "cpu", "--no-tests", "--preset", "configs/tiny.yaml",
           "--baseline", "none", "--n-train", "0", "--methods", "cpal", "--seed-images", "8", "--workers", "0",
           "--threads", "2", "--work", str(tmp_path / "work"), "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = out.read_text()
    assert "**Not a GPU measurement**" in text and "## Not measured" not in text
    rows = {line.split("|")[3].strip(): line for line in text.splitlines() if line.startswith("| 64 px tiny | cpal |")}
    assert set(rows) >= {"train_cls", "make_seeds", "eval_seeds (CPU)", "8 (train_first8)"}
    seeds_row = [c.strip() for c in rows["8 (train_first8)"].split("|")]
    assert all(0 < float(c) <= 100 for c in seeds_row[4:8]), seeds_row  # CAM, PACAM, own bg, val mAP


def test_report_compares_the_presets(gpu_bench) -> None:
    """The report's arithmetic on made-up records (this test measures nothing): the speed ratio against the
    CPU, the context part per preset, cut and failed steps listed."""
    def rec(preset: str, method: str, pacam: float | None, ips: float) -> dict:
        r = {"preset": preset, "method": method, "split": "train",
             "train_cls": {"images_per_s": ips, "seconds": 10.0, "cuda_peak_mib": 900.0, "amp": True,
                           "val_map": 0.9, "wall_s": 20.0, "peak_rss_mib": 3000.0}}
        if pacam is not None:
            r["eval_seeds"] = {"images": 800, "seconds": 5.0, "images_per_s": 160.0, "cam": 0.4, "pacam": pacam,
                               "pacam_argmax": 0.4}
        return r

    records = [rec("128 px default", "sipe", 0.50, 700.0), rec("128 px default", "cpal", 0.505, 650.0),
               rec("320 px embedded_gpu", "sipe", 0.52, 300.0), rec("320 px embedded_gpu", "cpal", 0.55, 280.0)]
    info = {"command": "bash benchmarks/gpu.sh", "date": "today", "wall_s": 400.0, "budget_s": 420.0,
            "machine": "test machine", "device": "cuda", "gpu": "Some GPU", "settings": "test",
            "cpu_reference": {"train_cls": 30.0, "machine": "2-core CPU"}, "baseline_label": "128 px default",
            "presets": ["128 px default", "320 px embedded_gpu"]}
    tests = {"tests": 12, "passed": 11, "failed": 1, "skipped": 0, "failures": ["test_x::test_y"]}
    text = gpu_bench.report(info, tests, records, ["a: not started (budget spent)"], [])
    assert "11 passed, 1 failed, 0 skipped of 12. Failed: `test_x::test_y`." in text
    assert "650 to 700 images/s" in text and "21.7x at least (goal 20x: met)" in text
    assert "128 px default: +0.5; 320 px embedded_gpu: +3.0" in text
    assert "Larger at 320 px embedded_gpu than at 128 px default: yes" in text
    assert "- cut: a: not started (budget spent)" in text and "Not a GPU measurement" not in text


def test_wheels_are_named_alike_and_pinned_to_the_tested_versions() -> None:
    """scripts/gpu_wheels.sh downloads what benchmarks/gpu.sh installs, at the versions this environment runs."""
    wheels = (ROOT / "scripts" / "gpu_wheels.sh").read_text()
    pins = dict(re.findall(r"([A-Za-z0-9_.-]+)==([0-9][A-Za-z0-9.]*)", wheels))
    shell = (ROOT / "benchmarks" / "gpu.sh").read_text()
    groups = {d for line in re.findall(r"\[([^\]]*)\]", shell.split("groups = ", 1)[1].split("every =", 1)[0])
              for d in re.findall(r'"([^"]+)"', line)}
    assert groups == set(pins)
    for name, version in pins.items():
        assert importlib.metadata.version(name) == version, name
    res = subprocess.run(["git", "check-ignore", "--no-index", ".whl/x.whl"], cwd=ROOT, capture_output=True)
    assert res.returncode == 0  # carried wheels are never committed


def test_the_committed_gpu_report_claims_no_measurement_unless_one_was_made() -> None:
    text = (ROOT / "results" / "gpu.md").read_text()
    if "no gpu was available" in text.lower():
        assert not re.search(r"\d+(\.\d+)? images/s", text)
    else:
        assert "Device: cuda" in text  # a real run's report names its GPU
