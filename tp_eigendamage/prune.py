"""The one-call driver: statistics → (KFE) → Torch-Pruning → (compensation) → fold → report.

Each round ``r = 1..k`` of ``prune(..., iterative_steps=k)``:

1. collect K-FAC statistics on the model as it is now (``collect_kfac``);
2. ``method="eigendamage"``: rewrite (or re-rotate) layers in the KFE (``to_kfe``);
3. score every Torch-Pruning group of the model ONCE (``BasePruner`` on the model itself);
4. find how many channels to remove so that the model lands on this round's budget
   (``target^(r/k)`` of the original parameters / FLOPs, or Torch-Pruning's ``pruning_ratio``
   schedule): each candidate is pruned on a SHAPE-ONLY twin of the model (parameters on the
   ``meta`` device, no arithmetic) and counted there (:func:`tp_eigendamage.budget.search_ratio`);
5. remove them from the model with the scored pruner, never more than ``max_layer_ratio`` of
   any layer's original channels / directions; ``kron_obs`` first applies the K-FAC OBS
   compensation to the consumer layers;
6. fold KFE blocks whose bottleneck does not pay (``fold_kfe``), then ``finetune(model, r)``.

A twin runs the same Torch-Pruning code on the same shapes with the cached scores, so it
costs exactly what the model costs after the same pruning. Models whose forward cannot run on
the ``meta`` device get twins with real (copied) tensors instead.

The user's model is changed only on success: a deep copy is taken first, and if any step
raises, the model's submodules, parameters and buffers are put back from that copy (the
top-level object stays the same; its submodules are the copy's) before the error propagates.
Errors raised by Torch-Pruning while tracing or pruning, and a pruned model that no longer
runs, become a :class:`PruningError` naming the stage and the innermost failing module.
"""
from __future__ import annotations

import contextlib
import copy
import itertools
import math
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch_pruning as tp

from . import importance as imp_mod
from .budget import Cost, TargetUnreachableError, measure_cost, search_ratio
from .damage import obs_compensation
from .diag_fisher import collect_fisher_diag
from .kfac import KFACError, StaleStatisticsError, collect_kfac, default_forward_fn, to_device
from .kfe import KFEBlock, KFEError, fold_kfe, kfe_blocks, to_kfe
from .layers import adapter_for
from .report import build_report, layer_stats

METHODS = ("eigendamage", "kron_obd", "kron_obs", "fisher_diag")
_CONTROLLED_KWARGS = ("importance", "pruning_ratio", "ignored_layers", "iterative_steps",
                      "max_pruning_ratio", "example_inputs", "model")
#: Torch-Pruning mutates these dicts (and shares its defaults between pruners): always fresh.
_MUTATED_KWARGS = ("in_channel_groups", "out_channel_groups", "num_heads")


class PruneArgumentError(ValueError):
    """Bad arguments to :func:`prune`; raised before any work starts."""


class PruningError(RuntimeError):
    """Torch-Pruning could not trace or prune the model, or the pruned model no longer runs."""


def _check_args(pruning_ratio, target_params, target_flops, method, iterative_steps, finetune,
                max_layer_ratio, tp_kwargs) -> Tuple[str, float]:
    given = {k: v for k, v in (("pruning_ratio", pruning_ratio), ("target_params", target_params),
                               ("target_flops", target_flops)) if v is not None}
    if len(given) != 1:
        raise PruneArgumentError(
            f"pass exactly one of pruning_ratio, target_params, target_flops (got {sorted(given) or 'none'})")
    (kind, value), = given.items()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise PruneArgumentError(
            f"{kind}={value!r} must be a fraction strictly between 0 and 1 "
            + ("(the share of channels to remove)" if kind == "pruning_ratio"
               else "(the share of the original cost to keep, e.g. 0.5)"))
    if not (method in METHODS or isinstance(method, tp.importance.Importance)):
        raise PruneArgumentError(
            f"method={method!r}: choose one of {METHODS} or pass a torch_pruning Importance instance")
    if isinstance(iterative_steps, bool) or not isinstance(iterative_steps, int) or iterative_steps < 1:
        raise PruneArgumentError(f"iterative_steps={iterative_steps!r} must be a positive integer")
    if finetune is not None and not callable(finetune):
        raise PruneArgumentError(
            f"finetune must be a callable finetune(model, round) or None, got {type(finetune).__name__}")
    if isinstance(max_layer_ratio, bool) or not isinstance(max_layer_ratio, (int, float)) \
            or not 0 < max_layer_ratio < 1:
        raise PruneArgumentError(f"max_layer_ratio={max_layer_ratio!r} must be in (0, 1)")
    clash = sorted(set(tp_kwargs) & set(_CONTROLLED_KWARGS))
    if clash:
        raise PruneArgumentError(
            f"{clash} are set by prune() itself; use its own arguments instead (target / "
            "pruning_ratio, method, ignored_layers, iterative_steps, max_layer_ratio, global_pruning)")
    return kind, float(value)


