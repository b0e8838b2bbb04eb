"""Mixing any Torch-Pruning ``Importance`` criteria: :class:`CombinedImportance`."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch_pruning as tp

from ._options import check_choice
from .errors import InvalidArgumentError

__all__ = ["CombinedImportance"]

COMBINE_NORMALIZERS = ("rank", "sum", None)


def _rank01(scores: torch.Tensor) -> torch.Tensor:
    """Ranks in ``[0, 1]`` (ties share their mean rank); a single channel gets 1."""
    n = scores.numel()
    if n == 1:
        return torch.ones_like(scores, dtype=torch.float64)
    order = scores.double().argsort()
    ranks = torch.empty(n, dtype=torch.float64, device=scores.device)
    ranks[order] = torch.arange(n, dtype=torch.float64, device=scores.device)
    uniq, inverse = torch.unique(scores, return_inverse=True)
    mean_rank = torch.zeros(len(uniq), dtype=torch.float64, device=scores.device).index_add_(0, inverse, ranks)
    mean_rank /= torch.bincount(inverse, minlength=len(uniq))
    return mean_rank[inverse] / (n - 1)


class CombinedImportance(tp.importance.Importance):
    """Weighted mix ``Σ_c w_c · norm(score_c)`` of any Torch-Pruning ``Importance`` objects.

    ``normalize``:

    * ``"rank"`` (default): each criterion's scores become their ranks within the group scaled
      to ``[0, 1]`` — criteria with unrelated units (loss, weight norms) mix on equal terms. A
      rank carries no information ACROSS groups, so with ``global_pruning=True`` every group
      gets the same score spread and loses about the same fraction of channels (like local
      pruning); let the pruner's ratios / caps set per-layer budgets.
    * ``"sum"``: each criterion divided by its sum over the group (shares, same caveat).
    * ``None``: raw weighted sum — for criteria that share a unit (EigenDamage, Kron-OBD,
      Kron-OBS and C-OBD are all in loss units), which keeps global ranking meaningful.

    Criteria returning ``None`` for a group (nothing they can score) are left out of that
    group; if every criterion skips it, the result is ``None``.
    """

    def __init__(self, criteria: Sequence[Tuple[tp.importance.Importance, float]], normalize="rank"):
        check_choice(normalize, "normalize", COMBINE_NORMALIZERS)
        criteria = list(criteria)
        if not criteria:
            raise InvalidArgumentError("CombinedImportance needs at least one (importance, weight) pair")
        for entry in criteria:
            if not (isinstance(entry, (tuple, list)) and len(entry) == 2):
                raise InvalidArgumentError(f"each criterion must be an (importance, weight) pair, "
                                           f"got {entry!r}")
            imp, weight = entry
            if not isinstance(imp, tp.importance.Importance):
                raise InvalidArgumentError(f"{type(imp).__name__} is not a torch_pruning Importance; "
                                           "wrap custom scores in a tp.importance.Importance subclass")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
                raise InvalidArgumentError(f"weight {weight!r} of {type(imp).__name__} must be a "
                                           "non-negative number")
        if not any(weight > 0 for _, weight in criteria):
            raise InvalidArgumentError("all weights are zero; give at least one criterion a "
                                       "positive weight")
        self.criteria, self.normalize = [(imp, float(w)) for imp, w in criteria], normalize

    def _norm(self, scores: torch.Tensor) -> torch.Tensor:
        if self.normalize == "rank":
            return _rank01(scores)
        scores = scores.double()
        if self.normalize == "sum":
            return scores / scores.sum().abs().clamp_min(torch.finfo(scores.dtype).tiny)
        return scores

    @torch.no_grad()
    def __call__(self, group) -> Optional[torch.Tensor]:
        total = None
        for imp, weight in self.criteria:
            scores = imp(group)
            if scores is None:
                continue
            scores = self._norm(scores.reshape(-1))
            if total is not None and scores.shape != total.shape:
                raise InvalidArgumentError(f"{type(imp).__name__} returned {scores.numel()} scores for a "
                                           f"group where another criterion returned {total.numel()}")
            total = weight * scores if total is None else total + weight * scores.to(total.device)
        return total
