"""The CPAL mechanism as one plug-in (docs/method.md, steps 3-11): CAM normalisation, seeds, instance
prototypes, the support bank, feature distribution alignment, positiveness-weighted top-K context
prototypes, the prototype-aware CAM (PACAM) and the self-supervision loss.

A host (this project's CAM / SIPE classifier, or a researcher's own CAM method) calls the names in
``__all__`` and nothing else: :class:`ContextPrototypes` takes the host's feature map, class maps and
image labels and returns the PACAM and L_self, keeping the support bank as buffers (so it is saved in the
host's checkpoint) and gathering it across DDP ranks. The functions below it are its building blocks,
public for tests and analysis scripts.

Conventions: a map tensor with ``N + 1`` channels holds the background at channel 0 and foreground
class ``n`` (dataset class index ``n``) at channel ``n``. The support bank indexes foreground classes
only, so dataset class ``n`` lives in bank row ``n - 1``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CPALConfig", "ContextPrototypes", "PrototypeOutput", "cam_with_background", "normalize_maps",
           "METHODS"]

METHODS = ("cam", "sipe", "cpal")
METRICS = ("dot", "cos", "l2")
EPS = 1e-5


@dataclass(frozen=True)
class CPALConfig:
    """The ``params`` section of params.yaml (the CPAL method), validated however it is built.

    :class:`ContextPrototypes` reads every field: ``method`` is the default of its ``context`` argument
    and ``lambda_self`` weighs :attr:`PrototypeOutput.loss`; the rest shape the prototypes and seeds.
    """

    method: str = "cpal"
    K: int = 5
    bank_size: int = 100
    metric: str = "dot"
    temperature: float = 0.1
    tau: float = 0.0
    context_weight: float = 0.5
    lambda_self: float = 0.5
    use_alignment: bool = True
    use_positiveness: bool = True
    center_features: bool = True
    seed_mode: str = "argmax"
    seed_bg_scale: float = 1.0
    bank_clusters: int = 0

    def __post_init__(self) -> None:
        """Built directly, a config gets the check a mapping gets (the params schema, the same messages
        naming the key): temperature 0 would otherwise turn the PACAM NaN once the bank fills."""
        from cpal.core.config import validate_section

        validate_section("params", asdict(self), source="CPALConfig")

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any] | None, where: str = "params") -> CPALConfig:
        """Missing keys take the defaults above; the result is checked against the params schema (here
        first, so that an unknown key is named by the schema rather than a TypeError)."""
        from cpal.core.config import validate_section

        if cfg is None:
            cfg = {}
        if not isinstance(cfg, Mapping):
            raise TypeError(f"{where}: expected a mapping, got {type(cfg).__name__}")
        merged = {**asdict(cls()), **cfg}
        validate_section("params", merged, source=where)
        return cls(**merged)


# ----------------------------------------------------------------------------------------------------
# CAM, seeds, instance prototypes


def normalize_maps(maps: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Divide each (image, channel) map by its spatial maximum, so that non-negative maps lie in [0, 1]."""
    return maps / (maps.amax(dim=(2, 3), keepdim=True) + eps)


def cam_with_background(raw_cam: torch.Tensor, present: torch.Tensor,
                        valid: torch.Tensor | None = None) -> torch.Tensor:
    """CAM M (B, N+1, h, w) from the classifier's raw maps (B, N, h, w) and the labels (B, N).

    ReLU; absent classes (and invalid pixels, ``valid`` (B, 1, h, w)) zeroed; each class divided by
    its spatial max; background M_0 = 1 - max over the (present) foreground classes. Zeroing comes
    first, so the background answers "none of this image's classes", as at seed time.
    """
    mask = present.to(raw_cam.dtype)[:, :, None, None]
    if valid is not None:
        mask = mask * valid.to(raw_cam.dtype)
    fg = normalize_maps(F.relu(raw_cam) * mask)
    bg = 1.0 - fg.amax(dim=1, keepdim=True)
    if valid is not None:
        bg = bg * valid.to(raw_cam.dtype)
    return torch.cat([bg, fg], dim=1)


