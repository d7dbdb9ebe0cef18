"""ptq_main.py end to end on digits: outputs, --plan, bad input, output protection, resume."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from mrecg import zoo
from conftest import ROOT, TINY, cli, deep_update, run_cli


def test_run_writes_results_config_log_and_plot(write_config, tmp_path, capsys):
    cfg = write_config({'mrecg': {'metric': 'modcap', 'k': 2}})
    out = str(tmp_path / 'run')
    code, stdout, err = cli(['--config', cfg, '--output', out, '--no-progress'], capsys)
    assert code == 0, err
    for name in ('results.json', 'results.csv', 'config.yaml', 'run.log', 'loss_curve.png', 'quantized_model.pt'):
        assert os.path.isfile(os.path.join(out, name)), name
    assert not os.path.exists(os.path.join(out, 'checkpoint.pt'))  # removed once finished
    r = json.load(open(os.path.join(out, 'results.json')))
    for key in ('fp_top1', 'fp_top5', 'quant_top1', 'quant_top5', 'method', 'w_bits', 'a_bits', 'seed', 'units'):
        assert key in r
    assert r['method'] == 'mrecg+qdrop' and (r['w_bits'], r['a_bits'], r['seed']) == (2, 4, 7)
    assert r['fp_top1'] > 90 and 0 <= r['quant_top1'] <= 100
    assert len(r['unit_losses']) == 9 and len(r['units']) == 7  # 9 base units, 2 pairs merged
    assert r['grouping']['k'] == 2 and r['grouping']['source'] == 'modcap solver'
    for unit in r['units']:  # a merged group gets the iterations of its units (mrecg.group_iterations)
        assert set(unit) >= {'name', 'modules', 'loss', 'iters', 'seconds'}
        assert unit['iters'] == 12 * len(unit['base_units'])
    assert r['loss_curve']['max_unit_loss'] == max(u['loss'] for u in r['unit_losses'])
    assert r['settings']['fold_bn'] is True
    assert 'quantized top-1' in stdout
    resolved = open(os.path.join(out, 'config.yaml')).read()
    assert 'iterations: 12' in resolved and 'scale_lr' in resolved  # defaults filled in


@pytest.mark.parametrize('name', zoo.list_models())
def test_plan_works_for_every_model(name, write_config, capsys):
    override = {'model': {'type': name, 'path': None, 'kwargs': {}}, 'mrecg': {'metric': 'modcap', 'k': 2}}
    if zoo.model_entry(name).image_size == 224:
        override['data'] = {'type': 'imagenet', 'path': None}
    code, out, err = cli(['--config', write_config(override), '--plan'], capsys)
    assert code == 0, err
    assert 'ModCap' in out and 'reconstruction units' in out
    n_units = len(zoo.build_model(name).unit_partition())
    assert f'({n_units} -> {n_units - 2})' in out


BAD_CONFIGS = [
    ({'quantize': {'reconstruction': {'iteration': 5}}}, "did you mean 'iterations'"),
    ({'quantize': {'cali_size': 'many'}}, 'quantize.cali_size must be integer'),
    ({'quantize': {'w_qconfig': {'bit': 9}}}, 'bit must be an integer in 2..8'),
    ({'quantize': {'a_qconfig': {'bit': 1}}}, 'bit must be an integer in 2..8'),
    ({'quantize': {'reconstruction': {'prob': 0}}}, 'prob must be in (0, 1]'),
    ({'quantize': {'reconstruction': {'prob': 1.5}}}, 'prob must be in (0, 1]'),
    ({'quantize': {'reconstruction': {'batch_size': 0}}}, 'batch_size must be > 0'),
    ({'quantize': {'cali_size': -4}}, 'cali_size must be > 0'),
    ({'quantize': {'cali_size': 5000}}, 'training split has 1297 images'),
    ({'mrecg': {'metric': 'modcap', 'k': 50}}, "at most 7 adjacent pairs can merge (the classifier's pair excluded)"),
    ({'mrecg': {'metric': 'modcap', 'k': 50, 'exclude_classifier': False}}, 'at most 8 adjacent pairs can merge'),
    ({'mrecg': {'metric': 'modcap', 'k': 0}}, 'mrecg.k is 0'),
    ({'mrecg': {'metric': 'capacity', 'k': 2}}, 'mrecg.metric must be one of'),
    ({'mrecg': {'scheme': [['features.3', 'features.99']]}}, "names 'features.99'"),
    ({'mrecg': {'scheme': [['features.3', 'features.5']]}}, 'not adjacent'),
    ({'mrecg': {'scheme': '[1, 2, (3, 3), 4]'}}, 'never evaluated'),
    ({'model': {'type': 'resnet19'}}, 'unknown model type'),
    ({'model': {'kwargs': {'depth': 3}}}, "takes no argument 'depth'"),
    ({'model': {'path': 'models/checkpoints/nope.pth'}}, 'checkpoint file not found'),
    ({'model': {'type': 'resnet18', 'kwargs': {'num_classes': 10, 'in_chans': 1}, 'units': None,
                'path': 'models/checkpoints/resnet18_digits.pth'}},
     'train it with: python scripts/train_small_models.py --dataset digits --models resnet18'),
    ({'model': {'type': 'resnet_small'}}, 'does not fit the model'),
    ({'model': {'units': [['features.0', 'features.1'], ['features.2', 'nothere']]}}, "module 'nothere'"),
    ({'data': {'type': 'imagenet', 'path': '/nonexistent/imagenet'}}, 'ImageNet folder not found'),
    ({'data': {'type': 'fashion_mnist', 'path': '/nonexistent/fmnist'}}, 'not found in /nonexistent/fmnist'),
    ({'data': {'type': 'cifar'}}, 'data.type must be one of'),
]


@pytest.mark.parametrize('override,message', BAD_CONFIGS)
def test_bad_input_gives_one_line_and_exit_2(override, message, write_config, tmp_path, capsys):
    code, out, err = cli(['--config', write_config(override), '--output', str(tmp_path / 'o'), '--no-progress'],
                         capsys)
    assert code == 2
    assert message in err, err
    assert err.strip().count('\n') == 0 and 'Traceback' not in err
    assert not os.path.exists(tmp_path / 'o' / 'results.json')


@pytest.mark.parametrize('args,message', [
    (['--config', 'configs/does_not_exist.yaml'], 'config file not found'),
    ([], 'give either --config or --resume'),
    (['--config', 'x.yaml', '--set', 'quantize'], 'expects key=value'),
    (['--resume', '/nonexistent/run'], 'has no config.yaml'),
])
def test_bad_command_lines(args, message, capsys, tmp_path, write_config):
    args = [write_config() if a == 'x.yaml' else a for a in args]
    code, _, err = cli(args, capsys)
    assert code == 2 and message in err and err.strip().count('\n') == 0


def test_invalid_yaml_names_the_line(tmp_path, capsys):
    path = tmp_path / 'bad.yaml'
    path.write_text('model:\n  type: resnet18\n  kwargs: {a: 1\n')
    code, _, err = cli(['--config', str(path)], capsys)
    assert code == 2 and 'invalid YAML' in err and 'line' in err


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the no-GPU message')
def test_cuda_asked_for_but_absent(write_config, tmp_path, capsys):
    code, _, err = cli(['--config', write_config(), '--output', str(tmp_path / 'o'), '--device', 'cuda'], capsys)
    assert code == 2 and 'no CUDA device' in err


def test_loss_metric_plan_without_cache_says_what_to_do(write_config, tmp_path, capsys):
    cfg = write_config({'mrecg': {'metric': 'loss', 'k': 2}, 'process': {'cache_dir': str(tmp_path / 'cache')}})
    code, _, err = cli(['--config', cfg, '--plan'], capsys)
    assert code == 2 and 'run without --plan once' in err


def test_grouping_options_in_plan_and_their_errors(write_config, capsys):
    paper = write_config({'mrecg': {'metric': 'modcap', 'k': 3, 'difference': 'squared', 'exclude_classifier': False,
                                    'group_iterations': 'one_unit'}})
    safe = write_config({'mrecg': {'metric': 'modcap', 'k': 3}}, 'safe.yaml')  # the defaults: the measured safe rule
    code, out_paper, err = cli(['--config', paper, '--plan'], capsys)
    assert code == 0 and 'G3     features.9,classifier' in out_paper, err  # the paper's rule merges it here
    assert 'difference' not in out_paper.splitlines()[1]  # the paper's rule: no option to report
    code, out, err = cli(['--config', safe, '--plan'], capsys)
    assert code == 0 and 'difference log, exclude_classifier True, group_iterations per_unit' in out, err
    assert '(9 -> 6)' in out
    last = next(line for line in out.splitlines() if 'features.9,classifier' in line)
    assert ' G' not in last
    too_many = write_config({'mrecg': {'metric': 'modcap', 'k': 8, 'exclude_classifier': True}}, 'k8.yaml')
    code, _, err = cli(['--config', too_many, '--plan'], capsys)
    assert code == 2 and "at most 7 adjacent pairs can merge (the classifier's pair excluded)" in err
    auto_lam = write_config({'mrecg': {'metric': 'modcap', 'k': 'auto', 'lam': 0.5}}, 'auto_lam.yaml')
    code, _, err = cli(['--config', auto_lam, '--plan'], capsys)
    assert code == 2 and 'mrecg.k' in err and 'drop mrecg.lam' in err


def test_finished_folder_is_never_silently_overwritten(write_config, tmp_path, capsys):
    cfg = write_config({'quantize': {'reconstruction': {'enabled': False}}})
    out = str(tmp_path / 'run')
    assert cli(['--config', cfg, '--output', out, '--no-progress'], capsys)[0] == 0
    first = open(os.path.join(out, 'results.json')).read()
    open(os.path.join(out, 'model.onnx'), 'w').write('from an earlier --export')
    code, _, err = cli(['--config', cfg, '--output', out, '--no-progress'], capsys)
    assert code == 2 and 'already holds a finished run' in err
    assert open(os.path.join(out, 'results.json')).read() == first
    assert cli(['--config', cfg, '--output', out, '--no-progress', '--overwrite'], capsys)[0] == 0
    assert not os.path.exists(os.path.join(out, 'model.onnx'))  # no stale export beside the new run


def test_calibration_cache_gives_identical_results(write_config, tmp_path, capsys):
    cache = str(tmp_path / 'cache')
    cfg = write_config({'process': {'cache_dir': cache, 'cache_calibration': True}})
    runs = []
    for name in ('first', 'second'):
        assert cli(['--config', cfg, '--output', str(tmp_path / name), '--no-progress'], capsys)[0] == 0
        runs.append(json.load(open(tmp_path / name / 'results.json')))
    assert [f for f in os.listdir(cache) if f.startswith('calibration_')]
    assert 'reused the cached quantizer ranges' in open(tmp_path / 'second' / 'run.log').read()
    _same_results(runs[0], runs[1])


def test_loss_metric_probe_is_cached_and_reused(write_config, tmp_path, capsys):
    cache = str(tmp_path / 'cache')
    cfg = write_config({'mrecg': {'metric': 'loss', 'k': 2, 'probe_iterations': 5}, 'process': {'cache_dir': cache}})
    assert cli(['--config', cfg, '--output', str(tmp_path / 'a'), '--no-progress'], capsys)[0] == 0
    r = json.load(open(tmp_path / 'a' / 'results.json'))
    assert r['grouping']['source'] == 'loss solver' and len(os.listdir(cache)) == 1
    assert [u['plain_loss'] for u in r['unit_losses']] == r['grouping']['metric_values']
    # sweeping k reuses the cached probe losses, and --plan can now show them
    cfg3 = write_config({'mrecg': {'metric': 'loss', 'k': 3, 'probe_iterations': 5}, 'process': {'cache_dir': cache}},
                        'k3.yaml')
    code, out, err = cli(['--config', cfg3, '--plan'], capsys)
    assert code == 0 and '(9 -> 6)' in out, err
    # k: auto merges one pair per fall of the cached curve; only falls, never the classifier's unit
    losses = r['grouping']['metric_values']
    falls = [i for i in range(len(losses) - 2) if losses[i] > losses[i + 1]]
    auto = write_config({'mrecg': {'metric': 'loss', 'k': 'auto', 'pairs': 'falls', 'exclude_classifier': True,
                                   'probe_iterations': 5}, 'process': {'cache_dir': cache}}, 'auto.yaml')
    code, out, err = cli(['--config', auto, '--plan'], capsys)
    assert code == 0 and f'(9 -> {9 - len(falls)})' in out and '(auto: one per fall)' in out, err
    grouped = [line.split()[0] for line in out.splitlines() if ' G' in line and line.strip()[:1].isdigit()]
    assert grouped and '8' not in grouped  # the last unit (features.9+classifier) stays alone


def _state_results(out):
    path = os.path.join(out, 'checkpoint.pt')
    try:
        return len(torch.load(path, weights_only=True)['results'])
    except Exception:  # not written yet, or being replaced
        return -1


def _start(cfg, out):
    # SIGINT back to its default in the child: a shell runs background jobs with it ignored, and Python then
    # installs no KeyboardInterrupt handler (pytest started with `&` made the SIGINT test fail for that reason)
    return subprocess.Popen([sys.executable, os.path.join(ROOT, 'ptq_main.py'), '--config', cfg, '--output', out,
                             '--no-progress'], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for_units(proc, out, units, timeout=240):
    t0 = time.time()
    while _state_results(out) < units:
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout
        time.sleep(0.05)
    time.sleep(0.3)  # now inside the next unit's optimisation


RESUME = {'quantize': {'reconstruction': {'iterations': 100}}, 'mrecg': {'metric': 'modcap', 'k': 2}}


def _same_results(a, b):
    for key in ('fp_top1', 'quant_top1', 'quant_top5'):
        assert a[key] == b[key]
    assert [u['loss'] for u in a['unit_losses']] == [u['loss'] for u in b['unit_losses']]
    assert [(u['name'], u['loss'], u['iters']) for u in a['units']] == [(u['name'], u['loss'], u['iters'])
                                                                         for u in b['units']]


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
    folder = tmp_path_factory.mktemp('resume')
    cfg = folder / 'cfg.yaml'
    import yaml
    cfg.write_text(yaml.safe_dump(deep_update(TINY, RESUME)))
    out = str(folder / 'full')
    proc = run_cli('--config', str(cfg), '--output', out, '--no-progress')
    assert proc.returncode == 0, proc.stderr
    return str(cfg), json.load(open(os.path.join(out, 'results.json')))


def test_sigkill_mid_unit_then_resume_equals_uninterrupted(uninterrupted, tmp_path):
    cfg, full = uninterrupted
    out = str(tmp_path / 'killed')
    proc = _start(cfg, out)
    _wait_for_units(proc, out, 2)
    proc.kill()
    proc.wait()
    assert not os.path.exists(os.path.join(out, 'results.json'))
    resumed = run_cli('--resume', out, '--no-progress')
    assert resumed.returncode == 0, resumed.stderr
    r = json.load(open(os.path.join(out, 'results.json')))
    assert r['resumed'] is True
    _same_results(r, full)


def test_sigint_leaves_a_resumable_folder(uninterrupted, tmp_path):
    cfg, full = uninterrupted
    out = str(tmp_path / 'interrupted')
    proc = _start(cfg, out)
    _wait_for_units(proc, out, 1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert f'--resume {out}' in err
    assert _state_results(out) >= 1
    again = run_cli('--config', cfg, '--output', out, '--no-progress')
    assert again.returncode == 2 and 'unfinished run' in again.stderr
    resumed = run_cli('--resume', out, '--no-progress')
    assert resumed.returncode == 0, resumed.stderr
    _same_results(json.load(open(os.path.join(out, 'results.json'))), full)


def test_nan_accuracy_is_never_written(write_config, tmp_path, capsys, monkeypatch):
    from mrecg import metrics
    from mrecg.evaluation import Accuracy
    real = metrics.evaluate

    def quantized_eval_goes_nan(model, batches, device, desc='eval', *args):
        return Accuracy(None, None, 200, 4) if 'quantized' in desc else real(model, batches, device, desc, *args)
    monkeypatch.setattr(metrics, 'evaluate', quantized_eval_goes_nan)
    out = tmp_path / 'nan'
    assert cli(['--config', write_config(), '--output', str(out), '--no-progress'], capsys)[0] == 0
    text = (out / 'results.json').read_text()
    assert 'NaN' not in text
    r = json.loads(text)
    assert r['quant_top1'] is None and any('non-finite logits' in w for w in r['warnings'])


def test_evaluate_reports_no_accuracy_for_nan_logits():
    from mrecg.evaluation import evaluate

    class Nan(torch.nn.Module):
        def forward(self, x):
            return torch.full((len(x), 10), float('nan'))
    acc = evaluate(Nan(), [(torch.zeros(4, 1), torch.zeros(4, dtype=torch.long))], torch.device('cpu'),
                   progress=False)
    assert acc.top1 is None and acc.nonfinite_batches == 1
