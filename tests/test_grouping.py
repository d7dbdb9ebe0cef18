"""MRECG grouping: the solver against brute force, ModCap by hand, explicit and published schemes."""
import itertools
import math
import random

import pytest
import torch.nn as nn

from mrecg import zoo
from mrecg import capacity, grouping
from mrecg.config import QuantizeConfig
from mrecg.quantization import prepare_model
from mrecg.units import BaseUnit, UnitPartition, groups_from_spans, model_base_units


def _runs_ok(chosen, max_group_size):
    """No run of consecutive chosen pairs longer than max_group_size - 1."""
    if max_group_size is None:
        return True
    run = best = 0
    prev = None
    for c in chosen:
        run = run + 1 if prev is not None and c == prev + 1 else 1
        best = max(best, run)
        prev = c
    return best <= max_group_size - 1


def brute_force(scores, k, lam=None, max_group_size=None):
    n = len(scores)
    if lam is not None:
        top = max(scores)
        scores = [s / top for s in scores] if top > 0 else scores
    best = None
    sizes = range(n + 1) if lam is not None else [k]
    for size in sizes:
        for chosen in itertools.combinations(range(n), size):
            if not _runs_ok(chosen, max_group_size):
                continue
            total = 0.0
            for c in chosen:
                total += scores[c]
            obj = total - (lam * (size - k) ** 2 if lam is not None else 0.0)
            key = (obj, -abs(size - k), tuple(-c for c in chosen))
            if best is None or key > best[0]:
                best = (key, list(chosen))
    return best[1] if best else None


@pytest.mark.parametrize('seed', range(25))
def test_solver_matches_brute_force(seed):
    rng = random.Random(seed)
    n_units = rng.randint(2, 9)
    metric = [rng.choice([rng.random() * 10, float(rng.randint(0, 3))]) for _ in range(n_units)]  # with ties
    scores = grouping.pair_scores(metric)
    for k in range(0, len(scores) + 1):
        for cap in (None, 2, 3):
            expected = brute_force(scores, k, None, cap)
            if expected is None:
                with pytest.raises(ValueError):
                    grouping.select_pairs(scores, k, None, cap)
            else:
                assert grouping.select_pairs(scores, k, None, cap) == expected
        for lam in (0.0, 0.3, 2.0):
            assert grouping.select_pairs(scores, k, lam, None) == brute_force(scores, k, lam, None)


def test_topk_picks_largest_differences_and_breaks_ties_early():
    metric = [1.0, 5.0, 5.0, 1.0, 1.0, 9.0]  # squared diffs: 16, 0, 16, 0, 64
    assert grouping.select_pairs(grouping.pair_scores(metric), 2) == [0, 4]
    assert grouping.select_pairs(grouping.pair_scores(metric), 3) == [0, 2, 4]
    assert grouping.select_pairs([1.0, 1.0, 1.0], 1) == [0]


def test_adjacent_pairs_chain_and_cap_splits_them():
    assert grouping.spans_from_pairs([2, 3, 5]) == [(2, 4), (5, 6)]
    scores = [10.0, 9.0, 8.0, 0.0]
    assert grouping.select_pairs(scores, 2) == [0, 1]                     # one group of 3 units
    assert grouping.select_pairs(scores, 2, max_group_size=2) == [0, 2]   # two groups of 2
    with pytest.raises(ValueError, match='at most 2 units'):
        grouping.select_pairs(scores, 3, max_group_size=2)
    with pytest.raises(ValueError, match='only 4 adjacent'):
        grouping.select_pairs(scores, 5)


def test_groups_cover_all_units():
    groups = groups_from_spans([(1, 2), (4, 6)], 8)
    assert [(g.first, g.last) for g in groups] == [(0, 0), (1, 2), (3, 3), (4, 6), (7, 7)]


