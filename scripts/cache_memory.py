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
from torch.fx.passes.shape_prop import ShapeProp

from mrecg import zoo
from mrecg.grouping import PUBLISHED_SCHEMES, spans_from_scheme
from mrecg.config import QuantizeConfig
from mrecg.quantization import prepare_model
from mrecg.units import UnitPartition, groups_from_spans, liveness, model_base_units

PAPER_MODELS = [('resnet18', {}, 4096), ('resnet50', {}, 2048), ('mobilenet_v2', {'width_mult': 1.0}, 4096),
                ('mobilenet_v2', {'width_mult': 0.75}, 4096), ('mobilenet_v2', {'width_mult': 0.5}, 4096),
                ('mobilenet_v2', {'width_mult': 0.35}, 4096), ('regnetx_600m', {}, 4096)]


def per_image_bytes(partition: UnitPartition, size: int, dtype_bytes: int):
    ShapeProp(partition.graph_module).propagate(torch.zeros(1, 3, size, size))
    return {n.name: n.meta['tensor_meta'].shape.numel() * dtype_bytes for n in partition.graph_module.graph.nodes
            if 'tensor_meta' in n.meta}


def peak_cache(partition: UnitPartition, spans, sizes, images: int):
    """Peak bytes of the float + quantized caches while walking the groups as the engine does, and the group
    it occurs at: float pass and optimisation (both input streams + float outputs), then the quantized pass
    (float inputs freed, quantized inputs + both output streams)."""
    groups = groups_from_spans(spans, len(partition.units))
    last_use = liveness(partition, groups)
    placeholder = next(n.name for n in partition.graph_module.graph.nodes if n.op == 'placeholder')
    fp = {placeholder: sizes[placeholder]}
    q = {placeholder: 0}  # the images: one copy shared by both streams
    peak, where = 0, ''
    for gi, g in enumerate(groups):
        inner = set()
        for u in range(g.first, g.last + 1):
            inner |= {n.name for n in partition.outputs_of(u, u)}
        outputs = {n.name for n in partition.outputs_of(g.first, g.last)}
        inner_bytes = sum(sizes[n] for n in inner - outputs)
        for n in outputs:
            fp[n] = sizes[n]
        phase_a = sum(fp.values()) + sum(q.values()) + inner_bytes
        fp = {n: b for n, b in fp.items() if last_use.get(n, -1) > gi or n in outputs}
        for n in outputs:
            q[n] = sizes[n]
        phase_b = sum(fp.values()) + sum(q.values()) + inner_bytes
        if max(phase_a, phase_b) > peak:
            peak, where = max(phase_a, phase_b), g.name(partition.units)
        fp = {n: b for n, b in fp.items() if last_use.get(n, -1) > gi}
        q = {n: b for n, b in q.items() if last_use.get(n, -1) > gi}
    return peak * images, where, sizes[placeholder] * images


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
