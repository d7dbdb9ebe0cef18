"""The float and quantized streams: cached tensors over the whole calibration set, propagated one group at a time.

No pass ever re-runs the network from the input. A cached tensor is freed as soon as no later group reads it
(``liveness``). In a data-parallel run the caches hold this rank's shard of the calibration images.
"""
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.fx as fx

from mrecg.distributed import Dist
from mrecg.units import Group, UnitPartition, liveness

DTYPES = {'float32': torch.float32, 'float16': torch.float16, 'bfloat16': torch.bfloat16}


class Streams:
    """The two caches (``fp``, ``q``: node name -> tensor of every calibration image) and the passes filling them."""

    def __init__(self, partition: UnitPartition, groups: List[Group], device: torch.device,
                 cache_device: torch.device, cache_dtype: torch.dtype, chunk_size: int, loss_fn: Callable,
                 dist: Dist):
        self.partition, self.device, self.cache_device, self.cache_dtype = partition, device, cache_device, cache_dtype
        self.chunk_size, self.loss_fn, self.dist = chunk_size, loss_fn, dist
        self.last_use = liveness(partition, groups)
        self.fp: Dict[str, torch.Tensor] = {}
        self.q: Dict[str, torch.Tensor] = {}
        self.unit_losses: List[Optional[float]] = [None] * len(partition.units)
        self.peak_bytes = 0

    def start(self, images: torch.Tensor) -> None:
        placeholder = next(n for n in self.partition.graph_module.graph.nodes if n.op == 'placeholder')
        images = images.to(self.cache_device, self.cache_dtype)
        self.fp, self.q = {placeholder.name: images}, {placeholder.name: images}

    def _fetch(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.device, torch.float32, non_blocking=True)

    def _write(self, cache: Dict[str, torch.Tensor], name: str, start: int, chunk: torch.Tensor, total: int) -> None:
        if start == 0:
            cache[name] = torch.empty((total, *chunk.shape[1:]), dtype=self.cache_dtype, device=self.cache_device)
        cache[name][start:start + len(chunk)].copy_(chunk)

    def nbytes(self) -> int:
        sizes = {}
        for cache in (self.fp, self.q):
            for t in cache.values():
                sizes[t.data_ptr()] = t.numel() * t.element_size()
        return sum(sizes.values())

    def free(self, group_index: int) -> None:
        """Drop every cached tensor no group after ``group_index`` reads."""
        self.peak_bytes = max(self.peak_bytes, self.nbytes())
        for cache in (self.fp, self.q):
            for name in [n for n in cache if self.last_use.get(n, -1) <= group_index]:
                del cache[name]

    def free_float_inputs(self, inputs: List[str], group_index: int) -> None:
        """Float inputs no later group reads are done with once optimised: lowers the quantized pass's peak."""
        for name in inputs:
            if self.last_use.get(name, -1) <= group_index:
                self.fp.pop(name, None)

    @torch.no_grad()
    def _pass(self, graph: fx.GraphModule, inputs: List[str], cache: Dict[str, torch.Tensor],
              sink: Callable[[int, Sequence[torch.Tensor]], None]) -> None:
        """Run ``graph`` over the whole calibration set in chunks, handing each chunk's outputs to ``sink``."""
        total = len(cache[inputs[0]])
        for start in range(0, total, self.chunk_size):
            stop = start + self.chunk_size
            sink(start, graph(*[self._fetch(cache[name][start:stop]) for name in inputs]))

    def probe_nodes(self, group: Group) -> List[fx.Node]:
        """Every base unit's outputs (for the per-unit loss); includes the group's own outputs."""
        probe: List[fx.Node] = []
        for u in range(group.first, group.last + 1):
            probe += [n for n in self.partition.outputs_of(u, u) if n not in probe]
        return probe

    def float_pass(self, fp_model: fx.GraphModule, group: Group, inputs: List[str], outputs: List[fx.Node],
                   probe: List[fx.Node]) -> Dict[fx.Node, List[torch.Tensor]]:
        """Float outputs of the group into the float cache; outputs of inner base units (consumed inside an
        MRECG group, needed only for their loss) are kept as chunk lists until the quantized pass."""
        graph = self.partition.build_graph(fp_model, group.first, group.last, probe)
        total = len(self.fp[inputs[0]])
        inner: Dict[fx.Node, List[torch.Tensor]] = {n: [] for n in probe if n not in outputs}

        def sink(start, outs):
            for node, out in zip(probe, outs):
                if node in inner:
                    inner[node].append(out.to(self.cache_device, self.cache_dtype))
                else:
                    self._write(self.fp, node.name, start, out, total)
        self._pass(graph, inputs, self.fp, sink)
        return inner

    def quant_pass(self, qmodel: fx.GraphModule, group: Group, inputs: List[str], probe: List[fx.Node],
                   inner: Dict[fx.Node, List[torch.Tensor]]) -> None:
        """Quantized outputs of the group into the quantized cache, and the loss of each base unit in it."""
        graph = self.partition.build_graph(qmodel, group.first, group.last, probe)
        total = len(self.q[inputs[0]])
        sums = {n: 0.0 for n in probe}

        def sink(start, outs):
            chunk = start // self.chunk_size
            for node, out in zip(probe, outs):
                ref = inner[node][chunk] if node in inner else self.fp[node.name][start:start + len(out)]
                sums[node] += self.loss_fn(out, ref.to(out.device, torch.float32)).item() * len(out)
                if node not in inner:
                    self._write(self.q, node.name, start, out, total)
        self._pass(graph, inputs, self.q, sink)
        *reduced, total = self.dist.sum([*sums.values(), total], self.device)
        sums = dict(zip(sums, reduced))
        for u in range(group.first, group.last + 1):
            self.unit_losses[u] = sum(sums[n] / total for n in self.partition.outputs_of(u, u))
