"""Fake quantization through MQBench: optional BN folding, ``prepare_by_platform`` (academic backend),
observer calibration, and the quantizer switches the rest of the toolkit uses.

MQBench's academic backend quantizes the input of every conv/linear (one activation fake-quant node
after the producing op, shared by all its users), keeps the first conv and last linear at 8-bit weights
and 8-bit inputs, and leaves BN in float. BRECQ and QDrop fold BN into the conv before quantizing; we do
that by default (``quantize.fold_bn``) and record the choice with every result.
"""
import logging
from dataclasses import dataclass
from typing import Dict

import torch
import torch.fx as fx
import torch.nn as nn

from mqbench.utils.logger import set_log_level

set_log_level(logging.WARNING)  # MQBench logs every inserted node at INFO on stdout

from mqbench.fake_quantize.adaround_quantizer import AdaRoundFakeQuantize  # noqa: E402
from mqbench.fake_quantize.qdrop_quantizer import QDropFakeQuantize  # noqa: E402
from mqbench.prepare_by_platform import BackendType, prepare_by_platform  # noqa: E402
from mqbench.utils.state import (disable_all, enable_calibration_woquantization,  # noqa: E402,F401
                                 enable_quantization)

WEIGHT_LAYERS = (nn.Conv2d, nn.Linear)
ACT_QUANT_SUFFIX = '_post_act_fake_quantizer'
OBSERVERS = ('MinMaxObserver', 'EMAMinMaxObserver', 'MSEObserver', 'EMAMSEObserver', 'EMAQuantileObserver')
WEIGHT_QUANTIZERS = ('AdaRoundFakeQuantize',)
ACT_QUANTIZERS = ('QDropFakeQuantize',)


@dataclass(frozen=True)
class QuantizerSpec:
    """One quantizer family (weights or activations). Validates itself; errors name the field."""
    bit: int
    quantizer: str
    observer: str
    symmetric: bool = False
    per_channel: bool = False
    pot_scale: bool = False
    p: float = 2.0  # the Lp norm of the MSE observers' clipping search (the authors use 2.4)

    def __post_init__(self):
        if not 2 <= self.bit <= 8:
            raise ValueError(f'bit must be in 2..8, got {self.bit}')
        if self.observer not in OBSERVERS:
            raise ValueError(f'observer must be one of {", ".join(OBSERVERS)}, got {self.observer!r}')
        if self.p <= 0:
            raise ValueError(f'p must be > 0, got {self.p}')

    def qscheme(self) -> Dict:
        scheme = dict(bit=self.bit, symmetry=self.symmetric, per_channel=self.per_channel, pot_scale=self.pot_scale)
        if self.observer in ('MSEObserver', 'EMAMSEObserver'):
            scheme['p'] = self.p
        return scheme


@dataclass(frozen=True)
class QuantSettings:
    weight: QuantizerSpec
    act: QuantizerSpec
    fold_bn: bool = True

    def __post_init__(self):
        if self.weight.quantizer not in WEIGHT_QUANTIZERS:
            raise ValueError(f'w_qconfig.quantizer must be one of {WEIGHT_QUANTIZERS}, got {self.weight.quantizer!r}')
        if self.act.quantizer not in ACT_QUANTIZERS:
            raise ValueError(f'a_qconfig.quantizer must be one of {ACT_QUANTIZERS}, got {self.act.quantizer!r}')

    def mqbench_prepare_dict(self) -> Dict:
        return {'extra_qconfig_dict': {
            'w_observer': self.weight.observer, 'a_observer': self.act.observer,
            'w_fakequantize': self.weight.quantizer, 'a_fakequantize': self.act.quantizer,
            'w_qscheme': self.weight.qscheme(), 'a_qscheme': self.act.qscheme()}}


