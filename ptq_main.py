#!/usr/bin/env python
"""Post-training quantization with BRECQ / QDrop block reconstruction and MRECG grouping.

    python ptq_main.py --config configs/qdrop/mbv2_2_4.yaml
    python ptq_main.py --config configs/demo/digits_qdrop_2_4.yaml --set mrecg.k=3 --output outputs/k3
    python ptq_main.py --config configs/qdrop/res18_2_4.yaml --plan      # units, ModCap, groups; no data
    python ptq_main.py --resume outputs/qdrop/mbv2_2_4                   # continue an interrupted run

Exit codes: 0 done, 2 bad input (one line on stderr), 130 interrupted (resumable), 1 internal error.
"""
import argparse
import os
import sys

PROJECT_ROOT = os.path.dirname(os.path.abspath(__file__))
if PROJECT_ROOT not in sys.path:
    sys.path.insert(0, PROJECT_ROOT)


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f'error: {message} (see --help)\n')


def parse_args(argv=None):
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--config', help='YAML config (may extend others with _base_)')
    p.add_argument('--output', help='output folder (default: outputs/<config path under configs/>)')
    p.add_argument('--set', nargs='+', default=[], metavar='KEY=VALUE', help='override config keys, e.g. mrecg.k=3')
    p.add_argument('--device', choices=['auto', 'cpu', 'cuda'], help='default: process.device (auto = CUDA if present)')
    p.add_argument('--plan', action='store_true', help='print base units, ModCap and the chosen groups, then exit')
    p.add_argument('--resume', metavar='DIR', help='continue the interrupted run in DIR (uses DIR/config.yaml)')
    p.add_argument('--overwrite', action='store_true', help='replace a finished or unfinished run in the output folder')
    p.add_argument('--no-progress', action='store_true', help='no progress bars')
    args = p.parse_args(argv)
    if bool(args.config) == bool(args.resume):
        p.error('give either --config or --resume DIR')
    if args.resume and (args.set or args.output or args.plan):
        p.error('--resume takes the config saved in DIR; --set, --output and --plan do not apply')
    return args


def default_output(config_path: str) -> str:
    rel = os.path.relpath(os.path.abspath(config_path), os.path.join(PROJECT_ROOT, 'configs'))
    if rel.startswith('..'):
        rel = os.path.basename(config_path)
    return os.path.join('outputs', os.path.splitext(rel)[0])


def main(argv=None) -> int:
    args = parse_args(argv)
    from mrecg.errors import UserError
    output = args.resume or args.output
    try:
        from mrecg import pipeline
        from mrecg.config import build_settings, load_config
        from mrecg.reporting import setup_logging
        if args.resume and not os.path.isfile(os.path.join(args.resume, pipeline.CONFIG)):
            raise UserError(f'cannot resume {args.resume}: it has no {pipeline.CONFIG} (not a ptq_main.py output folder)')
        cfg = load_config(os.path.join(args.resume, pipeline.CONFIG) if args.resume else args.config, args.set)
        settings = build_settings(cfg)
        if args.plan:
            print(pipeline.plan(settings))
            return 0
        device = pipeline.resolve_device(args.device or cfg.process.device)
        output = output or default_output(args.config)
        pipeline.preflight(settings)
        model = pipeline.build_float_model(settings)
        pipeline.validate_units(settings, model)
        pipeline.prepare_output_dir(output, bool(args.resume), args.overwrite)
        os.makedirs(output, exist_ok=True)
        setup_logging(os.path.join(output, pipeline.LOG))
        summary = pipeline.run(settings, cfg, model, output, device, resume=bool(args.resume),
                               progress=not args.no_progress)
    except UserError as exc:
        print(f'error: {exc}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = f'; continue with: python ptq_main.py --resume {output}' if output and os.path.isfile(
            os.path.join(output, 'config.yaml')) else ''
        print(f'\ninterrupted: finished units are saved{hint}', file=sys.stderr)
        return 130
    top1 = summary['quant_top1']
    print(f'{summary["method"]} {summary["model"]} W{summary["w_bits"]}A{summary["a_bits"]}: '
          f'float top-1 {summary["fp_top1"]:.2f}, quantized top-1 '
          f'{"n/a" if top1 is None else f"{top1:.2f}"}, max unit loss {summary["loss_curve"]["max_unit_loss"]:.4g}, '
          f'{summary["timing"]["total_seconds"]:.0f} s -> {output}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
