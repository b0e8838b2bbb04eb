"""Torch-Pruning compatibility: every use of Torch-Pruning beyond its importance / pruner
entry points goes through here, so an upgrade is checked in one place.

Tested with torch-pruning 1.6.1 (the newest release). Public names are used where Torch-Pruning
has them (``dep.layer``, ``dep.pruning_fn``, ``GroupItem.root_idxs``); the two internals left
are a group's dependency graph (``group._DG``, which Torch-Pruning's own groups use to prune),
the pruner's per-step ratio schedule, set to prune at one chosen ratio, the traced graph's
nodes (``DG.module2node``, ``node.inputs`` / ``node.outputs``) for finding the model's outputs,
what a dependency graph shares instead of copying (:func:`copy_with_pruner`), and its list
of groups (:func:`list_groups_once`, which derives the index mappings once while listing).

Tracing leaks nothing: Torch-Pruning's tracer puts the model in eval mode and follows
``grad_fn`` links, so it runs here with every mode flag restored afterwards and every parameter
temporarily trainable (a frozen layer's output would have no ``grad_fn`` and be left out).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import re
import warnings
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Set, Tuple

import torch
import torch.nn as nn
import torch_pruning as tp

from ._model_state import preserved_model_state
from .batches import default_forward_fn
from .errors import PruningError, TPEigenDamageError

__all__ = ["Group", "Member", "TracedGraph", "group_model", "group_graph", "group_root", "members", "module_neighbours",
           "traceable", "trace_graph", "make_pruner", "list_groups_once", "copy_with_pruner", "groups_at",
           "count_ops_and_params", "layer_costs", "member_channels",
           "pruning_errors", "failing_module", "IGNORE_HINT"]

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


def group_graph(group: Group) -> Any:
    """The dependency graph a group belongs to: one per trace of the model."""
    return group._DG


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


@contextlib.contextmanager
def traceable(model: nn.Module) -> Iterator[None]:
    """Gradients on and every parameter trainable inside; modes and ``requires_grad`` restored
    after (see the module docstring)."""
    with torch.enable_grad(), preserved_model_state(model):
        yield


_UNWRAPPED = re.compile(r"Unwrapped parameters detected: \[(.*?)\]", re.S)


@contextlib.contextmanager
def _unwrapped_warned_once() -> Iterator[None]:
    """Torch-Pruning warns about parameters outside any layer it knows (ViT's ``pos_embed``,
    ConvNeXt's ``gamma``) on every graph it builds, listing them in a random order; inside,
    that warning is issued once per process for each set of names instead."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        found = _UNWRAPPED.search(str(w.message))
        if found is None:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            continue
        _warn_unwrapped_once(", ".join(sorted(n.strip(" '") for n in found.group(1).split(","))))


@functools.lru_cache(maxsize=None)
def _warn_unwrapped_once(names: str) -> None:
    warnings.warn(f"Torch-Pruning prunes the last non-singleton dimension of parameters outside any "
                  f"layer it knows ({names}); pass unwrapped_parameters=[(param, dim), ...] to "
                  "prune() to choose another dimension", UserWarning, stacklevel=5)


def module_neighbours(model: nn.Module, example_inputs) -> Dict[nn.Module, Tuple[List[Any], List[Any]]]:
    """``module → (modules it reads from, modules reading it)`` in the traced graph of
    ``model`` (Torch-Pruning's dependency graph; functional ops appear as its op nodes)."""
    DG = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)
    return {module: ([n.module for n in node.inputs], [n.module for n in node.outputs])
            for module, node in DG.module2node.items()}


#: ``BasePruner`` keyword arguments that change how the model is traced.
_TRACING_KWARGS = ("forward_fn", "output_transform", "unwrapped_parameters", "customized_pruners")


class TracedGraph(NamedTuple):
    """One traced forward as Torch-Pruning sees it. Nodes are modules or Torch-Pruning's
    operation objects (element-wise, concatenation, reshape, ...)."""

    ends: List[Any]                 # the nodes producing the model's outputs
    inputs: Dict[Any, List[Any]]    # node → the nodes it reads
    channel_layers: Set[Any]        # modules with output channels of their own (conv, linear, ...)


def _own_channels(DG, module) -> bool:
    """True for a module whose output channels are not its input channels (Torch-Pruning prunes
    them with a different function), e.g. conv / linear but not BatchNorm."""
    pruner = DG.get_pruner_of_module(module) if isinstance(module, nn.Module) else None
    return pruner is not None and type(pruner).prune_in_channels is not type(pruner).prune_out_channels


def trace_graph(model: nn.Module, example_inputs, **tp_kwargs) -> TracedGraph:
    """Trace ``model(example_inputs)`` with Torch-Pruning (the tracing options among
    ``tp_kwargs`` apply) and return its graph."""
    options = {k: tp_kwargs[k] for k in _TRACING_KWARGS if k in tp_kwargs}
    with traceable(model), _unwrapped_warned_once():
        DG = tp.DependencyGraph().build_dependency(model, example_inputs, **options)
    nodes = list(DG.module2node.values())
    return TracedGraph(ends=[n.module for n in nodes if not n.outputs],
                       inputs={n.module: [i.module for i in n.inputs] for n in nodes},
                       channel_layers={n.module for n in nodes if _own_channels(DG, n.module)})


