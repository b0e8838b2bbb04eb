"""Rewriting a model into the Kronecker-factored eigenbasis (KFE) and folding it back.

* :func:`to_kfe` rewrites eligible layers in place into :class:`~tp_eigendamage.KFEBlock` objects
  (docs/method.md §3); on a model that already holds KFE blocks it re-rotates each block whose
  core has fresh statistics and merges the new rotations into the existing rotation layers
  (§7), so a block never gets deeper than three stages.
* :func:`fold_kfe` multiplies a block back into one dense layer ``W' = Q_S' W*' Q_A'ᵀ`` (§6).
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Tuple, Union

import torch.nn as nn

from .errors import KFEError
from .heads import classifier_layers
from .kfac import KFACStats
from .kfe_block import KFEBlock, is_plain_layer
from .layers import adapter_for

__all__ = ["to_kfe", "fold_kfe", "kfe_blocks", "kfe_part", "kfe_targets", "ModuleRef"]


def kfe_blocks(model: nn.Module) -> List[Tuple[str, KFEBlock]]:
    """Every :class:`KFEBlock` of ``model`` as ``(qualified name, block)``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, KFEBlock)]


def kfe_part(name: str, modules: Dict[str, nn.Module]) -> Optional[Tuple[str, str]]:
    """``(block name, part)`` if ``name`` is a part (``rotate_in`` / ``core`` / ``rotate_out``)
    of a KFE block in ``modules`` (``dict(model.named_modules())``), else ``None``."""
    parent, _, leaf = name.rpartition(".")
    return (parent, leaf) if isinstance(modules.get(parent), KFEBlock) else None


# -- model surgery -------------------------------------------------------------------------------
def _parents(model: nn.Module) -> Dict[int, List[Tuple[nn.Module, str]]]:
    """``id(child) → [(parent, attribute)]`` over every place a module is registered."""
    places: Dict[int, List[Tuple[nn.Module, str]]] = {}
    for _, parent in model.named_modules(remove_duplicate=False):
        for attr, child in parent._modules.items():
            if child is not None:
                places.setdefault(id(child), []).append((parent, attr))
    return places


def _swap(places, old: nn.Module, new: nn.Module) -> None:
    for parent, attr in places[id(old)]:
        setattr(parent, attr, new)


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
    refs = [(m, "skip=") for m in (_resolve(model, r, "skip=") for r in skip)]
    if not include_classifier:
        refs += [(m, "the classifier (include_classifier=False)") for m in classifier_layers(model)]
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


def _nothing_to_rewrite(model, stats, skipped, owners) -> KFEError:
    """Why no layer with factors can be rewritten, counted by cause."""
    names = {id(m): n for n, m in model.named_modules()}
    causes: Dict[str, int] = {}
    for m in stats:
        why = ("not in this model" if id(m) not in names else skipped.get(id(m))
               or _ineligible(m, owners) or "")
        causes[why] = causes.get(why, 0) + 1
    listed = "; ".join(f"{n} {why}" for why, n in causes.items())
    return KFEError(f"nothing to rewrite: of the {len(stats)} layers with factors, {listed}. Only "
                    "ungrouped Conv2d/Linear layers outside skip= are rewritten; the classifier "
                    "only with include_classifier=True")


def _targets(model, stats, modules, skipped, owners) -> List[Tuple[str, nn.Module]]:
    names = {id(m): n for n, m in model.named_modules()}
    if modules is None:
        chosen = [(names[id(m)], m) for m in stats if id(m) in names and id(m) not in skipped
                  and _ineligible(m, owners) is None]
        if not chosen:
            raise _nothing_to_rewrite(model, stats, skipped, owners)
        return chosen
    chosen = []
    for ref in modules:
        m = _resolve(model, ref, "modules=")
        m = m.core if isinstance(m, KFEBlock) else m
        name = names[id(m)] or type(model).__name__
        why = _ineligible(m, owners) or (skipped.get(id(m)) and f"is {skipped[id(m)]}; remove it "
                                         "from skip= / pass include_classifier=True to rewrite it")
        if why is None and m not in stats:
            why = "has no K-FAC factors in stats; run collect_kfac with it covered"
        if why is not None:
            raise KFEError(f"modules= contains '{name}', which {why}")
        chosen.append((name, m))
    if not chosen:
        raise KFEError("modules= is empty; pass None to rewrite every eligible layer")
    return chosen


def _eigen(name: str, module: nn.Module, stats):
    f = stats[module]  # raises StaleStatisticsError on a shape change
    if f.factor_mode != "channel" and adapter_for(module).kernel_numel(module) > 1:
        raise KFEError(
            f"'{name}' has factor_mode={f.factor_mode!r} factors; the KFE rotates conv inputs "
            "with a 1×1 conv, which needs collect_kfac(..., factor_mode='channel')")
    return f.eigen()


def kfe_targets(model: nn.Module, stats: KFACStats, *, skip: Iterable[ModuleRef] = (),
                include_classifier: bool = False) -> List[nn.Module]:
    """The layers (and cores of existing blocks) :func:`to_kfe` would rewrite or re-rotate with
    these arguments and ``modules=None`` — e.g. to eigendecompose their factors first."""
    stats = _bound_stats(model, stats)
    owners = _owners(model)
    skipped = _skipped(model, list(skip), include_classifier, owners)
    return [m for _, m in _targets(model, stats, None, skipped, owners)]


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
    places = _parents(model)
    plan = []
    for name, m in targets:
        eigen = _eigen(name, m, stats)
        blk = owners.get(id(m))
        if blk is not None:
            plan.append((blk, eigen, blk.rerotation(eigen)))
        elif id(m) not in places:
            raise KFEError(f"the model itself is a {type(m).__name__}; wrap it in nn.Sequential "
                           "so the layer can be replaced in place")
        else:
            plan.append((m, None, KFEBlock.from_layer(m, eigen)))
    for target, eigen, new in plan:
        if eigen is None:
            _swap(places, target, new)
        else:
            target._set_rotation(eigen, *new)
    return model


def fold_kfe(model: nn.Module, *, only_unprofitable: bool = True) -> nn.Module:
    """Replace KFE blocks by one dense layer each, ``W' = Q_S' W*' Q_A'ᵀ`` (docs/method.md §6); in place.

    Args:
        model: a model holding KFE blocks.
        only_unprofitable: fold only blocks whose three layers hold at least as many
            parameters as the dense layer (the bottleneck does not pay); ``False`` folds all.

    Returns:
        ``model``. Exact: each dense layer computes its pruned block's function.

    Raises:
        KFEError: the model itself is a block (call ``block.fold()``).
    """
    blocks = kfe_blocks(model)
    if any(name == "" for name, _ in blocks):
        raise KFEError("the model itself is a KFEBlock; call model.fold() instead")
    chosen = [b for _, b in blocks
              if not only_unprofitable or b.num_parameters() >= b.dense_num_parameters()]
    folded = [(b, b.fold()) for b in chosen]
    places = _parents(model)
    for blk, dense in folded:
        _swap(places, blk, dense)
    return model
