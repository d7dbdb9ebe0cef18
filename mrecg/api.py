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
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn

from mrecg.caching import RunCache, images_id
from mrecg.config import Config, as_config
from mrecg.data import CalibData, EvalData, calibration_images, eval_batches, reading
from mrecg.distributed import Dist, check_divisible, current
from mrecg.errors import UserError
from mrecg.evaluation import Accuracy, evaluate
from mrecg.planning import GroupingInfo, Prepared, choose_groups, prepare, validate_grouping
from mrecg.quantization import (calibrate, disable_all, enable_quantization, is_adaround_layer, layer_bit_table,
                                load_quantized_state)
from mrecg.reconstruction import GroupResult, Reconstructor
from mrecg.units import UnitPartition, groups_from_spans

log = logging.getLogger('mrecg')


@dataclass
class Timings:
    calibration_data_seconds: float = 0.0
    fp_eval_seconds: float = 0.0
    calibration_seconds: float = 0.0
    grouping_seconds: float = 0.0
    reconstruction_seconds: float = 0.0
    quant_eval_seconds: float = 0.0
    total_seconds: float = 0.0


@dataclass
class RunState:
    """Everything needed to continue after the last finished unit (``ptq_main.py --resume``)."""
    fp_accuracy: Optional[Accuracy]
    grouping: GroupingInfo
    results: List[GroupResult]
    hardened: List[str]
    qmodel_state: Dict[str, torch.Tensor]
    elapsed: float = 0.0
    world_size: int = 1


@dataclass
class QuantizationResult:
    """What ``quantize`` returns. ``units`` are the reconstruction units (MRECG groups count once);
    ``unit_losses`` has one entry per base unit (also inside merged groups), in ``unit_names`` order."""
    model: fx.GraphModule
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

    def __str__(self) -> str:
        acc = self.accuracy.top1 if self.accuracy else None
        fp = self.fp_accuracy.top1 if self.fp_accuracy else None
        top1 = 'n/a' if acc is None else f'{acc:.2f}'
        return (f'{self.method}: float top-1 {"n/a" if fp is None else f"{fp:.2f}"}, quantized top-1 {top1}, '
                f'{len(self.unit_names)} units -> {len(self.units)} reconstruction units, '
                f'{self.timings.total_seconds:.0f} s')


def resolve_device(name: Optional[str]) -> torch.device:
    name = name or 'auto'
    if name == 'cuda' and not torch.cuda.is_available():
        raise UserError('device cuda was asked for but no CUDA device is available (use --device cpu)')
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if name not in ('cpu', 'cuda') and not name.startswith('cuda:'):
        raise UserError(f'device must be auto, cpu or cuda, got {name!r}')
    return torch.device(name)


def hardened_layers(qmodel: nn.Module) -> List[str]:
    """Layers whose rounding was learned and written into the weight (their quantizer is in hard mode)."""
    return [name for name, m in qmodel.named_modules()
            if is_adaround_layer(m) and getattr(m.weight_fake_quant, 'hardened', False)]


def restore_state(qmodel: nn.Module, state: RunState) -> None:
    load_quantized_state(qmodel, state.qmodel_state)
    mods = dict(qmodel.named_modules())
    for name in state.hardened:
        mods[name].weight_fake_quant.adaround = False
        mods[name].weight_fake_quant.hardened = True


def _evaluate(model: nn.Module, eval_data: Optional[EvalData], run: '_Session', desc: str) -> Optional[Accuracy]:
    if eval_data is None:
        return None
    d, device = run.cfg.data, run.device
    batches = eval_batches(eval_data, d.batch_size, d.eval_limit, d.num_workers, d.pin_memory and device.type == 'cuda',
                           part=(run.dist.rank, run.dist.world), seed=d.split_seed)
    with reading('evaluation data'):
        return evaluate(model, batches, device, desc, run.progress, run.dist)


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
    cached = cache.calibration() if cache else None
    if cached is not None:
        load_quantized_state(prepared.qmodel, {k: v.to(device) for k, v in cached.items()})
        enable_quantization(prepared.qmodel)
        return True
    calibrate(prepared.qmodel, images, cfg.data.batch_size, device)
    if cache:
        cache.save_calibration(prepared.qmodel.state_dict())
    return False


