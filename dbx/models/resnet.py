"""ResNet-18 in the two forms the DiveBatch experiments use.

- ``resnet18_cifar``: the CIFAR variant of kuangliu/pytorch-cifar, which the authors' code
  (chenyuen0103/pytorch-cifar, pytorch-cifar100) trains: a 3x3 stride-1 stem with no max-pool, four
  stages of two BasicBlocks (64, 128, 256, 512 channels), global average pooling, one Linear
  layer; PyTorch's default initialisation. 11.2 M parameters.
- ``resnet18``: torchvision's ImageNet ResNet-18 (7x7 stride-2 stem, max-pool), from scratch,
  as the authors trained on Tiny-ImageNet.
"""
from __future__ import annotations

import torch
from torch import nn

from dbx.models.linear import num_outputs
from dbx.models.options import apply_model_options

__all__ = ["resnet18_cifar", "resnet18", "BasicBlock", "CifarResNet"]


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.relu2 = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, blocks: list[int], num_outputs: int, in_channels: int = 3) -> None:
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.layer1 = self._stage(64, blocks[0], 1)
        self.layer2 = self._stage(128, blocks[1], 2)
        self.layer3 = self._stage(256, blocks[2], 2)
        self.layer4 = self._stage(512, blocks[3], 2)
        self.pool = nn.AdaptiveAvgPool2d(1)  # = avg_pool2d(4) on 32x32 inputs, and any size works
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(512, num_outputs)

    def _stage(self, planes: int, count: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (count - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(self.flatten(self.pool(out)))


def resnet18_cifar(*, num_classes: int | None, input_shape: tuple[int, ...], channels_last: bool = False,
                   compile: bool = False) -> nn.Module:
    """CIFAR ResNet-18 (3x3 stem, no max-pool). Any input size; made for 32x32."""
    model = CifarResNet([2, 2, 2, 2], num_outputs(num_classes), in_channels=input_shape[0])
    return apply_model_options(model, channels_last=channels_last, compile=compile)


def resnet18(*, num_classes: int | None, input_shape: tuple[int, ...], channels_last: bool = False,
             compile: bool = False) -> nn.Module:
    """torchvision's ResNet-18, randomly initialised (no pretrained weights are ever fetched)."""
    import torchvision

    model = torchvision.models.resnet18(weights=None, num_classes=num_outputs(num_classes))
    if input_shape[0] != 3:
        model.conv1 = nn.Conv2d(input_shape[0], 64, 7, stride=2, padding=3, bias=False)
    return apply_model_options(model, channels_last=channels_last, compile=compile)
