"""Kernel sets for the reconstruction step, one per device family, chosen by ``quantize.reconstruction.kernels``.

A kernel set makes the step's stand-ins for MQBench's modules (activation quantizer, AdaRound layer), QDrop's
input mix and the reconstruction loss. All compute MQBench's function; they differ in cost and in how QDrop's
random mask is drawn (so a different set draws other masks: the name is part of the resume digest and of
results.json):

- ``reference``: MQBench's arithmetic in plain torch autograd, the oracle of the tests (``reference.py``);
- ``cpu``: fused autograd functions in float arithmetic, a byte-table mask, dense depthwise (``cpu.py``);
- ``cuda``: the same functions with the mask drawn on the device (``cuda.py``);
- ``compiled``: each element-wise stretch as one ``torch.compile`` kernel, the mask hashed inside it
  (``compiled.py``);
- ``auto``: ``cpu`` on the CPU; on CUDA ``compiled`` where Triton is installed, else ``cuda``.
"""
import importlib.util
from dataclasses import dataclass
from typing import Callable, List

import torch
import torch.nn as nn

from mrecg.kernels import compiled as _compiled
from mrecg.kernels import cpu as _cpu
from mrecg.kernels import cuda as _cuda
from mrecg.kernels import reference as _reference
from mrecg.kernels.compiled import StepSeeds

NAMES = ('auto', 'reference', 'cpu', 'cuda', 'compiled')


def resolve(name: str, device: torch.device) -> str:
    """The kernel set ``name`` means on ``device`` (``auto`` resolved)."""
    if name != 'auto':
        return name
    if device.type == 'cpu':
        return 'cpu'
    if device.type == 'cuda' and importlib.util.find_spec('triton') is not None:
        return 'compiled'
    return 'cuda'


@dataclass(frozen=True)
class KernelSet:
    """How one group's step is built. ``rng`` is the group's ``StepSeeds`` (its generator for the eager sets)."""
    name: str
    eager: bool = False  # compiled only: run the kernels' Python uncompiled (the tests' oracle)

    @property
    def fuses_prologues(self) -> bool:
        return self.name == 'compiled'

    @property
    def explicit_regulariser(self) -> bool:
        """The rounding regulariser is a loss term (else its gradient is folded into the weight's backward)."""
        return self.name == 'reference'

    def act_quant(self, quantizer: nn.Module, rng: StepSeeds, ste_bounds: str) -> nn.Module:
        if self.name == 'reference':
            return _reference.ReferenceActQuant(quantizer, rng.generator, ste_bounds)
        if self.name == 'compiled':
            return _compiled.CompiledActQuant(quantizer, rng, ste_bounds, self.eager)
        mask = _cuda.device_keep if self.name == 'cuda' else _cpu.keep_mask
        return _cpu.FastActQuant(quantizer, rng.generator, ste_bounds, mask)

    def weight_layer(self, layer: nn.Module, reg_table: Callable[[], torch.Tensor]) -> nn.Module:
        """``reg_table()``: the group's (weight, beta) per step on the device (built once, for ``compiled``)."""
        if self.name == 'reference':
            return _reference.ReferenceAdaRoundLayer(layer)
        if self.name == 'compiled':
            return _compiled.CompiledAdaRoundLayer(layer, reg_table(), self.eager)
        cuda = self.name == 'cuda'
        return _cpu.FastAdaRoundLayer(layer, dense_depthwise=not cuda, exp2_pow=not cuda)

    def mixer(self, prob: float, rng: StepSeeds) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """QDrop's input mix (quantized where kept, float elsewhere) for one group input."""
        if self.name == 'compiled':
            site = rng.site()
            return lambda q, fp: _compiled.mix(q, fp, prob, rng, site, self.eager)
        if self.name == 'reference':
            return lambda q, fp: torch.where(_reference.rand_keep(q, prob, rng.generator), q, fp)
        mask = _cuda.device_keep if self.name == 'cuda' else _cpu.keep_mask
        # lerp with a 0/1 weight is exact: the quantized input where 1, the float one where 0
        return lambda q, fp: torch.lerp(fp, q, mask(q, prob, rng.generator))

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.name == 'reference':
            return _reference.reference_loss(pred, target)
        if self.name == 'compiled':
            return _compiled.compiled_loss(pred, target, self.eager)
        return lp_loss(pred, target)

    def fuse(self, graph: torch.fx.GraphModule, quantizers: List[str]) -> int:
        return _compiled.fuse_prologues(graph, quantizers) if self.fuses_prologues else 0


def lp_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error summed over channels, averaged over batch and positions (BRECQ/QDrop/MQBench's
    ``(pred - target).pow(2).sum(1).mean()``, as one fused kernel forward and one backward)."""
    return torch.nn.functional.mse_loss(pred, target, reduction='sum') / (pred.numel() // pred.shape[1])


def kernel_set(name: str, device: torch.device, eager: bool = False) -> KernelSet:
    """The kernel set for config value ``name`` on ``device``."""
    resolved = resolve(name, device)
    if resolved not in NAMES[1:]:
        raise ValueError(f'unknown kernel set {name!r} (one of {", ".join(NAMES)})')
    return KernelSet(resolved, eager)
