"""Torch-Pruning ``Importance`` criteria in loss units (docs/method.md §4, §8, §9).

Every criterion scores the channels of a Torch-Pruning group as the SUM of its members'
damages, so scores of different groups share one unit (loss) and ``global_pruning=True``
ranks all layers in one list. Members are Conv2d / Linear layers (BatchNorm, LayerNorm and
element-wise members contribute nothing). Which members carry the damage (``side``):

* ``"producer"`` (default): layers that WRITE the channel, output-side damage (what the public
  baselines used);
* ``"consumer"``: layers that READ the channel, input-side damage (removing a channel changes
  the network only through its consumers, docs/method.md §9).

With the first-order term, ``benchmarks/damage_fidelity.py`` measured the consumer side to rank
single channel removals better (pooled Spearman 0.972 vs 0.547 on a trained resnet18, 0.920 vs
0.846 on a trained mobilenetv2; docs/fidelity.md §6). The default stays ``"producer"`` for now:
consumer sums need the statistics of every reader, the classifier included, so statistics
collected once go stale after the first step of an iterative ``BasePruner`` (pass a callable, or
``side="consumer"`` with fresh statistics per step). :func:`~tp_eigendamage.prune` collects fresh
statistics every round and takes the side as ``criterion_options``; its default is also
``"producer"``, because on the paper protocol the consumer side did not prune better after
fine-tuning (docs/method.md §9).

A depthwise conv reads and writes the same channel: it is a producer, not a consumer (the channel
leaves the group only through the layers that read it without writing it, e.g. the pointwise
conv after it, so removing the channel changes the network exactly there). A group with no
member on the chosen side (e.g. channels that reach the model output directly) uses the other.

Statistics may be given as a mapping (``KFACStats`` / ``FisherDiagStats``) or as a zero-arg
callable returning a fresh one; the callable is called at first use and again whenever the
model changed shape since (e.g. between the steps of ``BasePruner(iterative_steps>1)``).
Statistics collected on another copy of the model are matched by qualified layer name
(:meth:`~tp_eigendamage.layer_statistics.LayerStatistics.for_model`).
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Callable, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch_pruning as tp

from . import _tp, damage
from ._block_damage import direction_terms, outer_kron_terms
from ._options import FIRST_ORDERS, SIDES, FirstOrder, Side, check_choice
from .damage import DamageTerms
from .diag_fisher import FisherDiagStats
from .errors import InvalidArgumentError, StaleStatisticsError
from .kfac import KFACStats
from .kfe_block import KFEBlock
from .layers import adapter_for

__all__ = ["EigenDamageImportance", "KroneckerOBDImportance", "KroneckerOBSImportance",
           "FisherDiagImportance"]

NORMALIZERS = (None, "mean", "sum", "max")

#: Statistics, or a zero-argument callable returning fresh ones.
KFACSource = Union[KFACStats, Callable[[], KFACStats]]
FisherDiagSource = Union[FisherDiagStats, Callable[[], FisherDiagStats]]


class _Statistics:
    """Statistics given directly or by a zero-arg factory that is re-run when they go stale."""

    def __init__(self, stats, what: str):
        if isinstance(stats, Mapping):
            self._factory, self._stats = None, stats
        elif callable(stats):
            self._factory, self._stats = stats, None
        else:
            raise InvalidArgumentError(f"stats must be {what} or a zero-argument callable returning "
                                       f"one, got {type(stats).__name__}")
        self.what = what

    def current(self, model: nn.Module, exempt) -> Mapping:
        """The statistics keyed by ``model``'s modules, re-collected first if stale."""
        if self._factory is not None and (self._stats is None or self._any_stale(model, exempt)):
            self.refresh()
        return self._bound(model)

    def _bound(self, model: nn.Module) -> Mapping:
        for_model = getattr(self._stats, "for_model", None)
        return for_model(model) if for_model is not None else self._stats

    def _any_stale(self, model: nn.Module, exempt) -> bool:
        stats = self._bound(model)
        for module in stats:
            if module in exempt:
                continue
            try:
                stats[module]
            except StaleStatisticsError:
                return True
        return False

    def refresh(self, cause: Optional[Exception] = None) -> None:
        if self._factory is None:
            raise StaleStatisticsError(
                f"{cause} These statistics no longer describe the model being pruned. Re-collect "
                f"them, or pass a zero-argument callable returning fresh {self.what} (e.g. "
                "lambda: tp_eigendamage.collect_kfac(model, data, progress=False)) so they are "
                "re-collected after every pruning step.") from cause
        with torch.enable_grad():  # Torch-Pruning scores groups under torch.no_grad()
            stats = self._factory()
        if not isinstance(stats, Mapping):
            raise InvalidArgumentError(f"the statistics callable returned {type(stats).__name__}; "
                                       f"it must return {self.what}")
        self._stats = stats


