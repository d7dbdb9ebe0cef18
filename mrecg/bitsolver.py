"""The exact bit allocation: each searched layer (and activation quantizer) gets one bit-width, the summed
sensitivity is the least possible, and the budget holds.

An integer linear programme, solved to optimality by HiGHS (``scipy.optimize.milp``): binary x[l, w] (layer l
at w bits) and y[q, a] (quantizer q at a bits), one choice each. Costs are integers (parameters x bits,
MACs x bits x bits), so the budget is checked exactly on the rounded solution. Under a BOPs budget a layer
whose weight and input bits are both searched costs MACs x w x a, which is bilinear; it gets its own binary
z[l, w, a] tied to x and y (sum_a z = x[l, w], sum_w z = y[q, a]), which keeps the programme linear and exact.
Why a programme and not the knapsack DP of the grouping solver: one activation quantizer feeds several layers
(the coupling above) and BOPs reach 10^11, too many states for a DP over costs.
"""
from dataclasses import dataclass, field
from itertools import product
from typing import Dict, List, Sequence, Tuple

import numpy as np

from mrecg.errors import UserError


@dataclass
class Problem:
    """Sensitivities and budget costs of one search. Layers and quantizers are numbered 0..n-1.

    ``layer_costs[l][w]`` / ``quant_costs[q][a]``: the budget cost of a choice that is linear in it;
    ``pair_costs``: (layer l, quantizer q, {(w, a): cost}) for layers whose cost is bilinear (BOPs, both
    searched); ``constant``: the cost of everything fixed. ``layer_scores``/``quant_scores`` are the
    sensitivities to minimise."""
    layer_scores: List[Dict[int, float]]
    quant_scores: List[Dict[int, float]] = field(default_factory=list)
    layer_costs: List[Dict[int, float]] = field(default_factory=list)
    quant_costs: List[Dict[int, float]] = field(default_factory=list)
    pair_costs: List[Tuple[int, int, Dict[Tuple[int, int], float]]] = field(default_factory=list)
    constant: float = 0.0
    budget: float = float('inf')


def cost(p: Problem, w: Sequence[int], a: Sequence[int]) -> float:
    """The budget cost of choosing ``w[l]`` bits for every layer and ``a[q]`` for every quantizer."""
    total = p.constant + sum(c[w[i]] for i, c in enumerate(p.layer_costs) if c)
    total += sum(c[a[j]] for j, c in enumerate(p.quant_costs) if c)
    return total + sum(c[(w[i], a[j])] for i, j, c in p.pair_costs)


def objective(p: Problem, w: Sequence[int], a: Sequence[int]) -> float:
    return sum(s[w[i]] for i, s in enumerate(p.layer_scores)) + sum(s[a[j]] for j, s in enumerate(p.quant_scores))


def cheapest(p: Problem) -> float:
    """The smallest cost any allocation can have: costs grow with every bit-width, so the fewest bits."""
    return cost(p, [min(s) for s in p.layer_scores], [min(s) for s in p.quant_scores])


class _Columns:
    """Column bookkeeping of the programme: one binary per (kind, index, choice)."""

    def __init__(self):
        self.index: Dict[tuple, int] = {}

    def add(self, key: tuple) -> int:
        self.index[key] = len(self.index)
        return self.index[key]


def solve(p: Problem) -> Tuple[List[int], List[int]]:
    """The exact optimum (bits per layer, bits per quantizer); ``UserError`` when the budget is below the
    cheapest allocation."""
    low = cheapest(p)
    if low > p.budget:
        raise UserError(f'the budget ({p.budget:.6g}) is below the cheapest allocation the candidates allow '
                        f'({low:.6g}, every searched layer at its fewest bits): raise it or add smaller candidates')
    budget = p.budget
    for _ in range(4):  # HiGHS's tolerances may let a solution pass the budget by a hair: tighten and solve again
        w, a = _solve_once(p, budget)
        over = cost(p, w, a) - p.budget
        if over <= 0:
            return w, a
        budget -= over
    raise UserError('the bit allocation could not be solved within the budget (numerical trouble): '
                    'loosen the budget slightly')


def _solve_once(p: Problem, budget: float) -> Tuple[List[int], List[int]]:
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import lil_matrix
    cols = _Columns()
    x = [{b: cols.add(('x', i, b)) for b in sorted(s)} for i, s in enumerate(p.layer_scores)]
    y = [{b: cols.add(('y', j, b)) for b in sorted(s)} for j, s in enumerate(p.quant_scores)]
    z = [{(wb, ab): cols.add(('z', k, wb, ab)) for wb, ab in product(x[i], y[j])} for k, (i, j, _) in
         enumerate(p.pair_costs)]
    n = len(cols.index)
    scale = max([abs(v) for s in p.layer_scores + p.quant_scores for v in s.values()] + [1e-300])
    c = np.zeros(n)
    for i, s in enumerate(p.layer_scores):
        for b, v in s.items():
            c[x[i][b]] = v / scale
    for j, s in enumerate(p.quant_scores):
        for b, v in s.items():
            c[y[j][b]] = v / scale
    rows: List[Tuple[Dict[int, float], float, float]] = []
    rows += [({col: 1.0 for col in choice.values()}, 1.0, 1.0) for choice in x + y]  # one choice each
    for k, (i, j, _) in enumerate(p.pair_costs):  # z[l, w, a] = x[l, w] * y[q, a]
        rows += [({**{z[k][(wb, ab)]: 1.0 for ab in y[j]}, x[i][wb]: -1.0}, 0.0, 0.0) for wb in x[i]]
        rows += [({**{z[k][(wb, ab)]: 1.0 for wb in x[i]}, y[j][ab]: -1.0}, 0.0, 0.0) for ab in y[j]]
    spend: Dict[int, float] = {}
    for i, costs in enumerate(p.layer_costs):
        for b, v in (costs or {}).items():
            spend[x[i][b]] = spend.get(x[i][b], 0.0) + v
    for j, costs in enumerate(p.quant_costs):
        for b, v in (costs or {}).items():
            spend[y[j][b]] = spend.get(y[j][b], 0.0) + v
    for k, (_, _, costs) in enumerate(p.pair_costs):
        for key, v in costs.items():
            spend[z[k][key]] = v
    if spend:
        rows.append((spend, -np.inf, budget - p.constant))
    matrix = lil_matrix((len(rows), n))
    for r, (coeffs, _, _) in enumerate(rows):
        for col, v in coeffs.items():
            matrix[r, col] = v
    lo, hi = np.array([r[1] for r in rows]), np.array([r[2] for r in rows])
    res = milp(c, constraints=LinearConstraint(matrix.tocsr(), lo, hi), integrality=np.ones(n),
               bounds=Bounds(0, 1), options={'mip_rel_gap': 0.0, 'presolve': True})
    if res.x is None:
        raise UserError(f'no bit allocation fits the budget ({p.budget:.6g}): {res.message}')
    chosen = np.round(res.x).astype(int)
    pick = lambda choice: next(b for b, col in choice.items() if chosen[col] == 1)  # noqa: E731
    return [pick(choice) for choice in x], [pick(choice) for choice in y]
