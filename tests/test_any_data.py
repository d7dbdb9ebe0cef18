"""Data we have never seen (factories, image folders, whatever the Python API is handed) and the failures a
user's own data, checkpoints and output folders can cause: one line, exit 2, nothing lost."""
import json
import os

import numpy as np
import pytest
import torch
import yaml
from torch.utils.data import DataLoader, Dataset

import mrecg
from conftest import TINY, deep_update
from mrecg.cli import main
from mrecg.data import calibration_images, digits
from mrecg.errors import UserError

THIS = os.path.abspath(__file__)


class Digits(Dataset):
    """scikit-learn's digits as a plain map-style Dataset (no tensor shortcut)."""

    def __init__(self, split):
        self.data = digits(split, 0)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return self.data.images[i], int(self.data.labels[i])


def make_digits(split, labelled_val=True):
    return Digits(split) if split == 'train' or labelled_val else None


class BrokenAfterFirst(Digits):
    """Evaluation data that reads fine once (the float model's evaluation) and then fails (the disk went
    away while the model was being reconstructed)."""
    seen, repeats = set(), 0

    def __getitem__(self, i):
        if i in BrokenAfterFirst.seen:  # an image read again: the second evaluation (one check read aside)
            BrokenAfterFirst.repeats += 1
            if BrokenAfterFirst.repeats > 1:
                raise OSError('disk read error')
        BrokenAfterFirst.seen.add(i)
        return super().__getitem__(i)


def make_broken_val(split):
    return Digits(split) if split == 'train' else BrokenAfterFirst(split)


def make_broken(split):
    raise ValueError('the bucket is unreachable')


def make_swapped(split):
    return [(0, torch.zeros(1, 8, 8))]


def run(cfg, tmp_path, capsys, *extra):
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / 'cfg.yaml'
    path.write_text(yaml.safe_dump(cfg))
    try:
        code = main(['--config', str(path), '--output', str(tmp_path / 'out'), '--no-progress', *extra])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def results(tmp_path):
    return json.loads((tmp_path / 'out' / 'results.json').read_text())


def test_factory_by_import_path_gives_the_same_numbers_as_the_builtin(tmp_path, capsys):
    assert run(TINY, tmp_path / 'a', capsys)[0] == 0
    factory = deep_update(TINY, {'data': {'type': f'{THIS}:make_digits', 'num_workers': 0}})
    code, _, err = run(factory, tmp_path / 'b', capsys)
    assert code == 0, err
    a, b = results(tmp_path / 'a'), results(tmp_path / 'b')
    assert [u['loss'] for u in a['unit_losses']] == [u['loss'] for u in b['unit_losses']]
    assert (a['fp_top1'], a['quant_top1']) == (b['fp_top1'], b['quant_top1']) and b['eval_images'] == 200


@pytest.mark.parametrize('data', [{'type': f'{THIS}:make_digits', 'kwargs': {'labelled_val': False}, 'num_workers': 0},
                                  {'type': 'digits', 'evaluate': False}])
def test_no_evaluation_data_still_quantizes(data, tmp_path, capsys):
    code, out, err = run(deep_update(TINY, {'data': data}), tmp_path, capsys)
    assert code == 0, err
    r = results(tmp_path)
    assert r['quant_top1'] is None and r['fp_top1'] is None and len(r['unit_losses']) == 9
    assert all(u['loss'] is not None for u in r['unit_losses'])
    assert 'quantized top-1 n/a' in out


def _image_folder(root, corrupt=False):
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, n in (('train', 6), ('val', 4)):
        for cls in ('a', 'b'):
            os.makedirs(root / split / cls)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (10, 10, 3), dtype=np.uint8)).save(root / split / cls / f'{i}.png')
    if corrupt:
        (root / 'train' / 'a' / '0.png').write_bytes(b'not a png')


