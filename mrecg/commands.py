"""``mrecg <command>``: the whole toolkit from an installed package (``pip install mrecg-ptq``), no clone needed.

Each command is a module with ``parser()`` (its arguments, which the docs' CLI reference is generated from)
and ``main(argv) -> exit code``. ``python ptq_main.py`` and ``mrecg-ptq`` stay what they were: ``mrecg quantize``.
"""
import importlib
import sys
from typing import Dict, List, Optional, Tuple

# name -> (module, its parser and main functions, one line for the command list)
COMMANDS: Dict[str, Tuple[str, str, str, str]] = {
    'quantize': ('mrecg.cli', 'parser', 'main', 'quantize a model as a config says (= ptq_main.py, mrecg-ptq)'),
    'plan': ('mrecg.cli', 'plan_parser', 'plan_main', 'units, ModCap, groups and bits of a config, without data'),
    'export': ('mrecg.tools.export_run', 'parser', 'main', 'a finished run as ONNX, checked in onnxruntime'),
    'sweep': ('mrecg.tools.sweep', 'parser', 'main', 'configs x methods x seeds, each run in its own folder'),
    'collect': ('mrecg.tools.collect', 'parser', 'main', 'the paper-style table and loss curves of finished runs'),
    'study schemes': ('mrecg.tools.scheme_study', 'parser', 'main',
                      "random groupings and the paper's chain of evidence"),
    'study ablation': ('mrecg.tools.ablation_study', 'parser', 'main', 'batch-size and component ablations'),
    'bits': ('mrecg.tools.bits', 'parser', 'main', 'mixed precision against uniform bits: size vs top-1'),
    'bench': ('mrecg.tools.bench', 'parser', 'main', 'the reconstruction step against MQBench, time and top-1'),
    'baseline': ('mrecg.tools.mqbench_run', 'parser', 'main', "MQBench's own ptq_reconstruction on a config"),
    'models': ('mrecg.tools.trace_models', 'parser', 'main', 'which models trace, quantize and export'),
}


def command_parser(name: str):
    """The argument parser of ``mrecg <name>`` (the docs' CLI reference is written from these)."""
    module, make, _, _ = COMMANDS[name]
    return getattr(importlib.import_module(module), make)(*(['mrecg quantize'] if name == 'quantize' else []))


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ['usage: mrecg <command> [options]   (mrecg <command> --help for its options)', '', 'commands:']
    lines += [f'  {name:<{width}}  {summary}' for name, (_, _, _, summary) in COMMANDS.items()]
    return '\n'.join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ('-h', '--help'):
        print(usage())
        return 0 if argv else 2
    name = ' '.join(argv[:2]) if argv[0] == 'study' else argv[0]
    if name not in COMMANDS:
        print(f'error: unknown command {name!r} (see mrecg --help)', file=sys.stderr)
        return 2
    module, _, run, _ = COMMANDS[name]
    rest = argv[len(name.split()):]
    entry = getattr(importlib.import_module(module), run)
    return entry(rest, 'mrecg quantize') if name == 'quantize' else entry(rest)
