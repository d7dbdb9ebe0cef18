"""How much memory the cached activations will take, before any is cached, and where they should live.

``cache_device: auto`` on a GPU keeps the caches in GPU memory when they fit and in host memory (with the next
batch gathered ahead, ``batching``) when they would not: the engine asks ``cache_plan`` once, before the first
pass, from the calibration set's size, the cache dtype and the free GPU memory. The estimate walks the groups
with the engine's own liveness, as ``Streams`` does: per group the float pass and optimisation (both input
streams and the float outputs), then the quantized pass (float inputs freed, both output streams).
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp

from mrecg.units import Group, UnitPartition, liveness

HEADROOM = 0.8  # of the free GPU memory the caches may take: the step's activations, weights and cuDNN need room


def per_image_bytes(graph: fx.GraphModule, sample: torch.Tensor, dtype_bytes: int) -> Dict[str, int]:
    """Bytes of one image's value of every node, from one forward of one image of ``sample``. Give the float
    copy (quantizers and observers off): in eval mode, so no statistic moves; the mode is restored."""
    was = graph.training
    device = next((p.device for p in graph.parameters()), torch.device('cpu'))
    graph.eval()
    try:
        with torch.no_grad():
            ShapeProp(graph).propagate(sample[:1].to(device, torch.float32))
    finally:
        graph.train(was)
    return {n.name: n.meta['tensor_meta'].shape.numel() * dtype_bytes for n in graph.graph.nodes
            if hasattr(n.meta.get('tensor_meta'), 'shape')}  # tuples of tensors (none cross units) have no shape


def peak_cache(partition: UnitPartition, groups: List[Group], sizes: Dict[str, int], images: int) -> Tuple[int, str]:
    """Peak bytes of the float + quantized caches over ``images`` images, and the group where it occurs."""
    last_use = liveness(partition, groups)
    placeholder = next(n.name for n in partition.graph_module.graph.nodes if n.op == 'placeholder')
    fp, q = {placeholder: sizes[placeholder]}, {placeholder: 0}  # the images: one copy shared by both streams
    peak, where = 0, ''
    for gi, g in enumerate(groups):
        inner = set()
        for u in range(g.first, g.last + 1):
            inner |= {n.name for n in partition.outputs_of(u, u)}
        outputs = {n.name for n in partition.outputs_of(g.first, g.last)}
        inner_bytes = sum(sizes[n] for n in inner - outputs)
        for n in outputs:
            fp[n] = sizes[n]
        phase_a = sum(fp.values()) + sum(q.values()) + inner_bytes
        fp = {n: b for n, b in fp.items() if last_use.get(n, -1) > gi or n in outputs}
        for n in outputs:
            q[n] = sizes[n]
        phase_b = sum(fp.values()) + sum(q.values()) + inner_bytes
        if max(phase_a, phase_b) > peak:
            peak, where = max(phase_a, phase_b), g.name(partition.units)
        fp = {n: b for n, b in fp.items() if last_use.get(n, -1) > gi}
        q = {n: b for n, b in q.items() if last_use.get(n, -1) > gi}
    return peak * images, where


@dataclass(frozen=True)
class CachePlan:
    """Where the caches go and why (the why is logged and written to results.json)."""
    device: torch.device
    need_bytes: Optional[int] = None
    free_bytes: Optional[int] = None
    reason: str = ''


def cache_plan(setting: str, device: torch.device, need_bytes: Optional[int] = None,
               free_bytes: Optional[int] = None) -> CachePlan:
    """``cpu`` and ``device`` are what they say; ``auto`` is the run's device unless that is a GPU whose free
    memory (``HEADROOM`` of it) cannot hold ``need_bytes``: then host memory."""
    if setting == 'cpu' or device.type == 'cpu':
        return CachePlan(torch.device('cpu'), need_bytes, free_bytes)
    if setting == 'device' or need_bytes is None or free_bytes is None:
        return CachePlan(device, need_bytes, free_bytes)
    if need_bytes <= HEADROOM * free_bytes:
        return CachePlan(device, need_bytes, free_bytes)
    gib = 2 ** 30
    return CachePlan(torch.device('cpu'), need_bytes, free_bytes,
                     f'the caches need {need_bytes / gib:.1f} GiB and {device} has {free_bytes / gib:.1f} GiB free: '
                     f'they live in host memory (the next batch is gathered ahead); '
                     f'cache_dtype=float16 halves them')


def free_device_memory(device: torch.device) -> Optional[int]:
    """Free bytes on a CUDA device (None elsewhere)."""
    if device.type != 'cuda':
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free)
