"""Models we have never seen: a class in this file, torchvision and timm builders, a user package called
``models``; the graph rule for their units; per-layer bits; untraceable networks."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

import mrecg
from conftest import ROOT
from mrecg.cli import main
from mrecg.data import digits

THIS = os.path.abspath(__file__)


class TinyResNet(nn.Module):
    """A residual CNN for 8x8 digits, not in the registry: stem, one residual block, classifier."""

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.conv_a = nn.Conv2d(width, width, 3, padding=1)
        self.relu_a = nn.ReLU()
        self.conv_b = nn.Conv2d(width, width, 3, padding=1)
        self.relu_b = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        x = self.relu(self.bn(self.stem(x)))
        y = self.conv_b(self.relu_a(self.conv_a(x)))
        x = self.relu_b(x + y)
        return self.fc(torch.flatten(self.pool(x), 1))


def plain_chain(num_classes: int = 10) -> nn.Module:
    """A function that builds a plain (residual-free) chain."""
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 8 * 8, num_classes))


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # Python control flow on a tensor value: torch.fx cannot trace this
            return x
        return -x


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.gate = Gate()
        self.fc = nn.Linear(4 * 6 * 6, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.gate(self.conv(x)), 1))


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """TinyResNet trained on digits for a second; its checkpoint path."""
    torch.manual_seed(0)
    train = digits('train', 0)
    model = TinyResNet()
    opt = torch.optim.Adam(model.parameters(), 2e-2)
    for _ in range(60):
        loss = F.cross_entropy(model(train.images), train.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = tmp_path_factory.mktemp('ckpt') / 'tiny_resnet.pth'
    torch.save(model.state_dict(), path)
    return model.eval(), str(path)


def config(path, **sections):
    cfg = {'model': {'type': f'{THIS}:TinyResNet', 'path': path},
           'data': {'type': 'digits', 'batch_size': 64, 'eval_limit': 200},
           'quantize': {'w_qconfig': {'bit': 4, 'p': 2.0}, 'a_qconfig': {'bit': 4, 'p': 2.0}, 'cali_size': 64,
                        'reconstruction': {'iterations': 10, 'batch_size': 16}},
           'mrecg': {'metric': 'none'},  # plain units: these tests are about models, not grouping
           'process': {'seed': 3, 'device': 'cpu'}}
    for k, v in sections.items():
        cfg[k] = {**cfg.get(k, {}), **v}
    return cfg


def test_graph_rule_keeps_a_residual_block_whole_and_splits_a_chain():
    p = mrecg.plan(TinyResNet(), config(None))
    assert p.generic_units and len(p.units) == 3
    stem, block, head = p.units
    assert {'conv_a', 'conv_b'} <= set(block.modules) and 'stem' in stem.modules and head.modules == ('fc',)
    chain = mrecg.plan(plain_chain(), {'model': {'type': 'x'}})
    assert [u.modules for u in chain.units] == [('0', '1'), ('2', '3', '4'), ('5',)]


def test_model_class_from_a_file_through_the_cli(trained, tmp_path, capsys):
    cfg = tmp_path / 'cfg.yaml'
    cfg.write_text(yaml.safe_dump(config(trained[1])))
    out = tmp_path / 'run'
    code = main(['--config', str(cfg), '--output', str(out), '--no-progress'])
    assert code == 0, capsys.readouterr().err
    r = json.loads((out / 'results.json').read_text())
    assert r['fp_top1'] > 80 and r['quant_top1'] is not None
    assert len(r['unit_losses']) == 3 and r['units'][1]['modules'][0] == 'conv_a'


def test_model_class_through_the_python_api_matches_the_cli(trained, tmp_path, capsys):
    model, path = trained
    test = digits('val', 0)
    result = mrecg.quantize(model, digits('train', 0), config(path), eval_data=(test.images, test.labels))
    assert isinstance(result.model, torch.fx.GraphModule)
    assert result.fp_accuracy.top1 > 80 and result.accuracy.top1 is not None
    assert len(result.unit_losses) == 3 and all(u.iters == 10 for u in result.units)
    assert result.layer_bits['stem'] == (8, 8) and result.layer_bits['conv_a'] == (4, 4)
    cfg = tmp_path / 'cfg.yaml'
    cfg.write_text(yaml.safe_dump(config(path)))
    assert main(['--config', str(cfg), '--output', str(tmp_path / 'cli'), '--no-progress']) == 0
    r = json.loads((tmp_path / 'cli' / 'results.json').read_text())
    assert [u['loss'] for u in r['unit_losses']] == result.unit_losses
    assert r['quant_top1'] == result.accuracy.top1


def test_per_layer_bits_show_in_plan_and_results(trained, tmp_path, capsys):
    bits = {'layer_bits': [{'modules': ['conv_*'], 'w_bit': 2}, {'modules': ['conv_b'], 'a_bit': 8}]}
    cfg = tmp_path / 'cfg.yaml'
    cfg.write_text(yaml.safe_dump(config(trained[1], quantize={**config(None)['quantize'], **bits})))
    assert main(['--config', str(cfg), '--plan']) == 0
    out = capsys.readouterr().out
    assert 'conv_a W2A4' in out and 'conv_b W2A8' in out
    assert main(['--config', str(cfg), '--output', str(tmp_path / 'run'), '--no-progress']) == 0
    r = json.loads((tmp_path / 'run' / 'results.json').read_text())
    assert r['layer_bits']['conv_a'] == {'w_bit': 2, 'a_bit': 4}
    assert r['layer_bits']['conv_b'] == {'w_bit': 2, 'a_bit': 8}
    assert r['settings']['layer_bits'][1] == {'modules': ['conv_b'], 'w_bit': None, 'a_bit': 8}
    plain = mrecg.plan(TinyResNet(), config(None, mrecg={'metric': 'modcap', 'k': 1}))
    lowered = mrecg.plan(TinyResNet(), config(None, mrecg={'metric': 'modcap', 'k': 1},
                                              quantize={**config(None)['quantize'], **bits}))
    assert lowered.modcap[1] == plain.modcap[1] / 2  # ModCap counts the per-layer bits


def test_layer_bits_pattern_that_matches_nothing_is_an_error(tmp_path, capsys):
    cfg = tmp_path / 'cfg.yaml'
    q = {**config(None)['quantize'], 'layer_bits': [{'modules': ['conv_c'], 'w_bit': 2}]}
    cfg.write_text(yaml.safe_dump(config(None, quantize=q)))
    assert main(['--config', str(cfg), '--plan']) == 2
    err = capsys.readouterr().err
    assert "'conv_c' matches no conv/linear layer" in err and err.count('\n') == 1


@pytest.mark.parametrize('spec,kwargs', [('torchvision:resnet18', {'num_classes': 10}),
                                         ('timm:mobilenetv3_small_050', {'num_classes': 10})])
def test_torchvision_and_timm_models_plan_and_quantize(spec, kwargs, tmp_path, capsys):
    cfg = tmp_path / 'cfg.yaml'
    cfg.write_text(yaml.safe_dump({'model': {'type': spec, 'kwargs': kwargs},
                                   'mrecg': {'metric': 'modcap', 'k': 2}}))
    assert main(['--config', str(cfg), '--plan']) == 0
    out = capsys.readouterr().out
    assert 'graph rule' in out and 'reconstruction units' in out
    model = mrecg.create_model(spec, kwargs)
    images = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    result = mrecg.quantize(model, images, {'data': {'batch_size': 16}, 'quantize': {
        'cali_size': 16, 'reconstruction': {'iterations': 2, 'batch_size': 8}}, 'process': {'device': 'cpu'}})
    assert len(result.unit_names) > 5 and len(result.units) == len(result.unit_names) - 3  # the default: 3 pairs
    assert result.grouping.source == 'modcap solver' and result.grouping.k == 3
    assert all(loss is not None and loss == loss for loss in result.unit_losses)


def test_untraceable_model_is_one_line_naming_the_module(tmp_path, capsys):
    cfg = tmp_path / 'cfg.yaml'
    cfg.write_text(yaml.safe_dump({'model': {'type': f'{THIS}:Untraceable'}}))
    assert main(['--config', str(cfg), '--plan']) == 2
    err = capsys.readouterr().err
    assert "cannot trace the model in module 'gate'" in err and 'control flow' in err and err.count('\n') == 1


USER_PACKAGE = '''
import torch.nn as nn


class Net(nn.Module):
    def __init__(self, width=4):
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3)
        self.fc = nn.Linear(width * 6 * 6, 10)

    def forward(self, x):
        return self.fc(self.conv(x).flatten(1))
'''


@pytest.mark.parametrize('launcher', ['module', 'script'])
def test_a_user_package_called_models_works(launcher, tmp_path):
    (tmp_path / 'models').mkdir()
    (tmp_path / 'models' / '__init__.py').write_text('')
    (tmp_path / 'models' / 'nets.py').write_text(USER_PACKAGE)
    (tmp_path / 'cfg.yaml').write_text(yaml.safe_dump({'model': {'type': 'models.nets:Net', 'kwargs': {'width': 3}}}))
    entry = ['-m', 'mrecg.cli'] if launcher == 'module' else [os.path.join(ROOT, 'ptq_main.py')]
    proc = subprocess.run([sys.executable, *entry, '--config', 'cfg.yaml', '--plan'], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert 'models.nets:Net' in proc.stdout and "{'width': 3}" in proc.stdout


@pytest.mark.parametrize('spec,message', [
    ('torchvision:resnet1000', 'torchvision has no model'),
    ('timm:nonet', 'timm has no model'),
    ('no/such/file.py:Net', 'file not found'),
    ('no_such_package.mod:Net', "no module named 'no_such_package'"),
    (f'{THIS}:Nothing', "has no attribute 'Nothing'"),
    (f'{THIS}:THIS', 'is not a class or function'),
])
def test_bad_model_types_are_one_line(spec, message, tmp_path, capsys):
    cfg = tmp_path / 'cfg.yaml'
    cfg.write_text(yaml.safe_dump({'model': {'type': spec}}))
    assert main(['--config', str(cfg), '--plan']) == 2
    err = capsys.readouterr().err
    assert message in err and err.count('\n') == 1
