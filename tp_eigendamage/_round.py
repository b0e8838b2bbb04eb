"""One round of :func:`~tp_eigendamage.prune`: capped, tie-broken, cached scores; candidate
amounts measured on shape-only twins; the chosen amount removed from the model.

A twin is a deep copy of the model whose parameters and buffers live on the ``meta`` device
(shapes only, no arithmetic), made together with a copy of the round's pruner, dependency graph
included (traced once per round, on the model). It runs the same Torch-Pruning code on the same
shapes with the cached scores and stores its KFE blocks in the same forms (:func:`store_forms`),
so it costs exactly what the model costs after the same pruning: its parameters are counted
directly, its FLOPs by a forward. Models whose pruning or forward cannot run on the ``meta``
device get twins with real (copied) tensors instead, and so does every trial that needs a
clock: a latency target, or forms chosen by latency.
"""
from __future__ import annotations

import copy
import itertools
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch_pruning as tp

from . import _tp
from .batches import to_device
from .budget import Cost, count_params, measure_cost
from .damage import obs_compensation
from .errors import TargetUnreachableError
from .forms import FORMS, FormLatencies
from .kfe import kfe_part, to_cheapest_forms
from .latency import measure_latency
from .layers import adapter_for
from .methods import Method

__all__ = ["PruneConfig", "Round", "RoundImportance", "checked_cost", "layer_name", "store_forms",
           "latency_fraction", "channel_costs", "INTERMEDIATE_FORMS", "ZERO_COST"]

#: Forms of a KFE block between rounds: a block the next round re-rotates stays a block, one
#: that does not pay is folded (the next round rewrites the dense layer afresh).
INTERMEDIATE_FORMS = ("dense", "kfe")

#: A channel whose removal saves none of the ranking cost is charged this share of the model's
#: total cost instead of 0, so that its damage per cost keeps its sign and stays finite.
ZERO_COST = 1e-9

#: Torch-Pruning mutates these dicts (and shares its defaults between pruners): always fresh.
_MUTATED_KWARGS = ("in_channel_groups", "out_channel_groups", "num_heads")


def layer_name(names: Dict[int, str], module: nn.Module, modules: Dict[str, nn.Module]) -> str:
    """Qualified name of the reported layer owning ``module`` (a KFE block for its parts)."""
    name = names.get(id(module), "?")
    part = kfe_part(name, modules)
    return part[0] if part else name


@dataclass
class PruneConfig:
    """What every round of one ``prune()`` call needs besides the model and its statistics."""

    example_inputs: Any
    method: Method
    criterion_options: Dict[str, Any]   # prune(criterion_options=...): over method.criterion_defaults
    ignored: List[nn.Module]      # the user's ignored layers and the output layers
    outputs: List[nn.Module]      # the layers producing the model's outputs
    cap: float
    initial: Dict[str, Tuple[int, int]]
    global_pruning: bool
    tp_kwargs: dict
    timm_helper: Any
    eigen_precision: str = "float64"
    form_cost: str = "params"         # what the forms of KFE blocks are chosen by
    ranking_cost: Optional[str] = None    # "params" / "flops": rank by damage per that cost
    unpruned: Optional[nn.Module] = None   # the user's model: the latency reference
    recalibrate_bn: bool = True       # re-estimate BatchNorm statistics after every round
    latencies: FormLatencies = field(default_factory=FormLatencies)

    @property
    def needs_clock(self) -> bool:
        """Trials are timed (real tensors): forms chosen by latency."""
        return self.form_cost == "latency"


def store_forms(model: nn.Module, config: PruneConfig, inputs, final: bool) -> None:
    """Store the KFE blocks of ``model`` in their cheapest forms by ``config.form_cost``: all
    four forms after the last round, :data:`INTERMEDIATE_FORMS` before."""
    to_cheapest_forms(model, cost=config.form_cost, example_inputs=inputs,
                      forms=FORMS if final else INTERMEDIATE_FORMS, latencies=config.latencies)


def channel_costs(group: _tp.Group, layer_costs: Dict[nn.Module, float]) -> torch.Tensor:
    """What removing each root channel of ``group`` saves: float64, one entry per root channel.

    A member layer with cost ``c`` (its own FLOPs or parameters) and ``n`` channels on the side
    the group prunes loses ``c / n`` per channel it loses (a conv's or linear's count is linear
    in each of its channel counts, a BatchNorm's in its one), so root channel ``j`` saves
    ``Σ_members c/n · #{member channels following j}``. A layer appearing twice in a group
    (a depthwise conv pruned on both sides) is charged once; members without a count of their
    own (activations, element-wise operations, modules outside ``layer_costs``) add nothing.
    """
    saved = torch.zeros(len(_tp.group_root(group)[2]), dtype=torch.float64)
    position: Optional[Dict[int, int]] = None
    charged = set()
    for member in _tp.members(group):
        if position is None:   # the root member lists the root channels in order
            position = {r: p for p, r in enumerate(member.root_idxs)}
        layer = member.layer
        if id(layer) in charged or not isinstance(layer, nn.Module) or layer not in layer_costs:
            continue
        channels = _tp.member_channels(group, member)
        if not channels:
            continue
        charged.add(id(layer))
        for root in member.root_idxs:
            if root in position:
                saved[position[root]] += layer_costs[layer] / channels
    return saved


