"""The paper's ablations on any config: calibration batch size, and the contribution of each component.

    mrecg study ablation --config configs/fashion/mbv2_2_4.yaml --study batch --factors 1 2 4 \\
        --seeds 1 2 3 --out outputs/ablation/mbv2_2_4_batch [--ray]
    mrecg study ablation --config configs/fashion/mbv2_2_4.yaml --study components --expand 4 \\
        --seeds 1 2 3 --out outputs/ablation/mbv2_2_4_components

``--study batch``: the config's calibration images (``quantize.cali_size``) and per-step batch
(``quantize.reconstruction.batch_size``) multiplied by each factor together (the authors' single batch-size
key set both), and each one alone with the other at the config's value; the config's method and grouping.
``--study components``: plain reconstruction, grouping only (the config's MRECG grouping), batch expansion
only (both sizes times ``--expand``, no grouping) and both. Runs go through ``mrecg sweep``'s commands
and lanes (finished runs are skipped); the study ends in ``ablation.md`` / ``ablation.csv`` and
``ablation.png`` in ``--out``.
"""
import argparse
import csv
import os
import sys
from typing import Dict, List, Tuple

import mrecg

from mrecg.helptext import PlainHelp
from mrecg.tools import scheme_study  # summaries of finished runs
from mrecg.tools import sweep  # commands, serial and Ray lanes

PLAIN = ['mrecg.metric=none', 'mrecg.k=0', 'mrecg.scheme=null']


def sizes(cali: int, batch: int) -> List[str]:
    return [f'quantize.cali_size={cali}', f'quantize.reconstruction.batch_size={batch}']


def batch_variants(cfg: mrecg.Config, factors: List[int]) -> List[Tuple[str, str, int, List[str]]]:
    """(name, series, factor, overrides): both sizes scaled together, then each alone."""
    cali, batch = cfg.quantize.cali_size, cfg.quantize.reconstruction.batch_size
    out = []
    for f in factors:
        out.append((f'together_x{f}', 'calibration images and step batch', f, sizes(cali * f, batch * f)))
        if f != 1:
            out.append((f'images_x{f}', 'calibration images only', f, sizes(cali * f, batch)))
            out.append((f'batch_x{f}', 'step batch only', f, sizes(cali, batch * f)))
    return out


def component_variants(cfg: mrecg.Config, expand: int) -> List[Tuple[str, str, int, List[str]]]:
    cali, batch = cfg.quantize.cali_size, cfg.quantize.reconstruction.batch_size
    big = sizes(cali * expand, batch * expand)
    return [('plain', 'components', 1, [*PLAIN, *sizes(cali, batch)]),
            ('grouping', 'components', 1, sizes(cali, batch)),
            ('expansion', 'components', expand, [*PLAIN, *big]),
            ('both', 'components', expand, big)]


def runs_of(args, variants) -> List[Tuple[str, str, List[str]]]:
    """(variant, folder, overrides) for every variant and seed."""
    return [(v[0], os.path.join(args.out, v[0], f'seed{seed}'), [*args.set, *v[3], f'process.seed={seed}'])
            for v in variants for seed in args.seeds]


