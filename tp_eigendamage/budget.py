"""Budgets: what a pruned model costs, and finding the pruning amount that meets a target.

Costs are counted with Torch-Pruning's counter on the model as it is, so KFE blocks are
charged for their rotation layers too (docs/method.md §6).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Tuple

import torch.nn as nn

from ._tp import count_ops_and_params
from .errors import TargetUnreachableError

__all__ = ["Cost", "measure_cost", "count_params", "search_ratio"]


@dataclass(frozen=True)
class Cost:
    """A model's parameters and FLOPs (multiply-accumulates)."""

    params: int
    flops: int

    def fraction_of(self, other: "Cost", metric: str) -> float:
        return getattr(self, metric) / getattr(other, metric)


def measure_cost(model: nn.Module, example_inputs) -> Cost:
    """Parameters and FLOPs (multiply-accumulates as Torch-Pruning counts them)."""
    flops, params = count_ops_and_params(model, example_inputs)
    return Cost(params=int(params), flops=int(flops))


def count_params(model: nn.Module) -> int:
    """The parameters :func:`measure_cost` counts (every parameter's size), without a forward."""
    return sum(p.numel() for p in model.parameters())


def search_ratio(achieved: Callable[[float], float], target: float, *, start: float,
                 exponent: float = 2.0, tolerance: float = 0.02, max_ratio: float = 0.999,
                 max_trials: int = 12) -> Tuple[float, float, float]:
    """Find a channel ratio ``r`` with ``|achieved(r) / target - 1| <= tolerance``.

    ``achieved(r)`` is the remaining fraction of the budget metric after pruning a fraction
    ``r`` of the channels; it does not increase with ``r`` and ``achieved(0) = start``. The
    search models ``achieved(r) ≈ start · (1 − r)^p``, a straight line in ``x = −log(1 − r)``,
    ``y = log achieved``: the first guess uses ``p = exponent`` (2 for channels pruned on both
    sides of every layer; pass the previous round's value). Until the target is bracketed, the
    line through the last two points is extrapolated (at most doubling ``x``: EigenDamage
    saves nothing until KFE bottlenecks start to pay, then a lot); then Illinois regula falsi,
    with bisection when a step would land next to a bracket end. Returns
    ``(r, achieved(r), p)`` with ``p`` the exponent the result implies (the next round's guess).
    """
    if abs(start / target - 1) <= tolerance:
        return 0.0, start, exponent
    if start < target:
        raise TargetUnreachableError(
            f"the model already costs {start:.3f} of the original before pruning this round, "
            f"below the target {target:.3f}")
    x_max, y_goal = -math.log1p(-max_ratio), math.log(target)
    lo, hi = (0.0, math.log(start) - y_goal), None   # (x, y − y_goal): above / below the goal
    previous, kept = lo, None
    best, closest = (0.0, start), {True: (0.0, start), False: None}   # nearest (r, f) above / below
    x = min(lo[1] / max(exponent, 1e-3), x_max)
    for _ in range(max_trials):
        r = -math.expm1(-x)
        f = achieved(r)
        if abs(f / target - 1) < abs(best[1] / target - 1):
            best = (r, f)
        side = closest[f > target]
        if side is None or (r > side[0] if f > target else r < side[0]):
            closest[f > target] = (r, f)
        if abs(f / target - 1) <= tolerance:
            return r, f, _exponent(start, r, f, exponent)
        if f > target and x >= x_max:
            raise TargetUnreachableError(
                f"the target {target:.3f} is out of reach: pruning as much as the per-layer caps "
                f"and ignored layers allow still leaves {f:.3f}; raise the target or max_layer_ratio")
        point = (x, math.log(f) - y_goal)
        if hi is None and point[1] > 0:           # still above: extrapolate the last two points
            slope = (point[1] - previous[1]) / (point[0] - previous[0])
            step = -point[1] / slope if slope < 0 else point[0]
            x = min(point[0] + min(max(step, 0.1 * point[0]), point[0]), x_max)
            previous = lo = point
            continue
        moved = "lo" if point[1] > 0 else "hi"
        if moved == "lo":
            lo = point
        else:
            hi = point
        if kept == moved:                         # Illinois: the other end went stale
            lo, hi = (lo, (hi[0], hi[1] / 2)) if moved == "lo" else ((lo[0], lo[1] / 2), hi)
        kept = moved
        if hi[0] - lo[0] < 1e-4:
            break
        secant = lo[0] + lo[1] * (hi[0] - lo[0]) / (lo[1] - hi[1])
        margin = 0.05 * (hi[0] - lo[0])
        x = secant if lo[0] + margin < secant < hi[0] - margin else 0.5 * (lo[0] + hi[0])
    (r_a, f_a), below = closest[True], closest[False]
    jump = (f" — the cost jumps from {f_a:.3f} (channel ratio {r_a:.4f}) to {below[1]:.3f} "
            f"(ratio {below[0]:.4f})" if below else "")
    raise TargetUnreachableError(
        f"could not land within {tolerance:.0%} of the target {target:.3f}{jump}; closest reached "
        f"{best[1]:.3f}. Many channels share one score or one step removes a large group: use a "
        "looser tolerance or another target, or a larger model or input")


def _exponent(start: float, r: float, f: float, default: float) -> float:
    """``p`` with ``f = start · (1 − r)^p`` (``default`` when ``r`` or the change is 0)."""
    if r <= 0 or f >= start:
        return default
    return math.log(f / start) / math.log1p(-r)
