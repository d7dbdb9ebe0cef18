"""The ``compiled`` kernels: each element-wise stretch of the step as one ``torch.compile`` kernel.

On a GPU the step's element-wise work is bound by launches (at 32 images) and by memory traffic (at 256):
MQBench's QDrop quantizer is ~15 kernels forward and backward, each reading and writing the whole
activation. Here, per activation quantizer, one kernel forward and one backward (inductor: Triton on
CUDA, C++ on the CPU), and the convolutions stay outside every compiled region (cuDNN / oneDNN):

- ``act_forward`` / ``act_backward``: the quantizer together with its *prologue* (the residual ``add`` and
  the ``relu`` / ``relu6`` feeding it, fused in by ``fuse_prologues``), the QDrop mix and the straight-through
  gradients, recomputed in the backward from the saved inputs (nothing else is stored);
- QDrop's keep mask is never a tensor: a counter-based hash (``uniform32``: two rounds of Wellons'
  lowbias32 over the element index and a 64-bit per-call seed) evaluated inside the kernel, forward and
  backward alike. The seeds are one ``randint`` per step on the group's device generator (``StepSeeds``);
- ``adaround_forward`` / ``adaround_backward``: AdaRound's soft weight and its gradient with the rounding
  regulariser folded in; the regulariser's (weight, beta) for every step are a table on the device, so a
  step sets them with a view, not a host-to-device copy;
- ``loss_forward`` / ``loss_backward``: the reconstruction loss and its gradient.

The same Python functions run uncompiled as the oracle (``eager=True``): equal values, tested on the CPU.
"""
import functools
import types
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

M32 = 0xFFFFFFFF
RECOMPILE_LIMIT = 64


def lowbias32(x: torch.Tensor) -> torch.Tensor:
    """Wellons' 32-bit integer hash, in int64 arithmetic (products wrap; the low 32 bits are exact)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def uniform32(numel: int, seed: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A uniform 32-bit integer per element index, from a 64-bit seed (a 0-d int64 tensor)."""
    i = torch.arange(numel, device=device, dtype=torch.int64)
    first = lowbias32((i & M32) ^ (seed & M32))
    return lowbias32(first ^ ((i >> 32) & M32) ^ ((seed >> 32) & M32))


def keep_threshold(prob: float) -> int:
    """``uniform32 < threshold`` holds with probability ``prob`` (to 2^-32)."""
    return int(round(prob * 2 ** 32))


def hash_keep(like: torch.Tensor, seed: torch.Tensor, threshold: int) -> torch.Tensor:
    return (uniform32(like.numel(), seed, like.device) < threshold).view(like.shape)


def _sum(a, b):
    """The prologue's input: ``a``, or the residual ``a + b``, in float32."""
    return a.float() if b is None else a.float() + b.float()


def _prologue(a, b, act: str):
    x = _sum(a, b)
    if act == 'relu':
        x = torch.relu(x)
    elif act == 'relu6':
        x = x.clamp(0.0, 6.0)
    return x


def act_forward(a, b, scale, consts, seed, *, act: str, threshold: int, drop: bool, residual: bool = False):
    """prologue, then (clamp(round(x / s) + zp, qmin, qmax) - zp) * s, QDrop's mix where ``drop``."""
    x = _prologue(a, b, act)
    zp, qmin, qmax = consts[0], consts[1], consts[2]
    xq = (torch.minimum(torch.maximum(torch.round(x / scale) + zp, qmin), qmax) - zp) * scale
    return torch.where(hash_keep(x, seed, threshold), xq, x) if drop else xq


def act_backward(grad, a, b, scale, consts, seed, *, act: str, threshold: int, drop: bool, inclusive: bool,
                 need_scale: bool, residual: bool = False):
    """Gradients of ``act_forward`` for the prologue's input(s) and the step (MQBench's straight-through
    estimate: d/dx = inside, d/ds = (xq - inside * x) / s where kept; the dropped elements pass through)."""
    x = _prologue(a, b, act)
    zp, qmin, qmax = consts[0], consts[1], consts[2]
    level = torch.round(x / scale) + zp
    xq = (torch.minimum(torch.maximum(level, qmin), qmax) - zp) * scale
    lo, hi = (qmin - 1, qmax + 1) if inclusive else (qmin, qmax)
    inside = (level > lo) & (level < hi)
    keep = hash_keep(x, seed, threshold) if drop else torch.ones_like(inside)
    pre = _sum(a, b)
    passes = keep.logical_not() | inside
    if act == 'relu':
        passes = passes & (pre > 0)
    elif act == 'relu6':
        passes = passes & (pre > 0) & (pre < 6)
    grad_x = torch.where(passes, grad, 0.0)
    if not need_scale:
        return grad_x, None
    ds = torch.where(keep, torch.where(inside, xq - x, xq), 0.0)
    return grad_x, ((grad * ds).sum() / scale.reshape(())).reshape(scale.shape)


