"""What the library modules log reaches the stage's log file, with a timestamp (cpal.core.runtime.setup_logging)."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import pkgutil
import re
import sys
from pathlib import Path

import pytest
import yaml

import cpal
from cpal.core.runtime import setup_logging

STAMP = r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2} "

_spec = importlib.util.spec_from_file_location("_cpal_test_voc12", Path(__file__).with_name("test_voc12.py"))
_tv = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tv)


def _library_loggers() -> dict[str, logging.Logger]:
    """module name -> its module-level `log`, for every module of the cpal package that has one."""
    found = {}
    for info in pkgutil.walk_packages(cpal.__path__, "cpal."):
        module = importlib.import_module(info.name)
        if isinstance(getattr(module, "log", None), logging.Logger):
            found[info.name] = module.log
    return found


def test_every_library_logger_reaches_the_stage_log(tmp_path: Path) -> None:
    loggers = _library_loggers()
    assert {"cpal.data.download", "cpal.data.voc12", "cpal.data.coco14"} <= set(loggers)
    log_file = tmp_path / "logs" / "stage.log"
    stage = setup_logging(log_file, "some_stage")
    stage.info("stage message")
    for name, logger in loggers.items():
        logger.info("info from %s", name)
    text = log_file.read_text()
    assert re.search(STAMP + r"some_stage INFO stage message$", text, re.M)
    for name in loggers:
        assert re.search(STAMP + rf"{re.escape(name)} INFO info from {re.escape(name)}$", text, re.M), name


def test_a_second_stage_in_the_same_process_gets_the_library_messages(tmp_path: Path) -> None:
    setup_logging(tmp_path / "first.log", "first")
    setup_logging(tmp_path / "second.log", "second")
    logging.getLogger("cpal.data.download").warning("a stalled download")
    assert "a stalled download" not in (tmp_path / "first.log").read_text()
    assert re.search(STAMP + "cpal.data.download WARNING a stalled download", (tmp_path / "second.log").read_text())


def test_data_stage_log_holds_the_voc_messages(tmp_path: Path, default_params: dict) -> None:
    """Through the stage entry point: prepare_voc12's "VOC 2012 written to ..." is in outputs/logs/data.log."""
    from stages import data as data_stage

    params = default_params
    params["data"].update(_tv.copy_cfg(tmp_path))
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    log_file = tmp_path / "logs" / "data.log"
    out = tmp_path / "out"
    assert data_stage.main(["--params", str(params_file), "--out", str(out), "--log", str(log_file),
                            "--no-progress"]) == 0
    text = log_file.read_text()
    assert re.search(STAMP + r"data INFO started$", text, re.M)
    assert re.search(STAMP + rf"cpal\.data\.voc12 INFO VOC 2012 written to {re.escape(str(out))}", text, re.M)


FAULTS = """
import resource, sys
import numpy as np
from cpal.core.runtime import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
def faults_of_one_buffer():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buf = np.ones(64 * 2**20, dtype=np.uint8)  # 64 MiB: above glibc's largest mmap threshold
    del buf
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_of_one_buffer()
print(kept, faults_of_one_buffer())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_reused_without_new_page_faults() -> None:
    """A buffer freed and allocated again is page-faulted in anew by default (mmap / munmap); with
    keep_freed_memory (every stage) the second one reuses the heap."""
    import subprocess

    def run(mode: str) -> tuple[str, int]:
        out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).resolve().parents[1]).stdout.split()
        return out[0], int(out[1])

    kept, faults = run("keep")
    _, default_faults = run("default")
    assert kept == "True"
    assert default_faults >= 32  # the default: touched anew (at least once per 2 MiB huge page)
    assert faults <= default_faults // 10
