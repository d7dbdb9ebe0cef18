"""MobileNetV2 in the layout of the MRECG/BRECQ releases, with width multipliers, plus a small variant.

Parameter names: ``features.0.{0,1}``, ``features.N.conv.{0,1,3,4[,6,7]}``, ``features.18.{0,1}``,
``classifier.1``. Channels follow the make-divisible-by-8 rule used by the d-li14 width-multiplier
checkpoints (0.75, 0.5, 0.35), so those load by name too (see ``models/checkpoint.py`` for the aliases).
"""
from typing import List, Sequence, Tuple

import torch.nn as nn

from mrecg.zoo.registry import register_model

IMAGENET_SETTING = (  # t (expansion), c (channels), n (repeats), s (stride of the first)
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
SMALL_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 2, 1), (6, 48, 2, 2), (6, 64, 1, 1))


def make_divisible(v: float, divisor: int = 8) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:  # never round down by more than 10 %
        new_v += divisor
    return new_v


def conv_bn_relu(inp: int, oup: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, oup, kernel, stride, kernel // 2, bias=False),
                         nn.BatchNorm2d(oup), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = round(inp * expand_ratio)
        self.use_res_connect = stride == 1 and inp == oup
        layers = []
        if expand_ratio != 1:
            layers += [nn.Conv2d(inp, hidden, 1, 1, 0, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
                   nn.ReLU6(inplace=True),
                   nn.Conv2d(hidden, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, in_chans: int = 3,
                 setting: Sequence[Sequence[int]] = IMAGENET_SETTING, stem_channels: int = 32,
                 stem_stride: int = 2, last_channel: int = 1280, dropout: float = 0.0):
        super().__init__()
        input_channel = make_divisible(stem_channels * width_mult)
        self.last_channel = make_divisible(last_channel * width_mult) if width_mult > 1.0 else last_channel
        features = [conv_bn_relu(in_chans, input_channel, 3, stem_stride)]
        for t, c, n, s in setting:
            output_channel = make_divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(input_channel, output_channel, s if i == 0 else 1, t))
                input_channel = output_channel
        features.append(conv_bn_relu(input_channel, self.last_channel, 1, 1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.last_channel, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out')
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.features(x)
        x = x.mean([2, 3])
        return self.classifier(x)

    def unit_partition(self) -> List[Tuple[str, List[str]]]:
        """The authors' plain units: [features.0+features.1], features.2 .. features.N-1, [last conv+classifier]."""
        last = len(self.features) - 1
        units = [('features.0+features.1', ['features.0', 'features.1'])]
        units += [(f'features.{i}', [f'features.{i}']) for i in range(2, last)]
        units.append((f'features.{last}+classifier', [f'features.{last}', 'classifier']))
        return units


@register_model('mobilenet_v2', family='mobilenet_v2', image_size=224)
def mobilenet_v2(num_classes: int = 1000, width_mult: float = 1.0, in_chans: int = 3,
                 dropout: float = 0.0) -> MobileNetV2:
    return MobileNetV2(num_classes=num_classes, width_mult=width_mult, in_chans=in_chans, dropout=dropout)


@register_model('mobilenet_v2_small', family='mobilenet_v2', image_size=28)
def mobilenet_v2_small(num_classes: int = 10, width_mult: float = 1.0, in_chans: int = 1,
                       last_channel: int = 256, stem_stride: int = 1) -> MobileNetV2:
    """MobileNetV2-style model for small images: 9 inverted residuals; stem stride 1 for 8x8 digits,
    2 for 28x28 Fashion-MNIST."""
    return MobileNetV2(num_classes=num_classes, width_mult=width_mult, in_chans=in_chans, setting=SMALL_SETTING,
                       stem_channels=16, stem_stride=stem_stride, last_channel=last_channel)
