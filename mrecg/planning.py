"""From a model and a config to its reconstruction plan: the prepared model, its base units, MRECG's groups.

``prepare`` folds BN, inserts MQBench's quantizers, applies per-layer bits and lays the base units over the
graph (the model's own ``unit_partition``, ``model.units``, or the generic rule of ``units.join_forks``).
``choose_groups`` decides which adjacent units are reconstructed jointly. ``plan`` is what ``--plan``
prints: data-free, no calibration needed.
"""
import copy
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch.fx as fx
import torch.nn as nn

from mrecg import capacity, grouping
from mrecg.config import DEFAULT_K, PAPER_RULE, Config
from mrecg.errors import UserError
from mrecg.quantization import fold_bn, layer_bit_table, prepare_model
from mrecg.units import (BaseUnit, UnitPartition, called_only, groups_from_spans, is_generic, join_forks,
                         layer_base_units, model_base_units, modules_with_own_ops)

Span = Tuple[int, int]


@dataclass
class Prepared:
    """A model ready for calibration: the BN-folded float copy, its MQBench-prepared twin and the units."""
    folded: nn.Module
    qmodel: fx.GraphModule
    partition: UnitPartition
    bn_folded: int
    generic_units: bool

    @property
    def units(self) -> List[BaseUnit]:
        return self.partition.units


def prepare(model: nn.Module, cfg: Config) -> Prepared:
    """Fold (if asked), quantize-prepare and partition a copy of ``model``; the original is not touched."""
    folded = copy.deepcopy(model).eval()
    n_folded = fold_bn(folded) if cfg.quantize.fold_bn else 0
    qmodel = prepare_model(folded, cfg.quantize)
    generic = cfg.quantize.reconstruction.granularity == 'block' and is_generic(folded, cfg.model.units)
    try:
        if cfg.quantize.reconstruction.granularity == 'layer':
            units = layer_base_units(qmodel)
        else:
            units = model_base_units(folded, cfg.model.units, modules_with_own_ops(qmodel) if generic else None)
            if generic:
                units = join_forks(qmodel, called_only(qmodel, units))
        partition = UnitPartition.build(qmodel, units, cfg.quantize.reconstruction.head_ops)
    except ValueError as exc:
        raise UserError(f'model.units: {exc}') from None
    return Prepared(folded, qmodel, partition, n_folded, generic)


@dataclass
class GroupingInfo:
    """Which base units are reconstructed jointly, and why."""
    metric: str
    k: int
    lam: Optional[float]
    max_group_size: Optional[int]
    source: str = 'none'
    spans: List[List[int]] = field(default_factory=list)
    groups: List[List[str]] = field(default_factory=list)
    metric_values: Optional[List[float]] = None
    plain_unit_losses: Optional[List[float]] = None
    options: Dict[str, Any] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)


def scheme_spans(cfg: Config, units: List[BaseUnit]) -> List[Span]:
    scheme = cfg.mrecg.scheme
    if scheme == 'authors':
        if cfg.model.type not in grouping.PUBLISHED_SCHEMES:
            raise UserError(f"mrecg.scheme: authors has no published grouping for {cfg.model.type or 'this model'} "
                            f"(published: {', '.join(grouping.PUBLISHED_SCHEMES)})")
        scheme = grouping.PUBLISHED_SCHEMES[cfg.model.type]
    try:
        return grouping.spans_from_scheme(scheme, units)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def solve_spans(cfg: Config, metric: Sequence[float], info: Optional[GroupingInfo] = None) -> List[Span]:
    """The paper's top-k solver under the configured score, eligible pairs and k (``auto``: one per fall).
    When only falls may merge and the curve has fewer than k, every fall merges (noted in ``info``)."""
    m = cfg.mrecg
    eligible = grouping.eligible_pairs(metric, m.pairs == 'falls', m.exclude_classifier)
    k = grouping.auto_k(metric, eligible) if m.k == 'auto' else default_k(m, sum(eligible), info) if m.k is None \
        else m.k
    if m.pairs == 'falls' and m.lam is None and k > sum(eligible):
        if info is not None:
            info.notes.append(f'mrecg.k is {k} but the metric falls at only {sum(eligible)} eligible pairs: '
                              f'merged those')
        k = sum(eligible)
    try:
        pairs = grouping.select_pairs(grouping.pair_scores(metric, m.difference), k, m.lam, m.max_group_size,
                                      eligible)
    except ValueError as exc:
        raise UserError(f'mrecg: {exc}') from None
    return grouping.spans_from_pairs(pairs)


def default_k(m, eligible: int, info: Optional[GroupingInfo]) -> int:
    """``mrecg.k: null``: the measured setting's k, or every eligible pair of a model that has fewer (noted)."""
    if eligible < DEFAULT_K and info is not None:
        info.notes.append(f'the default k ({DEFAULT_K}) is more than the {eligible} pairs this model may merge: '
                          f'merged {eligible}')
    return min(DEFAULT_K, eligible)


