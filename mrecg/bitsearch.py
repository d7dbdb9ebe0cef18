"""Mixed precision under a budget: which layers the search may change, what each choice costs, and the
allocation it picks (``quantize.bit_search``), turned into ``layer_bits`` so that everything after it
(calibration, ModCap and MRECG's grouping, reconstruction, export) simply follows the chosen bits.

The search space: every conv/linear except the first and last layers MQBench's academic backend keeps at 8
bits and those a ``layer_bits`` rule fixes; with ``candidates.a``, every activation quantizer except those
feeding a fixed layer or fixed by a rule (one quantizer feeds several layers: one choice for all of them).
Costs: ``avg_w_bits`` is the parameter-weighted mean weight bits of the searched layers; ``size_mb`` the
weights of every conv/linear in packed bits (10^6 bytes; biases, scales and zero points not counted);
``bops_g`` the sum over every conv/linear of MACs x weight bits x input bits (10^9), MACs from one forward
pass at the data's input size.
"""
import copy
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Dict, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn

from mrecg import sensitivity
from mrecg.bitsolver import Problem, cheapest, objective, solve
from mrecg.config import Config, LayerBits
from mrecg.errors import UserError
from mrecg.quantization import disable_all, input_quantizers, layer_bit_table, resolve_layer_bits, weight_layer_names

log = logging.getLogger('mrecg')
DATA_MEASURES = ('output', 'fisher')


@dataclass
class Space:
    """What the search may change and what every layer costs (``search_space``)."""
    params: Dict[str, int]  # every conv/linear, in graph order
    macs: Dict[str, int]
    bits: Dict[str, Tuple[int, Optional[int]]]  # every layer's (weight, input) bits without the search
    searched: List[str]  # layers whose weight bits are chosen
    feeds: Dict[str, List[str]]  # searched activation quantizer -> the layers it feeds
    input_of: Dict[str, Optional[str]]  # layer -> its searched input quantizer, if any

    def figures(self, w: Dict[str, int], a: Dict[str, int]) -> Dict[str, float]:
        """avg_w_bits, size_mb, bops_g of an allocation (``w`` per searched layer, ``a`` per searched quantizer)."""
        wb = {n: w.get(n, self.bits[n][0]) for n in self.params}
        ab = {n: a[self.input_of[n]] if self.input_of.get(n) in a else (self.bits[n][1] or 32)  # no quantizer: float
              for n in self.params}
        searched = sum(self.params[n] for n in self.searched)
        return {'avg_w_bits': sum(self.params[n] * wb[n] for n in self.searched) / searched if searched else 0.0,
                'size_mb': sum(self.params[n] * wb[n] for n in self.params) / 8e6,
                'bops_g': sum(self.macs[n] * wb[n] * ab[n] for n in self.params) / 1e9}


def model_figures(qmodel: fx.GraphModule, sample: torch.Tensor) -> Dict[str, float]:
    """The quantized model's weight size (MB, packed bits), mean weight bits (parameter-weighted, all layers) and
    GBOPs, as results.json's ``size`` reports them for every run (uniform or mixed)."""
    table = layer_bit_table(qmodel)
    modules = dict(qmodel.named_modules())
    params = {n: modules[n].weight.numel() for n in table}
    macs = count_macs(qmodel, list(table), sample)
    total = sum(params.values())
    return {'size_mb': sum(params[n] * table[n][0] for n in table) / 8e6,
            'mean_w_bits': sum(params[n] * table[n][0] for n in table) / total if total else 0.0,
            'bops_g': sum(macs[n] * table[n][0] * (table[n][1] or 32) for n in table) / 1e9}


def pinned_layers(folded: nn.Module) -> List[str]:
    """The layers MQBench's academic backend keeps at 8-bit weights: those fed by the network input and the one
    whose output is the network's output (its ``_get_io_module`` rule)."""
    graph = fx.symbolic_trace(folded).graph
    pinned = [n.target for n in graph.nodes if n.op == 'call_module'
              and any(isinstance(a, fx.Node) and a.op == 'placeholder' for a in n.args)]
    pinned += [a.target for n in graph.nodes if n.op == 'output' for a in n.args
               if isinstance(a, fx.Node) and a.op == 'call_module']
    return pinned


