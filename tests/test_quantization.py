"""BN folding and MQBench preparation."""
import pytest
import torch
import torch.nn as nn

from mrecg import zoo
from mrecg.config import QuantizeConfig
from mrecg.quantization import (calibrate, disable_all, fold_bn, prepare_model,
                                quantizer_bits)


def _randomise_bn(model):
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


@pytest.mark.parametrize('name,shape', [('mobilenet_v2_small', (4, 1, 8, 8)), ('resnet_small', (4, 1, 8, 8)),
                                        ('resnet18', (2, 3, 64, 64)), ('regnetx_600m', (2, 3, 64, 64))])
def test_bn_folding_keeps_float_outputs(name, shape):
    model = _randomise_bn(zoo.build_model(name)).eval()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(x)
        folded = fold_bn(model)
        after = model(x)
    assert folded > 0
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert torch.allclose(before, after, rtol=1e-4, atol=1e-4 * before.abs().max().item())


def test_first_and_last_layers_are_8_bit_and_quantizers_toggle(calibrated):
    model, folded, qmodel, fp, images = calibrated
    mods = dict(qmodel.named_modules())
    assert quantizer_bits(mods['features.0.0'].weight_fake_quant) == 8
    assert quantizer_bits(mods['classifier.1'].weight_fake_quant) == 8
    assert quantizer_bits(mods['features.3.conv.0'].weight_fake_quant) == 2
    with torch.no_grad():
        float_out = folded(images[:16])
        assert torch.allclose(fp(images[:16]), float_out, atol=1e-5)  # all quantizers off = float model
        quant_out = qmodel(images[:16])
    assert not torch.allclose(quant_out, float_out, atol=1e-3)


def test_calibration_sets_ranges():
    model = zoo.build_model('resnet_small').eval()
    settings = QuantizeConfig(w_qconfig={'bit': 4, 'p': 2.0}, a_qconfig={'bit': 4, 'p': 2.0})
    q = prepare_model(model, settings)
    calibrate(q, torch.randn(32, 1, 8, 8), 16, torch.device('cpu'))
    act = q.layer1_0_relu1_post_act_fake_quantizer
    assert act.fake_quant_enabled[0] == 1 and act.observer_enabled[0] == 0
    assert act.scale.item() != 1.0  # set by the observer
    disable_all(q)
    assert act.fake_quant_enabled[0] == 0
