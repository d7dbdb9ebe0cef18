"""A small segmentation network for the composed Fashion-MNIST canvases (``data.type: fashion_segmentation``),
shaped like torchvision's FCN: a ``backbone`` (a small ResNet trunk, output stride 8) and a ``classifier``
head, the scores upsampled to the input's size and returned as ``{'out': scores}``. It is the part a config
quantizes with ``model.quantize_part: backbone``; build it as ``mrecg.zoo.segmentation:fcn_resnet_small``.

It is not in the classifier registry (``mrecg.zoo.list_models``): those models return class scores per image.
"""
from typing import List, Sequence, Tuple

import torch.nn as nn
import torch.nn.functional as F

from mrecg.zoo.registry import init_conv_bn
from mrecg.zoo.resnet import BasicBlock, ResNet


class ResNetTrunk(ResNet):
    """A ResNet without its pooling and classifier: the feature map of the last stage."""

    def __init__(self, in_chans: int, widths: Sequence[int], layers: Sequence[int], stem_stride: int):
        super().__init__(BasicBlock, list(layers), in_chans=in_chans, widths=list(widths), small_input=True,
                         stem_stride=stem_stride)
        del self.avgpool, self.fc

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return x

    def unit_partition(self) -> List[Tuple[str, List[str]]]:
        """BRECQ blocks: the stem and every residual block."""
        return super().unit_partition()[:-1]


class FCNHead(nn.Sequential):
    def __init__(self, width: int, num_classes: int):
        super().__init__(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                         nn.ReLU(inplace=True), nn.Conv2d(width, num_classes, 1))


class SmallFCN(nn.Module):
    def __init__(self, backbone: nn.Module, classifier: nn.Module):
        super().__init__()
        self.backbone, self.classifier = backbone, classifier

    def forward(self, x):
        scores = self.classifier(self.backbone(x))
        return {'out': F.interpolate(scores, size=x.shape[-2:], mode='bilinear', align_corners=False)}


def fcn_resnet_small(num_classes: int = 11, in_chans: int = 1, widths: Sequence[int] = (16, 32, 64),
                     layers: Sequence[int] = (2, 2, 2), stem_stride: int = 2) -> SmallFCN:
    """~0.2 M parameters; 64 x 64 canvases give 8 x 8 feature maps."""
    model = SmallFCN(ResNetTrunk(in_chans, widths, layers, stem_stride), FCNHead(widths[-1], num_classes))
    init_conv_bn(model)
    return model
