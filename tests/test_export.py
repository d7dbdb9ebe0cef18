"""ONNX export: low-bit initializers with the claimed types and ranges, QDQ activations with their exact
range, onnxruntime agreeing with the fake-quant model, the CLI and the folder script."""
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
import yaml
from onnx import TensorProto, numpy_helper

import mrecg
from conftest import ROOT, TINY, deep_update
from mrecg.cli import main
from mrecg.data import digits, eval_batches
from mrecg.export import ExportError, ExportReport, check_export
from mrecg.quantization import is_act_quantizer, quantizer_bits
from mrecg.zoo import load_checkpoint


def quantized(name, w_bit, a_bit, iterations=20):
    model = mrecg.create_model(name)
    load_checkpoint(model, os.path.join(ROOT, 'models', 'checkpoints', f'{name}_digits.pth'))
    cfg = {'data': {'batch_size': 64}, 'process': {'device': 'cpu', 'seed': 1},
           'quantize': {'w_qconfig': {'bit': w_bit, 'p': 2.0}, 'a_qconfig': {'bit': a_bit, 'p': 2.0}, 'cali_size': 128,
                        'reconstruction': {'iterations': iterations, 'batch_size': 16, 'weight': 0.1}}}
    test = digits('val', 0)
    return mrecg.quantize(model, digits('train', 0), cfg, eval_data=test), test


@pytest.mark.parametrize('name', ['mobilenet_v2_small', 'resnet_small'])
@pytest.mark.parametrize('w_bit,a_bit', [(2, 4), (3, 3), (4, 4)])
def test_export_has_low_bit_weights_exact_ranges_and_runs_in_onnxruntime(name, w_bit, a_bit, tmp_path):
    result, test = quantized(name, w_bit, a_bit)
    report = mrecg.export_onnx(result.model, str(tmp_path / 'm.onnx'), test.images[:4], eval_batches(test, 100))
    graph = onnx.load(report.path).graph
    inits = {i.name: i for i in graph.initializer}
    layers = {n: m for n, m in result.model.named_modules() if hasattr(m, 'weight_fake_quant')}
    for layer_name, layer in layers.items():
        bits = quantizer_bits(layer.weight_fake_quant)
        q = inits[f'{layer_name}.weight_q']
        assert q.data_type == (TensorProto.UINT4 if bits <= 4 else TensorProto.UINT8)
        values = numpy_helper.to_array(q).astype(np.int64)
        assert values.min() >= 0 and values.max() <= 2 ** bits - 1 and values.shape == tuple(layer.weight.shape)
        assert bits == (8 if layer_name in ('features.0.0', 'classifier.1', 'conv1', 'fc') else w_bit)
        scale = numpy_helper.to_array(inits[f'{layer_name}.weight_scale']).reshape(-1, *[1] * (values.ndim - 1))
        zero = numpy_helper.to_array(inits[f'{layer_name}.weight_zero_point']).astype(np.int64)
        with torch.no_grad():
            expected = layer.weight_fake_quant(layer.weight).numpy()
        assert np.array_equal((values - zero.reshape(scale.shape)).astype(np.float32) * scale, expected)
    assert report.weight_types == {'uint8': 2, 'uint4': len(layers) - 2}
    act_quants = [m for m in result.model.modules() if is_act_quantizer(m)]
    ops = [n.op_type for n in graph.node]
    assert ops.count('QuantizeLinear') == len(act_quants)
    low = sum(quantizer_bits(q) < 8 for q in act_quants)
    assert sum(n.op_type == 'Clip' and n.name.endswith('.clip') for n in graph.node) == low > 0
    # onnxruntime computes what the fake-quant model computes, up to float summation order
    assert report.fake_quant_top1 == result.accuracy.top1 and report.eval_images == 500
    assert report.agreement >= 99.0 and abs(report.onnxruntime_top1 - report.fake_quant_top1) <= 0.4
    assert report.file_bytes < report.float_file_bytes / 2.5


def test_the_exported_activation_range_is_exact():
    """A 2-bit activation in an 8-bit container: without the Clip it could take 256 values."""
    result, test = quantized('resnet_small', 4, 2, iterations=5)
    import onnxruntime as ort
    from mrecg.export import build_onnx
    model, _ = build_onnx(result.model, test.images[:4])
    name = next(n.output[0] for n in model.graph.node if n.name.endswith('.clip'))
    model.graph.output.append(onnx.helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=['CPUExecutionProvider'])
    values = session.run([name], {'input': test.images[:64].numpy() * 50})[0]  # far outside the range
    assert len(np.unique(values)) <= 4


