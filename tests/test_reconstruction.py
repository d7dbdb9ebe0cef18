"""The reconstruction engine on the digits MobileNetV2 (CPU, seconds)."""
import copy
import math

import pytest
import torch

from mrecg.batching import StepBatches
from mrecg.config import ReconstructionConfig
from mrecg.reconstruction import Reconstructor, lp_loss, round_beta
from mrecg.units import UnitPartition, groups_from_spans, model_base_units


def make(calibrated, spans=(), iterations=40, prob=0.5, seed=0, loss_fn=None, per_unit=False, **kw):
    """A Reconstructor over a private copy of the session's calibrated model."""
    _, folded, qmodel, fp, images = calibrated
    q = copy.deepcopy(qmodel)
    part = UnitPartition.build(q, model_base_units(folded))
    settings = ReconstructionConfig(iterations=max(iterations, 1), enabled=iterations > 0, batch_size=16, prob=prob,
                                    weight=0.1, **kw)
    recon = Reconstructor(q, fp, part, groups_from_spans(list(spans), len(part.units)), settings,
                          torch.device('cpu'), seed, progress=False, chunk_size=32, iterations_per_unit=per_unit,
                          **({'loss_fn': loss_fn} if loss_fn else {}))
    recon.LOG_EVERY = 10
    return recon, q, images


def test_reconstruction_lowers_the_unit_loss(calibrated):
    nearest, _, images = make(calibrated, iterations=0)
    nearest.run(images)
    for prob in (1.0, 0.5):  # BRECQ and QDrop; lr 1e-2 so that 80 iterations suffice
        recon, _, _ = make(calibrated, iterations=80, prob=prob, lr=1e-2)
        results = recon.run(images)
        # the first unit sees the same input either way: its loss falls only through reconstruction
        assert recon.unit_losses[0] < 0.8 * nearest.unit_losses[0]
        assert results[0].iters == 80 and results[0].train_loss is not None


def test_network_input_step_stays_calibrated_inner_steps_are_learned(calibrated):
    recon, q, images = make(calibrated, iterations=30, scale_lr=1e-3)
    before = {n: m.scale.clone() for n, m in q.named_modules() if n.endswith('post_act_fake_quantizer')}
    recon.run(images)
    after = {n: m.scale for n, m in q.named_modules() if n.endswith('post_act_fake_quantizer')}
    inputs = [n for n in before if n.startswith('x_')]
    assert inputs == ['x_post_act_fake_quantizer']
    assert torch.equal(before[inputs[0]], after[inputs[0]])
    assert sum(not torch.equal(before[n], after[n]) for n in before if n not in inputs) >= len(before) - 2


def test_same_seed_same_numbers_and_other_seed_differs(calibrated):
    def once(seed):
        recon, q, images = make(calibrated, iterations=25, seed=seed)
        recon.run(images)
        return recon.unit_losses, {k: v.clone() for k, v in q.state_dict().items()}
    losses_a, state_a = once(3)
    losses_b, state_b = once(3)
    losses_c, _ = once(4)
    assert losses_a == losses_b
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert losses_a != losses_c


def test_merged_group_is_optimised_as_one_unit(calibrated):
    """Units 1 and 2 merged: one optimisation loop, whose loss is taken only at the group's output, moves
    the rounding of both units' layers at once."""
    seen = []

    def spy(pred, target):  # the training loss (with gradients) of each step, per output it compares
        if torch.is_grad_enabled():
            seen.append(tuple(pred.shape))
        return lp_loss(pred, target)
    recon, q, images = make(calibrated, spans=[(1, 2)], iterations=30, loss_fn=spy)
    part = recon.partition
    inits = {}
    results = recon.run(images, on_group_done=lambda res: inits.setdefault(len(res), None))
    names = [u.name for u in part.units]
    assert [r.name for r in results][:3] == [names[0], f'{names[1]}+{names[2]}', names[3]]
    merged = results[1]
    assert merged.base_units == names[1:3] and merged.iters == 30
    # one loss term per step, at the group's single output: the inner unit's output is never a target
    assert len(part.outputs_of(2, 2)) == 1 and len(seen) == 30 * len(results)
    # both units' layers got learned (hardened) rounding from that single loop
    mods = dict(q.named_modules())
    for unit in (1, 2):
        layers = [mods[n.target] for n in part.nodes_of(unit, unit)
                  if n.op == 'call_module' and hasattr(mods[n.target], 'weight_fake_quant')]
        assert layers and all(getattr(m.weight_fake_quant, 'hardened', False) for m in layers)
    # the inner unit still gets its own loss on the curve
    assert recon.unit_losses[1] is not None and math.isfinite(recon.unit_losses[1])


