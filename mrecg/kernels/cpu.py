"""The ``cpu`` kernels: stand-ins for MQBench's AdaRound and QDrop fake quantizers, tuned on a 2-core CPU.

They compute the same function and gradients as the MQBench modules they wrap, and share their
parameters (``alpha``, activation ``scale``), so hardening, saving and evaluation still go through MQBench.
What changes is the cost of one optimisation step. On the CPU the step is made of small tensors, where
torch's float arithmetic is vectorised but its boolean kernels are not: on a 32x192x4x4 tensor (2 cores)
``mul`` takes 16 us, ``masked_fill`` 388 us, ``where`` 382 us, ``fake_quantize_per_tensor_affine`` 1093 us,
a comparison 67 us (``scripts/bench_kernels.py`` prints these and the figures below). So everything here is
float arithmetic:

- activation fake-quant (``_QDropQuantize``): MQBench's own float ops (x / s, round, + zp, clamp, - zp, * s)
  in one autograd node, whose forward also forms the two derivatives as float tensors, so the backward is
  one multiply and one dot product (autograd through MQBench's graph and QDrop's ``where`` takes ~10 passes);
- QDrop's element-wise drop mask: MQBench draws a float32 uniform per element (``rand_like``). A
  Bernoulli(1/2) mask needs one random bit per element: the bits of 64-bit random words, expanded to 0./1.
  floats through a 256 x 8 lookup table (``index_select``); other probabilities use one random byte per
  element (resolution 1/256) through a 256-entry table. Mixing is ``lerp``, exact at weights 0 and 1;
- AdaRound: ``floor(W / s)`` is fixed while a unit is optimised, so it is computed once, and so is where the
  rounded level sits strictly inside the grid (wherever a gradient flows the soft part h is in (0, 1), so
  only the floor decides); the regulariser's gradient is added analytically in ``AdaRoundWeight``'s backward
  (its value is never used), and no gradient is computed for the float weights, biases or BN (MQBench
  back-propagates into the float weight through ``floor`` every step, only to get zeros);
- depthwise convolutions on maps of 2x2 or smaller run as one small matrix per channel (``bmm``): oneDNN's
  depthwise kernel takes 3.0 ms forward + backward on 32x288x2x2, the matrices 2.1 ms.
"""
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

_TABLES: Dict[Tuple[str, torch.device, torch.dtype, int], torch.Tensor] = {}


def _table(kind: str, device: torch.device, dtype: torch.dtype, threshold: int = 0) -> torch.Tensor:
    """'bits': row b holds the 8 bits of byte b; 'below': entry b is 1 where b < threshold."""
    key = (kind, device, dtype, threshold)
    if key not in _TABLES:
        byte = torch.arange(256)
        if kind == 'bits':
            table = byte.unsqueeze(1).bitwise_right_shift(torch.arange(8)).bitwise_and(1)
        else:
            table = byte < threshold
        _TABLES[key] = table.to(device=device, dtype=dtype)
    return _TABLES[key]


