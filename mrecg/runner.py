"""A run of the command line: config -> checks -> ``mrecg.quantize`` -> an output folder that survives.

Every check that can fail on bad input (paths, checkpoint, data, units, groups, output folder) runs before
any heavy work. After each reconstructed unit the run state is written atomically to ``checkpoint.pt``,
so ``--resume`` continues from the last finished unit and ends with the same numbers.
"""
import json
import logging
import os
import platform
import shlex
import shutil
import tempfile
import time
from dataclasses import asdict, replace
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from mrecg.api import ProbeState, QuantizationResult, RunState, quantize, resolve_device
from mrecg.caching import digest
from mrecg.config import Config, dump_config, resolve_path
from mrecg.data import check_data, check_items, data_summary, dataset, sample_input
from mrecg.distributed import current
from mrecg.errors import NotResumable, UserError
from mrecg.evaluation import Accuracy, check_logits
from mrecg.export import MISMATCHES
from mrecg.files import BadFile, read_torch
from mrecg.group_policy import GroupingInfo, validate_grouping
from mrecg.preparation import prepare
from mrecg.reconstruction import GroupResult
from mrecg.reporting import (finite_or_none, oscillation_stats, plot_loss_curve, save_torch, unit_loss_table,
                             write_csv_row, write_json, write_text)
from mrecg.zoo import CheckpointError, create_model, load_checkpoint, registry_family

log = logging.getLogger('mrecg')
CONFIG, RESULTS, CSV, PLOT, STATE, LOG, QMODEL = ('config.yaml', 'results.json', 'results.csv', 'loss_curve.png',
                                                  'checkpoint.pt', 'run.log', 'quantized_model.pt')
ONNX, FLOAT_ONNX = 'model.onnx', 'model.float.onnx'  # export_onnx names the float twin after ONNX
PREVIOUS = 'previous_run'  # --overwrite keeps the finished run here until the new one has succeeded
RUN_FILES = (RESULTS, CSV, PLOT, STATE, QMODEL, CONFIG, LOG, ONNX, FLOAT_ONNX, MISMATCHES)
STATE_FORMAT = 4  # 4: phases (started, calibrated, probe, reconstruction), weights/images digests


# ---- model and data --------------------------------------------------------------------------------------
def train_hint(cfg: Config) -> str:
    """For a missing small-model checkpoint, the command that makes it (the large ones are not committed)."""
    path = resolve_path(cfg.model.path) or ''
    expected = os.path.join('models', 'checkpoints', f'{cfg.model.type}_{cfg.data.type}.pth')
    if (cfg.data.type not in ('digits', 'fashion_mnist') or os.path.isfile(path)
            or not os.path.normpath(path).endswith(expected)):
        return ''
    return (f'; train it with: python scripts/train_small_models.py --dataset {cfg.data.type} '
            f'--models {cfg.model.type}')


def build_float_model(cfg: Config, load: bool = True) -> nn.Module:
    """The float model of ``model.type``, with ``model.path`` loaded (by parameter name) when ``load``."""
    model = create_model(cfg.model.type, cfg.model.kwargs)
    if load:
        path = resolve_path(cfg.model.path)
        if not path:
            raise UserError('model.path is not set: point it at the float checkpoint to quantize')
        if not os.path.isfile(path):
            raise UserError(f'checkpoint file not found: {path} (model.path)' + train_hint(cfg))
        try:
            load_checkpoint(model, path, registry_family(cfg.model.type))
        except CheckpointError as exc:
            raise UserError(str(exc) + train_hint(cfg)) from None
    return model.eval()


