"""What a run of a config would do, without data or checkpoint: the ``--plan`` view (units, ModCap, the groups,
the layers at other bit-widths, a bit search's allocation). The layers below it: ``preparation`` (the prepared
model and its units), ``group_policy`` (the groups), ``bitsearch`` (mixed precision); their public names are
re-exported here.
"""
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch.nn as nn

from mrecg import capacity, grouping
from mrecg.config import PAPER_RULE, Config
from mrecg.errors import UserError
from mrecg.group_policy import (GroupingInfo, Span, check_k, choose_groups, default_k, scheme_spans,  # noqa: F401
                                solve_spans, validate_grouping)
from mrecg.preparation import Prepared, prepare  # noqa: F401 - re-exported (the census and tools use these names)
from mrecg.quantization import layer_bit_table
from mrecg.units import BaseUnit, groups_from_spans


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
    if cfg.model.quantize_part:  # the part's plan, its calibration inputs what it receives inside the network
        import torch
        from mrecg.parts import part_and_inputs
        model, calib_images = part_and_inputs(model, cfg.model.quantize_part, calib_images, cfg.data.batch_size,
                                              torch.device('cpu'))
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
