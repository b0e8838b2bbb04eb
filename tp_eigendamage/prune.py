"""The one-call driver: statistics → (KFE) → Torch-Pruning → (compensation) → fold → report.

Each round ``r = 1..k`` of ``prune(..., iterative_steps=k)``:

1. collect K-FAC statistics on the model as it is now (``collect_kfac``);
2. ``method="eigendamage"``: rewrite (or re-rotate) layers in the KFE (``to_kfe``);
3. find how many channels to remove so that the model lands on this round's budget
   (``target^(r/k)`` of the original parameters / FLOPs, or Torch-Pruning's ``pruning_ratio``
   schedule), by pruning deep copies (:func:`tp_eigendamage.budget.search_ratio`);
4. remove them with ``torch_pruning.pruner.BasePruner`` and our importance, never more than
   ``max_layer_ratio`` of any layer's original channels / directions; ``kron_obs`` first
   applies the K-FAC OBS compensation to the consumer layers;
5. fold KFE blocks whose bottleneck does not pay (``fold_kfe``), then ``finetune(model, r)``.

The user's model is changed only on success: a deep copy is taken first, and if any step
raises, the model's submodules, parameters and buffers are put back from that copy (the
top-level object stays the same; its submodules are the copy's) before the error propagates.
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch_pruning as tp

from . import importance as imp_mod
from .budget import measure_cost, search_ratio
from .damage import obs_compensation
from .diag_fisher import collect_fisher_diag
from .kfac import collect_kfac
from .kfe import KFEBlock, fold_kfe, to_kfe
from .layers import adapter_for
from .report import build_report, layer_stats

METHODS = ("eigendamage", "kron_obd", "kron_obs", "fisher_diag")
_CONTROLLED_KWARGS = ("importance", "pruning_ratio", "ignored_layers", "iterative_steps",
                      "max_pruning_ratio", "example_inputs", "model")


class PruneArgumentError(ValueError):
    """Bad arguments to :func:`prune`; raised before any work starts."""


def _check_args(pruning_ratio, target_params, target_flops, method, iterative_steps, finetune,
                max_layer_ratio, tp_kwargs) -> Tuple[str, float]:
    given = {k: v for k, v in (("pruning_ratio", pruning_ratio), ("target_params", target_params),
                               ("target_flops", target_flops)) if v is not None}
    if len(given) != 1:
        raise PruneArgumentError(
            f"pass exactly one of pruning_ratio, target_params, target_flops (got {sorted(given) or 'none'})")
    (kind, value), = given.items()
    if not isinstance(value, (int, float)) or not 0 < value < 1:
        raise PruneArgumentError(
            f"{kind}={value!r} must be a fraction strictly between 0 and 1 "
            + ("(the share of channels to remove)" if kind == "pruning_ratio"
               else "(the share of the original cost to keep, e.g. 0.5)"))
    if not (method in METHODS or isinstance(method, tp.importance.Importance)):
        raise PruneArgumentError(
            f"method={method!r}: choose one of {METHODS} or pass a torch_pruning Importance instance")
    if not isinstance(iterative_steps, int) or iterative_steps < 1:
        raise PruneArgumentError(f"iterative_steps={iterative_steps!r} must be a positive integer")
    if finetune is not None and not callable(finetune):
        raise PruneArgumentError(
            f"finetune must be a callable finetune(model, round) or None, got {type(finetune).__name__}")
    if not isinstance(max_layer_ratio, (int, float)) or not 0 < max_layer_ratio < 1:
        raise PruneArgumentError(f"max_layer_ratio={max_layer_ratio!r} must be in (0, 1)")
    clash = sorted(set(tp_kwargs) & set(_CONTROLLED_KWARGS))
    if clash:
        raise PruneArgumentError(f"{clash} are set by prune() itself; use its own arguments instead")
    return kind, float(value)


def _method_name(method) -> str:
    return method if isinstance(method, str) else type(method).__name__


_IMPORTANCES = {
    "eigendamage": imp_mod.EigenDamageImportance,
    "kron_obd": imp_mod.KroneckerOBDImportance,
    "kron_obs": imp_mod.KroneckerOBSImportance,
    "fisher_diag": imp_mod.FisherDiagImportance,
}


def _collect(method, model, data, stats_kwargs):
    """This round's curvature: K-FAC factors, the diagonal Fisher, or nothing (tp criteria)."""
    if method == "fisher_diag":
        return collect_fisher_diag(model, data, **stats_kwargs)
    return collect_kfac(model, data, **stats_kwargs) if method in _IMPORTANCES else None