def open_data(cfg: Config) -> Tuple[Any, Optional[Any]]:
    """The calibration and (unless ``data.evaluate`` is false, or there is none) evaluation datasets, each
    checked on its first item, and the calibration size checked against them."""
    check_data(cfg.data)
    train = dataset(cfg.data, 'train')
    if train is None:
        raise UserError(f'no training (calibration) data found for data.type {cfg.data.type}')
    check_items(train, 'calibration data', labelled=False)
    if cfg.quantize.cali_size > len(train):
        raise UserError(f'quantize.cali_size is {cfg.quantize.cali_size} but the {cfg.data.type} training split '
                        f'has {len(train)} images')
    val = dataset(cfg.data, 'val') if cfg.data.evaluate else None
    if val is not None:
        check_items(val, 'evaluation data', labelled=True)
    elif cfg.data.evaluate:
        log.info('no evaluation data for data.type %s: quantizing without accuracy', cfg.data.type)
    return train, val


# ---- output folder and run state -------------------------------------------------------------------------
def prepare_output_dir(path: str, resume: bool, overwrite: bool, write: bool = True) -> None:
    """Never silently overwrite: a finished run needs --overwrite; an unfinished one --resume or --overwrite.
    The folder must be writable (checked now, not after hours of work). ``--overwrite`` of a finished run moves
    its files to ``previous_run/``, removed only once the new run has written its results. ``write=False``
    (ranks > 0 of a data-parallel run) only checks. Call it holding the folder's lock (``mrecg.locking``)."""
    finished = os.path.isfile(os.path.join(path, RESULTS))
    unfinished = os.path.isfile(os.path.join(path, STATE))
    if resume:
        if finished and not overwrite:
            raise UserError(f'{path} already holds a finished run ({RESULTS}); nothing to resume')
        if not os.path.isfile(os.path.join(path, CONFIG)):
            raise UserError(f'cannot resume {path}: it has no {CONFIG} (was it created by ptq_main.py?)')
    elif finished and not overwrite:
        raise UserError(f'{path} already holds a finished run ({RESULTS}); choose another --output or pass '
                        '--overwrite')
    elif unfinished and not overwrite:
        raise UserError(f'{path} holds an unfinished run; continue it with --resume {shlex.quote(path)} or start over with '
                        '--overwrite')
    if not write:
        return
    check_writable(path)
    if overwrite and not resume:
        if finished:
            keep_previous(path)
        for name in RUN_FILES:  # an unfinished run's files (a finished run's are in previous_run/ now)
            if os.path.exists(os.path.join(path, name)):
                os.remove(os.path.join(path, name))


def keep_previous(path: str) -> None:
    """Move a finished run's files into ``path/previous_run/`` (replacing an older one there)."""
    previous = os.path.join(path, PREVIOUS)
    if os.path.isdir(previous):
        shutil.rmtree(previous)
    os.makedirs(previous)
    for name in RUN_FILES:
        if os.path.exists(os.path.join(path, name)):
            os.replace(os.path.join(path, name), os.path.join(previous, name))
    log.info('--overwrite: the finished run is kept in %s until this one succeeds', previous)


def previous_results(path: Optional[str]) -> Optional[str]:
    """The folder holding the finished run an --overwrite has not yet replaced, if any."""
    previous = os.path.join(path, PREVIOUS) if path else None
    return previous if previous and os.path.isfile(os.path.join(previous, RESULTS)) else None


def check_writable(path: str, what: str = 'the output folder') -> None:
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix='.write_test.', dir=path)  # unique: two runs on one cache never collide
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        where = '--output' if what == 'the output folder' else what
        raise UserError(f'cannot write to {what} {path}: {exc.strerror or exc} (choose another {where})') from None


def config_digest(cfg: Config) -> str:
    """The digest of the resolved config in memory (not of whatever ``config.yaml`` holds at the time)."""
    return digest(cfg.to_dict())


def mark_started(output: str, digest: str) -> None:
    """A checkpoint from the first second: the folder counts as unfinished (resumable) at once."""
    save_torch(os.path.join(output, STATE), {'format': STATE_FORMAT, 'config': digest, 'phase': 'started'})


