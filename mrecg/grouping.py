"""Which adjacent units MRECG reconstructs jointly.

Given a metric CM_1..CM_L over the base units (ModCap, or the per-unit loss of a plain run), the pair
(l, l+1) scores d_l = (CM_l - CM_{l+1})^2. We merge the k pairs with the largest scores (the paper's
objective with its constraint sum(m) = k), exactly, by dynamic programming so that an optional cap on the
group size can be honoured. With ``lam`` set we instead maximise  sum_l d_l m_l - lam * (sum(m) - k)^2
over d normalised to a maximum of 1, which lets the count drift from k when the scores say so. Chosen
pairs that touch chain into larger groups. Ties break towards the earlier pair, so the result is
deterministic.

Options that make the computed grouping safer (measured in README, "Safe automatic grouping"; the config's
defaults are the measured safe setting, ``mrecg.difference: log`` and ``exclude_classifier: true``, and the
paper's rule is ``difference: squared``, ``exclude_classifier: false``). ``difference``: the pair score on the
raw scale (the paper), relative to the larger of the two, or of the logarithms (scale-free: ModCap grows with
width, losses with the logits' size).
``eligible_pairs``: every pair, or only where the metric falls (CM_l > CM_{l+1}, the oscillation itself),
optionally without the last unit (the classifier's, which the authors never merge). ``auto_k``: one merged
pair per fall among the eligible pairs.

Groups can also be given explicitly by module names (``mrecg.scheme``); the authors' published schemes
ship as ``PUBLISHED_SCHEMES`` (``mrecg.scheme: authors``).
"""
import ast
import math
from typing import Dict, List, Optional, Sequence, Tuple

from mrecg.units import BaseUnit, module_owner

# The authors' release (configs/*/..._2_4.yaml, the same for every bit-width and method), by module name.
PUBLISHED_SCHEMES: Dict[str, List[List[str]]] = {
    'resnet18': [['layer1.1', 'layer2.0'], ['layer2.1', 'layer3.0']],
    'resnet50': [['layer1.2', 'layer2.0'], ['layer2.3', 'layer3.0', 'layer3.1'], ['layer3.5', 'layer4.0']],
    'regnetx_600m': [['s2.b3', 's3.b1', 's3.b2'], ['s3.b5', 's4.b1'], ['s4.b6', 's4.b7']],
    'mobilenet_v2': [['features.3', 'features.4'], ['features.6', 'features.7'],
                     ['features.9', 'features.10', 'features.11'], ['features.12', 'features.13', 'features.14'],
                     ['features.16', 'features.17']],
}
# The same schemes as the authors wrote them: entry i is the group of the i-th plain unit.
AUTHORS_SCHEME_STRINGS = {
    'resnet18': '[1, 2, (3, 3), (4, 4), 5, 6, 7, 8]',
    'resnet50': '[1, 2, 3, (4, 4), 5, 6, (7, 7, 7), 8, 9, 10, (11, 11), 12, 13, 14]',
    'regnetx_600m': '[1, 2, 3, 4, (5, 5, 5), 6, 7, (8, 8), 9, 10, 11, 12, (13, 13), 14]',
    'mobilenet_v2': '[1, 2, (3, 3), 4, (5, 5), 6, (7, 7, 7), (8, 8, 8), 9, (10, 10), 11]',
}

Span = Tuple[int, int]


DIFFERENCES = ('squared', 'relative', 'log')


def pair_scores(metric: Sequence[float], difference: str = 'squared') -> List[float]:
    """d_l for every adjacent pair: (a - b)^2 (the paper), ((a - b) / max(|a|, |b|))^2, or (ln a - ln b)^2."""
    if difference not in DIFFERENCES:
        raise ValueError(f'difference must be one of {", ".join(DIFFERENCES)}, got {difference!r}')
    tiny = 1e-12
    scores = []
    for a, b in zip(metric[:-1], metric[1:]):
        if difference == 'relative':
            scores.append(((a - b) / max(abs(a), abs(b), tiny)) ** 2)
        elif difference == 'log':
            scores.append((math.log(max(a, tiny)) - math.log(max(b, tiny))) ** 2)
        else:
            scores.append((a - b) ** 2)
    return scores


def eligible_pairs(metric: Sequence[float], falls_only: bool = False, exclude_last: bool = False) -> List[bool]:
    """Which pairs (l, l+1) may merge: all, or only falls of the metric; never the last pair if excluded."""
    n = len(metric) - 1
    return [(not falls_only or metric[i] > metric[i + 1]) and not (exclude_last and i == n - 1) for i in range(n)]


def auto_k(metric: Sequence[float], eligible: Sequence[bool]) -> int:
    """``k: auto``: one merged pair per fall of the metric curve among the eligible pairs."""
    return sum(1 for i, ok in enumerate(eligible) if ok and metric[i] > metric[i + 1])


