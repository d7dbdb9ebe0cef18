#!/usr/bin/env python
"""Memory of the cached calibration activations, per ImageNet model, for the authors' setting.

    python scripts/cache_memory.py                      # 4096 images (2048 for ResNet-50), float32 and float16
    python scripts/cache_memory.py --images 1024 --models resnet18

The engine keeps, for every tensor that crosses a unit boundary, one float and one quantized copy over the
whole calibration set, and frees each as soon as no later unit reads it. This walks the units with the
engine's own liveness analysis and the tensor shapes of a 224x224 forward, and prints the peak of that
cache (plain units and the authors' MRECG groups), where it occurs, and the input images' share.
Activations of the optimisation step itself (one batch, forward + backward) come on top and are small next
to it; model weights too.
"""
import argparse

import torch

from mrecg import zoo
from mrecg.grouping import PUBLISHED_SCHEMES, spans_from_scheme
from mrecg.config import QuantizeConfig
from mrecg.quantization import prepare_model
from mrecg.reconstruction import memory
from mrecg.units import UnitPartition, groups_from_spans, model_base_units

PAPER_MODELS = [('resnet18', {}, 4096), ('resnet50', {}, 2048), ('mobilenet_v2', {'width_mult': 1.0}, 4096),
                ('mobilenet_v2', {'width_mult': 0.75}, 4096), ('mobilenet_v2', {'width_mult': 0.5}, 4096),
                ('mobilenet_v2', {'width_mult': 0.35}, 4096), ('regnetx_600m', {}, 4096)]


def per_image_bytes(partition: UnitPartition, size: int, dtype_bytes: int):
    return memory.per_image_bytes(partition.graph_module, torch.zeros(1, 3, size, size), dtype_bytes)


def peak_cache(partition: UnitPartition, spans, sizes, images: int):
    """The engine's own estimate (``mrecg.reconstruction.memory``), plus the input images' share."""
    placeholder = next(n.name for n in partition.graph_module.graph.nodes if n.op == 'placeholder')
    peak, where = memory.peak_cache(partition, groups_from_spans(spans, len(partition.units)), sizes, images)
    return peak, where, sizes[placeholder] * images


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--images', type=int, help='calibration images (default: 4096, 2048 for ResNet-50)')
    p.add_argument('--models', nargs='+', help='restrict to these model types')
    p.add_argument('--input-size', type=int, default=224)
    args = p.parse_args()
    qs = QuantizeConfig(w_qconfig={'bit': 4, 'p': 2.0}, a_qconfig={'bit': 4, 'p': 2.0})
    gib = 2 ** 30
    print('| model | images | plain units: peak cache fp32 / fp16 (GiB) | at unit | authors\' MRECG groups: '
          'fp32 / fp16 (GiB) | at group | of which input images (fp32) |')
    print('|---|---|---|---|---|---|---|')
    for name, kwargs, default_images in PAPER_MODELS:
        if args.models and name not in args.models:
            continue
        images = args.images or default_images
        model = zoo.build_model(name, **kwargs).eval()
        partition = UnitPartition.build(prepare_model(model, qs), model_base_units(model))
        sizes = per_image_bytes(partition, args.input_size, 4)
        plain, at_plain, img = peak_cache(partition, [], sizes, images)
        spans = spans_from_scheme(PUBLISHED_SCHEMES[name], partition.units)
        grouped, at_grouped, _ = peak_cache(partition, spans, sizes, images)
        label = name + (f' x{kwargs["width_mult"]}' if kwargs else '')
        print(f'| {label} | {images} | {plain / gib:.2f} / {plain / 2 / gib:.2f} | {at_plain} | '
              f'{grouped / gib:.2f} / {grouped / 2 / gib:.2f} | {at_grouped} | {img / gib:.2f} |')


if __name__ == '__main__':
    main()
