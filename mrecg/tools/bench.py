"""Our reconstruction engine against MQBench's ``advanced_ptq.ptq_reconstruction``, in one process.

Both start from the same calibrated model (same float weights, calibration images, bits and settings,
plain QDrop or BRECQ with the same iterations per unit and images per step); each is timed over its whole
reconstruction and then evaluated:

    mrecg bench --config configs/digits/mbv2_2_4.yaml --iters 200
    mrecg bench --config configs/bench/fashion_resnet18_2_4.yaml --iters 100
    mrecg bench --config ... --device cuda

Synthetic mode, the paper's shapes without ImageNet (timing and memory only, never accuracy): random
224x224 images and randomly initialised models, each engine over every unit for a few iterations at each
per-step batch, after an untimed warm-up:

    mrecg bench --synthetic resnet18 resnet50 mobilenet_v2 regnetx_600m --batch 32 256

Printed per model, batch and engine: ms per iteration per unit (the step alone: the difference between runs
of 1 + --iters and 1 iterations per unit), the passes, peak memory, achieved TFLOP/s and its share of
the device's measured fp32 matmul rate, and the projected wall time of the paper's run (20 000 iterations per
unit and the passes over 4096 images); then our speedup over MQBench per step and per projected run.

Printed per engine (config mode): wall time, iterations per second, peak memory above the start of that engine's run
(resident memory on CPU, allocated memory on CUDA), achieved GFLOP/s of the unit forward+backward
(FLOPs counted with torch's FlopCounterMode on one step of every unit, times the iterations), memory after
each unit, and top-1. The last line is ``speedup <ours / MQBench speed> top1_delta <ours - MQBench>``.
"""
import argparse
import copy
import dataclasses
import sys
import time

import torch

from mrecg.api import resolve_device
from mrecg.baselines import mqbench_reconstruct
from mrecg.config import load_config
from mrecg.data import calibration_images, eval_batches
from mrecg.errors import UserError
from mrecg.evaluation import evaluate
from mrecg.helptext import PlainHelp
from mrecg.planning import prepare
from mrecg.kernels import StepSeeds, kernel_set
from mrecg.quantization import calibrate, disable_all, enable_quantization
from mrecg.reconstruction import Reconstructor
from mrecg.reconstruction.rounding import adaround_layers, init_rounding, train_graph
from mrecg.reconstruction.step import regulariser_table
from mrecg.runner import build_float_model, open_data
from mrecg.units import UnitPartition, groups_from_spans


# ---- memory -------------------------------------------------------------------------------------------
def _status_kb(field: str) -> int:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1])
    return 0


