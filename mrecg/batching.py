"""The reconstruction step's mini-batches, gathered from the caches, optionally one step ahead.

With the caches in host memory (``cache_device: cpu``, for the paper's 4096 images on a small GPU) every
step would wait for its rows to cross to the GPU. ``StepBatches`` with ``lookahead`` gathers the next
step's rows into pinned buffers and copies them on a side stream while the current step computes. The
indices come from the group's own generator (on the caches' device) in step order, with or without lookahead,
so the numbers do not change (tested on the CPU, where lookahead runs the same code without streams or pinning).
"""
from typing import List, Optional, Tuple

import torch


class StepBatches:
    """Rows ``idx`` of every source tensor, on ``device`` in float32, for one step after another.

    ``sources`` are cache tensors (any device, any float dtype) of ``n`` rows each; ``batch_size`` rows per
    step are drawn as ``randperm(n, generator)[:batch_size]``, exactly as the step did before.
    """

    def __init__(self, sources: List[torch.Tensor], n: int, batch_size: int, generator: torch.Generator,
                 device: torch.device, lookahead: bool = False):
        self.sources, self.n, self.batch_size, self.gen, self.device = sources, n, batch_size, generator, device
        self.lookahead = lookahead
        host_to_cuda = device.type == 'cuda' and all(s.device.type == 'cpu' for s in sources)
        self.stream = torch.cuda.Stream(device) if lookahead and host_to_cuda else None
        self.pinned: List[List[torch.Tensor]] = [[], []]  # double buffer: one filling, one maybe still copying
        self.copied: List[Optional[torch.cuda.Event]] = [None, None]
        self.slot = 0
        self.ahead: Optional[Tuple[torch.Tensor, List[torch.Tensor], Optional[torch.cuda.Event]]] = None

    def next(self) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """The next step's indices (on the sources' device) and rows (on ``device``, float32)."""
        batch = self.ahead if self.ahead is not None else self._gather()
        if self.lookahead:
            self.ahead = self._gather()
        idx, rows, ready = batch
        if ready is not None:  # rows were copied on the side stream: the step's stream waits for them
            current = torch.cuda.current_stream(self.device)
            current.wait_event(ready)
            for r in rows:
                r.record_stream(current)
        return idx, [r.float() for r in rows]

    def _gather(self):
        # drawn where the generator lives (the caches' device): no host round trip per step on a GPU
        idx = torch.randperm(self.n, generator=self.gen, device=self.gen.device)[:self.batch_size]
        idx = idx.to(self.sources[0].device)
        if self.stream is None:
            return idx, [s.index_select(0, idx).to(self.device, non_blocking=True) for s in self.sources], None
        slot, self.slot = self.slot, 1 - self.slot
        if self.copied[slot] is not None:
            self.copied[slot].synchronize()  # the host must not refill a buffer whose copy is in flight
        if not self.pinned[slot]:
            self.pinned[slot] = [torch.empty((self.batch_size, *s.shape[1:]), dtype=s.dtype, pin_memory=True)
                                 for s in self.sources]
        for s, buf in zip(self.sources, self.pinned[slot]):
            torch.index_select(s, 0, idx, out=buf[:len(idx)])
        with torch.cuda.stream(self.stream):
            rows = [buf[:len(idx)].to(self.device, non_blocking=True) for buf in self.pinned[slot]]
            event = torch.cuda.Event()
            event.record(self.stream)
        self.copied[slot] = event
        return idx, rows, event

