"""Replacing a submodule everywhere it is registered (model surgery shared by the KFE rewrite,
the fold and inference fusion)."""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch.nn as nn

__all__ = ["Places", "module_places", "replace_module"]

#: ``id(child) → [(parent, attribute)]``.
Places = Dict[int, List[Tuple[nn.Module, str]]]


def module_places(model: nn.Module) -> Places:
    """Every place a module is registered: ``id(child) → [(parent, attribute)]``."""
    places: Places = {}
    for _, parent in model.named_modules(remove_duplicate=False):
        for attr, child in parent._modules.items():
            if child is not None:
                places.setdefault(id(child), []).append((parent, attr))
    return places


def replace_module(places: Places, old: nn.Module, new: nn.Module) -> None:
    """Register ``new`` wherever ``old`` is registered."""
    for parent, attr in places[id(old)]:
        setattr(parent, attr, new)
