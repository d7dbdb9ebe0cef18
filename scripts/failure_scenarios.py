#!/usr/bin/env python
"""Try what goes wrong in real runs, on the digits model, and record what the user sees: the data of the
"Runs that survive" table in the docs (``results/failure_scenarios.json``).

    python scripts/failure_scenarios.py                  # every scenario, ~3 min on 2 cores
    python scripts/failure_scenarios.py --only-hostile   # the hostile-file rows only (the others kept)

Ctrl-C in a given phase is a KeyboardInterrupt raised in that phase (what SIGINT raises in Python), injected
into a child process by ``--child PHASE``, so every phase is hit exactly; the concurrent launch and the
killed run are real processes and signals. Each scenario then does what the user would (``--resume``, a
rerun) and checks that the numbers equal an uninterrupted run's, or that nothing finished was lost.
"""
import argparse
import json
import os
import shutil
import shlex
import signal
import subprocess
import sys
import tempfile
import time

import torch
import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # also when loaded as the data factory of a run
from provenance import ROOT, git_commit, machine, versions, write_record  # noqa: E402
CONFIG = {
    'model': {'type': 'mobilenet_v2_small',
              'path': os.path.join(ROOT, 'models', 'checkpoints', 'mobilenet_v2_small_digits.pth')},
    'data': {'type': 'digits', 'batch_size': 64, 'eval_limit': 200},
    'quantize': {'w_qconfig': {'bit': 2, 'p': 2.0}, 'a_qconfig': {'bit': 4, 'p': 2.0}, 'cali_size': 64,
                 'reconstruction': {'iterations': 40, 'batch_size': 16, 'weight': 0.1}},
    'mrecg': {'metric': 'loss', 'k': 2, 'probe_iterations': 20},
    'process': {'seed': 7, 'device': 'cpu'},
}
PHASES = ['float evaluation', 'calibration', 'loss probe', 'reconstruction', 'quantized evaluation', 'export']


# ---- the child: one CLI run with Ctrl-C raised inside a phase ---------------------------------------------
def interrupt_in(phase: str) -> None:
    """Patch the toolkit so that a KeyboardInterrupt is raised part-way through ``phase``."""
    from mrecg import api, reconstruction, runner

    def stop(*_, **__):
        raise KeyboardInterrupt
    if phase in ('float evaluation', 'quantized evaluation'):
        real = api.evaluate
        word = phase.split()[0]
        api.evaluate = lambda m, b, d, desc='eval', *a: stop() if word in desc else real(m, b, d, desc, *a)
    elif phase == 'calibration':
        api.calibrate = stop
    elif phase == 'export':
        runner.export_folder = stop
    else:  # mid-unit: the 10th step of the third unit of the probe (phase loss probe) or of the reconstruction
        real_build, real_save, seen = reconstruction.Reconstructor.from_config, runner.save_state, []

        def save(output, digest, state):
            real_save(output, digest, state)
            seen.append(state.phase)

        def on_step(group, i):
            probing = 'reconstruction' not in seen
            if probing == (phase == 'loss probe') and seen.count('probe' if probing else 'reconstruction') >= 3 \
                    and i == 10:
                raise KeyboardInterrupt

        def build(*args, **kwargs):  # every engine the run builds, with the public step hook
            return real_build(*args, on_step=on_step, **kwargs)
        runner.save_state, reconstruction.Reconstructor.from_config = save, build

def child(phase: str, argv) -> int:
    interrupt_in(phase)
    from mrecg.cli import main
    return main(argv)


# ---- the parent --------------------------------------------------------------------------------------------
def cli(*args, phase=None, wait=True, command=('ptq_main.py',)):
    """A run as the user starts it (``command``: ptq_main.py or ``-m mrecg ...``), with Ctrl-C in ``phase``."""
    cmd = [sys.executable, os.path.abspath(__file__), '--child', phase, '--'] if phase else \
        [sys.executable, *(os.path.join(ROOT, c) if c.endswith('.py') else c for c in command)]
    cmd += [*args, '--no-progress'] if command[0] == 'ptq_main.py' else list(args)
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ''


