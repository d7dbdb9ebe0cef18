#!/usr/bin/env python
"""Turn a ``scripts/gpu_suite.sh`` output folder into rows of ``results/`` (the docs are generated from them).

    python scripts/record_gpu.py bench_out/gpu_suite            # after the suite; --dry-run prints, writes nothing

- ``synthetic.json`` (``mrecg bench --synthetic ... --json``, both engines): ``results/speed_gpu_synthetic.csv``,
  ours against MQBench per iteration per unit, one row per model and batch, labelled with our kernel set;
- ``synthetic_<name>.json`` (ours alone with another kernel set): the same file, ratios to the MQBench rows of
  ``synthetic.json`` (same device, same suite);
- ``peaks.json`` (4096 cached images, ours alone): ``results/gpu_peaks.csv``, peak device memory per model.
Rows with the same engine label, model and batch (or images) are replaced.
"""
import argparse
import csv
import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from provenance import ROOT, git_commit  # noqa: E402

NAMES = {'resnet18': 'ResNet-18', 'mobilenet_v2': 'MobileNetV2', 'resnet50': 'ResNet-50',
         'regnetx_600m': 'RegNetX-600MF'}
SPEED = ['engine', 'model', 'batch', 'ours_vs_mqbench_per_step', 'ours_ms_per_iteration_per_unit',
         'mqbench_ms_per_iteration_per_unit', 'device', 'date', 'commit', 'machine', 'versions', 'command']
PEAKS = ['model', 'images', 'batch', 'peak_gib', 'fits_24_gib', 'engine', 'device', 'date', 'commit', 'machine',
         'versions', 'command']


def load(path):
    with open(path) as f:
        return json.load(f)


def provenance(record, commit):
    versions = f'torch {record["torch"]}, Python {record["python"]}'
    return {'device': record['device'], 'date': record['date'], 'commit': commit,
            'machine': record['device'] + f' ({record["input_size"]}x{record["input_size"]})',
            'versions': versions, 'command': record['command']}


def speed_rows(record, mqbench_rows, commit):
    label = 'kernels ' + record['engine']['kernels']
    ours = {(r['model'], r['batch']): r for r in record['rows'] if r['engine'] == 'ours'}
    out = []
    for (model, batch), o in ours.items():
        q = mqbench_rows.get((model, batch))
        out.append({'engine': label, 'model': NAMES.get(model, model), 'batch': batch,
                    'ours_vs_mqbench_per_step': f'{q["step_s"] / o["step_s"]:.2f}×' if q else '',
                    'ours_ms_per_iteration_per_unit': f'{o["ms_unit"]:.2f}',
                    'mqbench_ms_per_iteration_per_unit': f'{q["ms_unit"]:.2f}' if q else '',
                    **provenance(record, commit)})
    return out


def peak_rows(record, commit):
    return [{'model': NAMES.get(r['model'], r['model']), 'images': record['images'], 'batch': r['batch'],
             'peak_gib': f'{r["peak"] / 1024:.2f}', 'fits_24_gib': 'yes' if r['peak'] / 1024 <= 24 else 'no',
             'engine': 'kernels ' + record['engine']['kernels'], **provenance(record, commit)}
            for r in record['rows'] if r['engine'] == 'ours']


def merge(path, columns, new, key):
    old = []
    if os.path.exists(path):
        with open(path, newline='') as f:
            old = list(csv.DictReader(f))
    fresh = {key(r) for r in new}
    rows = [r for r in old if key(r) not in fresh] + new
    with open(path, 'w', newline='') as f:
        w = csv.DictWriter(f, columns, extrasaction='ignore', restval='')
        w.writeheader()
        w.writerows(rows)
    return len(new)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('folder')
    p.add_argument('--commit', default=None)
    p.add_argument('--dry-run', action='store_true', help='print the rows, write nothing')
    args = p.parse_args(argv)
    commit = args.commit or git_commit()
    main_json = os.path.join(args.folder, 'synthetic.json')
    if not os.path.exists(main_json):
        print(f'error: {main_json} missing (run scripts/gpu_suite.sh first)', file=sys.stderr)
        return 2
    record = load(main_json)
    mq = {(r['model'], r['batch']): r for r in record['rows'] if r['engine'] == 'mqbench'}
    speed = speed_rows(record, mq, commit)
    for extra in sorted(glob.glob(os.path.join(args.folder, 'synthetic_*.json'))):
        speed += speed_rows(load(extra), mq, commit)
    peaks_json = os.path.join(args.folder, 'peaks.json')
    peaks = peak_rows(load(peaks_json), commit) if os.path.exists(peaks_json) else []
    if args.dry_run:
        for r in speed + peaks:
            print(r)
        return 0
    results = os.path.join(ROOT, 'results')
    n = merge(os.path.join(results, 'speed_gpu_synthetic.csv'), SPEED, speed,
              lambda r: (r['engine'], r['model'], str(r['batch'])))
    m = merge(os.path.join(results, 'gpu_peaks.csv'), PEAKS, peaks,
              lambda r: (r['engine'], r['model'], str(r['images']))) if peaks else 0
    print(f'{n} speed rows -> results/speed_gpu_synthetic.csv, {m} peak rows -> results/gpu_peaks.csv')
    return 0


if __name__ == '__main__':
    sys.exit(main())
