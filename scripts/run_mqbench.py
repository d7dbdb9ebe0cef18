#!/usr/bin/env python
"""One run of MQBench's own ``ptq_reconstruction`` (BRECQ or QDrop) from one of our configs, written as a
``results.json`` like ptq_main.py's, so the sweep and the collector put it in the same table.

    python scripts/run_mqbench.py --config configs/fashion/mbv2_2_4.yaml --output outputs/x --set process.seed=2

Same float model, calibration images, calibrated quantizers (the calibration cache is shared with our
runs), bits, iterations and images per step as ptq_main.py with that config; MQBench picks its own blocks.
The per-unit loss curve is measured afterwards on our base units, so both curves are comparable.
"""
import argparse
import copy
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mrecg import pipeline  # noqa: E402
from mrecg.baselines import mqbench_reconstruct  # noqa: E402
from mrecg.config import build_settings, dump_config, load_config  # noqa: E402
from mrecg.data import calibration_images, eval_batches  # noqa: E402
from mrecg.errors import UserError  # noqa: E402
from mrecg.evaluation import evaluate  # noqa: E402
from mrecg.quantization import disable_all, enable_quantization, prepare_model  # noqa: E402
from mrecg.reconstruction import ReconSettings, Reconstructor  # noqa: E402
from mrecg.reporting import setup_logging, write_json, write_text  # noqa: E402
from mrecg.units import groups_from_spans  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--config', required=True)
    parser.add_argument('--output', required=True)
    parser.add_argument('--set', nargs='+', default=[], metavar='KEY=VALUE')
    parser.add_argument('--no-progress', action='store_true')
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, [*args.set, 'mrecg.metric=none', 'mrecg.k=0', 'mrecg.scheme=null'])
        settings = build_settings(cfg)
        if not settings.reconstruct or settings.granularity != 'block':
            raise UserError('run_mqbench.py runs MQBench block reconstruction (BRECQ/QDrop) only')
        device = pipeline.resolve_device(cfg.process.device)
        pipeline.preflight(settings)
        model = pipeline.build_float_model(settings)
        if os.path.isfile(os.path.join(args.output, pipeline.RESULTS)):
            raise UserError(f'{args.output} already holds a finished run')
        os.makedirs(args.output, exist_ok=True)
    except UserError as exc:
        print(f'error: {exc}', file=sys.stderr)
        return 2
    setup_logging(os.path.join(args.output, pipeline.LOG))
    write_text(os.path.join(args.output, pipeline.CONFIG), dump_config(cfg))
    t0 = time.perf_counter()
    progress = not args.no_progress
    images = calibration_images(settings.data, settings.cali_size, settings.seed)
    fp_acc = evaluate(model.to(device), eval_batches(settings.data, device), device, 'eval float', progress)
    folded, n_folded = pipeline.quantizable(model.cpu(), settings)
    qmodel = prepare_model(folded, settings.quant).to(device)
    pipeline.calibrate_or_reuse(settings, qmodel, images, device)
    fp = copy.deepcopy(qmodel)
    disable_all(fp)
    t = time.perf_counter()
    quantized = mqbench_reconstruct(qmodel, images, settings.recon, settings.seed, device)
    recon_seconds = time.perf_counter() - t
    # the loss of every base unit of the MQBench result, on our streams (no optimisation: 0 iterations)
    partition = pipeline.build_partition(settings, folded, quantized)
    probe = Reconstructor(quantized, fp, partition, groups_from_spans([], len(partition.units)),
                          ReconSettings(**{**settings.recon.__dict__, 'iterations': 0}), device, settings.seed,
                          progress=False)
    probe.run(images)
    enable_quantization(quantized)
    q_acc = evaluate(quantized, eval_batches(settings.data, device), device, 'eval quantized', progress)
    info = {'metric': 'none', 'k': 0, 'lam': None, 'max_group_size': None, 'groups': [], 'spans': [],
            'source': 'MQBench block extractor', 'metric_values': None, 'plain_unit_losses': None}
    names = [u.name for u in partition.units]
    timing = {'reconstruction_seconds': recon_seconds, 'total_seconds': time.perf_counter() - t0}
    summary = pipeline.build_results(settings, cfg, fp_acc, q_acc, [], names, probe.unit_losses, info, timing, 0,
                                     device, n_folded, [], resumed=False)
    summary['method'] = 'mqbench-' + ('brecq' if settings.recon.prob >= 1.0 else 'qdrop')
    write_json(os.path.join(args.output, pipeline.RESULTS), summary)
    print(f'{summary["method"]} {settings.model_type} W{summary["w_bits"]}A{summary["a_bits"]}: quantized top-1 '
          f'{summary["quant_top1"]}, {timing["total_seconds"]:.0f} s -> {args.output}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
