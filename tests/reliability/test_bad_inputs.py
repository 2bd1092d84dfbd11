"""Bad inputs: damaged images and masks, a checkpoint carrying a pickled object, params with wrong values.

Each is refused with an error that names the file (or the params key), at the reader and through the
stage command lines, before anything is written under an output name. JPEG has no checksum: damage
inside the entropy-coded data decodes to a different picture without any error, so the cases here
damage what a decoder can detect (the whole file, the header, the end).
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from pipeline_workspace import dvc_stages

from cpal.core.io import save_label_png
from cpal.core.training import load_checkpoint
from cpal.data.voc import DatasetError, VOCDataset

from .helpers import ROOT, check, env, run_stage, write_params

RNG_SEED = 8


@pytest.fixture
def data_copy(tiny_data: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_data, tmp_path / "data"))


def _jpeg_damage(good: bytes) -> dict[str, bytes]:
    rng = np.random.default_rng(RNG_SEED)
    return {
        "garbage": rng.integers(0, 256, len(good), dtype=np.uint8).tobytes(),
        "garbage header": good[:2] + rng.integers(0, 256, 300, dtype=np.uint8).tobytes() + good[302:],
        "cut in half": good[: len(good) // 2],
    }


@pytest.mark.parametrize("damage", ["garbage", "garbage header", "cut in half"])
def test_reader_names_a_damaged_jpeg(data_copy: Path, damage: str) -> None:
    ds = VOCDataset(data_copy, "train")
    image_id = ds.ids[3]
    path = ds.image_path(image_id)
    path.write_bytes(_jpeg_damage(path.read_bytes())[damage])
    with pytest.raises(DatasetError, match=re.escape(f"unreadable image: {path}")):
        ds.image(image_id)
    assert ds.image(ds.ids[4]).shape[2] == 3  # the others still read


def test_reader_names_a_truncated_png(data_copy: Path) -> None:
    ds = VOCDataset(data_copy, "train")
    path = ds.mask_path(ds.ids[5])
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DatasetError, match=re.escape(str(path))):
        ds.mask(ds.ids[5])


def test_reader_names_a_mask_of_the_wrong_size(data_copy: Path) -> None:
    ds = VOCDataset(data_copy, "train")
    image_id = ds.ids[6]
    h, w = ds.image_size(image_id)
    save_label_png(ds.mask_path(image_id), np.zeros((h + 1, w), np.uint8))
    with pytest.raises(DatasetError, match=re.escape(f"{ds.mask_path(image_id)}: label map of '{image_id}' is "
                                                     f"{w}x{h + 1}, which differs from its image")):
        ds.mask(image_id)


def test_reader_names_an_image_past_the_decompression_bomb_limit(data_copy: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Pillow refuses images over 2 x MAX_IMAGE_PIXELS with its own error type, which names no file."""
    from PIL import Image

    ds = VOCDataset(data_copy, "train")
    image_id = ds.ids[2]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # the tiny 64 x 64 images count as bombs
    for read, path in ((ds.image, ds.image_path(image_id)), (ds.image_size, ds.image_path(image_id)),
                       (ds.mask, ds.mask_path(image_id))):
        with pytest.raises(DatasetError, match=re.escape(str(path))):
            read(image_id)


# ----------------------------------------------------------------------------------------------
# the same faults through the stage command lines


def _params_on(cli_params: dict, data: Path, path: Path, **train_cls) -> Path:
    params = copy.deepcopy(cli_params)
    params["data"]["dir"] = str(data)
    params["train_cls"].update(train_cls)
    return write_params(path, params)


@pytest.mark.slow
def test_train_cls_names_a_corrupted_jpeg(cli_params: dict, data_copy: Path, tmp_path: Path) -> None:
    ds = VOCDataset(data_copy, "train")
    path = ds.image_path(ds.ids[9])
    path.write_bytes(_jpeg_damage(path.read_bytes())["garbage header"])
    params = _params_on(cli_params, data_copy, tmp_path / "p.yaml", epochs=1)
    res = run_stage("train_cls", "--params", params, "--data", data_copy, "--out", tmp_path / "out",
                    "--log", tmp_path / "train_cls.log", "--no-progress", cwd=tmp_path)
    assert res.returncode != 0
    assert f"unreadable image: {path}" in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "out" / "model.pt").exists() and not (tmp_path / "out" / "metrics.json").exists()
    log = (tmp_path / "train_cls.log").read_text().splitlines()
    assert " failed " in log[-1] and f"unreadable image: {path}" in log[-2], log[-2:]  # the log says so too


