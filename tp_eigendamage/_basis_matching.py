"""Recovering which stored basis rows and columns a pruned rotation still holds.

Torch-Pruning removes rows and columns of a KFE block's rotation layers without knowing the
bases the block stores. As long as a rotation's weights are unchanged since the block was
built, every surviving entry is an exact copy of a basis entry, so the surviving rows and
columns can be found by exact value lookup (:func:`exact_indices`). Pure tensor code.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = ["exact_indices"]


def _anchors(at: torch.Tensor, once: torch.Tensor) -> torch.Tensor:
    """Per row, the position ``at`` of an entry whose value occurs ONCE in the basis (so it can
    only sit there); -1 where the row has no such entry."""
    pick = once.int().argmax(dim=1, keepdim=True)
    return torch.where(once.any(dim=1), at.gather(1, pick).squeeze(1), -1)


def _match_rows(current: torch.Tensor, target: torch.Tensor) -> Optional[torch.Tensor]:
    """Distinct indices ``s`` with ``current == target[s]`` exactly, or ``None``.

    Rows that are equal (e.g. all zero) are interchangeable and taken in order.
    """
    m, both = current.shape[0], torch.cat([current, target])
    ids = (torch.unique(both, dim=0, return_inverse=True)[1] if both.shape[1] else
           torch.zeros(both.shape[0], dtype=torch.long, device=both.device))
    cur_sorted, cur_order = ids[:m].sort(stable=True)
    tgt_sorted, tgt_order = ids[m:].sort(stable=True)
    start = torch.searchsorted(tgt_sorted, cur_sorted)
    count = torch.searchsorted(tgt_sorted, cur_sorted, right=True) - start
    rank = torch.arange(m, device=ids.device) - torch.searchsorted(cur_sorted, cur_sorted)
    if not (rank < count).all():
        return None
    rows = torch.empty_like(cur_order)
    rows[cur_order] = tgt_order[start + rank]
    return rows


def _complete(rows: torch.Tensor, current: torch.Tensor, target: torch.Tensor) -> Optional[torch.Tensor]:
    """Fill the unknown (-1) entries of ``rows`` by exact matches of those rows of ``current``
    among the rows of ``target`` not used yet; ``None`` if some row has none."""
    todo = rows < 0
    if not todo.any():
        return rows
    free = torch.ones(target.shape[0], dtype=torch.bool, device=rows.device)
    free[rows[~todo]] = False
    free = free.nonzero().squeeze(1)
    found = _match_rows(current[todo], target[free])
    return None if found is None else rows.masked_scatter(todo, free[found])


def exact_indices(current: torch.Tensor, basis: torch.Tensor) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """``(rows, cols)`` with ``current == basis[rows][:, cols]`` exactly, or ``None``.

    Every entry of ``current`` is looked up among the sorted entries of ``basis``; one whose
    value occurs once in ``basis`` pins its row and column. Columns left unpinned (holding only
    repeated values such as the zeros and ±1 of dead channels) are matched exactly on the
    pinned rows, then unpinned rows on all columns, and the whole result is checked.
    Where the remaining entries fit several choices (equal values), one of them is returned.
    """
    current = current.to(basis.dtype)
    flat, order = basis.reshape(-1).sort()
    distinct, counts = torch.unique_consecutive(flat, return_counts=True)
    values = current.reshape(-1).contiguous()
    k = torch.searchsorted(distinct, values).clamp(max=distinct.numel() - 1)
    at = order[(counts.cumsum(0) - counts)[k]].reshape(current.shape)
    once = ((distinct[k] == values) & (counts[k] == 1)).reshape(current.shape)
    rows, cols = _anchors(at // basis.shape[1], once), _anchors((at % basis.shape[1]).T, once.T)
    pinned = rows >= 0
    cols = _complete(cols, current[pinned].T, basis[rows[pinned]].T)
    rows = None if cols is None else _complete(rows, current, basis[:, cols])
    if rows is None or not (basis[rows][:, cols] == current).all():
        return None
    return rows, cols