def save_state(output: str, digest: str, state: RunState) -> None:
    probe = state.probe and {'results': [asdict(r) for r in state.probe.results], 'hardened': state.probe.hardened,
                             'qmodel': state.probe.qmodel_state}
    save_torch(os.path.join(output, STATE), {
        'format': STATE_FORMAT, 'config': digest, 'phase': state.phase, 'weights': state.weights,
        'images': state.images, 'eval_data': state.eval_data,
        'fp_accuracy': asdict(state.fp_accuracy) if state.fp_accuracy else None,
        'grouping': asdict(state.grouping) if state.grouping else None,
        'results': [asdict(r) for r in state.results], 'hardened': state.hardened, 'qmodel': state.qmodel_state,
        'probe': probe, 'elapsed': state.elapsed, 'world_size': state.world_size,
        'bit_allocation': json.dumps(state.bit_allocation) if state.bit_allocation else None})


def load_state(output: str, digest: str) -> Optional[RunState]:
    """The saved state, checked against the config the run was started with; None when the run had not got
    past its start (it starts over, in the same folder)."""
    path = os.path.join(output, STATE)
    if not os.path.isfile(path):
        return None
    try:
        raw = read_torch(path, 'the saved state')
    except BadFile as exc:
        raise NotResumable(f'{exc}; start over with --overwrite') from None
    if not isinstance(raw, dict) or raw.get('format') != STATE_FORMAT:
        raise NotResumable(f'{path} was written by another version of the engine, whose numbers differ; '
                           'start over with --overwrite')
    if raw.get('config') != digest:
        raise NotResumable(f'{path} does not belong to {os.path.join(output, CONFIG)} (was the config edited?); '
                           'start over with --overwrite')
    try:
        return state_from(raw)
    except (KeyError, TypeError, ValueError) as exc:  # a state file cut short or written by hand
        raise NotResumable(f'{path} is incomplete ({type(exc).__name__}: {exc}); start over with --overwrite') \
            from None


def state_from(raw: dict) -> Optional[RunState]:
    if raw['phase'] == 'started':
        return None
    fp, g, p = raw['fp_accuracy'], raw['grouping'], raw['probe']
    probe = p and ProbeState([GroupResult(**r) for r in p['results']], p['hardened'], p['qmodel'])
    allocation = json.loads(raw['bit_allocation']) if raw.get('bit_allocation') else None
    return RunState(Accuracy(**fp) if fp else None, GroupingInfo(**g) if g else None,
                    [GroupResult(**r) for r in raw['results']], raw['hardened'], raw['qmodel'], raw['elapsed'],
                    raw['world_size'], raw['phase'], raw['weights'], raw['images'], raw['eval_data'], probe,
                    allocation)


def check_run(cfg: Config, export: bool = False) -> Tuple[nn.Module, Any, Optional[Any]]:
    """Everything that can be checked before heavy work: model, checkpoint, data, units, groups, and with
    ``export`` whether the exporter can write the quantized graph (built from the uncalibrated model)."""
    model = build_float_model(cfg)
    train, val = open_data(cfg)
    target, sample = quantized_target(cfg, model, sample_input(train), export)
    prepared = prepare(target, cfg)
    validate_grouping(cfg, prepared)
    if cfg.process.cache_calibration or cfg.mrecg.metric == 'loss':  # a cache written after hours must not fail
        check_writable(cfg.process.cache_dir, 'process.cache_dir')
    if cfg.quantize.bit_search:
        from mrecg.bitsearch import check_budget
        check_budget(target, cfg, sample)
    if export:
        from mrecg.export import check_exportable
        check_exportable(prepared.qmodel, sample)
    return model, train, val


