"""Multi-process (DDP) training through `torchrun`: process group, data split, collectives, relaunch.

Environment variables, all set by torchrun (`torchrun --nproc_per_node N -m stages.train_cls -- ...`):
  RANK        this process's index, 0..WORLD_SIZE-1 (rank 0 evaluates, logs and writes every file)
  WORLD_SIZE  number of processes; absent means a plain single-process run (no process group)
  LOCAL_RANK  index on this machine: the GPU a process uses (cuda:LOCAL_RANK)
  MASTER_ADDR, MASTER_PORT  where the processes meet (torchrun sets them)
The backend is NCCL on CUDA and gloo on CPU (the CPU path is how the tests run). torchrun with a single
process (WORLD_SIZE 1, MASTER_ADDR set) joins a one-rank group and runs the same DDP code, so
`torchrun --nproc_per_node 1` exercises NCCL, the DDP wrapper and the collectives on a one-GPU machine
(tests/gpu); a plain run never creates a group.
A stage run as usual (`python -m stages.train_cls ...`, which Snakemake and DVC call) with
`run.nproc_per_node` N > 1 re-executes itself under `torchrun --standalone --nproc_per_node N`
(see :func:`relaunch_under_torchrun`); CPAL_TORCHRUN_RELAUNCHED=1 tells the children so. Calling
torchrun by hand works too; put "--" before the stage's arguments (torchrun's own parser would take
`--log` for an abbreviation of its options):
    torchrun --standalone --nproc_per_node 4 -m stages.train_cls -- --params params.yaml --data ... --out ...

`batch_size` stays the global batch: :class:`GlobalBatchSampler` draws the permutation the
single-process DataLoader drew and hands rank r the r-th contiguous chunk of every global batch, so
the union of the ranks' batches at step t is the single-process batch at step t.
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler

from cpal.core.runtime import stage_loggers

RELAUNCH_ENV = "CPAL_TORCHRUN_RELAUNCHED"


def env_world_size() -> int:
    """WORLD_SIZE from torchrun's environment (1 outside torchrun), with a clear error when malformed."""
    return _env_int("WORLD_SIZE", 1)


def env_rank() -> int:
    return _env_int("RANK", 0)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} = {value!r} is not an integer (set by torchrun)") from None


@dataclass
class DistContext:
    """Where this process stands: rank, world size, its device and the process groups it uses.

    ``group`` carries the CPAL bank / alignment collectives and the loss normalisers, ``bn_group`` the
    synchronised BatchNorm statistics: collectives that run inside autograd's backward pass get groups
    of their own, so their order can never interleave with DDP's gradient all-reduce or with each other.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    group: Any = None
    bn_group: Any = None
    owns_process_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """A process group is in use: several processes, or torchrun with one (see :func:`setup`)."""
        return self.world_size > 1 or self.group is not None

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self.group)

    def all_reduce_sum(self, values: Sequence[float]) -> list[float]:
        """Sum of per-rank float lists (float64, so sums of per-image losses stay exact enough)."""
        if not self.distributed:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, group=self.group)
        return t.tolist()

    def broadcast_float(self, value: float | None) -> float | None:
        """Rank 0's value on every rank (None travels as NaN and comes back as None)."""
        if not self.distributed:
            return value
        t = torch.tensor([math.nan if value is None else float(value)], dtype=torch.float64, device=self.device)
        dist.broadcast(t, src=0, group=self.group)
        out = float(t.item())
        return None if math.isnan(out) else out

    def close(self) -> None:
        """Destroy the process group if this context created it (a caller's own group stays)."""
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_process_group = False


def launched_alone() -> bool:
    """torchrun (or another env:// launcher) started this process as the only rank: WORLD_SIZE 1 with a
    rendezvous address. Such a run joins a one-rank process group (DDP at world size 1)."""
    return os.environ.get("WORLD_SIZE") == "1" and bool(os.environ.get("MASTER_ADDR"))


