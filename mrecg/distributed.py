"""One quantization run data-parallel over several processes, on torch.distributed.

    torchrun --nproc_per_node=2 ptq_main.py --config configs/fashion/mbv2_2_4.yaml

Any launcher that sets the usual environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``,
``LOCAL_RANK``) works; NCCL on GPUs (one per process, ``cuda:LOCAL_RANK``), gloo on CPU. What is shared:

- calibration: rank 0 calibrates on the whole calibration set and broadcasts the quantizer state, so every
  rank holds the single-process run's ranges bit for bit (MQBench's activation observers average over
  batches in order, which shard statistics cannot reproduce, and calibration is a few forward passes);
- reconstruction: each rank caches only its contiguous shard of the calibration images; each step it
  draws ``batch_size / world`` of them and the gradients of the rounding variables and activation steps
  are averaged (one all-reduce per step), so every rank takes the same optimiser step and keeps the same
  weights; losses (training window, per-unit) are reduced over ranks;
- evaluation: every rank scores a strided share of the images, the counts are summed.

A collective that fails because another process stopped raises ``PeerLost`` (the CLI prints one line);
``process.dist_timeout_s`` bounds every wait, so a lost peer never hangs the run.
"""
import datetime
import os
import re
from dataclasses import dataclass
from typing import Any, List, Sequence

import torch
import torch.distributed as dist

from mrecg.errors import UserError


class PeerLost(RuntimeError):
    """Another process of a distributed run stopped (or timed out) during a collective."""


@dataclass(frozen=True)
class Dist:
    """This process's place in the run; ``Dist()`` is a single process (every method a no-op)."""
    rank: int = 0
    world: int = 1
    backend: str = 'none'

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def shard(self, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous share of the rows (the sizes are checked to divide evenly)."""
        if not self.enabled:
            return tensor
        size = len(tensor) // self.world
        return tensor[self.rank * size:(self.rank + 1) * size].clone()

    def average_gradients(self, params: Sequence[torch.Tensor]) -> None:
        """Every rank's gradients replaced by their mean over ranks (one flat all-reduce)."""
        if not self.enabled:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        self._call(dist.all_reduce, flat)
        flat /= self.world
        offset = 0
        for p, g in zip(params, grads):
            p.grad = flat[offset:offset + g.numel()].view_as(g)
            offset += g.numel()

    def sum(self, values: Sequence[float], device: torch.device) -> List[float]:
        """Element-wise sums over ranks (float64)."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(list(values), dtype=torch.float64, device=self._device(device))
        self._call(dist.all_reduce, t)
        return t.tolist()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (between our own processes; never from a user file)."""
        if not self.enabled:
            return obj
        box = [obj if self.main else None]
        self._call(dist.broadcast_object_list, box, src=0)
        return box[0]

    def gather(self, obj: Any) -> List[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out: List[Any] = [None] * self.world
        self._call(dist.all_gather_object, out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            self._call(dist.barrier)

    def _device(self, device: torch.device) -> torch.device:
        return device if self.backend == 'nccl' else torch.device('cpu')

    def _call(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (RuntimeError, dist.DistError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            first = re.sub(r'\[[^\]]*\.(cc|cpp|h):\d+\]\s*', '', first)  # gloo/NCCL source positions
            first = first.split('. ')[0][:120]
            raise PeerLost(f'rank {self.rank} of {self.world}: another process of this distributed run stopped '
                           f'or timed out ({first})') from None


def env_world_size() -> int:
    try:
        return int(os.environ.get('WORLD_SIZE', '1'))
    except ValueError:
        raise UserError(f'WORLD_SIZE must be an integer, got {os.environ["WORLD_SIZE"]!r}') from None


def current() -> Dist:
    """The run's ``Dist``: the initialised process group's place, else a single process."""
    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), dist.get_backend())
    return Dist()


def init_from_env(device: torch.device, timeout_s: float) -> Dist:
    """Join the process group the launcher described (``WORLD_SIZE`` > 1); a single process otherwise.
    On CUDA each process takes ``cuda:LOCAL_RANK`` as its current device."""
    if dist.is_initialized() or env_world_size() <= 1:
        return current()
    missing = [k for k in ('RANK', 'MASTER_ADDR', 'MASTER_PORT') if k not in os.environ]
    if missing:
        raise UserError(f'WORLD_SIZE is {os.environ["WORLD_SIZE"]} but {", ".join(missing)} is not set: '
                        'launch with torchrun --nproc_per_node=N ptq_main.py ...')
    backend = 'nccl' if device.type == 'cuda' else 'gloo'
    if backend == 'nccl':
        torch.cuda.set_device(int(os.environ.get('LOCAL_RANK', '0')))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return current()


def check_divisible(d: Dist, cali_size: int, batch_size: int) -> None:
    """Equal shards and equal per-rank batches keep the averaged gradient the global batch's gradient."""
    if not d.enabled:
        return
    for name, value in (('quantize.cali_size', cali_size), ('quantize.reconstruction.batch_size', batch_size)):
        if value % d.world:
            raise UserError(f'{name} is {value}, which {d.world} processes cannot share evenly: make it a '
                            f'multiple of {d.world}')


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