def latency_fraction(model: nn.Module, config: PruneConfig) -> float:
    """``model``'s measured latency on the example inputs over the unpruned model's, timed
    side by side (:func:`~tp_eigendamage.latency.measure_latency`)."""
    reference, now = measure_latency([config.unpruned, model], config.example_inputs)
    return now / reference


class RoundImportance(tp.importance.Importance):
    """A criterion as one round of :func:`prune` uses it: capped, tie-broken and cached.

    * Cap: in each group, the channels a member must keep (``ceil(original·(1 − cap))``, at
      least 1) get score +∞, so Torch-Pruning's threshold never selects them. KFE parts
      inherit the original layer's count: ``rotate_in`` and the core's input side count as
      the layer's input, ``rotate_out`` and the core's output side as its output.
    * Ties: exact ties (e.g. channels feeding a zero-initialised BatchNorm, whose damage is
      exactly 0) are broken by ``1e-20 ×`` the channel's relative L2 weight magnitude (at most
      1), far below any damage float32 can tell apart from another: it changes only scores
      below ``1e-20 · 2²⁵`` in magnitude (under half a float32 ulp above that), so groups
      without such scores skip computing it.
    * Damage per cost (``layer_costs`` given: ``module → its FLOPs or parameters``): the
      tie-broken damage of each channel is divided by what its removal saves
      (:func:`channel_costs`; at least :data:`ZERO_COST` × the model's total), the greedy
      order of the knapsack "least damage for the budget" (docs/method.md §7). The cost is
      positive, so a negative damage stays negative and is removed first.
    * Cache: scores do not depend on the pruning amount, so every group is scored once per
      round, on the model itself; shape-only twins (``for_twin``) read the cache (keyed by the
      root layer's name and pruning function) and never score.
    """

    TIE_BREAK = 1e-20

    def __init__(self, inner: tp.importance.Importance, cap: float, initial: Dict[str, Tuple[int, int]],
                 layer_costs: Optional[Dict[nn.Module, float]] = None):
        self.inner, self.cap, self.initial, self.layer_costs = inner, cap, initial, layer_costs
        self.cost_floor = ZERO_COST * sum(layer_costs.values()) if layer_costs else 0.0
        self.magnitude = tp.importance.GroupMagnitudeImportance(p=2, normalizer="max")
        self.raw: Dict[tuple, Optional[torch.Tensor]] = {}      # the criterion's scores
        self.scores: Dict[tuple, Optional[torch.Tensor]] = {}   # capped and tie-broken
        self.scoring = True
        self.nan_groups: List[Optional[str]] = []     # roots of groups whose scores held NaN
        self.names: Dict[int, str] = {}
        self.modules: Dict[str, nn.Module] = {}

    def for_twin(self) -> "RoundImportance":
        """A read-only view of the cache for a twin of the model (attach it to the twin)."""
        twin = copy.copy(self)
        twin.scoring = False
        return twin

    def attach(self, model: nn.Module) -> None:
        self.modules = dict(model.named_modules())
        self.names = {id(m): n for n, m in self.modules.items()}

    def key(self, group: _tp.Group) -> tuple:
        layer, pruning_fn, _ = _tp.group_root(group)
        return self.names.get(id(layer)), pruning_fn

    def damage(self, group: _tp.Group) -> Tuple[Optional[str], float]:
        """``(reported layer, Σ criterion scores)`` of the channels a pruning ``group`` removes."""
        raw = self.raw.get(self.key(group))
        if raw is None:
            return None, 0.0
        layer, _, idxs = _tp.group_root(group)
        return layer_name(self.names, layer, self.modules), float(raw[torch.as_tensor(idxs, dtype=torch.long)].sum())

    def __call__(self, group: _tp.Group) -> Optional[torch.Tensor]:
        key = self.key(group)
        if key not in self.scores:
            if not self.scoring:
                raise RuntimeError(f"internal error: group rooted at {key[0]!r} was not scored "
                                   "on the model before the budget search")
            self._score(key, group)
        return self.scores[key]

    def _must_keep(self, group: _tp.Group) -> int:
        """How many of the group's root channels must survive for every member's cap."""
        n_root, keep = len(_tp.group_root(group)[2]), 1
        for member in _tp.members(group):
            module = member.layer
            a = adapter_for(module) if isinstance(module, nn.Module) else None
            if a is None or not member.idxs or not (member.is_out_channel or member.is_in_channel):
                continue
            original = self._original(module, member.is_out_channel)
            if original is None:
                continue
            current = a.out_features(module) if member.is_out_channel else a.in_features(module)
            member_keep = max(1, math.ceil(original * (1 - self.cap)))
            keep = max(keep, math.ceil(member_keep * n_root / max(current, 1)))
        return min(keep, n_root)

    def _original(self, module: nn.Module, is_out: bool) -> Optional[int]:
        name = self.names.get(id(module), "")
        part = kfe_part(name, self.modules)
        if part and part[0] in self.initial:
            name, is_out = part[0], {"rotate_in": False, "rotate_out": True}.get(part[1], is_out)
        return self.initial[name][1 if is_out else 0] if name in self.initial else None

    def _score(self, key: tuple, group: _tp.Group) -> None:
        raw = self.inner(group)
        self.raw[key] = self.scores[key] = None
        if raw is None:
            return
        raw = raw.detach().float().cpu()
        if torch.isnan(raw).any():
            # e.g. Torch-Pruning's Taylor importance divides 0 by 0 for channels whose gradient
            # is exactly zero (behind a zero-initialised BatchNorm): such channels cost nothing
            self.nan_groups.append(key[0])
            raw = torch.nan_to_num(raw, nan=0.0)
        self.raw[key] = raw
        scores = raw.clone()
        magnitude = self.magnitude(group) if raw.abs().min() <= self.TIE_BREAK * 2 ** 25 else None
        if magnitude is not None:
            scores += self.TIE_BREAK * torch.nan_to_num(magnitude.float().cpu())
        if self.layer_costs:
            saved = channel_costs(group, self.layer_costs).clamp_min(self.cost_floor)
            scores = (scores.double() / saved).float()
        scores[torch.topk(scores, self._must_keep(group)).indices] = float("inf")
        self.scores[key] = scores


