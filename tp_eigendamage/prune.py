"""The one-call driver: statistics → (KFE) → Torch-Pruning → (compensation) → forms → report.

Each round ``r = 1..k`` of ``prune(..., iterative_steps=k)``:

1. collect the method's statistics on the model as it is now (K-FAC factors for the
   second-order methods; :mod:`tp_eigendamage.methods`);
2. ``method="eigendamage"``: eigendecompose the factors and rewrite (or re-rotate) layers in
   the KFE (``to_kfe``);
3. score every Torch-Pruning group of the model ONCE;
4. find how many channels to remove so that the model lands on this round's budget
   (``target^(r/k)`` of the original parameters / FLOPs / latency, or Torch-Pruning's
   ``pruning_ratio`` schedule): each candidate is pruned on a SHAPE-ONLY twin of the model (with
   a copy of the step-3 dependency graph: no new trace), its KFE blocks stored as in step 6, and
   counted there (:func:`tp_eigendamage.budget.search_ratio`);
   for a latency target the twin holds real tensors and is timed next to the unpruned model;
5. remove them from the model, never more than ``max_layer_ratio`` of any layer's original
   channels / directions; ``kron_obs`` first applies the K-FAC OBS compensation to the
   consumer layers;
6. store each KFE block in its cheapest form by ``form_cost`` (:func:`~tp_eigendamage.to_cheapest_forms`):
   before the last round a block stays a block (the next round re-rotates it) or is folded
   into one dense layer; after the last round it may also take a two-layer form. Then
   ``finetune(model, r)``.

The report's ``timings`` split the wall time into these stages, plus the latency measurements
(the unpruned and the pruned model, timed side by side at the end, for every target).

What happens to the user's model:

* all work is done on a private deep copy (parameters, buffers, ``.grad``, hooks; module
  references in ``ignored_layers`` and Torch-Pruning options follow it). If anything raises,
  the copy is dropped and the user's model was never touched: the same Parameter / buffer /
  module objects, values, ``.grad``, flags, modes and hooks.
* on success the result moves into the user's model object: it stays the object the user
  holds, its submodules, parameters and buffers become the pruned ones (so an optimizer built
  before must be rebuilt; ``finetune(model, round)`` receives the working copy and must build
  its optimizer inside, as :func:`~tp_eigendamage.training.finetune_callback` does).
* every module keeps its ``training`` flag and every parameter its ``requires_grad``, matched by
  qualified name; modules created on the way (KFE parts, folded layers) take those of the
  layer they replace (:func:`~tp_eigendamage._model_state.adopt_modes_flags_hooks`). Frozen
  layers are pruned like any other (unless listed in ``ignored_layers``) and stay frozen.
* hooks: each module with an original of the same name carries the user's very hook tables,
  a KFE block or folded layer those of the layer it replaced (:mod:`tp_eigendamage.kfe`).
* the layers producing the model's outputs (:func:`~tp_eigendamage.heads.output_layers`)
  never lose output channels.

Errors raised by Torch-Pruning while tracing or pruning, and a pruned model that no longer
runs, become a :class:`~tp_eigendamage.errors.PruningError` naming the stage and the
innermost failing module.
"""
from __future__ import annotations

import contextlib
import copy
import time
import warnings
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple, Union

import torch.nn as nn
import torch_pruning as tp

from . import _tp
from ._model_state import adopt_modes_flags_hooks
from ._options import RANKINGS, FisherType, Ranking, check_choice
from ._passes import check_data, is_one_shot
from ._round import PruneConfig, Round, checked_cost, latency_fraction, store_forms
from .batches import Inputs, default_batch_fn, default_forward_fn
from .batchnorm import batchnorm_layers, recalibrate_batchnorm
from .budget import search_ratio
from .eigen import PRECISIONS, Precision
from .errors import PruneArgumentError
from .forms import COSTS
from .heads import output_layers, unique_modules
from .kfac import MAX_FACTOR_DIM
from .kfe import kfe_blocks, kfe_targets, to_kfe
from .latency import latency_clock, measure_latency
from .layers import adapter_for
from .methods import METHODS, Method, get_method
from .report import PruneReport, build_report, layer_stats

__all__ = ["prune", "STAGES"]

#: The stages ``PruneReport.timings`` splits the wall time into (seconds each).
STAGES = ("statistics", "eigendecomposition", "rewrite", "scoring", "ratio_search", "pruning", "fold",
          "batchnorm", "latency")

