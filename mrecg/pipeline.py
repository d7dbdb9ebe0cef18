"""One PTQ run, end to end: model -> calibration -> grouping -> reconstruction -> evaluation -> outputs.

Every check that can fail on bad input runs before any heavy work. After each reconstructed unit the run
state (quantizer parameters, hardened weights, per-unit results) is written atomically to
``checkpoint.pt``, so ``--resume`` continues from the last finished unit and ends with the same numbers.
"""
import copy
import hashlib
import json
import logging
import os
import platform
import time
from dataclasses import asdict
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

import models
from mrecg import capacity, grouping
from mrecg.config import RunSettings, dump_config
from mrecg.data import calibration_images, check_calibration_size, check_data, eval_batches
from mrecg.errors import UserError
from mrecg.evaluation import Accuracy, evaluate
from mrecg.quantization import (calibrate, disable_all, enable_quantization, fold_bn, is_adaround_layer,
                                load_quantized_state, prepare_model)
from mrecg.reconstruction import GroupResult, ReconSettings, Reconstructor
from mrecg.reporting import (finite_or_none, oscillation_stats, plot_loss_curve, save_torch, unit_loss_table,
                             write_csv_row, write_json, write_text)
from mrecg.units import BaseUnit, UnitPartition, groups_from_spans, layer_base_units, model_base_units

log = logging.getLogger('mrecg')
CONFIG, RESULTS, CSV, PLOT, STATE, LOG, QMODEL = ('config.yaml', 'results.json', 'results.csv', 'loss_curve.png',
                                                  'checkpoint.pt', 'run.log', 'quantized_model.pt')
STATE_FORMAT = 2  # 2: the fast quantizers' numbers (float arithmetic, new mask stream, fused Adam)


# ---- setup ---------------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == 'cuda' and not torch.cuda.is_available():
        raise UserError('device cuda was asked for but no CUDA device is available (use --device cpu)')
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    return torch.device(name)


def preflight(settings: RunSettings, need_checkpoint: bool = True) -> None:
    """Cheap checks of every path the run will need, before anything heavy."""
    if need_checkpoint:
        if not settings.model_path:
            raise UserError('model.path is not set: point it at the float checkpoint to quantize')
        if not os.path.isfile(settings.model_path):
            raise UserError(f'checkpoint file not found: {settings.model_path} (model.path)'
                            + _train_hint(settings))
    check_data(settings.data)
    check_calibration_size(settings.data, settings.cali_size)


def _train_hint(settings: RunSettings) -> str:
    """For a missing small-model checkpoint, the command that makes it (the large ones are not committed)."""
    path = settings.model_path or ''
    expected = os.path.join('models', 'checkpoints', f'{settings.model_type}_{settings.data.type}.pth')
    if settings.data.type == 'imagenet' or os.path.isfile(path) or not os.path.normpath(path).endswith(expected):
        return ''
    return (f'; train it with: python scripts/train_small_models.py --dataset {settings.data.type} '
            f'--models {settings.model_type}')


def build_float_model(settings: RunSettings, load: bool = True) -> nn.Module:
    model = models.build_model(settings.model_type, **settings.model_kwargs)
    if load:
        try:
            models.load_checkpoint(model, settings.model_path, models.model_entry(settings.model_type).family)
        except models.CheckpointError as exc:
            raise UserError(str(exc) + _train_hint(settings)) from None
    return model.eval()


def quantizable(model: nn.Module, settings: RunSettings) -> Tuple[nn.Module, int]:
    """A BN-folded (if asked) copy of the float model, ready for MQBench; returns it and the folded count."""
    model = copy.deepcopy(model).eval()
    folded = fold_bn(model) if settings.quant.fold_bn else 0
    return model, folded


def base_units(settings: RunSettings, folded_model: nn.Module, qmodel: nn.Module) -> List[BaseUnit]:
    if settings.granularity == 'layer':
        return layer_base_units(qmodel)
    return model_base_units(folded_model, settings.units_override)


def build_partition(settings: RunSettings, folded_model: nn.Module, qmodel: nn.Module) -> UnitPartition:
    try:
        return UnitPartition.build(qmodel, base_units(settings, folded_model, qmodel))
    except ValueError as exc:
        raise UserError(f'model.units: {exc}') from None