def quantized_target(cfg: Config, model: nn.Module, sample: Optional[torch.Tensor],
                     export: bool = False) -> Tuple[nn.Module, Optional[torch.Tensor]]:
    """What the run quantizes and one input of it: the model and an image, or (``model.quantize_part``) the
    part and what it receives for that image. A classifier must return one tensor of class scores."""
    from mrecg.parts import part_and_inputs
    path = cfg.model.quantize_part
    if not path:
        if cfg.eval.metric == 'top1':
            check_logits(model, sample, cfg.model.type)
        return model, sample
    if export:
        raise UserError('--export onnx of a network with a quantized part (model.quantize_part) is not built yet: '
                        'run without --export')
    return part_and_inputs(model, path, sample, 1, torch.device('cpu'))


def run(cfg: Config, model: nn.Module, train, val, output: str, device: str, resume: bool = False,
        progress: bool = True, export: bool = False) -> Dict[str, Any]:
    """Quantize into ``output`` (checked by ``prepare_output_dir``, under the folder's lock); returns the results
    record. With ``export`` the result is also written as ONNX and checked in onnxruntime (``export_folder``).
    In a data-parallel run every rank calls this and rank 0 alone writes."""
    main = current().main
    digest = config_digest(cfg)
    state = load_state(output, digest) if resume else None
    if main:
        write_text(os.path.join(output, CONFIG), dump_config(cfg))
        if state is None:
            mark_started(output, digest)
    if state:
        log.info('resuming %s after the %s phase (%d units reconstructed)', output, state.phase, len(state.results))
    log.info('model %s %s, checkpoint %s, device %s', cfg.model.type, cfg.model.kwargs, cfg.model.path, device)
    log.info('data %s: %s', cfg.data.type, data_summary(train, val))
    result = quantize(model, train, cfg, val, device=device, progress=progress, cache_dir=cfg.process.cache_dir,
                      resume=state, on_unit_done=lambda s: save_state(output, digest, s))
    record = results_record(cfg, result)
    record['peak_rss_mb_per_rank'] = current().gather(round(peak_rss_bytes() / 2 ** 20, 1))
    if main:
        save_torch(os.path.join(output, QMODEL), result.model.state_dict())
        write_outputs(output, cfg, result, record)
        discard_previous(output)
        if export:
            export_folder(output, cfg, result.model, train, val, record, device)
    return record


def discard_previous(output: str) -> None:
    """The new run has its results: the finished run an --overwrite kept is no longer needed."""
    previous = os.path.join(output, PREVIOUS)
    if os.path.isdir(previous):
        shutil.rmtree(previous)


def peak_rss_bytes() -> int:
    """This process's peak resident memory (Linux reports kB, macOS bytes)."""
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if platform.system() == 'Darwin' else peak * 1024


def export_folder(output: str, cfg: Config, qmodel: nn.Module, train, val, record: Dict[str, Any],
                  device: str = 'cpu'):
    """``DIR/model.onnx`` (+ ``model.float.onnx``) from the quantized model, checked in onnxruntime on the
    evaluation data; the report (with the check's figures and verdict) goes into ``results.json`` under
    ``export`` and the images whose top-1 classes differ into ``DIR/export_mismatches.json`` before the rule
    (``export`` config section) is enforced, so a failing check loses nothing. The fake-quant reference runs on
    ``device`` with the config's data workers."""
    from mrecg.data import eval_batches, eval_sample, sample_input
    from mrecg.export import MISMATCHES, check_export, export_onnx, judge_export
    d = cfg.data
    on_gpu = torch.device(device).type == 'cuda'
    batches = eval_batches(val, d.batch_size, d.eval_limit, d.num_workers, pin_memory=on_gpu,
                           seed=d.split_seed) if val is not None else None
    report = export_onnx(qmodel.cpu(), os.path.join(output, ONNX), sample_input(train), batches, device)
    judge_export(report, cfg.export)
    mismatches = os.path.join(output, MISMATCHES)
    if report.onnxruntime_top1 is not None:
        indices = eval_sample(len(val), d.eval_limit, d.split_seed)
        write_json(mismatches, {'positions': report.disagreements,
                                'dataset_indices': [int(indices[i]) for i in report.disagreements],
                                'note': 'positions in the evaluation order; dataset_indices into the evaluation '
                                        'dataset (data.eval_limit samples it with data.split_seed)'})
    record['export'] = report.to_dict()
    write_json(os.path.join(output, RESULTS), record)
    log.info('export: %s (%d bytes; float %d bytes), onnxruntime top-1 %s vs fake-quant %s, %s %% agree',
             report.path, report.file_bytes, report.float_file_bytes, report.onnxruntime_top1,
             report.fake_quant_top1, report.agreement)
    check_export(report, cfg.export, mismatches)
    return report