def fold_bn(model: nn.Module) -> int:
    """Fold every BatchNorm2d that directly follows a Conv2d into that conv (eval statistics), in place.

    The BN module is replaced by ``nn.Identity`` so module names, and with them checkpoint names and unit
    partitions, stay valid. Returns the number of folded pairs.
    """
    graph = fx.symbolic_trace(model).graph
    modules = dict(model.named_modules())
    calls = {}
    for node in graph.nodes:
        if node.op == 'call_module':
            calls[node.target] = calls.get(node.target, 0) + 1
    folded = 0
    for node in graph.nodes:
        if node.op != 'call_module' or not isinstance(modules[node.target], nn.BatchNorm2d):
            continue
        src = node.args[0]
        if not (isinstance(src, fx.Node) and src.op == 'call_module' and isinstance(modules[src.target], nn.Conv2d)
                and len(src.users) == 1 and calls[src.target] == 1 and calls[node.target] == 1):
            continue
        conv, bn = modules[src.target], modules[node.target]
        with torch.no_grad():
            std = torch.sqrt(bn.running_var + bn.eps)
            gamma = bn.weight if bn.affine else torch.ones_like(std)
            beta = bn.bias if bn.affine else torch.zeros_like(std)
            factor = gamma / std
            bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            conv.weight.mul_(factor.reshape(-1, 1, 1, 1))
            conv.bias = nn.Parameter((bias - bn.running_mean) * factor + beta)
        parent_name, _, child = node.target.rpartition('.')
        setattr(modules[parent_name] if parent_name else model, child, nn.Identity())
        folded += 1
    return folded


def prepare_model(model: nn.Module, settings: QuantSettings) -> fx.GraphModule:
    """Insert MQBench fake-quant nodes (academic backend). ``model`` must be in eval mode and BN-folded
    already if folding is wanted. Returns the prepared GraphModule with observers and quantizers off."""
    model.eval()
    prepared = prepare_by_platform(model, BackendType.Academic, settings.mqbench_prepare_dict())
    prepared.eval()
    disable_all(prepared)
    return prepared


@torch.no_grad()
def calibrate(prepared: fx.GraphModule, images: torch.Tensor, batch_size: int, device: torch.device) -> None:
    """Set every quantizer's range as the authors do: activations from all calibration images (float
    activations, EMA over batches), then weights from one batch. Leaves quantization on, observers off."""
    enable_calibration_woquantization(prepared, quantizer_type='act_fake_quant')
    for start in range(0, len(images), batch_size):
        prepared(images[start:start + batch_size].to(device))
    enable_calibration_woquantization(prepared, quantizer_type='weight_fake_quant')
    prepared(images[:batch_size].to(device))
    enable_quantization(prepared)


def load_quantized_state(module: nn.Module, state: Dict[str, torch.Tensor]) -> None:
    """``load_state_dict`` that first gives every buffer the saved shape: per-channel observers and
    quantizers start as scalars and only take their per-channel shape during calibration."""
    own = module.state_dict(keep_vars=True)
    with torch.no_grad():
        for key, value in state.items():
            if key in own and own[key].shape != value.shape:
                own[key].data = torch.empty(value.shape, dtype=own[key].dtype, device=own[key].device)
    module.load_state_dict(state, strict=True)



def quantizer_bits(fake_quant: nn.Module) -> int:
    return int(round(torch.log2(torch.tensor(float(fake_quant.quant_max - fake_quant.quant_min + 1))).item()))


def init_adaround(layer: nn.Module) -> None:
    """Start learned rounding for one layer: alpha such that the soft rounding equals the float rest.

    Same initialisation as MQBench's ``AdaRoundFakeQuantize.init`` (which also prints to stdout)."""
    fq = layer.weight_fake_quant
    fq.adaround = True
    fq.round_mode = 'learned_hard_sigmoid'
    fq.gamma, fq.zeta = -0.1, 1.1
    fq.disable_observer()
    fq.enable_fake_quant()
    w = layer.weight.data
    scale = fq.scale.data.reshape([-1] + [1] * (w.dim() - 1)) if fq.ch_axis != -1 else fq.scale.data
    rest = w / scale - torch.floor(w / scale)
    fq.alpha = nn.Parameter(-torch.log((fq.zeta - fq.gamma) / (rest - fq.gamma) - 1))


def harden_adaround(layer: nn.Module) -> None:
    """Write the hard rounding decision into the weight (as MQBench does), switch learned rounding off and
    drop the rounding variables (nothing reads them afterwards; memory stays flat from unit to unit)."""
    fq = layer.weight_fake_quant
    with torch.no_grad():
        layer.weight.data = fq.get_hard_value(layer.weight.data)
    fq.adaround = False
    fq.hardened = True
    del fq.alpha


def is_act_quantizer(module: nn.Module) -> bool:
    return isinstance(module, QDropFakeQuantize)


def is_adaround_layer(module: nn.Module) -> bool:
    return isinstance(module, WEIGHT_LAYERS) and isinstance(getattr(module, 'weight_fake_quant', None),
                                                          AdaRoundFakeQuantize)

