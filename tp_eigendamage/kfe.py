"""Rewriting a model into the Kronecker-factored eigenbasis (KFE) and folding it back.

* :func:`to_kfe` rewrites eligible layers in place into :class:`~tp_eigendamage.KFEBlock` objects
  (docs/method.md §3); on a model that already holds KFE blocks it re-rotates each block whose
  core has fresh statistics and merges the new rotations into the existing rotation layers
  (§7), so a block never gets deeper than three stages.
* :func:`fold_kfe` multiplies a block back into one dense layer ``W' = Q_S' W*' Q_A'ᵀ`` (§6);
  :func:`to_cheapest_forms` stores each block in the cheapest of its four exact forms (three
  layers, two layers, one dense layer; :mod:`tp_eigendamage.forms`) by parameters, FLOPs or
  measured latency.

Hooks: a block computes exactly what the layer it replaces computed, so it takes over that
layer's forward (pre-)hooks and backward hooks — the very hook tables, so the user's handles
still remove them — and a fold (or any other form) hands them on to the module replacing the
block. State-dict hooks are not carried (the block's parameter names differ); a layer that has
some gets a warning naming it.
"""
from __future__ import annotations

import math
import warnings
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ._model_state import has_state_dict_hooks, restored_modes, share_hooks
from ._surgery import module_places, replace_module
from .batches import default_forward_fn
from .errors import KFEError, StaleStatisticsError
from .forms import COSTS, FORMS, FormLatencies, cheapest, form_macs, form_module
from .heads import classifier_layers
from .kfac import KFACStats
from .kfe_block import KFEBlock
from .layers import adapter_for
from .plain_layers import is_plain_layer

__all__ = ["to_kfe", "fold_kfe", "to_cheapest_forms", "kfe_blocks", "kfe_part", "kfe_targets", "ModuleRef"]


def kfe_blocks(model: nn.Module) -> List[Tuple[str, KFEBlock]]:
    """Every :class:`KFEBlock` of ``model`` as ``(qualified name, block)``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, KFEBlock)]


def kfe_part(name: str, modules: Dict[str, nn.Module]) -> Optional[Tuple[str, str]]:
    """``(block name, part)`` if ``name`` is a part (``rotate_in`` / ``core`` / ``rotate_out``)
    of a KFE block in ``modules`` (``dict(model.named_modules())``), else ``None``."""
    parent, _, leaf = name.rpartition(".")
    return (parent, leaf) if isinstance(modules.get(parent), KFEBlock) else None


def _replace(places, old: nn.Module, new: nn.Module, name: str) -> None:
    """Register ``new`` wherever ``old`` is, with ``old``'s call hooks (module docstring)."""
    share_hooks(old, new, state_dict=False)
    if has_state_dict_hooks(old):
        warnings.warn(f"'{name}' has state-dict hooks; they stay on the replaced "
                      f"{type(old).__name__} and do not apply to its {type(new).__name__}",
                      stacklevel=3)
    replace_module(places, old, new)


def _owners(model: nn.Module) -> Dict[int, KFEBlock]:
    """``id(module) → KFEBlock`` for every module inside a block (the block's parts)."""
    return {id(m): blk for _, blk in kfe_blocks(model)
            for part in (blk.rotate_in, blk.core, blk.rotate_out) for m in part.modules()}


ModuleRef = Union[nn.Module, str]


def _resolve(model: nn.Module, ref: ModuleRef, what: str) -> nn.Module:
    if isinstance(ref, str):
        try:
            return model.get_submodule(ref)
        except AttributeError:
            raise KFEError(f"{what} names '{ref}', which is not a submodule of the model") from None
    if not any(ref is m for m in model.modules()):
        raise KFEError(f"{what} contains a {type(ref).__name__} that is not a submodule of the model")
    return ref


def _skipped(model, skip, include_classifier, owners) -> Dict[int, str]:
    """``id(module) → why`` for every module (and submodule) the pass must leave alone."""
    refs = [(m, "is in skip= (remove it from skip= to rewrite it)")
            for m in (_resolve(model, r, "skip=") for r in skip)]
    if not include_classifier:
        refs += [(m, "is the classifier (pass include_classifier=True to rewrite it)")
                 for m in classifier_layers(model)]
    out: Dict[int, str] = {}
    for ref, why in refs:
        blk = owners.get(id(ref))
        for m in (blk or ref).modules():
            out[id(m)] = why
    return out