# ---- grouping ------------------------------------------------------------------------------------------
def scheme_spans(settings: RunSettings, units: List[BaseUnit]) -> List[Tuple[int, int]]:
    scheme = settings.scheme
    if scheme == 'authors':
        if settings.model_type not in grouping.PUBLISHED_SCHEMES:
            raise UserError(f"mrecg.scheme: authors has no published grouping for {settings.model_type} "
                            f"(published: {', '.join(grouping.PUBLISHED_SCHEMES)})")
        scheme = grouping.PUBLISHED_SCHEMES[settings.model_type]
    try:
        return grouping.spans_from_scheme(scheme, units)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def solve_spans(settings: RunSettings, metric: List[float]) -> List[Tuple[int, int]]:
    g = settings.grouping
    try:
        pairs = grouping.select_pairs(grouping.pair_scores(metric), g.k, g.lam, g.max_group_size)
    except ValueError as exc:
        raise UserError(f'mrecg: {exc}') from None
    return grouping.spans_from_pairs(pairs)


def check_k(settings: RunSettings, num_units: int) -> None:
    if settings.grouping.metric != 'none' and settings.grouping.k > num_units - 1:
        raise UserError(f'mrecg.k is {settings.grouping.k} but {settings.model_type} has {num_units} units, '
                        f'so at most {num_units - 1} adjacent pairs can merge')


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()


def cache_key(settings: RunSettings, kind: str) -> str:
    """Hash of everything a cached result depends on: the calibrated quantizers (``calibration``) or the
    plain per-unit losses of the probe pass (``loss``, which also depends on the reconstruction settings)."""
    # format: bumped when the engine's numbers change (loss 2: the network input's step is no longer learned;
    # 3: float-arithmetic quantizers, new QDrop mask stream, fused Adam)
    key = {'kind': kind, 'format': 3 if kind == 'loss' else 1, 'model': settings.model_type, 'kwargs': settings.model_kwargs,
           'checkpoint': file_sha256(settings.model_path), 'quant': asdict(settings.quant),
           'data': {**asdict(settings.data), 'eval_limit': None, 'num_workers': None, 'pin_memory': None},
           'cali_size': settings.cali_size, 'seed': settings.seed}
    if kind == 'loss':
        recon = asdict(settings.recon)
        recon.update(iterations=settings.probe_iterations, log_every=None)
        key.update(units=settings.units_override, recon=recon)
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]


def cached_unit_losses(settings: RunSettings, names: List[str]) -> Optional[List[float]]:
    path = os.path.join(settings.cache_dir, f'loss_{cache_key(settings, "loss")}.json')
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        entry = json.load(f)
    return entry['losses'] if entry.get('units') == names else None


def calibrate_or_reuse(settings: RunSettings, qmodel: nn.Module, images: torch.Tensor, device: torch.device) -> bool:
    """Calibrate the quantizers, or with ``process.cache_calibration`` load the ranges a previous run with the
    same model, checkpoint, quantizers, data and seed computed (identical by construction). True if reused."""
    path = os.path.join(settings.cache_dir, f'calibration_{cache_key(settings, "calibration")}.pt')
    if settings.cache_calibration and os.path.isfile(path):
        load_quantized_state(qmodel, torch.load(path, map_location=device, weights_only=True))
        enable_quantization(qmodel)
        return True
    calibrate(qmodel, images, settings.data.batch_size, device)
    if settings.cache_calibration:
        save_torch(path, qmodel.state_dict())
    return False


def probe_unit_losses(settings: RunSettings, qmodel: nn.Module, fp_prepared: nn.Module, partition: UnitPartition,
                      images: torch.Tensor, device: torch.device, progress: bool) -> List[float]:
    """The loss metric: per-unit losses of a plain (ungrouped) run on a copy of the calibrated model,
    cached on disk so that sweeping k reuses them."""
    names = [u.name for u in partition.units]
    cached = cached_unit_losses(settings, names)
    if cached is not None:
        log.info('loss metric: reusing cached plain per-unit losses (%s)', settings.cache_dir)
        return cached
    probe_model = copy.deepcopy(qmodel)
    probe_partition = UnitPartition.build(probe_model, partition.units)
    recon = ReconSettings(**{**asdict(settings.recon), 'iterations': settings.probe_iterations})
    log.info('loss metric: plain probe pass, %d iterations per unit', settings.probe_iterations)
    probe = Reconstructor(probe_model, fp_prepared, probe_partition, groups_from_spans([], len(names)), recon,
                          device, settings.seed, progress)
    probe.run(images)
    losses = list(probe.unit_losses)
    write_json(os.path.join(settings.cache_dir, f'loss_{cache_key(settings, "loss")}.json'),
               {'units': names, 'losses': losses, 'iterations': settings.probe_iterations})
    return losses


