"""ResNet-18/50 with torchvision / BRECQ parameter names, plus a small ResNet for 8x8 and 28x28 images.

Parameter names (conv1, bn1, layerL.i.conv{1,2,3}, layerL.i.bn{1,2,3}, layerL.0.downsample.{0,1}, fc)
match torchvision's and BRECQ's released checkpoints, so weights load by name. Every ReLU is its own
module (relu1/relu2/...) so that each graph node has exactly one owner module.
"""
from typing import List, Sequence, Tuple

import torch
import torch.nn as nn

from mrecg.zoo.registry import init_conv_bn, register_model


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x):
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + residual)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = downsample
        self.relu3 = nn.ReLU(inplace=True)

    def forward(self, x):
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(out + residual)


class ResNet(nn.Module):
    """ResNet. ``small_input`` swaps the 7x7/2 stem and max-pool for a 3x3 stem of ``stem_stride``."""

    def __init__(self, block, layers: Sequence[int], num_classes: int = 1000, in_chans: int = 3,
                 widths: Sequence[int] = (64, 128, 256, 512), small_input: bool = False, stem_stride: int = 1):
        super().__init__()
        self.inplanes = widths[0]
        if small_input:
            self.conv1 = nn.Conv2d(in_chans, widths[0], 3, stem_stride, 1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_chans, widths[0], 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.stage_names = []
        for i, (width, depth) in enumerate(zip(widths, layers)):
            name = f'layer{i + 1}'
            setattr(self, name, self._make_layer(block, width, depth, stride=1 if i == 0 else 2))
            self.stage_names.append(name)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[-1] * block.expansion, num_classes)
        init_conv_bn(self)

    def _make_layer(self, block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for name in self.stage_names:
            x = getattr(self, name)(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)

    def unit_partition(self) -> List[Tuple[str, List[str]]]:
        """BRECQ blocks: the stem, every residual block, the classifier."""
        units = [('stem', ['conv1', 'bn1', 'relu', 'maxpool'])]
        for stage in self.stage_names:
            for i in range(len(getattr(self, stage))):
                units.append((f'{stage}.{i}', [f'{stage}.{i}']))
        units.append(('classifier', ['avgpool', 'fc']))
        return units


@register_model('resnet18', family='resnet', image_size=224)
def resnet18(num_classes: int = 1000, in_chans: int = 3) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes, in_chans=in_chans)


@register_model('resnet50', family='resnet', image_size=224)
def resnet50(num_classes: int = 1000, in_chans: int = 3) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes, in_chans=in_chans)


@register_model('resnet_small', family='resnet', image_size=28)
def resnet_small(num_classes: int = 10, in_chans: int = 1, widths: Sequence[int] = (16, 32, 64),
                 layers: Sequence[int] = (2, 2, 2), stem_stride: int = 1) -> ResNet:
    """A ResNet-style model for small images: 3x3 stem (stride 1 for 8x8 digits, 2 for 28x28
    Fashion-MNIST), three stages."""
    return ResNet(BasicBlock, list(layers), num_classes=num_classes, in_chans=in_chans,
                  widths=list(widths), small_input=True, stem_stride=stem_stride)