def _random_bytes(count: int, device: torch.device, generator: torch.Generator) -> torch.Tensor:
    """``count`` uniform random bytes, drawn as 64-bit words (one generator call per 8 bytes)."""
    words = torch.randint(-2 ** 63, 2 ** 63 - 1, ((count + 7) // 8,), dtype=torch.int64, device=device,
                          generator=generator)
    return words.view(torch.uint8)[:count]


def keep_mask(like: torch.Tensor, prob: float, generator: torch.Generator) -> torch.Tensor:
    """0./1. mask in ``like``'s dtype, 1 with probability ``prob`` per element (QDrop: keep the quantized value)."""
    n = like.numel()
    dtype = like.dtype if like.is_floating_point() else torch.float32
    if prob == 0.5:
        raw = _random_bytes((n + 7) // 8, like.device, generator)
        return _table('bits', like.device, dtype).index_select(0, raw.int()).view(-1)[:n].view(like.shape)
    threshold = int(round(prob * 256))
    if threshold >= 256:
        return torch.ones_like(like, dtype=dtype)
    raw = _random_bytes(n, like.device, generator)
    return _table('below', like.device, dtype, threshold).index_select(0, raw.int()).view(like.shape)


class _QDropQuantize(torch.autograd.Function):
    """QDrop activation fake-quant, per tensor, learnable step, keep mask ``keep`` (0./1. floats, or None).

    xq = (clamp(round(x / s) + zp, qmin, qmax) - zp) * s            (MQBench's ops, in its order)
    out = keep ? xq : x
    d out / d x = keep ? inside : 1
    d out / d s = keep ? (inside ? (xq - x) / s : xq / s) : 0      (the straight-through estimate, as MQBench)
    "inside" is strict, qmin < round(x / s) + zp < qmax: torch's clamp with scalar bounds, which MQBench's
    Python estimator goes through, passes no gradient at the bounds themselves. With integer-valued r,
    clamp((r - qmin) * (qmax - r), 0, 1) is exactly that indicator, in float arithmetic. ``inclusive``:
    qmin <= r <= qmax (torch 1.x's clamp gradient, which the published numbers were trained with), the
    same indicator with the bounds widened by one level.
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point: float, qmin: float, qmax: float, keep, inclusive: bool = False):
        level = torch.div(x, scale).round_()
        if zero_point:
            level.add_(zero_point)
        xq = level.clamp(qmin, qmax)
        if zero_point:
            xq.sub_(zero_point)
        xq.mul_(scale)
        need_x, need_s = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dx = ds = None
        if need_x or need_s:
            lo, hi = (qmin - 1, qmax + 1) if inclusive else (qmin, qmax)
            inside = (level - lo).mul_(level.neg_().add_(hi)).clamp_(0, 1)
            if need_x:  # keep ? inside : 1  ==  1 - keep + keep * inside
                dx = inside if keep is None else torch.addcmul(1 - keep, keep, inside)
            if need_s:  # keep * (xq - inside * x), divided by s in the backward
                ds = torch.addcmul(xq, inside, x, value=-1)
                if keep is not None:
                    ds.mul_(keep)
        ctx.save_for_backward(dx, ds, scale)
        return xq if keep is None else torch.lerp(x, xq, keep)

    @staticmethod
    def backward(ctx, grad):
        dx, ds, scale = ctx.saved_tensors
        grad_x = grad * dx if ctx.needs_input_grad[0] else None
        grad_s = None
        if ctx.needs_input_grad[1]:
            grad_s = (torch.dot(grad.reshape(-1), ds.reshape(-1)) / scale.reshape(())).reshape(scale.shape)
        return grad_x, grad_s, None, None, None, None, None


class FastActQuant(nn.Module):
    """MQBench's QDropFakeQuantize (per-tensor, learnable step) as ``_QDropQuantize`` with cheap drop masks.
    The quantizer's switches and zero point are read once: they do not change while a unit is optimised."""

    def __init__(self, quantizer: nn.Module, generator: Optional[torch.Generator], ste_bounds: str = 'strict',
                 mask=None):
        super().__init__()
        self.mask = mask or keep_mask  # (like, prob, generator) -> 0./1. floats: the kernel set's drop mask
        if ste_bounds not in ('strict', 'inclusive'):
            raise ValueError(f"ste_bounds must be strict or inclusive, got {ste_bounds!r}")
        self.inclusive = ste_bounds == 'inclusive'
        if quantizer.scale.numel() != 1:
            raise ValueError('FastActQuant handles per-tensor activation quantizers only')
        self.q = quantizer
        self.generator = generator
        self.enabled = bool(quantizer.fake_quant_enabled[0] == 1)
        self.zero_point = float(quantizer.zero_point.reshape(-1)[0])
        self.qmin, self.qmax = float(quantizer.quant_min), float(quantizer.quant_max)

    def forward(self, x):
        if not self.enabled:
            return x
        q = self.q
        x = x.float()  # under bfloat16 autocast the convolutions' outputs: quantized in float32
        keep = self.mask(x, q.prob, self.generator) if q.prob < 1.0 else None
        return _QDropQuantize.apply(x, q.scale, self.zero_point, self.qmin, self.qmax, keep, self.inclusive)


class AdaRoundWeight(torch.autograd.Function):
    """AdaRound's soft-rounded weight with the rounding regulariser's gradient folded into the backward.

    h = clamp(1.2 sigmoid(alpha) - 0.1, 0, 1);  w = (clamp(floor(W/s) + zp + h, qmin, qmax) - zp) * s
    d w / d alpha = s * inside * 1.2 * sigmoid' * [0 < 1.2 sigmoid - 0.1 < 1], with ``grad_gain`` = s * inside * 1.2
    fixed per unit; the last two factors are autograd's own ``hardtanh_backward`` (clamp's strict mask) and
    ``sigmoid_backward``, one pass each (weights reach 2.4 M elements in ResNet-18's last stage, where every
    pass counts). The regulariser  reg_weight * sum(1 - |2h - 1|^beta)  is never needed as a value (only the
    reconstruction loss is reported), so only its gradient  -reg_weight * beta * |2h-1|^(beta-1) * sign(2h-1) * 2
    is added to d/dh here: one power per step instead of autograd's forward and backward pows over every variable.
    """

    @staticmethod
    def forward(ctx, alpha, floor_zp, scale, zero_point, grad_gain, qmin, qmax, reg_weight, beta, exp2_pow=True):
        sig = torch.sigmoid(alpha)
        pre = sig * 1.2 - 0.1
        h = pre.clamp(0, 1)
        ctx.save_for_backward(sig, pre, h if reg_weight else None, grad_gain)
        ctx.reg = (reg_weight, beta, exp2_pow)
        level = h.add_(floor_zp).clamp_(qmin, qmax) if not reg_weight else (floor_zp + h).clamp_(qmin, qmax)
        if zero_point is not None:
            level.sub_(zero_point)
        return level.mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        sig, pre, h, grad_gain = ctx.saved_tensors
        reg_weight, beta, exp2_pow = ctx.reg
        grad_pre = grad * grad_gain  # d loss / d h, times 1.2
        if reg_weight:  # |2h-1|^(beta-1) sign(2h-1) = 2^(beta-1) t |t|^(beta-2), t = h - 1/2
            t = h - 0.5
            gain = -reg_weight * beta * 2 * 1.2 * 2 ** (beta - 1)
            if beta == 2:
                grad_pre.add_(t, alpha=gain)
            elif beta > 2 and exp2_pow:  # |t|^e as exp2(e log2|t|): 3x faster than pow on the CPU, ~1e-5 rel. error
                grad_pre.addcmul_(t.abs().log2_().mul_(beta - 2).exp2_(), t, value=gain)
            else:  # |t|^(beta-2) is infinite at t = 0
                grad_pre.add_(t.abs().pow_(beta - 1).copysign_(t), alpha=gain)
        grad_sig = torch.ops.aten.hardtanh_backward(grad_pre, pre, 0.0, 1.0)
        return torch.ops.aten.sigmoid_backward(grad_sig, sig), None, None, None, None, None, None, None, None, None


DENSE_DEPTHWISE_MAX = 16  # 2x2 maps and smaller: at 4x4 the conv kernel is as fast (measured, digits model)


def dense_depthwise_plan(layer: nn.Conv2d, height: int, width: int, device: torch.device):
    """For a depthwise conv on a tiny feature map: for every (output, input) position pair the kernel tap that
    links them (k*k where none does), so that the conv is one batched matrix product per channel. None where
    that matrix would be large (more than ``DENSE_DEPTHWISE_MAX`` entries)."""
    (kh, kw), (sh, sw), (ph, pw) = layer.kernel_size, layer.stride, layer.padding
    out_h, out_w = (height + 2 * ph - kh) // sh + 1, (width + 2 * pw - kw) // sw + 1
    if out_h * out_w * height * width > DENSE_DEPTHWISE_MAX:
        return None
    index = torch.full((out_h * out_w, height * width), kh * kw, dtype=torch.long)
    for oi in range(out_h):
        for oj in range(out_w):
            for ki in range(kh):
                for kj in range(kw):
                    i, j = oi * sh - ph + ki, oj * sw - pw + kj
                    if 0 <= i < height and 0 <= j < width:
                        index[oi * out_w + oj, i * width + j] = ki * kw + kj
    return index.view(-1).to(device), out_h, out_w


def depthwise_dense(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], plan) -> torch.Tensor:
    index, out_h, out_w = plan
    n, c, h, w = x.shape
    taps = torch.cat([weight.reshape(c, -1), weight.new_zeros(c, 1)], 1)
    matrix = taps.index_select(1, index).view(c, out_h * out_w, h * w)
    columns = x.reshape(n, c, h * w).transpose(0, 1)
    if bias is None:
        y = torch.bmm(columns, matrix.transpose(1, 2))
    else:
        y = torch.baddbmm(bias.view(c, 1, 1), columns, matrix.transpose(1, 2))
    return y.transpose(0, 1).reshape(n, c, out_h, out_w)


class FastAdaRoundLayer(nn.Module):
    """A conv/linear whose weight goes through ``AdaRoundWeight`` (floor(W/s) + zp precomputed per unit).
    ``regularise`` sets the regulariser before each step (weight 0 during warm-up)."""

    def __init__(self, layer: nn.Module, dense_depthwise: bool = True, exp2_pow: bool = True):
        super().__init__()
        self.layer = layer
        self.exp2_pow = exp2_pow
        fq = layer.weight_fake_quant
        if (fq.gamma, fq.zeta) != (-0.1, 1.1):
            raise ValueError('FastAdaRoundLayer assumes the rectified sigmoid with gamma -0.1, zeta 1.1')
        shape = [-1] + [1] * (layer.weight.dim() - 1)
        self.scale = fq.scale.detach().reshape(shape)
        zero_point = fq.zero_point.detach().reshape(shape).float()
        self.zero_point = zero_point if bool(zero_point.any()) else None
        self.floor_zp = torch.floor(layer.weight.detach() / self.scale) + zero_point
        self.qmin, self.qmax = float(fq.quant_min), float(fq.quant_max)
        inside = (self.floor_zp >= self.qmin) & (self.floor_zp <= self.qmax - 1)  # floor + h, h in (0, 1)
        self.grad_gain = self.scale * inside * 1.2
        self.reg_weight, self.beta = 0.0, 2.0
        self.depthwise = (dense_depthwise and isinstance(layer, nn.Conv2d) and layer.groups == layer.in_channels == layer.out_channels
                          and layer.dilation == (1, 1) and layer.padding_mode == 'zeros'
                          and not isinstance(layer.padding, str))
        self.plans = {}

    def regularise(self, step: int, weight: float, beta: float) -> None:
        self.reg_weight, self.beta = weight, beta

    def forward(self, x):
        w = AdaRoundWeight.apply(self.layer.weight_fake_quant.alpha, self.floor_zp, self.scale, self.zero_point,
                                  self.grad_gain, self.qmin, self.qmax, self.reg_weight, self.beta, self.exp2_pow)
        layer = self.layer
        if isinstance(layer, nn.Linear):
            return F.linear(x, w, layer.bias)
        if self.depthwise:  # oneDNN's depthwise kernel is slow on tiny maps: 3.0 ms vs 2.1 ms as matrices at 2x2
            key = tuple(x.shape[2:])
            if key not in self.plans:
                self.plans[key] = dense_depthwise_plan(layer, key[0], key[1], x.device)
            if self.plans[key] is not None:
                return depthwise_dense(x, w, layer.bias, self.plans[key])
        return layer._conv_forward(x, w, layer.bias)
