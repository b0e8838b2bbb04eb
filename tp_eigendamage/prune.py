"""The one-call driver: statistics → (KFE) → Torch-Pruning → (compensation) → fold → report.

Each round ``r = 1..k`` of ``prune(..., iterative_steps=k)``:

1. collect the method's statistics on the model as it is now (K-FAC factors for the
   second-order methods; :mod:`tp_eigendamage.methods`);
2. ``method="eigendamage"``: eigendecompose the factors and rewrite (or re-rotate) layers in
   the KFE (``to_kfe``);
3. score every Torch-Pruning group of the model ONCE;
4. find how many channels to remove so that the model lands on this round's budget
   (``target^(r/k)`` of the original parameters / FLOPs, or Torch-Pruning's ``pruning_ratio``
   schedule): each candidate is pruned on a SHAPE-ONLY twin of the model and counted there
   (:func:`tp_eigendamage.budget.search_ratio`);
5. remove them from the model, never more than ``max_layer_ratio`` of any layer's original
   channels / directions; ``kron_obs`` first applies the K-FAC OBS compensation to the
   consumer layers;
6. fold KFE blocks whose bottleneck does not pay (``fold_kfe``), then ``finetune(model, r)``.

The report's ``timings`` split the wall time into these stages.

The user's model is changed only on success: a deep copy is taken first, and if any step
raises, the model's submodules, parameters and buffers are put back from that copy (the
top-level object stays the same; its submodules are the copy's) before the error propagates.
Errors raised by Torch-Pruning while tracing or pruning, and a pruned model that no longer
runs, become a :class:`~tp_eigendamage.errors.PruningError` naming the stage and the
innermost failing module.
"""
from __future__ import annotations

import contextlib
import copy
import time
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Union

import torch.nn as nn
import torch_pruning as tp

from ._options import FisherType
from ._round import PruneConfig, Round, checked_cost
from .batches import Inputs, default_batch_fn, default_forward_fn
from .budget import search_ratio
from .errors import PruneArgumentError
from .kfe import fold_kfe, kfe_blocks, kfe_targets, to_kfe
from .layers import adapter_for
from .methods import METHODS, get_method
from .report import PruneReport, build_report, layer_stats

__all__ = ["prune", "STAGES"]

#: The stages ``PruneReport.timings`` splits the wall time into (seconds each).
STAGES = ("statistics", "eigendecomposition", "rewrite", "scoring", "ratio_search", "pruning", "fold")

_CONTROLLED_KWARGS = ("importance", "pruning_ratio", "ignored_layers", "iterative_steps",
                      "max_pruning_ratio", "example_inputs", "model")


def _check_args(pruning_ratio, target_params, target_flops, method, iterative_steps, finetune,
                max_layer_ratio, tolerance, tp_kwargs) -> Tuple[str, float]:
    """Validate ``prune()``'s arguments; returns ``(target name, value)``."""
    given = {k: v for k, v in (("pruning_ratio", pruning_ratio), ("target_params", target_params),
                               ("target_flops", target_flops)) if v is not None}
    if len(given) != 1:
        raise PruneArgumentError(
            f"pass exactly one of pruning_ratio, target_params, target_flops (got {sorted(given) or 'none'})")
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
    for name, number in (("max_layer_ratio", max_layer_ratio), ("tolerance", tolerance)):
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not 0 < number < 1:
            raise PruneArgumentError(f"{name}={number!r} must be in (0, 1)")
    clash = sorted(set(tp_kwargs) & set(_CONTROLLED_KWARGS))
    if clash:
        raise PruneArgumentError(
            f"{clash} are set by prune() itself; use its own arguments instead (target / "
            "pruning_ratio, method, ignored_layers, iterative_steps, max_layer_ratio, global_pruning)")
    return target, float(value)


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


