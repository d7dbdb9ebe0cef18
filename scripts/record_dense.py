#!/usr/bin/env python
"""Write a dense-prediction benchmark's table (``mrecg collect`` of scripts/bench_dense.sh's runs) into
``results/<task>_benchmark.csv`` with the command, machine, versions, date and commit, for the docs.

    PY=.venv/bin/python TASK=segmentation bash scripts/bench_dense.sh
    .venv/bin/python -m mrecg collect outputs/segmentation --out outputs/segmentation/table --no-curves
    .venv/bin/python scripts/record_dense.py segmentation outputs/segmentation/table.csv
"""
import argparse
import csv
import os
import time

from provenance import ROOT, git_commit, versions

MACHINE = '2-core x86_64 CPU (AMX), 24 GiB, no GPU'
COMMAND = ('PY=.venv/bin/python TASK={task} bash scripts/bench_dense.sh && python -m mrecg collect outputs/{task} '
           '--out outputs/{task}/table --no-curves')
METRIC = {'segmentation': 'miou', 'detection': 'map'}


def two(v):
    return '' if v in ('', None) else f'{float(v):.2f}'


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('task', choices=sorted(METRIC))
    p.add_argument('table', help="mrecg collect's table.csv")
    p.add_argument('--date', default=time.strftime('%Y-%m-%d'))
    args = p.parse_args()
    with open(args.table) as f:
        rows = list(csv.DictReader(f))
    m = METRIC[args.task]
    if not rows or f'{m}_mean' not in rows[0]:
        raise SystemExit(f'{args.table} is not a table of {m} runs')
    prov = {'date': args.date, 'commit': git_commit(), 'machine': MACHINE, 'versions': versions(),
            'command': COMMAND.format(task=args.task)}
    fields = ['model', 'w_a', 'method', f'{m}_mean', f'{m}_std', 'delta_vs_plain', 'below_plain', 'seeds',
              'max_unit_loss_mean', 'max_unit_loss_std', 'date', 'commit', 'machine', 'versions', 'command']
    short = lambda label: label.split(':')[-1].split(',')[0].split(' (')[0]  # noqa: E731
    out = [{'model': short(rows[0]['model']), 'w_a': '32/32', 'method': 'Full Prec.',
            f'{m}_mean': two(rows[0][f'fp_{m}']), 'seeds': '1', **prov}]
    for r in rows:
        out.append({'model': short(r['model']), 'w_a': f'{r["w_bits"]}/{r["a_bits"]}', 'method': r['method'],
                    f'{m}_mean': two(r[f'{m}_mean']), f'{m}_std': two(r[f'{m}_std']),
                    'delta_vs_plain': '' if not r['delta_vs_plain'] else f'{float(r["delta_vs_plain"]):+.2f}',
                    'below_plain': r['worse_than_plain'], 'seeds': r['n'],
                    'max_unit_loss_mean': f'{float(r["max_unit_loss_mean"]):.4g}',
                    'max_unit_loss_std': f'{float(r["max_unit_loss_std"] or 0):.2g}', **prov})
    path = os.path.join(ROOT, 'results', f'{args.task}_benchmark.csv')
    with open(path, 'w', newline='') as f:
        w = csv.DictWriter(f, fields)
        w.writeheader()
        w.writerows(out)
    print(f'wrote {path} ({len(out)} rows)')


if __name__ == '__main__':
    main()