def short(text: str, tmp: str) -> str:
    return text.replace(tmp + os.sep, '').replace(tmp, '.')


def top1(folder: str):
    path = os.path.join(folder, 'results.json')
    return json.load(open(path))['quant_top1'] if os.path.isfile(path) else None


def log_line(folder: str, needle: str) -> str:
    path = os.path.join(folder, 'run.log')
    lines = [line.split(' ', 2)[-1] for line in open(path) if needle in line] if os.path.isfile(path) else []
    return lines[-1].strip() if lines else ''


def ctrl_c(tmp, cfg, reference):
    rows = []
    for phase in PHASES:
        out = os.path.join(tmp, 'ctrlc_' + phase.replace(' ', '_'))
        fresh = ['--set', f'process.cache_dir={out}_cache']  # no cached probe: the probe really runs
        first = cli('--config', cfg, '--output', out, *(['--export', 'onnx'] if phase == 'export' else []), *fresh,
                    phase=phase)
        if phase == 'export':
            then, rerun = cli(out, command=('-m', 'mrecg', 'export')), 'mrecg export DIR'
        else:
            then, rerun = cli('--resume', out), 'ptq_main.py --resume DIR'
        same = top1(out) == reference
        rows.append(row(f'Ctrl-C during the {phase}', first, tmp, then=rerun, then_proc=then,
                        kept=('results.json written before the export; ' if phase == 'export' else '')
                        + (f'resumed run equals the uninterrupted one (top-1 {top1(out):.2f})' if same
                           else f'top-1 {top1(out)} vs uninterrupted {reference}'),
                        ok=same and first.returncode == 130))
    return rows


def concurrent(tmp, cfg):
    out = os.path.join(tmp, 'concurrent')
    first = cli('--config', cfg, '--output', out, wait=False)
    t0 = time.time()
    while not os.path.exists(os.path.join(out, '.mrecg.lock')) and time.time() - t0 < 120:
        time.sleep(0.05)
    second = cli('--config', cfg, '--output', out, '--overwrite')
    stdout, stderr = first.communicate(timeout=900)
    ok = second.returncode == 2 and first.returncode == 0 and top1(out) is not None
    return row('A second launch into a folder a run is writing (even with --overwrite)', second, tmp,
               kept=f'the first run finished undisturbed (exit {first.returncode}, top-1 {top1(out)})', ok=ok)


def killed(tmp, cfg, reference):
    out = os.path.join(tmp, 'killed')
    proc = cli('--config', cfg, '--output', out, wait=False)
    t0 = time.time()
    while time.time() - t0 < 300:
        state = os.path.join(out, 'checkpoint.pt')
        try:
            if os.path.isfile(state) and len(torch.load(state, weights_only=True).get('results', [])) >= 2:
                break
        except Exception:
            pass
        time.sleep(0.05)
    proc.kill()
    proc.communicate()
    then = cli('--resume', out)
    took = log_line(out, 'took over the lock')
    return row('The machine or the process dies (SIGKILL) mid-run; the lock file stays behind', proc, tmp,
               then='ptq_main.py --resume DIR', then_proc=then,
               kept=f'log: "{took}"; resumed run equals the uninterrupted one' if top1(out) == reference else
               'resumed run differs', ok=top1(out) == reference and bool(took), sees='(nothing: the process is gone)')


def make_data(split, folder):
    """The data factory of the 'changed' scenarios: digits read from files the scenario then changes."""
    from mrecg.data import TensorData
    x, y = torch.load(os.path.join(folder, f'{split}.pt'), weights_only=True)
    return TensorData(x, y)


CHANGES = {'weights': 'The float checkpoint is retrained (same path) between the interruption and --resume',
           'train': 'The calibration images are replaced (same folder) between the interruption and --resume',
           'val': 'The evaluation images change between the interruption and --resume'}


