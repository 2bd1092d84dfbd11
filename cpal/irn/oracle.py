"""Ground-truth class boundaries on IRN's stride-4 grid: an oracle for the random walk, for analysis only.

Why: when IRN's masks fall short, the boundary network and the walk (with its seeds) are two suspects. Walking
the same seeds over boundaries taken from the pixel labels (`irn.boundaries: ground_truth`) removes the first:
what is left is what the seeds and the walk can reach on this data. The masks it makes read ground truth, so
they are never pseudo-labels to report as weakly supervised.

A pixel is on a boundary when one of its 4-neighbours belongs to a class of higher id, once the ignore band
(255) around objects is filled with the nearest labelled pixel's class: background (0) is the lowest, so an
object's edge is drawn just outside it, and between two objects inside the lower class. A grid cell that holds
such a pixel is a boundary (1), every other cell 0: the walk neither starts from a boundary cell (seeds x (1 - B))
nor crosses it ((1 - max B on the path) ** beta), as it would with a perfect network's map. A cell an edge cuts
through is lost to both sides, as IRN's stride-4 grid loses it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from cpal.data.voc import IGNORE_INDEX
from cpal.irn.model import STRIDE


def fill_ignored(mask: np.ndarray, ignore: int = IGNORE_INDEX) -> np.ndarray:
    """The mask with every ignored pixel given the class of its nearest labelled pixel (all ignored: as is)."""
    hole = mask == ignore
    if not hole.any() or hole.all():
        return mask
    rows, cols = ndimage.distance_transform_edt(hole, return_distances=False, return_indices=True)
    return mask[rows, cols]


def ground_truth_boundary(mask: np.ndarray) -> torch.Tensor:
    """(ceil(H/4), ceil(W/4)) float32 of 0 and 1: the cells holding a pixel next to a class of higher id."""
    if mask.ndim != 2:
        raise ValueError(f"ground_truth_boundary: a mask must be (H, W), got {mask.shape}")
    m = fill_ignored(mask).astype(np.int16)
    edge = np.zeros(m.shape, dtype=bool)
    edge[:, :-1] |= m[:, :-1] < m[:, 1:]  # the right neighbour's class is higher
    edge[:, 1:] |= m[:, 1:] < m[:, :-1]
    edge[:-1, :] |= m[:-1, :] < m[1:, :]
    edge[1:, :] |= m[1:, :] < m[:-1, :]
    cells = F.max_pool2d(torch.from_numpy(edge.astype(np.float32))[None, None], STRIDE, STRIDE, ceil_mode=True)
    return cells[0, 0]
