"""Training plumbing shared by the classifier, IRN and DeepLab stages.

Checkpoints hold only tensors and plain Python containers so they load with
torch.load(weights_only=True); a file carrying a pickled object is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cpal.core.io import atomic_path, write_json
from cpal.core.runtime import cuda_peak_mib, peak_rss_mib


class CheckpointError(ValueError):
    """A checkpoint cannot be used: unreadable, pickled objects, or made for another setting."""


def load_for_new_images(path: Path, fmt: int, stage: str, classes: list[str] | None, source: str
                        ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(checkpoint, meta) of a `stage` model.pt for use without a params file (cpal-predict): the format must
    be `fmt`, and `classes` (None: no check) must equal the class list it was trained for, in order: its
    output channels would otherwise be read as the wrong classes without any error. Refusals name both lists."""
    ckpt = load_checkpoint(path, map_location="cpu")
    meta = ckpt.get("meta", {})
    if meta.get("format") != fmt:
        raise CheckpointError(f"{path} has checkpoint format {meta.get('format')!r}, but a {stage} model.pt of this "
                              f"code has format {fmt}; is it the {stage} checkpoint?")
    kind = meta.get("kind", "train_cls")  # train_seg records its kind since format 3; classifiers did not always
    if kind != stage:
        raise CheckpointError(f"{path} is a {kind} checkpoint, not a {stage} one; is it the {stage} checkpoint?")
    trained = list(meta.get("classes") or [])
    if classes is not None and trained != list(classes):
        raise CheckpointError(
            f"{path} was trained for {len(trained)} classes {trained}, but {source} asks for {len(classes)} "
            f"classes {list(classes)}; use the checkpoint trained on these classes or give its class list"
        )
    return ckpt, meta


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present; asking for CUDA without one is an error, not a silent CPU run."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run.device = 'cuda' but no CUDA device is available (use 'auto' or 'cpu')")
    return torch.device(name)