def setup(device_name: str) -> DistContext:
    """Join the torchrun job described by the environment, or a single-process context without one.

    ``device_name`` is params `run.device` (auto | cpu | cuda); under DDP a CUDA process takes
    cuda:LOCAL_RANK. A process group someone already created (a test harness) is reused, not destroyed.
    One training per created group: gloo may fail to reconnect when a process re-creates the default
    group after destroying it, so a caller running several trainings in one job creates the group itself.
    """
    from cpal.core.training import resolve_device

    world = env_world_size()
    device = resolve_device(device_name)
    if world <= 1 and not launched_alone():
        return DistContext(device=device)
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    rank, local_rank = env_rank(), _env_int("LOCAL_RANK", 0)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK = {local_rank} but only {torch.cuda.device_count()} CUDA device(s) are "
                               "visible: use torchrun --nproc_per_node <= the GPU count (run.nproc_per_node)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
        owns = True
    if dist.get_world_size() != world:
        raise RuntimeError(f"process group of size {dist.get_world_size()} but WORLD_SIZE = {world}")
    rank = dist.get_rank()
    group = dist.new_group(backend=backend)
    bn_group = dist.new_group(backend=backend)
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=device, group=group,
                       bn_group=bn_group, owns_process_group=owns)


# ----------------------------------------------------------------------------------------------------
# Data: the same global batches as one process


class GlobalBatchSampler(Sampler[list[int]]):
    """Rank ``rank``'s share of the global batches of one seeded permutation.

    The permutation is exactly the one ``DataLoader(shuffle=True, generator=Generator().manual_seed(seed))``
    draws (the loader first takes one int64 from the generator for its base seed, then the sampler's
    randperm), so a single-process run keeps its batch order. Each global batch of ``batch_size`` indices
    is cut into ``world_size`` contiguous chunks; rank r gets chunk r. A final partial batch (drop_last
    false) is cut as evenly as possible, earlier ranks taking the extra images.
    """

    def __init__(self, n: int, batch_size: int, seed: int, drop_last: bool, rank: int = 0, world_size: int = 1,
                 key: str = "batch_size") -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"GlobalBatchSampler: rank {rank} outside 0..{world_size - 1}")
        if batch_size < 1 or batch_size % world_size:
            raise ValueError(f"{key} = {batch_size} (the global batch) must be a positive multiple of the "
                             f"{world_size} processes (run.nproc_per_node / WORLD_SIZE)")
        tail = 0 if drop_last else n % batch_size
        if 0 < tail < world_size:
            raise ValueError(f"{key} = {batch_size} over {n} images leaves a last batch of {tail} image(s), fewer "
                             f"than the {world_size} processes: set drop_last true or pick another {key}")
        self.n, self.batch_size, self.seed, self.drop_last = n, batch_size, seed, drop_last
        self.rank, self.world_size = rank, world_size

    def permutation(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed)
        torch.empty((), dtype=torch.int64).random_(generator=g)  # the DataLoader's base-seed draw
        return torch.randperm(self.n, generator=g).tolist()

    def global_batches(self) -> list[list[int]]:
        perm = self.permutation()
        stop = (self.n // self.batch_size) * self.batch_size if self.drop_last else self.n
        return [perm[i:i + self.batch_size] for i in range(0, stop, self.batch_size)]

    def chunk(self, batch: list[int]) -> list[int]:
        """This rank's contiguous part of one global batch."""
        base, extra = divmod(len(batch), self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return batch[start:start + base + (self.rank < extra)]

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.global_batches():
            yield self.chunk(batch)

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else math.ceil(self.n / self.batch_size)

    def global_size(self, step: int) -> int:
        """Images in global batch ``step`` of an epoch (batch_size except a final partial one)."""
        return min(self.batch_size, self.n - step * self.batch_size)


# ----------------------------------------------------------------------------------------------------
# Collectives used inside the model


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks with a gradient: backward sums the ranks' output gradients (d sum_r L_r / d x)."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        out = tensor.detach().clone().contiguous()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.detach().clone().contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def all_reduce_sum(tensor: torch.Tensor, group: Any) -> torch.Tensor:
    """Differentiable sum over the ranks of ``group``. With DDP averaging parameter gradients over W
    ranks, each rank's loss must be its share of the global loss times W (true of per-image means over
    equal chunks): the gradient is then the single-process one. Every rank must call it, and every rank
    must run its backward (keep the result in the loss, e.g. ``loss + 0 * result.sum()``)."""
    return _AllReduceSum.apply(tensor, group)


@torch.no_grad()
def all_gather_rows(tensor: torch.Tensor, group: Any) -> torch.Tensor:
    """Every rank's rows (dim 0) concatenated in rank order; ranks may hold different row counts
    (sizes are gathered first, rows padded to the largest, then trimmed)."""
    world = dist.get_world_size(group)
    count = torch.tensor([tensor.shape[0]], dtype=torch.long, device=tensor.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    sizes = [int(c) for c in counts]
    longest = max(sizes)
    if longest == 0:
        return tensor.new_zeros((0, *tensor.shape[1:]))
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)])