def choose_groups(settings: RunSettings, partition: UnitPartition, metric_fn) -> Dict[str, Any]:
    """Decide the groups; ``metric_fn()`` supplies the loss metric lazily (it may run the probe)."""
    units = partition.units
    info: Dict[str, Any] = {'metric': settings.grouping.metric, 'k': settings.grouping.k,
                            'lam': settings.grouping.lam, 'max_group_size': settings.grouping.max_group_size,
                            'source': 'none', 'metric_values': None, 'plain_unit_losses': None}
    spans: List[Tuple[int, int]] = []
    if settings.scheme:
        spans = scheme_spans(settings, units)
        info['source'] = 'published scheme' if settings.scheme == 'authors' else 'explicit scheme'
        info['k'] = grouping.merged_pairs(spans)
    elif settings.grouping.metric == 'modcap':
        check_k(settings, len(units))
        info['metric_values'] = capacity.modcap(partition, settings.grouping.stride_penalty)
        spans = solve_spans(settings, info['metric_values'])
        info['source'] = 'modcap solver'
    elif settings.grouping.metric == 'loss':
        check_k(settings, len(units))
        info['metric_values'] = info['plain_unit_losses'] = metric_fn()
        spans = solve_spans(settings, info['metric_values'])
        info['source'] = 'loss solver'
    info['spans'] = [list(s) for s in spans]
    info['groups'] = [[u.name for u in units[a:b + 1]] for a, b in spans]
    return info


def validate_units(settings: RunSettings, model: nn.Module) -> None:
    """Before any heavy work: the unit partition, an explicit scheme, and k (with the group-size cap) must fit
    the model. Costs one MQBench prepare of a copy, no data."""
    folded, _ = quantizable(model, settings)
    partition = build_partition(settings, folded, prepare_model(folded, settings.quant))
    n = len(partition.units)
    if settings.scheme:
        scheme_spans(settings, partition.units)
    elif settings.grouping.metric != 'none':
        check_k(settings, n)
        solve_spans(settings, [float(i) for i in range(n)])  # feasibility of k under max_group_size