class Memory:
    """Peak and current memory: CUDA allocator on a GPU, resident set size (VmHWM/VmRSS) on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == 'cuda'

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            try:
                with open('/proc/self/clear_refs', 'w') as f:
                    f.write('5')  # reset the peak RSS to the current RSS
            except OSError:
                pass
        self.start = self.current()

    def current(self) -> float:
        if self.cuda:
            return torch.cuda.memory_allocated() / 2 ** 20
        return _status_kb('VmRSS') / 1024

    def peak(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2 ** 20 - self.start
        return _status_kb('VmHWM') / 1024 - self.start


# ---- FLOPs --------------------------------------------------------------------------------------------
def _grouped_conv_backward_flop(grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed,
                                 output_padding, groups, output_mask, out_shape, **kwargs) -> int:
    """torch's formula for the weight gradient of a conv ignores ``groups`` (it counts a depthwise conv's weight
    gradient as a dense conv's, C times too many); the input gradient's is right."""
    from torch.utils.flop_counter import conv_backward_flop
    args = (grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed, output_padding, groups)
    grad_input = conv_backward_flop(*args, [output_mask[0], False, False], out_val=out_shape)
    grad_weight = conv_backward_flop(*args, [False, output_mask[1], False], out_val=out_shape)
    return grad_input + grad_weight // groups


def step_flops(graph, inputs) -> int:
    """FLOPs of one forward + backward of a unit graph, as counted by torch (conv/matmul; grouped conv fixed)."""
    from torch.utils.flop_counter import FlopCounterMode
    params = [p for p in graph.parameters() if p.requires_grad]
    was = [p.requires_grad for p in params]
    counter = FlopCounterMode(display=False,
                              custom_mapping={torch.ops.aten.convolution_backward: _grouped_conv_backward_flop})
    with counter:
        out = graph(*inputs)
        loss = sum(o.float().square().sum() for o in (out if isinstance(out, (tuple, list)) else [out]))
        loss.backward()
    for p, w in zip(params, was):
        p.grad = None
        p.requires_grad_(w)
    return counter.get_total_flops()


def our_reconstructor(qmodel, fp, cfg, units, device) -> Reconstructor:
    """Our engine on the plain partition (one unit per group), as the timed run and the warm-up use it."""
    partition = UnitPartition.build(qmodel, units)
    groups = groups_from_spans([], len(partition.units))
    return Reconstructor.from_config(qmodel, fp, partition, groups, cfg, device)


def ours(qmodel, fp, cfg, units, images, device, mem, count_flops=True):
    recon = our_reconstructor(qmodel, fp, cfg, units, device)
    per_unit = []
    mem.reset()
    t = time.perf_counter()
    cache_mb = []

    def unit_done(results):
        per_unit.append(mem.current())
        cache_mb.append(recon.cache_bytes() / 2 ** 20)
    recon.run(images, on_group_done=unit_done)
    print('  ours: cached activations after each unit (MB, exact): ' + ' '.join(f'{m:.1f}' for m in cache_mb)
          + f'; peak {recon.peak_cache_bytes / 2 ** 20:.1f}', flush=True)
    if device.type == 'cuda':
        torch.cuda.synchronize()
    wall = time.perf_counter() - t
    flops = our_step_flops(fp, cfg, units, recon.groups, images, device) if count_flops else 0
    return wall, len(recon.groups), per_unit, flops * cfg.quantize.reconstruction.iterations


def our_step_flops(fp, cfg, units, groups, images, device) -> int:
    """FLOPs of one step of every unit, on a fresh prepared copy so the timed run is untouched."""
    flops = 0
    probe = copy.deepcopy(fp)
    enable_quantization(probe)
    part = UnitPartition.build(probe, units)
    rec = cfg.quantize.reconstruction
    x = images[:rec.batch_size].to(device)
    for p in probe.parameters():
        p.requires_grad_(False)  # only the rounding variables and learned steps get gradients, as in the engine
    for g in groups:
        outputs = part.outputs_of(g.first, g.last)
        init_rounding(adaround_layers(probe, part, g))
        # the reference kernels: the same convolutions, and no compiled region under the FLOP counter's mode
        seeds = StepSeeds(torch.Generator(device=device), device)
        net = train_graph(probe, part, g, outputs, kernel_set('reference', device), seeds,
                          cfg.quantize.a_qconfig.ste_bounds, lambda: regulariser_table(rec.iterations, rec, device))
        for q in net.learned:
            q.scale.requires_grad_(True)
        flops += step_flops(net.graph, [x])
        with torch.no_grad():
            x = part.build_graph(probe, g.first, g.last, outputs)(x)[0]
    return flops


def mqbench(qmodel, fp, cfg, units, images, device, mem, count_flops=True):
    import mqbench.advanced_ptq as adv
    per_unit, flops, counting_time = [], [0], [0.0]
    original = adv.subgraph_reconstruction

    def counting(subgraph, cached_inps, cached_oups, config):
        t0 = time.perf_counter()
        if count_flops:
            args = cached_inps[0] if config.prob < 1.0 else cached_inps  # (quantized, float) streams with QDrop
            inputs = [batches[0] for batches in args]
            flops[0] += step_flops(subgraph, inputs) * config.max_count
        counting_time[0] += time.perf_counter() - t0  # not MQBench's work: taken out of its wall time
        return original(subgraph, cached_inps, cached_oups, config)

    adv.subgraph_reconstruction = counting
    try:
        mem.reset()
        t = time.perf_counter()
        result = mqbench_reconstruct(qmodel, images, cfg.quantize.reconstruction, cfg.process.seed, device,
                                     on_unit_done=lambda: per_unit.append(mem.current()))
        if device.type == 'cuda':
            torch.cuda.synchronize()
        wall = time.perf_counter() - t - counting_time[0]
    finally:
        adv.subgraph_reconstruction = original
    return wall, len(per_unit), per_unit, flops[0], result


def warm_up(engines, calibrated, fp, cfg, units, images, device, iterations):
    """A few untimed iterations per unit of every engine first. The first convolution of each new shape in a
    process JIT-compiles oneDNN kernels (0.1-0.4 s each on this CPU, forward and both backward passes), and
    both engines train on the same shapes: without this, whichever engine runs second gets them for free."""
    rec = dataclasses.replace(cfg.quantize.reconstruction, iterations=iterations)
    cfg = dataclasses.replace(cfg, quantize=dataclasses.replace(cfg.quantize, reconstruction=rec))
    for engine in engines:
        q = copy.deepcopy(calibrated)
        if engine == 'ours':
            our_reconstructor(q, fp, cfg, units, device).run(images)
        else:
            mqbench_reconstruct(q, images, rec, cfg.process.seed, device)


def bench_seed(args, seed, warm: bool):
    """Both engines from one calibrated model for one seed; returns the rows and the device."""
    overrides = [f'quantize.reconstruction.iterations={args.iters}', f'quantize.reconstruction.prob={args.prob}',
                 'mrecg.metric=none', 'mrecg.k=0', 'mrecg.scheme=null', *args.set]
    if seed is not None:
        overrides.append(f'process.seed={seed}')
    cfg = load_config(args.config, overrides)
    device = resolve_device(args.device)
    seed, rec, q = cfg.process.seed, cfg.quantize.reconstruction, cfg.quantize
    torch.manual_seed(seed)
    model = build_float_model(cfg)
    train, val = open_data(cfg)
    images = calibration_images(train, q.cali_size, seed, cfg.data.batch_size)
    prepared = prepare(model, cfg)
    calibrated, units = prepared.qmodel.to(device), prepared.units
    calibrate(calibrated, images, cfg.data.batch_size, device)
    fp = copy.deepcopy(calibrated)
    disable_all(fp)
    print(f'{cfg.model.type} {cfg.model.kwargs} on {cfg.data.type}, W{q.w_qconfig.bit}A{q.a_qconfig.bit}, '
          f'prob {rec.prob}, {rec.iterations} iterations/unit, {rec.batch_size} images/step, {q.cali_size} '
          f'calibration images, seed {seed}, device {device}, {torch.get_num_threads()} threads', flush=True)
    if warm and args.warmup:
        t = time.perf_counter()
        warm_up(args.engines, calibrated, fp, cfg, units, images, device, args.warmup)
        print(f'  warm-up ({args.warmup} iterations per unit, every engine): {time.perf_counter() - t:.1f} s', flush=True)
    mem = Memory(device)
    rows = {}
    for engine in args.engines:
        q = copy.deepcopy(calibrated)
        if engine == 'ours':
            wall, n_units, per_unit, flops = ours(q, fp, cfg, units, images, device, mem)
        else:
            wall, n_units, per_unit, flops, q = mqbench(q, fp, cfg, units, images, device, mem)
        peak = mem.peak()
        enable_quantization(q)
        acc = evaluate(q, eval_batches(val, cfg.data.batch_size, cfg.data.eval_limit,
                                                    seed=cfg.data.split_seed), device, progress=False)
        rows[engine] = dict(wall=wall, units=n_units, its=n_units * rec.iterations / wall, peak=peak,
                            gflops=flops / wall / 1e9, top1=acc.top1, per_unit=per_unit)
        print(f'  {engine:8s} done: {wall:.1f} s', flush=True)
    print(f'\n{"engine":8s} {"units":>5s} {"wall s":>8s} {"it/s":>7s} {"peak MB":>8s} {"GFLOP/s":>8s} {"top-1":>7s}')
    for engine, r in rows.items():
        print(f'{engine:8s} {r["units"]:5d} {r["wall"]:8.1f} {r["its"]:7.1f} {r["peak"]:8.1f} {r["gflops"]:8.2f} '
              f'{r["top1"]:7.2f}')
    for engine, r in rows.items():
        print(f'memory after each unit, {engine} (MB): ' + ' '.join(f'{m:.0f}' for m in r['per_unit']))
    return rows, device


# ---- synthetic mode ------------------------------------------------------------------------------------
PAPER_ITERATIONS, PAPER_IMAGES = 20000, 4096


def matmul_tflops(device: torch.device, n: int = 2048, repeat: int = 10) -> float:
    """The device's fp32 matmul rate, measured: the reference for "share of peak"."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    for _ in range(2):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(repeat):
        a @ b
    sync(device)
    return 2 * n ** 3 * repeat / (time.perf_counter() - t) / 1e12


def sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize()


def synthetic_config(name: str, batch: int, images: int, iterations: int, prob: float, overrides=()):
    from mrecg.config import Config, apply_overrides
    return Config.from_dict(apply_overrides({
        'model': {'type': name}, 'data': {'type': 'imagenet', 'batch_size': min(batch, 64)},
        'quantize': {'w_qconfig': {'bit': 2}, 'a_qconfig': {'bit': 4}, 'cali_size': images,
                     'reconstruction': {'iterations': iterations, 'batch_size': batch, 'prob': prob}},
        'mrecg': {'metric': 'none', 'k': 0}, 'process': {'seed': 0}}, overrides))


def timed_engine(engine, calibrated, fp, cfg, units, images, device, mem, count_flops=False):
    """(wall seconds, units, peak MB, FLOPs of one step over every unit or 0) of one engine's run."""
    q = copy.deepcopy(calibrated)
    if engine == 'ours':
        wall, n_units, _, flops = ours(q, fp, cfg, units, images, device, mem, count_flops)
    else:
        wall, n_units, _, flops, _ = mqbench(q, fp, cfg, units, images, device, mem, count_flops)
    return wall, n_units, mem.peak(), flops / max(cfg.quantize.reconstruction.iterations, 1)


def synthetic_rows(name: str, batch: int, args, device: torch.device, peak_tflops: float):
    """Both engines on one model and batch: an untimed warm-up, then 1 and 1 + ``--iters`` iterations per unit;
    the difference is the step, the rest of the 1-iteration run the cache passes."""
    from mrecg.zoo import create_model
    n_images = max(batch, args.images)
    torch.manual_seed(0)
    model = create_model(name).eval()
    channels = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d)).in_channels
    size = args.input_size
    images = torch.randn(n_images, channels, size, size, generator=torch.Generator().manual_seed(0))
    prepared = prepare(model, synthetic_config(name, batch, n_images, args.iters, args.prob, args.set))
    calibrated, units = prepared.qmodel.to(device), prepared.units
    calibrate(calibrated, images, min(batch, 64), device)
    fp = copy.deepcopy(calibrated)
    disable_all(fp)
    mem, rows = Memory(device), {}
    for engine in args.engines:
        def run(iterations, count_flops=False):
            cfg = synthetic_config(name, batch, n_images, iterations, args.prob, args.set)
            return timed_engine(engine, calibrated, fp, cfg, units, images, device, mem, count_flops)
        run(1)  # warm-up: oneDNN / cuDNN pick and compile kernels for every new shape
        one, *_ = run(1)
        wall, n_units, peak, _ = run(1 + args.iters)
        flops = run(1, count_flops=True)[3]  # apart: counting runs each unit once, which the timed runs must not lose
        step = max(wall - one, 1e-9) / args.iters  # one iteration of every unit
        passes = max(one - step, 0.0)
        rows[engine] = dict(units=n_units, ms_unit=1e3 * step / n_units, step_s=step, passes=passes, peak=peak,
                            tflops=flops / step / 1e12, projected_h=(PAPER_ITERATIONS * step
                                                                     + passes * PAPER_IMAGES / n_images) / 3600)
        rows[engine]['share'] = rows[engine]['tflops'] / peak_tflops
        print(f'  {name} batch {batch} {engine}: {wall:.1f} s ({passes:.1f} s passes)', flush=True)
    return rows


