"""Unit-by-unit reconstruction (AdaRound rounding + activation steps, BRECQ / QDrop), over any grouping.

For each group of adjacent base units, in network order:

1. float pass: the group's float outputs from the float stream (the reconstruction targets);
2. optimise the group's AdaRound variables and activation steps on random mini-batches of the cached
   inputs. QDrop (``prob`` < 1) feeds each input element from the quantized stream with probability
   ``prob`` and from the float stream otherwise, and every activation quantizer inside the group drops its
   quantization element-wise with the same probability; ``prob`` = 1 is BRECQ;
3. harden the rounding;
4. quantized pass: the group's quantized outputs, which later groups read as inputs, and the loss of
   every base unit in the group against the float stream.

Both streams are cached tensors over the whole calibration set, propagated one group at a time: no pass
ever re-runs the network from the input. A cached tensor is freed as soon as no later group reads it.
Each group seeds its own generators from (seed, group index), so a run resumed at a group boundary
reproduces an uninterrupted run exactly. In a data-parallel run (``mrecg.distributed``) the caches hold this
rank's shard of the calibration images, each rank draws its share of every batch from its own streams (rank 0's
are the single-process run's), gradients are averaged over ranks and losses reduced.
"""
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from tqdm import tqdm

from mrecg.batching import StepBatches
from mrecg.config import ReconstructionConfig
from mrecg.distributed import Dist
from mrecg.fastquant import FastActQuant, FastAdaRoundLayer, keep_mask
from mrecg.quantization import harden_adaround, init_adaround, is_act_quantizer, is_adaround_layer
from mrecg.units import Group, UnitPartition, liveness

log = logging.getLogger('mrecg')
DTYPES = {'float32': torch.float32, 'float16': torch.float16, 'bfloat16': torch.bfloat16}


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


@dataclass
class Training:
    """The state of one group's optimisation (see ``Reconstructor._start_group``)."""
    graph: fx.GraphModule
    weight_layers: List[torch.nn.Module]
    fast_layers: List[torch.nn.Module]
    act_quants: List[torch.nn.Module]
    params: List[torch.Tensor]
    good: List[torch.Tensor]
    optimiser: torch.optim.Optimizer
    schedule: object
    batches: StepBatches
    mask_gen: torch.Generator
    inputs: List[str]
    targets: List[str]
    mixed: List[bool]
    iterations: int


def lp_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error summed over channels, averaged over batch and positions (BRECQ/QDrop/MQBench's
    ``(pred - target).pow(2).sum(1).mean()``, as one fused kernel forward and one backward)."""
    return F.mse_loss(pred, target, reduction='sum') / (pred.numel() // pred.shape[1])


def round_beta(step: int, iterations: int, warm_up: float, b_range: Sequence[float]) -> float:
    """The AdaRound regulariser's exponent: b_range[0] during warm-up, then linear down to b_range[1]."""
    start = warm_up * iterations
    if step < start:
        return float(b_range[0])
    rel = (step - start) / max(iterations - start, 1)
    return float(b_range[1] + (b_range[0] - b_range[1]) * max(0.0, 1.0 - rel))


def group_seed(seed: int, index: int, stream: int) -> int:
    return (seed * 1_000_003 + index * 7919 + stream) % (2 ** 63)


