"""The group's trainable graph: MQBench's AdaRound layers and activation quantizers replaced by a kernel set's
stand-ins (sharing the MQBench modules' parameters, so hardening, saving and evaluation still go through MQBench).

AdaRound is the rounding method: ``init`` before a group (``init_adaround``), the stand-in layer during it, and
``harden`` after it. Another rounding method is another stand-in from the kernel set and another pair of these.
"""
from dataclasses import dataclass
from typing import List

import torch
import torch.fx as fx

from mrecg.kernels import KernelSet, StepSeeds
from mrecg.quantization import harden_adaround, init_adaround, is_act_quantizer, is_adaround_layer
from mrecg.units import Group, UnitPartition


@dataclass
class TrainGraph:
    graph: fx.GraphModule
    weight_layers: List[torch.nn.Module]  # the stand-ins of the AdaRound layers (``regularise`` before a step)
    act_quants: List[torch.nn.Module]     # every MQBench activation quantizer in the group (QDrop applies to all)
    learned: List[torch.nn.Module]        # those whose step is learned: all but the network input's
    fused: int                            # element-wise ops folded into the quantizers (``compiled``)


def adaround_layers(qmodel: fx.GraphModule, partition: UnitPartition, group: Group) -> List[torch.nn.Module]:
    modules = dict(qmodel.named_modules())
    return [modules[n.target] for n in partition.nodes_of(group.first, group.last)
            if n.op == 'call_module' and is_adaround_layer(modules[n.target])]


def init_rounding(layers: List[torch.nn.Module]) -> None:
    for layer in layers:
        init_adaround(layer)


def harden_rounding(layers: List[torch.nn.Module]) -> None:
    for layer in layers:
        harden_adaround(layer)


def train_graph(qmodel: fx.GraphModule, partition: UnitPartition, group: Group, outputs: List[fx.Node],
                kernels: KernelSet, rng: StepSeeds, ste_bounds: str, reg_table=lambda: None) -> TrainGraph:
    """The group's sub-graph for optimisation (call after ``init_rounding``). The network input's quantizer keeps
    its calibrated step, as in MQBench (Adam moves a step by about ``scale_lr`` per iteration, a large fraction of
    an 8-bit input step: up to -18 % in 300 iterations, which cost BRECQ 0.8-1.1 top-1 on the Fashion benchmark)."""
    modules = dict(qmodel.named_modules())
    params = dict(qmodel.named_parameters())
    root, layers, act_quants, learned, quant_names = {}, [], [], [], []
    for node in partition.nodes_of(group.first, group.last):
        if node.op == 'get_attr':
            root[node.target] = params[node.target] if node.target in params else qmodel.get_buffer(node.target)
        if node.op != 'call_module':
            continue
        m = modules[node.target]
        if is_adaround_layer(m) and getattr(m.weight_fake_quant, 'adaround', False):
            root[node.target] = kernels.weight_layer(m, reg_table)
            layers.append(root[node.target])
        elif is_act_quantizer(m):
            root[node.target] = kernels.act_quant(m, rng, ste_bounds)
            act_quants.append(m)
            quant_names.append(node.target)
            if not any(arg.op == 'placeholder' for arg in node.all_input_nodes):
                learned.append(m)
        else:
            root[node.target] = m
    graph = partition.build_graph(root, group.first, group.last, outputs)
    fused = kernels.fuse(graph, quant_names)
    return TrainGraph(graph, layers, act_quants, learned, fused)
