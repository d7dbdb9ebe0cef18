"""A model made ready for calibration: BN folded (if asked), MQBench's quantizers inserted, per-layer bits
applied, and the base units laid over the graph (the model's own ``unit_partition``, ``model.units``, or the
generic rule of ``units.join_forks``). The first layer of every run, the bit search and the ``--plan`` view
alike.
"""
import copy
from dataclasses import dataclass
from typing import List

import torch.fx as fx
import torch.nn as nn

from mrecg.config import Config
from mrecg.errors import UserError
from mrecg.quantization import fold_bn, prepare_model
from mrecg.units import (BaseUnit, UnitPartition, called_only, is_generic, join_forks, layer_base_units,
                         model_base_units, modules_with_own_ops)


@dataclass
class Prepared:
    """A model ready for calibration: the BN-folded float copy, its MQBench-prepared twin and the units."""
    folded: nn.Module
    qmodel: fx.GraphModule
    partition: UnitPartition
    bn_folded: int
    generic_units: bool

    @property
    def units(self) -> List[BaseUnit]:
        return self.partition.units


def prepare(model: nn.Module, cfg: Config) -> Prepared:
    """Fold (if asked), quantize-prepare and partition a copy of ``model``; the original is not touched."""
    folded = copy.deepcopy(model).eval()
    n_folded = fold_bn(folded) if cfg.quantize.fold_bn else 0
    qmodel = prepare_model(folded, cfg.quantize)
    generic = cfg.quantize.reconstruction.granularity == 'block' and is_generic(folded, cfg.model.units)
    try:
        if cfg.quantize.reconstruction.granularity == 'layer':
            units = layer_base_units(qmodel)
        else:
            units = model_base_units(folded, cfg.model.units, modules_with_own_ops(qmodel) if generic else None)
            if generic:
                units = join_forks(qmodel, called_only(qmodel, units))
        partition = UnitPartition.build(qmodel, units, cfg.quantize.reconstruction.head_ops)
    except ValueError as exc:
        raise UserError(f'model.units: {exc}') from None
    return Prepared(folded, qmodel, partition, n_folded, generic)
