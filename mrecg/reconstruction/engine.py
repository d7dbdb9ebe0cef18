"""The run loop: groups of base units in network order, each through four phases.

1. float pass: the group's float outputs from the float stream (the reconstruction targets);
2. optimise the group's AdaRound variables and activation steps on random mini-batches of the cached
   inputs. QDrop (``prob`` < 1) feeds each input element from the quantized stream with probability
   ``prob`` and from the float stream otherwise, and every activation quantizer inside the group drops its
   quantization element-wise with the same probability; ``prob`` = 1 is BRECQ;
3. harden the rounding;
4. quantized pass: the group's quantized outputs, which later groups read as inputs, and the loss of
   every base unit in the group against the float stream.

Each group seeds its own generators from (seed, group index), so a run resumed at a group boundary
reproduces an uninterrupted run exactly. In a data-parallel run (``mrecg.distributed``) each rank draws its
share of every batch from its own streams (rank 0's are the single-process run's), gradients are averaged over
ranks and losses reduced. Where things run and with which kernels is the ``DevicePolicy``'s.
"""
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import torch
import torch.fx as fx
from tqdm import tqdm

from mrecg.batching import StepBatches
from mrecg.config import ReconstructionConfig
from mrecg.distributed import Dist
from mrecg.kernels import StepSeeds, lp_loss
from mrecg.reconstruction import memory
from mrecg.reconstruction.policy import DevicePolicy
from mrecg.reconstruction.rounding import adaround_layers, harden_rounding, init_rounding, train_graph
from mrecg.reconstruction.step import LOG_EVERY, Training, optimiser, regulariser_table
from mrecg.reconstruction.streams import DTYPES, Streams
from mrecg.units import Group, UnitPartition

log = logging.getLogger('mrecg')


@dataclass
class GroupResult:
    index: int
    name: str
    base_units: List[str]
    modules: List[str]
    loss: float
    train_loss: Optional[float]
    iters: int
    seconds: float
    warnings: List[str] = field(default_factory=list)


def group_seed(seed: int, index: int, stream: int) -> int:
    return (seed * 1_000_003 + index * 7919 + stream) % (2 ** 63)


