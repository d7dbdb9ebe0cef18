"""The paper's evidence on any config: random mixed-granularity schemes, and the chain it argues.

    mrecg study schemes --config configs/fashion/resnet_2_4.yaml --schemes 16 --seeds 1 \\
        --out outputs/schemes/resnet_2_4 [--ray] [--set quantize.reconstruction.prob=1.0]

Samples ``--schemes`` random groupings of the config's base units (seeded by ``--sample-seed``: first the
number of merged pairs, uniform in 1..``--max-pairs``, then which pairs, so both the number and the size of
the merged groups vary; ``--max-group-size`` caps a group), adds the reference schemes (plain, the
config's ModCap and loss groupings with its k, the authors' published one where there is one), runs each
for every seed (``mrecg sweep``'s commands and lanes: finished runs are skipped, ``--ray`` in parallel)
and writes into ``--out``:

- ``schemes.md`` / ``schemes.csv``: per scheme the groups, merged pairs, top-1, the largest unit loss and its
  unit, the largest loss before the last unit, the final (last unit's) loss and the oscillation statistic,
  means over the seeds;
- ``chain.png``: final loss against the largest previous loss, top-1 against the final loss, and top-1
  against the number of merged pairs with its Pareto front, each with Pearson and Spearman correlations
  over the schemes; the reference schemes are marked in the cloud.
``--analyse-only`` rebuilds the table and plots from finished runs.
"""
import argparse
import csv
import json
import os
import random
import statistics
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import mrecg
from mrecg import grouping
from mrecg.helptext import PlainHelp

from mrecg.tools import sweep  # run folders, commands, serial and Ray lanes

Span = Tuple[int, int]


# ---- schemes ---------------------------------------------------------------------------------------------
def sample_schemes(num_units: int, count: int, seed: int, max_pairs: Optional[int] = None,
                   max_group_size: Optional[int] = None) -> List[List[Span]]:
    """``count`` distinct random schemes (spans of merged units); each merges 1..max_pairs adjacent pairs."""
    pairs = num_units - 1
    max_pairs = min(max_pairs or pairs, pairs)
    rng, seen, schemes = random.Random(seed), set(), []
    for _ in range(200 * count):
        if len(schemes) == count:
            break
        chosen = sorted(rng.sample(range(pairs), rng.randint(1, max_pairs)))
        spans = grouping.spans_from_pairs(chosen)
        if max_group_size and any(b - a + 1 > max_group_size for a, b in spans):
            continue
        if tuple(spans) not in seen:
            seen.add(tuple(spans))
            schemes.append(spans)
    if len(schemes) < count:
        raise SystemExit(f'error: only {len(schemes)} distinct schemes exist under these limits; ask for fewer')
    return schemes


def scheme_overrides(spans: Sequence[Span], unit_names: Sequence[str]) -> List[str]:
    groups = [list(unit_names[a:b + 1]) for a, b in spans]
    return ['mrecg.metric=none', 'mrecg.k=0', 'mrecg.scheme=' + json.dumps(groups) if groups else 'mrecg.scheme=null']


def reference_variants(cfg: mrecg.Config, k: int) -> List[Tuple[str, List[str]]]:
    """(name, overrides) of the schemes the random cloud is compared with."""
    refs = [('plain', ['mrecg.metric=none', 'mrecg.k=0', 'mrecg.scheme=null']),
            ('modcap', ['mrecg.metric=modcap', f'mrecg.k={k}', 'mrecg.scheme=null']),
            ('loss', ['mrecg.metric=loss', f'mrecg.k={k}', 'mrecg.scheme=null'])]
    if cfg.model.type in grouping.PUBLISHED_SCHEMES:
        refs.append(('authors', ['mrecg.metric=none', 'mrecg.k=0', 'mrecg.scheme=authors']))
    return refs


def plan_runs(args, cfg: mrecg.Config, unit_names: List[str]) -> List[Tuple[str, str, List[str]]]:
    """(scheme name, run folder, overrides) for every scheme and seed."""
    k = cfg.mrecg.k if isinstance(cfg.mrecg.k, int) and cfg.mrecg.k > 0 else 3
    variants = reference_variants(cfg, k)
    schemes = sample_schemes(len(unit_names), args.schemes, args.sample_seed, args.max_pairs, args.max_group_size)
    variants += [(f'random{i:02d}', scheme_overrides(s, unit_names)) for i, s in enumerate(schemes)]
    return [(name, os.path.join(args.out, name, f'seed{seed}'), [*sets, f'process.seed={seed}', *args.set])
            for name, sets in variants for seed in args.seeds]


