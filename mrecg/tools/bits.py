"""Mixed precision against uniform bits on one config: size (or BOPs) against top-1, over seeds.

    mrecg bits --config configs/fashion/mbv2_2_4.yaml --uniform 2 3 4 --budgets size=w3 size=w2*1.1 \\
        --measures fisher random --seeds 1 2 3 --out outputs/bits/mbv2 [--ray] [--set mrecg.metric=none]
    mrecg bits ... --analyse-only [--correlate]

Runs, each into ``<out>/<variant>/seed<seed>`` (finished ones are skipped, ``--ray`` as in ``mrecg sweep``):
``uniform_w<b>`` for every ``--uniform`` width (the config's own activation bits), and ``<measure>_<budget>``
for every measure and budget, with ``quantize.bit_search`` set. A budget is ``avg_w_bits=3.0``,
``size_mb=0.12``, ``bops_g=1.5``, or the size of a uniform allocation of this model: ``size=w3`` (the size of
uniform W3), ``size=w2*1.1`` (uniform W2 plus 10 %). ``random`` runs draw another random allocation per seed.
Then into ``--out``: ``front.csv`` / ``front.md`` (per variant: size, mean weight bits, GBOPs, top-1 mean and
std over seeds, search seconds against the run's) and ``front.png`` (top-1 against size, uniform as a line).
``--correlate`` adds ``correlation.md``: every measure's predicted sensitivity of every finished allocation
against its top-1 (Spearman), which is how the default measure was chosen.
"""
import argparse
import csv
import json
import os
import statistics
import sys
from typing import Dict, List, Tuple

from mrecg.helptext import PlainHelp
from mrecg.tools import sweep
from mrecg.tools.scheme_study import spearman

MEASURES = ('fisher', 'output', 'weight', 'random')


def parse_budget(spec: str, uniform_sizes: Dict[int, float]) -> Tuple[str, str, float]:
    """'avg_w_bits=3' | 'size_mb=0.1' | 'bops_g=2' | 'size=w3' | 'size=w2*1.1' -> (folder tag, kind, value)."""
    key, _, value = spec.partition('=')
    if key in ('avg_w_bits', 'size_mb', 'bops_g'):
        return f'{key}{float(value):g}', key, float(value)
    if key == 'size' and value.startswith('w'):
        bits, _, factor = value[1:].partition('*')
        if not bits.isdigit() or int(bits) not in uniform_sizes:
            raise ValueError(f'--budgets {spec}: size=wB needs a bit-width B in 2..8')
        return f'size-w{bits}' + (f'x{float(factor):g}' if factor else ''), 'size_mb', \
            uniform_sizes[int(bits)] * (float(factor) if factor else 1.0)
    raise ValueError(f'--budgets takes avg_w_bits=X, size_mb=X, bops_g=X or size=wB[*F], got {spec}')


def uniform_sizes(config: str, overrides: List[str]) -> Dict[int, float]:
    """The weight size (MB) of this model with every searchable layer at B bits, for B in 2..8."""
    from mrecg.bitsearch import default_sample, search_space
    from mrecg.config import load_config
    from mrecg.runner import build_float_model
    cfg = load_config(config, [*overrides, 'quantize.bit_search={budget: {avg_w_bits: 8}}'])
    model = build_float_model(cfg)
    _, space = search_space(model, cfg, default_sample(model, cfg))
    return {b: space.figures({n: b for n in space.searched}, {})['size_mb'] for b in range(2, 9)}


def variants(args, sizes: Dict[int, float]) -> List[Tuple[str, List[str]]]:
    out = [(f'uniform_w{b}', [f'quantize.w_qconfig.bit={b}']) for b in args.uniform]
    for spec in args.budgets:
        tag, kind, value = parse_budget(spec, sizes)
        for measure in args.measures:
            search = {'budget': {kind: value}, 'measure': measure, 'candidates': {'w': args.candidates}}
            out.append((f'{measure}_{tag}', ['quantize.bit_search=' + json.dumps(search)]))
    return out


