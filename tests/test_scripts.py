"""Shipped configs, the sweep and the results collector."""
import csv
import glob
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from mrecg.cli import main

CONFIGS = sorted(p for p in glob.glob(os.path.join(ROOT, 'configs', '**', '*.yaml'), recursive=True)
                 if '_base_' not in p)


def test_every_paper_setting_is_shipped():
    names = {os.path.relpath(p, os.path.join(ROOT, 'configs')) for p in CONFIGS}
    for method in ('brecq', 'qdrop'):
        for model in ('res18', 'res50', 'mbv2', 'mbv2_075', 'mbv2_05', 'mbv2_035', 'reg600'):
            for bits in ('4_4', '2_4', '3_3', '2_2'):
                assert f'{method}/{model}_{bits}.yaml' in names


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: os.path.relpath(p, os.path.join(ROOT, 'configs')))
def test_config_validates_with_plan(path, capsys):
    assert main(['--config', path, '--plan']) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert 'reconstruction units' in out


def test_paper_config_without_paths_says_what_to_set(tmp_path, capsys):
    code = main(['--config', os.path.join(ROOT, 'configs', 'qdrop', 'res18_2_4.yaml'), '--output', str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and 'model.path is not set' in err


def _script(name, *args):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', name), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def _mrecg(*args):
    """The installed ``mrecg`` command, as ``python -m mrecg``."""
    return subprocess.run([sys.executable, '-m', 'mrecg', *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def test_sweep_then_collect_on_digits(tmp_path):
    out = str(tmp_path / 'sweep')
    args = ['--configs', 'configs/digits/mbv2_2_4.yaml', '--bits', '2_4', '--methods', 'qdrop', 'mrecg+qdrop',
            'mqbench-qdrop', '--grouping', 'modcap', '--k', '2', '--seeds', '1', '2', '--out', out, '--set',
            'quantize.reconstruction.iterations=4', 'quantize.cali_size=64', 'data.eval_limit=100',
            'data.batch_size=64']
    first = _mrecg('sweep', *args)
    assert first.returncode == 0, first.stdout + first.stderr
    assert '6 run, 0 already finished, 0 failed' in first.stdout
    found = sorted(os.path.relpath(p, out) for p in glob.glob(os.path.join(out, '**', 'results.json'), recursive=True))
    assert found == [f'digits_mbv2_2_4_w2a4/{m}/seed{s}/results.json' for m in
                     ('mqbench-qdrop', 'mrecg+qdrop_modcap_k2', 'qdrop') for s in (1, 2)]
    again = _mrecg('sweep', *args)
    assert again.returncode == 0 and '0 run, 6 already finished' in again.stdout

    table = _mrecg('collect', out)
    assert table.returncode == 0, table.stderr
    md = open(os.path.join(out, 'table.md')).read()
    top1_table = md.split('Max per-unit reconstruction loss')[0]
    lines = [line for line in top1_table.splitlines() if line.startswith('|')]
    assert lines[2].startswith('| Full Prec. | 32/32 |')
    rows = {line.split('|')[1].strip(): line for line in lines[3:]}
    assert {'QDrop', 'MRECG(ModCap, k=2)+QDrop', 'MQBench QDrop'} <= set(rows)
    assert '±' in rows['QDrop']
    assert '(+' in rows['MRECG(ModCap, k=2)+QDrop'] or '(-' in rows['MRECG(ModCap, k=2)+QDrop']
    with open(os.path.join(out, 'table.csv')) as f:
        records = list(csv.DictReader(f))
    by_method = {r['method']: r for r in records}
    qdrop = [json.load(open(os.path.join(out, f'digits_mbv2_2_4_w2a4/qdrop/seed{s}/results.json')))['quant_top1']
             for s in (1, 2)]
    assert float(by_method['QDrop']['top1_mean']) == pytest.approx(sum(qdrop) / 2)
    mrecg = float(by_method['MRECG(ModCap, k=2)+QDrop']['top1_mean'])
    assert float(by_method['MRECG(ModCap, k=2)+QDrop']['delta_vs_plain']) == pytest.approx(mrecg - sum(qdrop) / 2)
    assert by_method['QDrop']['n'] == '2'

    # the loss curves: one plot for the setting, numbers averaged over the seeds
    assert os.path.isfile(os.path.join(out, 'table_curves_mobilenet_v2_small_digits_w2a4.png'))
    curves = open(os.path.join(out, 'table_curves.md')).read()
    qdrop_row = next(line for line in curves.splitlines() if line.startswith('| QDrop |'))
    runs = [json.load(open(os.path.join(out, f'digits_mbv2_2_4_w2a4/qdrop/seed{s}/results.json'))) for s in (1, 2)]
    first_unit = sum(r['unit_losses'][0]['loss'] for r in runs) / 2
    assert qdrop_row.split('|')[2].strip() == f'{first_unit:.3g}'
    assert '| MRECG(ModCap, k=2)+QDrop |' in curves


def test_kernel_benchmark_prints_every_figure():
    run = _script('bench_kernels.py', '--threads', '1', '--min-time', '0.01')
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    lines = run.stdout.splitlines()
    for head, count in [('32x192x4x4', 5), ('QDrop mask', 3), ('AdaRound soft weight', 2), ('|t|^8', 2),
                        ('depthwise 3x3 conv', 2)]:
        line = next(line for line in lines if line.startswith(head))
        figures = [float(part.split()[-1]) for part in line.split('): ')[1].split(', ')]
        assert len(figures) == count and all(f > 0 for f in figures), line
    bad = _script('bench_kernels.py', '--min-time', '0')
    assert bad.returncode == 2 and bad.stderr.strip() == 'error: --threads must be >= 1 and --min-time > 0'


def test_reconstruction_benchmark_bad_input_is_one_line():
    run = _mrecg('bench', '--config', 'configs/digits/mbv2_2_4.yaml', '--set',
                  'model.path=models/checkpoints/nope.pth')
    assert run.returncode == 2, run.stdout + run.stderr
    assert 'checkpoint file not found' in run.stderr and 'Traceback' not in run.stderr
    assert run.stderr.strip().count('\n') == 0


def test_reconstruction_benchmark_runs_both_engines():
    """The benchmark drives the engine's internals; it must keep working when they change."""
    run = _mrecg('bench', '--config', 'configs/digits/mbv2_2_4.yaml', '--iters', '2', '--warmup', '1',
                  '--seeds', '1', '2', '--set', 'quantize.cali_size=64', 'data.eval_limit=64', 'data.batch_size=64')
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    table = {line.split()[0]: line.split() for line in run.stdout.splitlines()
             if line.startswith(('mqbench ', 'ours ')) and 'seeds:' not in line}  # the last seed's table
    assert set(table) == {'mqbench', 'ours'}
    assert int(table['ours'][1]) == 9 and int(table['mqbench'][1]) == 10  # our units vs MQBench's extract_block
    assert float(table['ours'][5]) > 0 and float(table['mqbench'][5]) > 0  # achieved GFLOP/s were counted
    assert run.stdout.strip().splitlines()[-1].startswith('speedup ')
    assert 'warm-up (1 iterations per unit' in run.stdout
    assert sum(line.startswith(('mqbench  2 seeds:', 'ours     2 seeds:')) for line in run.stdout.splitlines()) == 2
    caches = [line for line in run.stdout.splitlines() if 'cached activations after each unit' in line]
    assert len(caches) == 2 and len(caches[0].split('exact): ')[1].split(';')[0].split()) == 9  # one figure per unit


def test_ray_sweep_matches_serial_and_reports_failures(tmp_path):
    bad = tmp_path / 'bad.yaml'
    bad.write_text('_base_: ' + os.path.join(ROOT, 'configs', 'digits', 'mbv2_2_4.yaml') + '\n'
                   'model: {path: models/checkpoints/missing.pth}\n')
    args = ['--configs', 'configs/digits/mbv2_2_4.yaml', '--methods', 'qdrop', '--seeds', '1', '2', '--set',
            'quantize.reconstruction.iterations=20', 'quantize.cali_size=64', 'data.eval_limit=100',
            'data.batch_size=64']
    serial = _mrecg('sweep', *args, '--out', str(tmp_path / 'serial'))
    assert serial.returncode == 0, serial.stdout + serial.stderr
    ray = _mrecg('sweep', *args[:2], str(bad), *args[2:], '--out', str(tmp_path / 'ray'), '--ray')
    assert ray.returncode == 1, ray.stdout + ray.stderr
    assert '2 run, 0 already finished, 2 failed' in ray.stdout, ray.stdout + ray.stderr[-3000:]
    failed = ray.stdout.split(' failed in ')[1]
    assert 'bad/qdrop/seed' in failed and 'failed (exit 2): error: checkpoint file not found' in failed
    for seed in (1, 2):
        one, two = (json.load(open(tmp_path / kind / 'digits_mbv2_2_4' / 'qdrop' / f'seed{seed}' / 'results.json'))
                    for kind in ('serial', 'ray'))
        assert two['quant_top1'] == one['quant_top1']
        # each task runs 1 torch thread, the serial run 2: CPU reductions split by thread may differ in the last bits
        assert [u['loss'] for u in two['units']] == pytest.approx([u['loss'] for u in one['units']], rel=1e-4)
    again = _mrecg('sweep', *args, '--out', str(tmp_path / 'ray'), '--ray')
    assert again.returncode == 0 and '0 run, 2 already finished' in again.stdout and 'ray:' not in again.stdout


def test_bench_synthetic_mode_times_both_engines_on_random_images():
    run = _mrecg('bench', '--synthetic', 'resnet_small', '--batch', '4', '--iters', '1',
                  '--input-size', '28')
    assert run.returncode == 0, run.stderr
    rows = [line.split() for line in run.stdout.splitlines() if line.startswith('resnet_small ') and 'speedup' not in line]
    assert [r[2] for r in rows] == ['mqbench', 'ours']
    for r in rows:
        units, ms_per_unit, tflops, hours = int(r[3]), float(r[4]), float(r[7]), float(r[9])
        # a printed figure, not a timing check: on a tiny model a step is within the timer's noise
        assert units == 8 and ms_per_unit >= 0 and tflops > 0 and hours > 0
    assert 'resnet_small batch 4: speedup per step' in run.stdout


def test_sweep_variants_are_named_folders_and_bad_ones_are_refused(tmp_path):
    out = str(tmp_path / 'v')
    run = _mrecg('sweep', '--configs', 'configs/digits/mbv2_2_4.yaml', '--methods', 'qdrop', 'mrecg+qdrop',
                  '--variant', 'safe', 'mrecg.exclude_classifier=true', 'mrecg.difference=log',
                  '--variant', 'auto', 'mrecg.metric=loss', 'mrecg.k=auto', '--seeds', '1', '--out', out, '--dry-run')
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert len(lines) == 3  # qdrop once, each variant of the MRECG method once (no 'config' grouping)
    safe = next(line for line in lines if '/mrecg+qdrop_safe/seed1' in line)
    assert 'mrecg.exclude_classifier=true mrecg.difference=log' in safe
    assert any('/mrecg+qdrop_auto/seed1' in line and 'mrecg.k=auto' in line for line in lines)
    bad = _mrecg('sweep', '--configs', 'configs/digits/mbv2_2_4.yaml', '--variant', 'safe', 'exclude',
                  '--out', out, '--dry-run')
    assert bad.returncode == 2 and '--variant takes a name then KEY=VALUE overrides' in bad.stderr


def test_scheme_study_runs_random_schemes_and_correlates(tmp_path):
    out = str(tmp_path / 'schemes')
    args = ['--config', 'configs/digits/mbv2_2_4.yaml', '--schemes', '3', '--seeds', '1', '--out', out, '--set',
            'quantize.reconstruction.iterations=4', 'quantize.cali_size=64', 'data.eval_limit=100',
            'data.batch_size=64', 'mrecg.probe_iterations=4', f'process.cache_dir={tmp_path / "cache"}']
    run = _mrecg('study', 'schemes', *args)
    assert run.returncode == 0, run.stdout + run.stderr
    for name in ('schemes.md', 'schemes.csv', 'chain.png'):
        assert os.path.isfile(os.path.join(out, name)), name
    assert 'final vs max previous loss: Pearson' in run.stdout and 'Pareto front' in run.stdout
    with open(os.path.join(out, 'schemes.csv')) as f:
        rows = list(csv.DictReader(f))
    assert sorted(r['scheme'] for r in rows) == ['loss', 'modcap', 'plain', 'random00', 'random01', 'random02']
    by = {r['scheme']: r for r in rows}
    assert by['plain']['merged_pairs'] == '0' and by['modcap']['merged_pairs'] == '3'  # the config's k = 3
    for r in rows:  # each row is its run's own numbers
        res = json.load(open(os.path.join(out, r['scheme'], 'seed1', 'results.json')))
        losses = [u['loss'] for u in res['unit_losses']]
        assert float(r['top1']) == pytest.approx(res['quant_top1'])
        assert float(r['final_loss']) == pytest.approx(losses[-1])
        assert float(r['max_previous_loss']) == pytest.approx(max(losses[:-1]))
        assert int(r['merged_pairs']) == sum(b - a for a, b in res['grouping']['spans'])
    randoms = [by[f'random0{i}']['groups'] for i in range(3)]
    assert len(set(randoms)) == 3 and all(g != '-' for g in randoms)
    best = max(rows, key=lambda r: (float(r['top1']), -int(r['merged_pairs'])))
    assert best['pareto'] == 'True'
    before = open(os.path.join(out, 'schemes.csv')).read()
    again = _mrecg('study', 'schemes', *args)  # finished runs are reused: the same table, nothing rerun
    assert again.returncode == 0 and 'running' not in again.stdout
    assert open(os.path.join(out, 'schemes.csv')).read() == before


@pytest.mark.parametrize('study,expected', [
    ('components', ['plain', 'grouping', 'expansion', 'both']),
    ('batch', ['together_x1', 'together_x2', 'images_x2', 'batch_x2'])])
def test_ablation_study_runs_each_variant_with_its_sizes(study, expected, tmp_path):
    out = str(tmp_path / study)
    run = _mrecg('study', 'ablation', '--config', 'configs/digits/resnet_2_4.yaml', '--study', study,
                  '--factors', '1', '2', '--expand', '2', '--seeds', '1', '--out', out, '--set',
                  'quantize.reconstruction.iterations=4', 'quantize.cali_size=64', 'data.eval_limit=100',
                  'data.batch_size=64', 'quantize.reconstruction.batch_size=16')
    assert run.returncode == 0, run.stdout + run.stderr
    assert os.path.isfile(os.path.join(out, 'ablation.png')) and os.path.isfile(os.path.join(out, 'ablation.md'))
    with open(os.path.join(out, 'ablation.csv')) as f:
        rows = {r['variant']: r for r in csv.DictReader(f)}
    assert list(rows) == expected
    for name, r in rows.items():
        res = json.load(open(os.path.join(out, name, 'seed1', 'results.json')))
        settings = res['settings']
        assert (int(r['cali_size']), int(r['batch_size'])) == (settings['cali_size'],
                                                               settings['reconstruction']['batch_size'])
        assert float(r['top1']) == pytest.approx(res['quant_top1'])
    if study == 'components':
        assert (rows['plain']['merged_pairs'], rows['expansion']['merged_pairs']) == ('0', '0')
        assert int(rows['grouping']['merged_pairs']) == int(rows['both']['merged_pairs']) == 3
        assert (rows['both']['cali_size'], rows['both']['batch_size']) == ('128', '32')
    else:
        assert (rows['images_x2']['cali_size'], rows['images_x2']['batch_size']) == ('128', '16')
        assert (rows['batch_x2']['cali_size'], rows['batch_x2']['batch_size']) == ('64', '32')
