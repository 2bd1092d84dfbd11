"""Unit tests of the CPAL mechanism on small hand-made tensors."""

from __future__ import annotations

import pytest
import torch

from cpal.plugin import (
    CPALConfig,
    SupportBank,
    alignment_shift,
    cam_with_background,
    cluster_prototypes,
    context_prototypes,
    instance_prototypes,
    mix_prototypes,
    normalize_maps,
    positiveness_weights,
    prototype_cam,
    seeds_from_cam,
    self_loss,
    similarity,
    top_k,
)


def vecs(*rows: tuple[float, ...]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# -- config ------------------------------------------------------------------------------------------

def test_config_defaults_and_params_yaml(default_params: dict) -> None:
    cfg = CPALConfig.from_dict(default_params["params"])
    assert cfg.method == default_params["params"]["method"]
    assert cfg.K == default_params["params"]["K"]
    assert cfg.center_features is True  # default when the key is absent


@pytest.mark.parametrize(("key", "value"), [("metric", "manhattan"), ("method", "x"), ("K", 0),
                                            ("temperature", 0.0), ("tau", 1.0), ("context_weight", 1.5),
                                            ("center_features", "yes"), ("bank_clusters", -1)])
def test_config_rejects_bad_values_naming_the_key(key: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"params\.{key}"):
        CPALConfig.from_dict({key: value})


# -- support bank ------------------------------------------------------------------------------------

def test_bank_fifo_order_and_per_class_capacity() -> None:
    bank = SupportBank(num_classes=3, size=3, dim=2)
    bank.push(torch.tensor([0, 1, 0]), vecs((1, 1), (10, 10), (2, 2)))
    bank.push(torch.tensor([0, 0]), vecs((3, 3), (4, 4)))
    assert bank.count.tolist() == [3, 1, 0]
    assert bank.ordered(0)[:, 0].tolist() == [2, 3, 4]  # oldest (1) evicted, order kept
    assert bank.ordered(1)[:, 0].tolist() == [10]
    assert bank.get(2).shape == (0, 2)
    # more than `size` prototypes of one class in one call: the newest `size` survive, in order
    bank.push(torch.tensor([2, 1, 2, 2, 2, 2]), vecs((5, 0), (11, 0), (6, 0), (7, 0), (8, 0), (9, 0)))
    assert bank.ordered(2)[:, 0].tolist() == [7, 8, 9]
    assert bank.ordered(1)[:, 0].tolist() == [10, 11]
    assert bank.count.tolist() == [3, 2, 3]
    bank.push(torch.tensor([2]), vecs((12, 0)))
    assert bank.ordered(2)[:, 0].tolist() == [8, 9, 12]
    assert sorted(bank.get(2)[:, 0].tolist()) == [8, 9, 12]


def test_bank_push_checks_input() -> None:
    bank = SupportBank(num_classes=2, size=4, dim=3)
    with pytest.raises(ValueError, match="class ids"):
        bank.push(torch.tensor([2]), torch.zeros(1, 3))
    with pytest.raises(ValueError, match="shape"):
        bank.push(torch.tensor([0]), torch.zeros(1, 5))
    bank.push(torch.tensor([], dtype=torch.long), torch.zeros(0, 3))
    assert bank.count.tolist() == [0, 0]


def test_bank_push_detaches() -> None:
    bank = SupportBank(num_classes=1, size=2, dim=2)
    p = torch.ones(1, 2, requires_grad=True)
    bank.push(torch.tensor([0]), p * 2)
    assert not bank.prototypes.requires_grad
    assert bank.get(0).tolist() == [[2.0, 2.0]]


# -- CAM, seeds, instance prototypes -----------------------------------------------------------------

def test_cam_with_background_normalises_and_zeroes_absent() -> None:
    raw = torch.zeros(1, 2, 2, 2)
    raw[0, 0] = torch.tensor([[4.0, 2.0], [-1.0, 0.0]])
    raw[0, 1] = torch.tensor([[9.0, 9.0], [9.0, 9.0]])  # absent class: must not count
    cam = cam_with_background(raw, torch.tensor([[True, False]]))
    assert cam.shape == (1, 3, 2, 2)
    torch.testing.assert_close(cam[0, 1], torch.tensor([[1.0, 0.5], [0.0, 0.0]]), atol=1e-4, rtol=0)
    assert cam[0, 2].abs().max() == 0
    torch.testing.assert_close(cam[0, 0], 1 - cam[0, 1])


def test_seeds_argmax_over_present_classes_only() -> None:
    cam = torch.zeros(1, 3, 1, 3)
    cam[0, 0] = torch.tensor([[0.9, 0.2, 0.1]])
    cam[0, 1] = torch.tensor([[0.1, 0.8, 0.3]])
    cam[0, 2] = torch.tensor([[0.5, 0.5, 1.0]])  # absent
    present_all = torch.tensor([[True, True, False]])
    assert seeds_from_cam(cam, present_all).tolist() == [[[0, 1, 1]]]
    valid = torch.tensor([[[[True, True, False]]]])
    assert seeds_from_cam(cam, present_all, valid).tolist() == [[[0, 1, -1]]]


def test_instance_prototypes_masked_average() -> None:
    feats = torch.arange(8, dtype=torch.float32).view(1, 2, 2, 2)  # channel 0: 0..3, channel 1: 4..7
    seeds = torch.tensor([[[0, 1], [1, 1]]])
    protos, counts = instance_prototypes(feats, seeds, num_maps=3)
    assert counts.tolist() == [[1, 3, 0]]
    torch.testing.assert_close(protos[0, 0], torch.tensor([0.0, 4.0]))
    torch.testing.assert_close(protos[0, 1], torch.tensor([2.0, 6.0]))
    assert protos[0, 2].abs().sum() == 0


# -- alignment, similarity, top-K, positiveness ------------------------------------------------------

def test_alignment_shift_is_difference_of_means() -> None:
    gen = torch.Generator().manual_seed(0)
    bank, inst = torch.randn(7, 4, generator=gen), torch.randn(3, 4, generator=gen)
    delta = alignment_shift(bank, inst)
    expected = torch.stack(list(bank)).sum(0) / 7 - torch.stack(list(inst)).sum(0) / 3
    torch.testing.assert_close(delta, expected)
    # the aligned anchors have the bank's mean
    torch.testing.assert_close((inst + delta).mean(0), bank.mean(0))


# anchor (1, 0) against keys chosen so that each metric ranks them differently
ANCHOR = vecs((1.0, 0.0))
KEYS = vecs((10.0, 0.0), (0.1, 0.0), (1.0, 0.2), (2.0, 2.0))


@pytest.mark.parametrize(("metric", "expected_top2"), [("dot", [0, 3]), ("cos", [0, 1]), ("l2", [2, 1])])
def test_top_k_returns_most_similar_under_each_metric(metric: str, expected_top2: list[int]) -> None:
    sims, idx = top_k(ANCHOR, KEYS, 2, metric)
    assert sorted(idx[0].tolist()) == sorted(expected_top2)
    if metric != "cos":  # cos ties keys 0 and 1 at exactly 1
        assert idx[0].tolist() == expected_top2
    assert sims[0, 0] >= sims[0, 1]
    assert top_k(ANCHOR, KEYS, 10, metric)[1].shape == (1, 4)  # K larger than the bank: all of it


def test_similarity_values() -> None:
    torch.testing.assert_close(similarity(ANCHOR, KEYS, "dot")[0], torch.tensor([10.0, 0.1, 1.0, 2.0]))
    torch.testing.assert_close(similarity(ANCHOR, KEYS, "l2")[0], torch.tensor([-81.0, -0.81, -0.04, -5.0]))
    assert similarity(ANCHOR, KEYS, "cos")[0, 3].item() == pytest.approx(2 ** -0.5, abs=1e-6)
    with pytest.raises(ValueError, match="metric"):
        similarity(ANCHOR, KEYS, "l1")


def test_positiveness_weights_sum_to_one_and_tau_drops() -> None:
    sims = vecs((1.0, 0.9, 0.0), (0.5, 0.5, 0.5))
    w = positiveness_weights(sims, temperature=0.1, tau=0.0)
    torch.testing.assert_close(w.sum(1), torch.ones(2))
    assert (w > 0).all()
    dropped = positiveness_weights(sims, temperature=0.1, tau=0.01)
    torch.testing.assert_close(dropped.sum(1), torch.ones(2))
    assert dropped[0, 2] == 0 and dropped[0, 0] > 0 and dropped[0, 1] > 0
    assert (dropped[0, 0] / dropped[0, 1]).item() == pytest.approx((w[0, 0] / w[0, 1]).item(), rel=1e-5)
    torch.testing.assert_close(dropped[1], torch.full((3,), 1 / 3))  # uniform 1/3 >= tau: all kept
    # tau above every weight: the single most similar neighbour is kept
    only_best = positiveness_weights(sims, temperature=0.1, tau=0.9)
    torch.testing.assert_close(only_best[0], torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(only_best.sum(1), torch.ones(2))


def test_context_prototype_weighted_and_plain_mean() -> None:
    keys = vecs((1.0, 0.0), (0.0, 1.0), (-1.0, 0.0))
    anchor = vecs((1.0, 0.5))
    plain = context_prototypes(anchor, keys, k=2, metric="dot", temperature=0.1, tau=0.0,
                               use_positiveness=False)
    torch.testing.assert_close(plain, vecs((0.5, 0.5)))  # mean of the 2 nearest
    weighted = context_prototypes(anchor, keys, k=2, metric="dot", temperature=0.1, tau=0.0)
    w = torch.softmax(torch.tensor([1.0, 0.5]) / 0.1, 0)
    torch.testing.assert_close(weighted, (w[0] * keys[0] + w[1] * keys[1])[None])
    with pytest.raises(ValueError, match="no prototype"):
        context_prototypes(anchor, keys[:0], k=2, metric="dot", temperature=0.1, tau=0.0)


def test_mix_prototypes_empty_and_partly_filled_bank() -> None:
    cfg = CPALConfig(K=5, context_weight=0.25, use_alignment=True)
    bank = SupportBank(num_classes=2, size=10, dim=2)
    inst = vecs((9.0, 9.0), (1.0, 0.0), (0.0, 1.0)).unsqueeze(0)  # background, class 1, class 2
    ok = torch.tensor([[True, True, True]])
    torch.testing.assert_close(mix_prototypes(inst, ok, bank, cfg), inst)  # empty bank: instance alone
    bank.push(torch.tensor([0]), vecs((3.0, 1.0)))  # one entry for class 1, none for class 2, K = 5
    mixed = mix_prototypes(inst, ok, bank, cfg)
    torch.testing.assert_close(mixed[0, 1], 0.75 * inst[0, 1] + 0.25 * torch.tensor([3.0, 1.0]))
    torch.testing.assert_close(mixed[0, 2], inst[0, 2])
    torch.testing.assert_close(mixed[0, 0], inst[0, 0])  # background never takes context
    # a prototype marked missing is left alone
    torch.testing.assert_close(mix_prototypes(inst, torch.tensor([[True, False, True]]), bank, cfg), inst)


def test_alignment_changes_which_neighbours_are_retrieved() -> None:
    bank = SupportBank(num_classes=1, size=10, dim=2)
    bank.push(torch.tensor([0, 0]), vecs((10.0, 0.0), (0.0, 10.0)))
    # two instances near (0, 1) and (0, 2): unaligned, both pick (0, 10); aligned (to the bank mean
    # (5, 5), shift (5, 3.5)) the first anchor (5, 4.5) is nearer to (10, 0) under l2
    inst = torch.zeros(2, 2, 2)
    inst[:, 1] = vecs((0.0, 1.0), (0.0, 2.0))
    ok = torch.ones(2, 2, dtype=torch.bool)
    base = dict(K=1, metric="l2", context_weight=1.0)
    plain = mix_prototypes(inst, ok, bank, CPALConfig(use_alignment=False, **base))
    aligned = mix_prototypes(inst, ok, bank, CPALConfig(use_alignment=True, **base))
    assert plain[:, 1].tolist() == [[0.0, 10.0], [0.0, 10.0]]
    assert aligned[:, 1].tolist() == [[10.0, 0.0], [0.0, 10.0]]


def test_cluster_prototypes_finds_the_groups_and_is_off_by_default() -> None:
    keys = vecs((0.0, 0.0), (10.0, 10.0), (0.2, 0.0), (10.0, 10.4), (0.0, 0.4), (10.2, 10.0))
    assert cluster_prototypes(keys, 0) is keys  # off
    assert cluster_prototypes(keys, 6) is keys  # no more entries than clusters: the entries themselves
    centres = cluster_prototypes(keys, 2)
    assert centres.shape == (2, 2)
    got = sorted(centres.tolist())
    torch.testing.assert_close(torch.tensor(got), vecs((0.2 / 3, 0.4 / 3), (30.2 / 3, 30.4 / 3)))
    torch.testing.assert_close(cluster_prototypes(keys, 2), centres)  # deterministic


def test_bank_clusters_retrieve_centres_instead_of_entries() -> None:
    bank = SupportBank(num_classes=1, size=10, dim=2)
    bank.push(torch.tensor([0, 0, 0, 0]), vecs((1.0, 0.0), (3.0, 0.0), (0.0, 5.0), (0.0, 7.0)))
    inst = torch.zeros(1, 2, 2)
    inst[0, 1] = vecs((4.0, 0.0))
    ok = torch.ones(1, 2, dtype=torch.bool)
    base = dict(K=1, metric="l2", context_weight=1.0, use_alignment=False)
    entries = mix_prototypes(inst, ok, bank, CPALConfig(**base))
    centres = mix_prototypes(inst, ok, bank, CPALConfig(bank_clusters=2, **base))
    assert entries[0, 1].tolist() == [3.0, 0.0]  # the nearest entry
    assert centres[0, 1].tolist() == [2.0, 0.0]  # the centre of its cluster


# -- PACAM and L_self --------------------------------------------------------------------------------

def test_pacam_in_unit_interval_and_zero_where_missing() -> None:
    gen = torch.Generator().manual_seed(1)
    feats = torch.randn(2, 6, 5, 5, generator=gen)
    protos = torch.randn(2, 3, 6, generator=gen)
    ok = torch.tensor([[True, True, False], [True, False, True]])
    for center in (True, False):
        pacam = normalize_maps(prototype_cam(feats, protos, ok, center=center))
        assert pacam.min() >= 0 and pacam.max() <= 1
        assert pacam[0, 2].abs().max() == 0 and pacam[1, 1].abs().max() == 0
        assert pacam[0, 0].max() == pytest.approx(1.0, abs=1e-3)


def test_centring_removes_the_shared_feature_direction() -> None:
    # all pixels share a large common component; the object differs only in a small one
    feats = torch.zeros(1, 3, 4, 4)
    feats[0, 0] = 5.0
    feats[0, 1, :2] = 1.0
    proto = feats[0, :, 0, 0].view(1, 1, 3)  # an object pixel
    ok = torch.ones(1, 1, dtype=torch.bool)
    raw = prototype_cam(feats, proto, ok, center=False)
    centred = prototype_cam(feats, proto, ok, center=True)
    assert raw[0, 0, 2:].min() > 0.9  # background looks like the object without centring
    assert centred[0, 0, 2:].max() == 0 and centred[0, 0, :2].min() == pytest.approx(1.0, abs=1e-5)


def test_self_loss_zero_when_equal_positive_when_not() -> None:
    gen = torch.Generator().manual_seed(2)
    cam = torch.rand(2, 4, 3, 3, generator=gen)
    present_all = torch.tensor([[True, True, False, False], [True, False, True, True]])
    assert self_loss(cam, cam.clone(), present_all).item() == 0
    other = cam.clone()
    other[0, 2] += 1.0  # an absent class: ignored
    assert self_loss(cam, other, present_all).item() == 0
    other[0, 1] += 0.5  # a present class of image 0, every pixel
    # 1/(N+1) * (0.5 summed over one map) averaged over the batch of two
    assert self_loss(cam, other, present_all).item() == pytest.approx(0.5 / 4 / 2, rel=1e-5)
    valid = torch.ones(2, 1, 3, 3, dtype=torch.bool)
    valid[0, 0, 0] = False
    assert self_loss(cam, other, present_all, valid).item() == pytest.approx(0.5 / 4 / 2, rel=1e-5)
