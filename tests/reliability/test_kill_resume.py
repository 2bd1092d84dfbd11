"""SIGKILL real stage processes midway, rerun them: they finish with exactly what an uninterrupted run gives.

train_cls is killed inside an epoch (its tqdm bar on stderr shows a finished step of that epoch with
steps left; the resume checkpoint on disk proves the epoch had not ended). make_seeds is killed after
some seed files exist. Neither ever leaves a half-written file under a final name, and the seed folder
is published only when complete; a downstream stage refuses an incomplete folder or a damaged file and
names it.
"""

from __future__ import annotations

import copy
import json
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from cpal.core.training import load_checkpoint
from cpal.data.sources import prepare_dataset
from cpal.data.voc import VOCDataset
from cpal.seeds.store import SeedError, load_seeds, save_seeds, seed_path

from .helpers import EPOCHS, check, env, kill_on_progress, run_stage, stage_cmd, wait_for, write_params


def _same_weights(a: Path, b: Path) -> None:
    wa, wb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


@pytest.mark.slow
@pytest.mark.parametrize("epoch", [1, 2])
def test_train_cls_killed_mid_epoch_resumes_to_the_same_result(epoch: int, cli_params_file: Path, tiny_data: Path,
                                                               trained: Path, tmp_path: Path) -> None:
    out, log = tmp_path / "train_cls", tmp_path / "train_cls.log"
    args = ["--params", cli_params_file, "--data", tiny_data, "--out", out, "--log", log]
    proc = subprocess.Popen(stage_cmd("train_cls", *args), cwd=tmp_path, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    kill_on_progress(proc, epoch)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "model.pt").exists() and not (out / "metrics.json").exists()
    resume = out / "resume.pt"
    if epoch == 1:
        assert not resume.exists(), "the kill landed after epoch 1 had ended, not inside it"
    else:
        assert load_checkpoint(resume)["epoch"] == epoch - 1, "the kill landed after the epoch had ended"

    check(run_stage("train_cls", *args, "--no-progress", cwd=tmp_path))
    if epoch > 1:
        assert f"resuming from {resume} after epoch {epoch - 1}" in log.read_text()
    assert (out / "metrics.json").read_bytes() == (trained / "metrics.json").read_bytes()
    assert len(json.loads((out / "metrics.json").read_text())["history"]) == EPOCHS
    _same_weights(out / "model.pt", trained / "model.pt")
    assert not resume.exists()


# ----------------------------------------------------------------------------------------------
# make_seeds

N_SEED_IMAGES = 96


