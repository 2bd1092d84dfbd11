"""What every stage needs around its real work: a log file, seeds, the device, the machine's name."""

from __future__ import annotations

import logging
import multiprocessing
import os
import platform
import random
import sys
from pathlib import Path

import numpy as np

# The project's library modules log under this package logger (`logging.getLogger(__name__)`).
LIBRARY_LOGGER = "cpal"


def stage_loggers(logger: logging.Logger) -> list[logging.Logger]:
    """The stage's own logger and, unless it already is one of them, the library's package logger."""
    if logger.name == LIBRARY_LOGGER or logger.name.startswith(LIBRARY_LOGGER + "."):
        return [logger]
    return [logger, logging.getLogger(LIBRARY_LOGGER)]


def setup_logging(log_path: str | os.PathLike[str] | None, name: str) -> logging.Logger:
    """Log to stderr and, when given, to a per-stage file (Snakemake's `log:`), overwritten per run.

    The same handlers go on the `cpal` package logger, so what the library modules log (downloads
    resuming, extraction, "written to ...") lands in the stage's log with a timestamp instead of
    reaching stderr bare through logging's last-resort handler, or nowhere below WARNING.
    """
    fmt = logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_path, mode="w"))
    for handler in handlers:
        handler.setFormatter(fmt)
    logger = logging.getLogger(name)
    targets = stage_loggers(logger)
    for target in targets:
        target.setLevel(logging.INFO)
        target.handlers.clear()
        target.propagate = False
        for handler in handlers:
            target.addHandler(handler)
    return logger


def seed_everything(seed: int) -> None:
    """Seed python, numpy and (if imported or importable) torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        import torch
    except ImportError:  # torch is only needed by the model stages
        return
    torch.manual_seed(seed)


def cpu_model() -> str | None:
    """The CPU's model name (Linux /proc/cpuinfo), None where unknown: machines with the same core count
    differ by 3x on the same stage, so figures name it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def machine_description() -> str:
    """One line naming the machine a number or figure came from."""
    cpu = cpu_model()
    parts = [f"{platform.system()} {platform.machine()}",
             f"{os.cpu_count()} CPU cores" + (f" ({cpu})" if cpu else "")]
    try:
        import torch

        if torch.cuda.is_available():
            parts.append(f"GPU {torch.cuda.get_device_name(0)}")
        else:
            parts.append("no GPU")
        parts.append(f"torch {torch.__version__.split('+')[0]}")
    except ImportError:
        pass
    parts.append(f"Python {platform.python_version()}")
    return ", ".join(parts)


def process_start_epoch() -> float | None:
    """When this process was created (seconds since the epoch; Linux /proc), so timings include imports."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])  # field 22 of stat(5); fields[0] is field 3
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
        return boot + start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB, macOS bytes)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def process_pool_context() -> multiprocessing.context.BaseContext:
    """Start method for worker pools: never plain fork (the parent may hold torch / BLAS threads);
    forkserver is cheap where it exists."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


def cuda_peak_mib() -> float | None:
    """Peak CUDA memory torch allocated in this process on its current device (MiB); None when this process
    never initialised CUDA (a CPU run, or a CPU-only stage on a GPU machine). torch is not imported here:
    stages without a network must not pay for it."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return None
    return torch.cuda.max_memory_allocated() / 2**20


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_memory() -> bool:
    """Serve every allocation from the heap and hand freed memory back to the kernel only past 1 GiB (glibc).

    By default glibc maps each block above 128 KiB-32 MiB afresh with mmap and unmaps it on free, so
    every activation tensor of every forward and backward pass is page-faulted in anew: on 2 cores that
    first touch was a quarter of a Lite0 forward (torch.profiler shows it as `aten::fill_` of the "same"
    padding), and a Lite0 forward of 16 images at 256 px ran 1.9x faster without it
    (docs/performance.md). The cost: a stage keeps its peak memory until it exits. Returns whether it took
    effect (False off glibc).
    """
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**30))
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False


def process_cost() -> str:
    """`start=<epoch> end=<epoch> wall_s=<s> peak_rss_mib=<this process>[ cuda_peak_mib=<MiB>]`.

    Children (pool workers) are not counted: a forked child reports its parent's RSS at fork time as
    its own peak, so RUSAGE_CHILDREN would mostly measure the parent again. `cuda_peak_mib` (torch's
    peak allocation on the process's GPU) only where the process used CUDA.
    """
    import time

    end = time.time()
    start = process_start_epoch()
    span = f"start={start:.3f} end={end:.3f} wall_s={end - start:.3f} " if start is not None else ""
    cuda = cuda_peak_mib()
    return f"{span}peak_rss_mib={peak_rss_mib():.0f}" + (f" cuda_peak_mib={cuda:.0f}" if cuda is not None else "")


class RunLockError(RuntimeError):
    """Another run holds the workspace; raised before this one starts any job."""


def hold_run_lock(path: str | os.PathLike[str]) -> None:
    """Take the workspace's run lock for the rest of this process, or refuse.

    Snakemake's own lock is a check followed by a write (two runs started together can both pass the
    check, then overwrite each other's lock files and outputs); an flock is atomic, and the kernel drops
    it when the process ends however it ends, so no stale lock survives a crash. The descriptor stays open
    on purpose: closing it would release the lock.
    """
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RunLockError(
            f"Error: Directory cannot be locked. Another Snakemake instance is running in this folder "
            f"(pid {holder}, lock {path}); wait for it to end. Nothing was run.") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
