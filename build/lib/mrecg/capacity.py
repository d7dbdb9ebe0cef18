"""Module capacity (ModCap), the data-free metric MRECG groups units by.

    ModCap(unit) = sum over the unit's conv/linear layers j of  params_j * bits_j * alpha_j
    alpha_j      = stride_penalty  if layer j has a stride > 1, else 1

``params_j`` counts the layer's weights (not its bias), ``bits_j`` is its weight bit-width as quantized
(so the 8-bit first and last layers count as 8). The paper defines ModCap as a parameter count times
bit-width with a penalty for down-sampling layers but our sources do not give its constants;
``stride_penalty`` (default 0.5, ``mrecg.stride_penalty``) is ours. Residual connections and convolution
groups are not modelled, as in the paper.
"""
from typing import List

import torch.nn as nn

from mrecg.quantization import WEIGHT_LAYERS, quantizer_bits
from mrecg.units import UnitPartition


def layer_capacity(layer: nn.Module, bits: int, stride_penalty: float) -> float:
    stride = max(getattr(layer, 'stride', (1,)))
    return float(layer.weight.numel() * bits * (stride_penalty if stride > 1 else 1.0))


def modcap(partition: UnitPartition, stride_penalty: float = 0.5) -> List[float]:
    """ModCap of every base unit, from the prepared model's weight layers and their quantizers."""
    modules = dict(partition.graph_module.named_modules())
    caps = [0.0] * len(partition.units)
    for node, unit in partition.owner.items():
        if node.op != 'call_module':
            continue
        layer = modules[node.target]
        if isinstance(layer, WEIGHT_LAYERS) and hasattr(layer, 'weight_fake_quant'):
            caps[unit] += layer_capacity(layer, quantizer_bits(layer.weight_fake_quant), stride_penalty)
    return caps