def _restore(model: nn.Module, backup: nn.Module) -> None:
    model.__dict__.clear()
    model.__dict__.update(backup.__dict__)


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
    method: Union[str, tp.importance.Importance] = "eigendamage",
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
    tolerance: float = 0.02,
    progress: bool = True,
    **tp_kwargs,
) -> Tuple[nn.Module, PruneReport]:
    """Prune ``model`` in place with a second-order (or any Torch-Pruning) criterion.

    Args:
        model: the model; changed in place on success, left as it was on failure.
        data: batches for the statistics (see :func:`~tp_eigendamage.collect_kfac`).
        example_inputs: an input batch for Torch-Pruning's tracing and FLOP counting.
        pruning_ratio: Torch-Pruning's meaning: the share of channels to REMOVE.
        target_params: the share of the ORIGINAL parameters to KEEP (KFE rotations counted),
            reached within ``tolerance`` (relative).
        target_flops: the share of the ORIGINAL FLOPs to KEEP, likewise. Pass exactly one of
            ``pruning_ratio``, ``target_params``, ``target_flops``.
        method: a name from :data:`tp_eigendamage.methods.METHODS` — "eigendamage" (KFE +
            EigenDamageImportance), "kron_obd", "kron_obs" (with OBS weight compensation),
            "fisher_diag", or Torch-Pruning's "magnitude", "taylor", "bn_scale", "random" —
            or any Torch-Pruning ``Importance`` instance.
        iterative_steps: rounds of statistics → prune → ``finetune(model, round)``.
        finetune: ``finetune(model, round)`` called after each round, or ``None``.
        ignored_layers: layers never pruned (timm classifiers are added automatically).
        max_layer_ratio: no layer loses more than this share of its original channels.
        global_pruning: rank all groups in one list (loss-unit criteria) or per layer.
        num_batches, batch_fn, forward_fn, fisher_type, loss_fn, sample_fn, progress: the
            statistics pass options of :func:`~tp_eigendamage.collect_kfac`.
        tolerance: relative tolerance of the parameter / FLOP target.
        **tp_kwargs: passed to ``torch_pruning.pruner.BasePruner`` (e.g. ``round_to``,
            ``unwrapped_parameters``, ``customized_pruners``).

    Returns:
        ``(model, report)``: the same model object, pruned, and a
        :class:`~tp_eigendamage.PruneReport`.

    Raises:
        PruneArgumentError: bad arguments (before any work).
        TargetUnreachableError: the target cannot be met within the caps and ``tolerance``.
        PruningError: Torch-Pruning cannot trace / prune the model (names the module).
        KFACError, KFEError, StaleStatisticsError: from the statistics pass and the KFE rewrite.
    """
    target, value = _check_args(pruning_ratio, target_params, target_flops, method, iterative_steps,
                                finetune, max_layer_ratio, tolerance, tp_kwargs)
    ignored = _resolve_ignored(model, ignored_layers)
    stats_options = dict(num_batches=num_batches, fisher_type=fisher_type, loss_fn=loss_fn,
                         sample_fn=sample_fn, batch_fn=batch_fn, forward_fn=forward_fn, progress=progress)
    config = PruneConfig(example_inputs=example_inputs, method=get_method(method), ignored=ignored,
                         cap=max_layer_ratio, initial=_original_channels(model),
                         global_pruning=global_pruning, tp_kwargs=tp_kwargs,
                         timm_helper=_timm_integration(model))
    backup = copy.deepcopy(model)
    try:
        return _run(model, data, target, value, iterative_steps, finetune, config, stats_options, tolerance)
    except BaseException:
        _restore(model, backup)
        raise


def _rewrite_in_kfe(model: nn.Module, stats, config: PruneConfig, clock: _Stopwatch) -> int:
    """Eigendecompose the factors of the layers to rewrite, then rewrite them; returns the
    number of new blocks."""
    with clock.stage("eigendecomposition"):
        for module in kfe_targets(model, stats, skip=config.ignored):
            stats[module].eigen()
    blocks_before = {id(b) for _, b in kfe_blocks(model)}
    with clock.stage("rewrite"):
        to_kfe(model, stats, skip=config.ignored)
    return sum(id(b) not in blocks_before for _, b in kfe_blocks(model))


def _run(model, data, target, value, k, finetune, config: PruneConfig, stats_options, tolerance):
    clock = _Stopwatch()
    before_layers, before = layer_stats(model, config.example_inputs)
    current, exponent = before, 2.0
    damages: Dict[str, float] = {}
    rounds, blocks_built = [], 0
    method = config.method
    for r in range(1, k + 1):
        with clock.stage("statistics"):
            stats = method.statistics(model, data, stats_options) if method.statistics else None
        if method.kfe:
            blocks_built += _rewrite_in_kfe(model, stats, config, clock)
        with clock.stage("scoring"):
            round_ = Round(model, stats, config)
        with clock.stage("ratio_search"):
            searched = None
            if target == "pruning_ratio":
                keep_prev, keep_now = 1 - value * (r - 1) / k, 1 - value * r / k
                ratio = 1 - keep_now / keep_prev
            else:
                metric = "params" if target == "target_params" else "flops"
                ratio, searched, exponent = search_ratio(
                    lambda x: round_.cost_at(x).fraction_of(before, metric), value ** (r / k),
                    start=current.fraction_of(before, metric), exponent=exponent,
                    tolerance=tolerance, max_ratio=config.cap * 0.99)
        with clock.stage("pruning"):
            round_damage = round_.apply(ratio, stats)
        with clock.stage("fold"):
            fold_kfe(model, only_unprofitable=True)
        for name, d in round_damage.items():
            damages[name] = damages.get(name, 0.0) + d
        current = checked_cost(model, config.example_inputs)
        rounds.append({"round": r, "channel_ratio": ratio, "params_fraction": current.fraction_of(before, "params"),
                       "flops_fraction": current.fraction_of(before, "flops"),
                       "predicted_damage": sum(round_damage.values()), "search_trials": round_.trials,
                       "searched_fraction": searched})
        if finetune is not None:
            finetune(model, r)
    after_layers, after = layer_stats(model, config.example_inputs)
    return model, build_report(method.name, before_layers, after_layers, before, after, damages, rounds,
                               kfe_blocks_built=blocks_built, timings=dict(clock.seconds),
                               target={target: value}, loss_units=method.loss_units)
