"""Post-training quantization with BRECQ / QDrop block reconstruction and MRECG grouping.

    ptq_main.py --config configs/qdrop/mbv2_2_4.yaml
    ptq_main.py --config configs/demo/digits_qdrop_2_4.yaml --set mrecg.k=3 --output outputs/k3
    ptq_main.py --config configs/qdrop/res18_2_4.yaml --plan      # units, ModCap, groups; no data
    ptq_main.py --resume outputs/qdrop/mbv2_2_4                   # continue an interrupted run
    torchrun --nproc_per_node=2 ptq_main.py --config ...          # one run, data-parallel (mrecg.distributed)

(``mrecg quantize`` and ``mrecg-ptq`` are the same command once the package is installed.)
Exit codes: 0 done, 2 bad input (one line on stderr), 130 interrupted (resumable), 1 internal error or a
lost process of a data-parallel run (resumable).
"""
import argparse
import contextlib
import logging
import os
import shlex
import signal
import sys

from mrecg.config import PROJECT_ROOT
from mrecg.helptext import PlainHelp


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f'error: {message} (see --help)\n')


def parser(prog: str = 'ptq_main.py') -> argparse.ArgumentParser:
    p = OneLineParser(prog=prog, description=__doc__, formatter_class=PlainHelp)
    p.add_argument('--config', help='YAML config (may extend others with _base_)')
    p.add_argument('--output', help='output folder (default: outputs/<config path under configs/>)')
    p.add_argument('--set', nargs='+', action='extend', default=[], metavar='KEY=VALUE',
                   help='override config keys, e.g. mrecg.k=3 (repeatable; values are YAML 1.2)')
    p.add_argument('--device', choices=['auto', 'cpu', 'cuda'], help='default: process.device (auto = CUDA if present)')
    p.add_argument('--plan', action='store_true', help='print base units, ModCap and the chosen groups, then exit')
    p.add_argument('--resume', metavar='DIR', help='continue the interrupted run in DIR (uses DIR/config.yaml)')
    p.add_argument('--overwrite', action='store_true',
                   help='replace the run in the output folder (a finished one is kept in DIR/previous_run until '
                        'the new run has its results)')
    p.add_argument('--no-progress', action='store_true', help='no progress bars')
    p.add_argument('--export', choices=['onnx'], help='also write DIR/model.onnx (low-bit QDQ) and check it in '
                                                      'onnxruntime (mrecg export DIR for a finished run)')
    return p


def parse_args(argv=None, prog: str = 'ptq_main.py'):
    p = parser(prog)
    args = p.parse_args(argv)
    if bool(args.config) == bool(args.resume):
        p.error('give either --config or --resume DIR')
    if args.resume and (args.set or args.output or args.plan):
        p.error('--resume takes the config saved in DIR; --set, --output and --plan do not apply')
    return args


def plan_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog='mrecg plan', description='What a run of the config would do, without data or '
                      'checkpoint: the base units with their ModCap, the chosen groups and the layers at other '
                      'bit-widths (= ptq_main.py --config CONFIG --plan).', formatter_class=PlainHelp)
    p.add_argument('--config', required=True, help='YAML config (may extend others with _base_)')
    p.add_argument('--set', nargs='+', action='extend', default=[], metavar='KEY=VALUE',
                   help='override config keys, e.g. mrecg.k=3 (repeatable; values are YAML 1.2)')
    return p


def plan_main(argv=None) -> int:
    """``mrecg plan``: the plan of a config, one line on error (exit 2)."""
    args = plan_parser().parse_args(argv)
    return main(['--config', args.config, '--plan', *(['--set', *args.set] if args.set else [])])


def default_output(config_path: str) -> str:
    rel = os.path.relpath(os.path.abspath(config_path), os.path.join(PROJECT_ROOT, 'configs'))
    if rel.startswith('..'):
        rel = os.path.basename(config_path)
    return os.path.join('outputs', os.path.splitext(rel)[0])


def print_plan(cfg) -> None:
    from mrecg.config import resolve_path
    from mrecg.planning import plan
    from mrecg.runner import build_float_model, cached_plan_losses, plan_images
    path = resolve_path(cfg.model.path)
    model = build_float_model(cfg, load=bool(path) and os.path.isfile(path))
    print(plan(model, cfg, lambda names: cached_plan_losses(cfg, model, names), plan_images(cfg)))


def read_config(args):
    """The run's config (``--config`` with ``--set``, or the one saved in the ``--resume`` folder): read before
    torch is imported, so a bad file is refused in a fraction of a second."""
    from mrecg.config import load_config
    from mrecg.errors import UserError
    if args.resume and not os.path.isfile(os.path.join(args.resume, 'config.yaml')):
        raise UserError(f'cannot resume {args.resume}: it has no config.yaml (not a ptq_main.py output folder)')
    return load_config(os.path.join(args.resume, 'config.yaml') if args.resume else args.config, args.set)


