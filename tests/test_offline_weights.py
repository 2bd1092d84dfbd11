"""ResNet ImageNet weights on a machine without network: a file placed in torch's hub cache is used as it is,
a wrong or missing one is named, and scripts/fetch_weights.py lists what each preset needs.

No test here touches the network: torch's downloader, urllib and socket connections raise."""

from __future__ import annotations

import importlib.util
import re
import socket
import urllib.request
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn
from torchvision import models

import cpal.backbone as backbone_module
import cpal.seg.model as seg_model
from cpal.backbone import IMAGENET_WEIGHTS, build_backbone, required_imagenet_weights, weights_path
from cpal.core.config import load_params
from cpal.seg.model import build_segmenter

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ("voc12", "coco14")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


class NetworkUsed(AssertionError):
    pass


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """TORCH_HOME in tmp_path, and every way torch.hub could reach the network raising NetworkUsed."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise NetworkUsed(f"network access attempted: {args[:2]}")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # no torch.hub.set_dir() overriding TORCH_HOME
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(torch.hub, "urlopen", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return tmp_path / "torch_home" / "hub" / "checkpoints"


def _place(state: dict[str, torch.Tensor], weights: models.WeightsEnum) -> Path:
    path = weights_path(weights)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def _random_resnet18() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    net = models.resnet18()
    with torch.no_grad():  # distinct running statistics too, so they are checked as loaded
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    return net.state_dict()


def _factory_key(key: str) -> str:
    """torchvision's ResNet name -> cpal.backbone.Backbone's (stem and layer1 in stage 0, layer2..4 after)."""
    head, rest = key.split(".", 1)
    stem = {"conv1": 0, "bn1": 1}  # stem = Sequential(conv1, bn1, relu, maxpool)
    if head in stem:
        return f"stages.0.0.{stem[head]}.{rest}"
    if head == "layer1":
        return f"stages.0.1.{rest}"
    return f"stages.{int(head[-1]) - 1}.{rest}"


def test_placed_file_is_used_with_no_network(offline: Path) -> None:
    weights = IMAGENET_WEIGHTS["resnet18"]
    state = _random_resnet18()
    path = _place(state, weights)
    assert path == offline / "resnet18-f37072fd.pth"
    stamp = path.stat().st_mtime_ns
    net = build_backbone("resnet18", pretrained=True)
    loaded = net.state_dict()
    compared = 0
    for key, value in state.items():
        if not key.startswith("fc."):
            torch.testing.assert_close(loaded[_factory_key(key)], value, rtol=0, atol=0)
            compared += 1
    assert compared == len(loaded) == len(state) - 2  # every tensor of the backbone came from the file
    assert path.stat().st_mtime_ns == stamp


def test_deeplabv3_trunk_uses_placed_file_with_no_network(offline: Path) -> None:
    """seg.backbone resnet50/101 (torchvision DeepLabV3) loads through the same checked loader."""
    torch.manual_seed(2)
    state = models.resnet50().state_dict()
    _place(state, IMAGENET_WEIGHTS["resnet50"])
    seg = build_segmenter({"backbone": "resnet50", "head": "v2", "init": "imagenet", "dilated": True}, 5)
    trunk = seg.backbone.state_dict()
    assert set(trunk) == {k for k in state if not k.startswith("fc.")}
    for key, value in trunk.items():
        assert torch.equal(value, state[key]), key


def test_wrong_shapes_are_refused_naming_file_and_first_tensor(offline: Path) -> None:
    state = _random_resnet18()
    state["layer2.0.conv1.weight"] = torch.zeros(128, 64, 1, 1)  # was (128, 64, 3, 3)
    state["layer3.0.conv1.weight"] = torch.zeros(1)
    path = _place(state, IMAGENET_WEIGHTS["resnet18"])
    message = (re.escape(f"{path} (ResNet18_Weights.IMAGENET1K_V1): tensor layer2.0.conv1.weight has shape "
                         "(128, 64, 1, 1), expected (128, 64, 3, 3)") + r".*scripts/fetch_weights\.py")
    with pytest.raises(ValueError, match=message):
        build_backbone("resnet18", pretrained=True)


def test_file_of_another_resnet_is_refused(offline: Path) -> None:
    """resnet18's weights under resnet50's name: the first tensor that differs is layer1's first conv."""
    path = _place(_random_resnet18(), IMAGENET_WEIGHTS["resnet50"])
    with pytest.raises(ValueError, match=re.escape(f"{path} (ResNet50_Weights.IMAGENET1K_V1): tensor "
                                                   "layer1.0.conv1.weight has shape (64, 64, 3, 3), expected "
                                                   "(64, 64, 1, 1)")):
        build_backbone("resnet50", pretrained=True)


def test_wrapped_truncated_or_pickled_files_are_refused(offline: Path) -> None:
    weights = IMAGENET_WEIGHTS["resnet18"]
    path = _place({"state_dict": _random_resnet18()}, weights)  # a training checkpoint, not a state dict
    with pytest.raises(ValueError, match=re.escape(f"{path} (ResNet18_Weights.IMAGENET1K_V1): has no tensor "
                                                   "conv1.weight (expected shape (64, 3, 7, 7))")):
        build_backbone("resnet18", pretrained=True)
    path.write_bytes(path.read_bytes()[:50_000])
    with pytest.raises(ValueError, match=re.escape(str(path)) + r": cannot be read .*delete it"):
        build_backbone("resnet18", pretrained=True)

    class Payload:
        def __reduce__(self) -> tuple:
            return (print, ("pickled code ran",))

    _place({**_random_resnet18(), "extra": Payload()}, weights)
    with pytest.raises(ValueError, match=re.escape(str(path)) + r": cannot be read"):
        build_backbone("resnet18", pretrained=True)


