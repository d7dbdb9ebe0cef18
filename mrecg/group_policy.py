"""Which adjacent base units are reconstructed jointly: MRECG's groups from the config (an explicit or the
published scheme, ModCap, or the plain run's losses), with the default k and the checks a run makes before any
work. ``grouping`` holds the solver; this module turns a config into its input and its answer.
"""
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from mrecg import capacity, grouping
from mrecg.config import DEFAULT_K, Config
from mrecg.errors import UserError
from mrecg.preparation import Prepared
from mrecg.units import BaseUnit, UnitPartition

Span = Tuple[int, int]


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
