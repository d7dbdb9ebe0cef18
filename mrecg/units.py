"""Reconstruction units: which graph nodes each unit owns, and an executable sub-graph per unit group.

A *base unit* is a named list of module names (a BRECQ block: stem, residual block, classifier). MQBench's
prepared model is one flat FX graph, so every node is assigned to the unit that owns it:

- a module call (or a function traced inside a module, via ``nn_module_stack``) belongs to the unit whose
  module names contain it;
- an activation fake-quantizer belongs to the unit that produced its input, so a unit's output is the
  quantized activation (as in BRECQ/QDrop/MQBench); the network input's quantizer goes to the first unit;
- glue between units at the top level (flatten, mean) belongs to the unit that consumes it.

A *group* is a run of adjacent base units reconstructed jointly (MRECG). Its sub-graph takes the cached
tensors that cross into it and returns the tensors later groups need; ``liveness`` says when each cached
tensor can be freed.
"""
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Set, Tuple

import torch.fx as fx
import torch.nn as nn

from mrecg.quantization import ACT_QUANT_SUFFIX, WEIGHT_LAYERS


@dataclass(frozen=True)
class BaseUnit:
    name: str
    modules: Tuple[str, ...]


def model_base_units(model: nn.Module, override: Optional[Sequence[Sequence[str]]] = None,
                     own_ops: Optional[Set[str]] = None) -> List[BaseUnit]:
    """The default block partition: an explicit ``override`` (lists of module names), else the model's own
    ``unit_partition()``, else a generic one (see ``generic_partition``; ``join_forks`` then completes it on
    the prepared graph)."""
    if override:
        return [BaseUnit('+'.join(mods), tuple(mods)) for mods in override]
    if hasattr(model, 'unit_partition'):
        return [BaseUnit(name, tuple(mods)) for name, mods in model.unit_partition()]
    return generic_partition(model, own_ops)


CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def stack_paths(node: fx.Node) -> List[str]:
    """The qualified names of the modules a traced node ran inside, outermost first (``nn_module_stack``)."""
    return [p[0] if isinstance(p, tuple) else p for p in (node.meta.get('nn_module_stack') or {}).values()]


def unit_of(modules: Sequence[str]) -> BaseUnit:
    """A base unit named after its module, or its modules joined by '+'."""
    return BaseUnit(modules[0] if len(modules) == 1 else '+'.join(modules), tuple(modules))


def _weight_layers(module: nn.Module) -> int:
    return sum(isinstance(m, WEIGHT_LAYERS) for m in module.modules())


def _parts(module: nn.Module):
    """(relative name, module) of the children, looking through Sequential/ModuleList/ModuleDict."""
    for name, child in module.named_children():
        if isinstance(child, CONTAINERS):
            yield from ((f'{name}.{n}', c) for n, c in _parts(child))
        else:
            yield name, child


def _is_stage(module: nn.Module, name: str, own_ops: Set[str]) -> bool:
    """A module made of several blocks (two or more parts with two or more conv/linear layers each) that only
    chains them (no operation of its own, such as a residual add), like a RegNet or ConvNeXt stage: split
    it; its blocks become the candidate units. A block with its own add stays whole."""
    return name not in own_ops and sum(_weight_layers(child) >= 2 for _, child in _parts(module)) >= 2


def modules_with_own_ops(graph_module: fx.GraphModule) -> Set[str]:
    """Modules whose forward runs operations of its own (function and method calls), from the traced graph."""
    return {stack_paths(node)[-1] for node in graph_module.graph.nodes
            if node.op in ('call_function', 'call_method') and stack_paths(node)}


def generic_partition(model: nn.Module, own_ops: Optional[Set[str]] = None) -> List[BaseUnit]:
    """For models without ``unit_partition``: descend through containers and stages; every other module that
    holds a conv/linear becomes a candidate unit; modules without one join the previous unit (the next one
    if none came before). ``join_forks`` then merges candidates that a residual connection spans.
    ``own_ops`` (``modules_with_own_ops`` of the traced model) keeps blocks with their own adds whole."""
    leaves: List[Tuple[str, nn.Module]] = []
    own_ops = own_ops or set()

    def walk(prefix: str, module: nn.Module):
        for name, child in module.named_children():
            full = f'{prefix}{name}'
            if isinstance(child, CONTAINERS) or _is_stage(child, full, own_ops):
                walk(full + '.', child)
            else:
                leaves.append((full, child))

    walk('', model)
    groups: List[List[str]] = []
    pending: List[str] = []
    for name, child in leaves:
        if _weight_layers(child):
            groups.append(pending + [name])
            pending = []
        elif groups:
            groups[-1].append(name)
        else:
            pending.append(name)
    if pending and groups:
        groups[-1].extend(pending)
    return [unit_of(g) for g in groups]


