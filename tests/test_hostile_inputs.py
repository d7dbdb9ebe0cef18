"""Hostile files and faults, round four (issue 31): bounded YAML, a full disk, symlink loops, models that
return tuples, unquoted resume hints, out-of-range numbers, corrupt outputs and caches, a one-width
candidate list. Each case once, as a user meets it: one line, exit 2, nothing finished lost."""
import json
import os
import re
import shlex
import subprocess
import sys
import time

import pytest
import torch
import yaml

import mrecg
from conftest import ROOT, TINY, cli, deep_update
from mrecg.caching import RunCache, environment
from mrecg.cli import resume_hint
from mrecg.config import ConfigError, load_config
from mrecg.files import BadFile, read_json, read_torch
from mrecg.folders import image_samples
from mrecg.reporting import DiskFull, save_torch, write_text


def write(tmp_path, override=None, name='cfg.yaml'):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(deep_update(TINY, override or {})))
    return str(path)


def laughs(levels=9):
    lines = ['a0: &a0 [x, x, x, x, x, x, x, x, x]']
    lines += [f'a{i}: &a{i} [' + ', '.join([f'*a{i - 1}'] * 9) + ']' for i in range(1, levels + 1)]
    return lines


# ---- bounded config parsing ---------------------------------------------------------------------------------
def test_an_alias_bomb_in_a_config_is_refused_at_once(tmp_path):
    path = tmp_path / 'bomb.yaml'
    path.write_text('model:\n  kwargs:\n' + ''.join(f'    {line}\n' for line in laughs()))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, 'ptq_main.py', '--config', str(path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and 'expands to more than 100,000 values' in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and time.perf_counter() - t0 < 20


def test_an_alias_bomb_in_a_set_value_is_refused(write_config):
    flow = '{' + ', '.join(laughs()) + '}'
    with pytest.raises(ConfigError, match='--set model.kwargs: expands to more than'):
        load_config(write_config(), [f'model.kwargs={flow}'])


def test_a_few_aliases_are_still_fine(tmp_path):
    path = tmp_path / 'ok.yaml'
    path.write_text(yaml.safe_dump(TINY) + 'mrecg: &m {metric: none}\n')
    path.write_text(path.read_text().replace("mrecg:\n  metric: none\n", ''))
    assert load_config(str(path)).mrecg.metric == 'none'


def test_deep_nesting_is_one_line_not_a_recursion_error(tmp_path, capsys):
    path = tmp_path / 'deep.yaml'
    path.write_text('model:\n  kwargs: {x: ' + '[' * 10000 + ']' * 10000 + '}\n')
    code, _, err = cli(['--config', str(path)], capsys)
    assert code == 2 and 'nested deeper than 64 levels at line 2' in err, err


def test_a_duplicate_key_is_refused_with_both_lines(tmp_path, capsys):
    path = tmp_path / 'dup.yaml'
    path.write_text('quantize:\n  w_qconfig: {bit: 3}\nmodel: {type: resnet18}\nquantize:\n  a_qconfig: {bit: 4}\n')
    code, _, err = cli(['--config', str(path)], capsys)
    assert code == 2 and "key 'quantize' appears twice in one mapping (lines 1 and 4)" in err, err
    with pytest.raises(ConfigError, match="key 'a' appears twice"):
        load_config(write(tmp_path), ['model.kwargs={a: 1, a: 2}'])


# ---- numbers -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize('setting,message', [
    ('process.seed=18446744073709551616', r'process.seed must be in 0..2\^63-1'),
    ('process.seed=-1', r'process.seed must be in 0..2\^63-1'),
    ('quantize.reconstruction.iterations=99999999999999999999', 'must fit in 64 bits'),
    ('quantize.cali_size=16', r'batch_size \(16\) is larger than quantize.cali_size|larger than quantize.cali_size'),
])
def test_out_of_range_numbers_are_one_line(setting, message, tmp_path, capsys):
    extra = ['quantize.reconstruction.batch_size=64'] if 'cali_size' in setting else []
    code, _, err = cli(['--config', write(tmp_path), '--set', setting, *extra], capsys)
    assert code == 2 and re.search(message, err), err


def test_the_step_batch_as_run_is_recorded():
    model = mrecg.create_model('mobilenet_v2_small')
    result = mrecg.quantize(model, mrecg_images(24), deep_update(TINY, {'quantize': {'cali_size': 24, 'reconstruction': {
        'iterations': 2, 'batch_size': 8}}}), progress=False)
    assert result.engine['step_batch'] == 8


def mrecg_images(n):
    from mrecg.data import digits
    return digits('train', 0).images[:n]


