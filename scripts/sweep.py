#!/usr/bin/env python
"""Run configs x methods (x grouping x k) x seeds, each into its own folder; finished runs are skipped,
interrupted ones resumed. Then tabulate with scripts/collect_results.py.

    python scripts/sweep.py --configs configs/qdrop/res18_*.yaml --methods qdrop mrecg+qdrop --out outputs/r18
    python scripts/sweep.py --configs configs/fashion/mbv2_2_4.yaml --methods mrecg+qdrop --grouping modcap loss \\
        --k 2 3 4 --seeds 1 2 3 --out outputs/k_sweep
    python scripts/sweep.py --configs configs/digits/mbv2_2_4.yaml --bits 4_4 2_4 3_3 2_2 --methods qdrop --out o

Methods: nearest, adaround (layer-wise), brecq, qdrop, mrecg+brecq, mrecg+qdrop (grouping from --grouping:
config = as the config says, authors = the published scheme, modcap or loss with each --k), and
mqbench-brecq, mqbench-qdrop (MQBench's own ptq_reconstruction, scripts/run_mqbench.py).
Folder: <out>/<config name>[_w<W>a<A>]/<method>[_<grouping>[_k<k>]]/seed<seed>/
"""
import argparse
import itertools
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLAIN = ['mrecg.metric=none', 'mrecg.k=0', 'mrecg.scheme=null']
METHODS = {
    'nearest': ['quantize.reconstruction.enabled=false', *PLAIN],
    'adaround': ['quantize.reconstruction.granularity=layer', 'quantize.reconstruction.prob=1.0', *PLAIN],
    'brecq': ['quantize.reconstruction.prob=1.0', *PLAIN],
    'qdrop': ['quantize.reconstruction.prob=0.5', *PLAIN],
    'mrecg+brecq': ['quantize.reconstruction.prob=1.0'],
    'mrecg+qdrop': ['quantize.reconstruction.prob=0.5'],
    'mqbench-brecq': ['quantize.reconstruction.prob=1.0'],
    'mqbench-qdrop': ['quantize.reconstruction.prob=0.5'],
}


def grouping_variants(method, groupings, ks):
    """(folder suffix, overrides) for each grouping of an MRECG method; one plain variant otherwise."""
    if not method.startswith('mrecg'):
        return [('', [])]
    variants = []
    for g in groupings:
        if g == 'config':
            variants.append(('', []))
        elif g == 'authors':
            variants.append(('_authors', ['mrecg.metric=none', 'mrecg.k=0', 'mrecg.scheme=authors']))
        else:
            variants += [(f'_{g}_k{k}', [f'mrecg.metric={g}', f'mrecg.k={k}', 'mrecg.scheme=null']) for k in ks]
    return variants


def config_name(path):
    rel = os.path.relpath(os.path.abspath(path), os.path.join(ROOT, 'configs'))
    rel = os.path.basename(path) if rel.startswith('..') else rel
    return os.path.splitext(rel)[0].replace(os.sep, '_')


def plan_runs(args):
    runs = []
    bits = args.bits or [None]
    for cfg, b, method, seed in itertools.product(args.configs, bits, args.methods, args.seeds):
        name = config_name(cfg) + (f'_w{b[0]}a{b[2]}' if b else '')
        for suffix, overrides in grouping_variants(method, args.grouping, args.k):
            sets = [*METHODS[method], *overrides, f'process.seed={seed}', *args.set]
            if b:
                sets += [f'quantize.w_qconfig.bit={b[0]}', f'quantize.a_qconfig.bit={b[2]}']
            out = os.path.join(args.out, name, method + suffix, f'seed{seed}')
            runs.append((cfg, method, out, sets))
    return runs


def command(cfg, method, out, sets, progress):
    flags = [] if progress else ['--no-progress']
    if method.startswith('mqbench'):
        return [sys.executable, os.path.join(ROOT, 'scripts', 'run_mqbench.py'), '--config', cfg, '--output', out,
                '--set', *sets, *flags]
    if os.path.isfile(os.path.join(out, 'checkpoint.pt')):
        return [sys.executable, os.path.join(ROOT, 'ptq_main.py'), '--resume', out, *flags]
    return [sys.executable, os.path.join(ROOT, 'ptq_main.py'), '--config', cfg, '--output', out, '--set', *sets,
            *flags]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--configs', nargs='+', required=True)
    p.add_argument('--methods', nargs='+', default=['qdrop', 'mrecg+qdrop'], choices=list(METHODS))
    p.add_argument('--grouping', nargs='+', default=['config'], choices=['config', 'authors', 'modcap', 'loss'])
    p.add_argument('--k', nargs='+', type=int, default=[3])
    p.add_argument('--seeds', nargs='+', type=int, default=[1005])
    p.add_argument('--bits', nargs='+', help='W_A pairs such as 4_4 2_4 (default: each config\'s own)')
    p.add_argument('--set', nargs='+', default=[], metavar='KEY=VALUE', help='extra overrides for every run')
    p.add_argument('--out', required=True)
    p.add_argument('--dry-run', action='store_true', help='list the runs and their commands')
    p.add_argument('--progress', action='store_true', help='show progress bars of each run')
    args = p.parse_args(argv)
    for b in args.bits or []:
        if len(b) != 3 or b[1] != '_' or not (b[0] + b[2]).isdigit():
            p.error(f'--bits takes pairs like 2_4, got {b}')
    runs = plan_runs(args)
    done = skipped = failed = 0
    t0 = time.time()
    for i, (cfg, method, out, sets) in enumerate(runs, 1):
        tag = f'[{i}/{len(runs)}] {out}'
        if os.path.isfile(os.path.join(out, 'results.json')):
            print(f'{tag}: finished, skipped', flush=True)
            skipped += 1
            continue
        cmd = command(cfg, method, out, sets, args.progress)
        if args.dry_run:
            print(f'{tag}: ' + ' '.join(cmd))
            continue
        print(f'{tag}: running', flush=True)
        try:
            proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=None if args.progress else subprocess.PIPE, text=True)
        except KeyboardInterrupt:
            print('\ninterrupted: rerun the same command to continue the sweep (finished runs are skipped)',
                  file=sys.stderr)
            return 130
        if proc.returncode == 0:
            done += 1
            print('   ' + proc.stdout.strip().splitlines()[-1], flush=True)
        else:
            failed += 1
            reason = (proc.stderr or proc.stdout or '').strip().splitlines()
            print(f'   failed (exit {proc.returncode}): {reason[-1] if reason else "no output"}', flush=True)
            if proc.returncode == 130:
                print('interrupted: rerun the same command to continue the sweep', file=sys.stderr)
                return 130
    print(f'{done} run, {skipped} already finished, {failed} failed in {time.time() - t0:.0f} s')
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