# -- pruning a model (or its twin) at a channel ratio ------------------------------------------
def _pruner(model: nn.Module, example_inputs, importance: RoundImportance, ignored, tp_kwargs,
            config: PruneConfig, ratio: float) -> tp.pruner.BasePruner:
    kwargs = dict(config.timm_helper.pruner_kwargs(model)) if config.timm_helper else {}
    ignored = list(ignored) + list(kwargs.pop("ignored_layers", []))
    kwargs.update(tp_kwargs)
    kwargs.update({k: dict(kwargs.get(k) or {}) for k in _MUTATED_KWARGS})
    pruner = _tp.make_pruner(model, example_inputs, importance, ratio=ratio,
                             global_pruning=config.global_pruning, ignored_layers=ignored, **kwargs)
    importance.attach(model)
    return pruner


def _remove(model: nn.Module, pruner, ratio: float, config: PruneConfig, names: Dict[int, str],
            before_each: Callable = lambda group: None) -> None:
    """Prune at channel ``ratio`` group by group, then fix timm attention."""
    for group in _tp.groups_at(pruner, ratio):
        before_each(group)
        root = _tp.group_root(group)[0]
        with _tp.pruning_errors(f"removing channels of '{names.get(id(root), '?')}' "
                                f"({type(root).__name__}) and the layers coupled to it",
                                model, config.example_inputs):
            group.prune()
    if config.timm_helper:
        config.timm_helper.fix_attention_after_pruning(model, pruner.num_heads)


def checked_cost(model: nn.Module, example_inputs) -> Cost:
    """:func:`measure_cost`, with a failing forward reported as a :class:`PruningError`."""
    with _tp.pruning_errors("running the pruned model", model, example_inputs):
        return measure_cost(model, example_inputs)


def _twin(model: nn.Module, pruner, importance: "RoundImportance", meta: bool):
    """``(twin, its pruner)``: deep copies of ``model`` and of its ``pruner``, which scores with
    ``importance``; ``meta=True`` puts parameters and buffers on the meta device (shapes only:
    no storage is copied and no arithmetic is done)."""
    memo: dict = {}
    if meta:
        for t in itertools.chain(model.parameters(), model.buffers()):
            memo[id(t)] = (nn.Parameter(t.detach().to("meta"), requires_grad=t.requires_grad)
                           if isinstance(t, nn.Parameter) else t.detach().to("meta"))
    twin, twin_pruner = _tp.copy_with_pruner(model, pruner, importance, memo)
    importance.attach(twin)
    return twin, twin_pruner