def write_outputs(output: str, cfg: Config, result: QuantizationResult, record: Dict[str, Any]) -> None:
    spans = [tuple(s) for s in result.grouping.spans]
    curves = {result.method: result.unit_losses}
    if result.grouping.plain_unit_losses:
        curves = {'plain (probe)': result.grouping.plain_unit_losses, **curves}
    plot_loss_curve(os.path.join(output, PLOT), result.unit_names, curves, spans,
                    f'{record["model"]} W{record["w_bits"]}A{record["a_bits"]} {result.method}: '
                    'per-unit reconstruction loss')
    write_csv_row(os.path.join(output, CSV), csv_row(record))
    write_json(os.path.join(output, RESULTS), record)
    if os.path.exists(os.path.join(output, STATE)):
        os.remove(os.path.join(output, STATE))


def results_record(cfg: Config, r: QuantizationResult) -> Dict[str, Any]:
    """``results.json``: every number of the run, the settings that produced them, versions."""
    import mqbench
    g, q = r.grouping, cfg.quantize
    fp, acc = r.fp_accuracy or Accuracy(None, None, 0), r.accuracy or Accuracy(None, None, 0)
    extra = {'plain_loss': g.plain_unit_losses} if g.plain_unit_losses else None
    record = {
        'method': r.method, 'model': cfg.model.type, 'model_kwargs': cfg.model.kwargs,
        'checkpoint': resolve_path(cfg.model.path), 'dataset': cfg.data.type,
        'w_bits': q.w_qconfig.bit, 'a_bits': q.a_qconfig.bit, 'seed': cfg.process.seed,
        'fp_top1': finite_or_none(fp.top1), 'fp_top5': finite_or_none(fp.top5),
        'quant_top1': finite_or_none(acc.top1), 'quant_top5': finite_or_none(acc.top5), 'eval_images': acc.images,
        'metric': cfg.eval.metric if cfg.eval.metric in ('top1', 'miou') else acc.metric,
        'fp_score': finite_or_none(fp.score), 'quant_score': finite_or_none(acc.score),
        'quantize_part': cfg.model.quantize_part,
        'units': [{**asdict(u), 'loss': finite_or_none(u.loss), 'train_loss': finite_or_none(u.train_loss)}
                  for u in r.units],
        'unit_losses': unit_loss_table(r.unit_names, r.unit_losses, extra),
        'grouping': {k: getattr(g, k) for k in ('metric', 'k', 'lam', 'max_group_size', 'source', 'groups', 'spans',
                                                'metric_values', 'options', 'notes')},
        'loss_curve': oscillation_stats(r.unit_names, r.unit_losses),
        'layer_bits': {name: {'w_bit': w, 'a_bit': a} for name, (w, a) in r.layer_bits.items()},
        'settings': {
            'fold_bn': q.fold_bn, 'bn_layers_folded': r.bn_folded,
            'first_last_layer': '8-bit weights and inputs (MQBench academic backend)',
            'w_qconfig': asdict(q.w_qconfig), 'a_qconfig': asdict(q.a_qconfig),
            'layer_bits': [asdict(b) for b in q.layer_bits], 'cali_size': q.cali_size,
            'bit_search': asdict(q.bit_search) if q.bit_search else None,
            'granularity': q.reconstruction.granularity, 'reconstruction': asdict(q.reconstruction),
            'input_size': cfg.data.input_size, 'test_resize': cfg.data.test_resize,
            'cali_transform': cfg.data.cali_transform},
        'timing': asdict(r.timings), 'peak_cache_mb': round(r.peak_cache_bytes / 2 ** 20, 1), 'device': r.device,
        'versions': {'torch': torch.__version__, 'mqbench': getattr(mqbench, '__version__', 'mqbench-torch2'),
                     'python': platform.python_version()},
        'warnings': r.warnings, 'resumed': r.resumed, 'date': time.strftime('%Y-%m-%d %H:%M:%S'),
        'world_size': r.world_size,
        'peak_cache_bytes_per_rank': r.peak_cache_bytes_per_rank,
    }
    if g.plain_unit_losses:
        record['plain_loss_curve'] = oscillation_stats(r.unit_names, g.plain_unit_losses)
    record['size'] = r.size
    record['engine'] = r.engine
    if r.bit_search:
        record['bit_search'] = r.bit_search
    if acc.scores or fp.scores:
        record['scores'] = {'float': {k: finite_or_none(v) for k, v in fp.scores.items()},
                            'quantized': {k: finite_or_none(v) for k, v in acc.scores.items()}}
    return record