_CONTROLLED_KWARGS = ("importance", "pruning_ratio", "ignored_layers", "iterative_steps",
                      "max_pruning_ratio", "example_inputs", "model")


#: The cost KFE blocks' forms are chosen by, per budget (``form_cost=None``).
FORM_COST_OF_TARGET = {"target_params": "params", "target_flops": "flops", "target_latency": "latency",
                       "pruning_ratio": "flops"}
#: The cost ``ranking="damage_per_cost"`` divides by, per budget: FLOPs stand in for latency
#: (a count is known per layer before pruning, a latency is not) and for ``pruning_ratio``.
RANKING_COST_OF_TARGET = {"target_params": "params", "target_flops": "flops", "target_latency": "flops",
                          "pruning_ratio": "flops"}
#: Budgets whose default ranking is ``"damage_per_cost"`` for criteria in loss units
#: (``ranking=None``), chosen on benchmarks/paper_protocol.py (README, "The paper's protocol").
PER_COST_BY_DEFAULT = ("target_flops", "target_latency")


def default_ranking(target: str, method: Method) -> str:
    """``"damage_per_cost"`` for a FLOP or latency budget and a criterion whose scores are
    predicted loss increases (additive, on one scale across layers: the knapsack's damages),
    ``"damage"`` otherwise."""
    return "damage_per_cost" if target in PER_COST_BY_DEFAULT and method.loss_units else "damage"
#: ``tolerance=None``: measured latency is noisier than a count.
DEFAULT_TOLERANCE = {"target_latency": 0.05}


def _check_args(targets: Dict[str, Optional[float]], method, iterative_steps, finetune,
                max_layer_ratio, tolerance, form_cost, tp_kwargs) -> Tuple[str, float, float, str]:
    """Validate ``prune()``'s arguments; returns ``(target name, value, tolerance, form cost)``."""
    given = {k: v for k, v in targets.items() if v is not None}
    if len(given) != 1:
        raise PruneArgumentError(
            f"pass exactly one of {', '.join(targets)} (got {sorted(given) or 'none'})")
    (target, value), = given.items()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise PruneArgumentError(
            f"{target}={value!r} must be a fraction strictly between 0 and 1 "
            + ("(the share of channels to REMOVE)" if target == "pruning_ratio"
               else "(the share of the original cost to KEEP, e.g. 0.5)"))
    if not (isinstance(method, tp.importance.Importance) or (isinstance(method, str) and method in METHODS)):
        raise PruneArgumentError(
            f"method={method!r}: choose one of {', '.join(METHODS)} or pass a torch_pruning "
            "Importance instance")
    if isinstance(iterative_steps, bool) or not isinstance(iterative_steps, int) or iterative_steps < 1:
        raise PruneArgumentError(f"iterative_steps={iterative_steps!r} must be a positive integer")
    if finetune is not None and not callable(finetune):
        raise PruneArgumentError(
            f"finetune must be a callable finetune(model, round) or None, got {type(finetune).__name__}")
    tolerance = DEFAULT_TOLERANCE.get(target, 0.02) if tolerance is None else tolerance
    for name, number in (("max_layer_ratio", max_layer_ratio), ("tolerance", tolerance)):
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not 0 < number < 1:
            raise PruneArgumentError(f"{name}={number!r} must be in (0, 1)")
    if form_cost is not None and form_cost not in COSTS:
        raise PruneArgumentError(f"form_cost={form_cost!r}: choose one of {', '.join(COSTS)} (or None: "
                                 "the budgeted cost)")
    clash = sorted(set(tp_kwargs) & set(_CONTROLLED_KWARGS))
    if clash:
        raise PruneArgumentError(
            f"{clash} are set by prune() itself; use its own arguments instead (target / "
            "pruning_ratio, method, ignored_layers, iterative_steps, max_layer_ratio, global_pruning)")
    return target, float(value), float(tolerance), form_cost or FORM_COST_OF_TARGET[target]


def _timm_integration(model: nn.Module):
    """The timm helper module if ``model`` is a timm model, else None."""
    if type(model).__module__.startswith("timm."):
        from .integrations import timm as timm_integration
        return timm_integration
    return None


def _original_channels(model: nn.Module) -> Dict[str, Tuple[int, int]]:
    out = {}
    for name, m in model.named_modules():
        a = adapter_for(m)
        if a is not None:
            out[name] = (a.in_features(m), a.out_features(m))
    return out