def make_pruner(model: nn.Module, example_inputs, importance, *, ratio: float, global_pruning: bool,
                ignored_layers: List[nn.Module], **kwargs) -> tp.pruner.BasePruner:
    """A ``BasePruner`` that removes ``ratio`` of the channels in one step, traced without
    leaking mode or ``requires_grad`` changes (frozen layers included) and with Torch-Pruning's
    unwrapped-parameter warning given once per set of names."""
    with traceable(model), _unwrapped_warned_once():
        return tp.pruner.BasePruner(model, example_inputs, importance=importance, pruning_ratio=ratio,
                                    global_pruning=global_pruning, ignored_layers=ignored_layers, **kwargs)


class _ListedGroups:
    """A dependency graph's ``get_all_groups`` answering from a list made once (see
    :func:`list_groups_once`); other arguments than the listed ones go to Torch-Pruning."""

    def __init__(self, graph, groups: list, ignored_layers: list, root_module_types):
        self.graph, self.groups = graph, groups
        self.ignored_layers, self.root_module_types = list(ignored_layers), tuple(root_module_types)

    def __call__(self, ignored_layers=(), root_module_types=(nn.Conv2d, nn.Linear)):
        if list(ignored_layers) == self.ignored_layers and tuple(root_module_types) == self.root_module_types:
            return iter(self.groups)
        return type(self.graph).get_all_groups(self.graph, ignored_layers, root_module_types)


def list_groups_once(pruner: tp.pruner.BasePruner) -> None:
    """List the groups of ``pruner``'s model once, for every later step while the model keeps
    its shapes (the caller's promise: after the first pruning step it uses another pruner).

    Torch-Pruning lists every group again at the start of each step, and listing one group
    re-derives the index mapping of every concatenation in the graph, so on densely connected
    networks (DenseNet) listing dominates a step; the list is the same until channels are
    removed. :func:`copy_with_pruner` copies it with the graph. The listing itself derives the
    mapping once (:func:`_index_mapping_derived_once`).
    """
    graph = pruner.DG
    args = dict(ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types)
    with _index_mapping_derived_once(graph):
        groups = list(graph.get_all_groups(**args))
    graph.get_all_groups = _ListedGroups(graph, groups, **args)


@contextlib.contextmanager
def _index_mapping_derived_once(graph) -> Iterator[None]:
    """Inside, Torch-Pruning derives ``graph``'s index mappings (of its concatenations, splits,
    reshapes, ...) once, instead of again for every group it creates: for use while nothing
    changes the model's shapes. (``DependencyGraph.get_pruning_group`` calls the module function
    ``index_mapping.update_index_mapping``; other graphs keep calling the original.)"""
    mappings = tp.dependency.index_mapping
    update = mappings.update_index_mapping
    update(graph)
    mappings.update_index_mapping = lambda g: None if g is graph else update(g)
    try:
        yield
    finally:
        mappings.update_index_mapping = update


def copy_with_pruner(model: nn.Module, pruner: tp.pruner.BasePruner, importance,
                     memo: dict) -> Tuple[nn.Module, tp.pruner.BasePruner]:
    """Deep copies of ``model`` and of ``pruner`` (made on it) that prune the copy, without
    tracing it again: the dependency graph (and the groups :func:`list_groups_once` listed) is
    copied with the model.

    ``importance`` is the copy's criterion; ``memo`` is ``copy.deepcopy``'s (e.g. parameters
    already mapped to their copies). Shared with the original, not copied: the autograd nodes
    the trace recorded, Torch-Pruning's per-layer pruners (so a copy's pruning functions are the
    original's, e.g. as keys of cached scores), its ``ops`` module and the channel index lists
    of listed groups (read, never written). The graph's nodes are copied one at a time (their
    edges resolve through ``memo``): a recursive deep copy along the edges of a deep network
    would exceed Python's recursion limit.
    """
    DG = pruner.DG
    nodes = list(DG.module2node.values())
    listed = DG.__dict__.get("get_all_groups")
    indices = [] if listed is None else [i for g in listed.groups for item in g for i in (item.idxs, item.root_idxs)]
    shared = [DG.ops, *DG.REGISTERED_PRUNERS.values(), *DG.CUSTOMIZED_PRUNERS.values(),
              *(n.grad_fn for n in nodes), *indices]
    memo.update({id(obj): obj for obj in shared})
    memo[id(pruner.importance)] = importance
    model_copy = copy.deepcopy(model, memo)
    copies = {id(n): object.__new__(type(n)) for n in nodes}
    memo.update(copies)
    for n in nodes:
        copies[id(n)].__dict__.update(copy.deepcopy(n.__dict__, memo))
    return model_copy, copy.deepcopy(pruner, memo)


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


def layer_costs(model: nn.Module, example_inputs, metric: str) -> Dict[nn.Module, float]:
    """``module → its own count of metric`` (``"flops"``: multiply-accumulates, or ``"params"``)
    on one forward pass of ``example_inputs``, by :func:`count_ops_and_params`; modules that
    count nothing are left out."""
    _, _, flops, params = count_ops_and_params(model, example_inputs, layer_wise=True)
    counts = flops if metric == "flops" else params
    return {module: float(value) for module, value in counts.items() if value}


def member_channels(group: Group, member: Member) -> Optional[int]:
    """How many channels ``member``'s layer has on the side the group prunes (outputs or
    inputs), by Torch-Pruning's own pruner for the layer; None for a layer it has none for."""
    pruner = group_graph(group).get_pruner_of_module(member.layer)
    if pruner is None:
        return None
    return pruner.get_out_channels(member.layer) if member.is_out_channel else pruner.get_in_channels(member.layer)


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