@pytest.mark.slow
def test_make_seeds_names_a_truncated_jpeg_and_publishes_nothing(cli_params: dict, data_copy: Path, trained: Path,
                                                                  tmp_path: Path) -> None:
    ds = VOCDataset(data_copy, "train")
    path = ds.image_path(ds.ids[20])
    path.write_bytes(_jpeg_damage(path.read_bytes())["cut in half"])
    params = _params_on(cli_params, data_copy, tmp_path / "p.yaml")
    res = run_stage("make_seeds", "--params", params, "--data", data_copy, "--checkpoint", trained / "model.pt",
                    "--out", tmp_path / "maps", "--timing", tmp_path / "timing.json", "--log", tmp_path / "log",
                    "--no-progress", cwd=tmp_path)
    assert res.returncode != 0
    assert f"unreadable image: {path}" in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "maps").exists() and not (tmp_path / "timing.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["truncated ground truth", "pseudo-mask of the wrong size"])
def test_eval_pseudo_names_a_bad_mask(cli_params: dict, data_copy: Path, tmp_path: Path, fault: str) -> None:
    ds = VOCDataset(data_copy, "train")
    pseudo = Path(shutil.copytree(data_copy / "SegmentationClass", tmp_path / "pseudo"))
    image_id = ds.ids[11]
    if fault == "truncated ground truth":
        path = ds.mask_path(image_id)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path = pseudo / f"{image_id}.png"
        h, w = ds.image_size(image_id)
        save_label_png(path, np.zeros((h, w - 3), np.uint8))
    params = _params_on(cli_params, data_copy, tmp_path / "p.yaml")
    res = run_stage("eval_pseudo", "--params", params, "--data", data_copy, "--pseudo", pseudo,
                    "--metrics", tmp_path / "eval.json", "--log", tmp_path / "log", "--no-progress", cwd=tmp_path)
    assert res.returncode != 0
    assert str(path) in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "eval.json").exists()


# ----------------------------------------------------------------------------------------------
# checkpoints carrying pickled objects


class _Payload:
    """Unpickling this creates a folder: proof of code run from a checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def _evil_copy(source: Path, dest: Path, marker: Path) -> Path:
    state = load_checkpoint(source)
    state["extra"] = _Payload(marker)
    torch.save(state, dest)
    torch.load(dest, weights_only=False)  # the payload is live: a plain torch.load runs it ...
    assert marker.is_dir()
    marker.rmdir()  # ... and the stage must not
    return dest


@pytest.mark.slow
def test_make_seeds_refuses_a_pickled_checkpoint(cli_params_file: Path, tiny_data: Path, trained: Path,
                                                 tmp_path: Path) -> None:
    marker = tmp_path / "code_ran"
    evil = _evil_copy(trained / "model.pt", tmp_path / "model.pt", marker)
    res = run_stage("make_seeds", "--params", cli_params_file, "--data", tiny_data, "--checkpoint", evil,
                    "--out", tmp_path / "maps", "--timing", tmp_path / "timing.json", "--log", tmp_path / "log",
                    "--no-progress", cwd=tmp_path)
    assert res.returncode != 0
    assert f"refusing checkpoint {evil}: it carries pickled Python objects" in res.stderr, res.stderr[-2000:]
    assert not marker.exists()
    assert not (tmp_path / "maps").exists() and not (tmp_path / ".maps.partial").exists()


@pytest.mark.slow
def test_train_cls_ignores_a_pickled_resume_checkpoint(cli_params_file: Path, tiny_data: Path, trained: Path,
                                                       tmp_path: Path) -> None:
    """A resume.pt with a payload is not loaded: training starts over and ends as the uninterrupted run."""
    out, marker = tmp_path / "train_cls", tmp_path / "code_ran"
    out.mkdir()
    # a genuine resume checkpoint shape (epoch, fingerprint, states) plus the payload
    _evil_copy(trained / "model.pt", out / "resume.pt", marker)
    check(run_stage("train_cls", "--params", cli_params_file, "--data", tiny_data, "--out", out,
                    "--log", tmp_path / "log", "--no-progress", cwd=tmp_path))
    assert not marker.exists()
    assert "ignoring unusable resume checkpoint" in (tmp_path / "log").read_text()
    assert (out / "metrics.json").read_bytes() == (trained / "metrics.json").read_bytes()


# ----------------------------------------------------------------------------------------------
# params with wrong values: every stage command of dvc.yaml, one kind of wrong value each

def _set(path: str, value):
    def change(p: dict) -> None:
        *parents, key = path.split(".")
        for name in parents:
            p = p[name]
        p[key] = value
    return change


def _drop(path: str):
    def change(p: dict) -> None:
        *parents, key = path.split(".")
        for name in parents:
            p = p[name]
        del p[key]
    return change


TINY = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
BANK = TINY["params"]["bank_size"]
# (kind, change, what the message must say)
WRONG = [
    ("wrong type", _set("train_cls.epochs", "three"), "train_cls.epochs = 'three' is invalid"),
    ("bool for an integer", _set("seeds.batch_size", True), "seeds.batch_size = True is invalid"),
    ("out of range", _set("params.K", 0), "params.K = 0 is invalid"),
    ("out of range", _set("crf.bg_threshold", 1.5), "crf.bg_threshold = 1.5 is invalid"),
    ("unknown key", _set("train_cls.epoch", 3), "train_cls: unknown key(s) 'epoch'"),
    ("unknown section", _set("trainer", {"epochs": 3}), "unknown key(s) 'trainer'"),
    ("missing key", _drop("seeds.batch_size"), "seeds.batch_size: missing required key"),
    ("missing section", _drop("run"), "run: missing required key"),
    ("bad enum", _set("params.metric", "cosine"), "params.metric = 'cosine' is invalid"),
    ("bad enum", _set("run.device", "gpu"), "run.device = 'gpu' is invalid"),
    ("K > bank_size", _set("params.K", BANK + 1),
     f"params.K = {BANK + 1} is invalid: K must not exceed params.bank_size = {BANK}"),
    ("low > high", _set("train_cls.scale_range", [1.1, 0.9]), "train_cls.scale_range = [1.1, 0.9] is invalid"),
    ("low > high", _set("seeds.bg_threshold_max", 0.04), "seeds.bg_threshold_min = 0.05 is invalid"),
    ("fg < bg", lambda p: (_set("irn.fg_threshold", 0.5)(p), _set("irn.bg_threshold", 0.6)(p)),
     "irn.bg_threshold = 0.6 is invalid"),  # both numbers: `auto` planes are checked once derived
    ("null", _set("seg.lr", None), "seg.lr = None is invalid"),
    ("not YAML", None, "not valid YAML"),
    ("not a mapping", None, "expected a mapping of sections"),
]


def _dvc_commands() -> dict[str, str]:
    """Every stage command exactly as DVC runs it (dvc.yaml and hosts/dvc.yaml, a foreach stage's items one by
    one), with the tiny preset's dataset folder."""
    default = yaml.safe_load((ROOT / "params.yaml").read_text())["data"]["dir"]
    return {stage["name"]: stage["cmd"].replace(f" {default} ", f" {TINY['data']['dir']} ")
            for stage in dvc_stages().values()}