def called_only(prepared: fx.GraphModule, units: List[BaseUnit]) -> List[BaseUnit]:
    """Drop the modules the traced graph never calls (auxiliary heads used only in training, modules
    disabled by configuration), and units left empty by that."""
    called = set()
    for node in prepared.graph.nodes:
        if node.op == 'call_module':
            called.add(_strip_dup(node.target))
        called.update(stack_paths(node))
    prefixes = {'.'.join(c.split('.')[:i]) for c in called for i in range(1, len(c.split('.')) + 1)}
    kept = []
    for u in units:
        mods = tuple(m for m in u.modules if m in prefixes)
        if mods:
            kept.append(u if mods == u.modules else unit_of(mods))
    return kept


def is_generic(model: nn.Module, override) -> bool:
    """True when the units come from the generic rule (no override, no ``unit_partition``)."""
    return not override and not hasattr(model, 'unit_partition')


def boundary_widths(partition: 'UnitPartition') -> List[int]:
    """For each boundary between base units i and i+1: how many distinct tensors cross it. A tensor and its
    activation quantizer count once (MQBench may hand a residual branch the float tensor and the next conv
    the quantized one)."""
    def tensor(n: fx.Node) -> fx.Node:
        return _args(n)[0] if UnitPartition._is_act_quantizer(n) and _args(n) else n
    crossing: List[set] = [set() for _ in range(len(partition.units) - 1)]
    for n, owner in partition.owner.items():
        later = [partition.owner[u] for u in n.users if u in partition.owner and partition.owner[u] > owner]
        for b in range(owner, max(later, default=owner)):
            crossing[b].add(tensor(n))
    return [len(c) for c in crossing]


def join_forks(prepared: fx.GraphModule, units: List[BaseUnit]) -> List[BaseUnit]:
    """The graph rule for networks we have never seen: a unit may only end where a single tensor flows on,
    so a residual block (fork ... join) is always one unit, and a plain chain keeps one unit per layer
    (with its BN, activation and pooling). Where a boundary is wider, a unit's trailing modules without
    weights (a norm before the next block's branch) move to the next unit if that narrows it to one tensor;
    across every boundary still wider, adjacent units merge."""
    if len(units) < 2:
        return units
    units = list(units)
    widths = boundary_widths(UnitPartition.build(prepared, units))
    for i, width in enumerate(widths):
        if width > 1:
            moved = _move_tail(prepared, units, i)
            if moved is not None:
                units, widths[i] = moved, 1
    merged: List[List[BaseUnit]] = [[units[0]]]
    for unit, width in zip(units[1:], widths):
        if width > 1:
            merged[-1].append(unit)
        else:
            merged.append([unit])
    everything = [m for u in units for m in u.modules]
    return [run[0] if len(run) == 1 else BaseUnit(_span_name(run, everything), tuple(m for u in run for m in u.modules))
            for run in merged]


def _move_tail(prepared: fx.GraphModule, units: List[BaseUnit], i: int) -> Optional[List[BaseUnit]]:
    """Units with the shortest end of unit i's weightless tail moved to unit i+1 that leaves one tensor
    crossing; None if no such move exists."""
    modules = dict(prepared.named_modules())
    mods = list(units[i].modules)
    cut = len(mods)
    while cut > 1 and mods[cut - 1] in modules and not _weight_layers(modules[mods[cut - 1]]):
        cut -= 1
    for start in range(len(mods) - 1, cut - 1, -1):
        head, tail = mods[:start], mods[start:]
        trial = units[:i] + [unit_of(head),
                             BaseUnit(units[i + 1].name, tuple(tail) + units[i + 1].modules)] + units[i + 2:]
        try:
            if boundary_widths(UnitPartition.build(prepared, trial))[i] == 1:
                return trial
        except ValueError:
            continue
    return None