def _make_importance(method, stats):
    return _IMPORTANCES[method](stats) if isinstance(method, str) else method


def _timm_integration(model: nn.Module):
    """The timm helper module if ``model`` is a timm model, else None."""
    if type(model).__module__.startswith("timm."):
        from .integrations import timm as timm_integration
        return timm_integration
    return None


def _layer_name(model_names: Dict[int, str], module: nn.Module, parents: Dict[str, nn.Module]) -> str:
    """Qualified name of the reported layer owning ``module`` (a KFE block for its parts)."""
    name = model_names.get(id(module), "?")
    parent = name.rsplit(".", 1)[0] if "." in name else ""
    return parent if isinstance(parents.get(parent), KFEBlock) else name


def _original_channels(model: nn.Module) -> Dict[str, Tuple[int, int]]:
    out = {}
    for name, m in model.named_modules():
        a = adapter_for(m)
        if a is not None:
            out[name] = (a.in_features(m), a.out_features(m))
    return out


class _RoundImportance(tp.importance.Importance):
    """A criterion as one round of :func:`prune` uses it: capped, tie-broken and cached.

    * Cap: in each group, the channels a member must keep (``ceil(original·(1 − cap))``, at
      least 1) get score +∞, so Torch-Pruning's threshold never selects them. KFE parts
      inherit the original layer's count: ``rotate_in`` and the core's input side count as
      the layer's input, ``rotate_out`` and the core's output side as its output.
    * Ties: exact ties (e.g. channels feeding a zero-initialised BatchNorm, whose damage is
      exactly 0) are broken by ``1e-20 ×`` the channel's relative L2 weight magnitude, far
      below any damage float32 can tell apart from another.
    * Cache: scores do not depend on the pruning amount, so the trials of the budget search
      share them (keyed by the root layer's name, the pruning function and the indices).
      The raw criterion scores are kept too: :meth:`removed_damage` sums them over the
      channels a pruning group removes (criteria only score whole groups).
    """

    TIE_BREAK = 1e-20

    def __init__(self, inner, cap: float, initial: Dict[str, Tuple[int, int]], cache: dict):
        self.inner, self.cap, self.initial, self.cache = inner, cap, initial, cache
        self.magnitude = tp.importance.GroupMagnitudeImportance(p=2, normalizer="max")
        self.DG, self.names, self.modules = None, {}, {}

    def attach(self, model: nn.Module, DG) -> None:
        self.DG = DG
        self.modules = dict(model.named_modules())
        self.names = {id(m): n for n, m in self.modules.items()}

    def _original(self, module: nn.Module, is_out: bool) -> Optional[int]:
        name = self.names.get(id(module), "")
        parent, _, leaf = name.rpartition(".")
        if isinstance(self.modules.get(parent), KFEBlock) and parent in self.initial:
            is_out = {"rotate_in": False, "rotate_out": True}.get(leaf, is_out)
            return self.initial[parent][1 if is_out else 0]
        return self.initial[name][1 if is_out else 0] if name in self.initial else None

    def _must_keep(self, group) -> int:
        """How many of the group's root channels must survive for every member's cap."""
        n_root, keep = len(group[0].idxs), 1
        for dep, idxs in group:
            module = dep.target.module
            a = adapter_for(module) if isinstance(module, nn.Module) else None
            if a is None or not idxs:
                continue
            is_out = self.DG.is_out_channel_pruning_fn(dep.handler)
            if not (is_out or self.DG.is_in_channel_pruning_fn(dep.handler)):
                continue
            original = self._original(module, is_out)
            if original is None:
                continue
            current = a.out_features(module) if is_out else a.in_features(module)
            member_keep = max(1, math.ceil(original * (1 - self.cap)))
            keep = max(keep, math.ceil(member_keep * n_root / max(current, 1)))
        return min(keep, n_root)

    def _key(self, group):
        root = group[0]
        return self.names.get(id(root.dep.target.module)), root.dep.handler

    def __call__(self, group):
        key = self._key(group) + (tuple(group[0].idxs),)
        if key not in self.cache:
            self.cache[key] = self._score(group)
        return self.cache[key][1]

    def removed_damage(self, group) -> Optional[float]:
        """Sum of raw scores of the channels ``group`` removes (from the whole-group scores)."""
        raw = next((v[0] for k, v in self.cache.items() if k[:2] == self._key(group) and v[0] is not None), None)
        if raw is None:
            return None
        idxs = torch.as_tensor([int(i) for i in group[0].idxs if int(i) < len(raw)], dtype=torch.long)
        return float(raw[idxs].sum())

    def _score(self, group):
        scores = self.inner(group)
        if scores is None:
            return None, None
        raw = scores.detach().float().cpu()
        scores = raw.clone()
        magnitude = self.magnitude(group)
        if magnitude is not None:
            scores = scores + self.TIE_BREAK * torch.nan_to_num(magnitude.float().cpu())
        scores[torch.topk(scores, self._must_keep(group)).indices] = float("inf")
        return raw, scores