@pytest.mark.slow
def test_every_stage_refuses_wrong_params_before_any_work(tmp_path: Path) -> None:
    """Each stage command, in a workspace with a broken params.yaml, exits 2 naming the key; it leaves its log only.

    The kinds of wrong value are spread over the stages (17 stages, 17 kinds): every stage refuses, every kind
    is refused, and nothing but the stage's log file is created.
    """
    base = TINY
    commands = _dvc_commands()
    assert len(commands) >= len(WRONG) - 2
    cases = []
    for i, (stage, cmd) in enumerate(sorted(commands.items())):
        kind, change, message = WRONG[i % len(WRONG)]
        ws = tmp_path / stage
        ws.mkdir()
        if kind == "not YAML":
            (ws / "params.yaml").write_text("params:\n  K: [5\n")
        elif kind == "not a mapping":
            (ws / "params.yaml").write_text("- params\n- data\n")
        else:
            params = copy.deepcopy(base)
            change(params)
            write_params(ws / "params.yaml", params)
        cases.append((stage, kind, message, ws, shlex.split(cmd)))
    seen_kinds = {c[1] for c in cases}
    assert seen_kinds == {w[0] for w in WRONG}, "a kind of wrong value is not exercised"

    running: list[tuple[tuple, subprocess.Popen]] = []
    results = []
    for case in cases:  # two at a time (two cores)
        argv = [shutil.which(case[4][0], path=env()["PATH"])] + case[4][1:]
        running.append((case, subprocess.Popen(argv, cwd=case[3], env=env(), stdout=subprocess.PIPE,
                                               stderr=subprocess.PIPE, text=True)))
        if len(running) == 2:
            results.append(_finish(*running.pop(0)))
    results += [_finish(*r) for r in running]

    for (stage, kind, message, ws, argv), (rc, stderr) in results:
        where = f"stage {stage}, {kind}"
        assert rc == 2, f"{where}: exit {rc}\n{stderr[-2000:]}"
        assert message in stderr, f"{where}: {message!r} not in\n{stderr[-2000:]}"
        log = ws / argv[argv.index("--log") + 1]
        assert message in log.read_text(), f"{where}: the log does not say why"
        created = sorted(str(p.relative_to(ws)) for p in ws.rglob("*") if p.is_file() and p.name != "params.yaml")
        assert created == [str(log.relative_to(ws))], f"{where}: wrote {created} before failing"


def _finish(case: tuple, proc: subprocess.Popen) -> tuple[tuple, tuple[int, str]]:
    _, stderr = proc.communicate(timeout=300)
    return case, (proc.returncode, stderr)
