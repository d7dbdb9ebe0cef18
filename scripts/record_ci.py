#!/usr/bin/env python
"""Run CI as CI does (``CI=true bash .ci/run`` in a fresh clone of HEAD) and record its figures into
``results/ci.json``: tests passed and skipped, the install, test and total seconds. Run it alone on the machine.

    python scripts/record_ci.py
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

from provenance import ROOT, git_commit, machine, write_record


def main() -> int:
    commit = git_commit()
    folder = tempfile.mkdtemp(prefix='mrecg_ci_')
    clone = os.path.join(folder, 'repo')
    subprocess.run(['git', 'clone', '-q', ROOT, clone], check=True)
    t0 = time.time()
    proc = subprocess.run(['bash', '.ci/run'], cwd=clone, env=dict(os.environ, CI='true'), capture_output=True,
                          text=True)
    total = time.time() - t0
    out = proc.stdout + proc.stderr
    shutil.rmtree(folder, ignore_errors=True)
    summary = re.search(r'(\d+) passed(?:, (\d+) skipped)? in ([\d.]+)s', out)
    if proc.returncode or not summary:
        print(out[-3000:], file=sys.stderr)
        return 1
    tests = float(summary.group(3))
    record = {'command': 'CI=true bash .ci/run (a fresh clone)', 'passed': int(summary.group(1)),
              'skipped': int(summary.group(2) or 0), 'test_seconds': round(tests), 'total_seconds': round(total),
              'install_seconds': round(total - tests), 'date': time.strftime('%Y-%m-%d'), 'commit': commit,
              'machine': machine()}
    write_record(os.path.join(ROOT, 'results', 'ci.json'), record)
    print(record)
    return 0


if __name__ == '__main__':
    sys.exit(main())