def _probe_losses(run: '_Session', prepared: Prepared, fp_model: fx.GraphModule, images: torch.Tensor,
                  cache: Optional[RunCache]) -> List[float]:
    """The loss metric: per-unit losses of a plain (ungrouped) run on a copy of the calibrated model
    (``images``: this rank's shard; rank 0 decides whether the cache holds them)."""
    cfg, device, progress = run.cfg, run.device, run.progress
    names = [u.name for u in prepared.units]
    cached = run.dist.broadcast(cache.unit_losses(names) if cache and run.dist.main else None)
    if cached is not None:
        log.info('loss metric: reusing cached plain per-unit losses (%s)', cache.folder)
        return cached
    iterations = cfg.mrecg.probe_iterations or cfg.quantize.reconstruction.iterations
    probe_model = copy.deepcopy(prepared.qmodel)
    partition = UnitPartition.build(probe_model, prepared.units, prepared.partition.head_ops)
    settings = replace(cfg.quantize.reconstruction, iterations=iterations)
    log.info('loss metric: plain probe pass, %d iterations per unit', iterations)
    probe = Reconstructor(probe_model, fp_model, partition, groups_from_spans([], len(names)), settings, device,
                          cfg.process.seed, progress, chunk_size=cfg.data.batch_size, dist=run.dist,
                          ste_bounds=cfg.quantize.a_qconfig.ste_bounds)
    probe.run(images)
    losses = list(probe.unit_losses)
    if cache and run.dist.main:
        cache.save_unit_losses(names, losses, iterations)
    return losses


def quantize(model: nn.Module, calib_data: CalibData, config: Any = None, eval_data: Optional[EvalData] = None, *,
             device: Optional[str] = None, progress: bool = False, cache_dir: Optional[str] = None,
             data_id: Optional[str] = None, resume: Optional[RunState] = None,
             on_unit_done: Optional[Callable[[RunState], None]] = None) -> QuantizationResult:
    """Quantize ``model`` (float, not modified) with calibration images from ``calib_data`` (a tensor
    N x C x H x W, a Dataset of images or (image, label), or a DataLoader) as ``config`` says (a
    ``mrecg.Config``, a mapping like the YAML, or a YAML path). With ``eval_data`` (a labelled Dataset, a
    DataLoader or (images, labels)) the float and quantized top-1/top-5 are measured.

    ``cache_dir`` keeps calibration ranges (``process.cache_calibration``) and the loss metric's probe there;
    ``resume``/``on_unit_done`` continue from, and report, the state after each unit (the CLI's checkpoint).
    """
    cfg = as_config(config)
    if not isinstance(model, nn.Module):
        raise UserError(f'model must be a torch.nn.Module, got {type(model).__name__}')
    run = _Session(cfg, resolve_device(device or cfg.process.device), progress, resume, current())
    images = run.timed('calibration_data_seconds', lambda: calibration_images(
        calib_data, cfg.quantize.cali_size, cfg.process.seed, cfg.data.batch_size, cfg.data.num_workers))
    model = model.eval()
    fp_acc = resume.fp_accuracy if resume else run.timed(
        'fp_eval_seconds', lambda: _evaluate(model.to(run.device), eval_data, run, 'eval float'))
    if fp_acc is not None and not resume:
        log.info('float top-1 %s top-5 %s on %d images', fp_acc.top1, fp_acc.top5, fp_acc.images)
    cache = RunCache(cache_dir, cfg, model, data_id or images_id(images), cfg.model.type or type(model).__name__,
                     world=run.dist.world) if cache_dir else None
    prepared, fp_model = _calibrated(run, model, images, cache)
    shard = run.dist.shard(images)  # reconstruction caches this rank's share only
    del images
    info = resume.grouping if resume else run.timed('grouping_seconds', lambda: choose_groups(
        cfg, prepared.partition, lambda: _probe_losses(run, prepared, fp_model, shard, cache)))
    for note in info.notes:
        log.warning('grouping: %s', note)
    recon, results = _reconstruct(run, prepared, fp_model, info, shard, fp_acc, on_unit_done)
    enable_quantization(prepared.qmodel)
    q_acc = run.timed('quant_eval_seconds', lambda: _evaluate(prepared.qmodel, eval_data, run, 'eval quantized'))
    if q_acc is not None:
        log.info('quantized top-1 %s top-5 %s', q_acc.top1, q_acc.top5)
    run.timings.total_seconds = run.elapsed()
    return QuantizationResult(prepared.qmodel, cfg.method, [u.name for u in prepared.units], list(recon.unit_losses),
                              results, info, fp_acc, q_acc, layer_bit_table(prepared.qmodel), run.timings,
                              recon.peak_cache_bytes, prepared.bn_folded, str(run.device), _warnings(results, q_acc),
                              resumed=resume is not None, world_size=run.dist.world,
                              peak_cache_bytes_per_rank=run.dist.gather(recon.peak_cache_bytes))