def check_k(cfg: Config, num_units: int) -> None:
    m = cfg.mrecg
    if m.metric == 'none' or m.k in ('auto', None):
        return
    pairs = num_units - 1 - (1 if m.exclude_classifier else 0)
    if m.k > pairs:
        why = ' (the classifier\'s pair excluded)' if m.exclude_classifier else ''
        raise UserError(f'mrecg.k is {m.k} but {cfg.model.type or "the model"} has {num_units} units, '
                        f'so at most {pairs} adjacent pairs can merge{why}')


def validate_grouping(cfg: Config, prepared: Prepared) -> None:
    """Before any heavy work: an explicit scheme, and k (with the group-size cap), must fit the units."""
    n = len(prepared.units)
    if cfg.mrecg.scheme:
        scheme_spans(cfg, prepared.units)
    elif cfg.mrecg.metric != 'none' and cfg.mrecg.k != 'auto':
        check_k(cfg, n)
        feasible = replace(cfg.mrecg, pairs='all')  # whether the metric falls is known only later
        solve_spans(replace(cfg, mrecg=feasible), [float(n - i) for i in range(n)])  # k under max_group_size


def choose_groups(cfg: Config, partition: UnitPartition, loss_metric: Callable[[], List[float]]) -> GroupingInfo:
    """Decide the groups; ``loss_metric()`` supplies the loss metric lazily (it may run the probe)."""
    m, units = cfg.mrecg, partition.units
    info = GroupingInfo(m.metric, m.k, m.lam, m.max_group_size,
                        options={k: getattr(m, k) for k in ('k', 'difference', 'pairs', 'exclude_classifier',
                                                            'group_iterations')})
    info.notes.extend(m.ignored())
    spans: List[Span] = []
    if m.scheme:
        spans = scheme_spans(cfg, units)
        info.source = 'published scheme' if m.scheme == 'authors' else 'explicit scheme'
        info.k = grouping.merged_pairs(spans)
    elif m.metric == 'modcap':
        check_k(cfg, len(units))
        info.metric_values = capacity.modcap(partition, m.stride_penalty)
        spans, info.source = solve_spans(cfg, info.metric_values, info), 'modcap solver'
    elif m.metric == 'loss':
        check_k(cfg, len(units))
        info.metric_values = info.plain_unit_losses = loss_metric()
        spans, info.source = solve_spans(cfg, info.metric_values, info), 'loss solver'
    if m.k in ('auto', None) or info.notes:  # the count the metric (or the default) decided
        info.k = grouping.merged_pairs(spans)
        info.options['k'] = m.k if m.k == 'auto' else info.k
    info.spans = [list(s) for s in spans]
    info.groups = [[u.name for u in units[a:b + 1]] for a, b in spans]
    return info


# ---- --plan ----------------------------------------------------------------------------------------------
@dataclass
class Plan:
    """What a run would do, without data: units, their ModCap (and cached probe losses), the groups, bits."""
    label: str
    cfg: Config
    units: List[BaseUnit]
    modcap: List[float]
    losses: Optional[List[float]]
    info: GroupingInfo
    layer_bits: Dict[str, Tuple[int, Optional[int]]]
    generic_units: bool
    allocation: Any = None  # mrecg.bitsearch.BitAllocation when the config searches bits

    def __str__(self) -> str:
        return render_plan(self)


def plan(model: nn.Module, cfg: Config, cached_losses=None, calib_images=None) -> Plan:
    """The plan of quantizing ``model`` with ``cfg``. With ``mrecg.metric: loss`` the probe losses must be
    given (``cached_losses``: a list, or a function of the unit names): a plan never runs the probe. With
    ``quantize.bit_search`` the allocation is searched (on the CPU); its data measures need ``calib_images``
    (a tensor of calibration images), the data-free one (``measure: weight``) does not."""
    allocation = None
    if cfg.quantize.bit_search:
        import torch
        from mrecg.bitsearch import default_sample, search_bits, with_allocation
        allocation = search_bits(model, cfg, calib_images, torch.device('cpu'), default_sample(model, cfg))
        cfg = with_allocation(cfg, allocation)
    prepared = prepare(model, cfg)
    if callable(cached_losses):
        cached_losses = cached_losses([u.name for u in prepared.units])
    caps = capacity.modcap(prepared.partition, cfg.mrecg.stride_penalty)

    def loss_metric():
        if cached_losses is None:
            raise UserError('mrecg.metric loss needs the per-unit losses of a plain probe run, and none is cached '
                            f'in {cfg.process.cache_dir} for this config: run without --plan once (it caches them)')
        return cached_losses

    info = choose_groups(cfg, prepared.partition, loss_metric)
    label = cfg.model.type or type(model).__name__
    return Plan(label, cfg, prepared.units, caps, cached_losses, info, layer_bit_table(prepared.qmodel),
                prepared.generic_units, allocation)