def _method_name(method) -> str:
    return method if isinstance(method, str) else type(method).__name__


_IMPORTANCES = {
    "eigendamage": imp_mod.EigenDamageImportance,
    "kron_obd": imp_mod.KroneckerOBDImportance,
    # OBS compensation updates the consumers, so its score is the consumers' joint damage
    "kron_obs": lambda stats: imp_mod.KroneckerOBSImportance(stats, side="consumer"),
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


def _kfe_part(name: str, modules: Dict[str, nn.Module]) -> Optional[Tuple[str, str]]:
    """``(block name, part)`` if ``name`` is a part (``rotate_in``/``core``/``rotate_out``) of a
    KFE block in ``modules``, else None."""
    parent, _, leaf = name.rpartition(".")
    return (parent, leaf) if isinstance(modules.get(parent), KFEBlock) else None


def _layer_name(model_names: Dict[int, str], module: nn.Module, modules: Dict[str, nn.Module]) -> str:
    """Qualified name of the reported layer owning ``module`` (a KFE block for its parts)."""
    name = model_names.get(id(module), "?")
    part = _kfe_part(name, modules)
    return part[0] if part else name


def _original_channels(model: nn.Module) -> Dict[str, Tuple[int, int]]:
    out = {}
    for name, m in model.named_modules():
        a = adapter_for(m)
        if a is not None:
            out[name] = (a.in_features(m), a.out_features(m))
    return out


# -- errors from Torch-Pruning -----------------------------------------------------------------
_OWN_ERRORS = (PruneArgumentError, PruningError, TargetUnreachableError, KFACError,
               StaleStatisticsError, KFEError)


def _failing_module(model: nn.Module, example_inputs) -> Optional[str]:
    """``'name' (Type)`` of the innermost module running when ``model(example_inputs)`` raises;
    None if the forward runs."""
    names = {m: n for n, m in model.named_modules()}
    stack: List[nn.Module] = []

    def enter(module, args):
        stack.append(module)

    def leave(module, args, output):
        stack.pop()

    hooks = [h for m in names for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    try:
        with torch.no_grad():
            default_forward_fn(model, example_inputs)
    except Exception:
        return f"'{names[stack[-1]] or '<model>'}' ({type(stack[-1]).__name__})" if stack else "<model>"
    finally:
        for h in hooks:
            h.remove()
    return None


@contextlib.contextmanager
def _torch_pruning_errors(stage: str, model: nn.Module, example_inputs, hint: str = ""):
    """Re-raise anything but this package's own errors as a :class:`PruningError` that names
    ``stage`` and, if the model's forward fails, the innermost failing module."""
    try:
        yield
    except _OWN_ERRORS:
        raise
    except Exception as exc:
        where = _failing_module(model, example_inputs)
        at = f"; the model's forward fails in {where}" if where else ""
        raise PruningError(f"{stage} failed{at}: {type(exc).__name__}: {exc}. {hint}".rstrip()) from exc


_IGNORE_HINT = ("Torch-Pruning cannot handle this layer or operation: add it (or its parent "
                "module) to ignored_layers, or give Torch-Pruning customized_pruners / "
                "unwrapped_parameters for it.")


# -- one round's scores ------------------------------------------------------------------------
class _RoundImportance(tp.importance.Importance):
    """A criterion as one round of :func:`prune` uses it: capped, tie-broken and cached.

    * Cap: in each group, the channels a member must keep (``ceil(original·(1 − cap))``, at
      least 1) get score +∞, so Torch-Pruning's threshold never selects them. KFE parts
      inherit the original layer's count: ``rotate_in`` and the core's input side count as
      the layer's input, ``rotate_out`` and the core's output side as its output.
    * Ties: exact ties (e.g. channels feeding a zero-initialised BatchNorm, whose damage is
      exactly 0) are broken by ``1e-20 ×`` the channel's relative L2 weight magnitude, far
      below any damage float32 can tell apart from another.
    * Cache: scores do not depend on the pruning amount, so every group is scored once per
      round, on the model itself; shape-only twins (``for_twin``) read the cache (keyed by the
      root layer's name and pruning function) and never score.
    """

    TIE_BREAK = 1e-20

    def __init__(self, inner, cap: float, initial: Dict[str, Tuple[int, int]]):
        self.inner, self.cap, self.initial = inner, cap, initial
        self.magnitude = tp.importance.GroupMagnitudeImportance(p=2, normalizer="max")
        self.raw: Dict[tuple, Optional[torch.Tensor]] = {}      # the criterion's scores
        self.scores: Dict[tuple, Optional[torch.Tensor]] = {}   # capped and tie-broken
        self.scoring = True
        self.DG, self.names, self.modules = None, {}, {}

    def for_twin(self) -> "_RoundImportance":
        """A read-only view of the cache for a twin of the model (attach it to the twin)."""
        twin = copy.copy(self)
        twin.scoring = False
        return twin

    def attach(self, model: nn.Module, DG) -> None:
        self.DG = DG
        self.modules = dict(model.named_modules())
        self.names = {id(m): n for n, m in self.modules.items()}

    def key(self, group) -> tuple:
        root = group[0].dep
        return self.names.get(id(root.target.module)), root.handler

    def damage(self, group) -> Tuple[Optional[str], float]:
        """``(reported layer, Σ criterion scores)`` of the channels a pruning ``group`` removes."""
        raw = self.raw.get(self.key(group))
        if raw is None:
            return None, 0.0
        name = _layer_name(self.names, group[0].dep.target.module, self.modules)
        return name, float(raw[torch.as_tensor(group[0].idxs, dtype=torch.long)].sum())

    def __call__(self, group):
        key = self.key(group)
        if key not in self.scores:
            if not self.scoring:
                raise RuntimeError(f"internal error: group rooted at {key[0]!r} was not scored "
                                   "on the model before the budget search")
            self._score(key, group)
        return self.scores[key]

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

    def _original(self, module: nn.Module, is_out: bool) -> Optional[int]:
        name = self.names.get(id(module), "")
        part = _kfe_part(name, self.modules)
        if part and part[0] in self.initial:
            name, is_out = part[0], {"rotate_in": False, "rotate_out": True}.get(part[1], is_out)
        return self.initial[name][1 if is_out else 0] if name in self.initial else None

    def _score(self, key, group) -> None:
        raw = self.inner(group)
        self.raw[key] = self.scores[key] = None
        if raw is None:
            return
        self.raw[key] = raw = raw.detach().float().cpu()
        scores = raw.clone()
        magnitude = self.magnitude(group)
        if magnitude is not None:
            scores += self.TIE_BREAK * torch.nan_to_num(magnitude.float().cpu())
        scores[torch.topk(scores, self._must_keep(group)).indices] = float("inf")
        self.scores[key] = scores


# -- pruning a model (or its twin) at a channel ratio ------------------------------------------
@dataclass
class _Setup:
    """What every round needs besides the model and its statistics."""

    example_inputs: object
    method: object
    ignored: List[nn.Module]
    cap: float
    initial: Dict[str, Tuple[int, int]]
    global_pruning: bool
    tp_kwargs: dict
    timm_helper: object


def _pruner(model, example_inputs, importance, ignored, tp_kwargs, setup: _Setup, ratio: float):
    kwargs = dict(setup.timm_helper.pruner_kwargs(model)) if setup.timm_helper else {}
    ignored = list(ignored) + list(kwargs.pop("ignored_layers", []))
    kwargs.update(tp_kwargs)
    kwargs.update({k: dict(kwargs.get(k) or {}) for k in _MUTATED_KWARGS})
    pruner = tp.pruner.BasePruner(model, example_inputs, importance=importance, pruning_ratio=ratio,
                                  global_pruning=setup.global_pruning, ignored_layers=ignored, **kwargs)
    importance.attach(model, pruner.DG)
    return pruner


def _groups_at(pruner, ratio: float):
    """The groups ``pruner`` removes at channel ratio ``ratio``, created one at a time (a
    generator: prune each before asking for the next, as Torch-Pruning's own ``step()`` does —
    concatenations map indices through the CURRENT shapes)."""
    pruner.reset()
    pruner.per_step_pruning_ratio = pruner.iterative_pruning_ratio_scheduler(ratio, pruner.iterative_steps)
    return pruner.step(interactive=True)


def _remove(model, pruner, ratio: float, setup: _Setup, names: Dict[int, str],
            before_each: Callable = lambda group: None) -> None:
    """Prune at channel ``ratio`` group by group, fix timm attention, fold unprofitable KFE blocks."""
    for group in _groups_at(pruner, ratio):
        before_each(group)
        root = group[0].dep.target.module
        with _torch_pruning_errors(f"removing channels of '{names.get(id(root), '?')}' "
                                   f"({type(root).__name__}) and the layers coupled to it",
                                   model, setup.example_inputs, _IGNORE_HINT):
            group.prune()
    if setup.timm_helper:
        setup.timm_helper.fix_attention_after_pruning(model, pruner.num_heads)
    fold_kfe(model, only_unprofitable=True)


def _checked_cost(model, example_inputs) -> Cost:
    with _torch_pruning_errors("running the pruned model", model, example_inputs, _IGNORE_HINT):
        return measure_cost(model, example_inputs)


def _twin(model: nn.Module, extra, meta: bool):
    """Deep copy of ``(model, extra)``; ``meta=True`` puts parameters and buffers on the meta
    device (shapes only: no storage is copied and no arithmetic is done)."""
    memo: dict = {}
    if meta:
        for t in itertools.chain(model.parameters(), model.buffers()):
            memo[id(t)] = (nn.Parameter(t.detach().to("meta"), requires_grad=t.requires_grad)
                           if isinstance(t, nn.Parameter) else t.detach().to("meta"))
    return copy.deepcopy((model, extra), memo)


class _Round:
    """One round on ``model``: one pruner, every group scored once, candidates measured on twins."""

    def __init__(self, model: nn.Module, stats, setup: _Setup):
        self.model, self.setup = model, setup
        self.importance = _RoundImportance(_make_importance(setup.method, stats), setup.cap, setup.initial)
        with _torch_pruning_errors("tracing the model with Torch-Pruning", model, setup.example_inputs,
                                   _IGNORE_HINT):
            self.pruner = _pruner(model, setup.example_inputs, self.importance, setup.ignored,
                                  setup.tp_kwargs, setup, 0.0)
        list(_groups_at(self.pruner, 0.0))   # scores every group (ratio 0 removes nothing)
        self.meta = True
        self.trials = 0

    def cost_at(self, ratio: float) -> Cost:
        """What the model would cost after this round's pruning at channel ``ratio``."""
        self.trials += 1
        if self.meta:
            try:
                return self._twin_cost(ratio, meta=True)
            except Exception:   # a forward that needs real values: measure on real copies
                self.meta = False
        return self._twin_cost(ratio, meta=False)

    def _twin_cost(self, ratio: float, meta: bool) -> Cost:
        twin, (ignored, tp_kwargs) = _twin(self.model, (self.setup.ignored, self.setup.tp_kwargs), meta)
        inputs = to_device(self.setup.example_inputs, "meta") if meta else self.setup.example_inputs
        importance = self.importance.for_twin()
        with _torch_pruning_errors("tracing the model with Torch-Pruning", twin, inputs, _IGNORE_HINT):
            pruner = _pruner(twin, inputs, importance, ignored, tp_kwargs, self.setup, ratio)
        _remove(twin, pruner, ratio, self.setup, importance.names)
        return _checked_cost(twin, inputs)

    def apply(self, ratio: float, stats) -> Dict[str, float]:
        """Prune the model at channel ``ratio``; returns the predicted damage per reported layer.

        ``kron_obs`` first compensates every consumer for ALL its removed inputs at once (the
        groups listed on the unpruned model), then the same groups are pruned one by one.
        """
        if self.setup.method == "kron_obs":
            _compensate(list(_groups_at(self.pruner, ratio)), self.pruner.DG, stats)
        damages: Dict[str, float] = {}

        def record(group):
            name, value = self.importance.damage(group)
            if name is not None:
                damages[name] = damages.get(name, 0.0) + value

        _remove(self.model, self.pruner, ratio, self.setup, self.importance.names, record)
        return damages


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


def _restore(model: nn.Module, backup: nn.Module) -> None:
    model.__dict__.clear()
    model.__dict__.update(backup.__dict__)


def _resolve_ignored(model: nn.Module, ignored_layers) -> List[nn.Module]:
    ignored = list(ignored_layers or [])
    inside = {id(m) for m in model.modules()}
    for m in ignored:
        if not isinstance(m, nn.Module) or id(m) not in inside:
            raise PruneArgumentError(
                f"ignored_layers contains {type(m).__name__}, which is not a submodule of the model; "
                "pass the model's own layers (e.g. [model.fc])")
    return ignored


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

    Raises:
        PruneArgumentError: bad arguments (before any work).
        TargetUnreachableError: the target cannot be met within the caps and ``tolerance``.
        PruningError: Torch-Pruning cannot trace / prune the model (names the module).
    """
    kind, value = _check_args(pruning_ratio, target_params, target_flops, method,
                              iterative_steps, finetune, max_layer_ratio, tp_kwargs)
    ignored = _resolve_ignored(model, ignored_layers)
    stats_kwargs = dict(num_batches=num_batches, fisher_type=fisher_type, loss_fn=loss_fn,
                        sample_fn=sample_fn, progress=progress)
    setup = _Setup(example_inputs=example_inputs, method=method, ignored=ignored, cap=max_layer_ratio,
                   initial=_original_channels(model), global_pruning=global_pruning,
                   tp_kwargs=tp_kwargs, timm_helper=_timm_integration(model))
    backup = copy.deepcopy(model)
    try:
        return _run(model, data, kind, value, iterative_steps, finetune, setup, stats_kwargs, tolerance)
    except BaseException:
        _restore(model, backup)
        raise


def _run(model, data, kind, value, k, finetune, setup: _Setup, stats_kwargs, tolerance):
    before_layers, before = layer_stats(model, setup.example_inputs)
    current, exponent = before, 2.0
    damages: Dict[str, float] = {}
    rounds, blocks_built = [], 0
    for r in range(1, k + 1):
        stats = _collect(setup.method, model, data, stats_kwargs)
        if setup.method == "eigendamage":
            blocks_before = {id(b) for _, b in kfe_blocks(model)}
            to_kfe(model, stats, skip=setup.ignored)
            blocks_built += sum(id(b) not in blocks_before for _, b in kfe_blocks(model))
        round_ = _Round(model, stats, setup)
        if kind == "pruning_ratio":
            keep_prev, keep_now = 1 - value * (r - 1) / k, 1 - value * r / k
            ratio = 1 - keep_now / keep_prev
        else:
            metric = "params" if kind == "target_params" else "flops"
            ratio, _, exponent = search_ratio(
                lambda x: round_.cost_at(x).fraction_of(before, metric), value ** (r / k),
                start=current.fraction_of(before, metric), exponent=exponent,
                tolerance=tolerance, max_ratio=setup.cap * 0.99)
        round_damage = round_.apply(ratio, stats)
        for name, d in round_damage.items():
            damages[name] = damages.get(name, 0.0) + d
        current = _checked_cost(model, setup.example_inputs)
        rounds.append({"round": r, "channel_ratio": ratio, "params_fraction": current.fraction_of(before, "params"),
                       "flops_fraction": current.fraction_of(before, "flops"),
                       "predicted_damage": sum(round_damage.values()), "search_trials": round_.trials})
        if finetune is not None:
            finetune(model, r)
    after_layers, after = layer_stats(model, setup.example_inputs)
    report = build_report(_method_name(setup.method), before_layers, after_layers, before, after,
                          damages, rounds, kfe_blocks_built=blocks_built)
    return model, report