# ---- analysis --------------------------------------------------------------------------------------------
def ranks(values: Sequence[float]) -> List[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for t in range(i, j + 1):
            out[order[t]] = (i + j) / 2 + 1  # ties share their mean rank
        i = j + 1
    return out


def pearson(x: Sequence[float], y: Sequence[float]) -> Optional[float]:
    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    return statistics.correlation(list(x), list(y))


def spearman(x: Sequence[float], y: Sequence[float]) -> Optional[float]:
    return pearson(ranks(x), ranks(y))


def pareto_front(points: Sequence[Tuple[float, float]]) -> List[int]:
    """Indices of the points (cost, accuracy) that no other point beats: lower or equal cost with higher
    accuracy, or lower cost with equal accuracy. Sorted by cost."""
    front = [i for i, (c, a) in enumerate(points)
             if not any((c2 <= c and a2 > a) or (c2 < c and a2 >= a) for c2, a2 in points)]
    return sorted(front, key=lambda i: points[i])


def summarise(out: str, names: Sequence[str]) -> List[Dict]:
    """One row per scheme: its groups and the means over its finished seeds."""
    rows = []
    for name in names:
        runs = []
        folder = os.path.join(out, name)
        for seed_dir in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            path = os.path.join(folder, seed_dir, 'results.json')
            if os.path.isfile(path):
                with open(path) as f:
                    runs.append(json.load(f))
        if not runs:
            continue
        losses = [[u['loss'] for u in r['unit_losses']] for r in runs]
        unit_names = [u['name'] for u in runs[0]['unit_losses']]
        mean_curve = [statistics.fmean(c[i] for c in losses) for i in range(len(losses[0]))]
        top1 = [r['quant_top1'] for r in runs]
        peak = max(range(len(mean_curve)), key=lambda i: mean_curve[i])
        rows.append({
            'scheme': name, 'kind': 'random' if name.startswith('random') else name, 'seeds': len(runs),
            'merged_pairs': grouping.merged_pairs([tuple(s) for s in runs[0]['grouping']['spans']]),
            'groups': ' | '.join('+'.join(g) for g in runs[0]['grouping']['groups']) or '-',
            'top1': statistics.fmean(top1), 'top1_std': statistics.stdev(top1) if len(top1) > 1 else 0.0,
            'max_loss': mean_curve[peak], 'max_loss_unit': unit_names[peak],
            'max_previous_loss': max(mean_curve[:-1]), 'final_loss': mean_curve[-1],
            'oscillation': statistics.fmean(r['loss_curve']['oscillation'] for r in runs)})
    return rows


def correlations(rows: List[Dict]) -> Dict[str, Tuple[Optional[float], Optional[float]]]:
    pairs = {'final vs max previous loss': ('max_previous_loss', 'final_loss'),
             'top-1 vs final loss': ('final_loss', 'top1'), 'top-1 vs max loss': ('max_loss', 'top1'),
             'final loss vs oscillation': ('oscillation', 'final_loss'), 'top-1 vs merged pairs': ('merged_pairs', 'top1')}
    return {label: (pearson([r[a] for r in rows], [r[b] for r in rows]),
                    spearman([r[a] for r in rows], [r[b] for r in rows])) for label, (a, b) in pairs.items()}


def fmt_r(value: Optional[float]) -> str:
    return '-' if value is None else f'{value:+.2f}'


def write_table(out: str, rows: List[Dict], corr: Dict, front: List[int], title: str) -> None:
    cols = ['scheme', 'kind', 'seeds', 'merged_pairs', 'top1', 'top1_std', 'max_loss', 'max_loss_unit',
            'max_previous_loss', 'final_loss', 'oscillation', 'groups']
    with open(os.path.join(out, 'schemes.csv'), 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=cols + ['pareto'])
        writer.writeheader()
        for i, r in enumerate(rows):
            writer.writerow({**{c: r[c] for c in cols}, 'pareto': i in front})
    lines = [f'# {title}', '', f'{len(rows)} schemes; Pearson / Spearman over them:', '']
    lines += [f'- {label}: {fmt_r(p)} / {fmt_r(s)}' for label, (p, s) in corr.items()]
    lines += ['', '| scheme | pairs | top-1 | max loss (unit) | max previous | final | oscillation | Pareto | groups |',
              '|---|---|---|---|---|---|---|---|---|']
    for i, r in sorted(enumerate(rows), key=lambda ir: -ir[1]['top1']):
        lines.append(f'| {r["scheme"]} | {r["merged_pairs"]} | {r["top1"]:.2f} ± {r["top1_std"]:.2f} | '
                     f'{r["max_loss"]:.4g} ({r["max_loss_unit"]}) | {r["max_previous_loss"]:.4g} | '
                     f'{r["final_loss"]:.4g} | {r["oscillation"]:.3f} | {"yes" if i in front else ""} | {r["groups"]} |')
    with open(os.path.join(out, 'schemes.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')


def plot_chain(path: str, rows: List[Dict], corr: Dict, front: List[int], title: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    panels = [('max_previous_loss', 'final_loss', 'final vs max previous loss', 'largest loss before the last unit',
               'final (last unit) loss'),
              ('final_loss', 'top1', 'top-1 vs final loss', 'final (last unit) loss', 'top-1 (%)'),
              ('merged_pairs', 'top1', 'top-1 vs merged pairs', 'merged adjacent pairs', 'top-1 (%)')]
    for ax, (xk, yk, label, xl, yl) in zip(axes, panels):
        rand = [r for r in rows if r['kind'] == 'random']
        ax.scatter([r[xk] for r in rand], [r[yk] for r in rand], s=18, color='tab:blue', alpha=0.7, label='random')
        for r, marker in zip([r for r in rows if r['kind'] != 'random'], 'o^sD'):
            ax.scatter([r[xk]], [r[yk]], s=60, marker=marker, edgecolor='black', label=r['kind'], zorder=3)
        if xk == 'merged_pairs':
            pts = [(rows[i][xk], rows[i][yk]) for i in front]
            ax.step([p[0] for p in pts], [p[1] for p in pts], where='post', color='tab:red', lw=1, label='Pareto front')
        p, s = corr[label]
        ax.set_title(f'{label}\nPearson {fmt_r(p)}, Spearman {fmt_r(s)}', fontsize=9)
        ax.set_xlabel(xl, fontsize=8)
        ax.set_ylabel(yl, fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def analyse(args, cfg: mrecg.Config, names: List[str]) -> None:
    rows = summarise(args.out, names)
    if len(rows) < 3:
        raise SystemExit(f'error: {len(rows)} finished schemes in {args.out}: need 3 or more to correlate')
    corr = correlations(rows)
    front = pareto_front([(r['merged_pairs'], r['top1']) for r in rows])
    title = (f'{cfg.model.type} W{cfg.quantize.w_qconfig.bit}A{cfg.quantize.a_qconfig.bit} {cfg.method}: '
             f'{len(rows)} schemes x {len(args.seeds)} seed(s)')
    write_table(args.out, rows, corr, front, title)
    plot_chain(os.path.join(args.out, 'chain.png'), rows, corr, front, title)
    print(title)
    for label, (p, s) in corr.items():
        print(f'{label}: Pearson {fmt_r(p)} Spearman {fmt_r(s)}')
    print('Pareto front (merged pairs, top-1): ' + ', '.join(
        f'{rows[i]["scheme"]} ({rows[i]["merged_pairs"]}, {rows[i]["top1"]:.2f})' for i in front))
    print(f'wrote {os.path.join(args.out, "schemes.md")}, schemes.csv, chain.png')


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='mrecg study schemes', description=__doc__,
                                formatter_class=PlainHelp)
    p.add_argument('--config', required=True, help='the config every scheme runs with')
    p.add_argument('--schemes', type=int, default=16, help='random schemes to sample')
    p.add_argument('--sample-seed', type=int, default=0, help='seed of the random schemes')
    p.add_argument('--max-pairs', type=int, help='most merged pairs in a random scheme (default: all)')
    p.add_argument('--max-group-size', type=int, help='largest group of a random scheme')
    sweep.add_study_arguments(p, 'folder of the runs and the tables')
    return p


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.schemes < 1:
        p.error('--schemes must be >= 1')
    try:
        cfg = mrecg.load_config(args.config, args.set)
        plan = mrecg.plan(mrecg.create_model(cfg.model.type, cfg.model.kwargs), cfg.to_dict() | {
            'mrecg': {'metric': 'none', 'k': 0, 'scheme': None}})
    except mrecg.UserError as exc:
        print(f'error: {exc}', file=sys.stderr)
        return 2
    unit_names = [u.name for u in plan.units]
    runs = plan_runs(args, cfg, unit_names)
    os.makedirs(args.out, exist_ok=True)
    code = 0 if args.analyse_only else sweep.run_folders(args.config, runs, args.ray, args.ray_cpus)
    if code:
        print('some runs failed: the analysis uses the finished ones', file=sys.stderr)
    analyse(args, cfg, list(dict.fromkeys(name for name, _, _ in runs)))
    return code


if __name__ == '__main__':
    sys.exit(main())