def mix_forward(q, fp, seed, *, threshold: int):
    """QDrop's input mix: the quantized stream where kept, the float stream elsewhere."""
    return torch.where(hash_keep(q, seed, threshold), q, fp)


def adaround_forward(alpha, floor_zp, scale, zero_point, *, qmin: float, qmax: float):
    h = (torch.sigmoid(alpha) * 1.2 - 0.1).clamp(0.0, 1.0)
    return ((floor_zp + h).clamp(qmin, qmax) - zero_point) * scale


def adaround_backward(grad, alpha, grad_gain, reg):
    """d/d alpha of the soft weight, plus the regulariser reg[0] * sum(1 - |2h - 1|^reg[1])'s gradient."""
    sig = torch.sigmoid(alpha)
    pre = sig * 1.2 - 0.1
    t = pre.clamp(0.0, 1.0) * 2 - 1
    reg_grad = -reg[0] * reg[1] * 2.4 * torch.sign(t) * t.abs().pow(reg[1] - 1)
    grad_pre = grad * grad_gain + reg_grad
    return torch.where((pre > 0) & (pre < 1), grad_pre, 0.0) * sig * (1 - sig)


def loss_forward(pred, target, inv_rows):
    """Squared error summed over channels, averaged over batch and positions (MQBench's ``lp_loss``): the flat
    tensors' squared error times ``inv_rows`` = 1 / (batch x positions)."""
    return (pred.float() - target).square().sum() * inv_rows


def loss_backward(grad, pred, target, inv_rows):
    return grad * 2 * (pred.float() - target) * inv_rows


@functools.lru_cache(maxsize=None)
def _scalar(value: float, device: torch.device) -> torch.Tensor:
    """A 0-d constant on the device, made once (a fresh ``torch.tensor`` per step would be a host-to-device copy)."""
    return torch.tensor(value, device=device)


@functools.lru_cache(maxsize=None)
def kernel(fn, eager: bool = False, **constants):
    """``fn`` with its keyword-only constants bound, compiled once per constant set, for any size (callers pass
    flat or 2-D views, so no size-1 dimension specialises a second graph). Each set gets a function with
    a code object of its own: Dynamo caches and counts recompilations per code object, so constant sets sharing
    one (a ``functools.partial``) would exhaust its recompile limit across the quantizers of one network."""
    if eager:
        return functools.partial(fn, **constants)
    tag = '_'.join(f'{k}_{v}' for k, v in sorted(constants.items()))
    code = fn.__code__.replace(co_name=f'{fn.__name__}__{tag}')
    bound = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
    bound.__kwdefaults__ = {**(fn.__kwdefaults__ or {}), **constants}
    # a few recompilations per kernel remain legitimate (guards on size ranges, coincidentally equal sizes); with
    # ``fullgraph`` the default limit of 8 would end a run, so it is raised (never lowered) for these kernels
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    return torch.compile(bound, dynamic=True, fullgraph=True)


class StepSeeds:
    """The step's mask seeds: one int64 per random site (quantizer or input mix), drawn in one ``randint`` on the
    group's device generator at the start of every step; a site reads its seed as a view (no launch)."""

    def __init__(self, generator: torch.Generator, device: torch.device):
        self.generator, self.device, self.sites, self.seeds = generator, device, 0, None

    def site(self) -> int:
        self.sites += 1
        return self.sites - 1

    def draw(self) -> None:
        if self.sites:
            self.seeds = torch.randint(0, 2 ** 62, (self.sites,), generator=self.generator, device=self.device)

    def __getitem__(self, site: int) -> torch.Tensor:
        return self.seeds[site]


