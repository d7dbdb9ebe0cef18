"""MQBench's own ``advanced_ptq.ptq_reconstruction`` (BRECQ/QDrop), run on exactly our model, calibration
data and settings: the outside reference for accuracy (benchmark table) and speed (mrecg bench).

Differences that remain are MQBench's own: its heuristic block extractor picks the units, every step uses
one fixed calibration batch (it splits the calibration set into batches of ``batch_size``), and it
re-runs the model over the calibration set for every unit's inputs and outputs.
"""
import contextlib
import io
from typing import Callable, Optional

import numpy as np
import torch
import torch.fx as fx
from easydict import EasyDict

from mrecg.config import ReconstructionConfig


def mqbench_reconstruct(qmodel: fx.GraphModule, images: torch.Tensor, settings: ReconstructionConfig, seed: int,
                        device: torch.device, on_unit_done: Optional[Callable[[], None]] = None) -> fx.GraphModule:
    """Reconstruct a calibrated prepared model with MQBench; returns MQBench's quantized model."""
    import mqbench.advanced_ptq as adv
    config = EasyDict(pattern='block', scale_lr=settings.scale_lr, warm_up=settings.warm_up, weight=settings.weight,
                      max_count=settings.iterations, b_range=list(settings.b_range), keep_gpu=True,
                      round_mode='learned_hard_sigmoid', prob=settings.prob)
    cali = [images[i:i + settings.batch_size].to(device) for i in range(0, len(images), settings.batch_size)]
    torch.manual_seed(seed)
    np.random.seed(seed % 2 ** 32)
    original = adv.subgraph_reconstruction

    def counted(*args, **kwargs):
        out = original(*args, **kwargs)
        if on_unit_done is not None:
            on_unit_done()
        return out
    adv.subgraph_reconstruction = counted
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # AdaRound init prints one line per layer
            return adv.ptq_reconstruction(qmodel, cali, config)
    finally:
        adv.subgraph_reconstruction = original
