"""The Python API: one call quantizes a model in memory.

    import mrecg
    result = mrecg.quantize(model, calib_images, {'quantize': {'w_qconfig': {'bit': 2}}}, eval_data=test_set)
    result.model            # the fake-quantized torch.fx GraphModule (hardened AdaRound weights)
    result.accuracy.top1    # with eval_data: quantized top-1 (result.fp_accuracy: the float model's)

Steps: draw the calibration images (seeded), evaluate the float model, prepare (fold BN, insert MQBench
quantizers, per-layer bits, units), calibrate, choose MRECG's groups, reconstruct unit by unit, evaluate.
Nothing is written unless ``cache_dir`` is given; ``ptq_main.py`` wraps this with an output folder,
resume and caches (``mrecg.runner``). Called in every process of an initialised torch.distributed group
(``torchrun``), the run is data-parallel (``mrecg.distributed``) and every rank returns the same result.
"""
import copy
import logging
import os
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn

from mrecg.bitsearch import model_figures
from mrecg.caching import RunCache, environment, eval_fingerprint, images_id, model_digest
from mrecg.config import Config, as_config
from mrecg.data import CalibData, EvalData, calibration_images, eval_batches, reading
from mrecg.distributed import Dist, check_divisible, current
from mrecg.errors import NotResumable, UserError
from mrecg.evaluation import Accuracy, check_logits
from mrecg.metrics import evaluate_task, headline
from mrecg.parts import part_and_inputs, put_part
from mrecg.group_policy import GroupingInfo, choose_groups, validate_grouping
from mrecg.preparation import Prepared, prepare
from mrecg.quantization import (calibrate, disable_all, enable_quantization, is_adaround_layer, layer_bit_table,
                                load_quantized_state)
from mrecg.reconstruction import GroupResult, Reconstructor
from mrecg.units import UnitPartition, groups_from_spans

log = logging.getLogger('mrecg')


@dataclass
class Timings:
    calibration_data_seconds: float = 0.0
    bit_search_seconds: float = 0.0
    fp_eval_seconds: float = 0.0
    calibration_seconds: float = 0.0
    grouping_seconds: float = 0.0
    reconstruction_seconds: float = 0.0
    quant_eval_seconds: float = 0.0
    total_seconds: float = 0.0


@dataclass
class ProbeState:
    """The loss metric's plain probe part-way (it is a whole plain reconstruction: hours on ImageNet)."""
    results: List[GroupResult]
    hardened: List[str]
    qmodel_state: Dict[str, torch.Tensor]


PHASES = ('calibrated', 'probe', 'reconstruction')


@dataclass
class RunState:
    """Everything needed to continue an interrupted run (``ptq_main.py --resume``), in the phase it reached:
    ``calibrated`` (quantizer ranges set), ``probe`` (the loss metric's probe under way, in ``probe``) or
    ``reconstruction`` (``grouping`` chosen, ``results`` of the finished groups). ``qmodel_state`` is the
    quantized model (calibrated, plus the hardened groups once reconstructing); ``weights`` and ``images`` are
    the digests of the float weights and calibration images it was computed from (a resume on others is
    refused), ``eval_data`` that of the data ``fp_accuracy`` was measured on (re-measured if it changed).
    Tensors are CPU copies: the state never changes after it is handed out."""
    fp_accuracy: Optional[Accuracy]
    grouping: Optional[GroupingInfo]
    results: List[GroupResult]
    hardened: List[str]
    qmodel_state: Dict[str, torch.Tensor]
    elapsed: float = 0.0
    world_size: int = 1
    phase: str = 'reconstruction'
    weights: str = ''
    images: str = ''
    eval_data: Optional[str] = None
    probe: Optional[ProbeState] = None
    bit_allocation: Optional[Dict[str, Any]] = None


