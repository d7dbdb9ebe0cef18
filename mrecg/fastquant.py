"""Fast stand-ins for MQBench's AdaRound and QDrop fake quantizers inside the reconstruction step.

They compute the same function and gradients as the MQBench modules they wrap, and share their
parameters (``alpha``, activation ``scale``), so hardening, saving and evaluation still go through MQBench.
What changes is the cost of one optimisation step (profile of a Fashion-MNIST MobileNetV2 unit step):

- activation fake-quant: MQBench builds ~7 autograd nodes (div, round, sub, detach, add, clamp, mul) and
  QDrop's ``where`` adds more; ``_QDropQuantize`` is one fused kernel forward and a few passes backward,
  with the same straight-through gradients for the input and the step;
- QDrop's element-wise drop mask: MQBench draws a float32 uniform per element (``rand_like``, serial on
  CPU); a Bernoulli(p) mask needs 8 random bits per element at most, 1 for p = 0.5. Masks are drawn as
  random bytes and unpacked (p is used at a resolution of 1/256; 0.5 is exact);
- AdaRound: ``floor(W / s)`` is fixed while a unit is optimised, so it is computed once, not every step;
  the regulariser's gradient is added analytically in ``_AdaRoundWeight``'s backward (its value is never
  used), and no gradient is computed for the float weights, biases or BN (MQBench back-propagates into
  the float weight through ``floor`` every step, only to get zeros).
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


class _QDropQuantize(torch.autograd.Function):
    """QDrop activation fake-quant, per tensor, learnable step: one fused kernel forward; backward in two
    masked fills and two dot products (autograd through ``where`` + the learnable op takes ~10 passes).

    out = keep ? xq : x,  xq = (clamp(round(x / s) + zp, qmin, qmax) - zp) * s
    d out / d x = keep ? [inside] : 1
    d out / d s = keep ? (inside ? (xq - x) / s : xq / s) : 0   (the straight-through estimate, as MQBench)
    "inside" is strict, qmin < round(x / s) + zp < qmax: torch's clamp with scalar bounds, which MQBench's
    Python estimator goes through, passes no gradient at the bounds themselves.
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, enabled, qmin, qmax, keep):
        xq = torch.fake_quantize_per_tensor_affine(x, scale, zero_point, qmin, qmax)
        low, high = (qmin - zero_point) * scale, (qmax - zero_point) * scale  # the same float ops as the kernel
        inside = (xq > low) & (xq < high)
        ctx.save_for_backward(x, xq, inside, scale, keep)
        return torch.where(keep, xq, x) if keep is not None else xq

    @staticmethod
    def backward(ctx, grad):
        x, xq, inside, scale, keep = ctx.saved_tensors
        to_xq = grad if keep is None else grad.masked_fill(~keep, 0)
        grad_x = grad_scale = None
        if ctx.needs_input_grad[0]:
            grad_x = grad.masked_fill(~inside if keep is None else keep & ~inside, 0)
        if ctx.needs_input_grad[1]:
            inner = to_xq.masked_fill(~inside, 0)
            grad_scale = ((torch.dot(to_xq.reshape(-1), xq.reshape(-1)) - torch.dot(inner.reshape(-1), x.reshape(-1)))
                          / scale.reshape(())).reshape(scale.shape)
        return grad_x, grad_scale, None, None, None, None, None


class FastActQuant(nn.Module):
    """MQBench's QDropFakeQuantize (per-tensor, learnable step) as ``_QDropQuantize`` with cheap drop masks."""

    def __init__(self, quantizer: nn.Module, generator: Optional[torch.Generator]):
        super().__init__()
        self.q = quantizer
        self.generator = generator
        self.zero_point = quantizer.zero_point.to(torch.int32)

    def forward(self, x):
        q = self.q
        if q.fake_quant_enabled[0] == 0:
            return x
        keep = keep_mask(x, q.prob, self.generator) if q.prob < 1.0 else None
        return _QDropQuantize.apply(x, q.scale, self.zero_point, None, q.quant_min, q.quant_max, keep)


class _AdaRoundWeight(torch.autograd.Function):
    """AdaRound's soft-rounded weight with the rounding regulariser's gradient folded into the backward.

    h = clamp(1.2 sigmoid(alpha) - 0.1, 0, 1);  w = (clamp(floor(W/s) + h + zp, qmin, qmax) - zp) * s
    The regulariser  reg_weight * sum(1 - |2h - 1|^beta)  is never needed as a value (only the reconstruction
    loss is reported), so only its gradient  -reg_weight * beta * |2h-1|^(beta-1) * sign(2h-1) * 2  is added
    to d/dh here: one pow per step instead of autograd's forward and backward pows over every variable.
    """

    @staticmethod
    def forward(ctx, alpha, floor_zp, scale, zero_point, qmin, qmax, reg_weight, beta):
        sig = torch.sigmoid(alpha)
        pre = sig * 1.2 - 0.1
        h = pre.clamp(0, 1)
        level = floor_zp + h
        # strict bounds: torch's clamp with scalar bounds (MQBench's) passes no gradient at the bounds
        in_level = (level > qmin) & (level < qmax)
        in_sigmoid = (pre > 0) & (pre < 1)
        ctx.save_for_backward(sig, h, in_level, in_sigmoid, scale)
        ctx.reg = (reg_weight, beta)
        return (level.clamp_(qmin, qmax) - zero_point) * scale

    @staticmethod
    def backward(ctx, grad):
        sig, h, in_level, in_sigmoid, scale = ctx.saved_tensors
        reg_weight, beta = ctx.reg
        grad_h = (grad * scale).masked_fill_(~in_level, 0)
        if reg_weight:
            u = h * 2 - 1
            grad_h -= (reg_weight * beta * 2) * u.abs().pow(beta - 1) * u.sign()
        grad_alpha = grad_h.mul_(sig * (1 - sig) * 1.2).masked_fill_(~in_sigmoid, 0)
        return grad_alpha, None, None, None, None, None, None, None


class FastAdaRoundLayer(nn.Module):
    """A conv/linear whose weight goes through ``_AdaRoundWeight`` (floor(W/s) + zp precomputed per unit).
    Set ``reg_weight`` and ``beta`` before each step; 0 during warm-up."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer
        fq = layer.weight_fake_quant
        if (fq.gamma, fq.zeta) != (-0.1, 1.1):
            raise ValueError('FastAdaRoundLayer assumes the rectified sigmoid with gamma -0.1, zeta 1.1')
        shape = [-1] + [1] * (layer.weight.dim() - 1)
        self.scale = fq.scale.detach().reshape(shape)
        self.zero_point = fq.zero_point.detach().reshape(shape).float()
        self.floor_zp = torch.floor(layer.weight.detach() / self.scale) + self.zero_point
        self.qmin, self.qmax = float(fq.quant_min), float(fq.quant_max)
        self.reg_weight, self.beta = 0.0, 2.0

    def forward(self, x):
        w = _AdaRoundWeight.apply(self.layer.weight_fake_quant.alpha, self.floor_zp, self.scale, self.zero_point,
                                  self.qmin, self.qmax, self.reg_weight, self.beta)
        layer = self.layer
        if isinstance(layer, nn.Linear):
            return F.linear(x, w, layer.bias)
        return layer._conv_forward(x, w, layer.bias)