def changed(tmp, cfg, what, reference):
    """Interrupt mid-reconstruction, change the weights file, the calibration or the evaluation data, resume."""
    from mrecg.data import digits
    folder = os.path.join(tmp, 'changed_' + what)
    os.makedirs(folder)
    for split in ('train', 'val'):
        d = digits(split, 0)
        torch.save((d.images, d.labels), os.path.join(folder, f'{split}.pt'))
    conf = yaml.safe_load(open(cfg))
    conf['model']['path'] = os.path.join(folder, 'weights.pth')
    shutil.copy(CONFIG['model']['path'], conf['model']['path'])
    conf['data'] = {**conf['data'], 'type': f'{os.path.abspath(__file__)}:make_data', 'kwargs': {'folder': folder}}
    path = os.path.join(folder, 'cfg.yaml')
    yaml.safe_dump(conf, open(path, 'w'))
    out = os.path.join(folder, 'run')
    first = cli('--config', path, '--output', out, phase='reconstruction')
    if what == 'weights':
        sd = torch.load(conf['model']['path'], weights_only=True)
        name = next(k for k, v in sd.items() if v.dim() == 4)
        sd[name] = sd[name] * 1.01
        torch.save(sd, conf['model']['path'])
    else:
        x, y = torch.load(os.path.join(folder, f'{what}.pt'), weights_only=True)
        torch.save((x + 0.01, y), os.path.join(folder, f'{what}.pt'))
    then = cli('--resume', out)
    if what == 'val':
        note = log_line(out, 'evaluation data changed')
        return row(CHANGES[what], then, tmp, kept=f'log: "{note}"; the reconstruction resumed (its inputs are '
                   'unchanged)', ok=then.returncode == 0 and bool(note) and first.returncode == 130)
    refused = then.returncode == 2 and 'differ from those this run started with' in then.stderr
    return row(CHANGES[what], then, tmp, kept='refused before any work: nothing continues on other targets; the '
               'checkpoint stays for the old inputs', ok=refused and first.returncode == 130)


def overwrite_failure(tmp, cfg):
    out = os.path.join(tmp, 'overwrite')
    cli('--config', cfg, '--output', out)
    before = top1(out)
    failed = cli('--config', cfg, '--output', out, '--overwrite', phase='quantized evaluation')
    kept = top1(os.path.join(out, 'previous_run'))
    return row('A rerun with --overwrite fails (here: interrupted in its last evaluation)', failed, tmp,
               kept=f'previous_run/results.json still holds the finished run (top-1 {kept}); removed only when '
               'the new run writes its results', ok=kept == before and kept is not None)


# ---- hostile files and faults (issue 31) -------------------------------------------------------------------
def alias_bomb() -> str:
    lines = ['a0: &a0 [x, x, x, x, x, x, x, x, x]']
    lines += [f'a{i}: &a{i} [' + ', '.join([f'*a{i - 1}'] * 9) + ']' for i in range(1, 10)]
    return 'model:\n  kwargs:\n' + ''.join(f'    {line}\n' for line in lines)


def with_file(tmp, name, text):
    path = os.path.join(tmp, name)
    with open(path, 'w') as f:
        f.write(text)
    return path


def refused(scenario, proc, tmp, needle, kept='refused before any work: nothing started'):
    one_line = len(proc.stderr.strip().splitlines()) == 1 and 'Traceback' not in proc.stderr
    return row(scenario, proc, tmp, kept=kept, ok=proc.returncode == 2 and one_line and needle in proc.stderr)


