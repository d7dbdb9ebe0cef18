"""Runs that never mix, never lose finished work and never reuse a stale cache (issue 27): the folder lock,
the phased checkpoint (calibration, probe, reconstruction), fingerprints checked on resume, --overwrite
that keeps the previous results, content-keyed caches, and the API's contract."""
import ast
import copy
import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch
import yaml

import mrecg
from conftest import ROOT, TINY, cli, deep_update
from mrecg import runner
from mrecg.caching import RunCache, environment
from mrecg.cli import main, summary_line
from mrecg.data import TensorData, digits
from mrecg.distributed import Dist
from mrecg.errors import UserError
from mrecg.locking import LOCK_NAME, FolderBusy, FolderLock

THIS = os.path.abspath(__file__)
DATA_FILE = 'calib_images.pt'


def write(tmp_path, override=None, name='cfg.yaml'):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(deep_update(TINY, override or {})))
    return str(path)


def results(folder):
    return json.loads(open(os.path.join(folder, 'results.json')).read())


def interrupt_after(monkeypatch, phase, count):
    """Ctrl-C (KeyboardInterrupt) right after the ``count``-th checkpoint of ``phase`` is written."""
    real, seen = runner.save_state, []

    def save(output, digest, state):
        real(output, digest, state)
        seen.append(state.phase)
        if seen.count(phase) == count:
            raise KeyboardInterrupt
    monkeypatch.setattr(runner, 'save_state', save)


def same_numbers(a, b):
    assert a['quant_top1'] == b['quant_top1'] and a['fp_top1'] == b['fp_top1']
    assert [u['loss'] for u in a['unit_losses']] == [u['loss'] for u in b['unit_losses']]
    assert a['grouping']['groups'] == b['grouping']['groups']


# ---- the folder lock ----------------------------------------------------------------------------------
def test_a_second_holder_is_refused_naming_the_first(tmp_path):
    with FolderLock(str(tmp_path), command='ptq_main.py --config a.yaml --set seed=1'):
        with pytest.raises(FolderBusy) as exc:
            FolderLock(str(tmp_path)).__enter__()
        assert f'pid {os.getpid()}' in str(exc.value) and 'a.yaml' in str(exc.value)
        assert 'does not depend on --set' in str(exc.value)
    assert not os.path.exists(tmp_path / LOCK_NAME)  # released and removed
    with FolderLock(str(tmp_path)) as again:  # free again
        assert again.taken_over is None


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({'pid': 999999, 'host': 'h', 'started': 0, 'command': 'old run'}))
    with FolderLock(str(tmp_path)) as lock:
        assert lock.taken_over and 'pid 999999' in lock.taken_over and 'old run' in lock.taken_over
        assert json.loads((tmp_path / LOCK_NAME).read_text())['pid'] == os.getpid()