def _ineligible(module: nn.Module, owners) -> Optional[str]:
    """Why ``module`` cannot be rewritten / re-rotated, or ``None``."""
    if adapter_for(module) is None or not is_plain_layer(module):
        return (f"is a {type(module).__name__}; only nn.Conv2d / nn.Linear (or subclasses that "
                "keep their forward) can be rewritten")
    if adapter_for(module).groups(module) != 1:
        return (f"is a grouped conv (groups={module.groups}); grouped and depthwise convs are "
                "left out of the KFE pass (score them in channel space)")
    blk = owners.get(id(module))
    if blk is not None and module is not blk.core:
        return "is a rotation layer of a KFE block; blocks are re-rotated through their core"
    return None


def _bound_stats(model: nn.Module, stats) -> KFACStats:
    """``stats`` keyed by ``model``'s own modules (statistics of a copy resolve by name)."""
    if not isinstance(stats, KFACStats):
        raise KFEError(f"stats must be the KFACStats returned by collect_kfac, got {type(stats).__name__}")
    return stats.for_model(model)


def _channel_structured(module: nn.Module, stats) -> Optional[str]:
    """Why ``module``'s factors cannot give a KFE block, or ``None``."""
    try:
        positions = stats[module].flattened_positions
    except StaleStatisticsError:
        return None   # reported when its factors are used
    if positions > 1:
        return ("has channel-structured factors (a Linear reading a flattened map, above "
                "max_factor_dim); it is scored in channel space")
    return None


def _first_few(names: List[str], limit: int = 6) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _nothing_to_rewrite(model, stats, skipped, owners) -> KFEError:
    """Why no layer with factors can be rewritten: each layer with the reason it was left out."""
    names = {id(m): n for n, m in model.named_modules()}
    causes: Dict[str, List[str]] = {}
    for m in stats:
        if id(m) not in names:
            name, why = stats.name_of(m), ("is not in this model (statistics of another model: "
                                           "collect_kfac on this one)")
        else:
            name = names[id(m)] or type(model).__name__
            why = skipped.get(id(m)) or _ineligible(m, owners) or _channel_structured(m, stats) or ""
        causes.setdefault(why, []).append(f"'{name}'")
    listed = "; ".join(f"{_first_few(layers)} {why}" for why, layers in causes.items())
    return KFEError(f"nothing to rewrite: of the {len(stats)} layers with factors, {listed}")


def _targets(model, stats, modules, skipped, owners, required: bool = True) -> List[Tuple[str, nn.Module]]:
    names = {id(m): n for n, m in model.named_modules()}
    if modules is None:
        chosen = [(names[id(m)], m) for m in stats if id(m) in names and id(m) not in skipped
                  and _ineligible(m, owners) is None and _channel_structured(m, stats) is None]
        if not chosen and required:
            raise _nothing_to_rewrite(model, stats, skipped, owners)
        return chosen
    chosen = []
    for ref in modules:
        m = _resolve(model, ref, "modules=")
        m = m.core if isinstance(m, KFEBlock) else m
        name = names[id(m)] or type(model).__name__
        why = _ineligible(m, owners) or skipped.get(id(m))
        if why is None and m not in stats:
            why = "has no K-FAC factors in stats; run collect_kfac with it covered"
        why = why or _channel_structured(m, stats)
        if why is not None:
            raise KFEError(f"modules= contains '{name}', which {why}")
        chosen.append((name, m))
    if not chosen:
        raise KFEError("modules= is empty; pass None to rewrite every eligible layer")
    return chosen


def _factors(name: str, module: nn.Module, stats):
    f = stats[module]  # raises StaleStatisticsError on a shape change
    if f.factor_mode != "channel" and adapter_for(module).kernel_numel(module) > 1:
        raise KFEError(
            f"'{name}' has factor_mode={f.factor_mode!r} factors; the KFE rotates conv inputs "
            "with a 1×1 conv, which needs collect_kfac(..., factor_mode='channel')")
    f.eigen()
    return f