def test_cli_export_and_the_folder_script_agree(tmp_path, capsys):
    cfg = deep_update(TINY, {'quantize': {'w_qconfig': {'bit': 4}, 'a_qconfig': {'bit': 8}}})
    path = tmp_path / 'cfg.yaml'
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / 'run'
    assert main(['--config', str(path), '--output', str(out), '--no-progress', '--export', 'onnx']) == 0
    assert 'onnx: ' in capsys.readouterr().out
    r = json.loads((out / 'results.json').read_text())
    e = r['export']
    assert e['fake_quant_top1'] == r['quant_top1'] and e['onnxruntime_top1'] == r['quant_top1']
    assert os.path.isfile(out / 'model.onnx') and os.path.isfile(out / 'model.float.onnx')
    assert e['check']['passed'] is True and e['check']['rule']['min_agreement'] == 99.0
    listed = json.loads((out / 'export_mismatches.json').read_text())
    assert len(listed['positions']) == e['disagreeing_images'] == len(listed['dataset_indices'])
    again = subprocess.run([sys.executable, '-m', 'mrecg', 'export', str(out)],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    e2 = json.loads((out / 'results.json').read_text())['export']
    assert (e2['onnxruntime_top1'], e2['fake_quant_top1'], e2['max_logit_diff']) == \
        (e['onnxruntime_top1'], e['fake_quant_top1'], e['max_logit_diff'])


def test_a_model_from_a_file_exports(tmp_path):
    from test_any_model import TinyResNet
    model = TinyResNet()
    images = digits('train', 0).images
    result = mrecg.quantize(model, images, {'data': {'batch_size': 32}, 'process': {'device': 'cpu'}, 'quantize': {
        'cali_size': 32, 'reconstruction': {'iterations': 2, 'batch_size': 8}}})
    test = digits('val', 0)
    report = mrecg.export_onnx(result.model, str(tmp_path / 'tiny.onnx'), images[:2], eval_batches(test, 100))
    assert report.weight_types['uint4'] == 2 and report.agreement >= 99.0


def report(ort, fq, agreement, images, differ):
    return ExportReport('m.onnx', 'm.float.onnx', 21, 1, 2, onnxruntime_top1=ort, fake_quant_top1=fq,
                        agreement=agreement, max_logit_diff=0.5, eval_images=images, top1_gap=abs(ort - fq),
                        disagreements=list(range(differ)))


def test_the_check_wants_agreement_and_a_small_gap():
    """>= 99 % of the images with the same top-1 class AND a top-1 gap <= max(0.1 point, 2 images)."""
    check_export(report(96.0, 95.6, 99.6, 500, 2))  # 2 of 500 images: 0.4 points, allowed
    check_export(report(97.0, 97.05, 100.0, 10000, 0))
    with pytest.raises(ExportError) as exc:  # 3 images of 500 move the top-1
        check_export(report(96.0, 95.4, 99.4, 500, 3), mismatches='DIR/export_mismatches.json')
    assert '99.40 % of 500 images' in str(exc.value) and 'differ by 0.60 points' in str(exc.value)
    assert '3 images differ; they are listed in DIR/export_mismatches.json' in str(exc.value)
    with pytest.raises(ExportError, match='rule: >= 99.0'):  # a small gap, but 2 % of the images disagree
        check_export(report(90.0, 90.0, 98.0, 10000, 200))
    with pytest.raises(ExportError, match=r'rule: <= 0\.10'):  # big set: 0.1 point is more than 2 images
        check_export(report(90.0, 90.2, 99.8, 10000, 20))
    from mrecg.config import ExportConfig
    check_export(report(90.0, 90.2, 99.8, 10000, 20), ExportConfig(max_top1_gap=0.25))  # thresholds are settable
    r = report(96.0, 95.6, 99.6, 500, 2)
    from mrecg.export import judge_export
    assert judge_export(r) and r.check['allowed_gap'] == 0.4 and r.to_dict()['disagreeing_images'] == 2


def test_an_operation_without_onnx_form_is_named():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 4, 3)

        def forward(self, x):
            y = torch.sigmoid(self.conv(x))
            return y.view(y.size(0), -1)
    result = mrecg.quantize(Odd(), torch.randn(8, 1, 8, 8), {'data': {'batch_size': 8}, 'process': {'device': 'cpu'},
                                                             'quantize': {'cali_size': 8, 'reconstruction': {
                                                                 'iterations': 1, 'batch_size': 4}}})
    with pytest.raises(ExportError, match=r'method .size\(\) at size has no ONNX form'):
        mrecg.export_onnx(result.model, '/tmp/never_written.onnx', torch.randn(1, 1, 8, 8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
def test_the_fake_quant_reference_on_the_gpu_agrees_as_on_the_cpu(tmp_path):
    """The export check's fake-quant model may run on the run's GPU: same verdict, model back on the CPU."""
    result, test = quantized('resnet_small', 4, 4)
    cpu = mrecg.export_onnx(result.model, str(tmp_path / 'cpu.onnx'), test.images[:4], eval_batches(test, 100))
    gpu = mrecg.export_onnx(result.model, str(tmp_path / 'gpu.onnx'), test.images[:4], eval_batches(test, 100),
                            device='cuda')
    assert abs(gpu.fake_quant_top1 - cpu.fake_quant_top1) <= 100.0 * 2 / cpu.eval_images
    assert gpu.agreement >= 99.0 and next(result.model.parameters()).device.type == 'cpu'