def _resolve_ignored(model: nn.Module, ignored_layers) -> List[nn.Module]:
    ignored = list(ignored_layers or [])
    inside = {id(m) for m in model.modules()}
    for m in ignored:
        if not isinstance(m, nn.Module) or id(m) not in inside:
            raise PruneArgumentError(
                f"ignored_layers contains {type(m).__name__}, which is not a submodule of the model; "
                "pass the model's own layers (e.g. [model.fc])")
    return ignored


def _check_data(data, method, iterative_steps: int) -> None:
    """The data must be batches, and readable once per round."""
    if method.statistics is None:
        return
    check_data(data, PruneArgumentError)
    if iterative_steps > 1 and is_one_shot(data):
        raise PruneArgumentError(
            f"data is a one-shot iterator ({type(data).__name__}), but iterative_steps="
            f"{iterative_steps} collects statistics once per round; pass a list of batches or a "
            "DataLoader, which can be read again")


def _is_compiled(module: nn.Module) -> bool:
    """A ``torch.compile`` wrapper (``OptimizedModule``, which holds the module as ``_orig_mod``)."""
    return type(module).__name__ == "OptimizedModule" and isinstance(getattr(module, "_orig_mod", None), nn.Module)


def _uncompiled(model: nn.Module) -> nn.Module:
    """The module to prune: a ``torch.compile`` wrapper is unwrapped (with a warning); compiled
    submodules are refused; modules compiled in place (``module.compile()``) run eagerly."""
    if _is_compiled(model):
        warnings.warn("prune() got a torch.compile'd model: it prunes the module it wraps "
                      "(model._orig_mod) and returns that module, uncompiled; call torch.compile "
                      "on the result again", stacklevel=3)
        model = model._orig_mod
    for name, module in model.named_modules():
        if _is_compiled(module):
            raise PruneArgumentError(
                f"'{name}' is a torch.compile'd submodule (OptimizedModule); prune the plain model "
                f"(put '{name}._orig_mod' in its place), then compile again")
    if any(m._compiled_call_impl is not None for m in model.modules()):
        warnings.warn("the model was compiled in place (module.compile()); prune() runs it eagerly "
                      "and returns it uncompiled: call .compile() on the result again", stacklevel=3)
    return model


def _private_copy(model: nn.Module, ignored: List[nn.Module], tp_kwargs: dict):
    """A deep copy of ``(model, ignored, tp_kwargs)`` (module references follow the copy).
    Copies run eagerly: ``nn.Module`` does not copy the code of ``module.compile()``."""
    try:
        return copy.deepcopy((model, ignored, tp_kwargs))
    except Exception as exc:
        raise PruneArgumentError(
            f"the model cannot be deep-copied ({type(exc).__name__}: {exc}); prune() works on a "
            "private copy so that a failure leaves your model untouched: remove the attribute "
            "that cannot be copied (e.g. an open file or a lock)") from exc


def _move_into(model: nn.Module, result: nn.Module) -> None:
    """Make the user's ``model`` object hold ``result``: its state, submodules, parameters and
    buffers, with the user's hooks, modes and flags (module docstring)."""
    adopt_modes_flags_hooks(result, model, hooks=True)
    model.__dict__.clear()    # also drops compiled code (``module.compile()``)
    model.__dict__.update(result.__dict__)


class _Stopwatch:
    """Wall time per stage of :data:`STAGES`, summed over rounds."""

    def __init__(self):
        self.seconds = dict.fromkeys(STAGES, 0.0)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start


