"""One group's optimisation: its state (``Training``), one step (batch, loss, backward, optimiser) and the
loss windows with the non-finite check.

The step issues no host synchronisation: the batch indices come from a generator on the caches' device, the
kernel set's masks from the group's device generator, the regulariser from a device table (``compiled``); the
loss window is read once every ``LOG_EVERY`` steps, with one read for the loss and every parameter's finiteness.
"""
import math
from dataclasses import dataclass
from typing import Callable, List, Sequence

import torch

from mrecg.batching import StepBatches
from mrecg.config import ReconstructionConfig
from mrecg.distributed import Dist
from mrecg.kernels import KernelSet, StepSeeds
from mrecg.reconstruction.rounding import TrainGraph

LOG_EVERY = 50  # iterations per loss window (the progress bar's number and the non-finite check)


def round_beta(step: int, iterations: int, warm_up: float, b_range: Sequence[float]) -> float:
    """The AdaRound regulariser's exponent: b_range[0] during warm-up, then linear down to b_range[1]."""
    start = warm_up * iterations
    if step < start:
        return float(b_range[0])
    rel = (step - start) / max(iterations - start, 1)
    return float(b_range[1] + (b_range[0] - b_range[1]) * max(0.0, 1.0 - rel))


def regulariser(step: int, iterations: int, s: ReconstructionConfig):
    """(weight, beta) of the rounding regulariser at ``step`` (counted from 1, as MQBench): weight 0 in warm-up."""
    on = step >= s.warm_up * iterations
    return (s.weight if on else 0.0), (round_beta(step, iterations, s.warm_up, s.b_range) if on else 2.0)


def regulariser_table(iterations: int, s: ReconstructionConfig, device: torch.device) -> torch.Tensor:
    """Every step's (weight, beta), rows 0..iterations, on the device (a step takes its row as a view)."""
    return torch.tensor([regulariser(i, iterations, s) for i in range(iterations + 1)], device=device)


def optimiser(alphas: List[torch.Tensor], scales: List[torch.Tensor], iterations: int, s: ReconstructionConfig,
              device: torch.device):
    """One Adam over both parameter groups (MQBench runs two): rounding variables at ``lr``, activation
    steps at ``scale_lr`` on a cosine schedule to zero over the unit's iterations. Fused (one kernel for
    all parameters) where torch has it: the unfused step costs ~0.4 ms of ~4 on a small CPU unit."""
    groups = [{'params': alphas, 'lr': s.lr}] + ([{'params': scales, 'lr': s.scale_lr}] if scales else [])
    adam = torch.optim.Adam(groups, fused=device.type in ('cpu', 'cuda'))
    cosine = lambda step: 0.5 * (1.0 + math.cos(math.pi * step / iterations))  # noqa: E731
    return adam, torch.optim.lr_scheduler.LambdaLR(adam, [lambda step: 1.0, cosine][:len(groups)])


@dataclass
class Training:
    """The state of one group's optimisation (see ``Reconstructor.start_group``)."""
    net: TrainGraph
    kernels: KernelSet
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # the reconstruction loss of one output
    params: List[torch.Tensor]
    good: List[torch.Tensor]
    adam: torch.optim.Optimizer
    schedule: object
    batches: StepBatches
    rng: StepSeeds
    mixers: List[Callable]  # per group input: QDrop's mix of its two streams, or None (one stream)
    settings: ReconstructionConfig
    iterations: int
    dist: Dist

    def batch(self):
        """The group's inputs and float targets for one step (QDrop: each input element from the quantized stream
        with probability ``prob``, else from the float one)."""
        _, rows = self.batches.next()
        xs, rest = [], iter(rows[len(self.mixers):])
        for x, mix in zip(rows[:len(self.mixers)], self.mixers):
            xs.append(mix(x, next(rest)) if mix is not None else x)
        return xs, list(rest)

    def step(self, step: int) -> torch.Tensor:
        """One optimisation step on a random mini-batch; returns its reconstruction loss (a device tensor)."""
        s = self.settings
        self.rng.draw()
        xs, targets = self.batch()
        weight, beta = regulariser(step + 1, self.iterations, s)
        for f in self.net.weight_layers:
            f.regularise(step + 1, weight, beta)
        with torch.autocast(xs[0].device.type, torch.bfloat16, enabled=s.autocast == 'bfloat16'):
            outs = self.net.graph(*xs)
        rec = sum(self.loss(o.float(), target) for o, target in zip(outs, targets))
        loss = rec
        if self.kernels.explicit_regulariser and weight:
            loss = rec + sum(f.penalty() for f in self.net.weight_layers)
        self.adam.zero_grad(set_to_none=True)
        loss.backward()
        self.dist.average_gradients(self.params)
        self.adam.step()
        self.schedule.step()
        return rec

    def read_window(self, window: torch.Tensor, count: int):
        """(mean loss over ranks, every parameter finite) in one device-to-host read."""
        finite = torch.stack([torch.isfinite(p).all() for p in self.params]).all()
        value, ok = torch.stack([window / count, finite.float()]).tolist()
        return self.dist.sum([value], window.device)[0] / self.dist.world, bool(ok)

    @torch.no_grad()
    def keep_good(self) -> None:
        self.good = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def restore_good(self) -> None:
        for p, g in zip(self.params, self.good):
            p.copy_(g)