def config_cases(tmp, cfg):
    base = open(cfg).read()
    t0 = time.time()
    bomb = cli('--config', with_file(tmp, 'bomb.yaml', alias_bomb()), '--output', os.path.join(tmp, 'bomb'))
    took = time.time() - t0
    deep = 'model:\n  kwargs: {x: ' + '[' * 10000 + ']' * 10000 + '}\n'
    return [
        refused(f'A YAML alias bomb (9 x 9 "billion laughs") in a config file (refused in {took:.1f} s)', bomb, tmp,
                'expands to more than'),
        refused('A value nested 10 000 levels deep', cli('--config', with_file(tmp, 'deep.yaml', deep)), tmp,
                'nested deeper than'),
        refused('A key twice in one mapping (a second `quantize:` section)',
                cli('--config', with_file(tmp, 'dup.yaml', base + 'quantize:\n  cali_size: 64\n')), tmp,
                'appears twice'),
        refused('`--set process.seed=18446744073709551616` (2^64)',
                cli('--config', cfg, '--set', 'process.seed=18446744073709551616'), tmp, '0..2^63-1'),
        refused('`quantize.cali_size=16` with a 64-image step batch',
                cli('--config', cfg, '--set', 'quantize.cali_size=16', 'quantize.reconstruction.batch_size=64'), tmp,
                'is larger than quantize.cali_size')]


def full_disk(tmp, cfg, reference):
    """A 200 kB tmpfs as the output folder (needs root; left out where it cannot be staged)."""
    disk = os.path.join(tmp, 'disk')
    os.makedirs(disk)
    if subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=200k', 'tmpfs', disk], capture_output=True).returncode:
        return []
    try:
        out = os.path.join(disk, 'run')
        first = cli('--config', cfg, '--output', out)
        subprocess.run(['mount', '-o', 'remount,size=50m', disk], check=True)
        then = cli('--resume', out)
        ok = first.returncode == 2 and 'no space left' in first.stderr and top1(out) == reference
        return [row('The disk fills up (a 200 kB file system) while the run writes its checkpoint', first, tmp,
                    then='free space, then ptq_main.py --resume DIR', then_proc=then,
                    kept=f'the previous checkpoint stayed whole; resumed run top-1 {top1(out)} (uninterrupted '
                         f'{reference})', ok=ok)]
    finally:
        subprocess.run(['umount', disk], capture_output=True)


def spaces_in_paths(tmp, cfg, reference):
    out = os.path.join(tmp, 'my runs', 'größe 1')
    first = cli('--config', cfg, '--output', out, phase='reconstruction')
    hint = first.stderr.strip().splitlines()[-1].split('continue with: ')[-1]
    pasted = subprocess.run(hint.replace('python', shlex.quote(sys.executable), 1) + ' --no-progress', shell=True,
                            cwd=ROOT, capture_output=True, text=True, timeout=900)
    return row('An output folder with spaces and non-ASCII characters, interrupted; the printed command pasted',
               first, tmp, then='the printed command, pasted into a shell', then_proc=pasted,
               kept=f'resumed run top-1 {top1(out)} (uninterrupted {reference})',
               ok=pasted.returncode == 0 and top1(out) == reference)


def symlink_loop(tmp):
    import mrecg
    from PIL import Image
    data = os.path.join(tmp, 'folder_data')
    for split, n in (('train', 8), ('val', 2)):
        for c in range(10):
            os.makedirs(os.path.join(data, split, str(c)))
            for i in range(n):
                Image.new('RGB', (8, 8), (c * 20, i * 30, 0)).save(os.path.join(data, split, str(c), f'{i}.png'))
    os.symlink('.', os.path.join(data, 'val', '3', 'more'))
    weights = os.path.join(tmp, 'rgb.pth')
    torch.save(mrecg.create_model('mobilenet_v2_small', {'in_chans': 3}).state_dict(), weights)
    conf = {**CONFIG, 'model': {'type': 'mobilenet_v2_small', 'kwargs': {'in_chans': 3}, 'path': weights},
            'data': {'type': 'imagefolder', 'path': data, 'input_size': 8, 'test_resize': 8, 'num_workers': 0},
            'quantize': {**CONFIG['quantize'], 'reconstruction': {'enabled': False}}, 'mrecg': {'metric': 'none'}}
    out = os.path.join(tmp, 'folder_run')
    proc = cli('--config', with_file(tmp, 'folder.yaml', yaml.safe_dump(conf)), '--output', out)
    line = log_line(out, ' data imagefolder')
    images = json.load(open(os.path.join(out, 'results.json')))['eval_images'] if top1(out) is not None else None
    return row('A symlink loop inside an image folder (`ln -s . val/3/more`, 20 images)', proc, tmp,
               kept=f'evaluated on {images} images; log: "{short(line, tmp)}"', ok=proc.returncode == 0 and images == 20)