# ---- plan ----------------------------------------------------------------------------------------------
def plan(settings: RunSettings) -> str:
    """Base units, their ModCap, the chosen groups: no data and no checkpoint needed (ModCap is data-free)."""
    has_ckpt = bool(settings.model_path) and os.path.isfile(settings.model_path)
    model = build_float_model(settings, load=has_ckpt)
    folded, _ = quantizable(model, settings)
    qmodel = prepare_model(folded, settings.quant)
    partition = build_partition(settings, folded, qmodel)
    units = partition.units
    names = [u.name for u in units]
    caps = capacity.modcap(partition, settings.grouping.stride_penalty)
    losses = cached_unit_losses(settings, names) if has_ckpt and settings.grouping.metric == 'loss' else None

    def loss_metric():
        if losses is None:
            raise UserError('mrecg.metric loss needs the per-unit losses of a plain probe run, and none is cached '
                            f'in {settings.cache_dir} for this config: run without --plan once (it caches them)')
        return losses

    info = choose_groups(settings, partition, loss_metric)
    spans = [tuple(s) for s in info['spans']]
    in_group = {i: gi for gi, (a, b) in enumerate(spans) for i in range(a, b + 1)}
    scores = grouping.pair_scores(info['metric_values'] or caps)
    kwargs = f' {settings.model_kwargs}' if settings.model_kwargs else ''
    lines = [f'model {settings.model_type}{kwargs}: {len(units)} base units, '
             f'W{settings.quant.weight.bit}A{settings.quant.act.bit}, BN folded: {settings.quant.fold_bn}, '
             f'method {settings.method}',
             f'grouping: {info["source"]}, k = {info["k"]}' + (f', lambda = {info["lam"]}' if info['lam'] else '')
             + (f', max group size {info["max_group_size"]}' if info['max_group_size'] else ''),
             f'ModCap = sum(params x weight bits x {settings.grouping.stride_penalty} if stride > 1 else 1)', '',
             f'{"#":>3}  {"unit":<26} {"ModCap":>12} {"loss":>10} {"d(next)":>10}  group  modules']
    for i, u in enumerate(units):
        loss = f'{losses[i]:10.4g}' if losses else f'{"-":>10}'
        d = f'{scores[i]:10.3g}' if i < len(scores) else f'{"":>10}'
        g = f'G{in_group[i] + 1}' if i in in_group else ''
        lines.append(f'{i:>3}  {u.name:<26} {caps[i]:12.4g} {loss} {d}  {g:<5}  {",".join(u.modules)}')
    groups = groups_from_spans(spans, len(units))
    lines += ['', f'reconstruction units ({len(units)} -> {len(groups)}): '
              + ' | '.join(g.name(units) if g.first == g.last else f'[{g.name(units)}]' for g in groups)]
    if settings.model_type in grouping.PUBLISHED_SCHEMES and settings.granularity == 'block':
        try:
            pub = grouping.spans_from_scheme(grouping.PUBLISHED_SCHEMES[settings.model_type], units)
            lines.append('authors\' published groups: ' + ' | '.join(
                '+'.join(names[a:b + 1]) for a, b in pub))
        except ValueError:
            pass
    return '\n'.join(lines)


# ---- output folder and run state -----------------------------------------------------------------------
def prepare_output_dir(path: str, resume: bool, overwrite: bool) -> None:
    """Never silently overwrite: a finished run needs --overwrite; an unfinished one --resume or --overwrite."""
    finished = os.path.isfile(os.path.join(path, RESULTS))
    unfinished = os.path.isfile(os.path.join(path, STATE))
    if resume:
        if finished and not overwrite:
            raise UserError(f'{path} already holds a finished run ({RESULTS}); nothing to resume')
        if not os.path.isfile(os.path.join(path, CONFIG)):
            raise UserError(f'cannot resume {path}: it has no {CONFIG} (was it created by ptq_main.py?)')
        return
    if overwrite:
        for name in (RESULTS, CSV, PLOT, STATE, QMODEL, CONFIG, LOG):
            if os.path.exists(os.path.join(path, name)):
                os.remove(os.path.join(path, name))
        return
    if finished:
        raise UserError(f'{path} already holds a finished run ({RESULTS}); choose another --output or pass '
                        '--overwrite')
    if unfinished:
        raise UserError(f'{path} holds an unfinished run; continue it with --resume {path} or start over with '
                        '--overwrite')


def hardened_layers(qmodel: nn.Module) -> List[str]:
    """Layers whose rounding was learned and written into the weight (their quantizer is in hard mode)."""
    return [name for name, m in qmodel.named_modules()
            if is_adaround_layer(m) and getattr(m.weight_fake_quant, 'hardened', False)]


def load_quant_state(qmodel: nn.Module, state: Dict[str, Any]) -> None:
    load_quantized_state(qmodel, state['qmodel'])
    mods = dict(qmodel.named_modules())
    for name in state['hardened']:
        mods[name].weight_fake_quant.adaround = False
        mods[name].weight_fake_quant.hardened = True


def config_digest(path: str) -> str:
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


