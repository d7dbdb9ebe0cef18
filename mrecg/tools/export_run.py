"""Export a finished run folder to ONNX and check it in onnxruntime (what ``ptq_main.py --export onnx`` does
at the end of a run).

    mrecg export outputs/demo/digits_qdrop_2_4

Rebuilds the model from ``DIR/config.yaml``, loads ``DIR/quantized_model.pt``, writes ``DIR/model.onnx`` and
``DIR/model.float.onnx``, evaluates both engines on the config's evaluation data, adds ``export`` to
``DIR/results.json`` and fails (exit 2) unless the two engines agree on the top-1 class of at least 99 % of
the images and their top-1 accuracies differ by at most max(0.1 point, 2 images) (the config's ``export``
section sets these; the images that differ are listed in ``DIR/export_mismatches.json``).
"""
import argparse
import os
import sys

import torch

from mrecg.api import resolve_device
from mrecg.cli import export_line
from mrecg.config import load_config
from mrecg.errors import UserError
from mrecg.files import BadFile, read_json, read_torch
from mrecg.helptext import PlainHelp
from mrecg.locking import FolderLock
from mrecg.planning import prepare
from mrecg.quantization import enable_quantization, load_quantized_state, state_mismatch
from mrecg.runner import CONFIG, QMODEL, RESULTS, build_float_model, export_folder, open_data


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='mrecg export', description=__doc__,
                                formatter_class=PlainHelp)
    p.add_argument('folder', help='a finished ptq_main.py output folder')
    return p


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    try:
        for name in (CONFIG, QMODEL, RESULTS):
            if not os.path.isfile(os.path.join(args.folder, name)):
                raise UserError(f'{args.folder} has no {name}: export needs a finished ptq_main.py run')
        cfg = load_config(os.path.join(args.folder, CONFIG))
        if cfg.model.quantize_part:
            raise UserError('export of a network with a quantized part (model.quantize_part) is not built yet')
        model = build_float_model(cfg)
        train, val = open_data(cfg)
        prepared = prepare(model, cfg)
        path = os.path.join(args.folder, QMODEL)
        state = read_torch(path, 'the quantized model')
        problem = state_mismatch(state, prepared.qmodel.state_dict())
        if problem:
            raise BadFile(f'{path} does not fit the model of {CONFIG}: it is {problem}')
        load_quantized_state(prepared.qmodel, state)
        enable_quantization(prepared.qmodel)
        with FolderLock(args.folder):  # a run still writing the folder, or another export, is refused
            record = read_json(os.path.join(args.folder, RESULTS), 'the results')
            # the fake-quant reference runs where the run ran, or on the CPU of a machine without a GPU
            device = str(resolve_device(cfg.process.device)) if torch.cuda.is_available() else 'cpu'
            report = export_folder(args.folder, cfg, prepared.qmodel, train, val, record, device)
    except UserError as exc:
        print(f'error: {exc}', file=sys.stderr)
        return 2
    print(export_line(report.to_dict()))
    return 0


if __name__ == '__main__':
    sys.exit(main())