# ----------------------------------------------------------------------------------------------------
# Synchronised BatchNorm


class GlooSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Synchronised BatchNorm for CPU tensors (gloo). torch.nn.SyncBatchNorm refuses non-GPU input in
    training (its kernels, batch_norm_stats and friends, exist only for CUDA) and DDP refuses it on CPU
    modules. Here the statistics over every rank's images come from two differentiable all-reduces (sum,
    then sum of squared deviations), whose backward sums the ranks' gradients as torch's does. Eval mode,
    or a single process, is plain BatchNorm. Same parameters and buffers as BatchNorm2d, so checkpoints
    load into the unconverted model."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group: Any = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:  # noqa: A002 (torch's name)
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 (torch's name)
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        if not self.training or not dist.is_initialized() or dist.get_world_size(group) < 2:
            return super().forward(input)
        self._check_input_dim(input)
        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        channels = input.shape[1]
        count = input.new_full((1,), input.numel() // channels)
        stats = all_reduce_sum(torch.cat([input.sum(dims), count]), group)
        total = stats[-1].detach()
        mean = stats[:channels] / total
        centred = input - mean.view(shape)
        var = all_reduce_sum((centred * centred).sum(dims), group) / total
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                unbiased = var.detach() * total / (total - 1).clamp(min=1)
                self.running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(unbiased, alpha=momentum)
        return out


def _gloo_sync_batchnorm(module: nn.Module, group: Any) -> nn.Module:
    """Every BatchNorm layer of ``module`` -> GlooSyncBatchNorm sharing its parameters and buffers."""
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlooSyncBatchNorm):
        out = GlooSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                module.track_running_stats, process_group=group)
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
    for name, child in module.named_children():
        out.add_module(name, _gloo_sync_batchnorm(child, group))
    return out


def convert_sync_batchnorm(module: nn.Module, ctx: DistContext) -> nn.Module:
    """BatchNorm layers -> synchronised ones over ``ctx.bn_group`` (torch's on CUDA, gloo's on CPU)."""
    if not ctx.distributed:
        return module
    if ctx.device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group=ctx.bn_group)
    return _gloo_sync_batchnorm(module, ctx.bn_group)


def wrap_ddp(model: nn.Module, ctx: DistContext, find_unused_parameters: bool = False) -> nn.Module:
    """DistributedDataParallel around ``model`` (unchanged in a single process).

    No buffer broadcast before each forward: the CPAL support bank is a buffer that every rank fills with
    the gathered batch, so all ranks hold the same bank; a broadcast would only copy rank 0's over it.
    (Buffers are still synchronised once at construction, when all ranks hold the same ones anyway.)
    """
    if not ctx.distributed:
        return model
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    no_sync = ({"forward_sync_buffers": False}
               if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
               else {"broadcast_buffers": False})  # torch 2.14 deprecates broadcast_buffers
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused_parameters,
                                   **no_sync)


