"""Fast stand-ins for MQBench's AdaRound and QDrop fake quantizers inside the reconstruction step.

They compute the same function and gradients as the MQBench modules they wrap, and share their
parameters (``alpha``, activation ``scale``), so hardening, saving and evaluation still go through MQBench.
What changes is the cost of one optimisation step (profile of a Fashion-MNIST MobileNetV2 unit step):

- activation fake-quant: MQBench builds ~7 autograd nodes (div, round, sub, detach, add, clamp, mul);
  ``torch._fake_quantize_learnable_per_tensor_affine`` with ``grad_factor=1`` is one fused kernel forward
  and backward with the same straight-through gradients for the input and the step;
- QDrop's element-wise drop mask: MQBench draws a float32 uniform per element (``rand_like``, serial on
  CPU); a Bernoulli(p) mask needs 8 random bits per element at most, 1 for p = 0.5. Masks are drawn as
  random bytes and unpacked (p is used at a resolution of 1/256; 0.5 is exact);
- AdaRound: ``floor(W / s)`` is fixed while a unit is optimised, so it is computed once, not every step,
  and the soft rounding mask is computed once per step for both the weight and the regulariser.
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

_BIT_SHIFTS = {}


def _shifts(device: torch.device) -> torch.Tensor:
    if device not in _BIT_SHIFTS:
        _BIT_SHIFTS[device] = torch.arange(8, dtype=torch.uint8, device=device)
    return _BIT_SHIFTS[device]


def keep_mask(like: torch.Tensor, prob: float, generator: torch.Generator) -> torch.Tensor:
    """Boolean mask, True with probability ``prob`` per element (QDrop: keep the quantized value)."""
    n = like.numel()
    if prob == 0.5:
        raw = torch.randint(0, 256, ((n + 7) // 8,), dtype=torch.uint8, device=like.device, generator=generator)
        bits = raw.unsqueeze(1).bitwise_right_shift(_shifts(like.device)).bitwise_and_(1)
        return bits.view(-1)[:n].view(like.shape).view(torch.bool)  # 0/1 bytes reinterpreted, no copy
    threshold = int(round(prob * 256))
    raw = torch.randint(0, 256, like.shape, dtype=torch.uint8, device=like.device, generator=generator)
    return raw < threshold if threshold < 256 else torch.ones_like(raw, dtype=torch.bool)


class FastActQuant(nn.Module):
    """MQBench's QDropFakeQuantize (per-tensor, learnable step) with a fused kernel and cheap drop masks."""

    def __init__(self, quantizer: nn.Module, generator: Optional[torch.Generator]):
        super().__init__()
        self.q = quantizer
        self.generator = generator
        self.zero_point = quantizer.zero_point.float()

    def forward(self, x):
        q = self.q
        if q.fake_quant_enabled[0] == 0:
            return x
        xq = torch._fake_quantize_learnable_per_tensor_affine(x, q.scale, self.zero_point, q.quant_min,
                                                              q.quant_max, 1.0)
        if q.prob < 1.0:
            return torch.where(keep_mask(x, q.prob, self.generator), xq, x)
        return xq


class FastAdaRoundLayer(nn.Module):
    """A conv/linear whose weight goes through AdaRound's soft rounding, with floor(W/s) precomputed."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer
        fq = layer.weight_fake_quant
        shape = [-1] + [1] * (layer.weight.dim() - 1)
        self.scale = fq.scale.detach().reshape(shape)
        self.zero_point = fq.zero_point.detach().reshape(shape).float()
        self.floor = torch.floor(layer.weight.detach() / self.scale)
        self.qmin, self.qmax = fq.quant_min, fq.quant_max
        self.soft = None  # the rounding mask of the current step, reused by the regulariser

    def rounding(self) -> torch.Tensor:
        fq = self.layer.weight_fake_quant
        return ((fq.zeta - fq.gamma) * torch.sigmoid(fq.alpha) + fq.gamma).clamp(0, 1)

    def forward(self, x):
        self.soft = self.rounding()
        w = (torch.clamp(self.floor + self.soft + self.zero_point, self.qmin, self.qmax) - self.zero_point) * self.scale
        layer = self.layer
        if isinstance(layer, nn.Linear):
            return F.linear(x, w, layer.bias)
        return layer._conv_forward(x, w, layer.bias)
