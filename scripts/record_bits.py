#!/usr/bin/env python
"""Copy the mixed-precision study (``scripts/bench_bits.sh``) into the data files the docs are generated from:
``outputs/bits/<model>/front.csv`` -> ``results/bits_<model>.csv``, every model's ``correlation.csv`` ->
``results/bits_correlation.csv``, ``front.png`` -> ``docs/img/bits_<model>.png``, each row with its provenance.

    python scripts/record_bits.py [--out outputs/bits] [--commit HASH]
"""
import argparse
import csv
import os
import shutil
import sys
import time

from provenance import ROOT, git_commit, machine, versions
MODELS = {'mbv2': 'mobilenet_v2_small', 'resnet': 'resnet_small', 'regnet': 'regnetx_small'}


def provenance(model: str, date: str, commit: str) -> dict:
    return {'date': date, 'commit': commit, 'machine': machine() + ' (two Ray lanes of one thread)',
            'versions': versions(),
            'command': f"python -m mrecg bits --config configs/fashion/{model}_2_4.yaml --uniform 2 3 4 --budgets "
                       "size=w3 'size=w2*1.1' --measures output fisher weight random --seeds 1 2 3 --set "
                       f"mrecg.metric=none --out outputs/bits/{model} --ray --ray-cpus 1 --correlate"}


def write(path: str, rows) -> None:
    with open(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', default=os.path.join(ROOT, 'outputs', 'bits'))
    p.add_argument('--commit', help='the commit whose code made the runs (default: HEAD)')
    p.add_argument('--date', help='the date of the runs (default: the front.csv file date)')
    args = p.parse_args(argv)
    commit = args.commit or git_commit()
    correlation = []
    for model, name in MODELS.items():
        folder = os.path.join(args.out, model)
        if not os.path.isfile(os.path.join(folder, 'front.csv')):
            print(f'{folder}: no front.csv, skipped', file=sys.stderr)
            continue
        date = args.date or time.strftime('%Y-%m-%d', time.localtime(os.path.getmtime(os.path.join(folder,
                                                                                                   'front.csv'))))
        prov = provenance(model, date, commit)
        with open(os.path.join(folder, 'front.csv'), newline='') as f:
            write(os.path.join(ROOT, 'results', f'bits_{model}.csv'), [{**r, **prov} for r in csv.DictReader(f)])
        shutil.copy(os.path.join(folder, 'front.png'), os.path.join(ROOT, 'docs', 'img', f'bits_{model}.png'))
        if os.path.isfile(os.path.join(folder, 'correlation.csv')):
            with open(os.path.join(folder, 'correlation.csv'), newline='') as f:
                correlation += [{'model': name, **r, **prov} for r in csv.DictReader(f)]
    if correlation:
        write(os.path.join(ROOT, 'results', 'bits_correlation.csv'), correlation)
    print('recorded', ', '.join(m for m in MODELS if os.path.isfile(os.path.join(ROOT, 'results', f'bits_{m}.csv'))))
    return 0


if __name__ == '__main__':
    sys.exit(main())
