"""The CPAL plug-in's public surface: what a host calls, its shape checks, its bank and checkpoint."""

from __future__ import annotations

import ast
import re
from dataclasses import asdict, fields
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import cpal.plugin as plugin
from cpal.core.config import load_schema
from cpal.plugin import ContextPrototypes, CPALConfig

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


# -- refusals: what the module cannot do is a ValueError before any work, naming the key or the shapes ----


@pytest.mark.parametrize(("key", "value"), [("K", 0), ("temperature", 0.0), ("metric", "manhattan"),
                                            ("method", "x"), ("center_features", "yes"), ("bank_clusters", -1)])
def test_a_config_built_directly_is_checked_like_a_mapping(key: str, value: object):
    with pytest.raises(ValueError, match=rf"params\.{key}") as direct:
        CPALConfig(**{key: value})
    with pytest.raises(ValueError) as mapping:
        ContextPrototypes(N, C, {key: value})
    assert str(direct.value).startswith("CPALConfig is invalid:")
    # the same validation function: the same problem lines, only the source differs
    assert str(direct.value).split("\n", 1)[1] == str(mapping.value).split("\n", 1)[1]


def test_a_config_built_directly_gets_the_cross_key_checks_too():
    with pytest.raises(ValueError, match=r"params\.K = 5 is invalid: K must not exceed params\.bank_size = 3"):
        CPALConfig(K=5, bank_size=3)


@pytest.mark.parametrize("shape", [(1, 1, 6, 6), (4, 1, 5, 6), (4, 2, 6, 6), (4, 6), (1, 6, 6)])
def test_a_mask_of_another_shape_is_refused_naming_both(shape: tuple[int, ...]):
    with pytest.raises(ValueError, match=re.escape(f"valid must be (B, h, w) = (4, 6, 6) or (B, 1, h, w) = "
                                                   f"(4, 1, 6, 6), got {shape}")):
        ContextPrototypes(N, C)(*_inputs(), valid=torch.ones(shape, dtype=torch.bool))


def test_a_mask_may_be_b_h_w_or_b_1_h_w_bool_or_numeric():
    module = ContextPrototypes(N, C).eval()
    valid = torch.ones(4, 6, 6, dtype=torch.bool)
    valid[:, :, 4:] = False
    outs = [module(*_inputs(), valid=v) for v in (valid, valid[:, None], valid.float())]
    for out in outs[1:]:
        torch.testing.assert_close(out.pacam, outs[0].pacam)
        assert torch.equal(out.seeds, outs[0].seeds)
    assert bool((outs[0].seeds[:, :, 4:] == -1).all())


def test_structure_seeds_without_seed_features_are_refused():
    module = ContextPrototypes(N, C, {"seed_mode": "structure"})
    with pytest.raises(ValueError, match=r"params\.seed_mode = 'structure' needs seed_features"):
        module(*_inputs())
    features, maps, labels = _inputs()
    module(features, maps, labels, seed_features=features)  # given: structure-aware seeds


def test_seed_features_with_argmax_seeds_are_refused():
    features, maps, labels = _inputs()
    with pytest.raises(ValueError, match=r"seed_features given, but params\.seed_mode = 'argmax'"):
        ContextPrototypes(N, C)(features, maps, labels, seed_features=features)


def test_seed_features_of_another_grid_are_refused_naming_both():
    features, maps, labels = _inputs()
    module = ContextPrototypes(N, C, {"seed_mode": "structure"})
    with pytest.raises(ValueError, match=re.escape("seed_features must be (B, C', h, w) = (4, C', 6, 6), "
                                                   "got (4, 8, 3, 3)")):
        module(features, maps, labels, seed_features=features[:, :, :3, :3])


def test_method_is_the_default_of_context_and_cam_needs_it_explicit():
    batch = _inputs(seed=1)
    trained = ContextPrototypes(N, C, {"bank_size": 4, "K": 2}).train()
    trained(*_inputs())
    state = trained.state_dict()
    maps = {}
    for method in ("sipe", "cpal"):
        module = ContextPrototypes(N, C, {"method": method, "bank_size": 4, "K": 2}).eval()
        module.load_state_dict(state)
        maps[method] = module(*batch).pacam
        torch.testing.assert_close(maps[method], module(*batch, context=method == "cpal").pacam)
    assert not torch.allclose(maps["sipe"], maps["cpal"])
    cam = ContextPrototypes(N, C, {"method": "cam"})  # built (a host keeps the bank's keys for every method)
    with pytest.raises(ValueError, match=r"params\.method = 'cam'.*pass context=True"):
        cam(*batch)
    cam(*batch, context=True)  # an explicit context is the host's choice (AMN's plug-in: always CPAL)


def test_lambda_self_weighs_the_loss_term_the_module_returns():
    out = ContextPrototypes(N, C, {"lambda_self": 0.25})(*_inputs())
    torch.testing.assert_close(out.loss, 0.25 * out.loss_self)


def test_every_params_key_is_a_setting_and_documented():
    keys = set(load_schema()["properties"]["params"]["properties"])
    assert keys == {f.name for f in fields(CPALConfig)}
    doc = (ROOT / "docs" / "plugin.md").read_text()
    section = doc.split("## Settings", 1)[1].split("\n## ", 1)[0]
    assert {k for k in keys if f"`{k}`" not in section} == set()


def test_amn_keeps_cpal_context_whatever_params_method_made_its_ir_labels():
    from cpal.amn.network import AMNNet

    params = {**asdict(CPALConfig()), "method": "cam", "bank_size": 4, "K": 2}  # the whole params section
    net = AMNNet(N, "resnet18", cpal_cfg=params).train()
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, net.backbone.channels[3], 4, 4, generator=g)
    logits = torch.randn(2, N + 1, 4, 4, generator=g)
    out = net.prototypes(feats, logits, torch.ones(2, N))
    assert out.loss_self.dim() == 0 and int(net.cpal.bank.count.sum()) > 0
