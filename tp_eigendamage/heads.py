"""Which layers produce a model's outputs: the one home of classifier / head detection.

* :func:`classifier_layers` — the classification heads (timm's ``get_classifier()``, else the
  last ``Conv2d`` / ``Linear``): what the KFE rewrite leaves alone by default;
* :func:`output_layers` — every layer whose output channels ARE the model's outputs, found in
  the traced graph of any model: what pruning never shrinks.
"""
from __future__ import annotations

from typing import Iterable, List

import torch.nn as nn

from . import _tp
from .layers import adapter_for

__all__ = ["classifier_layers", "output_layers", "unique_modules"]


def unique_modules(modules: Iterable[nn.Module]) -> List[nn.Module]:
    """``modules`` without repeats, in order (modules compare by identity)."""
    seen, out = set(), []
    for m in modules:
        if id(m) not in seen:
            seen.add(id(m))
            out.append(m)
    return out


def classifier_layers(model: nn.Module) -> List[nn.Module]:
    """The classification heads of ``model``.

    * timm models (anything with ``get_classifier()``): that module (tuples, e.g. distilled
      heads, give several) and ``head_dist`` if present; heads without parameters
      (``nn.Identity`` when ``num_classes=0``) are left out;
    * other models: the LAST ``nn.Conv2d`` / ``nn.Linear`` registered — where torchvision and
      most hand-written models keep their head.
    """
    get = getattr(model, "get_classifier", None)
    if callable(get):
        heads = get()
        heads = list(heads) if isinstance(heads, (tuple, list)) else [heads]
        heads.append(getattr(model, "head_dist", None))
        return unique_modules(h for h in heads if isinstance(h, nn.Module) and any(True for _ in h.parameters()))
    layers = [m for m in model.modules() if adapter_for(m) is not None]
    return layers[-1:]


def output_layers(model: nn.Module, example_inputs, **tp_kwargs) -> List[nn.Module]:
    """The layers whose output channels reach a model output, in registration order.

    From each output of ``model(example_inputs)``, the graph Torch-Pruning traces is walked
    backwards through every operation that keeps channels as they are (element-wise ops,
    normalization, pooling, reshapes, concatenation, ...) up to the first layer with output
    channels of its own (conv, linear, ...). Removing one of those layers' output channels
    would remove an output of the model: a logit, a regression target, a feature the caller
    reads. ``tp_kwargs`` are Torch-Pruning's tracing options (``forward_fn``,
    ``output_transform``, ``unwrapped_parameters``, ``customized_pruners``).
    """
    graph = _tp.trace_graph(model, example_inputs, **tp_kwargs)
    found, seen, stack = set(), set(), list(graph.ends)
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if node in graph.channel_layers:
            found.add(id(node))
        else:
            stack.extend(graph.inputs.get(node, ()))
    return [m for m in model.modules() if id(m) in found]