@pytest.fixture(scope="module")
def seed_setup(cli_params: dict, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 96-image train split and seed batches of 2: 48 batches, so a kill can land between them."""
    root = tmp_path_factory.mktemp("seed_data")
    params = copy.deepcopy(cli_params)
    params["data"]["dir"] = str(root / "data")
    params["data"]["embedded"].update(n_train=N_SEED_IMAGES, n_val=6)
    params["seeds"]["batch_size"] = 2
    prepare_dataset(root / "data", params["data"], progress=False)
    return root / "data", write_params(root / "params.yaml", params)


def _seed_files(folder: Path) -> list[Path]:
    """Seed files under their final names (hidden names are temporaries and the fingerprint)."""
    return sorted(p for p in folder.glob("*.npz") if not p.name.startswith("."))


def _seed_args(setup: tuple[Path, Path], checkpoint: Path, work: Path) -> list:
    data, params = setup
    return ["--params", params, "--data", data, "--checkpoint", checkpoint, "--out", work / "maps",
            "--timing", work / "timing.json", "--log", work / "make_seeds.log", "--no-progress"]


def _eval_args(setup: tuple[Path, Path], seeds: Path, work: Path) -> list:
    data, params = setup
    return ["--params", params, "--data", data, "--seeds", seeds, "--metrics", work / "eval_seeds.json",
            "--curve", work / "curve.csv", "--plot", work / "curve.png", "--log", work / "eval_seeds.log",
            "--no-progress"]


@pytest.fixture(scope="module")
def seed_reference(seed_setup: tuple[Path, Path], trained: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("seed_ref")
    check(run_stage("make_seeds", *_seed_args(seed_setup, trained / "model.pt", work), cwd=work))
    return work / "maps"


@pytest.mark.slow
def test_make_seeds_killed_midway_publishes_nothing_and_resumes(seed_setup: tuple[Path, Path], trained: Path,
                                                                seed_reference: Path, tmp_path: Path) -> None:
    ids = VOCDataset(seed_setup[0], "train").ids
    args = _seed_args(seed_setup, trained / "model.pt", tmp_path)
    final, partial = tmp_path / "maps", tmp_path / ".maps.partial"
    proc = subprocess.Popen(stage_cmd("make_seeds", *args), cwd=tmp_path, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: partial.is_dir() and len(_seed_files(partial)) >= 6, 240,
                 "6 seed files in the partial folder", proc, interval=0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    # what a kill leaves: no output folder; under final names only complete files; the rest hidden
    assert not final.exists()
    written = _seed_files(partial)
    assert 6 <= len(written) < len(ids), "the kill landed after make_seeds had finished"
    for path in written:
        load_seeds(path)  # complete and readable, or this raises
    assert [p.name for p in partial.iterdir() if p not in written and not p.name.startswith(".")] == []

    # downstream refuses the incomplete folder and names it and the missing ids
    missing = [i for i in ids if not seed_path(partial, i).is_file()]
    res = run_stage("eval_seeds", *_eval_args(seed_setup, partial, tmp_path), cwd=tmp_path)
    assert res.returncode != 0 and str(partial) in res.stderr and missing[0] in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "eval_seeds.json").exists()

    # a kill during a write leaves a hidden temporary file (cpal.core.io.atomic_path): plant one, the rerun drops it
    (partial / f".{missing[0]}.npz.killed.tmp.npz").write_bytes(b"PK\x03\x04 cut short")
    check(run_stage("make_seeds", *args, cwd=tmp_path))
    assert "continuing" in (tmp_path / "make_seeds.log").read_text()
    kept = json.loads((tmp_path / "timing.json").read_text())["resumed_images"]
    assert len(written) - 1 <= kept <= len(written)  # whole batches of 2 are kept, a half-written batch is redone
    assert not partial.exists()
    assert sorted(p.name for p in final.iterdir()) == sorted(f"{i}.npz" for i in ids)
    for image_id in ids:  # same batches, same bytes as the uninterrupted run
        assert seed_path(final, image_id).read_bytes() == seed_path(seed_reference, image_id).read_bytes(), image_id


@pytest.mark.slow
def test_eval_seeds_refuses_a_truncated_seed_file(seed_setup: tuple[Path, Path], seed_reference: Path,
                                                  tmp_path: Path) -> None:
    seeds = tmp_path / "maps"
    shutil.copytree(seed_reference, seeds)
    victim = sorted(seeds.glob("*.npz"))[7]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    res = run_stage("eval_seeds", *_eval_args(seed_setup, seeds, tmp_path), cwd=tmp_path)
    assert res.returncode != 0
    assert f"unreadable or truncated seed file: {victim}" in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "eval_seeds.json").exists() and not (tmp_path / "curve.csv").exists()


def test_no_damaged_seed_file_is_accepted_with_other_content(tmp_path: Path) -> None:
    """Random damage to a seed file: either refused with its path, or (damage in unused zip fields) same arrays."""
    rng = np.random.default_rng(0)
    source = tmp_path / "source.npz"
    save_seeds(source, np.array([2, 5]), (64, 64), {"cam": rng.random((2, 64, 64)), "pacam": rng.random((2, 64, 64))})
    good = load_seeds(source)
    raw = source.read_bytes()
    path = tmp_path / "damaged.npz"
    outcomes = {"refused": 0, "same": 0}
    for _ in range(300):
        damaged = bytearray(raw)
        pos = int(rng.integers(0, len(raw) - 8))
        damaged[pos:pos + 8] = rng.integers(0, 256, 8, dtype=np.uint8).tobytes()
        path.write_bytes(bytes(damaged))
        try:
            got = load_seeds(path)
        except SeedError as exc:
            assert str(path) in str(exc)
            outcomes["refused"] += 1
            continue
        assert got.keys() == good.keys() and all(np.array_equal(got[k], good[k]) for k in good), pos
        outcomes["same"] += 1
    assert outcomes["refused"] > 250, outcomes
    for cut in (0, 10, len(raw) // 2, len(raw) - 1):
        path.write_bytes(raw[:cut])
        with pytest.raises(SeedError, match="truncated"):
            load_seeds(path)