# ---- a full disk ---------------------------------------------------------------------------------------------
@pytest.fixture
def tiny_disk(tmp_path):
    """A 200 kB tmpfs (needs root and mount; skipped elsewhere)."""
    mount = tmp_path / 'disk'
    mount.mkdir()
    if subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=200k', 'tmpfs', str(mount)], capture_output=True).returncode:
        pytest.skip('cannot mount a small tmpfs here (needs root)')
    yield mount
    if subprocess.run(['umount', str(mount)], capture_output=True).returncode:
        subprocess.run(['umount', '-l', str(mount)], capture_output=True)  # never leave a mount behind


def test_a_full_disk_keeps_the_previous_file_and_says_so(tiny_disk):
    path = tiny_disk / 'checkpoint.pt'
    save_torch(str(path), {'a': torch.zeros(10)})
    before = path.read_bytes()
    with pytest.raises(DiskFull, match=r'cannot write checkpoint.pt in .*: no space left on the device \(0\.\d MiB free'):
        save_torch(str(path), {'a': torch.zeros(100_000)})
    assert path.read_bytes() == before and os.listdir(tiny_disk) == ['checkpoint.pt']  # no temp file left


def test_a_run_on_a_full_disk_ends_in_one_line_and_resumes_once_there_is_space(tiny_disk, tmp_path, capsys):
    out = str(tiny_disk / 'run')
    code, _, err = cli(['--config', write(tmp_path), '--output', out, '--no-progress'], capsys)
    assert code == 2 and 'no space left on the device' in err and f'--resume {out}' in err, err
    assert len(err.strip().splitlines()) == 1 and 'Traceback' not in err
    subprocess.run(['mount', '-o', 'remount,size=20m', str(tiny_disk)], check=True)
    assert cli(['--resume', out, '--no-progress'], capsys)[0] == 0
    assert not os.path.exists(os.path.join(out, '.mrecg.lock'))
    held = []
    for fd in os.listdir('/proc/self/fd'):
        try:
            held.append(os.readlink(f'/proc/self/fd/{fd}'))
        except OSError:
            pass
    assert not [f for f in held if f.startswith(str(tiny_disk))], 'the run left files open (run.log?)'


# ---- data folders --------------------------------------------------------------------------------------------
def image_tree(root, classes=3, per_class=4):
    from PIL import Image
    for c in range(classes):
        folder = root / str(c)
        folder.mkdir(parents=True)
        for i in range(per_class):
            Image.new('RGB', (8, 8), (c * 40, i * 30, 0)).save(folder / f'{i}.png')


def test_a_symlink_loop_in_an_image_folder_counts_every_image_once(tmp_path):
    import torchvision.datasets as D
    image_tree(tmp_path / 'val')
    assert image_samples(str(tmp_path / 'val'), {'0': 0, '1': 1, '2': 2})[0] == D.ImageFolder(tmp_path / 'val').samples
    os.symlink('.', tmp_path / 'val' / '2' / 'more')
    os.symlink('../0', tmp_path / 'val' / '1' / 'zero')  # another class's folder: still read once
    samples, skipped = image_samples(str(tmp_path / 'val'), {'0': 0, '1': 1, '2': 2})
    assert len(samples) == 12 and skipped == 2


def test_the_data_line_of_the_log_gives_the_images_per_split(tmp_path, capsys):
    image_tree(tmp_path / 'data' / 'train', 10, 8)
    image_tree(tmp_path / 'data' / 'val', 10, 2)
    os.symlink('.', tmp_path / 'data' / 'val' / '3' / 'more')
    torch.save(mrecg.create_model('mobilenet_v2_small', {'in_chans': 3}).state_dict(), tmp_path / 'rgb.pth')
    cfg = write(tmp_path, {'data': {'type': 'imagefolder', 'path': str(tmp_path / 'data'), 'input_size': 8,
                                    'test_resize': 8, 'eval_limit': None, 'num_workers': 0},
                           'model': {'kwargs': {'in_chans': 3}, 'path': str(tmp_path / 'rgb.pth')},
                           'quantize': {'reconstruction': {'enabled': False}}})
    code, _, err = cli(['--config', cfg, '--output', str(tmp_path / 'run'), '--no-progress'], capsys)
    assert code == 0, err
    line = next(x for x in open(tmp_path / 'run' / 'run.log') if ' data imagefolder' in x)
    assert 'calibration split 80 images, 10 classes; evaluation split 20 images, 10 classes (1 symlink' in line
    assert json.load(open(tmp_path / 'run' / 'results.json'))['eval_images'] == 20


