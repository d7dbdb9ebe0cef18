#!/usr/bin/env python
"""Which torchvision / timm models the toolkit can take, and the units the graph rule gives them.

    python scripts/trace_models.py                       # the default list below
    python scripts/trace_models.py torchvision:vgg11 timm:resnet18 path/to/file.py:MyNet

For each model (built without weights): whether torch.fx and MQBench trace it, the number of base units
the graph rule makes, the largest unit (in conv/linear layers) and the time of the plan. A model that
fails shows the one-line error a user would get.
"""
import argparse
import time

import torch.nn as nn

import mrecg
from mrecg.errors import UserError

DEFAULT = ['torchvision:resnet18', 'torchvision:resnet50', 'torchvision:mobilenet_v2',
           'torchvision:mobilenet_v3_small', 'torchvision:regnet_x_400mf', 'torchvision:efficientnet_b0',
           'torchvision:shufflenet_v2_x0_5', 'torchvision:mnasnet0_5', 'torchvision:squeezenet1_0',
           'torchvision:densenet121', 'torchvision:googlenet', 'torchvision:inception_v3', 'torchvision:vgg11',
           'torchvision:convnext_tiny', 'torchvision:vit_b_16', 'timm:resnet18', 'timm:resnet50d',
           'timm:mobilenetv2_050', 'timm:mobilenetv3_small_050', 'timm:efficientnet_b0', 'timm:regnetx_002',
           'timm:ghostnet_050', 'timm:repvgg_a0', 'timm:dla34', 'timm:convnext_atto', 'timm:hrnet_w18_small',
           'timm:vit_tiny_patch16_224']


def weight_layers(model: nn.Module, modules) -> int:
    named = dict(model.named_modules())
    return sum(isinstance(m, (nn.Conv2d, nn.Linear)) for name in modules for m in named[name].modules())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('models', nargs='*', default=DEFAULT)
    args = p.parse_args(argv)
    print('| model | traced | base units | largest unit (conv/linear layers) | plan s |')
    print('| --- | --- | --- | --- | --- |')
    for spec in args.models:
        t = time.perf_counter()
        try:
            model = mrecg.create_model(spec)
            plan = mrecg.plan(model, {'model': {'type': spec}})
            largest = max(plan.units, key=lambda u: weight_layers(model, u.modules))
            size = weight_layers(model, largest.modules)
            print(f'| `{spec}` | yes | {len(plan.units)} | {size} (`{largest.name[:40]}`) | '
                  f'{time.perf_counter() - t:.1f} |', flush=True)
        except UserError as exc:
            print(f'| `{spec}` | no | - | {str(exc)[:160]} | {time.perf_counter() - t:.1f} |', flush=True)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