NETS = '''
import torch.nn as nn
class TupleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.pool, self.fc = nn.Conv2d(1, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Linear(8, 10)
    def forward(self, x):
        return self.fc(self.pool(self.conv(x)).flatten(1)), x
'''


def tuple_model(tmp, cfg):
    import importlib.util
    nets = with_file(tmp, 'nets.py', NETS)
    spec = importlib.util.spec_from_file_location('nets', nets)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.save(module.TupleNet().state_dict(), os.path.join(tmp, 'nets.pth'))
    proc = cli('--config', cfg, '--output', os.path.join(tmp, 'tuple'), '--set', f'model.type={nets}:TupleNet',
               f'model.path={os.path.join(tmp, "nets.pth")}')
    return refused('A model whose forward returns a tuple', proc, tmp, 'returns a tuple',
                   kept='refused before any work, naming the model; no resume hint (resuming cannot help)')


class Payload:
    def __reduce__(self):
        return (os.system, ('touch /tmp/mrecg_failures_pwned',))


def damaged_exports(tmp):
    rows = []
    for damage, what in (('truncated', 'cut off'), ('pickle', 'a pickle payload that runs a command')):
        folder = os.path.join(tmp, f'export_{damage}')
        shutil.copytree(os.path.join(tmp, 'reference'), folder)
        path = os.path.join(folder, 'quantized_model.pt')
        if damage == 'truncated':
            data = open(path, 'rb').read()
            open(path, 'wb').write(data[:1000])
        else:
            torch.save({'x': Payload()}, path)
        proc = cli(folder, command=('-m', 'mrecg', 'export'))
        rows.append(refused(f'`mrecg export` of a run whose quantized_model.pt is {what}', proc, tmp,
                            'quantized_model.pt', kept='nothing executed; the run folder untouched'))
    return rows