def _folder_config(tmp_path, folder):
    model = mrecg.create_model('resnet_small', {'in_chans': 3, 'num_classes': 2})
    torch.save(model.state_dict(), tmp_path / 'rand.pth')
    return deep_update(TINY, {
        'model': {'type': 'resnet_small', 'kwargs': {'in_chans': 3, 'num_classes': 2},
                  'path': str(tmp_path / 'rand.pth')},
        'data': {'type': 'imagefolder', 'path': str(folder), 'input_size': 8, 'test_resize': 9, 'mean': [0.5],
                 'std': [0.25], 'batch_size': 4, 'num_workers': 0, 'eval_limit': None},
        'quantize': {'cali_size': 12, 'reconstruction': {'iterations': 2, 'batch_size': 4}}})


def test_image_folder_with_its_own_preprocessing(tmp_path, capsys):
    _image_folder(tmp_path / 'imgs')
    code, _, err = run(_folder_config(tmp_path, tmp_path / 'imgs'), tmp_path, capsys)
    assert code == 0, err
    r = results(tmp_path)
    assert r['eval_images'] == 8 and r['quant_top1'] is not None and r['settings']['input_size'] == 8


def test_corrupt_image_is_one_line_and_nothing_is_written(tmp_path, capsys):
    _image_folder(tmp_path / 'imgs', corrupt=True)
    code, _, err = run(_folder_config(tmp_path, tmp_path / 'imgs'), tmp_path, capsys)
    assert code == 2 and 'cannot read calibration data' in err and err.count('\n') == 1
    assert not (tmp_path / 'out' / 'results.json').exists()


def test_data_failing_after_reconstruction_keeps_the_finished_units(tmp_path, capsys):
    cfg = deep_update(TINY, {'data': {'type': f'{THIS}:make_broken_val', 'num_workers': 0},
                             'process': {'cache_dir': str(tmp_path / 'cache')}})
    code, _, err = run(cfg, tmp_path, capsys)
    assert code == 2 and 'cannot read evaluation data: OSError: disk read error' in err
    assert f'continue with: python ptq_main.py --resume {tmp_path / "out"}' in err and err.count('\n') == 1
    state = torch.load(tmp_path / 'out' / 'checkpoint.pt', weights_only=True)
    assert len(state['results']) == 9  # every unit was reconstructed and is kept


class Hostile:
    def __reduce__(self):
        return (os.system, (f'touch {os.environ.get("PYTEST_MARKER", "/tmp/mrecg_pwned")}',))


@pytest.mark.parametrize('override,message', [
    ({'data': {'type': f'{THIS}:make_broken'}}, "make_broken('train') raised ValueError: the bucket is unreachable"),
    ({'data': {'type': f'{THIS}:make_swapped'}}, 'items must be (image tensor of shape C x H x W'),
    ({'data': {'type': f'{THIS}:no_factory'}}, "has no attribute 'no_factory'"),
    ({'data': {'type': 'pkg_that_is_not_there:make'}}, "no module named 'pkg_that_is_not_there'"),
    ({'quantize': {'cali_size': 2000}}, 'training split has 1297 images'),
])
def test_bad_data_is_one_line(override, message, tmp_path, capsys):
    code, _, err = run(deep_update(TINY, override), tmp_path, capsys)
    assert code == 2 and message in err and err.count('\n') == 1, err


def test_hostile_checkpoint_runs_no_code(tmp_path, capsys, monkeypatch):
    marker = tmp_path / 'pwned'
    monkeypatch.setenv('PYTEST_MARKER', str(marker))
    torch.save({'model': Hostile()}, tmp_path / 'evil.pth')
    code, _, err = run(deep_update(TINY, {'model': {'path': str(tmp_path / 'evil.pth')}}), tmp_path, capsys)
    assert code == 2 and 'cannot read checkpoint' in err and 'weights_only' in err and err.count('\n') == 1
    assert not marker.exists()


def test_checkpoint_with_nan_values_is_refused(tmp_path, capsys):
    sd = mrecg.create_model('mobilenet_v2_small').state_dict()
    sd['features.2.conv.0.weight'][0, 0] = float('nan')
    torch.save(sd, tmp_path / 'nan.pth')
    code, _, err = run(deep_update(TINY, {'model': {'path': str(tmp_path / 'nan.pth')}}), tmp_path, capsys)
    assert code == 2 and 'NaN or infinite values in 1 tensors: features.2.conv.0.weight' in err


