"""Plain layers (``nn.Conv2d`` / ``nn.Linear`` computing ``y = W ⋆ x + b``): what a KFE block is
made of and what can be rewritten into one; fresh layers of a kind, their weights as tensors."""
from __future__ import annotations

import torch
import torch.nn as nn

from .layers import adapter_for

__all__ = ["is_plain_layer", "layer_like", "weight_3d", "load_weight", "rotation_matrix"]

_PLAIN_FORWARDS = (nn.Conv2d.forward, nn.Linear.forward)


def is_plain_layer(module: nn.Module) -> bool:
    """``nn.Conv2d`` / ``nn.Linear`` (or a subclass keeping their forward), so ``y = W ⋆ x + b``.

    Subclasses that change the forward (timm's ``Conv2dSame``, ``StdConv2d``, ...) compute
    something else than ``W ⋆ x`` and cannot be rotated exactly.
    """
    cls = type(module)
    return (cls.forward in _PLAIN_FORWARDS
            and getattr(cls, "_conv_forward", nn.Conv2d._conv_forward) is nn.Conv2d._conv_forward)


def layer_like(like: nn.Module, in_features: int, out_features: int, *, bias: bool,
               pointwise: bool = False) -> nn.Module:
    """A fresh plain layer of ``like``'s kind, device, dtype, mode and ``requires_grad``, weights unset.

    ``pointwise=True`` gives the rotation layer (1×1 conv / linear). Otherwise a conv keeps
    ``like``'s kernel size, stride, padding (string padding included), dilation and padding mode.
    """
    layer = adapter_for(like).empty_layer(like, in_features, out_features, bias=bias, pointwise=pointwise)
    layer.requires_grad_(like.weight.requires_grad)
    return layer.train(like.training)


def weight_3d(layer: nn.Module) -> torch.Tensor:
    """The weight of an ungrouped layer as ``(out, in, K)`` float64 (K kernel offsets, 1 for Linear)."""
    return adapter_for(layer).weight_blocks(layer)[0].detach().double()


def load_weight(layer: nn.Module, value: torch.Tensor) -> None:
    """Copy ``value`` (any shape with the weight's size) into ``layer.weight``."""
    with torch.no_grad():
        layer.weight.copy_(value.reshape(layer.weight.shape))


def rotation_matrix(layer: nn.Module) -> torch.Tensor:
    """A rotation layer's weight as an ``(out, in)`` float64 matrix."""
    return layer.weight.detach().double().reshape(layer.weight.shape[0], -1)
