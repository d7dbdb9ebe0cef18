"""The ``reference`` kernels: MQBench's arithmetic in plain torch autograd, the oracle the fast kernels are tested
against (and a path that runs on any device torch has).

The activation quantizer is ``_fake_quantize_learnable_per_tensor_affine_training`` of MQBench's QDrop quantizer
(``round_ste(x / s) + zp``, ``clamp``, ``(x - zp) * s``), QDrop's mask ``rand < prob`` and ``where``; the weight
is MQBench's own AdaRound layer, and the rounding regulariser is a loss term as in MQBench's ``LossFunction``.
Only the random draws differ from MQBench's: from the group's generator, not the global one.
"""
import torch
import torch.nn as nn


def round_ste(x: torch.Tensor) -> torch.Tensor:
    return (x.round() - x).detach() + x


def rand_keep(like: torch.Tensor, prob: float, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(like.shape, generator=generator, device=like.device) < prob


class ReferenceActQuant(nn.Module):
    """MQBench's QDropFakeQuantize forward; ``inclusive`` passes the gradient at the clamp bounds too."""

    def __init__(self, quantizer: nn.Module, generator: torch.Generator, ste_bounds: str = 'strict'):
        super().__init__()
        self.q, self.generator, self.inclusive = quantizer, generator, ste_bounds == 'inclusive'

    def forward(self, x):
        q = self.q
        if q.fake_quant_enabled[0] != 1:
            return x
        x = x.float()
        level = round_ste(x / q.scale) + q.zero_point.float()
        if self.inclusive:  # the value clamped, the gradient kept for qmin <= level <= qmax
            inside = (level >= q.quant_min) & (level <= q.quant_max)
            clamped = torch.where(inside, level, level.detach().clamp(q.quant_min, q.quant_max))
        else:
            clamped = torch.clamp(level, q.quant_min, q.quant_max)
        xq = (clamped - q.zero_point.float()) * q.scale
        if q.prob < 1.0:
            return torch.where(rand_keep(xq, q.prob, self.generator), xq, x)
        return xq


class ReferenceAdaRoundLayer(nn.Module):
    """MQBench's AdaRound conv/linear as it is; ``penalty`` is the rounding regulariser of the step."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer, self.weight, self.beta = layer, 0.0, 2.0

    def regularise(self, step: int, weight: float, beta: float) -> None:
        self.weight, self.beta = weight, beta

    def penalty(self) -> torch.Tensor:
        h = self.layer.weight_fake_quant.rectified_sigmoid()
        return self.weight * (1 - ((h - .5).abs() * 2).pow(self.beta)).sum()

    def forward(self, x):
        return self.layer(x)


def reference_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MQBench's ``lp_loss`` with p = 2."""
    return (pred.float() - target).abs().pow(2).sum(1).mean()