def _compensate(groups, DG, stats):
    """Apply the joint K-FAC OBS update to every consumer layer before its inputs go."""
    removed: Dict[nn.Module, List[int]] = {}
    for group in groups:
        for dep, idxs in group:
            m = dep.target.module
            if DG.is_in_channel_pruning_fn(dep.handler) and m in stats and adapter_for(m) is not None:
                removed.setdefault(m, []).extend(int(i) for i in idxs)
    for m, idxs in removed.items():
        obs_compensation(m, stats[m], sorted(set(idxs)))


def _prune_pass(model, stats, example_inputs, method, ratio, ignored, cap, initial, tp_kwargs,
                timm_helper, global_pruning, cache, record_damage=True) -> Dict[str, float]:
    """One pruning pass at channel ``ratio``; returns predicted damage per reported layer."""
    criterion = _make_importance(method, stats)
    importance = _RoundImportance(criterion, cap, initial, cache)
    kwargs = dict(timm_helper.pruner_kwargs(model)) if timm_helper else {}
    ignored = list(ignored) + list(kwargs.pop("ignored_layers", []))
    kwargs.update(tp_kwargs)
    pruner = tp.pruner.BasePruner(model, example_inputs, importance=importance, pruning_ratio=ratio,
                                  global_pruning=global_pruning, ignored_layers=ignored, **kwargs)
    importance.attach(model, pruner.DG)
    groups = list(pruner.step(interactive=True))
    names = {id(m): n for n, m in model.named_modules()}
    modules = dict(model.named_modules())
    damages: Dict[str, float] = {}
    for group in groups if record_damage else []:
        damage = importance.removed_damage(group)
        if damage is not None:
            name = _layer_name(names, group[0].dep.target.module, modules)
            damages[name] = damages.get(name, 0.0) + damage
    if method == "kron_obs":
        _compensate(groups, pruner.DG, stats)
    for group in groups:
        group.prune()
    if timm_helper:
        timm_helper.fix_attention_after_pruning(model, pruner.num_heads)
    fold_kfe(model, only_unprofitable=True)
    return damages


def _restore(model: nn.Module, backup: nn.Module) -> None:
    model.__dict__.clear()
    model.__dict__.update(backup.__dict__)