def _span_name(run: List[BaseUnit], everything: List[str]) -> str:
    """A merged unit is called after the module that holds all of it and nothing else (``layer1.0``), else
    after its ends."""
    paths = [m.split('.') for u in run for m in u.modules]
    common = []
    for parts in zip(*paths):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    prefix = '.'.join(common)
    inside = {m for u in run for m in u.modules}
    if common and not any(m == prefix or m.startswith(prefix + '.') for m in everything if m not in inside):
        return prefix
    return '+'.join(u.name for u in run) if len(run) == 2 else f'{run[0].name}..{run[-1].name}'


def layer_base_units(prepared: fx.GraphModule) -> List[BaseUnit]:
    """AdaRound's layer-wise granularity: every conv/linear starts a unit; the modules after it (BN, ReLU,
    pooling) up to the next conv/linear join it, in graph order."""
    modules = dict(prepared.named_modules())
    units: List[List[str]] = []
    pending: List[str] = []
    for node in prepared.graph.nodes:
        if node.op != 'call_module' or node.target.endswith(ACT_QUANT_SUFFIX):
            continue
        name = _strip_dup(node.target)
        if isinstance(modules[node.target], WEIGHT_LAYERS):
            units.append(pending + [name])
            pending = []
        elif units:
            units[-1].append(name)
        else:
            pending.append(name)
    return [BaseUnit(u[0], tuple(u)) for u in units]


def _strip_dup(target: str) -> str:
    """MQBench renames a module called twice ``relu`` -> ``relu_dup1``; map it back to the real module."""
    return re.sub(r'_dup\d+$', '', target)


def module_owner(path: str, index: Dict[str, int]) -> Optional[int]:
    """Unit index of the longest listed module name that is ``path`` or a parent of it."""
    parts = path.split('.')
    for cut in range(len(parts), 0, -1):
        hit = index.get('.'.join(parts[:cut]))
        if hit is not None:
            return hit
    return None


def _args(node: fx.Node) -> List[fx.Node]:
    return list(node.all_input_nodes)