def test_missing_file_offline_names_the_path_and_the_script(offline: Path) -> None:
    path = offline / "resnet101-63fe2227.pth"
    with pytest.raises(FileNotFoundError) as info:
        build_segmenter({"backbone": "resnet101", "head": "v2", "init": "imagenet", "dilated": True}, 21)
    message = str(info.value)
    assert f"put it at {path} " in message
    assert "python scripts/fetch_weights.py <params file>" in message
    assert "https://download.pytorch.org/models/resnet101-63fe2227.pth" in message
    assert "NetworkUsed" in message  # the download was tried, and refused by the fixture
    assert not path.exists()


@pytest.mark.parametrize("preset", PRESETS)
def test_required_weights_are_what_the_stages_load(preset: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Build every stage's model from the preset (the loader recording instead of loading): the weights
    asked for are exactly required_imagenet_weights's, so fetch_weights.py lists what the stages read."""
    from cpal.amn.train import build_amn
    from cpal.cls.train import build_model
    from cpal.irn.train import build_boundary_net

    asked: set[models.WeightsEnum] = set()

    def record(model: nn.Module, weights: models.WeightsEnum, unused: tuple[str, ...] = ()) -> None:
        asked.add(weights)

    monkeypatch.setattr(backbone_module, "load_imagenet_weights", record)
    monkeypatch.setattr(seg_model, "load_imagenet_weights", record)
    params = load_params(ROOT / "configs" / f"{preset}.yaml")
    build_model(params, 3)
    build_boundary_net(params, None)
    build_amn(params, 3)
    build_segmenter(params["seg"], 4)
    needed = required_imagenet_weights(params)
    assert asked == set(needed)
    assert {weights_path(w).name for w in needed} == {"resnet50-0676ba61.pth", "resnet101-63fe2227.pth"}
    assert needed[IMAGENET_WEIGHTS["resnet50"]] == ["train_cls.backbone", "irn.backbone_from", "amn.backbone"]


def test_lite0_presets_need_no_download() -> None:
    for name in ("params.yaml", "configs/tiny.yaml", "configs/embedded_gpu.yaml", "configs/folder_example.yaml"):
        assert required_imagenet_weights(load_params(ROOT / name)) == {}, name


def _fetch_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fetch_weights", ROOT / "scripts" / "fetch_weights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fetch_weights_list_names_the_files_without_network(offline: Path, capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    assert _fetch_script().main(["--list", "configs/voc12.yaml"]) == 0
    lines = [line.split("\t") for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]
    expected = required_imagenet_weights(load_params(ROOT / "configs" / "voc12.yaml"))
    assert [line[0] for line in lines] == [weights_path(w).name for w in expected]
    assert [line[0] for line in lines] == ["resnet50-0676ba61.pth", "resnet101-63fe2227.pth"]
    assert [line[1] for line in lines] == [w.url for w in expected]
    assert [line[4] for line in lines] == ["missing here", "missing here"]
    _place(_random_resnet18(), IMAGENET_WEIGHTS["resnet50"])  # any file at the path counts as present
    assert _fetch_script().main(["--list", "configs/voc12.yaml", "params.yaml"]) == 0
    out = capsys.readouterr().out
    assert "resnet50-0676ba61.pth\t" in out and "present here" in out and "configs/voc12.yaml (seg.backbone)" in out


def test_fetch_weights_downloads_into_dest_and_says_where_to_copy(offline: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    fetched = []

    def fake_download(url: str, dst: str, hash_prefix: str | None = None, progress: bool = True) -> None:
        fetched.append((url, hash_prefix))
        Path(dst).write_bytes(b"weights")

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    monkeypatch.chdir(ROOT)
    dest = tmp_path / "weights"
    script = _fetch_script()
    assert script.main(["configs/coco14.yaml", "--dest", str(dest)]) == 0
    assert sorted(p.name for p in dest.iterdir()) == ["resnet101-63fe2227.pth", "resnet50-0676ba61.pth"]
    assert fetched[0] == ("https://download.pytorch.org/models/resnet50-0676ba61.pth", "0676ba61")
    out = capsys.readouterr().out
    assert "scp " in out and "~/.cache/torch/hub/checkpoints/" in out and "TORCH_HOME" in out
    assert script.main(["configs/coco14.yaml", "--dest", str(dest)]) == 0  # not the files named: fetched again
    assert len(fetched) == 4
    assert script.main(["configs/tiny.yaml"]) == 0 and len(fetched) == 4  # Lite0: nothing to fetch
    assert not offline.exists()  # only --dest was written


def test_docs_name_the_files_each_preset_needs() -> None:
    """The offline section's table is what required_imagenet_weights says (file, enum, size), not a copy."""
    section = (ROOT / "docs" / "real-data.md").read_text().split("## Running a ResNet preset offline", 1)[1]
    for preset in PRESETS:
        for weights in required_imagenet_weights(load_params(ROOT / "configs" / f"{preset}.yaml")):
            assert f"`{weights_path(weights).name}` (`{weights}`) | {weights.meta['_file_size']:.1f} MB |" in section
