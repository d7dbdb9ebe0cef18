"""The fast stand-ins compute MQBench's AdaRound / QDrop functions and gradients."""
import copy

import pytest
import torch

import models
from mrecg.fastquant import FastActQuant, FastAdaRoundLayer, keep_mask
from mrecg.quantization import QuantizerSpec, QuantSettings, calibrate, init_adaround, prepare_model


@pytest.fixture(scope='module')
def prepared():
    settings = QuantSettings(QuantizerSpec(3, 'AdaRoundFakeQuantize', 'MSEObserver', per_channel=True, p=2.0),
                             QuantizerSpec(4, 'QDropFakeQuantize', 'EMAMSEObserver', p=2.0))
    q = prepare_model(models.build_model('resnet_small').eval(), settings)
    calibrate(q, torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(0)), 16, torch.device('cpu'))
    return q


def _act(prepared):
    q = copy.deepcopy(prepared.layer1_0_relu1_post_act_fake_quantizer)
    x = (torch.randn(8, 16, 8, 8, generator=torch.Generator().manual_seed(1)) * 2).relu()
    return q, x


@pytest.mark.parametrize('prob', [1.0, 0.5, 0.75])
def test_activation_quantizer_matches_mqbench(prepared, prob):
    ref_q, x = _act(prepared)
    ours_q = copy.deepcopy(ref_q)
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    ref_q.prob = 1.0  # MQBench draws its own mask: apply ours to its quantized output instead
    ours_q.prob = prob
    xr = x.clone().requires_grad_(True)
    out_ref = ref_q(xr)
    if prob < 1:
        out_ref = torch.where(keep_mask(x, prob, torch.Generator().manual_seed(3)), out_ref, xr)
    (out_ref * upstream).sum().backward()
    xo = x.clone().requires_grad_(True)
    out = FastActQuant(ours_q, torch.Generator().manual_seed(3))(xo)
    (out * upstream).sum().backward()
    assert torch.allclose(out, out_ref, atol=1e-6)
    assert torch.allclose(xo.grad, xr.grad, atol=1e-6)
    assert torch.allclose(ours_q.scale.grad, ref_q.scale.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('reg_weight,beta', [(0.0, 20.0), (0.01, 20.0), (0.1, 3.7), (0.1, 2.0)])
def test_adaround_weight_and_regulariser_gradient_match_mqbench(prepared, reg_weight, beta):
    ref = copy.deepcopy(prepared.get_submodule("layer1.0.conv2"))
    init_adaround(ref)
    with torch.no_grad():  # spread the rounding variables over the sigmoid's range, both clamps included
        ref.weight_fake_quant.alpha.copy_(torch.randn(ref.weight.shape, generator=torch.Generator().manual_seed(4)) * 3)
    ours = copy.deepcopy(ref)
    x = torch.randn(4, 16, 8, 8, generator=torch.Generator().manual_seed(5))
    upstream = torch.randn(4, 16, 8, 8, generator=torch.Generator().manual_seed(6))
    fq = ref.weight_fake_quant
    out_ref = ref(x)  # MQBench: adaround_forward inside the weight fake-quantizer
    reg = reg_weight * (1 - ((fq.rectified_sigmoid() - 0.5).abs() * 2).pow(beta)).sum()
    ((out_ref * upstream).sum() + reg).backward()
    fast = FastAdaRoundLayer(ours)
    fast.reg_weight, fast.beta = reg_weight, beta
    out = fast(x)
    (out * upstream).sum().backward()
    assert torch.allclose(out, out_ref, atol=1e-5)
    assert torch.allclose(ours.weight_fake_quant.alpha.grad, fq.alpha.grad, rtol=1e-4, atol=1e-5)


def test_keep_mask_probability_and_reproducibility():
    like = torch.zeros(64, 32, 8, 8)
    for prob in (0.5, 0.25, 0.9):
        masks = torch.stack([keep_mask(like, prob, torch.Generator().manual_seed(s)) for s in range(8)])
        assert masks.dtype == torch.bool and masks.shape[1:] == like.shape
        assert abs(masks.float().mean().item() - round(prob * 256) / 256) < 0.005
    assert torch.equal(keep_mask(like, 0.5, torch.Generator().manual_seed(1)),
                       keep_mask(like, 0.5, torch.Generator().manual_seed(1)))
