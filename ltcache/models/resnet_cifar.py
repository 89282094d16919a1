"""CIFAR ResNets: ResNet-32 of Cao et al. (LDAM-DRW, MiSLAS) and the LOS/LTWB ResNet-34."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ltcache.models.registry import register_model


class _ShortcutA(nn.Module):
    """Option-A shortcut: stride-2 subsampling and zero-padded channels (no parameters)."""

    def __init__(self, planes: int):
        super().__init__()
        self.pad = planes // 4

    def forward(self, x):
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1, option: str = "A"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            if option == "A":
                self.shortcut = _ShortcutA(planes)
            else:
                self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                              nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """A CIFAR ResNet with separate ``features`` (penultimate, pooled) and ``fc``."""

    def __init__(self, blocks: list, widths: list, num_classes: int, option: str):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers, in_planes = [], widths[0]
        for i, (n, w) in enumerate(zip(blocks, widths)):
            stride = 1 if i == 0 else 2
            stage = []
            for j in range(n):
                stage.append(BasicBlock(in_planes, w, stride if j == 0 else 1, option))
                in_planes = w
            layers.append(nn.Sequential(*stage))
        self.layers = nn.Sequential(*layers)
        self.feature_dim = in_planes
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


@register_model("resnet32")
def resnet32(num_classes: int) -> CifarResNet:
    """ResNet-32 for 32x32 images (Cao et al. 2019): 3 stages x 5 blocks, 16/32/64 channels, D=64."""
    return CifarResNet([5, 5, 5], [16, 32, 64], num_classes, option="A")


@register_model("resnet34-cifar")
def resnet34_cifar(num_classes: int) -> CifarResNet:
    """ResNet-34 with a 3x3 stride-1 stem and no max-pool (LOS, LTWB), D=512."""
    return CifarResNet([3, 4, 6, 3], [64, 128, 256, 512], num_classes, option="B")
