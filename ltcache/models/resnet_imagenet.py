"""The ImageNet ResNets by name (resnet18, resnet50, resnext50_32x4d), randomly initialised (no
weight downloads). They subclass torchvision's ResNet, so a torchvision state dict loads unchanged."""
from __future__ import annotations

import torch
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from ltcache.models.registry import register_model


class FeatureResNet(ResNet):
    """torchvision ResNet exposing ``features`` (pooled penultimate) and ``feature_dim``."""

    @property
    def feature_dim(self) -> int:
        return self.fc.in_features

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


@register_model("resnet18")
def resnet18(num_classes: int) -> FeatureResNet:
    """torchvision ResNet-18, D=512."""
    return FeatureResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes)


@register_model("resnet50")
def resnet50(num_classes: int) -> FeatureResNet:
    """torchvision ResNet-50, D=2048."""
    return FeatureResNet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes)


@register_model("resnext50_32x4d")
def resnext50_32x4d(num_classes: int) -> FeatureResNet:
    """torchvision ResNeXt-50 32x4d, D=2048 (cRT / DisAlign ImageNet-LT backbone)."""
    return FeatureResNet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes, groups=32, width_per_group=4)