@dataclass
class UnitPartition:
    """Base units laid over a prepared graph: node ownership plus each base unit's inputs and outputs."""
    graph_module: fx.GraphModule
    units: List[BaseUnit]
    owner: Dict[fx.Node, int] = field(default_factory=dict)
    head_ops: str = 'classifier'

    @classmethod
    def build(cls, prepared: fx.GraphModule, units: List[BaseUnit], head_ops: str = 'classifier') -> 'UnitPartition':
        """``head_ops``: the weightless operations that open the last unit (pooling, flatten, the classifier's
        input quantizer) stay in it (``classifier``), or end the unit before it (``last_block``, MQBench's
        block extractor, which fits the last block on the pooled, quantized output)."""
        if head_ops not in ('classifier', 'last_block'):
            raise ValueError(f'head_ops must be classifier or last_block, got {head_ops!r}')
        part = cls(prepared, list(units), head_ops=head_ops)
        part._assign()
        if head_ops == 'last_block' and len(units) > 1:
            part._move_leading_ops(len(units) - 1)
        return part

    def _move_leading_ops(self, unit: int) -> None:
        """Give the nodes before ``unit``'s first weight layer, fed only by the unit before, to that unit."""
        modules = dict(self.graph_module.named_modules())
        lead = []
        for n in self.nodes_of(unit, unit):
            if n.op == 'call_module' and isinstance(modules[n.target], WEIGHT_LAYERS):
                for m in lead:
                    self.owner[m] = unit - 1
                return
            if not _args(n) or any(self.owner.get(a) != unit - 1 and a not in lead for a in _args(n)):
                return
            lead.append(n)

    # ---- ownership -------------------------------------------------------------------------------
    def _assign(self) -> None:
        index: Dict[str, int] = {}
        known = dict(self.graph_module.named_modules())
        for i, unit in enumerate(self.units):
            if not unit.modules:
                raise ValueError(f'unit {unit.name!r} lists no modules')
            for mod in unit.modules:
                if mod not in known:
                    raise ValueError(f'unit {unit.name!r} names module {mod!r}, which the model does not have')
                if mod in index:
                    raise ValueError(f'module {mod!r} is listed in two units')
                index[mod] = i
        nodes = [n for n in self.graph_module.graph.nodes if n.op not in ('placeholder', 'output')]
        direct = {n: self._direct_owner(n, index) for n in nodes}
        consumer: Dict[fx.Node, Optional[int]] = {}
        for n in reversed(nodes):  # the earliest unit that (transitively) consumes n
            owners = [direct[u] if direct[u] is not None else consumer.get(u) for u in n.users if u.op != 'output']
            owners = [o for o in owners if o is not None]
            consumer[n] = min(owners) if owners else None
        for n in nodes:
            owner = direct[n]
            if owner is None and self._is_act_quantizer(n):
                src = _args(n)[0]
                owner = self.owner.get(src) if src.op != 'placeholder' else None
            if owner is None:
                owner = consumer[n]
            if owner is None:
                arg_owners = [self.owner[a] for a in _args(n) if a in self.owner]
                owner = max(arg_owners) if arg_owners else None
            if owner is None:
                raise ValueError(f'graph node {n.name} belongs to no unit; list its module in a unit')
            self.owner[n] = owner
        for n in nodes:
            for a in _args(n):
                if a in self.owner and self.owner[a] > self.owner[n]:
                    raise ValueError(f'units are not in graph order: {n.name} in unit '
                                     f'{self.units[self.owner[n]].name!r} uses {a.name} from later unit '
                                     f'{self.units[self.owner[a]].name!r}')
        empty = [u.name for i, u in enumerate(self.units) if i not in set(self.owner.values())]
        if empty:
            raise ValueError(f'units own no graph node (their modules are never called): {", ".join(empty)}')

    @staticmethod
    def _is_act_quantizer(node: fx.Node) -> bool:
        return node.op == 'call_module' and node.target.endswith(ACT_QUANT_SUFFIX)

    def _direct_owner(self, node: fx.Node, index: Dict[str, int]) -> Optional[int]:
        if node.op == 'call_module':
            if self._is_act_quantizer(node):
                return None
            return module_owner(_strip_dup(node.target), index)
        paths = stack_paths(node)
        if paths:
            return module_owner(paths[-1], index)
        return None

    # ---- groups ----------------------------------------------------------------------------------
    def nodes_of(self, first: int, last: int) -> List[fx.Node]:
        return [n for n in self.graph_module.graph.nodes if first <= self.owner.get(n, -1) <= last]

    def inputs_of(self, first: int, last: int) -> List[fx.Node]:
        inside = set(self.nodes_of(first, last))
        inputs: List[fx.Node] = []
        for n in self.nodes_of(first, last):
            for a in _args(n):
                if a not in inside and a not in inputs:
                    inputs.append(a)
        return inputs

    def outputs_of(self, first: int, last: int) -> List[fx.Node]:
        """Nodes of units first..last that are used after unit ``last`` (or are the model output)."""
        outs = []
        for n in self.nodes_of(first, last):
            if any(u.op == 'output' or self.owner.get(u, -1) > last for u in n.users):
                outs.append(n)
        return outs

    def build_graph(self, root, first: int, last: int, outputs: List[fx.Node]) -> fx.GraphModule:
        """An executable GraphModule of units first..last over ``root``'s modules (shared, not copied) or over
        a dict {target: module}: called with the group's inputs in ``inputs_of`` order, returns a tuple in
        ``outputs`` order."""
        graph = fx.Graph()
        env: Dict[fx.Node, fx.Node] = {}
        for n in self.inputs_of(first, last):
            env[n] = graph.placeholder(n.name)
        for n in self.nodes_of(first, last):
            env[n] = graph.node_copy(n, lambda a: env[a])
        graph.output(tuple(env[o] for o in outputs))
        return fx.GraphModule(root, graph)


@dataclass(frozen=True)
class Group:
    """Adjacent base units first..last, reconstructed as one unit."""
    first: int
    last: int

    def name(self, units: List[BaseUnit]) -> str:
        return '+'.join(u.name for u in units[self.first:self.last + 1])

    def modules(self, units: List[BaseUnit]) -> List[str]:
        return [m for u in units[self.first:self.last + 1] for m in u.modules]


def groups_from_spans(spans: Sequence[Tuple[int, int]], num_units: int) -> List[Group]:
    """Turn merged spans (first, last) into a full cover of 0..num_units-1 by groups."""
    groups, i = [], 0
    for first, last in sorted(spans):
        groups += [Group(j, j) for j in range(i, first)]
        groups.append(Group(first, last))
        i = last + 1
    groups += [Group(j, j) for j in range(i, num_units)]
    return groups


def liveness(partition: UnitPartition, groups: List[Group]) -> Dict[str, int]:
    """For every tensor that crosses a group boundary: the index of the last group that reads it."""
    last_use: Dict[str, int] = {}
    for gi, g in enumerate(groups):
        for n in partition.inputs_of(g.first, g.last):
            last_use[n.name] = gi
    return last_use
