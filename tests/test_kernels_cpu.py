"""The fast stand-ins compute MQBench's AdaRound / QDrop functions and gradients."""
import copy

import pytest
import torch

from mrecg import zoo
from mrecg.kernels.cpu import FastActQuant, FastAdaRoundLayer, dense_depthwise_plan, depthwise_dense, keep_mask
from mrecg.config import QuantizeConfig
from mrecg.quantization import calibrate, init_adaround, prepare_model


@pytest.fixture(scope='module')
def prepared():
    settings = QuantizeConfig(w_qconfig={'bit': 3, 'p': 2.0}, a_qconfig={'bit': 4, 'p': 2.0})
    q = prepare_model(zoo.build_model('resnet_small').eval(), settings)
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
        out_ref = torch.where(keep_mask(x, prob, torch.Generator().manual_seed(3)).bool(), out_ref, xr)
    (out_ref * upstream).sum().backward()
    xo = x.clone().requires_grad_(True)
    out = FastActQuant(ours_q, torch.Generator().manual_seed(3))(xo)
    (out * upstream).sum().backward()
    assert torch.allclose(out, out_ref, atol=1e-6)
    assert torch.allclose(xo.grad, xr.grad, atol=1e-6)
    assert torch.allclose(ours_q.scale.grad, ref_q.scale.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('reg_weight,beta', [(0.0, 20.0), (0.01, 20.0), (0.1, 3.7), (0.1, 2.0), (0.1, 1.5)])
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
        assert masks.dtype == like.dtype and masks.shape[1:] == like.shape
        assert set(masks.unique().tolist()) == {0.0, 1.0}
        assert abs(masks.float().mean().item() - round(prob * 256) / 256) < 0.005
    assert torch.equal(keep_mask(like, 0.5, torch.Generator().manual_seed(1)),
                       keep_mask(like, 0.5, torch.Generator().manual_seed(1)))


def test_activation_quantizer_with_zero_point_clamps_both_ends_like_mqbench(prepared):
    """An asymmetric step (zero point 3) and inputs beyond both ends of the grid: values and gradients equal."""
    ref_q, _ = _act(prepared)
    with torch.no_grad():
        ref_q.zero_point.fill_(3)
    ours_q = copy.deepcopy(ref_q)
    x = torch.randn(4, 16, 8, 8, generator=torch.Generator().manual_seed(7)) * 20 * ref_q.scale.detach()
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(8))
    ref_q.prob = ours_q.prob = 1.0
    xr, xo = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out_ref = ref_q(xr)
    (out_ref * upstream).sum().backward()
    out = FastActQuant(ours_q, None)(xo)
    (out * upstream).sum().backward()
    assert (out_ref == out_ref.min()).any() and (out_ref == out_ref.max()).any()  # both ends reached
    assert torch.equal(out, out_ref)  # MQBench's float ops in MQBench's order
    assert torch.allclose(xo.grad, xr.grad, atol=1e-6)  # MQBench's goes through * s / s: off by an ulp
    assert torch.allclose(ours_q.scale.grad, ref_q.scale.grad, rtol=1e-4, atol=1e-4)


def test_inclusive_ste_bounds_pass_the_gradient_at_the_grid_ends_only(prepared):
    """a_qconfig.ste_bounds: inclusive lets the gradient through where round(x / s) + zp is exactly qmin or
    qmax (torch 1.x's clamp), strict does not; values, and the gradient elsewhere, are the same."""
    q, _ = _act(prepared)
    q.prob = 1.0
    s, zp = q.scale.detach().reshape(()), float(q.zero_point.reshape(-1)[0])
    qmin, qmax = float(q.quant_min), float(q.quant_max)
    levels = torch.tensor([qmin - 1, qmin, qmin + 1, qmax - 1, qmax, qmax + 1])
    x = ((levels - zp) * s).reshape(1, 1, 1, -1)
    grads, outs = {}, {}
    for bounds in ('strict', 'inclusive'):
        xi = x.clone().requires_grad_(True)
        outs[bounds] = FastActQuant(copy.deepcopy(q), None, bounds)(xi)
        outs[bounds].sum().backward()
        grads[bounds] = xi.grad.flatten().tolist()
    assert torch.equal(outs['strict'], outs['inclusive'])
    assert grads['strict'] == [0, 0, 1, 1, 0, 0] and grads['inclusive'] == [0, 1, 1, 1, 1, 0]
    with pytest.raises(ValueError, match='strict or inclusive'):
        FastActQuant(q, None, 'loose')


@pytest.mark.parametrize('channels,size,kernel,stride,padding', [(8, 2, 3, 1, 1), (8, 2, 3, 2, 1), (6, 1, 3, 1, 1),
                                                                  (5, 2, 5, 1, 2)])
def test_depthwise_conv_on_tiny_maps_as_matrices_matches_conv2d(channels, size, kernel, stride, padding):
    layer = torch.nn.Conv2d(channels, channels, kernel, stride, padding, groups=channels)
    plan = dense_depthwise_plan(layer, size, size, torch.device('cpu'))
    assert plan is not None
    x = torch.randn(3, channels, size, size, generator=torch.Generator().manual_seed(9), requires_grad=True)
    w = layer.weight.detach().clone().requires_grad_(True)
    out = depthwise_dense(x, w, layer.bias, plan)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(10))
    gx, gw = torch.autograd.grad((out * upstream).sum(), (x, w))
    ref = torch.nn.functional.conv2d(x, w, layer.bias, stride, padding, groups=channels)
    rx, rw = torch.autograd.grad((ref * upstream).sum(), (x, w))
    assert out.shape == ref.shape
    assert torch.allclose(out, ref, atol=1e-5) and torch.allclose(gx, rx, atol=1e-5) and torch.allclose(gw, rw, atol=1e-5)


def test_depthwise_conv_keeps_the_conv_kernel_on_larger_maps():
    layer = torch.nn.Conv2d(8, 8, 3, 1, 1, groups=8)
    assert dense_depthwise_plan(layer, 4, 4, torch.device('cpu')) is None
