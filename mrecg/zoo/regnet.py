"""RegNetX-600MF in the pycls / BRECQ layout.

Parameter names: ``stem.conv``, ``stem.bn``, ``sS.bJ.proj``, ``sS.bJ.bn``, ``sS.bJ.f.{a,b,c}``,
``sS.bJ.f.{a_bn,b_bn,c_bn}``, ``head.fc`` (S and J count from 1). Widths come from the RegNet
design-space parameters (w_a=36.97, w_0=48, w_m=2.24, depth 16, group width 24): stages of depth
1/3/5/7 and widths 48/96/240/528. ``regnetx_small`` is a three-stage X block network for 28x28 images.
"""
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch.nn as nn

from mrecg.zoo.registry import init_conv_bn, register_model

REGNETX_600M = dict(w_a=36.97, w_0=48, w_m=2.24, depth=16, group_w=24)


def regnet_stage_widths(w_a: float, w_0: int, w_m: float, depth: int, group_w: int, q: int = 8):
    """Per-stage (width, depth, group width) from the RegNet quantised-linear parameterisation."""
    ws_cont = np.arange(depth) * w_a + w_0
    ks = np.round(np.log(ws_cont / w_0) / np.log(w_m))
    ws = (np.round(w_0 * np.power(w_m, ks) / q) * q).astype(int).tolist()
    stages = []
    for w in ws:
        if stages and stages[-1][0] == w:
            stages[-1][1] += 1
        else:
            stages.append([w, 1])
    out = []
    for w, d in stages:
        g = min(group_w, w)
        w = int(round(w / g) * g)
        out.append((w, d, g))
    return out


class Stem(nn.Module):
    def __init__(self, in_chans: int, width: int, stride: int = 2):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, width, 3, stride, 1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


class BottleneckTransform(nn.Module):
    def __init__(self, w_in: int, w_out: int, stride: int, group_w: int):
        super().__init__()
        self.a = nn.Conv2d(w_in, w_out, 1, 1, 0, bias=False)
        self.a_bn = nn.BatchNorm2d(w_out)
        self.a_relu = nn.ReLU(inplace=True)
        self.b = nn.Conv2d(w_out, w_out, 3, stride, 1, groups=w_out // group_w, bias=False)
        self.b_bn = nn.BatchNorm2d(w_out)
        self.b_relu = nn.ReLU(inplace=True)
        self.c = nn.Conv2d(w_out, w_out, 1, 1, 0, bias=False)
        self.c_bn = nn.BatchNorm2d(w_out)

    def forward(self, x):
        x = self.a_relu(self.a_bn(self.a(x)))
        x = self.b_relu(self.b_bn(self.b(x)))
        return self.c_bn(self.c(x))


class ResBottleneckBlock(nn.Module):
    def __init__(self, w_in: int, w_out: int, stride: int, group_w: int):
        super().__init__()
        self.proj_block = w_in != w_out or stride != 1
        if self.proj_block:
            self.proj = nn.Conv2d(w_in, w_out, 1, stride, 0, bias=False)
            self.bn = nn.BatchNorm2d(w_out)
        self.f = BottleneckTransform(w_in, w_out, stride, group_w)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        shortcut = self.bn(self.proj(x)) if self.proj_block else x
        return self.relu(shortcut + self.f(x))


class Head(nn.Module):
    def __init__(self, w_in: int, num_classes: int):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(w_in, num_classes)

    def forward(self, x):
        return self.fc(self.avg_pool(x).flatten(1))


class RegNet(nn.Module):
    """``stages`` (width, depth, group width) per stage replaces the design-space parameters when given."""

    def __init__(self, w_a: float = 0.0, w_0: int = 0, w_m: float = 0.0, depth: int = 0, group_w: int = 0,
                 num_classes: int = 1000, in_chans: int = 3, stem_w: int = 32, stem_stride: int = 2,
                 stages: Optional[Sequence[Tuple[int, int, int]]] = None):
        super().__init__()
        self.stem = Stem(in_chans, stem_w, stem_stride)
        prev = stem_w
        self.stage_depths = []
        stages = stages if stages is not None else regnet_stage_widths(w_a, w_0, w_m, depth, group_w)
        for s, (w, d, g) in enumerate(stages, start=1):
            stage = nn.Module()
            for j in range(1, d + 1):
                stage.add_module(f'b{j}', ResBottleneckBlock(prev if j == 1 else w, w, 2 if j == 1 else 1, g))
            self.add_module(f's{s}', stage)
            self.stage_depths.append(d)
            prev = w
        self.head = Head(prev, num_classes)
        init_conv_bn(self)

    def forward(self, x):
        x = self.stem(x)
        for s, d in enumerate(self.stage_depths, start=1):
            stage = getattr(self, f's{s}')
            for j in range(1, d + 1):
                x = getattr(stage, f'b{j}')(x)
        return self.head(x)

    def unit_partition(self) -> List[Tuple[str, List[str]]]:
        """BRECQ blocks: stem, every residual block sS.bJ, the head."""
        units = [('stem', ['stem'])]
        for s, d in enumerate(self.stage_depths, start=1):
            units += [(f's{s}.b{j}', [f's{s}.b{j}']) for j in range(1, d + 1)]
        units.append(('head', ['head']))
        return units


@register_model('regnetx_600m', family='regnet', image_size=224)
def regnetx_600m(num_classes: int = 1000, in_chans: int = 3) -> RegNet:
    return RegNet(**REGNETX_600M, num_classes=num_classes, in_chans=in_chans)


@register_model('regnetx_small', family='regnet', image_size=28)
def regnetx_small(num_classes: int = 10, in_chans: int = 1, stem_stride: int = 1) -> RegNet:
    """A RegNetX-style model for small images (grouped 3x3 convolutions, group width 8): stem 16, stages of
    depth 1/2/3 and widths 24/48/96, each starting with stride 2 (28x28 -> 4x4 with stem stride 1)."""
    return RegNet(num_classes=num_classes, in_chans=in_chans, stem_w=16, stem_stride=stem_stride,
                  stages=[(24, 1, 8), (48, 2, 8), (96, 3, 8)])