@dataclass
class QuantizationResult:
    """What ``quantize`` returns. ``units`` are the reconstruction units (MRECG groups count once);
    ``unit_losses`` has one entry per base unit (also inside merged groups), in ``unit_names`` order. With
    ``model.quantize_part`` (``part``), ``model`` is the whole network holding the quantized part (a GraphModule)
    at that path, and the units, sizes and losses are the part's."""
    model: nn.Module
    method: str
    unit_names: List[str]
    unit_losses: List[Optional[float]]
    units: List[GroupResult]
    grouping: GroupingInfo
    fp_accuracy: Optional[Accuracy]
    accuracy: Optional[Accuracy]
    layer_bits: Dict[str, Tuple[int, Optional[int]]]
    timings: Timings
    peak_cache_bytes: int
    bn_folded: int
    device: str
    warnings: List[str] = field(default_factory=list)
    resumed: bool = False
    world_size: int = 1
    peak_cache_bytes_per_rank: List[int] = field(default_factory=list)
    bit_search: Optional[Dict[str, Any]] = None  # the allocation a bit search chose (BitAllocation.to_dict)
    size: Dict[str, float] = field(default_factory=dict)  # size_mb, mean_w_bits, bops_g of the quantized model
    engine: Dict[str, Any] = field(default_factory=dict)  # the device policy's choices (kernels, caches, TF32)
    part: Optional[str] = None  # model.quantize_part: the quantized sub-module's path
    metric: str = 'top1'  # eval.metric (the score's name, also when there was no evaluation)

    def __str__(self) -> str:
        score = lambda acc: headline(acc, self.metric)  # noqa: E731
        return (f'{self.method}{f" ({self.part})" if self.part else ""}: float {score(self.fp_accuracy)}, '
                f'quantized {score(self.accuracy)}, '
                f'{len(self.unit_names)} units -> {len(self.units)} reconstruction units, '
                f'{self.timings.total_seconds:.0f} s')