# ---- the run -------------------------------------------------------------------------------------------
def run(settings: RunSettings, cfg, model: nn.Module, output_dir: str, device: torch.device, resume: bool = False,
        progress: bool = True) -> Dict[str, Any]:
    """Quantize the loaded float ``model`` into ``output_dir`` (checked by ``prepare_output_dir``)."""
    t_start = time.perf_counter()
    timing: Dict[str, float] = {}
    config_path = os.path.join(output_dir, CONFIG)
    if not resume or not os.path.isfile(config_path):
        write_text(config_path, dump_config(cfg))
    state = None
    if resume and os.path.isfile(os.path.join(output_dir, STATE)):
        state = torch.load(os.path.join(output_dir, STATE), map_location='cpu', weights_only=True)
        if state.get('format') != STATE_FORMAT:
            raise UserError(f'{output_dir}/{STATE} was written by another version of the engine, whose numbers '
                            'differ; start over with --overwrite')
        if state.get('config') != config_digest(config_path):
            raise UserError(f'{output_dir}/{STATE} does not belong to {config_path} (was the config edited?); '
                            'start over with --overwrite')
        log.info('resuming %s: %d units already reconstructed', output_dir, len(state['results']))
    log.info('model %s %s, checkpoint %s, device %s', settings.model_type, settings.model_kwargs,
             settings.model_path, device)

    t = time.perf_counter()
    images = calibration_images(settings.data, settings.cali_size, settings.seed)
    timing['calibration_data_seconds'] = time.perf_counter() - t
    if state:
        fp_acc = Accuracy(**state['fp_accuracy'])
    else:
        t = time.perf_counter()
        fp_acc = evaluate(model.to(device), eval_batches(settings.data, device), device, 'eval float', progress)
        timing['fp_eval_seconds'] = time.perf_counter() - t
        log.info('float top-1 %s top-5 %s on %d images', fp_acc.top1, fp_acc.top5, fp_acc.images)

    folded, n_folded = quantizable(model.cpu(), settings)
    qmodel = prepare_model(folded, settings.quant).to(device)
    fp_prepared = copy.deepcopy(qmodel)
    disable_all(fp_prepared)
    t = time.perf_counter()
    if state:
        load_quant_state(qmodel, state)
        qmodel.to(device)
    elif calibrate_or_reuse(settings, qmodel, images, device):
        log.info('calibration: reused the cached quantizer ranges (%s)', settings.cache_dir)
    timing['calibration_seconds'] = time.perf_counter() - t
    partition = build_partition(settings, folded, qmodel)
    units = partition.units
    names = [u.name for u in units]

    t = time.perf_counter()
    if state:
        info = state['grouping']
    else:
        info = choose_groups(settings, partition, lambda: probe_unit_losses(
            settings, qmodel, fp_prepared, partition, images, device, progress))
    timing['grouping_seconds'] = time.perf_counter() - t
    spans = [tuple(s) for s in info['spans']]
    groups = groups_from_spans(spans, len(units))
    log.info('%d base units -> %d reconstruction units (%s); %s', len(units), len(groups), info['source'],
             ' | '.join(f'[{"+".join(g)}]' for g in info['groups']) or 'no merged groups')

    done = [GroupResult(**r) for r in state['results']] if state else []
    elapsed_before = state['elapsed'] if state else 0.0

    def save_state(results: List[GroupResult]) -> None:
        save_torch(os.path.join(output_dir, STATE), {
            'format': STATE_FORMAT, 'config': config_digest(config_path), 'fp_accuracy': asdict(fp_acc),
            'grouping': info, 'results': [asdict(r) for r in results], 'hardened': hardened_layers(qmodel),
            'qmodel': qmodel.state_dict(), 'elapsed': elapsed_before + time.perf_counter() - t_start})

    if not state:
        save_state([])
    recon = Reconstructor(qmodel, fp_prepared, partition, groups, settings.recon, device, settings.seed, progress)
    t = time.perf_counter()
    results = recon.run(images, done, on_group_done=save_state)
    timing['reconstruction_seconds'] = time.perf_counter() - t

    enable_quantization(qmodel)
    t = time.perf_counter()
    q_acc = evaluate(qmodel, eval_batches(settings.data, device), device, 'eval quantized', progress)
    timing['quant_eval_seconds'] = time.perf_counter() - t
    warnings = [w for r in results for w in r.warnings]
    if q_acc.top1 is None:
        warnings.append(f'the quantized model produced non-finite logits in {q_acc.nonfinite_batches} batches: '
                        'no accuracy is reported')
    log.info('quantized top-1 %s top-5 %s', q_acc.top1, q_acc.top5)
    timing['total_seconds'] = elapsed_before + time.perf_counter() - t_start

    summary = build_results(settings, cfg, fp_acc, q_acc, results, names, recon.unit_losses, info, timing,
                            recon.peak_cache_bytes, device, n_folded, warnings, resumed=state is not None)
    save_torch(os.path.join(output_dir, QMODEL), qmodel.state_dict())
    curves = {settings.method: recon.unit_losses}
    if info.get('plain_unit_losses'):
        curves = {'plain (probe)': info['plain_unit_losses'], **curves}
    plot_loss_curve(os.path.join(output_dir, PLOT), names, curves, spans,
                    f'{settings.model_type} W{settings.quant.weight.bit}A{settings.quant.act.bit} '
                    f'{settings.method}: per-unit reconstruction loss')
    write_csv_row(os.path.join(output_dir, CSV), csv_row(summary))
    write_json(os.path.join(output_dir, RESULTS), summary)
    if os.path.exists(os.path.join(output_dir, STATE)):
        os.remove(os.path.join(output_dir, STATE))
    return summary