def main(argv=None, prog: str = 'ptq_main.py') -> int:
    args = parse_args(argv, prog)
    from mrecg.errors import UserError
    try:
        cfg = read_config(args)
    except UserError as exc:
        print(f'error: {exc}', file=sys.stderr)
        return 2
    from mrecg.distributed import Dist, PeerLost, shutdown
    from mrecg.errors import NotResumable
    from mrecg.locking import FolderBusy
    output, d = args.resume or args.output, Dist()
    with contextlib.ExitStack() as held:
        try:
            from mrecg import runner
            from mrecg.api import resolve_device
            from mrecg.locking import FolderLock
            from mrecg.reporting import close_log_file, setup_logging
            if args.plan:
                print_plan(cfg)
                return 0
            device = str(resolve_device(args.device or cfg.process.device))
            output = output or default_output(args.config)
            model, train, val = runner.check_run(cfg, export=args.export == 'onnx')
            d = join_process_group(device, cfg.process.dist_timeout_s)
            lock = held.enter_context(FolderLock(output)) if d.main else None
            runner.prepare_output_dir(output, bool(args.resume), args.overwrite, write=d.main)
            d.barrier()
            setup_logging(os.path.join(output, runner.LOG) if d.main else None, quiet=not d.main)
            held.callback(close_log_file)
            if lock is not None and lock.taken_over:
                logging.getLogger('mrecg').warning('took over the lock of a run that is gone (%s)', lock.taken_over)
            record = runner.run(cfg, model, train, val, output, device, resume=bool(args.resume),
                                progress=not args.no_progress, export=args.export == 'onnx')
        except UserError as exc:  # another run's folder, or a resume refused: no hint to resume
            hint = '' if isinstance(exc, (FolderBusy, NotResumable)) else resume_hint(output, args.export)
            print(f'error: {exc}{hint}', file=sys.stderr)
            return 2
        except PeerLost as exc:
            print(f'error: {exc}; finished units are saved{resume_hint(output)}', file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print(f'\ninterrupted: finished work is saved{resume_hint(output, args.export)}', file=sys.stderr)
            return 130
        finally:
            shutdown()
    if d.main:
        print(summary_line(record, output))
        if 'export' in record:
            print(export_line(record['export']))
    return 0


def join_process_group(device: str, timeout_s: float):
    """A data-parallel run under torchrun (or any launcher): join the group; the launcher's SIGTERM (sent when
    another process failed) ends this one as an interruption, with the resume command."""
    import torch
    from mrecg.distributed import init_from_env
    d = init_from_env(torch.device(device), timeout_s)
    if d.enabled:
        signal.signal(signal.SIGTERM, _interrupt)
    return d


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def resume_hint(output, export: bool = False) -> str:
    """Where finished work waits (an interrupted or failed run), the command that continues it (with the
    same number of processes as the launcher started), and where an --overwrite kept the previous results."""
    from mrecg.runner import previous_results
    hint = ''
    if output and os.path.isfile(os.path.join(output, 'checkpoint.pt')):
        world = os.environ.get('WORLD_SIZE', '1')
        launcher = f'torchrun --nproc_per_node={world}' if world not in ('', '1') else 'python'
        hint = f'; continue with: {launcher} ptq_main.py --resume {shlex.quote(output)}'
    elif export and output and os.path.isfile(os.path.join(output, 'results.json')):
        hint = f'; the run\'s results are written: export them with: mrecg export {shlex.quote(output)}'
    previous = previous_results(output)
    return hint + (f'; the previous run\'s results are kept in {previous}' if previous else '')


def export_line(e) -> str:
    top1 = '' if e['onnxruntime_top1'] is None else (
        f', onnxruntime top-1 {e["onnxruntime_top1"]:.2f} (fake-quant {e["fake_quant_top1"]:.2f}, '
        f'{e["agreement"]:.2f} % agree, max logit diff {e["max_logit_diff"]:.3g})')
    return (f'onnx: {e["path"]} {e["file_bytes"] / 1e3:.0f} kB (float {e["float_file_bytes"] / 1e3:.0f} kB){top1}, '
            f'batch-1 latency {e["latency_ms"]["quantized"]:.2f} ms (float {e["latency_ms"]["float"]:.2f} ms)')


def summary_line(r, output: str) -> str:
    """The run's last line; a missing number (no evaluation data, a non-finite loss) reads n/a."""
    def num(x, spec='.2f'):
        return 'n/a' if x is None else format(x, spec)
    w = f'{r["bit_search"]["avg_w_bits"]:.2f}(mixed)' if r.get('bit_search') else r['w_bits']
    metric = r.get('metric', 'top1')
    name = 'top-1' if metric == 'top1' else metric
    part = f' ({r["quantize_part"]})' if r.get('quantize_part') else ''
    return (f'{r["method"]} {r["model"]}{part} W{w}A{r["a_bits"]}: float {name} {num(r.get("fp_score", r["fp_top1"]))}, '
            f'quantized {name} {num(r.get("quant_score", r["quant_top1"]))}, max unit loss {num(r["loss_curve"]["max_unit_loss"], ".4g")}, '
            f'{r["timing"]["total_seconds"]:.0f} s -> {output}')


if __name__ == '__main__':
    sys.exit(main())