def resolve_device(name: Optional[str], dist: Optional[Dist] = None) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` -> a device. Inside a NCCL process group a bare ``cuda`` is this
    process's own GPU (``LOCAL_RANK``, else rank modulo the GPUs), never every rank's ``cuda:0``."""
    name = name or 'auto'
    if name == 'cuda' and not torch.cuda.is_available():
        raise UserError('device cuda was asked for but no CUDA device is available (use --device cpu)')
    if name == 'auto':
        name = 'cuda' if torch.cuda.is_available() else 'cpu'
    if name not in ('cpu', 'cuda') and not name.startswith('cuda:'):
        raise UserError(f'device must be auto, cpu or cuda, got {name!r}')
    if name == 'cuda' and dist is not None and dist.enabled and dist.backend == 'nccl':
        local = os.environ.get('LOCAL_RANK')
        return torch.device('cuda', int(local) if local and local.isdigit() else dist.rank % torch.cuda.device_count())
    return torch.device(name)


def hardened_layers(qmodel: nn.Module) -> List[str]:
    """Layers whose rounding was learned and written into the weight (their quantizer is in hard mode)."""
    return [name for name, m in qmodel.named_modules()
            if is_adaround_layer(m) and getattr(m.weight_fake_quant, 'hardened', False)]


def restore_state(qmodel: nn.Module, qmodel_state: Dict[str, torch.Tensor], hardened: List[str]) -> None:
    load_quantized_state(qmodel, qmodel_state)
    mods = dict(qmodel.named_modules())
    for name in hardened:
        mods[name].weight_fake_quant.adaround = False
        mods[name].weight_fake_quant.hardened = True


def cpu_copy(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A state dict of CPU copies: it loads on a machine without the GPU and does not change afterwards."""
    return {k: v.detach().to('cpu', copy=True) for k, v in state.items()}


@dataclass(frozen=True)
class Fingerprints:
    """Digests of what a run's numbers depend on beyond its config (``mrecg.caching``)."""
    weights: str
    images: str
    eval_data: Optional[str]


def check_resume(state: Optional[RunState], prints: Fingerprints) -> None:
    """A resumed run must continue on the float weights and calibration images it started with."""
    if state is None:
        return
    for what, saved, now in (('float weights', state.weights, prints.weights),
                             ('calibration images', state.images, prints.images)):
        if saved != now:
            raise NotResumable(f'the {what} differ from those this run started with ({saved[:12]} then, {now[:12]} '
                            f'now): resuming would continue on other targets; start the run over '
                            f'(ptq_main.py: --overwrite)')


def _evaluate(model: nn.Module, eval_data: Optional[EvalData], run: '_Session', desc: str) -> Optional[Accuracy]:
    if eval_data is None:
        return None
    d, device = run.cfg.data, run.device
    batches = eval_batches(eval_data, d.batch_size, d.eval_limit, d.num_workers, d.pin_memory and device.type == 'cuda',
                           part=(run.dist.rank, run.dist.world), seed=d.split_seed)
    with reading('evaluation data'):
        return evaluate_task(run.cfg.eval, model, batches, eval_data, device, desc, run.progress, run.dist)


def _calibrate(prepared: Prepared, images: torch.Tensor, cfg: Config, device: torch.device,
               cache: Optional[RunCache], dist: Dist) -> bool:
    """Calibrate the quantizers, or load the ranges a cached identical run computed. True if reused.
    Data-parallel: rank 0 does it on every calibration image and the others receive its state."""
    if dist.enabled:
        reused = _calibrate(prepared, images, cfg, device, cache, Dist()) if dist.main else None
        state = dist.broadcast({k: v.cpu() for k, v in prepared.qmodel.state_dict().items()} if dist.main else None)
        if not dist.main:
            load_quantized_state(prepared.qmodel, {k: v.to(device) for k, v in state.items()})
            enable_quantization(prepared.qmodel)
        return dist.broadcast(reused)
    cached = cache.calibration(prepared.qmodel.state_dict()) if cache else None
    if cached is not None:
        load_quantized_state(prepared.qmodel, {k: v.to(device) for k, v in cached.items()})
        enable_quantization(prepared.qmodel)
        return True
    calibrate(prepared.qmodel, images, cfg.data.batch_size, device)
    if cache:
        cache.save_calibration(prepared.qmodel.state_dict())
    return False


def _probe_losses(run: '_Session', prepared: Prepared, fp_model: fx.GraphModule, images: torch.Tensor,
                  cache: Optional[RunCache], reporter: '_Reporter') -> List[float]:
    """The loss metric: per-unit losses of a plain (ungrouped) run on a copy of the calibrated model
    (``images``: this rank's shard; rank 0 decides whether the cache holds them). Reported after each unit
    and resumed like the main run."""
    cfg, device, progress = run.cfg, run.device, run.progress
    names = [u.name for u in prepared.units]
    cached = run.dist.broadcast(cache.unit_losses(names) if cache and run.dist.main else None)
    if cached is not None:
        log.info('loss metric: reusing cached plain per-unit losses (%s)', cache.folder)
        return cached
    iterations = cfg.mrecg.probe_iterations or cfg.quantize.reconstruction.iterations
    probe_model = copy.deepcopy(prepared.qmodel)
    done = []
    if run.resume and run.resume.probe:
        restore_state(probe_model, run.resume.probe.qmodel_state, run.resume.probe.hardened)
        probe_model.to(device)
        done = list(run.resume.probe.results)
    partition = UnitPartition.build(probe_model, prepared.units, prepared.partition.head_ops)
    settings = replace(cfg.quantize.reconstruction, iterations=iterations)
    log.info('loss metric: plain probe pass, %d iterations per unit%s', iterations,
             f' (resumed after {len(done)} units)' if done else '')
    probe = Reconstructor.from_config(probe_model, fp_model, partition, groups_from_spans([], len(names)), cfg,
                                      device, progress, run.dist, settings=settings, iterations_per_unit=False)
    probe.run(images, done, on_group_done=lambda results: reporter.probe(results, probe_model))
    losses = list(probe.unit_losses)
    if cache and run.dist.main:
        cache.save_unit_losses(names, losses, iterations)
    return losses


class _Reporter:
    """Hands ``on_unit_done`` the run state after calibration, after each probe unit and after each group:
    CPU copies, never the live tensors (rank 0 only)."""

    def __init__(self, run: '_Session', fp_acc: Optional[Accuracy], prints: Fingerprints,
                 callback: Optional[Callable[[RunState], None]], allocation=None):
        self.run, self.fp_acc, self.prints = run, fp_acc, prints
        self.allocation = allocation.to_dict() if allocation else None
        self.callback = callback if run.dist.main else None
        self.calibrated_state: Dict[str, torch.Tensor] = {}

    def _send(self, phase: str, **fields) -> None:
        p = self.prints
        self.callback(RunState(self.fp_acc, elapsed=self.run.elapsed(), world_size=self.run.dist.world,
                               phase=phase, weights=p.weights, images=p.images, eval_data=p.eval_data,
                               bit_allocation=self.allocation, **fields))

    def calibrated(self, qmodel: nn.Module, send: bool = True) -> None:
        """Keep the calibrated state (the probe's reports carry it) and, unless resuming, report it."""
        if self.callback is None:
            return
        self.calibrated_state = cpu_copy(qmodel.state_dict())
        if send:
            self._send('calibrated', grouping=None, results=[], hardened=[], qmodel_state=self.calibrated_state)

    def probe(self, results: List[GroupResult], probe_model: nn.Module) -> None:
        if self.callback is None:
            return
        probe = ProbeState(copy.deepcopy(results), hardened_layers(probe_model), cpu_copy(probe_model.state_dict()))
        self._send('probe', grouping=None, results=[], hardened=[], qmodel_state=self.calibrated_state, probe=probe)

    def reconstruction(self, info: GroupingInfo, results: List[GroupResult], qmodel: nn.Module) -> None:
        if self.callback is None:
            return
        self._send('reconstruction', grouping=copy.deepcopy(info), results=copy.deepcopy(results),
                   hardened=hardened_layers(qmodel), qmodel_state=cpu_copy(qmodel.state_dict()))


def quantize(model: nn.Module, calib_data: CalibData, config: Any = None, eval_data: Optional[EvalData] = None, *,
             device: Optional[str] = None, progress: bool = False, cache_dir: Optional[str] = None,
             resume: Optional[RunState] = None,
             on_unit_done: Optional[Callable[[RunState], None]] = None) -> QuantizationResult:
    """Quantize a copy of ``model`` (float; the caller's model, its mode and device are left as they are) with
    calibration images from ``calib_data`` (a tensor N x C x H x W, a Dataset of images or (image, label), or
    a DataLoader) as ``config`` says (a ``mrecg.Config``, a mapping like the YAML, or a YAML path). With
    ``eval_data`` (a labelled Dataset, a DataLoader or (images, labels)) the float and quantized networks are
    scored by ``eval.metric`` (top-1/top-5; mIoU against label maps; a user function). With
    ``model.quantize_part`` only that sub-module is quantized, on the inputs it receives inside the network.

    ``cache_dir`` keeps calibration ranges (``process.cache_calibration``) and the loss metric's probe there,
    keyed by the content of the weights and images; ``on_unit_done`` receives the state (CPU copies) after
    calibration and after every unit of the probe and of the reconstruction, and ``resume`` continues from
    such a state (the CLI's ``checkpoint.pt``).
    """
    cfg = as_config(config)
    if not isinstance(model, nn.Module):
        raise UserError(f'model must be a torch.nn.Module, got {type(model).__name__}')
    dist = current()
    run = _Session(cfg, resolve_device(device or cfg.process.device, dist), progress, resume, dist)
    model = copy.deepcopy(model).eval()
    images = run.timed('calibration_data_seconds', lambda: calibration_images(
        calib_data, cfg.quantize.cali_size, cfg.process.seed, cfg.data.batch_size, cfg.data.num_workers))
    whole = model
    if cfg.model.quantize_part:
        model, images = _part_and_inputs(run, whole, images)
    elif cfg.eval.metric == 'top1':
        check_logits(model, images[:1], cfg.model.type or type(model).__name__)
    prints = Fingerprints(model_digest(model), images_id(images), eval_fingerprint(eval_data))
    check_resume(resume, prints)
    allocation = _bit_allocation(run, model, images)
    cfg = run.cfg
    fp_acc = _float_accuracy(run, whole, eval_data, prints)
    cache = RunCache(cache_dir, cfg, prints.weights, prints.images, cfg.model.type or type(model).__name__,
                     run.dist.world, environment(run.device)) if cache_dir else None
    prepared, fp_model = _calibrated(run, model, images, cache)
    reporter = _Reporter(run, fp_acc, prints, on_unit_done, allocation)
    if resume is None or resume.phase != 'reconstruction':
        reporter.calibrated(prepared.qmodel, send=resume is None)
    shard, sample = run.dist.shard(images), images[:1].clone()  # reconstruction caches this rank's share only
    del images
    info = resume.grouping if resume and resume.grouping else run.timed('grouping_seconds', lambda: choose_groups(
        cfg, prepared.partition, lambda: _probe_losses(run, prepared, fp_model, shard, cache, reporter)))
    for note in info.notes:
        log.warning('grouping: %s', note)
    recon, results = _reconstruct(run, prepared, fp_model, info, shard, reporter)
    enable_quantization(prepared.qmodel)
    quantized = put_part(whole, cfg.model.quantize_part, prepared.qmodel).to(run.device) \
        if cfg.model.quantize_part else prepared.qmodel
    q_acc = run.timed('quant_eval_seconds', lambda: _evaluate(quantized, eval_data, run, 'eval quantized'))
    if q_acc is not None:
        log.info('quantized %s', _scores(q_acc))
    run.timings.total_seconds = run.elapsed()
    return QuantizationResult(quantized, cfg.method, [u.name for u in prepared.units], list(recon.unit_losses),
                              results, info, fp_acc, q_acc, layer_bit_table(prepared.qmodel), run.timings,
                              recon.peak_cache_bytes, prepared.bn_folded, str(run.device), _warnings(results, q_acc),
                              resumed=resume is not None, world_size=run.dist.world,
                              peak_cache_bytes_per_rank=run.dist.gather(recon.peak_cache_bytes),
                              bit_search=allocation.to_dict() if allocation else None,
                              size=model_figures(prepared.qmodel, sample),
                              engine={**recon.policy.describe(), 'step_batch': recon.step_batch},
                              part=cfg.model.quantize_part, metric=cfg.eval.metric)


def _part_and_inputs(run: '_Session', whole: nn.Module, images: torch.Tensor) -> Tuple[nn.Module, torch.Tensor]:
    """``model.quantize_part``: the sub-module, and its input for every calibration image (the whole network's
    forward, so its own pre-processing applies)."""
    path = run.cfg.model.quantize_part
    part, inputs = part_and_inputs(whole, path, images, run.cfg.data.batch_size, run.device)
    share = sum(p.numel() for p in part.parameters()) / max(1, sum(p.numel() for p in whole.parameters()))
    log.info('quantize_part %s: %s (%.0f %% of the parameters); its inputs %s', path, type(part).__name__,
             100 * share, ' x '.join(map(str, inputs.shape)))
    return part, inputs


def _scores(acc: Accuracy) -> str:
    """The log's line of figures: top-1 and top-5, or every figure of the task's metric."""
    if acc.metric == 'top1':
        return f'top-1 {acc.top1} top-5 {acc.top5} on {acc.images} images'
    return ', '.join(f'{k} {v:.4g}' for k, v in acc.scores.items()) + f' on {acc.images} images' \
        if acc.score is not None else f'{acc.metric} n/a (non-finite outputs in {acc.nonfinite_batches} batches)'


def _bit_allocation(run: '_Session', model: nn.Module, images: torch.Tensor):
    """With ``quantize.bit_search``: the allocation (searched on rank 0, or the resumed run's), and ``run.cfg``
    from then on carries it as ``layer_bits``. None without a search."""
    from mrecg.bitsearch import allocation_from_dict, search_bits, with_allocation
    if run.cfg.quantize.bit_search is None:
        return None
    if run.resume and run.resume.bit_allocation:
        allocation = allocation_from_dict(run.resume.bit_allocation)
    else:
        found = run.timed('bit_search_seconds', lambda: search_bits(model, run.cfg, images, run.device)) \
            if run.dist.main else None
        allocation = allocation_from_dict(run.dist.broadcast(found.to_dict() if found else None))
        f = allocation.figures
        log.info('bit search (%s, %s): avg %.3f weight bits, %.4g MB, %.4g GBOPs in %.1f s', allocation.measure,
                 allocation.budget, f['avg_w_bits'], f['size_mb'], f['bops_g'], allocation.seconds)
    for note in allocation.notes:
        log.warning('bit search: %s', note)
    run.cfg = with_allocation(run.cfg, allocation)
    return allocation


def _float_accuracy(run: '_Session', model: nn.Module, eval_data: Optional[EvalData],
                    prints: Fingerprints) -> Optional[Accuracy]:
    """The float model's accuracy: measured, or the resumed run's when its evaluation data is unchanged."""
    if run.resume and run.resume.eval_data == prints.eval_data:
        return run.resume.fp_accuracy
    if run.resume:
        log.warning('the evaluation data changed since this run started: the float model is evaluated again')
    fp_acc = run.timed('fp_eval_seconds', lambda: _evaluate(model.to(run.device), eval_data, run, 'eval float'))
    if fp_acc is not None:
        log.info('float %s', _scores(fp_acc))
    return fp_acc


class _Session:
    """The clock, timings and settings one ``quantize`` call shares between its steps."""

    def __init__(self, cfg: Config, device: torch.device, progress: bool, resume: Optional[RunState], dist: Dist):
        self.cfg, self.device, self.progress, self.resume, self.dist = cfg, device, progress and dist.main, resume, dist
        check_divisible(dist, cfg.quantize.cali_size, cfg.quantize.reconstruction.batch_size)
        if resume and resume.world_size != dist.world:
            raise NotResumable(f'this run was started on {resume.world_size} process(es) and is resumed on '
                               f'{dist.world}: resume it with the same number (torchrun '
                               f'--nproc_per_node={resume.world_size})')
        self.start, self.timings = time.perf_counter(), Timings()
        self.before = resume.elapsed if resume else 0.0

    def timed(self, name: str, fn: Callable[[], Any]) -> Any:
        """``fn()``, its seconds added to ``timings.<name>``."""
        t = time.perf_counter()
        out = fn()
        setattr(self.timings, name, getattr(self.timings, name) + time.perf_counter() - t)
        return out

    def elapsed(self) -> float:
        return self.before + time.perf_counter() - self.start


def _calibrated(run: _Session, model: nn.Module, images: torch.Tensor,
                cache: Optional[RunCache]) -> Tuple[Prepared, fx.GraphModule]:
    """The prepared model with its quantizer ranges (calibrated, cached, or restored on resume), and the float
    twin that gives the reconstruction targets."""
    prepared = prepare(model.cpu(), run.cfg)
    validate_grouping(run.cfg, prepared)
    prepared.qmodel.to(run.device)
    fp_model = copy.deepcopy(prepared.qmodel)
    disable_all(fp_model)
    if run.resume:
        restore_state(prepared.qmodel, run.resume.qmodel_state, run.resume.hardened)
        prepared.qmodel.to(run.device)
    elif run.timed('calibration_seconds', lambda: _calibrate(prepared, images, run.cfg, run.device, cache, run.dist)):
        log.info('calibration: reused the cached quantizer ranges (%s)', cache.folder)
    return prepared, fp_model


def _reconstruct(run: _Session, prepared: Prepared, fp_model: fx.GraphModule, info: GroupingInfo,
                 images: torch.Tensor, reporter: _Reporter) -> Tuple[Reconstructor, List[GroupResult]]:
    """Reconstruct every group (after those a resumed run finished), reporting the state after each."""
    qmodel = prepared.qmodel
    groups = groups_from_spans([tuple(s) for s in info.spans], len(prepared.units))
    log.info('%d base units -> %d reconstruction units (%s); %s', len(prepared.units), len(groups), info.source,
             ' | '.join(f'[{"+".join(g)}]' for g in info.groups) or 'no merged groups')
    resumed = run.resume is not None and run.resume.phase == 'reconstruction'
    if not resumed:
        reporter.reconstruction(info, [], qmodel)
    recon = Reconstructor.from_config(qmodel, fp_model, prepared.partition, groups, run.cfg, run.device,
                                      run.progress, run.dist)
    done = list(run.resume.results) if resumed else []
    return recon, run.timed('reconstruction_seconds', lambda: recon.run(
        images, done, on_group_done=lambda results: reporter.reconstruction(info, results, qmodel)))


def _warnings(results: List[GroupResult], q_acc: Optional[Accuracy]) -> List[str]:
    warnings = [w for r in results for w in r.warnings]
    if q_acc is not None and q_acc.score is None:
        what = 'logits' if q_acc.metric == 'top1' else 'outputs'
        warnings.append(f'the quantized model produced non-finite {what} in {q_acc.nonfinite_batches} '
                        'batches: no accuracy is reported')
    return warnings
