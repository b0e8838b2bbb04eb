"""Torch-Pruning compatibility: every use of Torch-Pruning beyond its importance / pruner
entry points goes through here, so an upgrade is checked in one place.

Tested with torch-pruning 1.6.1 (the newest release). Public names are used where Torch-Pruning
has them (``dep.layer``, ``dep.pruning_fn``, ``GroupItem.root_idxs``); the two internals left
are a group's dependency graph (``group._DG``, which Torch-Pruning's own groups use to prune)
and the pruner's per-step ratio schedule, set to prune at one chosen ratio.
"""
from __future__ import annotations

import contextlib
import functools
import re
import warnings
from typing import Any, Callable, Iterator, List, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
import torch_pruning as tp

from .batches import default_forward_fn
from .errors import PruningError, TPEigenDamageError

__all__ = ["Group", "Member", "group_model", "group_root", "members", "make_pruner", "groups_at",
           "count_ops_and_params", "pruning_errors", "failing_module", "IGNORE_HINT"]

Group = tp.dependency.Group


class Member(NamedTuple):
    """One entry of a group: a layer, how it is pruned, which of its channels, and which root
    channel each of them follows (``None`` where Torch-Pruning does not know)."""

    layer: Any
    pruning_fn: Callable
    idxs: List[int]
    root_idxs: List[Optional[int]]
    is_out_channel: bool
    is_in_channel: bool


def group_model(group: Group) -> nn.Module:
    """The model a group belongs to."""
    return group._DG.model


def group_root(group: Group) -> Tuple[Any, Callable, List[int]]:
    """``(root layer, root pruning function, root channel indices)`` of a group."""
    item = group[0]
    return item.dep.layer, item.dep.pruning_fn, list(item.idxs)


def members(group: Group) -> Iterator[Member]:
    """Every member of ``group`` with its channels and whether it loses outputs or inputs."""
    DG = group._DG
    for item in group:
        dep, idxs = item
        fn = dep.pruning_fn
        yield Member(dep.layer, fn, list(idxs), list(item.root_idxs),
                     DG.is_out_channel_pruning_fn(fn), DG.is_in_channel_pruning_fn(fn))


_UNWRAPPED = re.compile(r"Unwrapped parameters detected: \[(.*?)\]", re.S)


def make_pruner(model: nn.Module, example_inputs, importance, *, ratio: float, global_pruning: bool,
                ignored_layers: List[nn.Module], **kwargs) -> tp.pruner.BasePruner:
    """A ``BasePruner`` that removes ``ratio`` of the channels in one step.

    Torch-Pruning warns about parameters outside any layer it knows (ViT's ``pos_embed``,
    ConvNeXt's ``gamma``) on every graph it builds, listing them in a random order; the
    warning is issued once per process for each set of names instead.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruner = tp.pruner.BasePruner(model, example_inputs, importance=importance, pruning_ratio=ratio,
                                      global_pruning=global_pruning, ignored_layers=ignored_layers, **kwargs)
    for w in caught:
        found = _UNWRAPPED.search(str(w.message))
        if found is None:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            continue
        _warn_unwrapped_once(", ".join(sorted(n.strip(" '") for n in found.group(1).split(","))))
    return pruner


@functools.lru_cache(maxsize=None)
def _warn_unwrapped_once(names: str) -> None:
    warnings.warn(f"Torch-Pruning prunes the last non-singleton dimension of parameters outside any "
                  f"layer it knows ({names}); pass unwrapped_parameters=[(param, dim), ...] to "
                  "prune() to choose another dimension", UserWarning, stacklevel=4)


def groups_at(pruner: tp.pruner.BasePruner, ratio: float) -> Iterator[Group]:
    """The groups ``pruner`` removes at channel ratio ``ratio``, created one at a time (a
    generator: prune each before asking for the next, as Torch-Pruning's own ``step()`` does —
    concatenations map indices through the CURRENT shapes)."""
    pruner.reset()
    pruner.per_step_pruning_ratio = pruner.iterative_pruning_ratio_scheduler(ratio, pruner.iterative_steps)
    return pruner.step(interactive=True)


def count_ops_and_params(model: nn.Module, example_inputs, layer_wise: bool = False):
    """Torch-Pruning's MAC and parameter counter (rotation layers of KFE blocks included).

    Torch-Pruning matches layer types exactly, so subclasses (timm's ``Linear``,
    ``Conv2dSame``, ``BatchNormAct2d``, ...) would count zero FLOPs; each is counted with its
    nearest counted base class's rule.
    """
    from torch_pruning.utils import op_counter

    counted = op_counter.MODULES_MAPPING
    op_counter.CUSTOM_MODULES_MAPPING = {
        type(m): next(counted[base] for base in type(m).__mro__ if base in counted)
        for m in model.modules()
        if type(m) not in counted and any(base in counted for base in type(m).__mro__)}
    return tp.utils.count_ops_and_params(model, example_inputs, layer_wise=layer_wise)


# -- Torch-Pruning failures in the package's terms ------------------------------------------------
IGNORE_HINT = ("Torch-Pruning cannot handle this layer or operation: add it (or its parent "
               "module) to ignored_layers, or give Torch-Pruning customized_pruners / "
               "unwrapped_parameters for it.")


def failing_module(model: nn.Module, example_inputs) -> Optional[str]:
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
def pruning_errors(stage: str, model: nn.Module, example_inputs, hint: str = IGNORE_HINT):
    """Re-raise anything but this package's own errors as a :class:`PruningError` that names
    ``stage`` and, if the model's forward fails, the innermost failing module."""
    try:
        yield
    except TPEigenDamageError:
        raise
    except Exception as exc:
        where = failing_module(model, example_inputs)
        at = f"; the model's forward fails in {where}" if where else ""
        raise PruningError(f"{stage} failed{at}: {type(exc).__name__}: {exc}. {hint}".rstrip()) from exc