class Reconstructor:
    """Runs groups of base units in order over cached float and quantized streams.

    ``qmodel`` is the prepared (fake-quantized, calibrated) model that gets reconstructed; ``fp_model`` is
    a prepared copy with every quantizer off, so its sub-graphs give the float stream.
    """

    LOG_EVERY = 50  # iterations per loss window (the progress bar's number and the non-finite check)

    def __init__(self, qmodel: fx.GraphModule, fp_model: fx.GraphModule, partition: UnitPartition,
                 groups: List[Group], settings: ReconstructionConfig, device: torch.device, seed: int,
                 progress: bool = True, loss_fn: Callable = lp_loss, chunk_size: int = 256, dist: Dist = Dist(),
                 iterations_per_unit: bool = False, ste_bounds: str = 'strict'):
        self.qmodel, self.fp_model, self.partition, self.groups = qmodel, fp_model, partition, groups
        self.settings, self.device, self.seed, self.progress = settings, device, seed, progress and dist.main
        self.dist = dist
        self.iterations = settings.iterations if settings.enabled else 0
        self.iterations_per_unit = iterations_per_unit
        self.ste_bounds = ste_bounds
        self.loss_fn, self.chunk_size = loss_fn, chunk_size
        self.cache_device = torch.device('cpu') if settings.cache_device == 'cpu' else device
        self.lookahead = (settings.prefetch == 'on' or settings.prefetch == 'auto' and device.type == 'cuda'
                          and self.cache_device.type == 'cpu')
        self.cache_dtype = DTYPES[settings.cache_dtype]
        self.last_use = liveness(partition, groups)
        self.fp_cache: Dict[str, torch.Tensor] = {}
        self.q_cache: Dict[str, torch.Tensor] = {}
        self.unit_losses: List[Optional[float]] = [None] * len(partition.units)
        self.peak_cache_bytes = 0
        for p in list(qmodel.parameters()) + list(fp_model.parameters()):
            p.requires_grad_(False)  # only the active unit's rounding variables and steps get gradients

    # ---- caches --------------------------------------------------------------------------------------
    def _fetch(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.device, torch.float32, non_blocking=True)

    def _write(self, cache: Dict[str, torch.Tensor], name: str, start: int, chunk: torch.Tensor, total: int) -> None:
        if start == 0:
            cache[name] = torch.empty((total, *chunk.shape[1:]), dtype=self.cache_dtype, device=self.cache_device)
        cache[name][start:start + len(chunk)].copy_(chunk)

    def cache_bytes(self) -> int:
        sizes = {}
        for cache in (self.fp_cache, self.q_cache):
            for t in cache.values():
                sizes[t.data_ptr()] = t.numel() * t.element_size()
        return sum(sizes.values())

    def _free(self, group_index: int) -> None:
        """Drop every cached tensor no group after ``group_index`` reads."""
        for cache in (self.fp_cache, self.q_cache):
            for name in [n for n in cache if self.last_use.get(n, -1) <= group_index]:
                del cache[name]

    # ---- passes --------------------------------------------------------------------------------------
    @torch.no_grad()
    def _pass(self, graph: fx.GraphModule, inputs: List[str], cache: Dict[str, torch.Tensor],
              sink: Callable[[int, Sequence[torch.Tensor]], None]) -> None:
        """Run ``graph`` over the whole calibration set in chunks, handing each chunk's outputs to ``sink``."""
        total = len(cache[inputs[0]])
        for start in range(0, total, self.chunk_size):
            stop = start + self.chunk_size
            sink(start, graph(*[self._fetch(cache[name][start:stop]) for name in inputs]))

    def _float_pass(self, group: Group, inputs: List[str], outputs: List[fx.Node], probe: List[fx.Node]):
        """Float outputs of the group into the float cache; outputs of inner base units (consumed inside an
        MRECG group, needed only for their loss) are kept as chunk lists until the quantized pass."""
        graph = self.partition.build_graph(self.fp_model, group.first, group.last, probe)
        total = len(self.fp_cache[inputs[0]])
        inner: Dict[fx.Node, List[torch.Tensor]] = {n: [] for n in probe if n not in outputs}

        def sink(start, outs):
            for node, out in zip(probe, outs):
                if node in inner:
                    inner[node].append(out.to(self.cache_device, self.cache_dtype))
                else:
                    self._write(self.fp_cache, node.name, start, out, total)
        self._pass(graph, inputs, self.fp_cache, sink)
        return inner

    def _quant_pass(self, group: Group, inputs: List[str], outputs: List[fx.Node], probe: List[fx.Node],
                    inner: Dict[fx.Node, List[torch.Tensor]]) -> None:
        """Quantized outputs of the group into the quantized cache, and the loss of each base unit in it."""
        graph = self.partition.build_graph(self.qmodel, group.first, group.last, probe)
        total = len(self.q_cache[inputs[0]])
        sums = {n: 0.0 for n in probe}

        def sink(start, outs):
            chunk = start // self.chunk_size
            for node, out in zip(probe, outs):
                ref = inner[node][chunk] if node in inner else self.fp_cache[node.name][start:start + len(out)]
                sums[node] += self.loss_fn(out, ref.to(out.device, torch.float32)).item() * len(out)
                if node not in inner:
                    self._write(self.q_cache, node.name, start, out, total)
        self._pass(graph, inputs, self.q_cache, sink)
        *reduced, total = self.dist.sum([*sums.values(), total], self.device)
        sums = dict(zip(sums, reduced))
        for u in range(group.first, group.last + 1):
            self.unit_losses[u] = sum(sums[n] / total for n in self.partition.outputs_of(u, u))

    def _probe_nodes(self, group: Group) -> List[fx.Node]:
        """Every base unit's outputs (for the per-unit loss); includes the group's own outputs."""
        probe: List[fx.Node] = []
        for u in range(group.first, group.last + 1):
            probe += [n for n in self.partition.outputs_of(u, u) if n not in probe]
        return probe

    # ---- optimisation --------------------------------------------------------------------------------
    def train_graph(self, group: Group, outputs: List[fx.Node], generator: torch.Generator):
        """The group's sub-graph for optimisation: AdaRound layers and activation quantizers replaced by
        their fast stand-ins (sharing the MQBench modules' parameters). Call after ``init_adaround``.
        Returns the graph, the AdaRound layers, every activation quantizer (QDrop applies to all) and those whose
        step is learned: all but the network input's, which keeps its calibrated step as in MQBench (Adam moves
        a step by about ``scale_lr`` per iteration, a large fraction of an 8-bit input step: up to -18 % in
        300 iterations, which cost BRECQ 0.8-1.1 top-1 on the Fashion benchmark)."""
        modules = dict(self.qmodel.named_modules())
        root, layers, act_quants, learned = {}, [], [], []
        for node in self.partition.nodes_of(group.first, group.last):
            if node.op == 'get_attr':
                root[node.target] = self.qmodel.get_parameter(node.target) if node.target in dict(
                    self.qmodel.named_parameters()) else self.qmodel.get_buffer(node.target)
            if node.op != 'call_module':
                continue
            m = modules[node.target]
            if is_adaround_layer(m) and getattr(m.weight_fake_quant, 'adaround', False):
                root[node.target] = FastAdaRoundLayer(m)
                layers.append(root[node.target])
            elif is_act_quantizer(m):
                root[node.target] = FastActQuant(m, generator, self.ste_bounds)
                act_quants.append(m)
                if not any(arg.op == 'placeholder' for arg in node.all_input_nodes):
                    learned.append(m)
            else:
                root[node.target] = m
        return self.partition.build_graph(root, group.first, group.last, outputs), layers, act_quants, learned

    def _optimise(self, gi: int, group: Group, outputs: List[fx.Node], inputs: List[str],
                  result: GroupResult) -> None:
        """Learn the group's rounding and activation steps, then harden the rounding."""
        t = self._start_group(gi, group, outputs, inputs)
        if t is None:
            return
        window, window_count = torch.zeros((), device=self.device), 0
        bar = tqdm(range(t.iterations), desc=f'[{gi + 1}/{len(self.groups)}] {result.name}', leave=False,
                   disable=not self.progress, mininterval=0.5)
        for step in bar:
            window += self._step(t, step).detach()
            window_count += 1
            if window_count == self.LOG_EVERY or step + 1 == t.iterations:
                value = self.dist.sum([(window / window_count).item()], self.device)[0] / self.dist.world
                window.zero_()
                window_count = 0
                if not self._keep_window(t, value, step, result):
                    break
                bar.set_postfix(loss=f'{value:.4g}', refresh=False)
        bar.close()
        self._finish_group(t)

    def _start_group(self, gi: int, group: Group, outputs: List[fx.Node], inputs: List[str]) -> Optional['Training']:
        """Everything one group's optimisation needs, seeded from (seed, group); None if nothing to learn."""
        s = self.settings
        modules = dict(self.qmodel.named_modules())
        weight_layers = [modules[n.target] for n in self.partition.nodes_of(group.first, group.last)
                         if n.op == 'call_module' and is_adaround_layer(modules[n.target])]
        if not weight_layers or self.iterations == 0:
            return None
        for layer in weight_layers:
            init_adaround(layer)
        torch.manual_seed(group_seed(self.seed, gi, 0))
        own = 3 * self.dist.rank  # each rank its own streams; rank 0's are the single-process run's
        gen = torch.Generator().manual_seed(group_seed(self.seed, gi, 1 + own))  # batches (CPU)
        mask_gen = torch.Generator(device=self.device).manual_seed(group_seed(self.seed, gi, 2 + own))  # QDrop
        graph, fast_layers, act_quants, learned_quants = self.train_graph(group, outputs, mask_gen)
        alphas = [layer.weight_fake_quant.alpha for layer in weight_layers]
        scales = [q.scale for q in learned_quants] if s.scale_lr > 0 else []
        for p in scales:
            p.requires_grad_(True)
        iterations = self.group_iterations(group)
        optimiser, schedule = self._optimiser(alphas, scales, iterations)
        for q in act_quants:
            q.prob = s.prob
        params = alphas + scales
        n = len(self.q_cache[inputs[0]])  # this rank's shard
        mixed = [s.prob < 1.0 and self.q_cache[name] is not self.fp_cache[name] for name in inputs]
        targets = [o.name for o in outputs]
        sources = ([self.q_cache[name] for name in inputs] + [self.fp_cache[name] for name, mix in zip(inputs, mixed)
                                                               if mix] + [self.fp_cache[name] for name in targets])
        batches = StepBatches(sources, n, min(s.batch_size, n * self.dist.world) // self.dist.world, gen, self.device,
                              self.lookahead)
        return Training(graph, weight_layers, fast_layers, act_quants, params, [p.detach().clone() for p in params],
                        optimiser, schedule, batches, mask_gen, inputs, targets, mixed, iterations)

    def _batch(self, t: 'Training', rows: List[torch.Tensor]) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """The group's inputs and float targets for one step from ``StepBatches`` rows (quantized inputs,
        float inputs of the mixed ones, targets); with QDrop each input element comes from the quantized stream
        with probability ``prob``, else from the float one."""
        xs, rest = [], iter(rows[len(t.inputs):])
        for x, mix in zip(rows[:len(t.inputs)], t.mixed):
            if mix:
                # lerp with a 0/1 weight is exact: the quantized input where 1, the float one where 0
                x = torch.lerp(next(rest), x, keep_mask(x, self.settings.prob, t.mask_gen))
            xs.append(x)
        return xs, list(rest)

    def _step(self, t: 'Training', step: int) -> torch.Tensor:
        """One optimisation step on a random mini-batch; returns its reconstruction loss."""
        s = self.settings
        _, rows = t.batches.next()
        xs, targets = self._batch(t, rows)
        if step + 1 >= s.warm_up * t.iterations:  # the rounding regulariser (gradient added in the layers)
            beta = round_beta(step + 1, t.iterations, s.warm_up, s.b_range)  # MQBench counts from 1
            for f in t.fast_layers:
                f.reg_weight, f.beta = s.weight, beta
        with torch.autocast(self.device.type, torch.bfloat16, enabled=s.autocast == 'bfloat16'):
            outs = t.graph(*xs)
        rec = sum(self.loss_fn(o.float(), target) for o, target in zip(outs, targets))
        t.optimiser.zero_grad(set_to_none=True)
        rec.backward()
        self.dist.average_gradients(t.params)
        t.optimiser.step()
        t.schedule.step()
        return rec

    def _keep_window(self, t: 'Training', value: float, step: int, result: GroupResult) -> bool:
        """Record a finished loss window; on a non-finite loss or parameter, restore the last good state and
        say so (False stops the group)."""
        if not math.isfinite(value) or not all(torch.isfinite(p).all() for p in t.params):
            self._restore(t.params, t.good)
            msg = (f'non-finite loss in {result.name} at iteration {step + 1}: '
                   f'fell back to the state of iteration {result.iters}')
            log.warning(msg)
            result.warnings.append(msg)
            return False
        t.good = [p.detach().clone() for p in t.params]
        result.iters = step + 1
        result.train_loss = value
        return True

    def _finish_group(self, t: 'Training') -> None:
        for layer in t.weight_layers:
            harden_adaround(layer)
        for q in t.act_quants:
            q.prob = 1.0
            q.scale.requires_grad_(False)

    def group_iterations(self, group: Group) -> int:
        """Steps for a group: one unit's iterations (the paper), or one unit's per base unit it holds."""
        return self.iterations * ((group.last - group.first + 1) if self.iterations_per_unit else 1)

    def _optimiser(self, alphas: List[torch.Tensor], scales: List[torch.Tensor], iterations: int):
        """One Adam over both parameter groups (MQBench runs two): rounding variables at ``lr``, activation
        steps at ``scale_lr`` on a cosine schedule to zero over the unit's iterations. Fused (one kernel for
        all parameters) where torch has it: the unfused step costs ~0.4 ms of ~4 on a small CPU unit."""
        s = self.settings
        groups = [{'params': alphas, 'lr': s.lr}] + ([{'params': scales, 'lr': s.scale_lr}] if scales else [])
        optimiser = torch.optim.Adam(groups, fused=self.device.type in ('cpu', 'cuda'))
        cosine = lambda step: 0.5 * (1.0 + math.cos(math.pi * step / iterations))  # noqa: E731
        schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, [lambda step: 1.0, cosine][:len(groups)])
        return optimiser, schedule

    @staticmethod
    @torch.no_grad()
    def _restore(params: List[torch.Tensor], good: List[torch.Tensor]) -> None:
        for p, g in zip(params, good):
            p.copy_(g)

    # ---- driver --------------------------------------------------------------------------------------
    def run(self, images: torch.Tensor, done: Sequence[GroupResult] = (),
            on_group_done: Optional[Callable[[List[GroupResult]], None]] = None) -> List[GroupResult]:
        """Reconstruct every group. The first ``len(done)`` groups are already finished (resume): their
        streams are replayed, not re-optimised. ``on_group_done`` gets the results so far after each group."""
        placeholder = next(n for n in self.partition.graph_module.graph.nodes if n.op == 'placeholder')
        images = images.to(self.cache_device, self.cache_dtype)
        self.fp_cache = {placeholder.name: images}
        self.q_cache = {placeholder.name: images}
        results = list(done)
        units = self.partition.units
        for gi, group in enumerate(self.groups):
            t0 = time.perf_counter()
            resumed = gi < len(done)
            inputs = [n.name for n in self.partition.inputs_of(group.first, group.last)]
            outputs = self.partition.outputs_of(group.first, group.last)
            probe = self._probe_nodes(group)
            inner = self._float_pass(group, inputs, outputs, probe)
            if not resumed:
                result = GroupResult(gi, group.name(units), [u.name for u in units[group.first:group.last + 1]],
                                     group.modules(units), float('nan'), None, 0, 0.0)
                self._optimise(gi, group, outputs, inputs, result)
            for name in inputs:  # float inputs no later group reads are done with: lower the quantized pass's peak
                if self.last_use.get(name, -1) <= gi:
                    self.fp_cache.pop(name, None)
            self._quant_pass(group, inputs, outputs, probe, inner)
            self.peak_cache_bytes = max(self.peak_cache_bytes, self.cache_bytes())
            del inner
            self._free(gi)
            if not resumed:
                result.loss = self.unit_losses[group.last]
                result.seconds = time.perf_counter() - t0
                results.append(result)
                log.info('unit %d/%d %s: loss %.5g, %d iterations, %.1f s%s', gi + 1, len(self.groups), result.name,
                         result.loss, result.iters, result.seconds,
                         ''.join(f' [warning: {w}]' for w in result.warnings))
                if on_group_done is not None:
                    on_group_done(results)
        return results
