#!/usr/bin/env python
"""Run the README's demo command and record what it prints into ``results/demo.json`` (the line README and the
docs show, with the command, machine, date, commit and seconds). Run it alone on the machine: it is timed.

    python scripts/record_demo.py
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from provenance import ROOT, git_commit, machine, versions, write_record
CONFIG = 'configs/demo/digits_qdrop_2_4.yaml'
DEFAULT_OUTPUT = 'outputs/demo/digits_qdrop_2_4'


def main() -> int:
    folder = tempfile.mkdtemp(prefix='mrecg_demo_')
    t0 = time.time()
    proc = subprocess.run([sys.executable, 'ptq_main.py', '--config', CONFIG, '--output', folder, '--no-progress'],
                          cwd=ROOT, capture_output=True, text=True)
    seconds = round(time.time() - t0)
    if proc.returncode:
        print(proc.stderr, file=sys.stderr)
        return 1
    line = proc.stdout.strip().splitlines()[-1].replace(folder, DEFAULT_OUTPUT)
    results = json.load(open(os.path.join(folder, 'results.json')))
    shutil.rmtree(folder)
    write_record(os.path.join(ROOT, 'results', 'demo.json'), {
        'command': f'python ptq_main.py --config {CONFIG}', 'prints': line, 'seconds': seconds,
        'quant_top1': results['quant_top1'], 'fp_top1': results['fp_top1'], 'date': time.strftime('%Y-%m-%d'),
        'commit': git_commit(), 'machine': machine(), 'versions': versions()})
    print(line)
    return 0


if __name__ == '__main__':
    sys.exit(main())