def synthetic(args) -> int:
    device = resolve_device(args.device)
    peak = matmul_tflops(device)
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else f'CPU, {torch.get_num_threads()} threads'
    print(f'synthetic {args.input_size}x{args.input_size}, {name}, torch {torch.__version__}; fp32 matmul {peak:.3f} TFLOP/s measured; '
          f'{args.iters} timed iterations per unit after 1 untimed, {args.images} images (at least one batch)',
          flush=True)
    table = []
    for model in args.synthetic:
        for batch in args.batch:
            table += [(model, batch, engine, r) for engine, r in synthetic_rows(model, batch, args, device, peak).items()]
    print(f'\n{"model":13s} {"batch":>5s} {"engine":8s} {"units":>5s} {"ms/it/unit":>10s} {"passes s":>8s} '
          f'{"peak MB":>8s} {"TFLOP/s":>8s} {"of peak":>7s} {"paper run h":>11s}')
    for model, batch, engine, r in table:
        print(f'{model:13s} {batch:5d} {engine:8s} {r["units"]:5d} {r["ms_unit"]:10.1f} {r["passes"]:8.1f} '
              f'{r["peak"]:8.0f} {r["tflops"]:8.3f} {100 * r["share"]:6.1f}% {r["projected_h"]:11.1f}')
    rows = {(m, b, e): r for m, b, e, r in table}
    for model in args.synthetic:
        for batch in args.batch:
            o, q = rows.get((model, batch, 'ours')), rows.get((model, batch, 'mqbench'))
            if o and q:
                print(f'{model} batch {batch}: speedup per step {q["step_s"] / o["step_s"]:.2f}, '
                      f'per projected paper run {q["projected_h"] / o["projected_h"]:.2f}')
    if args.json:
        write_table(args, name, table)
    return 0


