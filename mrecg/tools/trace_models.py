"""Which torchvision / timm models the toolkit can take, and the units the graph rule gives them.

    mrecg models                       # the default list below
    mrecg models torchvision:vgg11 timm:resnet18 path/to/file.py:MyNet

For each model (built without weights): whether torch.fx and MQBench trace it, the number of base units
the graph rule makes, the largest unit (in conv/linear layers) and the time of the plan. A model that
fails shows the one-line error a user would get. With ``--export`` each traced model is also quantized
(16 random 3x96x96 images, 1 iteration per unit: a smoke check, not an accuracy) and exported to ONNX.
"""
import os
import tempfile
import argparse
import time

import torch.nn as nn

import torch

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


def exports(model: nn.Module) -> str:
    """'yes' if the model, quantized on random images, exports to ONNX and runs in onnxruntime; else why not."""
    images = torch.randn(16, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    try:
        result = mrecg.quantize(model, images, {'data': {'batch_size': 16}, 'process': {'device': 'cpu'}, 'quantize': {
            'cali_size': 16, 'reconstruction': {'iterations': 1, 'batch_size': 8}}})
    except (UserError, RuntimeError, AssertionError) as exc:  # e.g. a fixed input size the images miss
        return f'not quantized: {str(exc).splitlines()[0][:80]}'
    try:
        with tempfile.TemporaryDirectory() as folder:
            mrecg.export_onnx(result.model, os.path.join(folder, 'm.onnx'), images[:1])
    except UserError as exc:
        return f'no: {str(exc)[8:90]}'
    return 'yes'


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='mrecg models', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('models', nargs='*', default=DEFAULT)
    p.add_argument('--export', action='store_true', help='also quantize (smoke) and export each model to ONNX')
    return p


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    extra = ' ONNX export |' if args.export else ''
    print('| model | traced | base units | largest unit (conv/linear layers) | plan s |' + extra)
    print('| --- | --- | --- | --- | --- |' + (' --- |' if args.export else ''))
    for spec in args.models:
        t = time.perf_counter()
        try:
            model = mrecg.create_model(spec)
            plan = mrecg.plan(model, {'model': {'type': spec}})
            largest = max(plan.units, key=lambda u: weight_layers(model, u.modules))
            size = weight_layers(model, largest.modules)
            seconds = time.perf_counter() - t
            onnx = f' {exports(model)} |' if args.export else ''
            print(f'| `{spec}` | yes | {len(plan.units)} | {size} (`{largest.name[:40]}`) | {seconds:.1f} |{onnx}',
                  flush=True)
        except UserError as exc:
            print(f'| `{spec}` | no | - | {str(exc)[:160]} | {time.perf_counter() - t:.1f} |' + (' - |' if args.export
                                                                                                 else ''), flush=True)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
