"""Run configs x methods (x grouping x k) x seeds, each into its own folder; finished runs are skipped,
interrupted ones resumed. Then tabulate with mrecg collect.

    mrecg sweep --configs configs/qdrop/res18_*.yaml --methods qdrop mrecg+qdrop --out outputs/r18
    mrecg sweep --configs configs/fashion/mbv2_2_4.yaml --methods mrecg+qdrop --grouping modcap loss \\
        --k 2 3 4 --seeds 1 2 3 --out outputs/k_sweep
    mrecg sweep --configs configs/digits/mbv2_2_4.yaml --bits 4_4 2_4 3_3 2_2 --methods qdrop --out o
    mrecg sweep --configs configs/fashion/resnet_2_4.yaml --methods qdrop mrecg+qdrop \\
        --variant safe mrecg.exclude_classifier=true mrecg.difference=log --out outputs/safe
    mrecg sweep ... --ray                  # every run a Ray task on a local Ray instance
    mrecg sweep ... --ray ray://head:10001  # ... on an existing cluster (shared filesystem)

Methods: nearest, adaround (layer-wise), brecq, qdrop, mrecg+brecq, mrecg+qdrop (grouping from --grouping:
config = as the config says, authors = the published scheme, modcap or loss with each --k), and
mqbench-brecq, mqbench-qdrop (MQBench's own ptq_reconstruction, mrecg baseline).
--variant NAME KEY=VALUE... adds a named set of overrides as one more grouping.
Folder: <out>/<config name>[_w<W>a<A>]/<method>[_<grouping>[_k<k>] | _<variant>]/seed<seed>/

With --ray each run is a Ray task running the same command: one GPU each where the cluster has GPUs, else
--ray-cpus cores (the run's torch threads). The repository and --out must be at the same path on every node
(a shared filesystem); a run that fails is reported at the end with its error line, the others go on.
"""
import argparse
import itertools
import os
import subprocess
import sys
import time
from typing import Optional

from mrecg.config import PROJECT_ROOT
from mrecg.helptext import PlainHelp

QUANTIZE = [sys.executable, '-m', 'mrecg', 'quantize']  # the installed tool: no clone needed
BASELINE = [sys.executable, '-m', 'mrecg', 'baseline']
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


def grouping_variants(method, groupings, ks, named=()):
    """(folder suffix, overrides) for each grouping and each named --variant of an MRECG method; one plain
    variant otherwise."""
    if not method.startswith('mrecg'):
        return [('', [])]
    variants = [(f'_{name}', list(sets)) for name, *sets in named]
    for g in groupings:
        if g == 'config':
            variants.append(('', []))
        elif g == 'authors':
            variants.append(('_authors', ['mrecg.metric=none', 'mrecg.k=0', 'mrecg.scheme=authors']))
        else:
            variants += [(f'_{g}_k{k}', [f'mrecg.metric={g}', f'mrecg.k={k}', 'mrecg.scheme=null']) for k in ks]
    return variants


def config_name(path):
    rel = os.path.relpath(os.path.abspath(path), os.path.join(PROJECT_ROOT, 'configs'))
    rel = os.path.basename(path) if rel.startswith('..') else rel
    return os.path.splitext(rel)[0].replace(os.sep, '_')


def plan_runs(args):
    runs = []
    bits = args.bits or [None]
    for cfg, b, method, seed in itertools.product(args.configs, bits, args.methods, args.seeds):
        name = config_name(cfg) + (f'_w{b[0]}a{b[2]}' if b else '')
        for suffix, overrides in grouping_variants(method, args.grouping, args.k, args.variant):
            sets = [*METHODS[method], *overrides, f'process.seed={seed}', *args.set]
            if b:
                sets += [f'quantize.w_qconfig.bit={b[0]}', f'quantize.a_qconfig.bit={b[2]}']
            out = os.path.join(args.out, name, method + suffix, f'seed{seed}')
            runs.append((cfg, method, out, sets))
    return runs


def command(cfg, method, out, sets, progress):
    flags = [] if progress else ['--no-progress']
    if method.startswith('mqbench'):
        return [*BASELINE, '--config', cfg, '--output', out,
                '--set', *sets, *flags]
    if os.path.isfile(os.path.join(out, 'checkpoint.pt')):
        return [*QUANTIZE, '--resume', out, *flags]
    return [*QUANTIZE, '--config', cfg, '--output', out, '--set', *sets,
            *flags]


