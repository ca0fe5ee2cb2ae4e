"""Architectures of the published networks behind the representations of Rosenfeld et al. (arXiv:1903.10920).

Each builder returns a module whose `state_dict()` keys are the published
file's keys (after removing a container prefix such as "module."), so that
strict loading checks the file against the architecture key by key. Building
inside `with torch.device("meta"):` skips random initialisation, for loading
with `load_state_dict(assign=True)`.
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn
from torch.nn import functional as F

GEM_EPS = 1e-6
L2_EPS = 1e-6


def gem(x: torch.Tensor, p: torch.Tensor, eps: float = GEM_EPS) -> torch.Tensor:
    """Generalised-mean pooling over space: (mean of max(x, eps)^p)^(1/p), [B, C, H, W] -> [B, C]."""
    return x.clamp(min=eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


def l2_normalize(x: torch.Tensor, eps: float = L2_EPS) -> torch.Tensor:
    """Divide each row of [B, D] by its L2 norm plus `eps`, as cnnimageretrieval-pytorch's L2N does."""
    return x / (x.norm(p=2, dim=1, keepdim=True) + eps)


class GeM(nn.Module):
    """GeM pooling with a learned exponent `p` of shape [1] (initial value 3)."""

    def __init__(self, p: float = 3.0):
        super().__init__()
        self.p = nn.Parameter(torch.full((1,), p))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gem(x, self.p)


class RetrievalNet(nn.Module):
    """cnnimageretrieval-pytorch's ImageRetrievalNet for ResNet-101 with GeM and no whitening layer.

    Keys: `features.0` conv1, `features.1` bn1, `features.4`..`features.7`
    layer1..layer4, `pool.p`. The forward pass returns the L2-normalised GeM
    descriptor [B, 2048].
    """

    def __init__(self, arch: str = "resnet101"):
        super().__init__()
        backbone = getattr(torchvision.models, arch)(weights=None)
        self.features = nn.Sequential(*list(backbone.children())[:-2])
        self.pool = GeM()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return l2_normalize(self.pool(self.features(x)))


def resnet_trunk(arch: str, last_layer: str) -> nn.Sequential:
    """Build the ResNet children conv1, bn1, relu, maxpool, layer1, ... up to `last_layer` as one Sequential.

    weakalign's FeatureExtraction.model has this layout, so its keys are
    `0.*` (conv1), `1.*` (bn1), `4.*` (layer1) and so on.
    """
    backbone = getattr(torchvision.models, arch)(weights=None)
    names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    if last_layer not in names[4:]:
        raise ValueError(f"unknown last_layer {last_layer!r}; valid: {names[4:]}.")
    return nn.Sequential(*[getattr(backbone, name) for name in names[: names.index(last_layer) + 1]])


def classification_resnet(arch: str, num_classes: int) -> nn.Module:
    """Build a torchvision ResNet with `num_classes` outputs, the classifier shape of the file."""
    return getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)


# The OpenPose trunk (model0): VGG-19 conv1_1..conv4_2 then conv4_3_CPM and
# conv4_4_CPM, every convolution 3×3 with padding 1 and followed by ReLU.
# "M" marks a 2×2 max pool with stride 2.
OPENPOSE_TRUNK = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 256, 128)
# Stage heads after the trunk: stage 1 has five convolutions per branch, stages
# 2-6 seven, each followed by ReLU except the last (indices 0, 2, ..., 2n-2).
OPENPOSE_STAGE_CONVS = {1: 5, 2: 7, 3: 7, 4: 7, 5: 7, 6: 7}


def vgg_layers(config, in_channels: int) -> list[nn.Module]:
    """Build VGG-style layers: 3x3 convolution + ReLU per channel count, 2x2 max pooling per "M"."""
    layers: list[nn.Module] = []
    channels = in_channels
    for item in config:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        layers += [nn.Conv2d(channels, item, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
        channels = item
    return layers


def openpose_trunk() -> nn.Sequential:
    """Build the OpenPose VGG-19 trunk, whose convolutions have keys 0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25."""
    return nn.Sequential(*vgg_layers(OPENPOSE_TRUNK, 3))


def openpose_stage_keys() -> list[str]:
    """Return the state-dict keys of the six two-branch stages (model{1..6}_{1,2}), which the trunk feature does not use."""
    keys = []
    for stage, convs in OPENPOSE_STAGE_CONVS.items():
        for branch in (1, 2):
            for index in range(0, 2 * convs - 1, 2):
                keys += [f"model{stage}_{branch}.{index}.weight", f"model{stage}_{branch}.{index}.bias"]
    return keys


def mac(x: torch.Tensor) -> torch.Tensor:
    """MAC pooling: the spatial max, [B, C, H, W] -> [B, C]."""
    return x.amax(dim=(-2, -1))


class EdgeFilter(nn.Module):
    """EdgeMAC's edge filter: y = w · x^p / (1 + exp(−s (x − t))), t clamped to at least 0.01.

    w and s are fixed in training (10 and 500), p and t learned; all four come
    from the file.
    """

    def __init__(self):
        super().__init__()
        for name, value in (("w", 10.0), ("p", 0.5), ("s", 500.0), ("t", 0.1)):
            self.register_buffer(name, torch.full((), value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.t.clamp(min=0.01)
        # NOTE: exp overflows to inf for x far below t, which gives y = 0, the correct limit.
        return self.w * x.clamp(min=0).pow(self.p) / (1 + torch.exp(-self.s * (x - t)))


# VGG16 convolutions up to conv5_3; "M" marks a 2×2 max pool with stride 2.
# EdgeMAC drops pool5 and takes MAC pooling of relu5_3.
VGG16_CONVS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)


class EdgeMAC(nn.Module):
    """EdgeMAC: edge filter, VGG16 up to relu5_3 with a one-channel first convolution, MAC, L2.

    Input: edge maps [B, 1, H, W] with values in [0, 1]. Output: [B, 512].
    """

    def __init__(self):
        super().__init__()
        self.edge_filter = EdgeFilter()
        self.features = nn.Sequential(*vgg_layers(VGG16_CONVS, 1))

    @staticmethod
    def conv_key_names() -> list[tuple[str, str]]:
        """Return the (weight key, bias key) of each convolution, in order."""
        names, index = [], 0
        for item in VGG16_CONVS:
            if item != "M":
                names.append((f"features.{index}.weight", f"features.{index}.bias"))
            index += 1 if item == "M" else 2
        return names

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return l2_normalize(mac(self.features(self.edge_filter(x))))


def average_pool(x: torch.Tensor) -> torch.Tensor:
    """Global average pooling, [B, C, H, W] -> [B, C]."""
    return F.adaptive_avg_pool2d(x, 1).flatten(1)