def render_plan(p: Plan) -> str:
    cfg, units, info = p.cfg, p.units, p.info
    names = [u.name for u in units]
    spans = [tuple(s) for s in info.spans]
    in_group = {i: gi for gi, (a, b) in enumerate(spans) for i in range(a, b + 1)}
    scores = grouping.pair_scores(info.metric_values or p.modcap, cfg.mrecg.difference)
    kwargs = f' {cfg.model.kwargs}' if cfg.model.kwargs else ''
    rule = ' (graph rule: a unit ends only where one tensor flows on)' if p.generic_units else ''
    lines = [f'model {p.label}{kwargs}: {len(units)} base units{rule}, '
             f'W{cfg.quantize.w_qconfig.bit}A{cfg.quantize.a_qconfig.bit}, BN folded: {cfg.quantize.fold_bn}, '
             f'method {cfg.method}',
             f'grouping: {info.source}, k = {info.k}' + (f', lambda = {info.lam}' if info.lam else '')
             + (f', max group size {info.max_group_size}' if info.max_group_size else '')
             + (' (auto: one per fall)' if cfg.mrecg.k == 'auto' else '') + option_text(cfg),
             f'ModCap = sum(params x weight bits x {cfg.mrecg.stride_penalty} if stride > 1 else 1)', '',
             f'{"#":>3}  {"unit":<26} {"ModCap":>12} {"loss":>10} {"d(next)":>10}  group  modules']
    for i, u in enumerate(units):
        loss = f'{p.losses[i]:10.4g}' if p.losses else f'{"-":>10}'
        d = f'{scores[i]:10.3g}' if i < len(scores) else f'{"":>10}'
        g = f'G{in_group[i] + 1}' if i in in_group else ''
        lines.append(f'{i:>3}  {u.name:<26} {p.modcap[i]:12.4g} {loss} {d}  {g:<5}  {",".join(u.modules)}')
    groups = groups_from_spans(spans, len(units))
    lines += ['', f'reconstruction units ({len(units)} -> {len(groups)}): '
              + ' | '.join(g.name(units) if g.first == g.last else f'[{g.name(units)}]' for g in groups)]
    lines += [f'note: {n}' for n in info.notes]
    lines += allocation_lines(p.allocation) + bit_lines(cfg, p.layer_bits)
    if cfg.model.type in grouping.PUBLISHED_SCHEMES and cfg.quantize.reconstruction.granularity == 'block':
        try:
            pub = grouping.spans_from_scheme(grouping.PUBLISHED_SCHEMES[cfg.model.type], units)
            lines.append('authors\' published groups: ' + ' | '.join('+'.join(names[a:b + 1]) for a, b in pub))
        except ValueError:
            pass
    return '\n'.join(lines)


def option_text(cfg: Config) -> str:
    """The grouping options that differ from the paper's rule, as ', key value' text."""
    m = cfg.mrecg
    return ''.join(f', {k} {getattr(m, k)}' for k, paper in PAPER_RULE.items() if getattr(m, k) != paper)


def allocation_lines(allocation) -> List[str]:
    """The bit search's summary: budget, measure, the allocation's figures against uniform bits."""
    if allocation is None:
        return []
    f, u = allocation.figures, allocation.uniform
    (kind, value), = allocation.budget.items()
    hist = {}
    for w in allocation.w_bits.values():
        hist[w] = hist.get(w, 0) + 1
    return [f'bit search: budget {kind} {value:g}, measure {allocation.measure}, {len(allocation.w_bits)} layers '
            f'searched ({", ".join(f"{n} at W{b}" for b, n in sorted(hist.items()))}'
            + (f'; {len(allocation.a_bits)} activation quantizers' if allocation.a_bits else '') + ')',
            f'  allocation: avg {f["avg_w_bits"]:.3f} weight bits, {f["size_mb"]:.4g} MB, {f["bops_g"]:.4g} GBOPs '
            f'(uniform config bits: avg {u["avg_w_bits"]:.3f}, {u["size_mb"]:.4g} MB, {u["bops_g"]:.4g} GBOPs); '
            f'searched in {allocation.seconds:.1f} s']


def bit_lines(cfg: Config, table: Dict[str, Tuple[int, Optional[int]]]) -> List[str]:
    """Layers whose bits differ from the config's W/A (the 8-bit first/last layers, ``layer_bits``)."""
    w, a = cfg.quantize.w_qconfig.bit, cfg.quantize.a_qconfig.bit
    odd = [f'{name} W{wb}A{ab if ab is not None else "-"}' for name, (wb, ab) in table.items()
           if wb != w or (ab is not None and ab != a)]
    return [f'layers at other bit-widths ({len(odd)} of {len(table)}): ' + (', '.join(odd) or 'none')]