def prune(
    model: nn.Module,
    data: Iterable,
    example_inputs: Inputs,
    *,
    pruning_ratio: Optional[float] = None,
    target_params: Optional[float] = None,
    target_flops: Optional[float] = None,
    target_latency: Optional[float] = None,
    method: Union[str, tp.importance.Importance] = "eigendamage",
    criterion_options: Optional[Mapping[str, Any]] = None,
    iterative_steps: int = 1,
    finetune: Optional[Callable[[nn.Module, int], None]] = None,
    ignored_layers: Optional[List[nn.Module]] = None,
    max_layer_ratio: float = 0.95,
    global_pruning: bool = True,
    num_batches: Optional[int] = None,
    batch_fn: Callable = default_batch_fn,
    forward_fn: Callable = default_forward_fn,
    fisher_type: FisherType = "true",
    loss_fn: Optional[Callable] = None,
    sample_fn: Optional[Callable] = None,
    tolerance: Optional[float] = None,
    form_cost: Optional[str] = None,
    ranking: Optional[Ranking] = None,
    eigen_precision: Precision = "float64",
    recalibrate_bn: bool = True,
    progress: bool = True,
    max_factor_dim: int = MAX_FACTOR_DIM,
    **tp_kwargs,
) -> Tuple[nn.Module, PruneReport]:
    """Prune ``model`` in place with a second-order (or any Torch-Pruning) criterion.

    Args:
        model: the model; changed in place on success, never touched on failure (module
            docstring). A ``torch.compile``'d model is pruned through the module it wraps
            (``model._orig_mod``), which is returned uncompiled.
        data: batches for the statistics (see :func:`~tp_eigendamage.collect_kfac`).
        example_inputs: an input batch for Torch-Pruning's tracing and FLOP counting.
        pruning_ratio: Torch-Pruning's meaning: the share of channels to REMOVE.
        target_params: the share of the ORIGINAL parameters to KEEP (KFE rotations counted),
            reached within ``tolerance`` (relative).
        target_flops: the share of the ORIGINAL FLOPs to KEEP, likewise.
        target_latency: the share of the ORIGINAL model's measured latency to KEEP: seconds per
            forward pass on ``example_inputs`` on the model's device, in eval mode, timed next to
            the unpruned model (:func:`~tp_eigendamage.latency.measure_latency`). Every trial of
            the search prunes a real copy and times it. Pass exactly one of ``pruning_ratio``,
            ``target_params``, ``target_flops``, ``target_latency``.
        method: a name from :data:`tp_eigendamage.methods.METHODS` — "eigendamage" (KFE +
            EigenDamageImportance), "kron_obd", "kron_obs" (with OBS weight compensation),
            "fisher_diag", or Torch-Pruning's "magnitude", "taylor", "bn_scale", "random" —
            or any Torch-Pruning ``Importance`` instance.
        criterion_options: keyword options of the registry method's criterion, over its
            defaults (``METHODS[method].criterion_defaults``), used in every round: for
            "eigendamage", "kron_obd" and "fisher_diag" ``side`` ("producer" / "consumer",
            which layers of a channel group carry its damage, docs/method.md §9) and
            ``first_order`` ("positive" / "signed" / "off", docs/method.md §4); "kron_obs"
            also ``damping``. E.g. ``{"side": "consumer", "first_order": "off"}``.
        iterative_steps: rounds of statistics → prune → ``finetune(model, round)``; above 1,
            ``data`` must be readable once per round (a list or DataLoader, not a generator).
        finetune: ``finetune(model, round)`` called after each round, or ``None``. It gets the
            working copy of the model (the user's object receives it at the end): build any
            optimizer inside ``finetune``.
        ignored_layers: layers whose output channels are never removed. The layers producing
            the model's outputs are added automatically (found in the traced graph).
        max_layer_ratio: no layer loses more than this share of its original channels.
        global_pruning: rank all groups in one list (loss-unit criteria) or per layer.
        num_batches, batch_fn, forward_fn, fisher_type, loss_fn, sample_fn, progress,
            max_factor_dim: the statistics pass options of :func:`~tp_eigendamage.collect_kfac`.
        tolerance: relative tolerance of the target; default 0.02 for parameters and FLOPs,
            0.05 for latency (a measurement, noisier than a count).
        form_cost: what each kept KFE block's storage form is chosen by after the last round
            (:func:`~tp_eigendamage.to_cheapest_forms`): ``"params"``, ``"flops"`` or
            ``"latency"``. Default: the budgeted cost — parameters for ``target_params``, FLOPs
            for ``target_flops`` and for ``pruning_ratio``, latency for ``target_latency``. By
            another cost, the budgeted cost jumps where a block changes form: a looser
            ``tolerance`` may be needed.
        ranking: how global pruning orders channels. ``"damage"``: by the criterion's score;
            ``"damage_per_cost"``: by score per unit of budgeted cost the channel's removal
            saves (its share of the FLOPs, or parameters for ``target_params``, of every layer
            it touches, counted on the model each round), the greedy answer to "remove the
            least damage that meets the budget" (docs/method.md §7). FLOPs stand in for
            latency and for ``pruning_ratio``. Default (None): ``"damage_per_cost"`` for
            ``target_flops`` and ``target_latency`` with the second-order methods (scores in
            loss units), ``"damage"`` otherwise (measured in the README's paper-protocol
            section). With ``global_pruning=False`` both give the same order within a layer.
        eigen_precision: ``"float64"`` or ``"float32"`` eigendecompositions of the factors
            (:mod:`tp_eigendamage.eigen`).
        recalibrate_bn: after every round's pruning (before ``finetune``), re-estimate every
            BatchNorm's running statistics on ``data`` (forward passes only,
            :func:`~tp_eigendamage.recalibrate_batchnorm`): removing many channels at once
            shifts what every later BatchNorm reads, which no damage accounts for (README,
            "The paper's protocol"). Skipped when ``data`` is None (methods without
            statistics) and, with a warning, when it is a one-shot iterator the statistics pass
            has used up or its batches hold one example (train-mode BatchNorm needs two).
        **tp_kwargs: passed to ``torch_pruning.pruner.BasePruner`` (e.g. ``round_to``,
            ``unwrapped_parameters``, ``customized_pruners``).

    Returns:
        ``(model, report)``: the same model object, pruned, and a
        :class:`~tp_eigendamage.PruneReport`.

    Raises:
        PruneArgumentError: bad arguments or data (before any work).
        TargetUnreachableError: the target cannot be met within the caps and ``tolerance``, or
            nothing can be pruned (every layer produces an output or is ignored).
        PruningError: Torch-Pruning cannot trace / prune the model (names the module).
        KFACError, KFEError, StaleStatisticsError: from the statistics pass and the KFE rewrite.
    """
    target, value, tolerance, form_cost = _check_args(
        dict(pruning_ratio=pruning_ratio, target_params=target_params, target_flops=target_flops,
             target_latency=target_latency), method, iterative_steps, finetune, max_layer_ratio, tolerance,
        form_cost, tp_kwargs)
    if isinstance(max_factor_dim, bool) or not isinstance(max_factor_dim, int) or max_factor_dim < 1:
        raise PruneArgumentError(f"max_factor_dim={max_factor_dim!r} must be a positive integer")
    check_choice(eigen_precision, "eigen_precision", PRECISIONS, PruneArgumentError)
    if not isinstance(recalibrate_bn, bool):
        raise PruneArgumentError(f"recalibrate_bn={recalibrate_bn!r} must be True or False")
    method = get_method(method)
    method.check_criterion_options(criterion_options or {})
    criterion_options = dict(criterion_options or {})
    ranking = default_ranking(target, method) if ranking is None else ranking
    check_choice(ranking, "ranking", RANKINGS, PruneArgumentError,
                 hint="or None: the default for the budget and method")
    _check_data(data, method, iterative_steps)
    model = _uncompiled(model)
    work, ignored, tp_kwargs = _private_copy(model, _resolve_ignored(model, ignored_layers), tp_kwargs)
    with _tp.pruning_errors("tracing the model with Torch-Pruning", work, example_inputs):
        outputs = output_layers(work, example_inputs, **tp_kwargs)
    stats_options = dict(num_batches=num_batches, fisher_type=fisher_type, loss_fn=loss_fn,
                         sample_fn=sample_fn, batch_fn=batch_fn, forward_fn=forward_fn, progress=progress,
                         max_factor_dim=max_factor_dim)
    config = PruneConfig(example_inputs=example_inputs, method=method, criterion_options=criterion_options,
                         ignored=unique_modules(ignored + outputs),
                         outputs=outputs, cap=max_layer_ratio, initial=_original_channels(work),
                         global_pruning=global_pruning, tp_kwargs=tp_kwargs,
                         timm_helper=_timm_integration(work), eigen_precision=eigen_precision,
                         form_cost=form_cost, unpruned=model, recalibrate_bn=recalibrate_bn,
                         ranking_cost=RANKING_COST_OF_TARGET[target] if ranking == "damage_per_cost" else None)
    report = _run(work, model, data, target, value, iterative_steps, finetune, config, stats_options, tolerance)
    _move_into(model, work)
    return model, report