def add_study_arguments(p: argparse.ArgumentParser, out_help: str) -> None:
    """The arguments every study over one config shares: seeds, overrides, the folder, Ray, analyse-only."""
    p.add_argument('--seeds', nargs='+', type=int, default=[1], help='process.seed of each run')
    p.add_argument('--set', nargs='+', default=[], metavar='KEY=VALUE', help='overrides for every run')
    p.add_argument('--out', required=True, help=out_help)
    p.add_argument('--ray', nargs='?', const='local', metavar='ADDRESS', help='runs as Ray tasks (see mrecg sweep)')
    p.add_argument('--ray-cpus', type=int, default=1, help='CPU cores per Ray task when there is no GPU')
    p.add_argument('--analyse-only', action='store_true', help='only rebuild the tables and plots from finished runs')


def run_folders(config: str, runs, ray: Optional[str], ray_cpus: int) -> int:
    """Run a study's (name, folder, overrides) of one config, serially or as Ray tasks; finished folders are
    skipped. Returns the exit code (1 if a run failed)."""
    jobs, skipped = [], 0
    for i, (_, out, sets) in enumerate(runs, 1):
        if os.path.isfile(os.path.join(out, 'results.json')):
            skipped += 1
            continue
        jobs.append((f'[{i}/{len(runs)}] {out}', command(config, 'ptq_main', out, sets, False)))
    if not jobs:
        return 0
    return report(run_ray(jobs, ray, ray_cpus) if ray else run_serial(jobs, False), skipped)


class SweepStopped(Exception):
    """The sweep cannot go on (the Ray cluster went away); the message is one line."""


def run_command(cmd, threads=None, progress=False, cwd=None):
    """Run one sweep command in ``cwd`` (the sweep's own folder: relative paths mean the same to every run);
    (exit code, stdout, stderr). ``threads`` caps torch's threads (Ray tasks); with ``progress`` its stderr
    (the progress bars) goes to the terminal and '' is returned for it."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads else None
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None if progress else subprocess.PIPE,
                          text=True, env=env, cwd=cwd)
    return proc.returncode, proc.stdout, proc.stderr or ''


def outcome_line(code, stdout, stderr):
    """What a finished run printed last: its summary, or why it failed."""
    if code == 0:
        return (stdout.strip().splitlines() or ['done'])[-1]
    reason = (stderr or stdout or '').strip().splitlines()
    return f'failed (exit {code}): {reason[-1] if reason else "no output"}'


def run_serial(jobs, progress):
    """Run the jobs one after another in this process's order; yields (tag, code, stdout, stderr)."""
    for tag, cmd in jobs:
        print(f'{tag}: running', flush=True)
        yield (tag, *run_command(cmd, progress=progress))