def build_results(settings: RunSettings, cfg, fp_acc: Accuracy, q_acc: Accuracy, results: List[GroupResult],
                  names: List[str], unit_losses, info: Dict[str, Any], timing: Dict[str, float], peak_cache: int,
                  device: torch.device, n_folded: int, warnings: List[str], resumed: bool) -> Dict[str, Any]:
    import mqbench
    extra = {'plain_loss': info['plain_unit_losses']} if info.get('plain_unit_losses') else None
    summary = {
        'method': settings.method, 'model': settings.model_type, 'model_kwargs': settings.model_kwargs,
        'checkpoint': settings.model_path, 'dataset': settings.data.type,
        'w_bits': settings.quant.weight.bit, 'a_bits': settings.quant.act.bit, 'seed': settings.seed,
        'fp_top1': finite_or_none(fp_acc.top1), 'fp_top5': finite_or_none(fp_acc.top5),
        'quant_top1': finite_or_none(q_acc.top1), 'quant_top5': finite_or_none(q_acc.top5),
        'eval_images': q_acc.images,
        'units': [{**asdict(r), 'loss': finite_or_none(r.loss), 'train_loss': finite_or_none(r.train_loss)}
                  for r in results],
        'unit_losses': unit_loss_table(names, unit_losses, extra),
        'grouping': {k: info[k] for k in ('metric', 'k', 'lam', 'max_group_size', 'source', 'groups', 'spans',
                                           'metric_values')},
        'loss_curve': oscillation_stats(names, unit_losses),
        'settings': {
            'fold_bn': settings.quant.fold_bn, 'bn_layers_folded': n_folded,
            'first_last_layer': '8-bit weights and inputs (MQBench academic backend)',
            'w_qconfig': asdict(settings.quant.weight), 'a_qconfig': asdict(settings.quant.act),
            'cali_size': settings.cali_size, 'granularity': settings.granularity,
            'reconstruction': asdict(settings.recon), 'input_size': settings.data.input_size,
            'test_resize': settings.data.test_resize, 'cali_transform': settings.data.cali_transform},
        'timing': timing, 'peak_cache_mb': round(peak_cache / 2 ** 20, 1), 'device': str(device),
        'versions': {'torch': torch.__version__, 'mqbench': getattr(mqbench, '__version__', 'mqbench-torch2'),
                     'python': platform.python_version()},
        'warnings': warnings, 'resumed': resumed, 'date': time.strftime('%Y-%m-%d %H:%M:%S'),
    }
    if info.get('plain_unit_losses'):
        summary['plain_loss_curve'] = oscillation_stats(names, info['plain_unit_losses'])
    return summary


def csv_row(summary: Dict[str, Any]) -> Dict[str, Any]:
    curve = summary['loss_curve']
    return {'method': summary['method'], 'model': summary['model'], 'dataset': summary['dataset'],
            'w_bits': summary['w_bits'], 'a_bits': summary['a_bits'], 'seed': summary['seed'],
            'fp_top1': summary['fp_top1'], 'quant_top1': summary['quant_top1'], 'quant_top5': summary['quant_top5'],
            'max_unit_loss': curve['max_unit_loss'], 'oscillation': curve['oscillation'],
            'k': summary['grouping']['k'], 'groups': ' | '.join('+'.join(g) for g in summary['grouping']['groups']),
            'seconds': round(summary['timing']['total_seconds'], 1)}