# ---- the model's output -------------------------------------------------------------------------------------
MODELS = '''
import torch.nn as nn
class TupleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.pool, self.fc = nn.Conv2d(1, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Linear(8, 10)
    def forward(self, x):
        return self.fc(self.pool(self.conv(x)).flatten(1)), x
class DictNet(TupleNet):
    def forward(self, x):
        return {'logits': super().forward(x)[0]}
'''


@pytest.mark.parametrize('name,kind', [('TupleNet', 'a tuple of 2'), ('DictNet', "a dict with keys 'logits'")])
def test_a_model_returning_a_tuple_or_dict_is_refused_naming_the_model(name, kind, tmp_path, capsys):
    (tmp_path / 'nets.py').write_text(MODELS)
    torch.save(TupleNetState(tmp_path), tmp_path / 'nets.pth')
    cfg = write(tmp_path, {'model': {'type': f'{tmp_path}/nets.py:{name}', 'path': str(tmp_path / 'nets.pth')}})
    out = tmp_path / 'run'
    code, _, err = cli(['--config', cfg, '--output', str(out), '--no-progress'], capsys)
    assert code == 2 and f'returns {kind}, not one tensor of class scores' in err, err
    assert 'data' not in err.split('returns')[0] and '--resume' not in err and not out.exists()


def nets_module(tmp_path):
    import importlib.util
    (tmp_path / 'nets.py').write_text(MODELS)
    spec = importlib.util.spec_from_file_location('nets', tmp_path / 'nets.py')
    nets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(nets)
    return nets


def TupleNetState(tmp_path):
    return nets_module(tmp_path).TupleNet().state_dict()


def test_the_api_refuses_a_tuple_model_before_calibration(tmp_path):
    with pytest.raises(mrecg.UserError, match='model TupleNet returns a tuple'):
        mrecg.quantize(nets_module(tmp_path).TupleNet(), mrecg_images(16),
                       {'quantize': {'cali_size': 16, 'reconstruction': {'batch_size': 16}}}, progress=False)


# ---- resume hints ------------------------------------------------------------------------------------------
def test_the_resume_hint_is_shell_quoted(tmp_path):
    out = tmp_path / 'my runs' / 'größe 1'
    out.mkdir(parents=True)
    (out / 'checkpoint.pt').write_bytes(b'')
    hint = resume_hint(str(out))
    assert shlex.split(hint.split('continue with: ')[1]) == ['python', 'ptq_main.py', '--resume', str(out)]


# ---- corrupt outputs and caches -----------------------------------------------------------------------------
class Payload:
    def __reduce__(self):
        return (os.system, ('touch /tmp/mrecg_pwned',))