class TinyNet(nn.Module):
    """Three units: a 3x3/1 conv, a 3x3/2 conv, a linear head; ModCap is easy to count by hand."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 4, 3, 1, 1)      # 36 weights, first layer -> 8 bit
        self.b = nn.Conv2d(4, 8, 3, 2, 1)      # 288 weights, stride 2 -> 3 bit x penalty
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)              # 40 weights, last layer -> 8 bit

    def forward(self, x):
        return self.fc(self.pool(self.b(self.a(x))).flatten(1))


def test_modcap_by_hand():
    settings = QuantizeConfig(w_qconfig={'bit': 3, 'p': 2.0}, a_qconfig={'bit': 4, 'p': 2.0})
    q = prepare_model(TinyNet().eval(), settings)
    units = [BaseUnit('a', ('a',)), BaseUnit('b', ('b',)), BaseUnit('head', ('pool', 'fc'))]
    part = UnitPartition.build(q, units)
    assert capacity.modcap(part, stride_penalty=0.5) == [36 * 8, 288 * 3 * 0.5, 40 * 8]
    assert capacity.modcap(part, stride_penalty=0.25) == [36 * 8, 288 * 3 * 0.25, 40 * 8]


@pytest.mark.parametrize('name', sorted(grouping.PUBLISHED_SCHEMES))
def test_published_schemes_by_name_reproduce_the_authors_index_schemes(name):
    """The authors' configs give their grouping by unit index, e.g. ResNet-18 [1, 2, (3, 3), (4, 4), ...]:
    our module-name schemes must select exactly the same units."""
    units = model_base_units(zoo.build_model(name))
    by_name = grouping.spans_from_scheme(grouping.PUBLISHED_SCHEMES[name], units)
    assert by_name == grouping.spans_from_authors_scheme(grouping.AUTHORS_SCHEME_STRINGS[name])


def test_resnet18_explicit_scheme_by_module_names():
    units = model_base_units(zoo.build_model('resnet18'))
    spans = grouping.spans_from_scheme([['layer1.1', 'layer2.0'], ['layer2.1', 'layer3.0']], units)
    groups = groups_from_spans(spans, len(units))
    assert [g.name(units) for g in groups] == ['stem', 'layer1.0', 'layer1.1+layer2.0', 'layer2.1+layer3.0',
                                                'layer3.1', 'layer4.0', 'layer4.1', 'classifier']
    # a submodule names the unit holding it
    assert grouping.spans_from_scheme([['layer1.1.conv2', 'layer2.0.downsample']], units) == [(2, 3)]


@pytest.mark.parametrize('scheme,message', [
    ([['layer1.1', 'layer3.0']], 'not adjacent'),
    ([['layer9.0', 'layer1.0']], "names 'layer9.0'"),
    ([['layer1.1', 'layer1.1.conv1']], 'single unit'),
    ([['layer1.0', 'layer1.1'], ['layer1.1', 'layer2.0']], 'overlaps'),
])
def test_bad_schemes_are_rejected(scheme, message):
    units = model_base_units(zoo.build_model('resnet18'))
    with pytest.raises(ValueError, match=message):
        grouping.spans_from_scheme(scheme, units)


# ---- the safe-grouping options --------------------------------------------------------------------------
def test_pair_scores_on_normalised_scales():
    metric = [1.0, 2.0, 200.0, 100.0]
    assert grouping.pair_scores(metric) == [1.0, 198.0 ** 2, 100.0 ** 2]
    assert grouping.pair_scores(metric, 'relative') == pytest.approx([0.25, (198 / 200) ** 2, 0.25])
    log2 = [math.log(2) ** 2, math.log(100) ** 2, math.log(2) ** 2]
    assert grouping.pair_scores(metric, 'log') == pytest.approx(log2)
    # the raw scale picks the large late pair, the log scale the first doubling as often as the last halving
    assert grouping.select_pairs(grouping.pair_scores(metric), 1) == [1]
    assert grouping.select_pairs(grouping.pair_scores(metric, 'log'), 2) == [0, 1]
    with pytest.raises(ValueError, match='difference must be one of'):
        grouping.pair_scores(metric, 'cubic')


def test_eligible_pairs_falls_and_classifier():
    metric = [3.0, 1.0, 4.0, 2.0, 5.0]  # falls at pairs 0 and 2
    assert grouping.eligible_pairs(metric) == [True] * 4
    assert grouping.eligible_pairs(metric, falls_only=True) == [True, False, True, False]
    assert grouping.eligible_pairs(metric, exclude_last=True) == [True, True, True, False]
    assert grouping.auto_k(metric, grouping.eligible_pairs(metric)) == 2
    assert grouping.auto_k([5.0, 4.0, 3.0], grouping.eligible_pairs([5.0, 4.0, 3.0], exclude_last=True)) == 1
    scores = grouping.pair_scores(metric)  # 4, 9, 4, 9: pairs 1 and 3 score highest but are rises
    assert grouping.select_pairs(scores, 2) == [1, 3]
    assert grouping.select_pairs(scores, 2, eligible=grouping.eligible_pairs(metric, falls_only=True)) == [0, 2]
    with pytest.raises(ValueError, match='only 2 of the 4'):
        grouping.select_pairs(scores, 3, eligible=[True, False, True, False])


@pytest.mark.parametrize('seed', range(10))
def test_solver_with_eligible_pairs_matches_brute_force(seed):
    rng = random.Random(100 + seed)
    scores = [rng.random() for _ in range(rng.randint(2, 7))]
    eligible = [rng.random() < 0.6 for _ in scores]
    masked = [s if ok else -1e9 for s, ok in zip(scores, eligible)]  # brute force: a forbidden pair never wins
    for k in range(sum(eligible) + 1):
        for cap in (None, 2):
            expected = brute_force(masked, k, None, cap)
            if expected is None or any(not eligible[i] for i in expected):
                with pytest.raises(ValueError):
                    grouping.select_pairs(scores, k, None, cap, eligible)
            else:
                assert grouping.select_pairs(scores, k, None, cap, eligible) == expected
