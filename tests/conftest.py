"""Shared fixtures: tiny digits configs and a calibrated small MobileNetV2, all on CPU."""
import copy
import os
import subprocess
import sys

import pytest
import torch
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
torch.set_num_threads(2)

TINY = {
    'model': {'type': 'mobilenet_v2_small', 'path': 'models/checkpoints/mobilenet_v2_small_digits.pth'},
    'data': {'type': 'digits', 'batch_size': 64, 'eval_limit': 200},
    'quantize': {'w_qconfig': {'bit': 2, 'p': 2.0}, 'a_qconfig': {'bit': 4, 'p': 2.0}, 'cali_size': 64,
                 'reconstruction': {'iterations': 12, 'batch_size': 16, 'weight': 0.1}},
    'mrecg': {'metric': 'none'},  # plain QDrop unless a test asks for MRECG (the defaults group with ModCap, k=3)
    'process': {'seed': 7, 'device': 'cpu'},
}


def deep_update(base, override):
    out = copy.deepcopy(base)
    for k, v in override.items():
        out[k] = deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@pytest.fixture
def write_config(tmp_path):
    """write_config({'mrecg': {...}}) -> path of a YAML config: TINY updated with the given keys."""
    def write(override=None, name='cfg.yaml', base=TINY):
        path = tmp_path / name
        path.write_text(yaml.safe_dump(deep_update(base, override or {})))
        return str(path)
    return write


def cli(args, capsys):
    """Run ptq_main.py's main() in-process; returns (exit code, stdout, stderr)."""
    from mrecg.cli import main
    try:
        code = main(args)
    except SystemExit as exc:  # argparse
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def run_cli(*args, timeout=300):
    """Run ptq_main.py in a fresh process (as users do); returns CompletedProcess."""
    return subprocess.run([sys.executable, os.path.join(ROOT, 'ptq_main.py'), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope='session')
def calibrated():
    """(float model, prepared+calibrated qmodel, float prepared copy, calibration images) for digits."""
    from mrecg import zoo
    from mrecg.config import QuantizeConfig
    from mrecg.data import calibration_images, digits
    from mrecg.quantization import calibrate, disable_all, fold_bn, prepare_model
    model = zoo.build_model('mobilenet_v2_small').eval()
    zoo.load_checkpoint(model, os.path.join(ROOT, TINY['model']['path']))
    folded = copy.deepcopy(model)
    fold_bn(folded)
    settings = QuantizeConfig(w_qconfig={'bit': 2, 'p': 2.0}, a_qconfig={'bit': 4, 'p': 2.0})
    qmodel = prepare_model(folded, settings)
    images = calibration_images(digits('train', 0), 64, 0)
    calibrate(qmodel, images, 64, torch.device('cpu'))
    fp = copy.deepcopy(qmodel)
    disable_all(fp)
    return model, folded, qmodel, fp, images
