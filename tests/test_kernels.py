"""The kernel sets equal the reference (MQBench's arithmetic) on the CPU: values and gradients, the in-kernel
QDrop mask's statistics, the fused prologues, and the compiled engine's losses; CUDA variants where a GPU is."""
import copy
import math

import pytest
import torch

from mrecg import zoo
from mrecg.config import ConfigError, QuantizeConfig, ReconstructionConfig
from mrecg.kernels import KernelSet, StepSeeds, kernel_set, resolve
from mrecg.kernels.compiled import (CompiledActQuant, CompiledAdaRoundLayer, compiled_loss, hash_keep, keep_threshold,
                                    mix)
from mrecg.kernels.reference import ReferenceActQuant, ReferenceAdaRoundLayer, reference_loss
from mrecg.quantization import calibrate, init_adaround, prepare_model
from mrecg.reconstruction import Reconstructor
from mrecg.reconstruction.rounding import init_rounding, adaround_layers, train_graph
from mrecg.units import UnitPartition, groups_from_spans, model_base_units

CPU = torch.device('cpu')
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')


def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope='module')
def prepared():
    settings = QuantizeConfig(w_qconfig={'bit': 3, 'p': 2.0}, a_qconfig={'bit': 4, 'p': 2.0})
    q = prepare_model(zoo.build_model('resnet_small').eval(), settings)
    calibrate(q, torch.randn(32, 1, 8, 8, generator=gen(0)), 16, CPU)
    return q


def seeds_for(value, device=CPU):
    s = StepSeeds(torch.Generator(device=device).manual_seed(value), device)
    return s


# ---- the mask ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize('prob', [0.5, 0.25, 0.9])
def test_hash_mask_keep_rate_reproducible_and_independent(prob):
    like = torch.zeros(1 << 20)
    seeds = [torch.tensor(s * 0x9E3779B97F4A7C15 % 2 ** 62) for s in range(1, 4)]
    masks = [hash_keep(like, s, keep_threshold(prob)) for s in seeds]
    sigma = math.sqrt(prob * (1 - prob) / like.numel())
    for m in masks:
        assert abs(m.float().mean().item() - prob) < 5 * sigma
    assert torch.equal(masks[0], hash_keep(like, seeds[0], keep_threshold(prob)))
    # two seeds: independent draws agree with probability p^2 + (1 - p)^2
    agree = (masks[0] == masks[1]).float().mean().item()
    assert abs(agree - (prob ** 2 + (1 - prob) ** 2)) < 6 * sigma
    # neighbouring elements are uncorrelated (the index is hashed, not counted)
    m = masks[2].float()
    corr = torch.corrcoef(torch.stack([m[:-1], m[1:]]))[0, 1].item()
    assert abs(corr) < 0.01
    # the mask never reads the data: its keep rate over positive and negative inputs is the same
    x = torch.randn(like.shape, generator=gen(5))
    keep = hash_keep(x, seeds[0], keep_threshold(prob))
    pos, neg = keep[x > 0].float().mean().item(), keep[x <= 0].float().mean().item()
    assert abs(pos - neg) < 10 * sigma


def test_hash_mask_edges_and_step_seeds():
    like = torch.zeros(4096)
    assert hash_keep(like, torch.tensor(7), keep_threshold(1.0)).all()
    assert not hash_keep(like, torch.tensor(7), keep_threshold(0.0)).any()
    s = seeds_for(3)
    a, b = s.site(), s.site()
    s.draw()
    first = s.seeds.clone()
    s.draw()
    assert (a, b) == (0, 1) and first.shape == (2,) and not torch.equal(first, s.seeds)
    assert s[1].dim() == 0 and s[1].dtype == torch.int64


# ---- the activation quantizer -----------------------------------------------------------------------------
def _prologue_ref(a, b, act):
    x = a if b is None else a + b
    return {'none': x, 'relu': torch.relu(x), 'relu6': x.clamp(0, 6)}[act]