# ---- analysis --------------------------------------------------------------------------------------------
def finished(out: str, names: List[str]) -> Dict[str, List[Dict]]:
    runs = {}
    for name in names:
        folder = os.path.join(out, name)
        for seed in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            path = os.path.join(folder, seed, 'results.json')
            if os.path.isfile(path):
                with open(path) as f:
                    runs.setdefault(name, []).append(json.load(f))
    return runs


def front_rows(runs: Dict[str, List[Dict]]) -> List[Dict]:
    rows = []
    for name, rs in runs.items():
        top1 = [r['quant_top1'] for r in rs if r['quant_top1'] is not None]
        search = [r['bit_search']['seconds'] for r in rs if r.get('bit_search')]
        rows.append({'variant': name, 'seeds': len(rs), 'size_mb': rs[0]['size']['size_mb'],
                     'mean_w_bits': rs[0]['size']['mean_w_bits'], 'bops_g': rs[0]['size']['bops_g'],
                     'top1_mean': statistics.fmean(top1) if top1 else None,
                     'top1_std': statistics.stdev(top1) if len(top1) > 1 else 0.0,
                     'search_s': statistics.fmean(search) if search else None,
                     'run_s': statistics.fmean(r['timing']['total_seconds'] for r in rs),
                     'sizes_differ': len({round(r['size']['size_mb'], 9) for r in rs}) > 1})
    return sorted(rows, key=lambda r: (r['size_mb'], r['variant']))


