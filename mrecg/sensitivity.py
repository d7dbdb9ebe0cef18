"""How much each layer, and each activation quantizer, suffers at each bit-width: the scores the bit search
minimises (summed over layers, the usual additive model of HAWQ and AutoQuantize).

Everything is measured on the prepared model with every quantizer off (the float network), changing one
layer at a time. A layer at b bits is its weight rounded to nearest on the grid its own weight observer picks
at b bits (what calibration would pick), so the scores see the real ranges, not a uniform step.

- ``output`` (data): the squared change of the logits, mean over the sample images, with that one layer (or
  activation quantizer) quantized;
- ``fisher`` (data): sum of F * dW^2, F the diagonal empirical Fisher of the cross-entropy to the float
  model's own top-1 (no labels needed), one image per gradient;
- ``weight`` (data-free): sum of dW^2, the weight error alone;
- ``random`` (a control): a random importance per layer times 4^-b (the error's usual fall with bits), so the
  allocation it gives fills the budget like the others, at random.
"""
import copy
from typing import Dict, List, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from mrecg.quantization import set_bits

Scores = Dict[str, Dict[int, float]]  # layer or quantizer name -> bits -> sensitivity


def quantized_weight(layer: nn.Module, bits: int, symmetric: bool) -> torch.Tensor:
    """The layer's weight rounded to nearest at ``bits``, on the grid its weight observer chooses at that width."""
    fq = copy.deepcopy(layer.weight_fake_quant)
    set_bits(fq, bits, symmetric)
    fq.enable_observer()
    fq.enable_fake_quant()
    with torch.no_grad():
        return fq(layer.weight.detach())


@torch.no_grad()
def _logits(model: nn.Module, images: torch.Tensor, device: torch.device, batch: int) -> torch.Tensor:
    return torch.cat([model(images[i:i + batch].to(device)).float() for i in range(0, len(images), batch)])


def weight_scores(model: fx.GraphModule, layers: Sequence[str], bits: Sequence[int], symmetric: bool) -> Scores:
    modules = dict(model.named_modules())
    error = lambda name, b: quantized_weight(modules[name], b, symmetric) - modules[name].weight.detach()  # noqa: E731
    return {name: {b: float(error(name, b).pow(2).sum()) for b in bits} for name in layers}


def output_scores(model: fx.GraphModule, layers: Sequence[str], bits: Sequence[int], symmetric: bool,
                  images: torch.Tensor, device: torch.device, batch: int = 256) -> Scores:
    """``model``: prepared, every quantizer off. One layer's weight replaced at a time, then restored."""
    modules = dict(model.named_modules())
    reference = _logits(model, images, device, batch)
    scores: Scores = {}
    for name in layers:
        layer = modules[name]
        original = layer.weight.detach().clone()
        scores[name] = {}
        for b in bits:
            with torch.no_grad():
                layer.weight.copy_(quantized_weight(layer, b, symmetric))
            scores[name][b] = float((_logits(model, images, device, batch) - reference).pow(2).sum(1).mean())
            with torch.no_grad():
                layer.weight.copy_(original)
    return scores


def fisher_scores(model: fx.GraphModule, layers: Sequence[str], bits: Sequence[int], symmetric: bool,
                  images: torch.Tensor, device: torch.device) -> Scores:
    """Diagonal empirical Fisher of each weight (one image per gradient, the float top-1 as label) times its
    squared rounding error at each bit-width."""
    modules = dict(model.named_modules())
    weights = [modules[name].weight for name in layers]
    was = [w.requires_grad for w in weights]
    for w in weights:
        w.requires_grad_(True)
    fisher = [torch.zeros_like(w) for w in weights]
    try:
        for image in images:
            x = image.unsqueeze(0).to(device)
            logits = model(x).float()
            loss = F.cross_entropy(logits, logits.argmax(1).detach())
            for f, g in zip(fisher, torch.autograd.grad(loss, weights)):
                f.add_(g.detach().pow(2))
    finally:
        for w, flag in zip(weights, was):
            w.requires_grad_(flag)
    return {name: {b: float((f * (quantized_weight(modules[name], b, symmetric) - w.detach()).pow(2)).sum())
                   for b in bits} for name, f, w in zip(layers, fisher, weights)}


def random_scores(names: Sequence[str], bits: Sequence[int], seed: int) -> Scores:
    gen = torch.Generator().manual_seed(seed)
    importance = torch.rand(len(names), generator=gen).tolist()
    return {name: {b: r * 4.0 ** -b for b in bits} for name, r in zip(names, importance)}


def activation_output_scores(model: fx.GraphModule, quantizers: Sequence[str], bits: Sequence[int],
                             symmetric: bool, images: torch.Tensor, device: torch.device,
                             batch: int = 256) -> Scores:
    """Per activation quantizer and bit-width: the logits' squared change with that quantizer alone on, its
    range calibrated on the images at that width (weights float). Works on a copy."""
    model = copy.deepcopy(model)
    modules = dict(model.named_modules())
    reference = _logits(model, images, device, batch)
    scores: Scores = {q: {} for q in quantizers}
    for b in bits:
        for q in quantizers:
            set_bits(modules[q], b, symmetric)
            observer = modules[q].activation_post_process  # a fresh range for this width (EMA starts over)
            observer.min_val, observer.max_val = (torch.tensor(v, device=observer.min_val.device)
                                                  for v in (float('inf'), float('-inf')))
            modules[q].enable_observer()
            modules[q].disable_fake_quant()
        _logits(model, images, device, batch)  # the observers see the float activations
        for q in quantizers:
            modules[q].disable_observer()
        for q in quantizers:
            modules[q].enable_fake_quant()
            scores[q][b] = float((_logits(model, images, device, batch) - reference).pow(2).sum(1).mean())
            modules[q].disable_fake_quant()
    return scores


def layer_scores(measure: str, model: fx.GraphModule, layers: List[str], bits: Sequence[int], symmetric: bool,
                 images, device: torch.device, seed: int, batch: int = 256) -> Scores:
    """The weight scores of ``measure`` (``images`` may be None for the data-free ones)."""
    if measure == 'weight':
        return weight_scores(model, layers, bits, symmetric)
    if measure == 'random':
        return random_scores(layers, bits, seed)
    if measure == 'fisher':
        return fisher_scores(model, layers, bits, symmetric, images, device)
    return output_scores(model, layers, bits, symmetric, images, device, batch)