def run_ray(jobs, address, cpus):
    """Run the jobs as Ray tasks (a local instance when ``address`` is 'local'); yields results as they end."""
    try:
        import ray
    except ImportError:
        raise SweepStopped('ray: not installed in this environment (pip install "ray>=2.9", or run without '
                           '--ray)') from None
    ray.init(address=None if address == 'local' else address, include_dashboard=False, log_to_driver=False)
    try:
        gpus = 1 if ray.cluster_resources().get('GPU', 0) >= 1 else 0
        task = ray.remote(run_command).options(num_cpus=cpus, num_gpus=gpus, max_retries=0)
        pending = {task.remote(cmd, cpus, False, os.getcwd()): tag for tag, cmd in jobs}
        print(f'ray: {len(pending)} runs as tasks ({"1 GPU" if gpus else f"{cpus} CPU"} each) on '
              f'{ray.cluster_resources().get("CPU", 0):.0f} CPUs, {ray.cluster_resources().get("GPU", 0):.0f} GPUs',
              flush=True)
        while pending:
            try:
                ready, _ = ray.wait(list(pending), num_returns=1)
            except Exception as exc:  # the cluster itself went away: finished runs stay, rerun to continue
                raise SweepStopped(f'ray: {(str(exc).strip().splitlines() or [type(exc).__name__])[-1]}') from None
            tag = pending.pop(ready[0])
            try:
                yield (tag, *ray.get(ready[0]))
            except ray.exceptions.RayError as exc:  # the task itself died (node lost, out of memory)
                yield tag, -1, '', (str(exc).strip().splitlines() or ['ray task failed'])[-1]
    finally:
        ray.shutdown()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='mrecg sweep', description=__doc__,
                                formatter_class=PlainHelp)
    p.add_argument('--configs', nargs='+', required=True, help='YAML configs to run')
    p.add_argument('--methods', nargs='+', default=['qdrop', 'mrecg+qdrop'], choices=list(METHODS),
                   help='methods to run on every config (see above)')
    p.add_argument('--grouping', nargs='+', choices=['config', 'authors', 'modcap', 'loss'],
                   help='groupings of the MRECG methods (default: config, or none when --variant is given)')
    p.add_argument('--variant', nargs='+', action='append', default=[], metavar=('NAME', 'KEY=VALUE'),
                   help='a named set of overrides for the MRECG methods (folder <method>_<NAME>); repeatable')
    p.add_argument('--k', nargs='+', type=int, default=[3], help='k of the modcap and loss groupings')
    p.add_argument('--seeds', nargs='+', type=int, default=[1005], help='process.seed of each run')
    p.add_argument('--bits', nargs='+', help='W_A pairs such as 4_4 2_4 (default: each config\'s own)')
    p.add_argument('--set', nargs='+', default=[], metavar='KEY=VALUE', help='extra overrides for every run')
    p.add_argument('--out', required=True, help='folder of the runs')
    p.add_argument('--dry-run', action='store_true', help='list the runs and their commands')
    p.add_argument('--progress', action='store_true', help='show progress bars of each run (serial only)')
    p.add_argument('--ray', nargs='?', const='local', metavar='ADDRESS',
                   help='run every run as a Ray task: on a local Ray instance, or on the cluster at ADDRESS')
    p.add_argument('--ray-cpus', type=int, default=1, help='CPU cores per Ray task when there is no GPU')
    return p


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.grouping is None:
        args.grouping = [] if args.variant else ['config']
    for name, *sets in args.variant:
        if '=' in name or not all('=' in x for x in sets):
            p.error(f'--variant takes a name then KEY=VALUE overrides, got {" ".join([name, *sets])}')
    for b in args.bits or []:
        if len(b) != 3 or b[1] != '_' or not (b[0] + b[2]).isdigit():
            p.error(f'--bits takes pairs like 2_4, got {b}')
    runs = plan_runs(args)
    jobs, skipped = [], 0
    for i, (cfg, method, out, sets) in enumerate(runs, 1):
        tag = f'[{i}/{len(runs)}] {out}'
        if os.path.isfile(os.path.join(out, 'results.json')):
            print(f'{tag}: finished, skipped', flush=True)
            skipped += 1
        elif args.dry_run:
            print(f'{tag}: ' + ' '.join(command(cfg, method, out, sets, args.progress)))
        else:
            jobs.append((tag, command(cfg, method, out, sets, args.progress and not args.ray)))
    if args.dry_run:
        return 0
    ray = args.ray and jobs  # nothing left to run: no Ray instance to start
    return report(run_ray(jobs, args.ray, args.ray_cpus) if ray else run_serial(jobs, args.progress), skipped)


def report(results, skipped):
    """Print each run's outcome as it ends, then the failures with their error lines."""
    done, failures, t0 = 0, [], time.time()
    try:
        for tag, code, stdout, stderr in results:
            line = f'{tag}: {outcome_line(code, stdout, stderr)}'
            print(line, flush=True)
            if code == 0:
                done += 1
            else:
                failures.append(line)
            if code == 130:
                print('interrupted: rerun the same command to continue the sweep', file=sys.stderr)
                return 130
    except KeyboardInterrupt:
        print('\ninterrupted: rerun the same command to continue the sweep (finished runs are skipped)',
              file=sys.stderr)
        return 130
    except SweepStopped as exc:
        print(f'{exc}; rerun the same command to continue the sweep (finished runs are skipped)', file=sys.stderr)
        return 1
    print(f'{done} run, {skipped} already finished, {len(failures)} failed in {time.time() - t0:.0f} s')
    for line in failures:
        print(line)
    return 1 if failures else 0


if __name__ == '__main__':
    sys.exit(main())
