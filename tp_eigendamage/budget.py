"""Budgets: what a pruned model costs, and finding the pruning amount that meets a target.

Costs are counted with ``torch_pruning.utils.count_ops_and_params`` on the model as it is, so
KFE blocks are charged for their rotation layers too (MATH.md §4).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Tuple

import torch.nn as nn
import torch_pruning as tp


@dataclass(frozen=True)
class Cost:
    params: int
    flops: int

    def fraction_of(self, other: "Cost", metric: str) -> float:
        return getattr(self, metric) / getattr(other, metric)


def measure_cost(model: nn.Module, example_inputs) -> Cost:
    """Parameters and FLOPs (multiply-accumulates as Torch-Pruning counts them)."""
    flops, params = tp.utils.count_ops_and_params(model, example_inputs)
    return Cost(params=int(params), flops=int(flops))


class TargetUnreachableError(RuntimeError):
    """No pruning amount within the per-layer caps meets the target."""


def search_ratio(achieved: Callable[[float], float], target: float, *, tolerance: float = 0.02,
                 max_ratio: float = 0.999, max_trials: int = 14) -> Tuple[float, float]:
    """Find a channel ratio ``r`` with ``|achieved(r) / target - 1| <= tolerance``.

    ``achieved(r)`` is the remaining fraction of the budget metric after pruning a fraction
    ``r`` of the channels; it does not increase with ``r``. Bracketed secant steps (regula
    falsi with bisection fallback) on ``[0, max_ratio]``; returns ``(r, achieved(r))``.
    """
    lo, f_lo = 0.0, achieved(0.0)
    if abs(f_lo / target - 1) <= tolerance:
        return lo, f_lo
    if f_lo < target:
        raise TargetUnreachableError(
            f"the model already costs {f_lo:.3f} of the original before pruning this round, "
            f"below the target {target:.3f}")
    hi, f_hi = max_ratio, achieved(max_ratio)
    if f_hi > target * (1 + tolerance):
        raise TargetUnreachableError(
            f"the target {target:.3f} is out of reach: pruning as much as the per-layer caps and "
            f"ignored layers allow still leaves {f_hi:.3f}; raise the target or max_layer_ratio")
    best = (hi, f_hi)
    r = 1 - math.sqrt(target) if 0 < 1 - math.sqrt(target) < max_ratio else 0.5 * max_ratio
    for _ in range(max_trials):
        f = achieved(r)
        if abs(f / target - 1) < abs(best[1] / target - 1):
            best = (r, f)
        if abs(f / target - 1) <= tolerance:
            return r, f
        if f > target:
            lo, f_lo = r, f
        else:
            hi, f_hi = r, f
        secant = lo + (f_lo - target) * (hi - lo) / max(f_lo - f_hi, 1e-12)
        bisect = 0.5 * (lo + hi)
        r = secant if lo + 0.05 * (hi - lo) < secant < hi - 0.05 * (hi - lo) else bisect
    if abs(best[1] / target - 1) <= tolerance:
        return best
    raise TargetUnreachableError(
        f"could not land within {tolerance:.0%} of the target {target:.3f}; closest reached "
        f"{best[1]:.3f} (channel granularity too coarse: use a larger model or input, or a "
        "looser target)")