def test_iteration_budget_per_unit_gives_a_group_its_units_steps(calibrated):
    """mrecg.group_iterations: per_unit: a merged group of 3 units runs 3 x the iterations, with its
    rounding-temperature schedule stretched over them; single units keep theirs."""
    recon, _, images = make(calibrated, spans=[(1, 3)], iterations=20, per_unit=True)
    results = recon.run(images)
    assert [r.iters for r in results][:3] == [20, 60, 20]
    assert recon.group_iterations(recon.groups[1]) == 60
    plain, _, _ = make(calibrated, spans=[(1, 3)], iterations=20)
    assert plain.group_iterations(plain.groups[1]) == 20


def test_nan_loss_falls_back_to_last_good_state(calibrated):
    calls = {'n': 0}

    def poisoned(pred, target):  # the training loss goes NaN in unit 2 from its 25th iteration on
        loss = lp_loss(pred, target)
        if not torch.is_grad_enabled():
            return loss  # the per-unit loss after hardening stays finite
        calls['n'] += 1
        return loss * float('nan') if 40 + 25 <= calls['n'] else loss
    recon, q, images = make(calibrated, iterations=40, loss_fn=poisoned)
    results = recon.run(images)
    bad = results[1]
    assert bad.iters == 20 and len(bad.warnings) == 1 and 'non-finite loss' in bad.warnings[0]
    assert all(torch.isfinite(p).all() for p in q.parameters())
    assert all(math.isfinite(v) for v in recon.unit_losses)
    assert results[2].warnings  # later units are poisoned too, and each falls back
    assert all(math.isfinite(r.loss) for r in results)


def test_caches_are_freed_unit_by_unit(calibrated):
    recon, _, images = make(calibrated, iterations=2)
    sizes = []
    recon.run(images, on_group_done=lambda res: sizes.append((len(recon.streams.fp), len(recon.streams.q))))
    assert all(fp <= 1 and q <= 1 for fp, q in sizes)  # only the tensor the next unit reads
    assert recon.streams.fp == {} and recon.streams.q == {}


def test_half_precision_cache_stays_close(calibrated):
    full, _, images = make(calibrated, iterations=20)
    full.run(images)
    half, _, _ = make(calibrated, iterations=20, cache_dtype='float16')
    half.run(images)
    for a, b in zip(full.unit_losses, half.unit_losses):
        assert abs(a - b) <= 0.15 * a + 1e-6
    assert half.peak_cache_bytes < 0.6 * full.peak_cache_bytes


def test_bfloat16_autocast_step_is_active_and_stays_close(calibrated):
    full, _, images = make(calibrated, iterations=20)
    full.run(images)
    seen = []

    def loss_dtype(pred, target):
        seen.append(pred.dtype)
        return lp_loss(pred, target)
    bf16, _, _ = make(calibrated, iterations=20, autocast='bfloat16', loss_fn=loss_dtype)
    bf16.run(images)
    assert seen and set(seen) == {torch.float32}  # the loss is taken in float32
    assert bf16.unit_losses != full.unit_losses  # the convolutions really ran in bfloat16
    for a, b in zip(full.unit_losses, bf16.unit_losses):
        assert abs(a - b) <= 0.15 * a + 1e-6