def write_table(args, device_name: str, table) -> None:
    """The synthetic table as JSON: every row with the device, versions, date and the command that made it."""
    import json
    import platform
    from mrecg.reconstruction import DevicePolicy
    cfg = synthetic_config(args.synthetic[0], args.batch[0], max(args.batch[0], args.images), args.iters, args.prob,
                           args.set)
    policy = DevicePolicy.resolve(cfg.quantize.reconstruction, resolve_device(args.device), cfg.process.deterministic)
    record = {'device': device_name, 'input_size': args.input_size, 'iters': args.iters, 'images': args.images,
              'set': args.set, 'engine': policy.describe(), 'torch': torch.__version__,
              'python': platform.python_version(), 'date': time.strftime('%Y-%m-%d'),
              'command': 'python -m mrecg bench ' + ' '.join(sys.argv[2:] if sys.argv[1:2] == ['bench']
                                                             else sys.argv[1:]),
              'rows': [{'model': m, 'batch': b, 'engine': e, **r} for m, b, e, r in table]}
    with open(args.json, 'w') as f:
        json.dump(record, f, indent=1)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='mrecg bench', description=__doc__,
                                     formatter_class=PlainHelp)
    parser.add_argument('--config', help='a config to bench on its data (or --synthetic)')
    parser.add_argument('--synthetic', nargs='+', metavar='MODEL',
                        help='registry models at 224x224 on random images, randomly initialised (timing only)')
    parser.add_argument('--batch', nargs='+', type=int, default=[32, 256], help='synthetic: images per step')
    parser.add_argument('--input-size', type=int, default=224, help='synthetic: image side')
    parser.add_argument('--images', type=int, default=0,
                        help='synthetic: cached calibration images (default: one batch)')
    parser.add_argument('--set', nargs='+', default=[], metavar='KEY=VALUE', help='config overrides for both engines')
    parser.add_argument('--iters', type=int, default=200, help='iterations per unit (both engines)')
    parser.add_argument('--prob', type=float, default=0.5, help='0.5 = QDrop, 1.0 = BRECQ')
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'], help='where both engines run')
    parser.add_argument('--seeds', nargs='+', type=int, default=None,
                        help='run every engine once per seed (default: the config\'s seed); the last line then '
                             'gives the total-time speedup and the mean top-1 difference')
    parser.add_argument('--warmup', type=int, default=3,
                        help='untimed iterations per unit of every engine before timing (0: none; see warm_up)')
    parser.add_argument('--engines', nargs='+', default=['mqbench', 'ours'], choices=['mqbench', 'ours'],
                        help='which engines to time (one alone for its own peak memory)')
    parser.add_argument('--json', metavar='PATH', help='synthetic: also write the table, device and versions here '
                                                       '(scripts/record_gpu.py turns it into results rows)')
    return parser


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if bool(args.config) == bool(args.synthetic):
        p.error('give --config or --synthetic')
    if args.synthetic:
        try:
            return synthetic(args)
        except UserError as exc:
            print(f'error: {exc}', file=sys.stderr)
            return 2
    per_seed = []
    for i, seed in enumerate(args.seeds or [None]):
        try:
            rows, device = bench_seed(args, seed, warm=i == 0)
        except UserError as exc:
            print(f'error: {exc}', file=sys.stderr)
            return 2
        per_seed.append(rows)
        print()
    if len(args.engines) > 1 and device.type == 'cpu':
        print('(peak MB is resident memory above the engine\'s start; an engine that runs second can reuse memory '
              'the first one freed, so its peak is a lower bound: run --engines X --warmup 0 alone for a clean figure)')
    if len(per_seed) > 1:
        for engine in args.engines:
            walls = [r[engine]['wall'] for r in per_seed]
            top1 = torch.tensor([r[engine]['top1'] for r in per_seed], dtype=torch.float64)
            print(f'{engine:8s} {len(per_seed)} seeds: wall {sum(walls):.1f} s in all, top-1 {top1.mean():.2f} '
                  f'± {top1.std():.2f} (' + ' '.join(f'{t:.2f}' for t in top1.tolist()) + ')')
    if {'ours', 'mqbench'} <= set(args.engines):
        ours_wall = sum(r['ours']['wall'] for r in per_seed)
        mq_wall = sum(r['mqbench']['wall'] for r in per_seed)
        delta = sum(r['ours']['top1'] - r['mqbench']['top1'] for r in per_seed) / len(per_seed)
        print(f'speedup {mq_wall / ours_wall:.2f} top1_delta {delta:+.2f}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