@pytest.mark.parametrize('act,residual', [('none', False), ('relu', True), ('relu6', False), ('relu', False)])
@pytest.mark.parametrize('prob,bounds', [(1.0, 'strict'), (0.5, 'strict'), (0.75, 'inclusive')])
def test_compiled_activation_oracle_equals_reference(prepared, act, residual, prob, bounds):
    """The compiled quantizer's Python (eager) with its prologue against MQBench's arithmetic on the prologue's
    output, mixed with the same mask."""
    q = copy.deepcopy(prepared.layer1_0_relu1_post_act_fake_quantizer)
    with torch.no_grad():
        q.zero_point.fill_(2)  # an asymmetric grid, both ends reached
    s = q.scale.detach().item()
    a = (torch.randn(8, 16, 8, 8, generator=gen(1)) * 12 * s).requires_grad_(True)
    b = (torch.randn(8, 16, 8, 8, generator=gen(2)) * 4 * s).requires_grad_(True) if residual else None
    upstream = torch.randn(a.shape, generator=gen(3))
    seeds = seeds_for(11)
    ours_q, ref_q = copy.deepcopy(q), copy.deepcopy(q)
    ours = CompiledActQuant(ours_q, seeds, bounds, eager=True)
    ours.act = act
    seeds.draw()
    ours_q.prob, ref_q.prob = prob, 1.0
    out = ours(a, b)
    (out * upstream).sum().backward()
    grads = [a.grad.clone()] + ([b.grad.clone()] if residual else [])
    a.grad = None
    if residual:
        b.grad = None
    x = _prologue_ref(a, b, act)
    ref = ReferenceActQuant(ref_q, None, bounds)(x)
    if prob < 1:
        ref = torch.where(hash_keep(x, seeds[ours.site], keep_threshold(prob)), ref, x)
    (ref * upstream).sum().backward()
    assert torch.equal(out, ref)
    assert torch.allclose(grads[0], a.grad, atol=1e-6)
    if residual:
        assert torch.allclose(grads[1], b.grad, atol=1e-6)
    assert torch.allclose(ours_q.scale.grad, ref_q.scale.grad, rtol=1e-4, atol=1e-4)


def test_compiled_kernels_equal_their_python(prepared):
    """torch.compile'd (inductor's C++ here, Triton on CUDA) against the same functions uncompiled: the mask bit
    for bit, values and gradients to float rounding."""
    q = copy.deepcopy(prepared.layer1_0_relu1_post_act_fake_quantizer)
    s = q.scale.detach().item()
    results = []
    for eager in (True, False):
        qi = copy.deepcopy(q)
        qi.prob = 0.5
        seeds = seeds_for(4)
        quant = CompiledActQuant(qi, seeds, 'strict', eager)
        quant.act = 'relu'
        site = seeds.site()
        seeds.draw()
        a = (torch.randn(4, 16, 8, 8, generator=gen(1)) * 10 * s).requires_grad_(True)
        b = (torch.randn(4, 16, 8, 8, generator=gen(2)) * 3 * s).requires_grad_(True)
        out = quant(a, b)
        (out * torch.randn(out.shape, generator=gen(3))).sum().backward()
        mask = mix(torch.ones(3, 5, 7), torch.zeros(3, 5, 7), 0.5, seeds, site, eager)
        loss_in = torch.randn(4, 16, 8, 8, generator=gen(6)).requires_grad_(True)
        loss = compiled_loss(loss_in, torch.randn(4, 16, 8, 8, generator=gen(7)), eager)
        loss.backward()
        results.append((out.detach(), a.grad, b.grad, qi.scale.grad, mask, loss.detach(), loss_in.grad))
    (o1, a1, b1, s1, m1, l1, g1), (o2, a2, b2, s2, m2, l2, g2) = results
    assert torch.equal(m1, m2) and 0 < m1.sum() < m1.numel()
    assert torch.allclose(o1, o2, atol=1e-6) and torch.equal(a1, a2) and torch.equal(b1, b2)
    assert torch.allclose(s1, s2, rtol=1e-5, atol=1e-6)
    assert torch.allclose(l1, l2, rtol=1e-6) and torch.allclose(g1, g2, atol=1e-7)