def count_macs(qmodel: fx.GraphModule, layers: List[str], sample: torch.Tensor) -> Dict[str, int]:
    """Multiply-accumulates of every layer for one image: weights x output positions, from one forward pass."""
    modules = dict(qmodel.named_modules())
    macs, hooks = {}, []
    for name in layers:
        def hook(module, _, out, name=name):
            macs[name] = int(module.weight.numel() * (out[0].numel() // out.shape[1]))
        hooks.append(modules[name].register_forward_hook(hook))
    try:
        with torch.no_grad():
            qmodel(sample[:1].to(next(qmodel.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
    return macs


def search_space(model: nn.Module, cfg: Config, sample: torch.Tensor):
    """The prepared model (every quantizer off) and the ``Space`` of ``cfg``'s bit search."""
    from mrecg.preparation import prepare
    prepared = prepare(model, cfg)
    qmodel = prepared.qmodel
    disable_all(qmodel)
    layers = weight_layer_names(qmodel)
    rules = resolve_layer_bits(layers, cfg.quantize.layer_bits)
    fixed_w = {n for n, (w, _) in rules.items() if w is not None}
    fixed_a = {n for n, (_, a) in rules.items() if a is not None}
    pinned = set(pinned_layers(prepared.folded))
    searched = [n for n in layers if n not in pinned and n not in fixed_w]
    quantizers = input_quantizers(qmodel)
    feeds: Dict[str, List[str]] = {}
    if cfg.quantize.bit_search.candidates.a:
        for layer in layers:
            for q in quantizers.get(layer, []):
                feeds.setdefault(q, []).append(layer)
        blocked = {q for layer in layers for q in quantizers.get(layer, [])
                   if layer in pinned or layer in fixed_a or len(quantizers[layer]) > 1}
        feeds = {q: fed for q, fed in feeds.items() if q not in blocked}
    input_of = {layer: q for q, fed in feeds.items() for layer in fed}
    params = {n: dict(qmodel.named_modules())[n].weight.numel() for n in layers}
    space = Space(params, count_macs(qmodel, layers, sample), layer_bit_table(qmodel), searched, feeds, input_of)
    return qmodel, space


def build_problem(space: Space, budget_kind: str, budget: float, w_scores, a_scores) -> Problem:
    """The integer programme of an allocation: sensitivities to minimise, each choice's cost under the budget."""
    layers, quants = space.searched, list(space.feeds)
    p = Problem([w_scores[n] for n in layers], [a_scores[q] for q in quants],
                layer_costs=[{} for _ in layers], quant_costs=[{} for _ in quants])
    index = {n: i for i, n in enumerate(layers)}
    qindex = {q: j for j, q in enumerate(quants)}
    if budget_kind == 'avg_w_bits':
        p.layer_costs = [{b: space.params[n] * b for b in w_scores[n]} for n in layers]
        p.budget = budget * sum(space.params[n] for n in layers)
        return p
    if budget_kind == 'size_mb':
        p.layer_costs = [{b: space.params[n] * b for b in w_scores[n]} for n in layers]
        p.constant = sum(space.params[n] * space.bits[n][0] for n in space.params if n not in index)
        p.budget = budget * 8e6
        return p
    p.budget = budget * 1e9
    for n in space.params:  # bops: MACs x w x a, each factor searched or fixed
        i, j = index.get(n), qindex.get(space.input_of.get(n))
        w_fixed, a_fixed = space.bits[n][0], space.bits[n][1] or 32
        if i is not None and j is not None:
            p.pair_costs.append((i, j, {(w, a): space.macs[n] * w * a for w in w_scores[n]
                                        for a in a_scores[quants[j]]}))
        elif i is not None:
            p.layer_costs[i] = {w: space.macs[n] * w * a_fixed for w in w_scores[n]}
        elif j is not None:
            for a in a_scores[quants[j]]:
                p.quant_costs[j][a] = p.quant_costs[j].get(a, 0) + space.macs[n] * w_fixed * a
        else:
            p.constant += space.macs[n] * w_fixed * a_fixed
    return p


@dataclass
class BitAllocation:
    """The chosen bits and their figures (``results.json``'s ``bit_search``)."""
    budget: Dict[str, float]
    measure: str
    w_bits: Dict[str, int]  # searched layer -> weight bits
    a_bits: Dict[str, int]  # searched activation quantizer -> bits
    feeds: Dict[str, List[str]]  # searched activation quantizer -> the layers it feeds
    figures: Dict[str, float]  # avg_w_bits, size_mb, bops_g of the allocation
    uniform: Dict[str, float]  # the same figures with the config's uniform bits
    seconds: float = 0.0
    notes: List[str] = field(default_factory=list)

    def rules(self) -> List[LayerBits]:
        """As ``quantize.layer_bits`` entries (exact layer names)."""
        rules = [LayerBits(modules=[name], w_bit=w) for name, w in self.w_bits.items()]
        return rules + [LayerBits(modules=list(self.feeds[q]), a_bit=a) for q, a in self.a_bits.items()]

    def to_dict(self) -> Dict:
        return {**asdict(self), **self.figures}


def allocation_from_dict(d: Dict) -> BitAllocation:
    fields_ = {k: d[k] for k in ('budget', 'measure', 'w_bits', 'a_bits', 'feeds', 'figures', 'uniform',
                                 'seconds', 'notes')}
    return BitAllocation(**fields_)


def search_bits(model: nn.Module, cfg: Config, images: Optional[torch.Tensor], device: torch.device,
                sample: Optional[torch.Tensor] = None) -> BitAllocation:
    """The allocation of ``cfg.quantize.bit_search`` for ``model``: ``images`` are the calibration images (the
    data measures use the first ``samples``; None for the data-free ones, then ``sample`` sizes the graph)."""
    bs, t0 = cfg.quantize.bit_search, time.perf_counter()
    if bs.measure in DATA_MEASURES and images is None:
        raise UserError(f'quantize.bit_search.measure {bs.measure} needs calibration images; measure weight is '
                        'data-free')
    sample = images[:1] if images is not None else sample
    qmodel, space = search_space(copy.deepcopy(model).eval(), cfg, sample)
    qmodel.to(device)
    symmetric_w, symmetric_a = cfg.quantize.w_qconfig.symmetric, cfg.quantize.a_qconfig.symmetric
    batch = images[:bs.samples] if images is not None else None
    w_scores = sensitivity.layer_scores(bs.measure, qmodel, space.searched, bs.candidates.w, symmetric_w, batch,
                                        device, cfg.process.seed, cfg.data.batch_size)
    a_scores = {}
    if space.feeds and len(bs.candidates.a) == 1:  # one width: every searched input quantizer takes it, unranked
        a_scores = {q: {bs.candidates.a[0]: 0.0} for q in space.feeds}
    elif space.feeds:
        a_scores = (sensitivity.random_scores(list(space.feeds), bs.candidates.a, cfg.process.seed + 1)
                    if bs.measure == 'random' else sensitivity.activation_output_scores(
                        qmodel, list(space.feeds), bs.candidates.a, symmetric_a, batch, device, cfg.data.batch_size))
    problem = build_problem(space, bs.budget.kind, bs.budget.value, w_scores, a_scores)
    _check_cheapest(space, cfg, problem)
    w, a = solve(problem)
    alloc = BitAllocation({bs.budget.kind: bs.budget.value}, bs.measure, dict(zip(space.searched, w)),
                          dict(zip(space.feeds, a)), {q: list(f) for q, f in space.feeds.items()},
                          space.figures(dict(zip(space.searched, w)), dict(zip(space.feeds, a))),
                          space.figures({}, {}), notes=_notes(cfg, space, problem))
    alloc.figures['objective'] = objective(problem, w, a)
    alloc.seconds = time.perf_counter() - t0
    return alloc


def _notes(cfg: Config, space: Space, problem: Problem) -> List[str]:
    notes = []
    if not space.searched:
        notes.append('no layer can be searched: every conv/linear is fixed by the first/last-layer rule or layer_bits')
    if space.feeds and len(cfg.quantize.bit_search.candidates.a) == 1:
        notes.append(f'candidates.a has one width: every searched activation quantizer is set to '
                     f'{cfg.quantize.bit_search.candidates.a[0]} bits, not searched')
    elif space.feeds and cfg.quantize.bit_search.budget.kind != 'bops_g':
        notes.append(f'the budget {cfg.quantize.bit_search.budget.kind} does not count activation bits: every '
                     'searched activation quantizer takes its least sensitive candidate (bound them with bops_g)')
    return notes


def with_allocation(cfg: Config, alloc: BitAllocation) -> Config:
    """``cfg`` with the allocation appended to ``quantize.layer_bits`` (the search itself is done)."""
    return replace(cfg, quantize=replace(cfg.quantize, layer_bits=[*cfg.quantize.layer_bits, *alloc.rules()]))


def default_sample(model: nn.Module, cfg: Config) -> torch.Tensor:
    """A zero image of the size the config's data has (for sizing the graph without data): digits 8x8,
    Fashion-MNIST 28x28, else ``data.input_size``; channels from the model's first convolution."""
    side = {'digits': 8, 'fashion_mnist': 28}.get(cfg.data.type, cfg.data.input_size)
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return torch.zeros(1, first.in_channels if first is not None else 3, side, side)


def check_budget(model: nn.Module, cfg: Config, sample: torch.Tensor) -> None:
    """Before any heavy work: the budget admits at least the cheapest allocation (no data measure is run)."""
    bs = cfg.quantize.bit_search
    _, space = search_space(copy.deepcopy(model).eval(), cfg, sample)
    zeros = {n: {b: 0.0 for b in bs.candidates.w} for n in space.searched}
    a_zeros = {q: {b: 0.0 for b in bs.candidates.a} for q in space.feeds}
    _check_cheapest(space, cfg, build_problem(space, bs.budget.kind, bs.budget.value, zeros, a_zeros))


def _check_cheapest(space: Space, cfg: Config, problem: Problem) -> None:
    bs = cfg.quantize.bit_search
    low = cheapest(problem)
    if low > problem.budget:
        unit = {'avg_w_bits': sum(space.params[n] for n in space.searched), 'size_mb': 8e6, 'bops_g': 1e9}
        raise UserError(f'quantize.bit_search.budget.{bs.budget.kind} is {bs.budget.value:g} but the cheapest '
                        f'allocation the candidates allow needs {low / unit[bs.budget.kind]:.4g} (every searched layer '
                        f'at {min(bs.candidates.w)} bits): raise the budget or add smaller candidates')