def kfe_targets(model: nn.Module, stats: KFACStats, *, skip: Iterable[ModuleRef] = (),
                include_classifier: bool = False) -> List[nn.Module]:
    """The layers (and cores of existing blocks) :func:`to_kfe` would rewrite or re-rotate with
    these arguments and ``modules=None`` — e.g. to eigendecompose their factors first. Empty
    where :func:`to_kfe` would find nothing to rewrite."""
    stats = _bound_stats(model, stats)
    owners = _owners(model)
    skipped = _skipped(model, list(skip), include_classifier, owners)
    return [m for _, m in _targets(model, stats, None, skipped, owners, required=False)]


def to_kfe(model: nn.Module, stats: KFACStats, *, modules: Optional[Iterable[ModuleRef]] = None,
           skip: Iterable[ModuleRef] = (), include_classifier: bool = False) -> nn.Module:
    """Rewrite layers into KFE blocks in place (docs/method.md §3); re-rotate existing blocks (§7).

    Args:
        model: the model ``stats`` were collected on, or a copy of it (statistics are matched
            by qualified layer name and shape, :meth:`~tp_eigendamage.KFACStats.for_model`).
        stats: :func:`~tp_eigendamage.collect_kfac` output (conv factors in ``"channel"`` mode).
        modules: layers (modules or qualified names) to rewrite; a :class:`KFEBlock` or its
            core means "re-rotate". Default: every eligible layer with factors in ``stats``.
        skip: layers (modules or names, subtrees included) to leave alone.
        include_classifier: also rewrite the classifier
            (:func:`~tp_eigendamage.heads.classifier_layers`).

    Returns:
        ``model`` (changed in place).

    Raises:
        KFEError: nothing eligible, a bad ``modules=`` / ``skip=`` entry, patch-mode conv factors.
        StaleStatisticsError: a layer changed shape since its factors were collected.

    Eligible: ungrouped plain ``nn.Conv2d`` / ``nn.Linear`` with factors in ``stats`` and the
    cores of existing blocks (whose factors, collected on the core, give the re-rotation).
    Grouped/depthwise convs and the rotation layers of existing blocks are never rewritten.
    Every new weight is computed before the model is touched, so on error nothing changes.
    """
    stats = _bound_stats(model, stats)
    owners = _owners(model)
    skipped = _skipped(model, list(skip), include_classifier, owners)
    targets = _targets(model, stats, None if modules is None else list(modules), skipped, owners)
    places = module_places(model)
    plan = []
    for name, m in targets:
        factors = _factors(name, m, stats)
        blk = owners.get(id(m))
        if blk is not None:
            plan.append((blk, factors, blk.rerotation(factors.eigen())))
        elif id(m) not in places:
            raise KFEError(f"the model itself is a {type(m).__name__}; wrap it in nn.Sequential "
                           "so the layer can be replaced in place")
        else:
            plan.append((m, None, KFEBlock.from_layer(m, factors)))
    for (name, _), (target, factors, new) in zip(targets, plan):
        if factors is None:
            _replace(places, target, new, name)
        else:
            target._set_rotation(factors, *new)
    return model


class _Call(NamedTuple):
    """One call of a block: its input and output shapes, and the input itself if it is kept."""

    input_shape: torch.Size
    output_shape: torch.Size
    input: Optional[torch.Tensor]


def _block_calls(model: nn.Module, example_inputs, blocks, keep_inputs: bool) -> Dict[int, List[_Call]]:
    """``id(block) → calls`` of each block in one forward of ``model`` on ``example_inputs``
    (eval mode, modes restored, no gradients); inputs are kept only if ``keep_inputs``."""
    calls: Dict[int, List[_Call]] = {id(b): [] for _, b in blocks}

    def record(block, inputs, output):
        calls[id(block)].append(_Call(inputs[0].shape, output.shape, inputs[0] if keep_inputs else None))

    hooks = [b.register_forward_hook(record) for _, b in blocks]
    try:
        with torch.no_grad(), restored_modes(model):
            default_forward_fn(model.eval(), example_inputs)
    finally:
        for h in hooks:
            h.remove()
    return calls


