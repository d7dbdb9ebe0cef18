#!/usr/bin/env python
"""Record a GPU cost census (``gpu_census.py``'s printed table) as rows of ``results/gpu_census.csv``.

    python ../shared/tools/gpu_census.py --project . --batch 32 256 --warmup \\
        --set quantize.reconstruction.kernels=compiled | tee census.txt
    python scripts/record_census.py census.txt --label "ours, compiled kernels" --commit abc1234 \\
        --command "python ../shared/tools/gpu_census.py --project . --batch 32 256 --warmup --set ..."

Each row is one model, batch and engine: launches, host syncs and GB per step (per iteration per unit) and the
census's predicted H200 step, with its ratio to MQBench's predicted step in the same census. Rows of the same
label are replaced; MQBench's rows are kept once (``--label`` names ours only).
"""
import argparse
import csv
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from provenance import ROOT, git_commit, machine, versions  # noqa: E402

FILE = os.path.join(ROOT, 'results', 'gpu_census.csv')
COLUMNS = ['model', 'batch', 'engine', 'launches_per_step', 'syncs_per_step', 'gb_per_step', 'predicted_h200_ms',
           'predicted_vs_mqbench', 'date', 'commit', 'machine', 'versions', 'command']
NAMES = {'resnet18': 'ResNet-18', 'mobilenet_v2': 'MobileNetV2', 'resnet50': 'ResNet-50',
         'regnetx_600m': 'RegNetX-600MF'}


def parse(text: str):
    """{(model, batch, engine): (launches, syncs, GB, predicted ms)} from the census table."""
    rows, inside = {}, False
    for line in text.splitlines():
        if line.startswith('model ') and 'launch/st' in line:
            inside = True
            continue
        parts = line.split()
        if not inside or len(parts) < 9 or not parts[1].isdigit():
            inside = inside and bool(parts)
            continue
        model, batch, engine, _units, launches, syncs, gb, _gflop, pred = parts[:9]
        rows[(model, int(batch), engine)] = (float(launches), float(syncs), float(gb), float(pred))
    return rows


def records(parsed, label: str, date: str, commit: str, command: str):
    out = []
    for (model, batch, engine), (launches, syncs, gb, pred) in parsed.items():
        mq = parsed.get((model, batch, 'mqbench'))
        ratio = f'{mq[3] / pred:.2f}×' if mq and engine == 'ours' else ''
        out.append({'model': NAMES.get(model, model), 'batch': batch,
                    'engine': label if engine == 'ours' else 'MQBench', 'launches_per_step': f'{launches:.0f}',
                    'syncs_per_step': f'{syncs:.0f}', 'gb_per_step': f'{gb:.3f}', 'predicted_h200_ms': f'{pred:.2f}',
                    'predicted_vs_mqbench': ratio, 'date': date, 'commit': commit,
                    'machine': machine() + ' (census: counted on the CPU, H200 predicted)', 'versions': versions(),
                    'command': command})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('census', help="the census's printed output")
    p.add_argument('--label', required=True, help="what our engine's rows are called, e.g. 'ours, compiled'")
    p.add_argument('--command', required=True, help='the census command that printed it')
    p.add_argument('--commit', default=None, help='the commit counted (default: HEAD)')
    p.add_argument('--date', default=time.strftime('%Y-%m-%d'))
    args = p.parse_args(argv)
    with open(args.census) as f:
        parsed = parse(f.read())
    if not parsed:
        print(f'error: no census table in {args.census}', file=sys.stderr)
        return 2
    new = records(parsed, args.label, args.date, args.commit or git_commit(), args.command)
    old = []
    if os.path.exists(FILE):
        with open(FILE, newline='') as f:
            old = list(csv.DictReader(f))
    replaced = {(r['engine']) for r in new}
    keep = [r for r in old if r['engine'] not in replaced]
    order = list(NAMES.values())
    rows = sorted(keep + new, key=lambda r: (order.index(r['model']) if r['model'] in order else 99,
                                             int(r['batch']), r['engine'] != 'MQBench', r['engine']))
    with open(FILE, 'w', newline='') as f:
        w = csv.DictWriter(f, COLUMNS)
        w.writeheader()
        w.writerows(rows)
    print(f'{len(new)} rows ({args.label}) -> {os.path.relpath(FILE, ROOT)}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