def set_determinism(device: torch.device) -> None:
    """Deterministic kernels on CPU (same seed, same numbers); cuDNN autotuning on GPU for speed."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    else:
        torch.use_deterministic_algorithms(True, warn_only=True)


def channels_last(x: Any) -> Any:
    """A module or 4-d batch in channels_last, the layout every network stage runs in.

    oneDNN's depthwise convolutions (EfficientNet-Lite0) run 1.2-1.3x faster in it on CPU, forward and
    backward (results/benchmarks.md); values equal the default layout's up to float rounding.
    """
    if isinstance(x, torch.nn.Module):
        return x.to(memory_format=torch.channels_last)
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def poly_lambda(max_iters: int, power: float = 0.9, warmup_iters: int = 0):
    """LR multiplier: linear warm-up, then (1 - it / max_iters) ** power (IRN / DeepLab schedule)."""

    def factor(it: int) -> float:
        if warmup_iters and it < warmup_iters:
            return (it + 1) / warmup_iters
        return max(0.0, 1.0 - it / max(1, max_iters)) ** power

    return factor


def build_optimizer(
    groups: list[dict[str, Any]], name: str, lr: float, momentum: float, weight_decay: float
) -> torch.optim.Optimizer:
    """SGD, AdamW or Adam with every hyper-parameter passed by keyword (IRN passed weight decay as momentum).

    Adam (AMN's optimiser) adds the weight decay to the gradient (L2), AdamW decouples it.
    """
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer {name!r} is not one of sgd | adamw | adam")


def amp_scaler(device: torch.device, amp: bool) -> torch.amp.GradScaler:
    """The grad scaler of a training loop: live only under AMP on CUDA (params `amp` is ignored on CPU);
    ``scaler.is_enabled()`` says whether the loop runs under autocast."""
    return torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and bool(amp))


def scaled_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, scheduler: Any,
                loss: torch.Tensor, clip_params: Any = None, clip_norm: float = 0.0) -> None:
    """One optimisation step through the grad scaler (a plain step when it is disabled); the gradient
    norm clipped when ``clip_norm`` > 0, after unscaling so the threshold means the same under AMP."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if clip_norm > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(clip_params, clip_norm)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()


class EpochMeans:
    """Per-image means of an epoch's loss terms, for the progress bar and the epoch record of every training
    stage: each batch adds its terms times its image count; under DDP the sums are reduced over the ranks."""

    def __init__(self, keys: tuple[str, ...]) -> None:
        self.sums = dict.fromkeys(keys, 0.0)
        self.seen = 0

    def add(self, terms: dict[str, Any], n: int) -> None:
        self.seen += n
        for key in self.sums:
            self.sums[key] += float(terms[key].detach()) * n

    @property
    def loss(self) -> float:
        """The running mean of ``loss`` (the progress bar's figure)."""
        return self.sums["loss"] / max(self.seen, 1)

    def reduce(self, ctx: Any) -> None:
        """Every rank's sums and image counts added up (``ctx``: cpal.core.distributed.DistContext)."""
        *totals, seen = ctx.all_reduce_sum([*self.sums.values(), self.seen])
        self.sums = dict(zip(self.sums, totals, strict=True))
        self.seen = int(round(seen))

    def means(self) -> dict[str, float]:
        return {key: value / max(self.seen, 1) for key, value in self.sums.items()}


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states as tensors and plain lists (weights_only-loadable)."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = state["numpy"]
    np.random.set_state((npst[0], npst[1].numpy().astype(np.uint32), npst[2], npst[3], npst[4]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Atomic, and byte-identical for equal weights: torch.save given a file object names the archive
    inside it after nothing random (given the temporary path, it would use that random name, and DVC
    would rerun everything downstream of an unchanged model)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        torch.save(state, fh)


def check_meta_keys(meta: dict[str, Any], expected: dict[str, Any], path: str | os.PathLike[str],
                    stage: str) -> None:
    """A checkpoint whose meta differs from ``expected`` in any key is refused, naming the key, both values
    and the stage to rerun."""
    for key, value in expected.items():
        if meta.get(key) != value:
            raise CheckpointError(f"{path} was trained with {key} = {meta.get(key)!r}, but the current settings need "
                                  f"{key} = {value!r}; retrain (rerun {stage}) or change params")


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load with weights_only=True; errors name the file and say why it was refused."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError or EOFError depending on the damage
        reason = "it carries pickled Python objects" if "weights_only" in str(exc) else "unreadable or truncated"
        raise CheckpointError(f"refusing checkpoint {path}: {reason} ({type(exc).__name__})") from exc


def config_fingerprint(*parts: Any) -> str:
    """Hash of the settings a checkpoint was trained under: resume only into the same settings."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def save_resume(path: str | os.PathLike[str], fingerprint: str, stateful: dict[str, Any], **extra: Any) -> None:
    """Per-epoch resume checkpoint: every stateful object's state_dict, the RNG states and `extra`."""
    save_checkpoint(path, {"fingerprint": fingerprint, "rng": rng_state(),
                           **{name: obj.state_dict() for name, obj in stateful.items()}, **extra})


def load_resume(path: str | os.PathLike[str], fingerprint: str, stateful: dict[str, Any],
                device: torch.device, log: Any) -> dict[str, Any] | None:
    """Restore `stateful` objects and the RNG from a resume checkpoint made with the same settings.

    Returns the checkpoint (for its epoch, history, ...) or None when there is none, it is unusable, or it
    was made with other settings (then training starts over and says why).
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        state = load_checkpoint(path, map_location=device)
    except CheckpointError as exc:
        log.warning("ignoring unusable resume checkpoint: %s", exc)
        return None
    if state.get("fingerprint") != fingerprint:
        log.info("ignoring %s: it was made with other settings or inputs", path)
        return None
    for name, obj in stateful.items():
        obj.load_state_dict(state[name])
    set_rng_state(state["rng"])
    log.info("resuming from %s after epoch %d", path, state["epoch"])
    return state


def open_dvclive(path: str | os.PathLike[str], resume: bool):
    """Per-epoch metrics through dvclive, never creating a DVC experiment or editing dvc.yaml by itself."""
    try:
        from dvclive import Live
    except ImportError:  # dvclive is a declared dependency; stay usable without it
        return None
    return Live(dir=str(path), resume=resume, save_dvc_exp=False, dvcyaml=None, report=None, monitor_system=False)


def timing_summary(history: list[dict[str, Any]], device: torch.device, world_size: int = 1,
                   amp: bool = False) -> dict[str, Any]:
    """timing.json of a training stage: per-epoch seconds and images/s (kept out of metrics.json, which
    is byte-identical across runs with the same seed on CPU), whether AMP ran, the process's peak resident
    memory and torch's peak CUDA allocation (None on CPU): what the stage needed of the machine."""
    timing: dict[str, Any] = {
        "device": str(device),
        "amp": bool(amp),
        "seconds_per_epoch": float(np.median([h["seconds"] for h in history])) if history else None,
        "images_per_s": float(np.median([h["images_per_s"] for h in history])) if history else None,
        "epoch_seconds": [h["seconds"] for h in history],
        "peak_rss_mib": peak_rss_mib(),
        "cuda_peak_mib": cuda_peak_mib() if device.type == "cuda" else None,
    }
    if world_size > 1:
        timing["processes"] = world_size
    return timing


def write_training_outputs(out_dir: Path, is_main: bool, checkpoint: dict[str, Any], metrics: dict[str, Any],
                           timing: dict[str, Any], resume_path: Path) -> None:
    """model.pt, metrics.json, timing.json; the resume file goes. Only the main process writes (DDP)."""
    if not is_main:
        return
    save_checkpoint(out_dir / "model.pt", checkpoint)
    write_json(out_dir / "metrics.json", metrics)
    write_json(out_dir / "timing.json", timing)
    resume_path.unlink(missing_ok=True)
