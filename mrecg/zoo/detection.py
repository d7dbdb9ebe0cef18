"""A small detector for the composed Fashion-MNIST canvases (``data.type: fashion_detection``): torchvision's
FCOS on a small ResNet trunk with an FPN (``backbone``: the trunk's ``body`` and the ``fpn``, the part a config
quantizes with ``model.quantize_part: backbone``); the heads and the post-processing stay float. Build it as
``mrecg.zoo.detection:fcos_resnet_small``. Not in the classifier registry (it returns boxes, not class scores).
"""
from typing import Sequence

import torch.nn as nn
from torchvision.models.detection import FCOS
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from mrecg.canvases import MEAN, STD
from mrecg.zoo.segmentation import ResNetTrunk


def fcos_resnet_small(num_classes: int = 11, in_chans: int = 1, widths: Sequence[int] = (16, 32, 64),
                      layers: Sequence[int] = (2, 2, 2), fpn_width: int = 64, size: int = 64) -> nn.Module:
    """FPN levels at strides 4, 8 (the trunk's last two stages), 16 and 32 (P6, P7); one anchor size per level
    (8 to 64 pixels, the items are up to 28). Images of ``size`` pass the detector's transform unchanged."""
    trunk = ResNetTrunk(in_chans, widths, layers, stem_stride=2)
    backbone = BackboneWithFPN(trunk, return_layers={'layer2': '0', 'layer3': '1'},
                               in_channels_list=list(widths[1:]), out_channels=fpn_width,
                               extra_blocks=LastLevelP6P7(fpn_width, fpn_width))
    anchors = AnchorGenerator(sizes=((8,), (16,), (32,), (64,)), aspect_ratios=((1.0,),) * 4)
    return FCOS(backbone, num_classes, min_size=size, max_size=size, image_mean=[MEAN] * in_chans,
                image_std=[STD] * in_chans, anchor_generator=anchors, score_thresh=0.05, detections_per_img=20)