def _recalibrate(model: nn.Module, data, stats_options) -> None:
    """Re-estimate the BatchNorm statistics on the statistics batches (if they can be read again;
    methods without statistics, e.g. ``magnitude``, may be given ``data=None``: then nothing)."""
    if data is None or not batchnorm_layers(model):
        return
    if is_one_shot(data):
        warnings.warn("data is a one-shot iterator that the statistics pass used up, so the "
                      "BatchNorm running statistics were not re-estimated after pruning; pass a list "
                      "of batches or a DataLoader (or recalibrate_bn=False to silence this)", stacklevel=4)
        return
    try:
        recalibrate_batchnorm(model, data, num_batches=stats_options["num_batches"],
                              batch_fn=stats_options["batch_fn"], forward_fn=stats_options["forward_fn"])
    except ValueError as exc:   # BatchNorm in train mode needs 2+ values per channel (batch of 1)
        warnings.warn(f"the BatchNorm running statistics were not re-estimated after pruning "
                      f"({exc}); pass batches of at least 2 examples, or recalibrate_bn=False to "
                      "silence this", stacklevel=4)


def _rewrite_in_kfe(model: nn.Module, stats, config: PruneConfig, clock: _Stopwatch) -> int:
    """Eigendecompose the factors of the layers to rewrite, then rewrite them (none if no layer
    is eligible: everything is then scored in channel space); returns the number of new blocks."""
    targets = kfe_targets(model, stats, skip=config.ignored)
    with clock.stage("eigendecomposition"):
        stats.eigendecompose(targets, config.eigen_precision)
    blocks_before = {id(b) for _, b in kfe_blocks(model)}
    with clock.stage("rewrite"):
        if targets:
            to_kfe(model, stats, modules=targets)
    return sum(id(b) not in blocks_before for _, b in kfe_blocks(model))


