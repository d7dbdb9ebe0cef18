"""Which torchvision / timm models the toolkit can take, and the units the graph rule gives them.

    mrecg models                       # the default list below
    mrecg models torchvision:vgg11 timm:resnet18 path/to/file.py:MyNet

For each model (built without weights): whether torch.fx and MQBench trace it, the number of base units
the graph rule makes, the largest unit (in conv/linear layers) and the time of the plan. A model that
fails shows the one-line error a user would get. With ``--export`` each traced model is also quantized
(16 random 3x96x96 images, 1 iteration per unit: a smoke check, not an accuracy) and exported to ONNX.
"""
import argparse
import os
import tempfile
import time

import torch
import torch.nn as nn

import mrecg
from mrecg.errors import UserError
from mrecg.helptext import PlainHelp

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
                                formatter_class=PlainHelp)
    p.add_argument('models', nargs='*', default=DEFAULT, help='model types (default: the list above)')
    p.add_argument('--export', action='store_true', help='also quantize (smoke) and export each model to ONNX')
    p.add_argument('--csv', metavar='PATH', help='also write the rows with their provenance (the docs read '
                                               'results/model_coverage.csv)')
    return p


def coverage_row(spec: str, export: bool) -> dict:
    """One model's row: traced or the one-line error, units, the largest unit, plan seconds, (ONNX export)."""
    t = time.perf_counter()
    row = {'model': spec, 'traced': 'no', 'base_units': '-', 'largest_unit': '', 'plan_s': '', 'onnx_export': '-'}
    try:
        model = mrecg.create_model(spec)
        plan = mrecg.plan(model, {'model': {'type': spec}})
        largest = max(plan.units, key=lambda u: weight_layers(model, u.modules))
        row.update(traced='yes', base_units=len(plan.units),
                   largest_unit=f'{weight_layers(model, largest.modules)} ({largest.name[:40]})')
        row['plan_s'] = f'{time.perf_counter() - t:.1f}'
        if export:
            row['onnx_export'] = exports(model)
    except UserError as exc:
        row.update(largest_unit=str(exc)[:160], plan_s=f'{time.perf_counter() - t:.1f}')
    return row


def write_csv(path: str, rows, argv) -> None:
    """The rows with their provenance (results/model_coverage.csv, which the docs' models page shows)."""
    import csv
    import platform
    import subprocess
    commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True).stdout.strip()
    prov = {'date': time.strftime('%Y-%m-%d'), 'commit': commit or 'unknown',
            'machine': f'{platform.machine()}, {os.cpu_count()} CPU cores', 'command': 'mrecg models ' + ' '.join(argv),
            'versions': f'torch {torch.__version__}, timm {__import__("timm").__version__}'}
    with open(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=[*rows[0], 'date', 'commit', 'machine', 'versions', 'command'])
        writer.writeheader()
        writer.writerows({**r, **prov} for r in rows)


def main(argv=None) -> int:
    import sys
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    columns = ['model', 'traced', 'base_units', 'largest_unit', 'plan_s'] + (['onnx_export'] if args.export else [])
    print('| ' + ' | '.join(columns) + ' |')
    print('|' + ' --- |' * len(columns))
    rows = []
    for spec in args.models:
        rows.append(coverage_row(spec, args.export))
        print('| ' + ' | '.join(str(rows[-1][c]) for c in columns) + ' |', flush=True)
    if args.csv:
        shown = [a for a in argv if a not in ('--csv', args.csv)]
        write_csv(args.csv, [{c: r[c] for c in columns} for r in rows], shown)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