def test_unwritable_output_fails_before_any_work(tmp_path, capsys):
    (tmp_path / 'a_file').write_text('x')
    path = tmp_path / 'cfg.yaml'
    path.write_text(yaml.safe_dump(TINY))
    code = main(['--config', str(path), '--output', str(tmp_path / 'a_file' / 'out'), '--no-progress'])
    err = capsys.readouterr().err
    assert code == 2 and 'cannot write to the output folder' in err and err.count('\n') == 1


def test_set_twice_applies_both(tmp_path, capsys):
    path = tmp_path / 'cfg.yaml'
    path.write_text(yaml.safe_dump(TINY))
    assert main(['--config', str(path), '--plan', '--set', 'mrecg.metric=modcap', '--set', 'mrecg.k=3']) == 0
    assert 'grouping: modcap solver, k = 3' in capsys.readouterr().out


def test_calibration_images_from_tensor_dataset_and_loader():
    data = digits('train', 0)
    from_tensor = calibration_images(data.images, 50, seed=4)
    from_dataset = calibration_images(Digits('train'), 50, seed=4, batch_size=16)
    assert torch.equal(from_tensor, from_dataset)
    assert not torch.equal(from_tensor, calibration_images(data.images, 50, seed=5))
    loader = DataLoader(Digits('train'), batch_size=16)
    assert torch.equal(calibration_images(loader, 50, seed=4), data.images[:50])
    with pytest.raises(UserError, match='calibration DataLoader gave 32 images'):
        calibration_images(DataLoader(Digits('train'), batch_size=16, sampler=range(32)), 50, seed=0)
    with pytest.raises(UserError, match='tensor of images, a Dataset or a DataLoader'):
        calibration_images(42, 50, seed=0)


def test_quantize_without_eval_data_and_with_bad_config():
    model = mrecg.create_model('mobilenet_v2_small')
    cfg = mrecg.Config.from_dict({'data': {'batch_size': 32}, 'quantize': {
        'cali_size': 32, 'reconstruction': {'iterations': 2, 'batch_size': 8}}, 'process': {'device': 'cpu'}})
    result = mrecg.quantize(model, digits('train', 0), cfg)
    assert result.accuracy is None and result.fp_accuracy is None and len(result.unit_losses) == 9
    assert 'quantized top-1 n/a' in str(result)
    with pytest.raises(mrecg.ConfigError, match="unknown config key 'quantize.reconstruction.iteration'"):
        mrecg.quantize(model, digits('train', 0), {'quantize': {'reconstruction': {'iteration': 2}}})
    with pytest.raises(mrecg.ConfigError, match=r'^prob must be in \(0, 1\]'):
        mrecg.ReconstructionConfig(prob=2.0)


def test_eval_limit_is_a_seeded_sample_across_classes():
    from mrecg.data import TensorData, eval_batches, eval_sample
    labels = torch.arange(10).repeat_interleave(100)  # a class-sorted folder: 10 classes of 100 images
    idx = eval_sample(1000, 200, seed=0)
    assert len(idx) == 200 and idx.tolist() == sorted(set(idx.tolist()))
    counts = torch.bincount(labels[idx], minlength=10)
    assert counts.min() >= 10 and counts.max() <= 30  # every class, in proportion (not the first two)
    assert torch.equal(idx, eval_sample(1000, 200, seed=0))
    assert not torch.equal(idx, eval_sample(1000, 200, seed=1))
    assert torch.equal(eval_sample(1000, None), torch.arange(1000))
    assert torch.equal(eval_sample(1000, 5000), torch.arange(1000))
    # the same images whichever way the data comes in: tensors, or any map-style Dataset
    images = torch.arange(1000, dtype=torch.float32).reshape(1000, 1, 1, 1)

    class Folder(Dataset):
        def __len__(self):
            return 1000

        def __getitem__(self, i):
            return images[i], labels[i]
    seen_tensor = torch.cat([x.flatten() for x, _ in eval_batches(TensorData(images, labels), 64, 200)])
    seen_folder = torch.cat([x.flatten() for x, _ in eval_batches(Folder(), 64, 200)])
    assert seen_tensor.long().tolist() == seen_folder.long().tolist() == idx.tolist()
