"""Fake quantization through MQBench: optional BN folding, ``prepare_by_platform`` (academic backend),
observer calibration, and the quantizer switches the rest of the toolkit uses.

MQBench's academic backend quantizes the input of every conv/linear (one activation fake-quant node
after the producing op, shared by all its users), keeps the first conv and last linear at 8-bit weights
and 8-bit inputs, and leaves BN in float. BRECQ and QDrop fold BN into the conv before quantizing; we do
that by default (``quantize.fold_bn``) and record the choice with every result.
"""
import logging
import fnmatch
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn as nn

from mqbench.utils.logger import set_log_level

set_log_level(logging.WARNING)  # MQBench logs every inserted node at INFO on stdout

from mqbench.fake_quantize.adaround_quantizer import AdaRoundFakeQuantize  # noqa: E402
from mqbench.fake_quantize.qdrop_quantizer import QDropFakeQuantize  # noqa: E402
from mqbench.prepare_by_platform import BackendType, prepare_by_platform  # noqa: E402
from mrecg.config import LayerBits, QuantizeConfig  # noqa: E402
from mrecg.errors import UserError  # noqa: E402
from mrecg.tracing import check_traceable, prepare_error  # noqa: E402
from mqbench.utils.state import (disable_all, enable_calibration_woquantization,  # noqa: E402,F401
                                 enable_quantization)

WEIGHT_LAYERS = (nn.Conv2d, nn.Linear)
ACT_QUANT_SUFFIX = '_post_act_fake_quantizer'
OBSERVERS = ('MinMaxObserver', 'EMAMinMaxObserver', 'MSEObserver', 'EMAMSEObserver', 'EMAQuantileObserver')


def fold_bn(model: nn.Module) -> int:
    """Fold every BatchNorm2d that directly follows a Conv2d into that conv (eval statistics), in place.

    The BN module is replaced by ``nn.Identity`` so module names, and with them checkpoint names and unit
    partitions, stay valid. Returns the number of folded pairs.
    """
    graph = check_traceable(model).graph
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


def prepare_model(model: nn.Module, settings: QuantizeConfig) -> fx.GraphModule:
    """Insert MQBench fake-quant nodes (academic backend), then apply ``settings.layer_bits``. ``model``
    must be BN-folded already if folding is wanted. Returns the prepared GraphModule with observers and
    quantizers off. A model MQBench cannot trace is a ``UserError`` naming the module that stopped it."""
    model.eval()
    try:
        prepared = prepare_by_platform(model, BackendType.Academic, settings.mqbench_prepare_dict())
    except Exception as exc:
        check_traceable(model)  # an untraceable model: the error names the module that stopped the trace
        raise prepare_error(exc) from None
    prepared.eval()
    disable_all(prepared)
    apply_layer_bits(prepared, settings.layer_bits, settings.w_qconfig.symmetric, settings.a_qconfig.symmetric)
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


def state_mismatch(state: Any, expected: Dict[str, torch.Tensor]) -> Optional[str]:
    """Why ``state`` cannot be a calibrated state of the model whose state is ``expected``, or None."""
    if not isinstance(state, dict):
        return f'not the state of this model (a {type(state).__name__})'
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        return (f'not the state of this model ({len(missing)} of its {len(expected)} tensors missing, '
                f'{len(extra)} others: ' + ', '.join(map(str, (missing or extra)[:2])) + ')')
    for name, value in state.items():
        own = expected[name]
        if not isinstance(value, torch.Tensor) or value.dtype != own.dtype:
            return f'not the state of this model ({name}: other type)'
        if value.shape != own.shape and not (own.numel() <= 1 and value.dim() <= 1):
            return f'not the state of this model ({name}: shape {tuple(value.shape)})'
        if name.endswith('scale') and not torch.isfinite(value).all():
            return f'damaged ({name} holds NaN/Inf)'
    return None


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



# ---- per-layer bit-widths --------------------------------------------------------------------------------
def set_bits(fake_quant: nn.Module, bit: int, symmetric: bool) -> None:
    """Give an MQBench fake quantizer (and its observer) a new bit-width, before calibration."""
    qmin, qmax = (-2 ** (bit - 1), 2 ** (bit - 1) - 1) if symmetric else (0, 2 ** bit - 1)
    for m in (fake_quant, fake_quant.activation_post_process):
        m.quant_min, m.quant_max = qmin, qmax
    fake_quant.bitwidth = bit


def weight_layer_names(prepared: fx.GraphModule) -> List[str]:
    return [name for name, m in prepared.named_modules() if is_adaround_layer(m)]


def input_quantizers(prepared: fx.GraphModule) -> Dict[str, List[str]]:
    """For every conv/linear, the activation quantizers that feed it (MQBench quantizes layer inputs)."""
    modules = dict(prepared.named_modules())
    feeds: Dict[str, List[str]] = {}
    for node in prepared.graph.nodes:
        if node.op == 'call_module' and is_adaround_layer(modules[node.target]):
            feeds[node.target] = [a.target for a in node.all_input_nodes
                                  if a.op == 'call_module' and a.target.endswith(ACT_QUANT_SUFFIX)]
    return feeds


def resolve_layer_bits(layer_names: Sequence[str], rules: Sequence[LayerBits]) -> Dict[str, Tuple]:
    """layer -> (w_bit or None, a_bit or None) from the rules, later rules winning; a pattern that matches no
    conv/linear is an error (a typo would otherwise change nothing)."""
    chosen: Dict[str, List] = {}
    for i, rule in enumerate(rules):
        for pattern in rule.modules:
            hits = [n for n in layer_names if fnmatch.fnmatchcase(n, pattern)]
            if not hits:
                raise UserError(f'quantize.layer_bits[{i}]: {pattern!r} matches no conv/linear layer '
                                f'(layers: {", ".join(layer_names[:6])}{", ..." if len(layer_names) > 6 else ""})')
            for name in hits:
                entry = chosen.setdefault(name, [None, None])
                entry[0] = rule.w_bit if rule.w_bit is not None else entry[0]
                entry[1] = rule.a_bit if rule.a_bit is not None else entry[1]
    return {k: tuple(v) for k, v in chosen.items()}


def apply_layer_bits(prepared: fx.GraphModule, rules: Sequence[LayerBits], w_symmetric: bool,
                     a_symmetric: bool) -> None:
    """Apply ``quantize.layer_bits``. An activation quantizer feeding several layers takes the highest
    ``a_bit`` asked for any of them (one tensor can have one bit-width)."""
    if not rules:
        return
    modules = dict(prepared.named_modules())
    feeds = input_quantizers(prepared)
    act_bits: Dict[str, int] = {}
    for name, (w_bit, a_bit) in resolve_layer_bits(weight_layer_names(prepared), rules).items():
        if w_bit is not None:
            set_bits(modules[name].weight_fake_quant, w_bit, w_symmetric)
        if a_bit is not None:
            for q in feeds.get(name, []):
                act_bits[q] = max(a_bit, act_bits.get(q, 0))
    for q, bit in act_bits.items():
        set_bits(modules[q], bit, a_symmetric)


def layer_bit_table(prepared: fx.GraphModule) -> Dict[str, Tuple[int, int]]:
    """Every conv/linear's (weight bits, input bits) as quantized: what ModCap counts and results report."""
    modules = dict(prepared.named_modules())
    table = {}
    for name, quants in input_quantizers(prepared).items():
        a_bits = [quantizer_bits(modules[q]) for q in quants]
        table[name] = (quantizer_bits(modules[name].weight_fake_quant), max(a_bits) if a_bits else None)
    return table