def test_a_second_launch_into_a_running_folder_is_refused(tmp_path):
    cfg = write(tmp_path, {'quantize': {'reconstruction': {'iterations': 150}}})
    out = str(tmp_path / 'run')
    first = subprocess.Popen([sys.executable, os.path.join(ROOT, 'ptq_main.py'), '--config', cfg, '--output', out,
                              '--no-progress'], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not os.path.exists(os.path.join(out, LOCK_NAME)):
        assert first.poll() is None and time.time() - t0 < 120, first.communicate()
        time.sleep(0.05)
    second = subprocess.run([sys.executable, os.path.join(ROOT, 'ptq_main.py'), '--config', cfg, '--output', out,
                             '--no-progress', '--overwrite'], cwd=ROOT, capture_output=True, text=True)
    assert second.returncode == 2 and 'is in use by another run (pid' in second.stderr, second.stderr
    assert second.stderr.strip().count('\n') == 0
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert results(out)['settings']['reconstruction']['iterations'] == 150


# ---- the checkpoint: config from memory, phases, fingerprints -------------------------------------------
def test_the_checkpoint_digests_the_config_in_memory_not_the_file(tmp_path, capsys, monkeypatch):
    """Another writer replacing config.yaml mid-run (what two runs in one folder did) cannot make --resume
    continue this run's units under the other config."""
    cfg = write(tmp_path, {'mrecg': {'metric': 'modcap', 'k': 2}})
    out = tmp_path / 'run'
    real = runner.save_state

    def save(output, digest, state):
        if state.phase == 'calibrated':
            (out / 'config.yaml').write_text((out / 'config.yaml').read_text().replace('iterations: 12',
                                                                                      'iterations: 13'))
        real(output, digest, state)
        if len(state.results) == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(runner, 'save_state', save)
    assert cli(['--config', cfg, '--output', str(out), '--no-progress'], capsys)[0] == 130
    monkeypatch.setattr(runner, 'save_state', real)
    code, _, err = cli(['--resume', str(out), '--no-progress'], capsys)
    assert code == 2 and 'does not belong to' in err


def test_the_folder_is_resumable_from_its_first_second(tmp_path, capsys, monkeypatch):
    """Interrupted before calibration finished: the folder is an unfinished run, --resume starts it over."""
    cfg = write(tmp_path)
    out = str(tmp_path / 'run')
    from mrecg import api
    monkeypatch.setattr(api, 'calibrate', lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    code, _, err = cli(['--config', cfg, '--output', out, '--no-progress'], capsys)
    assert code == 130 and f'--resume {out}' in err
    code, _, err = cli(['--config', cfg, '--output', out, '--no-progress'], capsys)
    assert code == 2 and 'unfinished run' in err
    monkeypatch.undo()
    assert cli(['--resume', out, '--no-progress'], capsys)[0] == 0
    full = str(tmp_path / 'full')
    assert cli(['--config', cfg, '--output', full, '--no-progress'], capsys)[0] == 0
    same_numbers(results(out), results(full))


@pytest.fixture(scope='module')
def probe_reference(tmp_path_factory):
    """An uninterrupted run with the loss metric (its probe is a plain reconstruction)."""
    folder = tmp_path_factory.mktemp('probe')
    override = {'mrecg': {'metric': 'loss', 'k': 2, 'probe_iterations': 6},
                'process': {'cache_dir': str(folder / 'unused')}}
    cfg = write(folder, override)
    assert main(['--config', cfg, '--output', str(folder / 'full'), '--no-progress']) == 0
    return override, results(str(folder / 'full'))


def test_an_interrupted_probe_resumes_unit_by_unit(probe_reference, tmp_path, capsys, monkeypatch):
    override, full = probe_reference
    override = deep_update(override, {'process': {'cache_dir': str(tmp_path / 'cache')}})
    cfg = write(tmp_path, override)
    out = str(tmp_path / 'run')
    interrupt_after(monkeypatch, 'probe', 4)
    code, _, err = cli(['--config', cfg, '--output', out, '--no-progress'], capsys)
    assert code == 130 and f'--resume {out}' in err
    state = torch.load(os.path.join(out, 'checkpoint.pt'), weights_only=True)
    assert state['phase'] == 'probe' and len(state['probe']['results']) == 4
    monkeypatch.undo()
    assert cli(['--resume', out, '--no-progress'], capsys)[0] == 0
    assert 'resumed after 4 units' in open(os.path.join(out, 'run.log')).read()
    r = results(out)
    same_numbers(r, full)
    assert r['grouping']['metric_values'] == full['grouping']['metric_values']


def make_data(split, folder):
    """A data factory whose calibration images live in a file the test can change."""
    if split == 'train':
        return TensorData(torch.load(os.path.join(folder, DATA_FILE), weights_only=True))
    return digits('val', 0)


def factory_config(tmp_path, extra=None):
    torch.save(digits('train', 0).images[:200].clone(), tmp_path / DATA_FILE)
    ckpt = tmp_path / 'weights.pth'
    ckpt.write_bytes(open(os.path.join(ROOT, TINY['model']['path']), 'rb').read())
    override = {'data': {'type': f'{THIS}:make_data', 'kwargs': {'folder': str(tmp_path)}},
                'model': {'path': str(ckpt)}, 'process': {'cache_dir': str(tmp_path / 'cache'),
                                                         'cache_calibration': True}}
    return write(tmp_path, deep_update(override, extra or {})), ckpt


def change_images(tmp_path):
    images = torch.load(tmp_path / DATA_FILE, weights_only=True)
    torch.save(images + 0.01, tmp_path / DATA_FILE)  # every image: the draw of 64 of them sees it


def change_weights(ckpt):
    sd = torch.load(ckpt, weights_only=True)
    name = next(k for k, v in sd.items() if v.is_floating_point() and v.dim() == 4)
    sd[name] = sd[name] * 1.01
    torch.save(sd, ckpt)


def interrupted_factory_run(tmp_path, capsys, monkeypatch, units: int):
    """A data-factory run Ctrl-C'd after ``units`` reconstructed units: (its checkpoint file, its folder)."""
    cfg, ckpt = factory_config(tmp_path)
    out = str(tmp_path / 'run')
    interrupt_after(monkeypatch, 'reconstruction', units)
    assert cli(['--config', cfg, '--output', out, '--no-progress'], capsys)[0] == 130
    monkeypatch.undo()
    return ckpt, out


@pytest.mark.parametrize('change', ['weights', 'images'])
def test_resume_is_refused_when_the_weights_or_the_images_changed(change, tmp_path, capsys, monkeypatch):
    ckpt, out = interrupted_factory_run(tmp_path, capsys, monkeypatch, 2)
    change_weights(ckpt) if change == 'weights' else change_images(tmp_path)
    code, _, err = cli(['--resume', out, '--no-progress'], capsys)
    what = 'float weights' if change == 'weights' else 'calibration images'
    assert code == 2 and f'the {what} differ from those this run started with' in err, err


class NotATensor:
    """Loading a pickle of this would import and build it: what weights_only refuses."""


@pytest.mark.parametrize('damage', ['cut', 'missing key', 'code'])
def test_a_damaged_saved_state_is_refused_in_one_line(damage, tmp_path, capsys, monkeypatch):
    """checkpoint.pt cut short, missing a field (same format and config), or a pickle that would run code."""
    _, out = interrupted_factory_run(tmp_path, capsys, monkeypatch, 1)
    path = os.path.join(out, 'checkpoint.pt')
    if damage == 'cut':
        data = open(path, 'rb').read()
        open(path, 'wb').write(data[:len(data) // 2])
    elif damage == 'missing key':
        state = torch.load(path, weights_only=True)
        del state['results']
        torch.save(state, path)
    else:
        torch.save({'format': 1, 'x': NotATensor()}, path)
    code, _, err = cli(['--resume', out, '--no-progress'], capsys)
    assert code == 2 and err.count('\n') == 1 and 'Traceback' not in err and 'start over with --overwrite' in err, err
    expected = {'cut': 'cannot read the saved state', 'missing key': 'is incomplete (KeyError',
                'code': 'it would run code to load'}[damage]
    assert expected in err, err


@pytest.mark.parametrize('change', ['images', 'weights'])
def test_the_calibration_cache_misses_when_the_content_changes(change, tmp_path, capsys):
    cfg, ckpt = factory_config(tmp_path)
    assert cli(['--config', cfg, '--output', str(tmp_path / 'a'), '--no-progress'], capsys)[0] == 0
    assert cli(['--config', cfg, '--output', str(tmp_path / 'b'), '--no-progress'], capsys)[0] == 0
    assert 'reused the cached quantizer ranges' in open(tmp_path / 'b' / 'run.log').read()
    change_weights(ckpt) if change == 'weights' else change_images(tmp_path)
    assert cli(['--config', cfg, '--output', str(tmp_path / 'c'), '--no-progress'], capsys)[0] == 0
    assert 'reused the cached quantizer ranges' not in open(tmp_path / 'c' / 'run.log').read()
    assert len([f for f in os.listdir(tmp_path / 'cache') if f.startswith('calibration_')]) == 2


@pytest.mark.parametrize('key,other', [('device', 'cuda'), ('torch', '0.0.0'), ('mqbench', '0.0.0')])
def test_cache_keys_hold_the_device_type_and_the_versions(key, other, tmp_path):
    cfg = mrecg.Config.from_dict(TINY)
    here = environment(torch.device('cpu'))
    assert here['device'] == 'cpu' and here['torch'] == torch.__version__
    a = RunCache(str(tmp_path), cfg, 'w', 'i', 'm', env=here)
    b = RunCache(str(tmp_path), cfg, 'w', 'i', 'm', env={**here, key: other})
    for kind in ('calibration', 'loss'):
        assert a.path(kind) != b.path(kind)
    a.save_unit_losses(['u'], [1.0], 5)
    assert a.unit_losses(['u']) == [1.0] and b.unit_losses(['u']) is None


# ---- --overwrite ------------------------------------------------------------------------------------------
def test_overwrite_keeps_the_previous_results_until_the_new_run_succeeds(tmp_path, capsys, monkeypatch):
    cfg = write(tmp_path, {'quantize': {'reconstruction': {'enabled': False}}})
    out = tmp_path / 'run'
    assert cli(['--config', cfg, '--output', str(out), '--no-progress'], capsys)[0] == 0
    finished = (out / 'results.json').read_text()
    from mrecg import metrics
    real = metrics.evaluate

    def failing(model, batches, device, desc='eval', *args):
        if 'quantized' in desc:
            raise UserError('cannot read evaluation data item 7: OSError: disk read error')
        return real(model, batches, device, desc, *args)
    monkeypatch.setattr(metrics, 'evaluate', failing)
    code, _, err = cli(['--config', cfg, '--output', str(out), '--no-progress', '--overwrite'], capsys)
    assert code == 2 and "the previous run's results are kept in" in err and 'previous_run' in err
    assert (out / 'previous_run' / 'results.json').read_text() == finished
    assert not (out / 'results.json').exists()
    monkeypatch.undo()
    assert cli(['--config', cfg, '--output', str(out), '--no-progress', '--overwrite'], capsys)[0] == 0
    assert (out / 'results.json').exists() and not (out / 'previous_run').exists()


def test_collect_results_ignores_a_kept_previous_run(tmp_path):
    from mrecg.tools import collect
    (tmp_path / 'run' / 'previous_run').mkdir(parents=True)
    record = {'method': 'qdrop', 'model': 'm', 'dataset': 'd', 'w_bits': 2, 'a_bits': 4, 'fp_top1': 90.0,
              'quant_top1': 80.0, 'loss_curve': {'max_unit_loss': 1.0, 'oscillation': 0.0}, 'grouping': {}}
    (tmp_path / 'run' / 'results.json').write_text(json.dumps(record))
    (tmp_path / 'run' / 'previous_run' / 'results.json').write_text(json.dumps({**record, 'quant_top1': 10.0}))
    found = list(collect.find_results([str(tmp_path)]))
    assert [r['quant_top1'] for r in found] == [80.0]


# ---- small things that failed after hours ---------------------------------------------------------------
def test_the_summary_line_survives_a_non_finite_loss():
    record = {'method': 'qdrop', 'model': 'm', 'w_bits': 2, 'a_bits': 4, 'fp_top1': 90.0, 'quant_top1': None,
              'loss_curve': {'max_unit_loss': None}, 'timing': {'total_seconds': 3.0}}
    assert 'max unit loss n/a' in summary_line(record, 'out')


def test_export_feasibility_is_checked_before_any_work(tmp_path, capsys):
    weights = tmp_path / 'gelu.pth'
    torch.save(GeluNet().state_dict(), weights)
    cfg = write(tmp_path, {'model': {'type': f'{THIS}:GeluNet', 'path': str(weights), 'kwargs': {}}})
    out = tmp_path / 'out'
    t0 = time.time()
    code, _, err = cli(['--config', cfg, '--output', str(out), '--no-progress', '--export', 'onnx'], capsys)
    assert code == 2 and 'GELU' in err and 'no ONNX form' in err, err
    assert time.time() - t0 < 30 and not os.path.exists(out / 'checkpoint.pt')


class GeluNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.act = torch.nn.GELU()
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.act(self.conv(x))), 1))


@pytest.mark.parametrize('layer', ['flatten_end_dim', 'flatten_module_start', 'avgpool_divisor'])
def test_graphs_the_exporter_would_write_differently_are_refused(layer):
    from mrecg.export import ExportError, check_exportable
    from mrecg.planning import prepare
    model = OddNet(layer).eval()
    prepared = prepare(model, mrecg.Config.from_dict({'model': {'type': 'x'}}))
    with pytest.raises(ExportError):
        check_exportable(prepared.qmodel, torch.zeros(1, 1, 8, 8))


class OddNet(torch.nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.pool = torch.nn.AvgPool2d(2, divisor_override=3 if layer == 'avgpool_divisor' else None)
        self.flat = torch.nn.Flatten(start_dim=2 if layer == 'flatten_module_start' else 1)
        self.fc = torch.nn.Linear(64 if layer != 'flatten_module_start' else 16, 10)

    def forward(self, x):
        y = self.pool(self.conv(x))
        if self.layer == 'flatten_end_dim':
            y = torch.flatten(y, start_dim=1, end_dim=2).flatten(1)
        else:
            y = self.flat(y)
        if self.layer == 'flatten_module_start':
            y = y.mean(1)
        return self.fc(y)


def test_an_unwritable_cache_folder_is_refused_before_any_work(tmp_path, capsys):
    (tmp_path / 'a_file').write_text('x')
    cfg = write(tmp_path, {'process': {'cache_calibration': True, 'cache_dir': str(tmp_path / 'a_file' / 'c')}})
    code, _, err = cli(['--config', cfg, '--output', str(tmp_path / 'o'), '--no-progress'], capsys)
    assert code == 2 and 'cannot write to process.cache_dir' in err and not (tmp_path / 'o').exists()


@pytest.mark.parametrize('method', ['quantize.reconstruction.granularity=layer', 'quantize.reconstruction.enabled=false'])
def test_adaround_and_nearest_run_on_a_config_left_at_the_default_grouping(method, tmp_path, capsys):
    cfg = tmp_path / 'bare.yaml'
    cfg.write_text(yaml.safe_dump({k: v for k, v in TINY.items() if k != 'mrecg'}))
    code, _, err = cli(['--config', str(cfg), '--output', str(tmp_path / 'o'), '--no-progress', '--set', method], capsys)
    assert code == 0, err
    assert results(str(tmp_path / 'o'))['method'] in ('adaround', 'nearest')
    cfg.write_text(yaml.safe_dump({**TINY, 'mrecg': {'metric': 'modcap', 'k': 2}}))
    code, _, err = cli(['--config', str(cfg), '--plan', '--set', method], capsys)
    assert code == 2 and 'or mrecg.metric to none' in err  # an explicit grouping is not dropped silently


def test_per_channel_activations_are_refused_in_the_config(tmp_path, capsys):
    cfg = write(tmp_path, {'quantize': {'a_qconfig': {'per_channel': True}}})
    code, _, err = cli(['--config', cfg, '--output', str(tmp_path / 'o'), '--no-progress'], capsys)
    assert code == 2 and 'quantize.a_qconfig.per_channel must be false' in err


def test_set_values_are_yaml_1_2(tmp_path):
    from mrecg.config import load_config
    cfg = load_config(write(tmp_path), ['quantize.reconstruction.lr=1e-3', 'process.seed=010',
                                        'quantize.reconstruction.prefetch=on'])
    assert cfg.quantize.reconstruction.lr == 0.001 and cfg.process.seed == 10
    assert cfg.quantize.reconstruction.prefetch == 'on'
    (tmp_path / 'file.yaml').write_text('quantize:\n  reconstruction:\n    lr: 2e-4\n    prefetch: off\n')
    cfg = load_config(str(tmp_path / 'file.yaml'))
    assert cfg.quantize.reconstruction.lr == 2e-4 and cfg.quantize.reconstruction.prefetch == 'off'


def test_metric_none_on_an_mrecg_config_runs_plain_and_says_what_is_ignored(tmp_path, capsys):
    cfg = write(tmp_path, {'mrecg': {'metric': 'modcap', 'k': 2}})
    out = tmp_path / 'plain'
    code, _, err = cli(['--config', cfg, '--output', str(out), '--no-progress', '--set', 'mrecg.metric=none'], capsys)
    assert code == 0, err
    r = results(str(out))
    assert r['method'] == 'qdrop' and r['grouping']['groups'] == []
    assert any('mrecg.k (2) is ignored' in n for n in r['grouping']['notes'])


# ---- the library's contract -------------------------------------------------------------------------------
def test_quantize_leaves_the_callers_model_alone_and_hands_out_copies():
    model = mrecg.create_model('mobilenet_v2_small')
    mrecg.zoo.load_checkpoint(model, os.path.join(ROOT, TINY['model']['path']))
    model.train()
    before = copy.deepcopy(model.state_dict())
    states = []

    def keep(state):
        states.append((state, {k: v.clone() for k, v in state.qmodel_state.items()}))
    cfg = deep_update(TINY, {'process': {'device': 'cpu'}})
    result = mrecg.quantize(model, digits('train', 0), cfg, on_unit_done=keep)
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [s.phase for s, _ in states][:2] == ['calibrated', 'reconstruction'] and len(states) == 2 + 9
    for state, snapshot in states:
        assert all(v.device.type == 'cpu' for v in state.qmodel_state.values())
        assert all(torch.equal(snapshot[k], v) for k, v in state.qmodel_state.items())  # never changed later
    assert result.model is not model


def test_inside_a_nccl_group_cuda_is_the_local_rank_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 4)
    monkeypatch.setenv('LOCAL_RANK', '3')
    assert mrecg.resolve_device('cuda', Dist(3, 4, 'nccl')) == torch.device('cuda', 3)
    monkeypatch.delenv('LOCAL_RANK')
    assert mrecg.resolve_device('cuda', Dist(5, 8, 'nccl')) == torch.device('cuda', 1)
    assert mrecg.resolve_device('cuda', Dist()) == torch.device('cuda')
    assert mrecg.resolve_device('cuda:2', Dist(1, 4, 'nccl')) == torch.device('cuda', 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a GPU to write GPU tensors')
def test_files_of_a_gpu_run_load_on_a_cpu_only_machine(tmp_path, capsys):
    cfg = write(tmp_path, {'process': {'device': 'cuda'}})
    out = tmp_path / 'gpu'
    assert cli(['--config', cfg, '--output', str(out), '--no-progress'], capsys)[0] == 0
    code = ("import torch; torch.cuda.is_available = lambda: False; "
            f"sd = torch.load({str(out / 'quantized_model.pt')!r}, weights_only=True); "
            "assert all(v.device.type == 'cpu' for v in sd.values())")
    assert subprocess.run([sys.executable, '-c', code], env=dict(os.environ, CUDA_VISIBLE_DEVICES='')).returncode == 0


def test_saved_tensors_are_moved_to_the_cpu(tmp_path, monkeypatch):
    """What save_torch writes has every tensor on the CPU (a stand-in device: the GPU case runs where one is)."""
    from mrecg.reporting import on_cpu
    moved = []

    class OnDevice(torch.Tensor):
        def cpu(self, *a, **k):
            moved.append(1)
            return torch.zeros(2)
    t = torch.zeros(2).as_subclass(OnDevice)
    out = on_cpu({'a': [t, (t, 1)], 'b': 'x'})
    assert len(moved) == 2 and out['b'] == 'x' and type(out['a'][1]) is tuple


def test_pip_install_dot_has_every_import_the_package_makes():
    """Every third-party module mrecg/ imports is a dependency (or an extra) of pyproject.toml."""
    import tomllib
    with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
        project = tomllib.load(f)['project']
    declared = [re.split(r'[<>=!\[ ;]', d)[0].lower() for d in project['dependencies']]
    declared += [re.split(r'[<>=!\[ ;]', d)[0].lower() for ds in project['optional-dependencies'].values() for d in ds]
    dist_of = {'yaml': 'pyyaml', 'sklearn': 'scikit-learn', 'mqbench': 'mqbench-torch2', 'PIL': 'pillow'}
    stdlib = set(sys.stdlib_module_names) | {'mrecg'}
    imported = set()
    for folder, _, files in os.walk(os.path.join(ROOT, 'mrecg')):
        for name in files:
            if name.endswith('.py'):
                tree = ast.parse(open(os.path.join(folder, name)).read())
                for node in ast.walk(tree):
                    if isinstance(node, ast.Import):
                        imported |= {a.name.split('.')[0] for a in node.names}
                    elif isinstance(node, ast.ImportFrom) and node.level == 0:
                        imported.add(node.module.split('.')[0])
    missing = sorted(m for m in imported - stdlib if dist_of.get(m, m).lower() not in declared)
    assert not missing, f'imported but not declared in pyproject.toml: {missing}'