class Reconstructor:
    """Runs groups of base units in order over cached float and quantized streams.

    ``qmodel`` is the prepared (fake-quantized, calibrated) model that gets reconstructed; ``fp_model`` is
    a prepared copy with every quantizer off, so its sub-graphs give the float stream. ``on_step(group, step)``
    is called after every optimisation step (for tools and tests; it must not synchronise to be free).
    """

    LOG_EVERY = LOG_EVERY

    def __init__(self, qmodel: fx.GraphModule, fp_model: fx.GraphModule, partition: UnitPartition,
                 groups: List[Group], settings: ReconstructionConfig, device: torch.device, seed: int,
                 progress: bool = True, loss_fn: Callable = lp_loss, chunk_size: int = 256, dist: Dist = Dist(),
                 iterations_per_unit: bool = False, ste_bounds: str = 'strict',
                 on_step: Optional[Callable[[int, int], None]] = None, deterministic: bool = False):
        self.qmodel, self.fp_model, self.partition, self.groups = qmodel, fp_model, partition, groups
        self.settings, self.device, self.seed, self.progress = settings, device, seed, progress and dist.main
        self.dist, self.iterations_per_unit, self.ste_bounds, self.on_step = dist, iterations_per_unit, ste_bounds, on_step
        self.iterations = settings.iterations if settings.enabled else 0
        self.loss_fn = loss_fn  # the unit losses' and, where not lp_loss, the training loss (the kernel set's else)
        self.policy = DevicePolicy.resolve(settings, device, deterministic)
        self.step_batch: Optional[int] = None  # images per step as run (fewer than asked when the set is smaller)
        self.kernels = self.policy.kernels
        self.streams = Streams(partition, groups, device, self.policy.cache_device, DTYPES[settings.cache_dtype],
                               chunk_size, loss_fn, dist)
        for p in list(qmodel.parameters()) + list(fp_model.parameters()):
            p.requires_grad_(False)  # only the active unit's rounding variables and steps get gradients

    @classmethod
    def from_config(cls, qmodel, fp_model, partition, groups, cfg, device: torch.device, progress: bool = False,
                    dist: Dist = Dist(), **overrides) -> 'Reconstructor':
        """The engine a run of ``cfg`` uses (every tool builds it here, so none times a different engine)."""
        options = dict(progress=progress, chunk_size=cfg.data.batch_size, dist=dist,
                       iterations_per_unit=cfg.mrecg.group_iterations == 'per_unit',
                       ste_bounds=cfg.quantize.a_qconfig.ste_bounds, deterministic=cfg.process.deterministic)
        options.update(overrides)
        settings = options.pop('settings', cfg.quantize.reconstruction)
        seed = options.pop('seed', cfg.process.seed)
        return cls(qmodel, fp_model, partition, groups, settings, device, seed, **options)

    # ---- views kept for callers ----------------------------------------------------------------------
    @property
    def unit_losses(self) -> List[Optional[float]]:
        return self.streams.unit_losses

    @property
    def peak_cache_bytes(self) -> int:
        return self.streams.peak_bytes

    def cache_bytes(self) -> int:
        return self.streams.nbytes()

    def group_iterations(self, group: Group) -> int:
        """Steps for a group: one unit's iterations (the paper), or one unit's per base unit it holds."""
        return self.iterations * ((group.last - group.first + 1) if self.iterations_per_unit else 1)

    # ---- optimisation --------------------------------------------------------------------------------
    def start_group(self, gi: int, group: Group, outputs: List[fx.Node], inputs: List[str]) -> Optional[Training]:
        """Everything one group's optimisation needs, seeded from (seed, group); None if nothing to learn."""
        s, streams = self.settings, self.streams
        layers = adaround_layers(self.qmodel, self.partition, group)
        if not layers or self.iterations == 0:
            return None
        init_rounding(layers)
        torch.manual_seed(group_seed(self.seed, gi, 0))
        own = 3 * self.dist.rank  # each rank its own streams; rank 0's are the single-process run's
        gen = torch.Generator(device=self.policy.cache_device).manual_seed(group_seed(self.seed, gi, 1 + own))
        rng = StepSeeds(torch.Generator(device=self.device).manual_seed(group_seed(self.seed, gi, 2 + own)),
                        self.device)  # QDrop's masks
        iterations = self.group_iterations(group)
        net = train_graph(self.qmodel, self.partition, group, outputs, self.kernels, rng, self.ste_bounds,
                          lambda: regulariser_table(iterations, s, self.device))
        alphas = [layer.weight_fake_quant.alpha for layer in layers]
        scales = [q.scale for q in net.learned] if s.scale_lr > 0 else []
        for p in scales:
            p.requires_grad_(True)
        adam, schedule = optimiser(alphas, scales, iterations, s, self.device)
        for q in net.act_quants:
            q.prob = s.prob
        n = len(streams.q[inputs[0]])  # this rank's shard
        mixed = [s.prob < 1.0 and streams.q[name] is not streams.fp[name] for name in inputs]
        mixers = [self.kernels.mixer(s.prob, rng) if mix else None for mix in mixed]
        targets = [o.name for o in outputs]
        sources = ([streams.q[name] for name in inputs] + [streams.fp[name] for name, mix in zip(inputs, mixed) if mix]
                   + [streams.fp[name] for name in targets])
        per_rank = min(s.batch_size, n * self.dist.world) // self.dist.world
        if self.step_batch is None and per_rank * self.dist.world < s.batch_size:
            log.warning('quantize.reconstruction.batch_size is %d but there are %d calibration images: every step '
                        'uses all %d', s.batch_size, n * self.dist.world, per_rank * self.dist.world)
        self.step_batch = per_rank * self.dist.world
        batches = StepBatches(sources, n, per_rank, gen, self.device, self.policy.prefetch)
        params = alphas + scales
        loss = self.kernels.loss if self.loss_fn is lp_loss else self.loss_fn
        return Training(net, self.kernels, loss, params, [p.detach().clone() for p in params], adam, schedule, batches, rng,
                        mixers, s, iterations, self.dist)

    def optimise(self, gi: int, group: Group, outputs: List[fx.Node], inputs: List[str], result: GroupResult) -> None:
        """Learn the group's rounding and activation steps, then harden the rounding."""
        t = self.start_group(gi, group, outputs, inputs)
        if t is None:
            return
        window, count = torch.zeros((), device=self.device), 0
        bar = tqdm(range(t.iterations), desc=f'[{gi + 1}/{len(self.groups)}] {result.name}', leave=False,
                   disable=not self.progress, mininterval=0.5)
        for step in bar:
            window += t.step(step).detach()
            count += 1
            if self.on_step is not None:
                self.on_step(gi, step)
            if count == self.LOG_EVERY or step + 1 == t.iterations:
                value, finite = t.read_window(window, count)
                window.zero_()
                count = 0
                if not self.keep_window(t, value, finite, step, result):
                    break
                bar.set_postfix(loss=f'{value:.4g}', refresh=False)
        bar.close()
        harden_rounding(adaround_layers(self.qmodel, self.partition, group))
        for q in t.net.act_quants:
            q.prob = 1.0
            q.scale.requires_grad_(False)

    def keep_window(self, t: Training, value: float, finite: bool, step: int, result: GroupResult) -> bool:
        """Record a finished loss window; on a non-finite loss or parameter, restore the last good state and
        say so (False stops the group)."""
        if not math.isfinite(value) or not finite:
            t.restore_good()
            msg = (f'non-finite loss in {result.name} at iteration {step + 1}: '
                   f'fell back to the state of iteration {result.iters}')
            log.warning(msg)
            result.warnings.append(msg)
            return False
        t.keep_good()
        result.iters = step + 1
        result.train_loss = value
        return True

    # ---- driver --------------------------------------------------------------------------------------
    def place_caches(self, images: torch.Tensor) -> None:
        """``cache_device: auto`` on a GPU: the caches stay on it when their estimated peak fits the free memory,
        else they live in host memory and the next batch is gathered ahead (said in the log and results.json)."""
        s = self.settings
        if s.cache_device != 'auto' or self.device.type != 'cuda':
            return
        sizes = memory.per_image_bytes(self.fp_model, images, DTYPES[s.cache_dtype].itemsize)
        need, _ = memory.peak_cache(self.partition, self.groups, sizes, len(images))
        plan = memory.cache_plan(s.cache_device, self.device, need, memory.free_device_memory(self.device))
        if plan.device != self.policy.cache_device:
            self.policy = self.policy.with_caches_on(plan.device, plan.reason, s.prefetch)
            self.streams.cache_device = plan.device
            log.warning(plan.reason)

    def run(self, images: torch.Tensor, done: Sequence[GroupResult] = (),
            on_group_done: Optional[Callable[[List[GroupResult]], None]] = None) -> List[GroupResult]:
        """Reconstruct every group. The first ``len(done)`` groups are already finished (resume): their
        streams are replayed, not re-optimised. ``on_group_done`` gets the results so far after each group."""
        streams, units = self.streams, self.partition.units
        self.place_caches(images)
        streams.start(images)
        results = list(done)
        with self.policy.applied():
            for gi, group in enumerate(self.groups):
                t0 = time.perf_counter()
                resumed = gi < len(done)
                inputs = [n.name for n in self.partition.inputs_of(group.first, group.last)]
                outputs = self.partition.outputs_of(group.first, group.last)
                probe = streams.probe_nodes(group)
                inner = streams.float_pass(self.fp_model, group, inputs, outputs, probe)
                if not resumed:
                    result = GroupResult(gi, group.name(units), [u.name for u in units[group.first:group.last + 1]],
                                         group.modules(units), float('nan'), None, 0, 0.0)
                    self.optimise(gi, group, outputs, inputs, result)
                streams.free_float_inputs(inputs, gi)
                streams.quant_pass(self.qmodel, group, inputs, probe, inner)
                del inner
                streams.free(gi)
                if not resumed:
                    result.loss = streams.unit_losses[group.last]
                    result.seconds = time.perf_counter() - t0
                    results.append(result)
                    log.info('unit %d/%d %s: loss %.5g, %d iterations, %.1f s%s', gi + 1, len(self.groups),
                             result.name, result.loss, result.iters, result.seconds,
                             ''.join(f' [warning: {w}]' for w in result.warnings))
                    if on_group_done is not None:
                        on_group_done(results)
        return results