def _search(round_: Round, target: str, value: float, start: float, exponent: float, tolerance: float,
            config: PruneConfig, before) -> Tuple[float, float, float]:
    """``(channel ratio, fraction reached, exponent)`` of this round (:func:`search_ratio`)."""
    if target == "target_latency":
        achieved = round_.latency_at
    else:
        metric = "params" if target == "target_params" else "flops"
        achieved = lambda x: round_.metric_at(x, metric) / getattr(before, metric)  # noqa: E731
    return search_ratio(achieved, value, start=start, exponent=exponent, tolerance=tolerance,
                        max_ratio=config.cap * 0.99)


def _run(model, original, data, target, value, k, finetune, config: PruneConfig, stats_options,
         tolerance) -> PruneReport:
    """The rounds, on ``model`` (the working copy of ``original``)."""
    clock = _Stopwatch()
    before_layers, before = layer_stats(model, config.example_inputs)
    current, latency_now, exponent = before, 1.0, 2.0
    damages: Dict[str, float] = {}
    rounds, blocks_built = [], 0
    method = config.method
    for r in range(1, k + 1):
        with clock.stage("statistics"):
            stats = method.statistics(model, data, stats_options) if method.statistics else None
        if method.kfe:
            blocks_built += _rewrite_in_kfe(model, stats, config, clock)
        with clock.stage("scoring"):
            round_ = Round(model, stats, config, final=r == k)
        with clock.stage("ratio_search"):
            searched = None
            if target == "pruning_ratio":
                keep_prev, keep_now = 1 - value * (r - 1) / k, 1 - value * r / k
                ratio = 1 - keep_now / keep_prev
            else:
                start = {"target_params": current.fraction_of(before, "params"), "target_latency": latency_now,
                         "target_flops": current.fraction_of(before, "flops")}[target]
                ratio, searched, exponent = _search(round_, target, value ** (r / k), start, exponent,
                                                    tolerance, config, before)
        with clock.stage("pruning"):
            round_damage = round_.apply(ratio, stats)
        with clock.stage("fold"):
            store_forms(model, config, config.example_inputs, final=r == k)
        if config.recalibrate_bn:
            with clock.stage("batchnorm"):
                _recalibrate(model, data, stats_options)
        for name, d in round_damage.items():
            damages[name] = damages.get(name, 0.0) + d
        adopt_modes_flags_hooks(model, original, hooks=False)
        current = checked_cost(model, config.example_inputs)
        rounds.append({"round": r, "channel_ratio": ratio, "params_fraction": current.fraction_of(before, "params"),
                       "flops_fraction": current.fraction_of(before, "flops"),
                       "predicted_damage": sum(round_damage.values()), "search_trials": round_.trials,
                       "searched_fraction": searched})
        if target == "target_latency" and r < k:
            with clock.stage("latency"):
                latency_now = rounds[-1]["latency_fraction"] = latency_fraction(model, config)
        if finetune is not None:
            finetune(model, r)
    after_layers, after = layer_stats(model, config.example_inputs)
    with clock.stage("latency"):
        latency = measure_latency([original, model], config.example_inputs)
    return build_report(method.name, before_layers, after_layers, before, after, damages, rounds,
                        kfe_blocks_built=blocks_built, timings=dict(clock.seconds),
                        target={target: value}, loss_units=method.loss_units, latency=latency,
                        latency_clock=latency_clock(config.example_inputs, [model]))
