#!/usr/bin/env python
"""The kernel timings behind the fast reconstruction step (README, "Where the time went").

    python scripts/bench_kernels.py                 # 2 threads, 1 s per figure
    python scripts/bench_kernels.py --threads 1 --min-time 0.2

Prints median times (``torch.utils.benchmark``) of: element-wise kernels on a 32x192x4x4 tensor (float
arithmetic against the boolean and fake-quant kernels MQBench's quantizers use), QDrop masks on the same
98 304 elements, AdaRound's soft weight with the rounding regulariser on ResNet-18's 512x512x3x3 conv (MQBench's
autograd against ``AdaRoundWeight``), the regulariser's power, and a depthwise conv on a 2x2 map (oneDNN
against one small matrix per channel). Every figure runs forward and, where marked, backward.
"""
import argparse
import copy
import sys

import torch
import torch.nn.functional as F

from mrecg import zoo
from mrecg.kernels.cpu import (AdaRoundWeight, dense_depthwise_plan, depthwise_dense, FastAdaRoundLayer,
                             keep_mask)
from mrecg.config import QuantizeConfig
from mrecg.quantization import calibrate, init_adaround, prepare_model


def elementwise(timed):
    x = torch.randn(32, 192, 4, 4)
    mask = x > 0
    scale, zero_point = torch.tensor(0.05), torch.tensor(0, dtype=torch.int32)
    kernels = [('mul', 'x * 1.5'), ('masked_fill', 'x.masked_fill(m, 0)'), ('where', 'torch.where(m, x, 0.)'),
               ('fake_quantize_per_tensor_affine', 'torch.fake_quantize_per_tensor_affine(x, s, zp, 0, 15)'),
               ('comparison', 'x > 0')]
    print('32x192x4x4, forward (us): ' + ', '.join(
        f'{name} {timed(stmt, x=x, m=mask, s=scale, zp=zero_point):.0f}' for name, stmt in kernels))
    gen = torch.Generator().manual_seed(0)
    masks = [('ours (64-bit words through a bit table)', 'keep_mask(x, 0.5, g)'),
             ('one random byte per element', 'torch.randint(0, 256, x.shape, dtype=torch.uint8, generator=g) < 128'),
             ('MQBench (rand_like)', 'torch.rand_like(x) < 0.5')]
    print('QDrop mask, 98 304 elements (us): ' + ', '.join(
        f'{name} {timed(stmt, x=x, g=gen, keep_mask=keep_mask):.0f}' for name, stmt in masks))


def adaround(timed, beta=10.0, weight=0.01):
    model = zoo.build_model('resnet18', num_classes=10, in_chans=1).eval()
    spec = QuantizeConfig(w_qconfig={'bit': 2, 'p': 2.0}, a_qconfig={'bit': 4, 'p': 2.0})
    prepared = prepare_model(model, spec)
    calibrate(prepared, torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0)), 8, torch.device('cpu'))
    ref = prepared.get_submodule('layer4.1.conv2')
    init_adaround(ref)
    ours = FastAdaRoundLayer(copy.deepcopy(ref))
    ours.reg_weight, ours.beta = weight, beta
    fq, alpha = ref.weight_fake_quant, ours.layer.weight_fake_quant.alpha

    def mqbench_step():  # the soft weight through MQBench's module and its regulariser (advanced_ptq.LossFunction)
        reg = weight * (1 - ((fq.rectified_sigmoid() - .5).abs() * 2).pow(beta)).sum()
        (fq(ref.weight).sum() + reg).backward()
        fq.alpha.grad = ref.weight.grad = None

    def our_step():
        AdaRoundWeight.apply(alpha, ours.floor_zp, ours.scale, ours.zero_point, ours.grad_gain, ours.qmin,
                              ours.qmax, ours.reg_weight, ours.beta).sum().backward()
        alpha.grad = None

    print(f'AdaRound soft weight + regulariser, 512x512x3x3, forward + backward (ms): '
          f'MQBench {timed("f()", f=mqbench_step) / 1e3:.1f}, ours {timed("f()", f=our_step) / 1e3:.1f}')
    t = torch.rand(alpha.shape) - 0.5
    print(f'|t|^{beta - 2:g} on {t.numel()} elements (ms): pow {timed("t.abs().pow(e)", t=t, e=beta - 2) / 1e3:.1f}, '
          f'exp2(e log2|t|) {timed("t.abs().log2_().mul_(e).exp2_()", t=t, e=beta - 2) / 1e3:.1f}')


def depthwise(timed):
    conv = torch.nn.Conv2d(288, 288, 3, 1, 1, groups=288)
    x = torch.randn(32, 288, 2, 2, requires_grad=True)
    plan = dense_depthwise_plan(conv, 2, 2, torch.device('cpu'))
    g = dict(F=F, x=x, w=conv.weight, b=conv.bias, plan=plan, dense=depthwise_dense)
    print('depthwise 3x3 conv, 32x288x2x2, forward + backward (ms): '
          f'conv2d {timed("F.conv2d(x, w, b, 1, 1, 1, 288).sum().backward()", **g) / 1e3:.2f}, '
          f'one matrix per channel {timed("dense(x, w, b, plan).sum().backward()", **g) / 1e3:.2f}')


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--min-time', type=float, default=1.0, help='seconds of timing per figure')
    args = parser.parse_args(argv)
    if args.threads < 1 or args.min_time <= 0:
        print('error: --threads must be >= 1 and --min-time > 0', file=sys.stderr)
        return 2
    from torch.utils.benchmark import Timer
    torch.set_num_threads(args.threads)
    print(f'torch {torch.__version__}, {args.threads} threads, median of blocked runs of {args.min_time:g} s')

    def timed(stmt, **scope):
        return Timer(stmt, globals={'torch': torch, **scope}).blocked_autorange(min_run_time=args.min_time).median * 1e6
    elementwise(timed)
    adaround(timed)
    depthwise(timed)
    return 0


if __name__ == '__main__':
    sys.exit(main())