@pytest.mark.parametrize('damage', ['truncated', 'pickle', 'other model'])
def test_export_refuses_a_damaged_quantized_model_in_one_line(damage, finished_run, tmp_path):
    import shutil
    folder = tmp_path / 'run'
    shutil.copytree(finished_run, folder)
    path = folder / 'quantized_model.pt'
    if damage == 'truncated':
        path.write_bytes(path.read_bytes()[:1000])
    else:
        torch.save({'x': Payload()} if damage == 'pickle' else {'x': torch.zeros(3)}, path)
    proc = subprocess.run([sys.executable, '-m', 'mrecg', 'export', str(folder)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    expected = {'truncated': 'failed reading zip archive', 'pickle': 'it would run code to load',
                'other model': 'does not fit the model of config.yaml'}[damage]
    assert proc.returncode == 2 and expected in proc.stderr and str(path) in proc.stderr, proc.stderr
    assert 'Traceback' not in proc.stderr and not os.path.exists('/tmp/mrecg_pwned')


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('finished')
    cfg = tmp / 'cfg.yaml'
    cfg.write_text(yaml.safe_dump(deep_update(TINY, {'quantize': {'reconstruction': {'iterations': 2}}})))
    proc = subprocess.run([sys.executable, 'ptq_main.py', '--config', str(cfg), '--output', str(tmp / 'run'),
                           '--no-progress'], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return tmp / 'run'


def test_collect_names_a_cut_off_results_file_and_tables_the_rest(finished_run, tmp_path):
    import shutil
    shutil.copytree(finished_run, tmp_path / 'a')
    shutil.copytree(finished_run, tmp_path / 'b')
    text = (tmp_path / 'b' / 'results.json').read_text()
    (tmp_path / 'b' / 'results.json').write_text(text[:len(text) // 2])
    proc = subprocess.run([sys.executable, '-m', 'mrecg', 'collect', str(tmp_path), '--out', str(tmp_path / 't')],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and 'Traceback' not in proc.stderr, proc.stderr
    assert f'cannot read results {tmp_path / "b" / "results.json"}: not complete JSON' in proc.stderr
    assert 'mobilenet_v2_small' in (tmp_path / 't.md').read_text()


def test_read_torch_and_read_json_refuse_in_one_line(tmp_path):
    (tmp_path / 'a.json').write_text('{"a": [1, 2')
    with pytest.raises(BadFile, match='not complete JSON'):
        read_json(str(tmp_path / 'a.json'), 'results')
    torch.save([Payload()], tmp_path / 'p.pt')
    with pytest.raises(BadFile, match='would run code'):
        read_torch(str(tmp_path / 'p.pt'), 'checkpoint')


@pytest.mark.parametrize('damage', ['truncated', 'pickle', 'other keys', 'nan'])
def test_a_damaged_calibration_cache_entry_is_a_miss_and_is_replaced(damage, tmp_path, capsys):
    cfg = write(tmp_path, {'process': {'cache_calibration': True, 'cache_dir': str(tmp_path / 'cache')},
                           'quantize': {'reconstruction': {'enabled': False}}})
    assert cli(['--config', cfg, '--output', str(tmp_path / 'a'), '--no-progress'], capsys)[0] == 0
    entry = next((tmp_path / 'cache').glob('calibration_*.pt'))
    good = torch.load(entry, weights_only=True)
    if damage == 'truncated':
        entry.write_bytes(entry.read_bytes()[:500])
    elif damage == 'pickle':
        torch.save({'x': Payload()}, entry)
    elif damage == 'other keys':
        torch.save({'x': torch.zeros(3)}, entry)
    else:
        name = next(k for k in good if k.endswith('scale'))
        torch.save({**good, name: torch.full_like(good[name], float('nan'))}, entry)
    code, _, err = cli(['--config', cfg, '--output', str(tmp_path / 'b'), '--no-progress'], capsys)
    assert code == 0, err
    log = open(tmp_path / 'b' / 'run.log').read()
    assert 'treated as a miss, recomputed and replaced' in log and 'reused the cached' not in log
    assert results_top1(tmp_path / 'a') == results_top1(tmp_path / 'b') and not os.path.exists('/tmp/mrecg_pwned')
    assert cli(['--config', cfg, '--output', str(tmp_path / 'c'), '--no-progress'], capsys)[0] == 0
    assert 'reused the cached quantizer ranges' in open(tmp_path / 'c' / 'run.log').read()


def results_top1(folder):
    return json.load(open(os.path.join(folder, 'results.json')))['quant_top1']


def test_a_damaged_loss_cache_entry_is_a_miss(tmp_path):
    cache = RunCache(str(tmp_path), mrecg.Config.from_dict(TINY), 'w', 'i', 'm', env=environment(torch.device('cpu')))
    cache.save_unit_losses(['u', 'v'], [1.0, 2.0], 5)
    assert cache.unit_losses(['u', 'v']) == [1.0, 2.0]
    for text in ('{"units": ["u", "v"], "losses": [1.0', '{"units": ["u", "v"], "losses": "rm -rf"}', '[]'):
        write_text(cache.path('loss'), text)
        assert cache.unit_losses(['u', 'v']) is None


def test_the_write_probe_is_unique_per_run(tmp_path):
    from mrecg.runner import check_writable
    (tmp_path / '.write_test').mkdir()  # the fixed name another run might hold: no longer in the way
    check_writable(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ['.write_test']


# ---- bit search ----------------------------------------------------------------------------------------------
def test_one_activation_width_is_no_search_over_activations():
    cfg = mrecg.Config.from_dict(deep_update(TINY, {'quantize': {'bit_search': {
        'candidates': {'w': [2, 3, 4, 8], 'a': [4]}, 'budget': {'avg_w_bits': 3}}}}))
    assert cfg.quantize.bit_search.measure == 'fisher'
    with pytest.raises(ConfigError, match='ranks weight bits only'):
        mrecg.Config.from_dict(deep_update(TINY, {'quantize': {'bit_search': {
            'candidates': {'a': [4, 8]}, 'budget': {'avg_w_bits': 3}}}}))


def test_a_search_with_one_activation_width_sets_it_everywhere_it_may(tmp_path, capsys):
    cfg = write(tmp_path, {'quantize': {'a_qconfig': {'bit': 8}, 'reconstruction': {'enabled': False},
                                        'bit_search': {'candidates': {'w': [2, 4], 'a': [4]},
                                                       'budget': {'avg_w_bits': 3}, 'samples': 32}}})
    code, _, err = cli(['--config', cfg, '--output', str(tmp_path / 'run'), '--no-progress'], capsys)
    assert code == 0, err
    record = json.load(open(tmp_path / 'run' / 'results.json'))
    a_bits = set(record['bit_search']['a_bits'].values())
    assert a_bits == {4} and any('has one width' in n for n in record['bit_search']['notes'])