def write_front(out: str, rows: List[Dict], title: str) -> None:
    with open(os.path.join(out, 'front.csv'), 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [f'# {title}', '', '| variant | seeds | size MB | mean W bits | GBOPs | top-1 | search s / run s |',
             '|---|---|---|---|---|---|---|']
    for r in rows:
        top1 = '-' if r['top1_mean'] is None else f'{r["top1_mean"]:.2f} ± {r["top1_std"]:.2f}'
        cost = '-' if r['search_s'] is None else f'{r["search_s"]:.1f} / {r["run_s"]:.0f}'
        size = f'{r["size_mb"]:.4f}' + (' (varies)' if r['sizes_differ'] else '')
        lines.append(f'| {r["variant"]} | {r["seeds"]} | {size} | {r["mean_w_bits"]:.3f} | {r["bops_g"]:.4g} | '
                     f'{top1} | {cost} |')
    with open(os.path.join(out, 'front.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')


def plot_front(path: str, rows: List[Dict], title: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    series: Dict[str, List[Dict]] = {}
    for r in rows:
        if r['top1_mean'] is not None:
            series.setdefault('uniform' if r['variant'].startswith('uniform') else r['variant'].split('_')[0],
                              []).append(r)
    for (label, pts), marker in zip(sorted(series.items()), 'osd^vP'):
        pts = sorted(pts, key=lambda r: r['size_mb'])
        ax.errorbar([p['size_mb'] for p in pts], [p['top1_mean'] for p in pts], [p['top1_std'] for p in pts],
                    marker=marker, capsize=3, ls='-' if label == 'uniform' else 'none', label=label)
    ax.set_xlabel('weights, MB (packed bits)')
    ax.set_ylabel('top-1 (%), mean ± std over seeds')
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def budget_groups(runs: Dict[str, List[Dict]]) -> Dict[str, List[Dict]]:
    """Runs at one budget: every ``<measure>_<tag>`` variant, and ``uniform_w<b>`` with the tag ``size-w<b>``."""
    groups: Dict[str, List[Dict]] = {}
    for name, rs in runs.items():
        if not name.startswith('uniform_'):
            groups.setdefault(name.split('_', 1)[1], []).extend(rs)
    for tag in list(groups):
        uniform = 'uniform_' + tag[len('size-'):] if tag.startswith('size-w') and 'x' not in tag else None
        groups[tag].extend(runs.get(uniform, []))
    return groups


def correlate(args, runs: Dict[str, List[Dict]]) -> List[str]:
    """Within each budget, each measure's predicted sensitivity of every finished allocation (the sum over the
    searched layers of its score at the run's bits) against the run's top-1: Spearman (negative: predictive)."""
    import torch
    from mrecg.bitsearch import search_space
    from mrecg.config import load_config
    from mrecg.data import calibration_images
    from mrecg.quantization import disable_all
    from mrecg.runner import build_float_model, open_data
    from mrecg.sensitivity import layer_scores
    cfg = load_config(args.config, [*args.set, 'quantize.bit_search={budget: {avg_w_bits: 8}}'])
    model = build_float_model(cfg)
    train, _ = open_data(cfg)
    images = calibration_images(train, cfg.quantize.cali_size, cfg.process.seed, cfg.data.batch_size)[:256]
    qmodel, space = search_space(model, cfg, images[:1])
    disable_all(qmodel)
    bits = sorted({2, 3, 4, 8} | set(args.candidates))
    scores = {m: layer_scores(m, qmodel, space.searched, bits, cfg.quantize.w_qconfig.symmetric, images,
                              torch.device('cpu'), cfg.process.seed) for m in ('output', 'fisher', 'weight')}
    rows = []
    for tag, rs in sorted(budget_groups(runs).items()):
        done = [r for r in rs if r['quant_top1'] is not None]
        for measure, table in scores.items():
            predicted = [sum(table[n][r['layer_bits'][n]['w_bit']] for n in space.searched) for r in done]
            rho = spearman(predicted, [r['quant_top1'] for r in done])
            rows.append({'budget': tag, 'measure': measure, 'spearman': '-' if rho is None else f'{rho:+.2f}',
                         'allocations': len(done)})
    return rows


def write_correlation(out: str, rows: List[Dict]) -> None:
    with open(os.path.join(out, 'correlation.csv'), 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = ['| budget | measure | Spearman(predicted sensitivity, top-1) | allocations (runs) |', '|---|---|---|---|']
    lines += [f'| {r["budget"]} | {r["measure"]} | {r["spearman"]} | {r["allocations"]} |' for r in rows]
    with open(os.path.join(out, 'correlation.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='mrecg bits', description=__doc__,
                                formatter_class=PlainHelp)
    p.add_argument('--config', required=True, help='the config every run starts from')
    p.add_argument('--uniform', nargs='*', type=int, default=[2, 3, 4], help='uniform weight bit-widths to run')
    p.add_argument('--budgets', nargs='*', default=['size=w3'], help='avg_w_bits=X, size_mb=X, bops_g=X, size=wB[*F]')
    p.add_argument('--measures', nargs='*', default=['fisher', 'random'], choices=MEASURES,
                   help='sensitivity measures to search with (random: a random allocation per seed)')
    p.add_argument('--candidates', nargs='+', type=int, default=[2, 3, 4, 8], help='weight bits the search may use')
    sweep.add_study_arguments(p, 'folder of the runs and the front')
    p.add_argument('--correlate', action='store_true', help='also rank-correlate every measure with top-1')
    return p


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    from mrecg.errors import UserError
    try:
        sizes = uniform_sizes(args.config, args.set)
        names = variants(args, sizes)
    except (UserError, ValueError) as exc:
        print(f'error: {exc}', file=sys.stderr)
        return 2
    runs = [(name, os.path.join(args.out, name, f'seed{seed}'), [*sets, f'process.seed={seed}', *args.set])
            for name, sets in names for seed in args.seeds]
    code = 0 if args.analyse_only else sweep.run_folders(args.config, runs, args.ray, args.ray_cpus)
    done = finished(args.out, [n for n, _ in names])
    if not done:
        print(f'error: no finished runs under {args.out}', file=sys.stderr)
        return code or 2
    title = f'{os.path.basename(args.config)}: mixed vs uniform bits (seeds {" ".join(map(str, args.seeds))})'
    rows = front_rows(done)
    write_front(args.out, rows, title)
    plot_front(os.path.join(args.out, 'front.png'), rows, title)
    if args.correlate:
        write_correlation(args.out, correlate(args, done))
    print(open(os.path.join(args.out, 'front.md')).read())
    return code