def _form_costs(block: KFEBlock, cost: str, calls: Optional[List[_Call]], forms,
                latencies: FormLatencies) -> Dict[str, float]:
    """The cost of each of ``forms`` of ``block``: parameters, MACs summed over its calls, or
    measured seconds (the first call's input, times the number of calls)."""
    if cost == "params":
        return form_macs(block)
    if cost == "flops":
        (_, c_in), (c_out, _) = block.rotation_in_matrix().shape, block.rotation_out_matrix().shape
        totals = [form_macs(block, math.prod(c.input_shape) // c_in, math.prod(c.output_shape) // c_out)
                  for c in calls]
        return {f: sum(t[f] for t in totals) for f in forms}
    seconds = latencies(block, calls[0].input, forms)
    return {f: seconds[f] * len(calls) for f in forms}


def to_cheapest_forms(model: nn.Module, *, cost: str = "params", example_inputs=None,
                      forms: Sequence[str] = FORMS, latencies: Optional[FormLatencies] = None) -> nn.Module:
    """Store every KFE block in the cheapest of its exact forms (:mod:`tp_eigendamage.forms`); in place.

    Args:
        model: a model holding KFE blocks (e.g. pruned by :func:`~tp_eigendamage.prune`).
        cost: what "cheapest" means: ``"params"`` (weights), ``"flops"`` (multiply-accumulates
            on ``example_inputs``) or ``"latency"`` (each form of each block timed on the input
            the block reads when the model runs ``example_inputs``, on the model's device;
            :func:`~tp_eigendamage.latency.measure_latency`).
        example_inputs: an input batch; needed for ``"flops"`` and ``"latency"``.
        forms: the forms allowed, among ``"kfe"`` (three layers, kept as the block),
            ``"in_merged"``, ``"out_merged"`` (two layers, :class:`~tp_eigendamage.forms.TwoLayerForm`)
            and ``"dense"`` (one layer); ties go to the form with fewer layers.
        latencies: a :class:`~tp_eigendamage.forms.FormLatencies` cache to reuse across calls
            (``"latency"``): a block shape timed once keeps its answer. Default: a fresh one.

    Returns:
        ``model``. Exact: each new module computes its block's function. Blocks the forward on
        ``example_inputs`` does not reach are left as they are (``"flops"`` / ``"latency"``).

    Raises:
        KFEError: an unknown cost or form, no ``example_inputs`` where needed, or the model
            itself is a block.
    """
    if cost not in COSTS:
        raise KFEError(f"cost={cost!r}: choose one of {', '.join(COSTS)}")
    unknown = [f for f in forms if f not in FORMS]
    if unknown or not forms:
        raise KFEError(f"forms={list(forms)!r}: give one or more of {', '.join(FORMS)}")
    if cost != "params" and example_inputs is None:
        raise KFEError(f"cost={cost!r} is measured on example_inputs; pass an input batch")
    blocks = kfe_blocks(model)
    if any(name == "" for name, _ in blocks):
        raise KFEError("the model itself is a KFEBlock; call model.fold() instead, or wrap it in "
                       "nn.Sequential so that it can be replaced in place")
    measured = cost != "params" and blocks
    calls = _block_calls(model, example_inputs, blocks, keep_inputs=cost == "latency") if measured else {}
    latencies = FormLatencies() if latencies is None else latencies
    chosen = []
    for name, blk in blocks:
        if cost != "params" and not calls[id(blk)]:
            continue   # not run on example_inputs: left as it is
        form = cheapest(_form_costs(blk, cost, calls.get(id(blk)), forms, latencies), forms)
        if form != "kfe":
            chosen.append((name, blk, form_module(blk, form)))
    places = module_places(model)
    for name, blk, new in chosen:
        _replace(places, blk, new, name)
    return model


def fold_kfe(model: nn.Module, *, only_unprofitable: bool = True) -> nn.Module:
    """Replace KFE blocks by one dense layer each, ``W' = Q_S' W*' Q_A'ᵀ`` (docs/method.md §6); in place.

    Args:
        model: a model holding KFE blocks.
        only_unprofitable: fold only blocks whose three layers hold at least as many
            parameters as the dense layer (the bottleneck does not pay); ``False`` folds all.
            :func:`to_cheapest_forms` also considers the two-layer forms and other costs.

    Returns:
        ``model``. Exact: each dense layer computes its pruned block's function.

    Raises:
        KFEError: the model itself is a block (call ``block.fold()``).
    """
    return to_cheapest_forms(model, forms=("dense", "kfe") if only_unprofitable else ("dense",))