def _normalize(scores: torch.Tensor, normalizer) -> torch.Tensor:
    if normalizer is None:
        return scores
    if callable(normalizer):
        return normalizer(scores)
    reference = {"mean": scores.mean(), "sum": scores.sum(), "max": scores.max()}[normalizer]
    return scores / reference.abs().clamp_min(torch.finfo(scores.dtype).tiny)


class _ChannelImportance(tp.importance.Importance):
    """Sum of member damages per root channel of a Torch-Pruning group (shared machinery)."""

    what = "KFACStats"

    def __init__(self, stats, *, side: Side = "producer", normalizer=None, first_order: FirstOrder = "positive"):
        check_choice(side, "side", SIDES, hint="'producer': output-side damage of the layers "
                     "writing a channel; 'consumer': input-side damage of the layers reading it")
        if not callable(normalizer):
            check_choice(normalizer, "normalizer", NORMALIZERS, hint="or pass a callable; None "
                         "keeps loss units, needed for global pruning")
        check_choice(first_order, "first_order", FIRST_ORDERS, hint="'positive': the positive part of "
                     "−Ḡ·w (default); 'signed': −Ḡ·w as it is; 'off': second order only")
        self.side, self.normalizer, self.first_order = side, normalizer, first_order
        self._statistics = _Statistics(stats, self.what)
        self._warned_no_gradient = False

    def _first_order(self, mean_grad: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """``mean_grad`` if the first-order term is on (``None`` = second order only); warns once
        when the statistics hold no mean gradient."""
        if self.first_order == "off":
            return None
        if mean_grad is None and not self._warned_no_gradient:
            self._warned_no_gradient = True
            warnings.warn(f"{type(self).__name__}(first_order={self.first_order!r}): the statistics "
                          "hold no mean data-label gradient (collected with mean_gradient=False or "
                          "from batches without targets), so damages are second order only; pass "
                          "first_order='off' to silence this", stacklevel=4)
        return mean_grad

    # -- hooks for subclasses ----------------------------------------------------------------
    def _prepare(self, model: nn.Module, graph) -> None:
        """Called once per group with the model being pruned and its dependency graph (one per
        trace: the model's structure is fixed while it is used)."""

    def _exempt(self) -> set:
        """Modules whose statistics are never used (skipped by the staleness check)."""
        return set()

    def _in_damage(self, module: nn.Module, stats) -> DamageTerms:
        raise NotImplementedError

    def _out_damage(self, module: nn.Module, stats) -> DamageTerms:
        raise NotImplementedError

    def _member_damage(self, module, reads: bool, writes: bool, side: str, stats) -> Optional[DamageTerms]:
        """Damage terms over all channels of ``module`` for this member, or ``None``."""
        if side == "consumer" and reads and not writes:
            return self._in_damage(module, stats)
        if side == "producer" and writes:
            return self._out_damage(module, stats)
        return None

    # -- Torch-Pruning entry point ---------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, group: _tp.Group) -> Optional[torch.Tensor]:
        model = _tp.group_model(group)
        self._prepare(model, _tp.group_graph(group))
        stats = self._statistics.current(model, self._exempt())
        try:
            scores = self._score(group, stats)
        except StaleStatisticsError as err:
            self._statistics.refresh(err)
            scores = self._score(group, self._statistics.current(model, self._exempt()))
        return None if scores is None else _normalize(scores, self.normalizer)

    def _score(self, group, stats) -> Optional[torch.Tensor]:
        """Per root channel: ``second + first`` (``"signed"``), ``second + max(first, 0)``
        (``"positive"``) or ``second`` (``"off"``), ``first`` the first-order term of the whole
        removal (all members), ``second`` its quadratic term; both from one pass over the members."""
        for side in (self.side, SIDES[1 - SIDES.index(self.side)]):
            terms = self._sum_members(group, side, stats)
            if terms is None:
                continue
            second, first = terms
            if first is not None:
                second = second + (first.clamp_min(0) if self.first_order == "positive" else first)
            return second.float()
        return None

    def _sum_members(self, group, side: str, stats) -> Optional[DamageTerms]:
        """Both terms summed over the group's members on ``side`` per root channel (``first``
        ``None`` if no member has one), or ``None`` without such members."""
        entries = list(_tp.members(group))
        position = {r: p for p, r in enumerate(entries[0].root_idxs)}
        second = first = None
        for entry in entries:
            module = entry.layer
            if adapter_for(module) is None:
                continue
            member = self._member_damage(module, entry.is_in_channel, entry.is_out_channel, side, stats)
            if member is None:
                continue
            device = member.second.device
            if second is None:
                second = torch.zeros(len(position), dtype=torch.float64, device=device)
            if member.first is not None and first is None:
                first = torch.zeros(len(position), dtype=torch.float64, device=device)
            pairs = [(position[r], i) for r, i in zip(entry.root_idxs, entry.idxs) if r is not None]
            if pairs:
                rows, cols = (torch.as_tensor(v, device=device) for v in zip(*pairs))
                second.index_add_(0, rows, member.second[cols])
                if member.first is not None:
                    first.index_add_(0, rows, member.first[cols])
        return None if second is None else DamageTerms(second, first)


class KroneckerOBDImportance(_ChannelImportance):
    """Kron-OBD channel damage (docs/method.md §8) from channel-mode K-FAC factors and the mean
    gradient ``Ḡ`` (§4).

    * input channel j (consumer side): ``Σ_k (−Ḡ_{:,j,k} · w_{:,j,k} + ½ A_jj · w_{:,j,k}ᵀ S w_{:,j,k})``;
    * output channel c (producer side): ``Σ_k (−Ḡ_{c,:,k} · w_{c,:,k} + ½ S_cc · w_{c,:,k}ᵀ A w_{c,:,k})``.

    ``first_order``: ``"positive"`` (default) adds the positive part of the ``Ḡ`` terms of each
    removal, ``"signed"`` adds them as they are, ``"off"`` drops them (the paper's damage);
    docs/method.md §4.
    Grouped / depthwise convs use their per-group factors. ``stats``: a ``KFACStats`` or a
    zero-arg callable returning one.
    """

    def __init__(self, stats: KFACSource, side: Side = "producer", *, normalizer=None,
                 first_order: FirstOrder = "positive"):
        super().__init__(stats, side=side, normalizer=normalizer, first_order=first_order)

    def _curvature(self, module, stats) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """``(w, A, S, Ḡ)``: weight blocks ``(G, d_out, d_in, K)``, per-group factors and the mean
        data-label gradient (``None`` if ``first_order="off"``)."""
        f = stats[module]
        if f.factor_mode != "channel":
            raise InvalidArgumentError(f"channel criteria need factor_mode='channel' statistics, layer "
                             f"'{f.name}' has {f.factor_mode!r}; collect_kfac(..., factor_mode='channel')")
        return f.weight_blocks(module), f.input_blocks, f.grad_blocks, self._first_order(f.mean_grad)

    @staticmethod
    def _per_input(module, stats, per_channel: DamageTerms) -> DamageTerms:
        """Input damage terms per input of ``module``: a Linear with channel-structured factors
        spreads each channel's terms evenly over its flattened inputs (Torch-Pruning removes
        them together, so a group's sum is the channel's damage)."""
        positions = stats[module].flattened_positions
        if positions == 1:
            return per_channel
        return DamageTerms(*(None if t is None else t.repeat_interleave(positions) / positions
                             for t in per_channel))

    def _in_damage(self, module, stats):
        return self._per_input(module, stats, damage.kron_in_terms(*self._curvature(module, stats)))

    def _out_damage(self, module, stats):
        return damage.kron_out_terms(*self._curvature(module, stats))


class KroneckerOBSImportance(KroneckerOBDImportance):
    """Kron-OBS single-channel damage with compensation of the remaining weights (docs/method.md §8).

    Input channel j: ``½ Σ_k (w_{:,j,k}ᵀ S w_{:,j,k}) / [A⁻¹]_jj``; output channel i:
    ``½ Σ_k (w_{i,:,k}ᵀ A w_{i,:,k}) / [S⁻¹]_ii``; plus ``Σ Ḡ ⊙ Δ`` along the OBS update ``Δ``
    (:func:`tp_eigendamage.damage.obs_in_damage`, ``first_order="off"`` drops it). Inverses are
    damped, ``(A + γ·mean(diag A)·I)⁻¹`` with ``γ = damping`` (default :data:`damage.OBS_DAMPING`).
    Apply the matching update with :func:`tp_eigendamage.damage.obs_compensation`.

    The default side is ``"consumer"``: the compensation updates the layers that READ the
    removed channels, so their input-side damage is what the update achieves.
    """

    def __init__(self, stats: KFACSource, side: Side = "consumer", *,
                 damping: float = damage.OBS_DAMPING, normalizer=None, first_order: FirstOrder = "positive"):
        if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not damping >= 0:
            raise InvalidArgumentError(f"damping={damping!r}; pass a non-negative number (γ in A + γ·mean(diag A)·I)")
        super().__init__(stats, side, normalizer=normalizer, first_order=first_order)
        self.damping = float(damping)

    def _in_damage(self, module, stats):
        w, A, S, mean_grad = self._curvature(module, stats)
        return self._per_input(module, stats, damage.obs_in_terms(w, A, S, self.damping, mean_grad))

    def _out_damage(self, module, stats):
        w, A, S, mean_grad = self._curvature(module, stats)
        return damage.obs_out_terms(w, A, S, self.damping, mean_grad)


class FisherDiagImportance(_ChannelImportance):
    """C-OBD: ``Σ (−Ḡ w + ½ w² F_diag)`` over the channel's weights (its column block on the
    consumer side, its row on the producer side; ``first_order="off"`` drops ``−Ḡ w``,
    ``"positive"`` keeps its positive part).
    ``fisher``: the result of :func:`tp_eigendamage.diag_fisher.collect_fisher_diag` or a
    zero-arg callable returning one.
    """

    what = "FisherDiagStats"

    def __init__(self, fisher: FisherDiagSource, side: Side = "producer", *, normalizer=None,
                 first_order: FirstOrder = "positive"):
        super().__init__(fisher, side=side, normalizer=normalizer, first_order=first_order)

    def _operands(self, module, stats):
        return (adapter_for(module).weight_blocks(module), stats[module],
                self._first_order(stats.mean_grad(module)))

    def _in_damage(self, module, stats):
        return damage.diag_in_terms(*self._operands(module, stats))

    def _out_damage(self, module, stats):
        return damage.diag_out_terms(*self._operands(module, stats))


class EigenDamageImportance(KroneckerOBDImportance):
    """EigenDamage (docs/method.md §4) for KFE blocks, Kron-OBD (§8) for every other channel.

    Members belonging to a :class:`~tp_eigendamage.kfe.KFEBlock`:

    * core input / output channels (eigen-directions): ``damage_in`` / ``damage_out``
      (:func:`tp_eigendamage.damage.eigen_terms`) from the core weight ``W*``,
      ``block.fisher_diag`` (or, after an EK-FAC refit, the exact single-removal Fisher
      ``block.removal_fisher_in/out``) and ``block.mean_grad``, restricted to the surviving
      directions, whatever the side; no statistics needed;
    * ``rotate_in`` output and ``rotate_out`` input channels (the same directions): nothing;
    * the block's outer channels (``rotate_in`` inputs / ``rotate_out`` outputs): Kron-OBD of
      the block as one layer, weight ``R_out W* R_in`` (current rotation weights) and factors
      ``A = basis_in diag(λ_A) basis_inᵀ``, ``S = basis_out diag(λ_S) basis_outᵀ`` over the
      basis rows of the outer channels still present, computed in the eigenbasis without
      forming them (:meth:`KFEBlock.outer_kron_operands`); for a block unchanged since it was
      built from a layer, the layer's own Kron-OBD kept from the rewrite.

    ``normalizer=None`` (default) keeps loss units so global pruning ranks eigen-directions and
    channels of all layers in one list.
    """

    def __init__(self, stats: KFACSource, *, side: Side = "producer", normalizer=None,
                 first_order: FirstOrder = "positive"):
        super().__init__(stats, side, normalizer=normalizer, first_order=first_order)
        self._parts: Dict[nn.Module, Tuple[KFEBlock, str]] = {}
        self._parts_graph = None

    def _prepare(self, model, graph):
        if graph is not self._parts_graph:   # the blocks' parts, found once per traced graph
            self._parts = {getattr(b, role): (b, role) for b in model.modules() if isinstance(b, KFEBlock)
                           for role in ("rotate_in", "core", "rotate_out")}
            self._parts_graph = graph

    def _exempt(self):
        return set(self._parts)

    def _member_damage(self, module, reads, writes, side, stats):
        part = self._parts.get(module)
        if part is None:
            return super()._member_damage(module, reads, writes, side, stats)
        block, role = part
        if role == "core":
            terms = direction_terms(block)[0 if reads else 1]
            return DamageTerms(terms.second, self._first_order(terms.first))
        if role == "rotate_in" and reads and side == "consumer":
            return self._outer_terms(block, "input")
        if role == "rotate_out" and writes and side == "producer":
            return self._outer_terms(block, "output")
        return None

    def _outer_terms(self, block: KFEBlock, side: str) -> DamageTerms:
        """Kron-OBD terms of the block's outer ``side`` channels, the block taken as one layer
        (:func:`~tp_eigendamage._block_damage.outer_kron_terms`); the first-order term only if it is on."""
        terms = outer_kron_terms(block, side)
        return DamageTerms(terms.second, self._first_order(terms.first))