def _compensate(groups, stats) -> None:
    """Apply the joint K-FAC OBS update to every consumer layer before its inputs go."""
    removed: Dict[nn.Module, List[int]] = {}
    for group in groups:
        for member in _tp.members(group):
            m = member.layer
            if member.is_in_channel and m in stats and adapter_for(m) is not None:
                removed.setdefault(m, []).extend(int(i) for i in member.idxs)
    for m, idxs in removed.items():
        obs_compensation(m, stats[m], sorted(set(idxs)))


def _nothing_to_prune(config: PruneConfig, names: Dict[int, str]) -> TargetUnreachableError:
    def listed(modules):
        return ", ".join(f"'{names.get(id(m), '?')}'" for m in modules) or "none"

    user = [m for m in config.ignored if all(m is not o for o in config.outputs)]
    return TargetUnreachableError(
        "nothing can be pruned: every layer's output channels are either model outputs (never "
        f"pruned: {listed(config.outputs)}) or ignored (ignored_layers: {listed(user)}), or "
        "Torch-Pruning found no prunable group; the model has no hidden channels to remove")


class Round:
    """One round on ``model``: one pruner, every group scored once, candidates measured on twins.
    ``final``: the last round, after which KFE blocks take any of their forms."""

    def __init__(self, model: nn.Module, stats, config: PruneConfig, final: bool):
        self.model, self.config, self.final = model, config, final
        costs = None
        if config.ranking_cost is not None:
            with _tp.pruning_errors("counting the model's layer-wise costs", model, config.example_inputs):
                costs = _tp.layer_costs(model, config.example_inputs, config.ranking_cost)
        self.importance = RoundImportance(config.method.criterion(stats, config.criterion_options), config.cap, config.initial, costs)
        with _tp.pruning_errors("tracing the model with Torch-Pruning", model, config.example_inputs):
            self.pruner = _pruner(model, config.example_inputs, self.importance, config.ignored,
                                  config.tp_kwargs, config, 0.0)
            _tp.list_groups_once(self.pruner)   # the model keeps its shapes until apply()
        list(_tp.groups_at(self.pruner, 0.0))   # scores every group (ratio 0 removes nothing)
        if self.importance.nan_groups:
            listed = ", ".join(repr(n) for n in self.importance.nan_groups[:5])
            warnings.warn(f"{type(self.importance.inner).__name__} returned NaN scores in "
                          f"{len(self.importance.nan_groups)} group(s) ({listed}"
                          f"{', ...' if len(self.importance.nan_groups) > 5 else ''}); they count as 0 "
                          "(removed first), as for channels whose gradient is exactly zero", stacklevel=3)
        if not self.importance.scores:
            raise _nothing_to_prune(config, self.importance.names)
        self.meta = not config.needs_clock
        self.trials = 0

    def metric_at(self, ratio: float, metric: str) -> int:
        """The model's ``"params"`` or ``"flops"`` after this round's pruning at channel ``ratio``."""
        self.trials += 1
        if self.meta:
            try:
                return self._twin_metric(ratio, metric, meta=True)
            except Exception:   # pruning or a forward that needs real values: real copies
                self.meta = False
        return self._twin_metric(ratio, metric, meta=False)

    def _twin_metric(self, ratio: float, metric: str, meta: bool) -> int:
        twin, inputs = self._pruned_twin(ratio, meta)
        return count_params(twin) if metric == "params" else checked_cost(twin, inputs).flops

    def latency_at(self, ratio: float) -> float:
        """The model's latency after this round's pruning at channel ``ratio``, as a fraction
        of the unpruned model's (a real copy, pruned and timed next to the unpruned model)."""
        self.trials += 1
        twin, _ = self._pruned_twin(ratio, meta=False)
        return latency_fraction(twin, self.config)

    def _pruned_twin(self, ratio: float, meta: bool):
        """``(twin, its inputs)``: a twin pruned at ``ratio``, its blocks in their forms."""
        inputs = to_device(self.config.example_inputs, "meta") if meta else self.config.example_inputs
        importance = self.importance.for_twin()
        twin, pruner = _twin(self.model, self.pruner, importance, meta)
        _remove(twin, pruner, ratio, self.config, importance.names)
        store_forms(twin, self.config, inputs, self.final)
        return twin, inputs

    def apply(self, ratio: float, stats) -> Dict[str, float]:
        """Prune the model at channel ``ratio`` (the caller stores KFE blocks in their forms); returns
        the predicted damage per reported layer.

        With OBS compensation, every consumer is first compensated for ALL its removed inputs
        at once (the groups listed on the unpruned model), then the same groups are pruned one
        by one.
        """
        if self.config.method.compensation:
            _compensate(list(_tp.groups_at(self.pruner, ratio)), stats)
        damages: Dict[str, float] = {}

        def record(group):
            name, value = self.importance.damage(group)
            if name is not None:
                damages[name] = damages.get(name, 0.0) + value

        _remove(self.model, self.pruner, ratio, self.config, self.importance.names, record)
        return damages