class _Session:
    """The clock, timings and settings one ``quantize`` call shares between its steps."""

    def __init__(self, cfg: Config, device: torch.device, progress: bool, resume: Optional[RunState], dist: Dist):
        self.cfg, self.device, self.progress, self.resume, self.dist = cfg, device, progress and dist.main, resume, dist
        check_divisible(dist, cfg.quantize.cali_size, cfg.quantize.reconstruction.batch_size)
        if resume and resume.world_size != dist.world:
            raise UserError(f'this run was started on {resume.world_size} process(es) and is resumed on {dist.world}: '
                            f'resume it with the same number (torchrun --nproc_per_node={resume.world_size})')
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
        restore_state(prepared.qmodel, run.resume)
        prepared.qmodel.to(run.device)
    elif run.timed('calibration_seconds', lambda: _calibrate(prepared, images, run.cfg, run.device, cache, run.dist)):
        log.info('calibration: reused the cached quantizer ranges (%s)', cache.folder)
    return prepared, fp_model


def _reconstruct(run: _Session, prepared: Prepared, fp_model: fx.GraphModule, info: GroupingInfo,
                 images: torch.Tensor, fp_acc: Optional[Accuracy],
                 on_unit_done: Optional[Callable[[RunState], None]]) -> Tuple[Reconstructor, List[GroupResult]]:
    """Reconstruct every group (after those a resumed run finished), reporting the state after each."""
    qmodel = prepared.qmodel
    groups = groups_from_spans([tuple(s) for s in info.spans], len(prepared.units))
    log.info('%d base units -> %d reconstruction units (%s); %s', len(prepared.units), len(groups), info.source,
             ' | '.join(f'[{"+".join(g)}]' for g in info.groups) or 'no merged groups')

    def report(results: List[GroupResult]) -> None:
        if on_unit_done is not None and run.dist.main:
            on_unit_done(RunState(fp_acc, info, list(results), hardened_layers(qmodel), qmodel.state_dict(),
                                  run.elapsed(), run.dist.world))
    if not run.resume:
        report([])
    recon = Reconstructor(qmodel, fp_model, prepared.partition, groups, run.cfg.quantize.reconstruction, run.device,
                          run.cfg.process.seed, run.progress, chunk_size=run.cfg.data.batch_size, dist=run.dist,
                          iterations_per_unit=run.cfg.mrecg.group_iterations == 'per_unit',
                          ste_bounds=run.cfg.quantize.a_qconfig.ste_bounds)
    done = list(run.resume.results) if run.resume else []
    return recon, run.timed('reconstruction_seconds', lambda: recon.run(images, done, on_group_done=report))


def _warnings(results: List[GroupResult], q_acc: Optional[Accuracy]) -> List[str]:
    warnings = [w for r in results for w in r.warnings]
    if q_acc is not None and q_acc.top1 is None:
        warnings.append(f'the quantized model produced non-finite logits in {q_acc.nonfinite_batches} '
                        'batches: no accuracy is reported')
    return warnings
