"""The CPAL plug-in's public surface: what a host calls, its shape checks, its bank and checkpoint."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import cpal.plugin as plugin
from cpal.plugin import ContextPrototypes

ROOT = Path(__file__).resolve().parents[1]
N, C = 3, 8


def _inputs(b: int = 4, h: int = 6, w: int = 6, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    features = F.normalize(torch.randn(b, C, h, w, generator=g), dim=1)
    maps = torch.randn(b, N, h, w, generator=g)
    labels = (torch.rand(b, N, generator=g) > 0.4).float()
    labels[:, 0] = 1.0
    return features, maps, labels


def test_the_classifier_uses_only_the_public_surface():
    tree = ast.parse((ROOT / "cpal" / "cls" / "network.py").read_text())
    used = {a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module == "cpal.plugin"
            for a in node.names}
    assert used and used <= set(plugin.__all__), used - set(plugin.__all__)
    for name in plugin.__all__:
        assert hasattr(plugin, name), name


def test_training_call_fills_the_bank_and_gives_a_differentiable_loss():
    module = ContextPrototypes(N, C, {"method": "cpal", "bank_size": 4, "K": 2}).train()
    features, maps, labels = _inputs()
    maps.requires_grad_(True)
    first = module(features, maps, labels)
    assert int(module.bank.count.sum()) > 0
    assert first.pacam.shape == first.cam.shape == (4, N + 1, 6, 6)
    assert first.seeds.shape == (4, 6, 6) and first.loss_self.dim() == 0
    first.loss_self.backward()
    assert maps.grad is not None and float(maps.grad.abs().sum()) > 0
    # the second batch retrieves context from the bank: its PACAM differs from instance prototypes alone
    features2, maps2, labels2 = _inputs(seed=1)
    with_context = module.eval()(features2, maps2, labels2).pacam
    alone = module(features2, maps2, labels2, context=False).pacam
    assert not torch.allclose(with_context, alone)


def test_eval_never_writes_the_bank_and_the_bank_is_checkpointed():
    module = ContextPrototypes(N, C, {"bank_size": 4, "K": 2}).eval()
    module(*_inputs())
    assert int(module.bank.count.sum()) == 0
    module.train()(*_inputs())
    state = module.state_dict()
    assert {"bank.prototypes", "bank.count", "bank.ptr"} <= set(state)
    fresh = ContextPrototypes(N, C, {"bank_size": 4, "K": 2})
    fresh.load_state_dict(state)
    assert torch.equal(fresh.bank.prototypes, module.bank.prototypes)


@pytest.mark.parametrize("change, message", [
    ({"features": torch.zeros(4, C + 1, 6, 6)}, f"features must be (B, {C}, h, w), got (4, {C + 1}, 6, 6)"),
    ({"features": torch.zeros(4, C, 5, 6)}, "must share batch size and grid"),
    ({"class_maps": torch.zeros(4, N + 1, 6, 6)}, f"class_maps must be (B, {N}, h, w), got (4, {N + 1}, 6, 6)"),
    ({"labels": torch.zeros(4, N + 2)}, f"labels must be multi-hot (B, N) = (4, {N}), got (4, {N + 2})"),
])
def test_mismatched_shapes_are_a_value_error_naming_them(change: dict, message: str):
    features, maps, labels = _inputs()
    args = {"features": features, "class_maps": maps, "labels": labels, **change}
    with pytest.raises(ValueError) as err:
        ContextPrototypes(N, C)(**args)
    assert message in str(err.value)