def write_outputs(args, cfg: mrecg.Config, variants, rows: Dict[str, Dict]) -> None:
    cols = ['variant', 'series', 'factor', 'cali_size', 'batch_size', 'seeds', 'top1', 'top1_std', 'max_loss',
            'final_loss', 'merged_pairs']
    table = []
    for name, series, factor, sets in variants:
        r = rows.get(name)
        if r is None:
            continue
        values = dict(s.split('=', 1) for s in sets)
        table.append({'variant': name, 'series': series, 'factor': factor,
                      'cali_size': int(values['quantize.cali_size']),
                      'batch_size': int(values['quantize.reconstruction.batch_size']), **{
                          k: r[k] for k in ('seeds', 'top1', 'top1_std', 'max_loss', 'final_loss', 'merged_pairs')}})
    with open(os.path.join(args.out, 'ablation.csv'), 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=cols)
        writer.writeheader()
        writer.writerows(table)
    title = (f'{cfg.model.type} W{cfg.quantize.w_qconfig.bit}A{cfg.quantize.a_qconfig.bit} {cfg.method}: '
             f'{args.study} ablation, {len(args.seeds)} seed(s)')
    lines = [f'# {title}', '', '| variant | calibration images | step batch | merged pairs | top-1 | max unit loss | '
             'final loss |', '|---|---|---|---|---|---|---|']
    lines += [f'| {t["variant"]} | {t["cali_size"]} | {t["batch_size"]} | {t["merged_pairs"]} | {t["top1"]:.2f} ± '
              f'{t["top1_std"]:.2f} | {t["max_loss"]:.4g} | {t["final_loss"]:.4g} |' for t in table]
    with open(os.path.join(args.out, 'ablation.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    plot(os.path.join(args.out, 'ablation.png'), table, args.study, title)
    print('\n'.join(lines))


def plot(path: str, table: List[Dict], study: str, title: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    if study == 'components':
        ax.bar(range(len(table)), [t['top1'] for t in table], yerr=[t['top1_std'] for t in table], capsize=4,
               color='tab:blue', alpha=0.8)
        ax.set_xticks(range(len(table)))
        ax.set_xticklabels([t['variant'] for t in table])
        low = min(t['top1'] - t['top1_std'] for t in table)
        ax.set_ylim(max(0.0, low - 2.0), None)
    else:
        base = next((t for t in table if t['factor'] == 1), None)
        for series in dict.fromkeys(t['series'] for t in table):
            pts = sorted([t for t in table if t['series'] == series] + ([base] if base and base['series'] != series
                                                                           else []), key=lambda t: t['factor'])
            ax.errorbar([t['factor'] for t in pts], [t['top1'] for t in pts], yerr=[t['top1_std'] for t in pts],
                        marker='o', capsize=3, label=series)
        ax.set_xscale('log', base=2)
        ax.set_xlabel('factor over the config\'s sizes')
        ax.legend(fontsize=8)
    ax.set_ylabel('top-1 (%)')
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='mrecg study ablation', description=__doc__,
                                formatter_class=PlainHelp)
    p.add_argument('--config', required=True, help='the config every variant starts from')
    p.add_argument('--study', choices=['batch', 'components'], required=True,
                   help='batch: the two sizes scaled together and alone; components: plain, grouping, expansion, both')
    p.add_argument('--factors', nargs='+', type=int, default=[1, 2, 4], help='batch study: size multipliers')
    p.add_argument('--expand', type=int, default=4, help='components study: the batch expansion factor')
    sweep.add_study_arguments(p, 'folder of the runs and the tables')
    return p


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if any(f < 1 for f in args.factors) or 1 not in args.factors or args.expand < 2:
        p.error('--factors are integers >= 1 and include 1; --expand is >= 2')
    try:
        cfg = mrecg.load_config(args.config, args.set)
    except mrecg.UserError as exc:
        print(f'error: {exc}', file=sys.stderr)
        return 2
    if args.study == 'components' and not cfg.mrecg.grouped:
        print('error: the components study needs a config with MRECG grouping (mrecg.metric or mrecg.scheme)',
              file=sys.stderr)
        return 2
    variants = batch_variants(cfg, sorted(args.factors)) if args.study == 'batch' else component_variants(cfg, args.expand)
    os.makedirs(args.out, exist_ok=True)
    code = 0 if args.analyse_only else sweep.run_folders(args.config, runs_of(args, variants), args.ray,
                                                                  args.ray_cpus)
    rows = {r['scheme']: r for r in scheme_study.summarise(args.out, [v[0] for v in variants])}
    if not rows:
        print(f'error: no finished runs in {args.out}', file=sys.stderr)
        return 1
    write_outputs(args, cfg, variants, rows)
    return code


if __name__ == '__main__':
    sys.exit(main())
