"""One run of MQBench's own ``ptq_reconstruction`` (BRECQ or QDrop) from one of our configs, written as a
``results.json`` like ptq_main.py's, so the sweep and the collector put it in the same table.

    mrecg baseline --config configs/fashion/mbv2_2_4.yaml --output outputs/x --set process.seed=2

Same float model, calibration images, calibrated quantizers (calibrated as ours are, same seed), bits,
iterations and images per step as ptq_main.py with that config; MQBench picks its own blocks.
The per-unit loss curve is measured afterwards on our base units, so both curves are comparable.
"""
import argparse
import copy
import dataclasses
import os
import sys
import time

from mrecg.api import QuantizationResult, Timings, resolve_device
from mrecg.baselines import mqbench_reconstruct
from mrecg.bitsearch import model_figures
from mrecg.config import dump_config, load_config
from mrecg.data import calibration_images, eval_batches
from mrecg.distributed import Dist
from mrecg.errors import UserError
from mrecg.helptext import PlainHelp
from mrecg.locking import FolderLock
from mrecg.metrics import evaluate_task, headline
from mrecg.parts import part_and_inputs, put_part
from mrecg.planning import GroupingInfo, prepare
from mrecg.quantization import calibrate, disable_all, enable_quantization, layer_bit_table
from mrecg.reconstruction import Reconstructor
from mrecg.reporting import close_log_file, setup_logging, write_json, write_text
from mrecg.runner import CONFIG, LOG, RESULTS, build_float_model, open_data, results_record
from mrecg.units import UnitPartition, groups_from_spans


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='mrecg baseline', description=__doc__,
                                formatter_class=PlainHelp)
    p.add_argument('--config', required=True, help='YAML config (its grouping is ignored: MQBench has none)')
    p.add_argument('--output', required=True, help='output folder')
    p.add_argument('--set', nargs='+', action='extend', default=[], metavar='KEY=VALUE',
                   help='override config keys (repeatable)')
    p.add_argument('--no-progress', action='store_true', help='no progress bars')
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        cfg = load_config(args.config, [*args.set, 'mrecg.metric=none', 'mrecg.k=0', 'mrecg.scheme=null'])
        rec = cfg.quantize.reconstruction
        if not rec.enabled or rec.granularity != 'block':
            raise UserError('mrecg baseline runs MQBench block reconstruction (BRECQ/QDrop) only')
        device = resolve_device(cfg.process.device)
        model = build_float_model(cfg)
        train, val = open_data(cfg)
        with FolderLock(args.output):
            if os.path.isfile(os.path.join(args.output, RESULTS)):
                raise UserError(f'{args.output} already holds a finished run')
            try:
                return baseline_run(cfg, model, train, val, args.output, device, not args.no_progress)
            finally:
                close_log_file()
    except UserError as exc:
        print(f'error: {exc}', file=sys.stderr)
        return 2


def baseline_run(cfg, model, train, val, output: str, device, progress: bool) -> int:
    """MQBench's reconstruction on the run's calibrated model, its per-unit losses on our streams, results.json."""
    rec = cfg.quantize.reconstruction
    setup_logging(os.path.join(output, LOG))
    write_text(os.path.join(output, CONFIG), dump_config(cfg))
    t0 = time.perf_counter()
    seed = cfg.process.seed
    images = calibration_images(train, cfg.quantize.cali_size, seed, cfg.data.batch_size, cfg.data.num_workers)
    score = lambda net, desc: None if val is None else evaluate_task(  # noqa: E731
        cfg.eval, net, eval_batches(val, cfg.data.batch_size, cfg.data.eval_limit, seed=cfg.data.split_seed), val,
        device, desc, progress, Dist())
    fp_acc = score(model.to(device), 'eval float')
    part = cfg.model.quantize_part
    target = model
    if part:  # the same part on the same inputs as ptq_main.py's run (mrecg.parts)
        target, images = part_and_inputs(model, part, images, cfg.data.batch_size, device)
    prepared = prepare(target.cpu(), cfg)
    qmodel = prepared.qmodel.to(device)
    calibrate(qmodel, images, cfg.data.batch_size, device)
    fp = copy.deepcopy(qmodel)
    disable_all(fp)
    t = time.perf_counter()
    quantized = mqbench_reconstruct(qmodel, images, rec, seed, device)
    recon_seconds = time.perf_counter() - t
    # the loss of every base unit of the MQBench result, on our streams (no optimisation)
    partition = UnitPartition.build(quantized, prepared.units, prepared.partition.head_ops)
    probe = Reconstructor.from_config(quantized, fp, partition, groups_from_spans([], len(partition.units)), cfg,
                                      device, settings=dataclasses.replace(rec, enabled=False), seed=seed)
    probe.run(images)
    enable_quantization(quantized)
    size, bits = model_figures(quantized, images[:1]), layer_bit_table(quantized)
    if part:
        quantized = put_part(model, part, quantized).to(device)
    q_acc = score(quantized, 'eval quantized')
    info = GroupingInfo('none', 0, None, None, source='MQBench block extractor')
    timing = Timings(reconstruction_seconds=recon_seconds, total_seconds=time.perf_counter() - t0)
    result = QuantizationResult(quantized, 'mqbench-' + ('brecq' if rec.prob >= 1.0 else 'qdrop'),
                                [u.name for u in prepared.units], probe.unit_losses, [], info, fp_acc, q_acc,
                                bits, timing, 0, prepared.bn_folded, str(device),
                                size=size, part=part)
    summary = results_record(cfg, result)
    write_json(os.path.join(output, RESULTS), summary)
    print(f'{summary["method"]} {cfg.model.type} W{summary["w_bits"]}A{summary["a_bits"]}: quantized '
          f'{headline(q_acc, cfg.eval.metric)}, {timing.total_seconds:.0f} s -> {output}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