# ---- AdaRound and the loss --------------------------------------------------------------------------------
@pytest.mark.parametrize('reg_weight,beta', [(0.0, 20.0), (0.01, 20.0), (0.1, 3.7), (0.1, 2.0)])
def test_compiled_adaround_oracle_equals_reference(prepared, reg_weight, beta):
    ref = copy.deepcopy(prepared.get_submodule('layer1.0.conv2'))
    init_adaround(ref)
    with torch.no_grad():
        ref.weight_fake_quant.alpha.copy_(torch.randn(ref.weight.shape, generator=gen(4)) * 3)
    ours = copy.deepcopy(ref)
    x = torch.randn(4, 16, 8, 8, generator=gen(5))
    upstream = torch.randn(4, 16, 8, 8, generator=gen(6))
    reference = ReferenceAdaRoundLayer(ref)
    reference.regularise(1, reg_weight, beta)
    ((reference(x) * upstream).sum() + reference.penalty()).backward()
    table = torch.tensor([[0.0, 2.0], [reg_weight, beta]])
    layer = CompiledAdaRoundLayer(ours, table, eager=True)
    layer.regularise(1, reg_weight, beta)
    out = layer(x)
    (out * upstream).sum().backward()
    assert torch.allclose(out, ref(x), atol=1e-5)
    assert torch.allclose(ours.weight_fake_quant.alpha.grad, ref.weight_fake_quant.alpha.grad, rtol=1e-4, atol=1e-5)


def test_compiled_loss_equals_mqbench_lp_loss():
    pred = torch.randn(4, 6, 5, 5, generator=gen(1)).requires_grad_(True)
    target = torch.randn(4, 6, 5, 5, generator=gen(2))
    ours = compiled_loss(pred, target, eager=True)
    (g_ours,) = torch.autograd.grad(ours, pred)
    ref = reference_loss(pred, target)
    (g_ref,) = torch.autograd.grad(ref, pred)
    assert torch.allclose(ours, ref, rtol=1e-6) and torch.allclose(g_ours, g_ref, atol=1e-7)


# ---- graphs and the engine --------------------------------------------------------------------------------
@pytest.mark.parametrize('model', ['resnet_small', 'mobilenet_v2_small'])
def test_fused_prologues_give_the_reference_graph(model):
    """Folding each quantizer's add / relu / relu6 into it changes the graph, not its values or gradients."""
    settings = QuantizeConfig(w_qconfig={'bit': 3, 'p': 2.0}, a_qconfig={'bit': 4, 'p': 2.0})
    float_model = zoo.build_model(model).eval()
    base = prepare_model(float_model, settings)
    calibrate(base, torch.randn(16, 1, 8, 8, generator=gen(0)), 16, CPU)
    x = torch.randn(8, 1, 8, 8, generator=gen(1))
    fused_total, outs = 0, {}
    for name in ('reference', 'compiled'):
        q = copy.deepcopy(base)
        part = UnitPartition.build(q, model_base_units(float_model))
        for p in q.parameters():
            p.requires_grad_(False)
        h, values = x, []
        for g in groups_from_spans([], len(part.units)):
            init_rounding(adaround_layers(q, part, g))
            seeds = seeds_for(0)
            net = train_graph(q, part, g, part.outputs_of(g.first, g.last), KernelSet(name, eager=True),
                              seeds, 'strict', lambda: torch.tensor([[0.0, 2.0]]))
            seeds.draw()
            for m in net.act_quants:
                m.prob = 1.0
            for m in net.learned:
                m.scale.requires_grad_(True)
            hin = h.detach().requires_grad_(True)
            out = net.graph(hin)[0]
            out.square().sum().backward()
            values.append((out.detach(), hin.grad, [m.scale.grad for m in net.learned]))
            fused_total += net.fused
            h = out.detach()
        outs[name] = values
    assert fused_total > 0  # the model's add / relu(6) went into the quantizers
    for (o1, g1, s1), (o2, g2, s2) in zip(outs['reference'], outs['compiled']):
        assert torch.allclose(o1, o2, atol=1e-5) and torch.allclose(g1, g2, rtol=1e-4, atol=1e-5)
        assert all(torch.allclose(a, b, rtol=1e-3, atol=1e-5) for a, b in zip(s1, s2))