def _better(score: float, chosen: Tuple[int, ...], best: Optional[Tuple[float, Tuple[int, ...]]]) -> bool:
    return best is None or score > best[0] or (score == best[0] and chosen < best[1])


def select_pairs(scores: Sequence[float], k: int, lam: Optional[float] = None,
                 max_group_size: Optional[int] = None, eligible: Optional[Sequence[bool]] = None) -> List[int]:
    """Indices l of the pairs (l, l+1) to merge, among the ``eligible`` ones (default: all).
    Exact: a DP over (pairs chosen, current run length)."""
    n = len(scores)
    eligible = [True] * n if eligible is None else list(eligible)
    if lam is None and k > n:
        raise ValueError(f'k = {k} but there are only {n} adjacent unit pairs')
    if lam is None and k > sum(eligible):
        raise ValueError(f'k = {k} but only {sum(eligible)} of the {n} adjacent unit pairs may merge')
    if lam is not None:
        top = max(scores, default=0.0)
        scores = [s / top for s in scores] if top > 0 else list(scores)
    max_run = n if max_group_size is None else max_group_size - 1
    states: Dict[Tuple[int, int], Tuple[float, Tuple[int, ...]]] = {(0, 0): (0.0, ())}
    for i, s in enumerate(scores):
        nxt: Dict[Tuple[int, int], Tuple[float, Tuple[int, ...]]] = {}
        for (count, run), (score, chosen) in states.items():
            moves = [((count, 0), (score, chosen))]
            if eligible[i]:
                moves.append(((count + 1, run + 1), (score + s, chosen + (i,))))
            for key, cand in moves:
                if key[1] <= max_run and _better(cand[0], cand[1], nxt.get(key)):
                    nxt[key] = cand
        states = nxt
    by_count: Dict[int, Tuple[float, Tuple[int, ...]]] = {}
    for (count, _), (score, chosen) in states.items():
        if _better(score, chosen, by_count.get(count)):
            by_count[count] = (score, chosen)
    if lam is None:
        if k not in by_count:
            raise ValueError(f'cannot merge {k} pairs when groups may hold at most {max_group_size} units')
        return list(by_count[k][1])
    best = max(by_count.items(), key=lambda kv: (kv[1][0] - lam * (kv[0] - k) ** 2, -abs(kv[0] - k),
                                                   tuple(-c for c in kv[1][1])))
    return list(best[1][1])


def spans_from_pairs(pairs: Sequence[int]) -> List[Span]:
    """Chain merged pairs into spans (first, last) of units: pairs 2 and 3 give the span (2, 4)."""
    spans: List[Span] = []
    for p in sorted(pairs):
        if spans and spans[-1][1] == p:
            spans[-1] = (spans[-1][0], p + 1)
        else:
            spans.append((p, p + 1))
    return spans


def spans_from_scheme(scheme: Sequence[Sequence[str]], units: List[BaseUnit]) -> List[Span]:
    """Explicit groups by unit or module names -> spans. Names must exist and each group be adjacent."""
    by_module = {m: i for i, u in enumerate(units) for m in u.modules}
    by_name = {u.name: i for i, u in enumerate(units)}
    spans: List[Span] = []
    used = set()
    for group in scheme:
        idx = []
        for name in group:
            i = by_name.get(name)
            if i is None:
                i = module_owner(name, by_module)
            if i is None:
                raise ValueError(f'mrecg.scheme names {name!r}, which is neither a unit nor a module in one '
                                 f'(units: {", ".join(u.name for u in units)})')
            idx.append(i)
        first, last = min(idx), max(idx)
        if sorted(set(idx)) != list(range(first, last + 1)):
            raise ValueError(f'mrecg.scheme group {list(group)} is not adjacent: units '
                             f'{", ".join(units[i].name for i in range(first, last + 1))} lie between')
        if first == last:
            raise ValueError(f'mrecg.scheme group {list(group)} covers a single unit; a group needs two or more')
        if used & set(range(first, last + 1)):
            raise ValueError(f'mrecg.scheme group {list(group)} overlaps another group')
        used |= set(range(first, last + 1))
        spans.append((first, last))
    return sorted(spans)


def spans_from_authors_scheme(text: str) -> List[Span]:
    """Decode the authors' index form, e.g. ``[1, 2, (3, 3), 4]`` (parsed as a literal, never evaluated)."""
    spans, unit = [], 0
    for entry in ast.literal_eval(text):
        size = len(entry) if isinstance(entry, tuple) else 1
        if size > 1:
            spans.append((unit, unit + size - 1))
        unit += size
    return spans


def merged_pairs(spans: Sequence[Span]) -> int:
    return sum(last - first for first, last in spans)
