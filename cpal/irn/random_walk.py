"""Random walk on the boundary-derived affinities (IRN's semantic propagation).

Affinity a_ij = (1 - max boundary on the path i -> j) ** beta for pairs within the radius, 1 on the
diagonal, symmetric; transition T = A D^-1 (columns sum to one); maps x (C, n) become x T^(2^exp_times).

The dense transition matrix of a VOC image at stride 4 (125 x 94 = 11.7k cells) is 550 MB in float32,
and squaring it eight times costs about 13 TFLOP. ``walk_sparse`` keeps only the pairs within the
radius (about 2 * D + 1 per cell) and applies T 2^exp_times times instead of squaring it: the same
product, O(n * D) memory, and 2^exp_times sparse products of (n x n) by (n x C). ``walk_dense`` is the
reference (IRN's own formulation), for small grids and for checking the sparse one.
"""

from __future__ import annotations

import warnings

import torch

from cpal.irn.path_index import PathIndex, boundary_to_affinity, pair_list


def _pair_weights(boundary: torch.Tensor, index: PathIndex, beta: float
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(source, destination, weight) of every in-grid pair, weight = affinity ** beta."""
    if boundary.dim() != 2:
        raise ValueError(f"boundary must be (h, w), got {tuple(boundary.shape)}")
    h, w = boundary.shape
    aff = boundary_to_affinity(boundary[None].float(), index)[0]
    src, dst, pos = pair_list(h, w, index, boundary.device)
    return src, dst, aff.reshape(-1)[pos].clamp_min(0).pow(beta)


def affinity_dense(boundary: torch.Tensor, index: PathIndex, beta: float) -> torch.Tensor:
    """Symmetric (n, n) affinity with a unit diagonal, n = h * w (row-major cells)."""
    n = boundary.numel()
    src, dst, weight = _pair_weights(boundary, index, beta)
    a = torch.eye(n, dtype=torch.float32, device=boundary.device)
    a[src, dst] = weight
    a[dst, src] = weight
    return a


def affinity_sparse(boundary: torch.Tensor, index: PathIndex, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The same matrix as :func:`affinity_dense` in CSR form, and its column sums (the degrees)."""
    n = boundary.numel()
    device = boundary.device
    src, dst, weight = _pair_weights(boundary, index, beta)
    diag = torch.arange(n, device=device)
    rows = torch.cat([src, dst, diag])
    cols = torch.cat([dst, src, diag])
    vals = torch.cat([weight, weight, torch.ones(n, device=device)])
    order = torch.argsort(rows * n + cols)  # entries are unique: each unordered pair is listed once
    crow = torch.zeros(n + 1, dtype=torch.long, device=device)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=n), 0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        a = torch.sparse_csr_tensor(crow, cols[order], vals[order], (n, n), check_invariants=False)
    degree = torch.ones(n, device=device).index_add_(0, src, weight).index_add_(0, dst, weight)
    return a, degree


def _check(maps: torch.Tensor, boundary: torch.Tensor, exp_times: int) -> None:
    if maps.dim() != 3 or maps.shape[1:] != boundary.shape:
        raise ValueError(f"maps must be (C, h, w) on the boundary grid {tuple(boundary.shape)}, "
                         f"got {tuple(maps.shape)}")
    if exp_times < 0:
        raise ValueError(f"exp_times must be >= 0, got {exp_times}")


def walk_dense(maps: torch.Tensor, boundary: torch.Tensor, index: PathIndex, beta: float,
               exp_times: int) -> torch.Tensor:
    """x T^(2^exp_times) with T squared exp_times times; maps (C, h, w), boundary (h, w) -> (C, h, w)."""
    _check(maps, boundary, exp_times)
    a = affinity_dense(boundary, index, beta)
    t = a / a.sum(dim=0, keepdim=True)
    for _ in range(exp_times):
        t = t @ t
    return (maps.reshape(maps.shape[0], -1).float() @ t).reshape(maps.shape)


def walk_sparse(maps: torch.Tensor, boundary: torch.Tensor, index: PathIndex, beta: float,
                exp_times: int) -> torch.Tensor:
    """The same product as :func:`walk_dense`, applying the sparse T 2^exp_times times.

    With A symmetric, one step x <- x A D^-1 is, per column, y <- (A y) / degree with y = x^T.
    """
    _check(maps, boundary, exp_times)
    a, degree = affinity_sparse(boundary, index, beta)
    y = maps.reshape(maps.shape[0], -1).float().t().contiguous()
    inv = (1.0 / degree)[:, None]
    for _ in range(2 ** exp_times):
        y = (a @ y) * inv
    return y.t().reshape(maps.shape)


def random_walk(maps: torch.Tensor, boundary: torch.Tensor, index: PathIndex, beta: float, exp_times: int,
                method: str = "sparse") -> torch.Tensor:
    """Propagate maps (C, h, w) over the grid of boundary (h, w); IRN first multiplies maps by (1 - B)."""
    walk = {"sparse": walk_sparse, "dense": walk_dense}.get(method)
    if walk is None:
        raise ValueError(f"irn.walk = {method!r} is not one of sparse | dense")
    return walk(maps.float() * (1.0 - boundary.float()), boundary, index, beta, exp_times)