def prune(
    model: nn.Module,
    data: Iterable,
    example_inputs,
    *,
    pruning_ratio: Optional[float] = None,
    target_params: Optional[float] = None,
    target_flops: Optional[float] = None,
    method: Union[str, tp.importance.Importance] = "eigendamage",
    iterative_steps: int = 1,
    finetune: Optional[Callable[[nn.Module, int], None]] = None,
    ignored_layers: Optional[List[nn.Module]] = None,
    max_layer_ratio: float = 0.95,
    global_pruning: bool = True,
    num_batches: Optional[int] = None,
    fisher_type: str = "true",
    loss_fn: Optional[Callable] = None,
    sample_fn: Optional[Callable] = None,
    tolerance: float = 0.02,
    progress: bool = True,
    **tp_kwargs,
):
    """Prune ``model`` in place with a second-order criterion; returns ``(model, report)``.

    Args:
        model: the model; changed in place on success, left as it was on failure.
        data: batches for the statistics (see :func:`collect_kfac`).
        example_inputs: an input batch for Torch-Pruning's tracing and FLOP counting.
        pruning_ratio / target_params / target_flops: exactly one. ``pruning_ratio`` has
            Torch-Pruning's meaning (share of channels removed); the targets are the share of
            the ORIGINAL parameters / FLOPs to keep, counting KFE rotation layers, reached
            within ``tolerance`` (relative).
        method: "eigendamage" (KFE + EigenDamageImportance), "kron_obd", "kron_obs" (with
            OBS weight compensation), "fisher_diag", or any Torch-Pruning ``Importance``.
        iterative_steps: rounds of statistics → prune → ``finetune(model, round)``.
        ignored_layers: layers never pruned (timm classifiers are added automatically).
        max_layer_ratio: no layer loses more than this share of its original channels.
        global_pruning, **tp_kwargs: passed to ``torch_pruning.pruner.BasePruner``.
        num_batches, fisher_type, loss_fn, sample_fn: passed to :func:`collect_kfac`.
    """
    kind, value = _check_args(pruning_ratio, target_params, target_flops, method,
                              iterative_steps, finetune, max_layer_ratio, tp_kwargs)
    stats_kwargs = dict(num_batches=num_batches, fisher_type=fisher_type, loss_fn=loss_fn,
                        sample_fn=sample_fn, progress=progress)
    backup = copy.deepcopy(model)
    try:
        return _run(model, data, example_inputs, kind, value, method, iterative_steps, finetune,
                    list(ignored_layers or []), max_layer_ratio, global_pruning, stats_kwargs,
                    tolerance, tp_kwargs)
    except BaseException:
        _restore(model, backup)
        raise


def _run(model, data, example_inputs, kind, value, method, k, finetune, ignored, cap,
         global_pruning, stats_kwargs, tolerance, tp_kwargs):
    timm_helper = _timm_integration(model)
    before = measure_cost(model, example_inputs)
    before_layers = layer_stats(model, example_inputs)
    initial = _original_channels(model)
    damages: Dict[str, float] = {}
    rounds = []
    for r in range(1, k + 1):
        stats = _collect(method, model, data, stats_kwargs)
        cache: dict = {}
        if method == "eigendamage":
            to_kfe(model, stats, skip=ignored)

        def trial(ratio: float):
            model_copy, stats_copy = copy.deepcopy((model, stats))
            ignored_copy = [_same_module(model, model_copy, m) for m in ignored]
            _prune_pass(model_copy, stats_copy, example_inputs, method, ratio, ignored_copy,
                        cap, initial, tp_kwargs, timm_helper, global_pruning, cache, record_damage=False)
            return model_copy

        if kind == "pruning_ratio":
            keep_prev, keep_now = 1 - value * (r - 1) / k, 1 - value * r / k
            ratio = 1 - keep_now / keep_prev
        else:
            metric = "params" if kind == "target_params" else "flops"
            goal = value ** (r / k)
            ratio, _ = search_ratio(
                lambda x: measure_cost(trial(x), example_inputs).fraction_of(before, metric),
                goal, tolerance=tolerance, max_ratio=cap * 0.99)
        round_damage = _prune_pass(model, stats, example_inputs, method, ratio, ignored, cap,
                                   initial, tp_kwargs, timm_helper, global_pruning, cache)
        for name, d in round_damage.items():
            damages[name] = damages.get(name, 0.0) + d
        cost = measure_cost(model, example_inputs)
        rounds.append({"round": r, "channel_ratio": ratio, "params_fraction": cost.fraction_of(before, "params"),
                       "flops_fraction": cost.fraction_of(before, "flops"),
                       "predicted_damage": sum(round_damage.values())})
        if finetune is not None:
            finetune(model, r)
    after = measure_cost(model, example_inputs)
    report = build_report(_method_name(method), before_layers, layer_stats(model, example_inputs),
                          before, after, damages, rounds)
    return model, report


def _same_module(model: nn.Module, model_copy: nn.Module, module: nn.Module) -> nn.Module:
    """The module of ``model_copy`` at the place ``module`` has in ``model``."""
    for (_, m), (_, mc) in zip(model.named_modules(), model_copy.named_modules()):
        if m is module:
            return mc
    raise PruneArgumentError("ignored_layers contains a module that is not part of the model")
