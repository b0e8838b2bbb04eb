"""Which layers produce a model's outputs: the one home of classifier / head detection.

The KFE rewrite leaves classifiers alone by default, and pruning never removes their output
channels (the model's outputs). :func:`classifier_layers` finds them for any model.
"""
from __future__ import annotations

from typing import Iterable, List

import torch.nn as nn

from .layers import adapter_for

__all__ = ["classifier_layers", "unique_modules"]


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
