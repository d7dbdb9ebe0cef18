#!/usr/bin/env python
"""Profile our reconstruction step on the paper's shapes (synthetic, as ``mrecg bench --synthetic``).

    python scripts/gpu_profile.py --model resnet18 --batch 256 --device cuda --out $OUT/profile
    python scripts/gpu_profile.py --model resnet18 --batch 8 --input-size 32 --device cpu --out /tmp/p  # dry run

Runs the engine once untimed (torch.compile, cuDNN autotuning), then ``--iters`` iterations per unit under
``torch.profiler``, and writes the top kernels by device time (``kernels.txt``) and a Chrome trace
(``trace.json``, open it in Perfetto) under ``--out``.
"""
import argparse
import copy
import os
import sys

import torch

from mrecg.api import resolve_device
from mrecg.planning import prepare
from mrecg.quantization import calibrate, disable_all
from mrecg.tools.bench import our_reconstructor, synthetic_config
from mrecg.zoo import create_model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default='resnet18')
    p.add_argument('--batch', type=int, default=256)
    p.add_argument('--input-size', type=int, default=224)
    p.add_argument('--iters', type=int, default=5)
    p.add_argument('--device', default='cuda', choices=['cpu', 'cuda'])
    p.add_argument('--set', nargs='*', default=[], metavar='KEY=VALUE', help='config overrides')
    p.add_argument('--out', required=True)
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = create_model(args.model).eval()
    images = torch.randn(args.batch, 3, args.input_size, args.input_size, generator=torch.Generator().manual_seed(0))
    cfg = synthetic_config(args.model, args.batch, args.batch, args.iters, 0.5, args.set)
    prepared = prepare(model, cfg)
    qmodel = prepared.qmodel.to(device)
    calibrate(qmodel, images, min(args.batch, 64), device)
    fp = copy.deepcopy(qmodel)
    disable_all(fp)
    warm = synthetic_config(args.model, args.batch, args.batch, 2, 0.5, args.set)
    our_reconstructor(copy.deepcopy(qmodel), fp, warm, prepared.units, device).run(images)
    recon = our_reconstructor(copy.deepcopy(qmodel), fp, cfg, prepared.units, device)
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    with torch.profiler.profile(activities=activities) as prof:
        recon.run(images)
        if device.type == 'cuda':
            torch.cuda.synchronize()
    os.makedirs(args.out, exist_ok=True)
    sort = 'self_cuda_time_total' if device.type == 'cuda' else 'self_cpu_time_total'
    table = prof.key_averages().table(sort_by=sort, row_limit=40)
    with open(os.path.join(args.out, 'kernels.txt'), 'w') as f:
        f.write(f'{args.model} batch {args.batch} {args.input_size}x{args.input_size}, {args.iters} iterations per '
                f'unit, engine {recon.policy.describe()}, torch {torch.__version__}\n{table}\n')
    prof.export_chrome_trace(os.path.join(args.out, 'trace.json'))
    print(table)
    print(f'profile -> {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