class _ActQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, scale, consts, seed, spec):
        ctx.save_for_backward(a, b, scale, consts, seed)
        ctx.spec = spec
        forward = kernel(act_forward, spec['eager'], act=spec['act'], threshold=spec['threshold'], drop=spec['drop'],
                         residual=b is not None)
        return forward(_flat(a), _flat(b), _arg(scale), consts, _arg(seed)).view(a.shape)

    @staticmethod
    def backward(ctx, grad):
        a, b, scale, consts, seed = ctx.saved_tensors
        spec, need = ctx.spec, ctx.needs_input_grad
        backward = kernel(act_backward, spec['eager'], act=spec['act'], threshold=spec['threshold'],
                          drop=spec['drop'], inclusive=spec['inclusive'], need_scale=need[2], residual=b is not None)
        grad_x, grad_s = backward(_flat(grad), _flat(a), _flat(b), _arg(scale), consts, _arg(seed))
        grad_x = grad_x.view(a.shape)
        return grad_x if need[0] else None, grad_x if need[1] else None, grad_s, None, None, None


def _arg(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A kernel argument: detached, so neither ``requires_grad`` nor a view's base enters Dynamo's guards (either
    would recompile a kernel per quantizer)."""
    return None if t is None else t.detach()


def _flat(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The element-wise kernels' flat view of a tensor (no copy for the contiguous tensors of the step)."""
    return None if t is None else t.reshape(-1).detach()


class CompiledActQuant(nn.Module):
    """MQBench's QDropFakeQuantize (per tensor) with its prologue (``add``, ``relu`` / ``relu6``: set by
    ``fuse_prologues``) as one kernel each way; shares the quantizer's ``scale``."""

    def __init__(self, quantizer: nn.Module, seeds: StepSeeds, ste_bounds: str = 'strict', eager: bool = False):
        super().__init__()
        if quantizer.scale.numel() != 1:
            raise ValueError('CompiledActQuant handles per-tensor activation quantizers only')
        self.q, self.seeds, self.site = quantizer, seeds, seeds.site()
        self.enabled = bool(quantizer.fake_quant_enabled[0] == 1)
        zp = float(quantizer.zero_point.reshape(-1)[0])
        self.consts = torch.tensor([zp, float(quantizer.quant_min), float(quantizer.quant_max)],
                                   device=quantizer.scale.device)
        self.act, self.inclusive, self.eager = 'none', ste_bounds == 'inclusive', eager

    def forward(self, a, b=None):
        if not self.enabled:
            return _prologue(a, b, self.act)
        if b is not None and b.shape != a.shape:  # a broadcasting add: added here, the kernel takes one input
            a, b = a + b, None
        prob = self.q.prob
        spec = dict(act=self.act, threshold=keep_threshold(prob), drop=prob < 1.0, inclusive=self.inclusive,
                    eager=self.eager)
        return _ActQuant.apply(a, b, self.q.scale, self.consts, self.seeds[self.site], spec)


class _AdaRound(torch.autograd.Function):
    @staticmethod
    def forward(ctx, alpha, layer):
        ctx.layer = layer
        ctx.save_for_backward(alpha)
        rows = alpha.shape[0]  # [out channels, the rest]: per-channel scale and zero point broadcast as [rows, 1]
        return kernel(adaround_forward, layer.eager, qmin=layer.qmin, qmax=layer.qmax)(
            _arg(alpha.view(rows, -1)), _arg(layer.floor_zp.view(rows, -1)), _arg(layer.scale.view(rows, 1)),
            _arg(layer.zero_point.view(rows, 1))).view(alpha.shape)

    @staticmethod
    def backward(ctx, grad):
        (alpha,), layer = ctx.saved_tensors, ctx.layer
        rows = alpha.shape[0]
        return kernel(adaround_backward, layer.eager)(_arg(grad.reshape(rows, -1)), _arg(alpha.view(rows, -1)),
                                                      _arg(layer.grad_gain.view(rows, -1)), _arg(layer.reg)
                                                      ).view(alpha.shape), None


class CompiledAdaRoundLayer(nn.Module):
    """A conv/linear whose AdaRound weight is one kernel each way; the convolution itself stays cuDNN's/oneDNN's.
    ``regularise(step, ...)`` selects row ``step`` of the group's regulariser table (a view)."""

    def __init__(self, layer: nn.Module, reg_table: torch.Tensor, eager: bool = False):
        super().__init__()
        fq = layer.weight_fake_quant
        if (fq.gamma, fq.zeta) != (-0.1, 1.1):
            raise ValueError('CompiledAdaRoundLayer assumes the rectified sigmoid with gamma -0.1, zeta 1.1')
        self.layer, self.reg_table, self.eager = layer, reg_table, eager
        shape = [-1] + [1] * (layer.weight.dim() - 1)
        self.scale = fq.scale.detach().reshape(shape)
        self.zero_point = fq.zero_point.detach().reshape(shape).float()
        self.floor_zp = torch.floor(layer.weight.detach() / self.scale) + self.zero_point
        self.qmin, self.qmax = float(fq.quant_min), float(fq.quant_max)
        inside = (self.floor_zp >= self.qmin) & (self.floor_zp <= self.qmax - 1)
        self.grad_gain = self.scale * inside * 1.2
        self.reg = reg_table[0]

    def regularise(self, step: int, weight: float, beta: float) -> None:
        self.reg = self.reg_table[step]

    def forward(self, x):
        w = _AdaRound.apply(self.layer.weight_fake_quant.alpha, self)
        layer = self.layer
        if isinstance(layer, nn.Linear):
            return F.linear(x, w, layer.bias)
        return layer._conv_forward(x, w, layer.bias)


class _Loss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred, target, eager):
        inv_rows = _scalar(1.0 / (pred.numel() // pred.shape[1]), pred.device)
        ctx.save_for_backward(pred, target, inv_rows)
        ctx.eager = eager
        return kernel(loss_forward, eager)(_flat(pred), _flat(target), inv_rows)

    @staticmethod
    def backward(ctx, grad):
        pred, target, inv_rows = ctx.saved_tensors
        return kernel(loss_backward, ctx.eager)(_arg(grad), _flat(pred), _flat(target), inv_rows).view(pred.shape), \
            None, None


def compiled_loss(pred: torch.Tensor, target: torch.Tensor, eager: bool = False) -> torch.Tensor:
    return _Loss.apply(pred, target, eager)


def mix(q: torch.Tensor, fp: torch.Tensor, prob: float, seeds: StepSeeds, site: int, eager: bool = False):
    return kernel(mix_forward, eager, threshold=keep_threshold(prob))(_flat(q), _flat(fp), _arg(seeds[site])).view(q.shape)


ACTIVATIONS = {nn.ReLU: 'relu', nn.ReLU6: 'relu6', torch.relu: 'relu', F.relu: 'relu', F.relu6: 'relu6'}


def _activation(node, modules) -> Optional[str]:
    if node.op == 'call_module':
        return ACTIVATIONS.get(type(modules[node.target]))
    if node.op == 'call_function' and len(node.args) == 1:  # relu(x), relu6(x); inplace or not, we write anew
        return ACTIVATIONS.get(node.target)
    if node.op == 'call_method' and node.target in ('relu', 'relu_') and len(node.args) == 1:
        return 'relu'
    return None


def _is_add(node) -> bool:
    import operator
    return (node.op == 'call_function' and node.target in (operator.add, torch.add) and len(node.args) == 2
            and not node.kwargs and all(isinstance(a, torch.fx.Node) for a in node.args))


def fuse_prologues(graph_module: torch.fx.GraphModule, quantizers: List[str]) -> int:
    """Fold the ``add`` and ``relu`` / ``relu6`` feeding each ``CompiledActQuant`` (named in ``quantizers``) into it,
    where nothing else reads them. Returns the number of ops folded."""
    modules = dict(graph_module.named_modules())
    folded = 0
    for node in list(graph_module.graph.nodes):
        if node.op != 'call_module' or node.target not in quantizers or len(node.args) != 1:
            continue
        quant, src, dead = modules[node.target], node.args[0], []
        act = _activation(src, modules) if isinstance(src, torch.fx.Node) else None
        if act and len(src.users) == 1 and isinstance(src.args[0], torch.fx.Node):
            quant.act, dead, src = act, [src], src.args[0]
        args = (src,)
        if _is_add(src) and len(src.users) == 1:
            args, dead = tuple(src.args), dead + [src]
        node.args = args
        for d in dead:
            graph_module.graph.erase_node(d)
        folded += len(dead)
    graph_module.recompile()
    return folded