def test_prefetch_gives_the_same_numbers(calibrated):
    """Gathering the next step's batch ahead (the GPU path's order of work, here on the CPU) changes nothing."""
    runs = []
    for prefetch in ('off', 'on'):
        recon, q, images = make(calibrated, spans=[(1, 2)], iterations=15, prefetch=prefetch, cache_dtype='float16')
        assert recon.policy.prefetch == (prefetch == 'on')
        recon.run(images)
        runs.append((recon.unit_losses, {k: v.clone() for k, v in q.state_dict().items()}))
    (losses_a, state_a), (losses_b, state_b) = runs
    assert losses_a == losses_b
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


@pytest.mark.parametrize('device', ['cpu'] + (['cuda'] if torch.cuda.is_available() else []))
def test_step_batches_lookahead_draws_the_same_rows(device):
    """Rows in float32 on the device, in the generator's order, with and without lookahead; from a bfloat16
    host cache to CUDA the lookahead copies on a side stream into pinned buffers."""
    sources = [torch.arange(40.).view(10, 4).to(torch.bfloat16), torch.randn(10, 2, 3)]
    draws = []
    for lookahead in (False, True):
        batches = StepBatches(sources, 10, 3, torch.Generator().manual_seed(7), torch.device(device), lookahead)
        draws.append([batches.next() for _ in range(5)])
    for (idx_a, rows_a), (idx_b, rows_b) in zip(*draws):
        assert torch.equal(idx_a, idx_b) and len(idx_a) == 3
        for a, b, src in zip(rows_a, rows_b, sources):
            assert a.dtype == b.dtype == torch.float32 and b.device.type == device
            assert torch.equal(a, b) and torch.equal(b.cpu(), src[idx_b.cpu()].float())
    assert len({tuple(idx.tolist()) for idx, _ in draws[0]}) > 1


def test_round_beta_schedule():
    assert round_beta(0, 100, 0.2, (20, 2)) == 20
    assert round_beta(20, 100, 0.2, (20, 2)) == 20
    assert round_beta(60, 100, 0.2, (20, 2)) == pytest.approx(11.0)
    assert round_beta(100, 100, 0.2, (20, 2)) == 2


def test_the_cache_estimate_is_never_below_the_measured_peak_and_close_to_it(calibrated):
    from mrecg.reconstruction import memory
    recon, _, images = make(calibrated, iterations=2)
    fp = recon.fp_model
    before = {k: v.clone() for k, v in fp.state_dict().items()}
    sizes = memory.per_image_bytes(fp, images, 4)
    assert all(torch.equal(before[k], v) for k, v in fp.state_dict().items())  # no statistic moved
    need, where = memory.peak_cache(recon.partition, recon.groups, sizes, len(images))
    recon.run(images)
    assert recon.peak_cache_bytes <= need <= 1.3 * recon.peak_cache_bytes, (need, recon.peak_cache_bytes, where)


def test_auto_cache_placement_keeps_the_gpu_while_the_caches_fit():
    from mrecg.reconstruction.memory import HEADROOM, cache_plan
    gpu, gib = torch.device('cuda', 0), 2 ** 30
    assert cache_plan('auto', gpu, 10 * gib, 24 * gib).device == gpu
    moved = cache_plan('auto', gpu, int(HEADROOM * 24 * gib) + 1, 24 * gib)
    assert moved.device.type == 'cpu' and 'host memory' in moved.reason and '24.0 GiB free' in moved.reason
    assert cache_plan('device', gpu, 100 * gib, 24 * gib).device == gpu  # asked for: kept, even if it will not fit
    assert cache_plan('cpu', gpu, 1, 24 * gib).device.type == 'cpu'
    assert cache_plan('auto', torch.device('cpu'), 100 * gib, None).device.type == 'cpu'


def test_auto_cache_placement_leaves_a_cpu_run_as_it_was(calibrated):
    recon, _, images = make(calibrated, iterations=0)
    policy = recon.policy
    recon.place_caches(images)
    assert recon.policy is policy and 'cache_reason' not in policy.describe()