def _engine(calibrated, kernels, prob, iterations, seed=0, eager=None):
    _, folded, qmodel, fp, images = calibrated
    q = copy.deepcopy(qmodel)
    part = UnitPartition.build(q, model_base_units(folded))
    settings = ReconstructionConfig(iterations=iterations, batch_size=16, prob=prob, weight=0.1, kernels=kernels)
    recon = Reconstructor(q, fp, part, groups_from_spans([], len(part.units)), settings, CPU, seed,
                          progress=False, chunk_size=32)
    if eager is not None:
        recon.kernels = KernelSet(kernels, eager=eager)
    results = recon.run(images)
    return [r.train_loss for r in results], recon.unit_losses


def test_compiled_brecq_step_gives_the_cpu_kernels_losses(calibrated):
    """BRECQ (no random mask) over 100 steps per unit: the compiled step's losses are the eager kernels' within
    float tolerance (the same function, other summation orders)."""
    cpu_train, cpu_units = _engine(calibrated, 'cpu', 1.0, 100)
    comp_train, comp_units = _engine(calibrated, 'compiled', 1.0, 100)
    assert all(math.isfinite(v) for v in comp_units)
    for a, b in zip(cpu_train + cpu_units, comp_train + comp_units):
        assert abs(a - b) <= 2e-3 * abs(a) + 1e-7


def test_compiled_qdrop_equals_its_oracle_and_repeats(calibrated):
    """QDrop 0.5: the compiled step and its uncompiled Python draw the same masks (same losses); same seed,
    same numbers."""
    compiled = _engine(calibrated, 'compiled', 0.5, 30)
    assert compiled == _engine(calibrated, 'compiled', 0.5, 30)
    oracle = _engine(calibrated, 'compiled', 0.5, 30, eager=True)
    for a, b in zip(compiled[0] + compiled[1], oracle[0] + oracle[1]):
        assert abs(a - b) <= 2e-3 * abs(a) + 1e-7
    assert compiled != _engine(calibrated, 'compiled', 0.5, 30, seed=1)


def test_kernel_set_names_resolve_and_bad_names_are_refused():
    assert resolve('auto', CPU) == 'cpu' and resolve('compiled', CPU) == 'compiled'
    assert kernel_set('reference', CPU).explicit_regulariser and kernel_set('compiled', CPU).fuses_prologues
    with pytest.raises(ConfigError, match='kernels'):
        ReconstructionConfig(kernels='triton')
    with pytest.raises(ValueError, match='unknown kernel set'):
        kernel_set('triton', CPU)


# ---- CUDA (skipped without a GPU) -------------------------------------------------------------------------
@CUDA
def test_cuda_hash_mask_and_compiled_quantizer_equal_the_cpu():
    cuda = torch.device('cuda')
    like = torch.zeros(1 << 16)
    seed = torch.tensor(123456789)
    assert torch.equal(hash_keep(like, seed, keep_threshold(0.5)),
                       hash_keep(like.to(cuda), seed.to(cuda), keep_threshold(0.5)).cpu())
    s = seeds_for(2, cuda)
    site = s.site()
    s.draw()
    q, fp = torch.ones(1000, device=cuda), torch.zeros(1000, device=cuda)
    assert torch.equal(mix(q, fp, 0.5, s, site, eager=False), mix(q, fp, 0.5, s, site, eager=True))


@CUDA
@pytest.mark.parametrize('name', ['cuda', 'compiled', 'reference'])
def test_cuda_kernel_sets_run_a_unit(calibrated, name):
    _, folded, qmodel, fp, images = calibrated
    cuda = torch.device('cuda')
    q, f = copy.deepcopy(qmodel).to(cuda), copy.deepcopy(fp).to(cuda)
    part = UnitPartition.build(q, model_base_units(folded))
    settings = ReconstructionConfig(iterations=20, batch_size=16, prob=0.5, weight=0.1, kernels=name)
    recon = Reconstructor(q, f, part, groups_from_spans([], len(part.units)), settings, cuda, 0, progress=False,
                          chunk_size=32)
    assert recon.kernels.name == name
    recon.run(images)
    assert all(math.isfinite(v) for v in recon.unit_losses)
