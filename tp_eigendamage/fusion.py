"""Inference fusion: BatchNorm folded into the convolution that feeds it.

A ``BatchNorm2d`` in eval mode is the per-channel affine map
``y = γ (x − μ) / √(σ² + ε) + β``. When its input is the output of a ``Conv2d`` that feeds
nothing else, the map folds exactly into that convolution::

    W'_c = W_c · s_c,   b'_c = (b_c − μ_c) · s_c + β_c,   s_c = γ_c / √(σ²_c + ε)

and the BatchNorm disappears. This covers plain convolutions (grouped and depthwise included),
the ``rotate_out`` of a KFE block (a 1×1 conv) and timm's ``BatchNormAct2d`` (its activation
and drop-out are kept as the module that replaces it). Run it on a model that is done training:
the fused model computes the original model's EVAL-mode function.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
import torch.nn as nn

from . import _tp
from ._surgery import module_places, replace_module
from .batches import Inputs, default_forward_fn
from .plain_layers import is_plain_layer

__all__ = ["fuse_for_inference", "fusable_pairs"]


def _foldable(bn: nn.Module) -> bool:
    """A BatchNorm2d that normalises with running statistics (so eval mode is affine)."""
    return isinstance(bn, nn.BatchNorm2d) and bn.running_mean is not None and bn.running_var is not None


def fusable_pairs(model: nn.Module, example_inputs: Inputs) -> List[Tuple[nn.Conv2d, nn.BatchNorm2d]]:
    """``(conv, bn)`` pairs where ``bn`` normalises exactly the tensor ``conv`` produced, each
    runs once per forward, and ``conv``'s output feeds nothing else (traced on ``example_inputs``).

    Which tensor a BatchNorm reads is seen by forward hooks (the very tensor object a conv
    returned); how many operations read a conv's output comes from Torch-Pruning's traced graph.
    """
    produced: Dict[int, Tuple[nn.Module, torch.Tensor]] = {}
    read: Dict[nn.Module, List[torch.Tensor]] = {}
    calls: Dict[nn.Module, int] = {}

    def conv_hook(module, inputs, output):
        produced[id(output)] = (module, output)     # the tensor is kept alive: ids stay unique
        calls[module] = calls.get(module, 0) + 1

    def norm_hook(module, inputs):
        read.setdefault(module, []).append(inputs[0])

    hooks = [m.register_forward_hook(conv_hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    hooks += [m.register_forward_pre_hook(norm_hook) for m in model.modules() if _foldable(m)]
    try:
        with torch.no_grad():
            default_forward_fn(model, example_inputs)
    finally:
        for h in hooks:
            h.remove()
    with torch.enable_grad():   # Torch-Pruning traces through autograd
        neighbours = _tp.module_neighbours(model, example_inputs)
    pairs = []
    for bn, tensors in read.items():
        conv = produced.get(id(tensors[0]), (None,))[0] if len(tensors) == 1 else None
        if (conv is not None and calls[conv] == 1 and is_plain_layer(conv)
                and len(neighbours.get(conv, ((), ()))[1]) == 1):
            pairs.append((conv, bn))
    return pairs


def _after_norm(bn: nn.BatchNorm2d) -> nn.Module:
    """What remains of ``bn`` once its affine map is folded away: timm's ``BatchNormAct2d``
    keeps its drop-out and activation, a plain BatchNorm becomes ``nn.Identity``."""
    rest = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None))
            if isinstance(m, nn.Module) and not isinstance(m, nn.Identity)]
    return nn.Sequential(*rest) if rest else nn.Identity()


@torch.no_grad()
def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    scale = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    new_bias = (bias - bn.running_mean) * scale + shift
    conv.weight.mul_(scale.reshape(-1, 1, 1, 1).to(conv.weight.dtype))
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias.to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)
    else:
        conv.bias.copy_(new_bias)


def fuse_for_inference(model: nn.Module, example_inputs: Inputs) -> nn.Module:
    """Fold every BatchNorm that directly follows a convolution into it (module docstring); in place.

    Args:
        model: any model (pruned or not, KFE blocks included).
        example_inputs: an input batch to trace which layer feeds which.

    Returns:
        ``model``, with each folded BatchNorm replaced by ``nn.Identity`` (or by what follows the
        normalisation inside timm's ``BatchNormAct2d``). In eval mode it computes what the
        original computed in eval mode.
    """
    pairs = fusable_pairs(model, example_inputs)
    places = module_places(model)
    for conv, bn in pairs:
        _fold(conv, bn)
        replacement = _after_norm(bn)
        replacement.train(bn.training)
        replace_module(places, bn, replacement)
    return model