def csv_row(record: Dict[str, Any]) -> Dict[str, Any]:
    curve = record['loss_curve']
    return {'method': record['method'], 'model': record['model'], 'dataset': record['dataset'],
            'w_bits': record['w_bits'], 'a_bits': record['a_bits'], 'seed': record['seed'],
            'fp_top1': record['fp_top1'], 'quant_top1': record['quant_top1'], 'quant_top5': record['quant_top5'],
            'metric': record['metric'], 'fp_score': record['fp_score'], 'quant_score': record['quant_score'],
            'max_unit_loss': curve['max_unit_loss'], 'oscillation': curve['oscillation'],
            'k': record['grouping']['k'], 'groups': ' | '.join('+'.join(g) for g in record['grouping']['groups']),
            'seconds': round(record['timing']['total_seconds'], 1)}


def plan_calibration_images(cfg: Config, needs: str) -> torch.Tensor:
    """The run's calibration images, drawn for --plan (``needs`` says why, in the error when there is no data)."""
    from mrecg.data import calibration_images
    try:
        train, _ = open_data(replace(cfg, data=replace(cfg.data, evaluate=False)))
    except UserError as exc:
        raise UserError(f'{needs} ({exc})') from None
    d = cfg.data
    return calibration_images(train, cfg.quantize.cali_size, cfg.process.seed, d.batch_size, d.num_workers)


def plan_images(cfg: Config):
    """The calibration images --plan needs for a bit search with a data measure (None when it needs none)."""
    from mrecg.bitsearch import DATA_MEASURES
    bs = cfg.quantize.bit_search
    if bs is None or bs.measure not in DATA_MEASURES:
        return None
    images = plan_calibration_images(cfg, f'quantize.bit_search.measure {bs.measure} needs the calibration data; '
                                          '--set quantize.bit_search.measure=weight plans without data')
    return images[:min(bs.samples, cfg.quantize.cali_size)]


def cached_plan_losses(cfg: Config, model: nn.Module, unit_names: List[str]) -> Optional[List[float]]:
    """The loss metric's probe losses, if a full run with this config cached them (for --plan). The cache is
    keyed by the calibration images' content, so they are drawn (the data must be there)."""
    from mrecg.caching import RunCache, environment, images_id, model_digest
    if cfg.mrecg.metric != 'loss':
        return None
    images = plan_calibration_images(cfg, 'mrecg.metric loss: --plan looks the probe losses up by the calibration '
                                          'images, so it needs the data')
    env = environment(resolve_device(cfg.process.device))
    return RunCache(cfg.process.cache_dir, cfg, model_digest(model), images_id(images), cfg.model.type,
                    env=env).unit_losses(unit_names)
