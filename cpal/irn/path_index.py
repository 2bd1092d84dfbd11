"""Inter-pixel pairs within a radius and the grid cells on the path between them (IRN, Ahn et al. 2019).

IRN relates a pixel to every pixel within a radius on the stride-4 feature grid. Each unordered pair is
listed once: the directions (dy, dx) form a half-plane (dy > 0, or dy == 0 and dx > 0) inside the open
disc dy^2 + dx^2 < radius^2. A pair's affinity is 1 minus the largest boundary score on the grid cells
its segment crosses: the cells of the segment's bounding box within distance 1 of the line through
source and destination, both ends included.

Everything here works on dense (..., h, w) tensors by slicing one padded copy, so the same code serves
the training loss (batched, with gradients) and the random walk (one image, any device). Index d of the
direction axis always refers to ``PathIndex.directions[d]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def search_directions(radius: int) -> list[tuple[int, int]]:
    """Half-plane offsets (dy, dx) with 0 < dy^2 + dx^2 < radius^2: each unordered pair once."""
    if not isinstance(radius, int) or radius < 2:
        raise ValueError(f"path index radius must be an integer >= 2, got {radius!r}")
    r2 = radius * radius
    dirs = [(0, dx) for dx in range(1, radius)]
    dirs += [(dy, dx) for dy in range(1, radius) for dx in range(-radius + 1, radius) if dy * dy + dx * dx < r2]
    return dirs


def path_cells(dy: int, dx: int) -> tuple[tuple[int, int], ...]:
    """Cells (y, x), relative to the source, that the segment to (dy, dx) crosses; ends included."""
    length2 = dy * dy + dx * dx
    if length2 == 0:
        raise ValueError("a path needs a non-zero direction")
    cells = []
    for y in range(min(0, dy), max(0, dy) + 1):
        for x in range(min(0, dx), max(0, dx) + 1):
            if (dy * x - dx * y) ** 2 < length2:  # squared distance to the line < 1
                cells.append((y, x))
    return tuple(cells)


@dataclass(frozen=True)
class PathIndex:
    """Directions and paths of one radius; build with :meth:`of`."""

    radius: int
    directions: tuple[tuple[int, int], ...]
    paths: tuple[tuple[tuple[int, int], ...], ...]

    @classmethod
    def of(cls, radius: int) -> PathIndex:
        dirs = tuple(search_directions(radius))
        return cls(radius, dirs, tuple(path_cells(dy, dx) for dy, dx in dirs))

    def __len__(self) -> int:
        return len(self.directions)

    @property
    def pad(self) -> int:
        """Every offset (of a destination or a path cell) has 0 <= y <= pad and |x| <= pad."""
        return self.radius - 1


def _padded(x: torch.Tensor, pad: int, fill: float | int) -> torch.Tensor:
    """x (..., h, w) with `pad` rows below and `pad` columns either side filled with `fill`."""
    h, w = x.shape[-2:]
    out = x.new_full((*x.shape[:-2], h + pad, w + 2 * pad), fill)
    out[..., :h, pad:pad + w] = x
    return out


def _offset_view(padded: torch.Tensor, pad: int, h: int, w: int, dy: int, dx: int) -> torch.Tensor:
    """view[..., y, x] = original[..., y + dy, x + dx] (fill where that lies outside)."""
    return padded[..., dy:dy + h, pad + dx:pad + dx + w]


def _path_stacks(padded: torch.Tensor, index: PathIndex, h: int, w: int):
    """Per direction, the values of its path cells stacked (cells, ..., h, w)."""
    for cells in index.paths:
        yield torch.stack([_offset_view(padded, index.pad, h, w, y, x) for y, x in cells], dim=0)


class _PathMax(torch.autograd.Function):
    """Largest value on each path, with the gradient routed to the cell that holds it.

    Autograd through ``stack(views).amax`` would allocate a zero copy of the padded grid for every
    path cell in the backward pass (about 2,000 per batch at radius 10), which made that backward
    pass 10x slower than the forward. Here the forward keeps each maximum's flat index and the backward
    is one scatter-add. Equal to amax's gradient except at exact ties between two cells (amax splits
    the gradient, this gives it to the first), which are measure-zero for sigmoid outputs.
    """

    @staticmethod
    def forward(ctx, padded: torch.Tensor, index: PathIndex, h: int, w: int) -> torch.Tensor:
        pad = index.pad
        width = padded.shape[-1]
        base = (torch.arange(h, device=padded.device)[:, None] * width
                + torch.arange(w, device=padded.device)[None, :] + pad)
        values, where = [], []
        for cells, stacked in zip(index.paths, _path_stacks(padded, index, h, w), strict=True):
            best, arg = stacked.max(dim=0)
            offsets = torch.tensor([y * width + x for y, x in cells], device=padded.device)
            values.append(best)
            where.append(base + offsets[arg])
        out = torch.stack(values, dim=1)
        ctx.save_for_backward(torch.stack(where, dim=1))
        ctx.padded_shape = padded.shape
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (where,) = ctx.saved_tensors
        shape = ctx.padded_shape
        lead = grad.shape[0]
        flat = grad.new_zeros((lead, shape[-2] * shape[-1]))
        flat.scatter_add_(1, where.reshape(lead, -1), grad.reshape(lead, -1))
        return flat.view(shape), None, None, None


def boundary_to_affinity(boundary: torch.Tensor, index: PathIndex) -> torch.Tensor:
    """Affinity (B, D, h, w) = 1 - max boundary on the path from (y, x) to (y, x) + directions[d].

    boundary (B, h, w) in [0, 1]. Pairs whose destination leaves the grid get affinity 0 (the outside
    counts as boundary). Differentiable: the training loss back-propagates through it.
    """
    if boundary.dim() != 3:
        raise ValueError(f"boundary must be (B, h, w), got {tuple(boundary.shape)}")
    h, w = boundary.shape[-2:]
    pad = index.pad
    padded = _padded(boundary, pad, 1.0)
    if not (torch.is_grad_enabled() and padded.requires_grad):  # the random walk: no indices to keep
        return 1.0 - torch.stack([stacked.amax(dim=0) for stacked in _path_stacks(padded, index, h, w)], dim=1)
    return 1.0 - _PathMax.apply(padded, index, h, w)


def destination_valid(h: int, w: int, index: PathIndex, device: torch.device | str = "cpu") -> torch.Tensor:
    """(D, h, w) bool: the destination of direction d from (y, x) lies on the h x w grid."""
    ones = torch.ones((h, w), dtype=torch.bool, device=device)
    padded = _padded(ones, index.pad, False)
    return torch.stack([_offset_view(padded, index.pad, h, w, dy, dx) for dy, dx in index.directions])


def pair_labels(label: torch.Tensor, index: PathIndex, ignore_index: int = 255) -> dict[str, torch.Tensor]:
    """Inter-pixel relation labels (B, D, h, w) as float masks from a label grid (B, h, w).

    ``bg_pos``: both ends background (0); ``fg_pos``: both ends the same foreground class; ``neg``: two
    different classes. A pair touching `ignore_index` or leaving the grid is in none of them.
    """
    if label.dim() != 3:
        raise ValueError(f"label must be (B, h, w), got {tuple(label.shape)}")
    label = label.long()
    h, w = label.shape[-2:]
    padded = _padded(label, index.pad, ignore_index)
    src_ok = label != ignore_index
    bg_pos, fg_pos, neg = [], [], []
    for dy, dx in index.directions:
        dst = _offset_view(padded, index.pad, h, w, dy, dx)
        valid = src_ok & (dst != ignore_index)
        same = label == dst
        bg_pos.append(valid & same & (label == 0))
        fg_pos.append(valid & same & (label != 0))
        neg.append(valid & ~same)
    return {name: torch.stack(masks, dim=1).float()
            for name, masks in (("bg_pos", bg_pos), ("fg_pos", fg_pos), ("neg", neg))}


def pair_list(h: int, w: int, index: PathIndex,
              device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat indices of every in-grid pair: (source, destination, position in the (D, h, w) affinity).

    The third tensor indexes ``affinity.reshape(-1)`` of one image's (D, h, w) affinity, so sparse
    matrices are built without a Python loop over pairs.
    """
    valid = destination_valid(h, w, index, device).reshape(-1)
    flat = valid.nonzero().squeeze(1)
    d, src = flat // (h * w), flat % (h * w)
    dirs = torch.tensor(index.directions, dtype=torch.long, device=device)
    dst = src + dirs[d, 0] * w + dirs[d, 1]
    return src, dst, flat