def cut_off_results(tmp):
    tree = os.path.join(tmp, 'collect_tree')
    for name in ('a', 'b'):
        shutil.copytree(os.path.join(tmp, 'reference'), os.path.join(tree, name))
    cut = os.path.join(tree, 'b', 'results.json')
    text = open(cut).read()
    open(cut, 'w').write(text[:len(text) // 2])
    proc = cli(tree, '--out', os.path.join(tmp, 'collected'), command=('-m', 'mrecg', 'collect'))
    table = os.path.isfile(os.path.join(tmp, 'collected.md'))
    seen = next((x for x in proc.stderr.splitlines() if 'cannot read results' in x), '')
    return row('`mrecg collect` over a tree where one results.json is cut off', proc, tmp,
               kept=f'the table of the other runs is written ({"yes" if table else "no"})',
               ok=proc.returncode == 0 and table and bool(seen), sees=short(seen, tmp))


def damaged_cache(tmp, cfg, reference):
    cache = os.path.join(tmp, 'cache_damaged')
    sets = ['--set', f'process.cache_dir={cache}', 'process.cache_calibration=true']
    cli('--config', cfg, '--output', os.path.join(tmp, 'cache_first'), *sets)
    entry = next(os.path.join(cache, f) for f in os.listdir(cache) if f.startswith('calibration_'))
    torch.save({'x': Payload()}, entry)
    out = os.path.join(tmp, 'cache_second')
    proc = cli('--config', cfg, '--output', out, *sets)
    warned = log_line(out, 'treated as a miss')
    return row('A hostile (pickle payload) calibration_<key>.pt in the cache folder', proc, tmp,
               kept=f'log: "{short(warned, tmp)}"; top-1 {top1(out)} (uncached {reference}); nothing executed',
               ok=proc.returncode == 0 and bool(warned) and top1(out) == reference
               and not os.path.exists('/tmp/mrecg_failures_pwned'))


def one_width_search(tmp, cfg):
    proc = cli('--config', cfg, '--output', os.path.join(tmp, 'bits_one_a'), '--set', 'mrecg.metric=none',
               'quantize.bit_search={candidates: {w: [2, 3, 4, 8], a: [4]}, budget: {avg_w_bits: 3}, samples: 32}')
    return row('A bit search with `candidates: {w: [2, 3, 4, 8], a: [4]}` (the A4 the user wants)', proc, tmp,
               kept='the weight bits searched with the default measure (fisher); every searched input at 4 bits',
               ok=proc.returncode == 0)


def hostile(tmp, cfg, reference):
    rows = [*config_cases(tmp, cfg), *full_disk(tmp, cfg, reference), spaces_in_paths(tmp, cfg, reference),
            symlink_loop(tmp), tuple_model(tmp, cfg), *damaged_exports(tmp), cut_off_results(tmp),
            damaged_cache(tmp, cfg, reference), one_width_search(tmp, cfg)]
    return [{**r, 'group': 'hostile'} for r in rows]


def row(scenario, proc, tmp, then=None, then_proc=None, kept='', ok=True, sees=None):
    seen = sees or short(last_line(proc.stderr) or last_line(proc.stdout), tmp)
    entry = {'scenario': scenario, 'exit_code': proc.returncode, 'user_sees': seen, 'nothing_lost': kept,
             'checked': bool(ok)}
    if then:
        entry.update(then=then, then_exit_code=then_proc.returncode,
                     then_sees=short(last_line(then_proc.stdout) or last_line(then_proc.stderr), tmp))
    return entry


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', default=os.path.join(ROOT, 'results', 'failure_scenarios.json'))
    p.add_argument('--child', choices=PHASES, help=argparse.SUPPRESS)
    p.add_argument('--only-hostile', action='store_true', help="rerun only the hostile-file scenarios; the other "
                   "rows are kept from --out")
    p.add_argument('rest', nargs='*', help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args.child, args.rest)
    tmp = tempfile.mkdtemp(prefix='mrecg_failures_')
    cfg = os.path.join(tmp, 'digits.yaml')
    yaml.safe_dump({**CONFIG, 'process': {**CONFIG['process'], 'cache_dir': os.path.join(tmp, 'cache')}},
                   open(cfg, 'w'))
    t0 = time.time()
    ref = cli('--config', cfg, '--output', os.path.join(tmp, 'reference'))
    if ref.returncode:
        print(ref.stderr, file=sys.stderr)
        return 1
    reference = top1(os.path.join(tmp, 'reference'))
    rows = [concurrent(tmp, cfg), *ctrl_c(tmp, cfg, reference), killed(tmp, cfg, reference),
            *(changed(tmp, cfg, what, reference) for what in CHANGES), overwrite_failure(tmp, cfg)] \
        if not args.only_hostile else [r for r in json.load(open(args.out))['rows'] if r.get('group') != 'hostile']
    rows += hostile(tmp, cfg, reference)
    record = {'command': 'python scripts/failure_scenarios.py', 'date': time.strftime('%Y-%m-%d'),
              'commit': git_commit(), 'machine': machine(), 'versions': versions(),
              'seconds': round(time.time() - t0), 'config': CONFIG, 'rows': rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_record(args.out, record)
    for r in rows:
        print(f'{"ok " if r["checked"] else "BAD"} {r["scenario"]}: exit {r["exit_code"]}: {r["user_sees"]}')
    shutil.rmtree(tmp, ignore_errors=True)
    print(f'wrote {args.out} ({record["seconds"]} s)')
    return 0 if all(r['checked'] for r in rows) else 1


if __name__ == '__main__':
    sys.exit(main())