def local_batch_size(batch_size: int, ctx: DistContext, key: str) -> int:
    """The per-process share of the global ``batch_size`` (a clear error if it does not divide)."""
    if batch_size % ctx.world_size:
        raise ValueError(f"{key} = {batch_size} (the global batch) is not divisible by the {ctx.world_size} "
                         "processes (run.nproc_per_node / WORLD_SIZE)")
    return batch_size // ctx.world_size


# ----------------------------------------------------------------------------------------------------
# Launching


def torchrun_command(nproc: int, target: Sequence[str]) -> list[str]:
    """`python -m torch.distributed.run --standalone --nproc_per_node N <target>` (torchrun, from this
    interpreter); ``target`` is ``["-m", module, *args]`` or ``[script, *args]``."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *target]


def relaunch_under_torchrun(module: str, argv: Sequence[str], nproc: int, log: logging.Logger,
                            replace: bool = True) -> int | None:
    """Run ``module`` under torchrun in ``nproc`` processes, when asked to (nproc > 1) and not already
    under torchrun (no WORLD_SIZE), so that Snakemake and DVC keep calling the stage as before.

    Returns None when nothing is to be done. With ``replace`` (a stage run from the command line) this
    process becomes torchrun (os.execve: signals reach torchrun, which forwards them to the workers, and
    its exit status is the stage's); otherwise torchrun runs as a child and its exit status is returned.
    """
    if nproc <= 1 or "WORLD_SIZE" in os.environ:
        return None
    cmd = torchrun_command(nproc, ["-m", module, "--", *argv])
    env = {**os.environ, RELAUNCH_ENV: "1"}
    log.info("run.nproc_per_node = %d: running under torchrun: %s", nproc, " ".join(cmd))
    for handler in log.handlers:
        handler.flush()
    if not replace:
        return subprocess.run(cmd, env=env, check=False).returncode
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, cmd, env)
    return None  # not reached


def stage_argv(argv: Sequence[str] | None) -> list[str]:
    """A stage's own arguments: ``argv`` or sys.argv[1:], without the "--" that shields them from torchrun.

    torchrun's parser rejects a stage option that abbreviates several of its own (`--log` matches
    `--log-dir`, `--log_dir`, ...) even after the script name, so the relaunch (and anyone calling
    torchrun by hand) puts "--" before the stage's arguments; Python 3.11's argparse passes it on.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    return args[1:] if args[:1] == ["--"] else args


def rank_logging(log: logging.Logger, log_path: str | os.PathLike[str] | None) -> logging.Logger:
    """Adjust a stage logger (from cpal.core.runtime.setup_logging, opened without a file) for this rank.

    Rank 0 logs INFO to stderr and to ``log_path``, appended when the stage relaunched itself (the
    parent's "started" line stays first); other ranks log warnings and errors to stderr only.
    """
    targets = stage_loggers(log)  # the library's messages follow the stage's (cpal.core.runtime.setup_logging)
    if env_rank() != 0:
        for target in targets:
            target.setLevel(logging.WARNING)
        return log
    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        mode = "a" if os.environ.get(RELAUNCH_ENV) else "w"
        handler = logging.FileHandler(log_path, mode=mode)
        handler.setFormatter(log.handlers[0].formatter if log.handlers else None)
        for target in targets:
            target.addHandler(handler)
    return log


def loss_normaliser(value: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum over ranks of a per-rank loss denominator (no gradient): the global batch's denominator."""
    value = value.detach().to(torch.float64).reshape(1).clone()
    if ctx.distributed:
        dist.all_reduce(value, group=ctx.group)
    return value[0]