def structure_scores(cam: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """SIPE's structure-aware seed scores (B, K, h, w): per pixel i and map k, the IoU between the map
    and pixel i's feature-correlation map, sum_j c_ij m_kj / (sum_j c_ij + sum_j m_kj - sum_j c_ij m_kj),
    with c_ij = ReLU(cos(f_i, f_j)). A pixel joins the class whose whole region it resembles, not only
    the class that fires on it, which spreads seeds over object parts the CAM misses."""
    with torch.autocast(device_type=features.device.type, enabled=False):  # float32 even under AMP
        f = F.normalize(features.detach().flatten(2).float(), dim=1, eps=EPS)
        corr = F.relu(torch.einsum("bci,bcj->bij", f, f))  # (B, hw, hw)
        m = cam.detach().flatten(2).float()  # (B, K, hw)
        inter = torch.einsum("bij,bkj->bki", corr, m)
    union = corr.sum(dim=2)[:, None, :] + m.sum(dim=2)[:, :, None] - inter
    return (inter / union.clamp(min=EPS)).view_as(cam)


def seeds_from_cam(cam: torch.Tensor, present_all: torch.Tensor, valid: torch.Tensor | None = None,
                   features: torch.Tensor | None = None, bg_scale: float = 1.0) -> torch.Tensor:
    """Seeds S (B, h, w): argmax over background and present classes; -1 on invalid pixels.

    Scores are the CAM M itself, or with ``features`` (B, C, h, w) SIPE's structure-aware scores
    (:func:`structure_scores`); the background score is multiplied by ``bg_scale`` first (SIPE: 0.5).
    """
    scores = cam.detach() if features is None else structure_scores(cam, features).to(cam.dtype)
    if bg_scale != 1.0:
        scores = torch.cat([scores[:, :1] * bg_scale, scores[:, 1:]], dim=1)
    scores = scores.masked_fill(~present_all[:, :, None, None], float("-inf"))
    seeds = scores.argmax(dim=1)
    if valid is not None:
        seeds = seeds.masked_fill(~valid[:, 0].bool(), -1)
    return seeds


def instance_prototypes(features: torch.Tensor, seeds: torch.Tensor,
                        num_maps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked average pooling of F (B, C, h, w) over S == k for k < num_maps.

    Returns prototypes (B, num_maps, C) and pixel counts (B, num_maps); a map with no seed pixel
    gets a zero prototype and count 0 (callers must treat it as missing).
    """
    ids = torch.arange(num_maps, device=seeds.device)
    onehot = (seeds.unsqueeze(1) == ids[None, :, None, None]).to(features.dtype)
    counts = onehot.sum(dim=(2, 3))
    sums = torch.einsum("bkhw,bchw->bkc", onehot, features)
    return sums / counts.clamp(min=1).unsqueeze(-1), counts


# ----------------------------------------------------------------------------------------------------
# Support bank


class SupportBank(nn.Module):
    """Per foreground class a FIFO queue of ``size`` context prototypes, kept as buffers.

    Buffers (saved in state_dict): ``prototypes`` (N, size, C), ``count`` (N,) how many slots are
    filled, ``ptr`` (N,) the next slot to write (the oldest entry once the queue is full).

    Under DDP, ``group`` (a torch.distributed process group, set by :meth:`CAMNet.distribute`) makes
    :meth:`push` gather every rank's rows first, in rank order: every rank then holds the bank a single
    process would hold after the same global batch.
    """

    def __init__(self, num_classes: int, size: int, dim: int) -> None:
        super().__init__()
        self.num_classes, self.size, self.dim = num_classes, size, dim
        self.group: Any = None
        self.register_buffer("prototypes", torch.zeros(num_classes, size, dim))
        self.register_buffer("count", torch.zeros(num_classes, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros(num_classes, dtype=torch.long))

    @torch.no_grad()
    def push(self, class_ids: torch.Tensor, prototypes: torch.Tensor) -> None:
        """Append prototypes (M, C) of foreground classes ``class_ids`` (M,) in 0..N-1, in order.

        Each class keeps its ``size`` newest entries; within a call, later rows count as newer. With a
        ``group``, every rank of it must call push at the same point (it is a collective).
        """
        class_ids = class_ids.to(self.count.device).long()
        if class_ids.numel() == 0 and self.group is None:
            return
        if prototypes.shape != (class_ids.numel(), self.dim):
            raise ValueError(f"SupportBank.push: prototypes of shape {tuple(prototypes.shape)}, "
                             f"expected ({class_ids.numel()}, {self.dim})")
        if self.group is not None:
            from cpal.core.distributed import all_gather_rows

            # one collective for both: class ids (small integers) are exact in float32, the bank's dtype
            rows = torch.cat([class_ids.to(self.prototypes.dtype)[:, None],
                              prototypes.detach().to(self.prototypes.device, self.prototypes.dtype)], dim=1)
            rows = all_gather_rows(rows, self.group)
            class_ids, prototypes = rows[:, 0].round().long(), rows[:, 1:]
        if class_ids.numel() == 0:
            return
        if int(class_ids.min()) < 0 or int(class_ids.max()) >= self.num_classes:
            raise ValueError(f"SupportBank.push: class ids must lie in 0..{self.num_classes - 1}")
        protos = prototypes.detach().to(self.prototypes.device, self.prototypes.dtype)
        for c in torch.unique(class_ids).tolist():
            new = protos[class_ids == c]
            m = new.shape[0]
            ptr = int(self.ptr[c])
            skip = max(0, m - self.size)  # entries overwritten within this very call
            new = new[skip:]
            slots = (ptr + skip + torch.arange(new.shape[0], device=new.device)) % self.size
            self.prototypes[c, slots] = new
            self.ptr[c] = (ptr + m) % self.size
            self.count[c] = min(int(self.count[c]) + m, self.size)

    def get(self, class_id: int) -> torch.Tensor:
        """The filled prototypes of foreground class ``class_id`` (count, C), in storage order."""
        return self.prototypes[class_id, : int(self.count[class_id])]

    def ordered(self, class_id: int) -> torch.Tensor:
        """The filled prototypes of ``class_id`` from oldest to newest."""
        entries = self.get(class_id)
        if int(self.count[class_id]) < self.size:
            return entries
        return torch.roll(entries, shifts=-int(self.ptr[class_id]), dims=0)

    def reset(self) -> None:
        self.prototypes.zero_()
        self.count.zero_()
        self.ptr.zero_()

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, size={self.size}, dim={self.dim}"


# ----------------------------------------------------------------------------------------------------
# Alignment, positiveness, context prototypes


def alignment_shift(bank_prototypes: torch.Tensor, instance_prototypes: torch.Tensor) -> torch.Tensor:
    """delta_n = mean of the bank's prototypes of class n - mean of the batch's instance prototypes."""
    return bank_prototypes.mean(dim=0) - instance_prototypes.mean(dim=0)


def similarity(anchors: torch.Tensor, keys: torch.Tensor, metric: str) -> torch.Tensor:
    """Similarity (m, k) of anchors (m, C) to keys (k, C): dot, cosine, or negative squared L2 distance."""
    keys = keys.to(anchors.dtype)
    if metric == "dot":
        return anchors @ keys.T
    if metric == "cos":
        return F.normalize(anchors, dim=1) @ F.normalize(keys, dim=1).T
    if metric == "l2":
        sq = (anchors * anchors).sum(1, keepdim=True) + (keys * keys).sum(1)[None, :] - 2 * anchors @ keys.T
        return -sq.clamp(min=0)
    raise ValueError(f"params.metric: {metric!r} is not one of {' | '.join(METRICS)}")


def top_k(anchors: torch.Tensor, keys: torch.Tensor, k: int,
          metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The min(k, len(keys)) most similar keys per anchor: similarities and indices (m, k'), best first."""
    sims = similarity(anchors, keys, metric)
    return sims.topk(min(k, keys.shape[0]), dim=1)


def positiveness_weights(sims: torch.Tensor, temperature: float, tau: float) -> torch.Tensor:
    """softmax(sims / T) over the neighbours; weights below ``tau`` dropped, the rest renormalised.

    The most similar neighbour is always kept, so a row never ends up empty (if ``tau`` exceeds
    every weight, the context prototype is that single neighbour).
    """
    weights = torch.softmax(sims / temperature, dim=1)
    if tau > 0:
        keep = weights >= tau
        best = torch.arange(weights.shape[1], device=weights.device) == weights.argmax(1, keepdim=True)
        keep = keep | best
        weights = weights * keep
        weights = weights / weights.sum(dim=1, keepdim=True)
    return weights


def cluster_prototypes(keys: torch.Tensor, clusters: int, iterations: int = 10) -> torch.Tensor:
    """k-means centres (clusters, C) of one class's bank entries, or ``keys`` itself when ``clusters`` is
    0 or the bank holds no more entries than that.

    Secondary write-ups of CPAL describe retrieving from per-class clusters of the bank instead of its
    entries; the paper does not say, so this is a parameter (``params.bank_clusters``), off by default.
    Deterministic (initial centres: evenly spaced entries in storage order), so every DDP rank and every
    seed pass computes the same centres; an emptied cluster keeps its previous centre.
    """
    n = keys.shape[0]
    if clusters <= 0 or n <= clusters:
        return keys
    x = keys.float()
    centres = x[torch.linspace(0, n - 1, clusters).round().long()].clone()
    for _ in range(iterations):
        assign = torch.cdist(x, centres).argmin(dim=1)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=clusters)
        filled = counts > 0
        centres[filled] = sums[filled] / counts[filled, None].to(x.dtype)
    return centres.to(keys.dtype)


def context_prototypes(anchors: torch.Tensor, keys: torch.Tensor, k: int, metric: str, temperature: float,
                       tau: float, use_positiveness: bool = True) -> torch.Tensor:
    """P^C (m, C): the positiveness-weighted sum of each anchor's top-K keys (or their plain mean).

    ``keys`` must be non-empty; with fewer than K keys all of them are used.
    """
    if keys.shape[0] == 0:
        raise ValueError("context_prototypes: the bank holds no prototype of this class")
    sims, idx = top_k(anchors, keys, k, metric)
    if use_positiveness:
        weights = positiveness_weights(sims, temperature, tau)
    else:
        weights = torch.full_like(sims, 1.0 / sims.shape[1])
    neighbours = keys.to(anchors.dtype)[idx]  # (m, k', C)
    return torch.einsum("mk,mkc->mc", weights, neighbours)


def batch_class_means(instance: torch.Tensor, ok: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Per map, the mean (N+1, C) of the valid instance prototypes (B, N+1, C) of the batch, ``ok`` (B, N+1).

    With a DDP ``group`` the mean runs over every rank's images (the global batch), differentiably;
    every rank must call it, and must keep the result in its loss so that every rank runs its backward.
    """
    w = ok.to(instance.dtype)
    packed = torch.cat([torch.einsum("bk,bkc->kc", w, instance), w.sum(dim=0)[:, None]], dim=1)
    if group is not None:
        from cpal.core.distributed import all_reduce_sum

        packed = all_reduce_sum(packed, group)
    return packed[:, :-1] / packed[:, -1:].detach().clamp(min=1)


def mix_prototypes(instance: torch.Tensor, ok: torch.Tensor, bank: SupportBank, cfg: CPALConfig,
                   align: bool | None = None, class_means: torch.Tensor | None = None) -> torch.Tensor:
    """The PACAM prototypes (B, N+1, C): (1 - w) P^I + w P^C for each present foreground class.

    P^C is retrieved with the aligned anchor P^I + delta_n (delta over this batch's prototypes of
    class n, if ``align``, default ``cfg.use_alignment``). A class whose bank is empty keeps P^I
    alone; with fewer than K entries (or ``cfg.bank_clusters`` centres), all of them are used. The
    background (channel 0) and missing prototypes (``ok`` False) are left as they are. ``class_means``
    (N+1, C), when given, replaces the batch's per-class mean in delta (DDP: the mean over the global
    batch, see :func:`batch_class_means`).
    """
    align = cfg.use_alignment if align is None else align
    out = instance.clone()
    w = cfg.context_weight
    if w == 0:
        return out
    for n in range(1, instance.shape[1]):
        rows = ok[:, n].nonzero().squeeze(1)
        if rows.numel() == 0 or int(bank.count[n - 1]) == 0:
            continue
        keys = bank.get(n - 1).clone()  # a copy: the bank is written in place after this batch
        p_inst = instance[rows, n]
        if not align:
            anchors = p_inst
        elif class_means is None:
            anchors = p_inst + alignment_shift(keys, p_inst)
        else:
            anchors = p_inst + (keys.mean(dim=0) - class_means[n])
        # the alignment shift above uses the bank's own mean; retrieval may use its clusters instead
        p_ctx = context_prototypes(anchors, cluster_prototypes(keys, cfg.bank_clusters), cfg.K, cfg.metric,
                                   cfg.temperature, cfg.tau, cfg.use_positiveness)
        out[rows, n] = ((1 - w) * p_inst + w * p_ctx).to(out.dtype)  # the bank is float32 under AMP
    return out


# ----------------------------------------------------------------------------------------------------
# PACAM and the self-supervision loss


def prototype_cam(features: torch.Tensor, prototypes: torch.Tensor, ok: torch.Tensor, center: bool = True,
                  valid: torch.Tensor | None = None) -> torch.Tensor:
    """Raw PACAM (B, K, h, w) = ReLU(cos(F, prototype_k)), zero where ``ok`` (B, K) is False.

    With ``center``, each image's mean feature (over valid pixels) is subtracted from F and from the
    prototypes before the cosine: without it every cosine is high and the map covers everything
    (docs/method.md). Not yet divided by its max; see :func:`normalize_maps`.
    """
    if center:
        if valid is None:
            mu = features.mean(dim=(2, 3))
        else:
            v = valid.to(features.dtype)
            mu = (features * v).sum(dim=(2, 3)) / v.sum(dim=(2, 3)).clamp(min=1)
        features = features - mu[:, :, None, None]
        prototypes = prototypes - mu[:, None, :]
    cos = torch.einsum("bchw,bkc->bkhw", F.normalize(features, dim=1), F.normalize(prototypes, dim=2))
    maps = F.relu(cos) * ok.to(cos.dtype)[:, :, None, None]
    if valid is not None:
        maps = maps * valid.to(cos.dtype)
    return maps


def self_loss(cam: torch.Tensor, pacam: torch.Tensor, present_all: torch.Tensor,
              valid: torch.Tensor | None = None) -> torch.Tensor:
    """L_self = 1/(N+1) * sum over background and present classes of the mean-over-pixels |M - M~|,
    averaged over the batch (pixel means over valid pixels when ``valid`` is given)."""
    diff = (cam - pacam).abs() * present_all.to(cam.dtype)[:, :, None, None]
    if valid is None:
        per_map = diff.mean(dim=(2, 3))
    else:
        v = valid.to(cam.dtype)
        per_map = (diff * v).sum(dim=(2, 3)) / v.sum(dim=(2, 3)).clamp(min=1)
    return per_map.sum(dim=1).mean() / cam.shape[1]


# ----------------------------------------------------------------------------------------------------
# The plug-in


@dataclass
class PrototypeOutput:
    """What :class:`ContextPrototypes` returns for one batch.

    cam (B, N+1, h, w): the host's CAM with background at channel 0, normalised, absent classes zeroed;
    pacam (B, N+1, h, w): the PACAM M~, normalised; raw_pacam: the same before normalisation (seed
    generators sum it over scales); seeds (B, h, w) long, -1 on invalid pixels; prototypes (B, N+1, C)
    the instance prototypes and ok (B, N+1) where they exist; loss_self: L_self (a scalar tensor); loss:
    ``cfg.lambda_self * loss_self``, the term a host adds to its own loss.
    """

    cam: torch.Tensor
    pacam: torch.Tensor
    raw_pacam: torch.Tensor
    seeds: torch.Tensor
    prototypes: torch.Tensor
    ok: torch.Tensor
    loss_self: torch.Tensor
    loss: torch.Tensor


class ContextPrototypes(nn.Module):
    """CPAL for any CAM host: PACAM and L_self from the host's features, class maps and labels.

    ``num_classes`` foreground classes, ``feature_dim`` channels of the feature map the prototypes are
    pooled from, ``cfg`` the ``params`` section (:class:`CPALConfig` or a mapping, validated alike; every
    key is read, see :class:`CPALConfig`). The support bank is a child module (``bank``), so ``state_dict``
    of the host carries it. In training mode every call pushes the batch's detached instance prototypes
    into the bank after computing its PACAM, so a batch never retrieves itself; in eval mode the bank is
    only read. What it cannot do (a mask or seed features of another shape, ``seed_mode`` structure
    without seed features, ``method`` cam without an explicit ``context``) is a ValueError before any work.
    """

    def __init__(self, num_classes: int, feature_dim: int,
                 cfg: CPALConfig | Mapping[str, Any] | None = None) -> None:
        super().__init__()
        if num_classes < 1 or feature_dim < 1:
            raise ValueError(f"ContextPrototypes: num_classes and feature_dim must be >= 1, got "
                             f"{num_classes} and {feature_dim}")
        self.cfg = cfg if isinstance(cfg, CPALConfig) else CPALConfig.from_dict(cfg)
        self.num_classes, self.feature_dim = num_classes, feature_dim
        self.bank = SupportBank(num_classes, self.cfg.bank_size, feature_dim)

    def distribute(self, group: Any) -> None:
        """Under DDP (``group`` a process group; None: single process), the bank receives every rank's
        prototypes in rank order and the alignment shift uses the global batch's mean; every rank of
        ``group`` must then call :meth:`forward` in step (DDP does)."""
        self.bank.group = group

    def check_shapes(self, features: torch.Tensor, class_maps: torch.Tensor, labels: torch.Tensor,
                     valid: torch.Tensor | None = None, seed_features: torch.Tensor | None = None) -> None:
        """A ValueError naming every shape that does not fit, before any work: a mask of another shape
        would otherwise fail deep inside or, as (1, 1, h, w), broadcast over the batch silently."""
        b, n = class_maps.shape[:2] if class_maps.dim() == 4 else (None, None)
        grid_of = class_maps if class_maps.dim() == 4 else features if features.dim() == 4 else None
        problems = []
        if features.dim() != 4 or features.shape[1] != self.feature_dim:
            problems.append(f"features must be (B, {self.feature_dim}, h, w), got {tuple(features.shape)}")
        if class_maps.dim() != 4 or n != self.num_classes:
            problems.append(f"class_maps must be (B, {self.num_classes}, h, w), got {tuple(class_maps.shape)}")
        elif features.dim() == 4 and (features.shape[0] != b or features.shape[2:] != class_maps.shape[2:]):
            problems.append(f"features {tuple(features.shape)} and class_maps {tuple(class_maps.shape)} must "
                            "share batch size and grid (resize one to the other first)")
        if labels.shape != (b if b is not None else labels.shape[0], self.num_classes):
            problems.append(f"labels must be multi-hot (B, N) = ({b}, {self.num_classes}), got {tuple(labels.shape)}")
        if grid_of is not None:
            bb, h, w = grid_of.shape[0], *grid_of.shape[2:]
            if valid is not None and tuple(valid.shape) not in ((bb, h, w), (bb, 1, h, w)):
                problems.append(f"valid must be (B, h, w) = ({bb}, {h}, {w}) or (B, 1, h, w) = ({bb}, 1, {h}, {w}), "
                                f"got {tuple(valid.shape)}")
            if seed_features is not None and (seed_features.dim() != 4 or seed_features.shape[0] != bb
                                              or tuple(seed_features.shape[2:]) != (h, w)):
                problems.append(f"seed_features must be (B, C', h, w) = ({bb}, C', {h}, {w}), "
                                f"got {tuple(seed_features.shape)}")
        if problems:
            raise ValueError("ContextPrototypes: " + "; ".join(problems))

    def check_settings(self, seed_features: torch.Tensor | None, context: bool | None) -> bool:
        """``context`` as given, else as ``cfg.method`` says; a ValueError where the settings and the call
        disagree, since the module would otherwise silently do other than asked."""
        mode = self.cfg.seed_mode
        if mode == "structure" and seed_features is None:
            raise ValueError("ContextPrototypes: params.seed_mode = 'structure' needs seed_features (B, C', h, w), "
                             "the features SIPE's structure-aware seeds correlate; pass them, or set seed_mode: argmax")
        if mode == "argmax" and seed_features is not None:
            raise ValueError("ContextPrototypes: seed_features given, but params.seed_mode = 'argmax' takes the "
                             "CAM's argmax; set seed_mode: structure to use them, or do not pass them")
        if context is not None:
            return context
        if self.cfg.method == "cam":
            raise ValueError("ContextPrototypes: params.method = 'cam' (L_cls alone) computes no prototypes, so it "
                             "gives no default for context; set method: sipe | cpal, or pass context=True (CPAL) "
                             "or context=False (SIPE)")
        return self.cfg.method == "cpal"

    def forward(self, features: torch.Tensor, class_maps: torch.Tensor, labels: torch.Tensor, *,
                valid: torch.Tensor | None = None, seed_features: torch.Tensor | None = None,
                context: bool | None = None, align: bool | None = None) -> PrototypeOutput:
        """PACAM and L_self of one batch.

        features (B, C, h, w): the host's feature map F (CPAL pools prototypes from it; the paper uses
        hierarchical, per-pixel L2-normalised features). class_maps (B, N, h, w): the host's raw class
        activation maps on the same grid (ReLU and normalisation happen here). labels (B, N) multi-hot.
        valid optional, (B, h, w) or (B, 1, h, w) on that grid: nonzero on real pixels. seed_features
        (B, C', h, w) on that grid: SIPE's structure-aware seeds correlate them; required with
        ``cfg.seed_mode`` structure, refused with argmax. ``context`` False gives SIPE (instance
        prototypes only), True CPAL; None: as ``cfg.method`` says. ``align`` defaults to
        ``cfg.use_alignment``.
        """
        self.check_shapes(features, class_maps, labels, valid, seed_features)
        context = self.check_settings(seed_features, context)
        if valid is not None:
            valid = (valid if valid.dim() == 4 else valid.unsqueeze(1)).bool()
        present = labels > 0.5
        cam = cam_with_background(class_maps, present, valid)
        present_all = F.pad(present, (1, 0), value=True)
        seeds = seeds_from_cam(cam, present_all, valid, features=seed_features, bg_scale=self.cfg.seed_bg_scale)
        inst, counts = instance_prototypes(features, seeds, cam.shape[1])
        ok = present_all & (counts > 0)
        means = None
        align = self.cfg.use_alignment if align is None else align
        if context and align and self.cfg.context_weight != 0 and self.training and self.bank.group is not None:
            means = batch_class_means(inst, ok, self.bank.group)
        protos = mix_prototypes(inst, ok, self.bank, self.cfg, align, class_means=means) if context else inst
        raw = prototype_cam(features, protos, ok, center=self.cfg.center_features, valid=valid)
        pacam = normalize_maps(raw)
        loss = self_loss(cam, pacam, present_all, valid)
        if means is not None:  # keeps the all-reduce in every rank's graph, so every rank runs its backward
            loss = loss + 0.0 * means.sum()
        if self.training:
            rows, cols = ok[:, 1:].nonzero(as_tuple=True)  # batch order, then class order
            self.bank.push(cols, inst[rows, cols + 1].detach())
        return PrototypeOutput(cam=cam, pacam=pacam, raw_pacam=raw, seeds=seeds, prototypes=inst, ok=ok,
                               loss_self=loss, loss=self.cfg.lambda_self * loss)
