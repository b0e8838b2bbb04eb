"""What Torch-Pruning needs to know about a timm model, and the fix-up after pruning.

* :func:`~tp_eigendamage.heads.classifier_layers` — the heads to keep (``get_classifier()``,
  DeiT's ``head_dist``);
* :func:`attention_num_heads` — ``{qkv Linear: num_heads}`` for ``BasePruner(num_heads=...)``;
* :func:`ignored_layers` / :func:`pruner_kwargs` — everything above as ``BasePruner`` kwargs;
* :func:`fix_attention_after_pruning` — makes attention modules agree with their pruned
  ``qkv`` (``num_heads``, ``head_dim``, ``attn_dim``, ``scale``).

Supported attention: ``timm.layers.Attention`` (ViT, DeiT, ...) without q/k normalization,
output normalization or gating. Any other module with a ``num_heads`` attribute (Swin window
attention, attention pooling, RoPE attention, ...) keeps its heads intact: its per-head
projections (``qkv``, ``q``, ``k``, ``v``, ``kv``, ``*_proj``, ``gate``) are ignored, so
Torch-Pruning never changes the head layout it reshapes to.

Call these AFTER any rewrite of the model (``to_kfe``): the ``num_heads`` keys are modules.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
import torch.nn as nn
from timm.layers.attention import Attention

from ..errors import InvalidArgumentError
from ..heads import classifier_layers, unique_modules
from ..kfe_block import KFEBlock

__all__ = ["classifier_layers", "is_supported_attention", "supported_attention", "attention_num_heads",
           "ignored_layers", "pruner_kwargs", "fix_attention_after_pruning", "HEAD_PROJECTION_NAMES"]

HEAD_PROJECTION_NAMES = ("qkv", "q", "k", "v", "kv", "q_proj", "k_proj", "v_proj", "gate")


def _qkv_output_layer(attention: nn.Module) -> nn.Module:
    """The Linear whose output features are the q, k, v channels (a KFE block's ``rotate_out``)."""
    qkv = attention.qkv
    return qkv.rotate_out if isinstance(qkv, KFEBlock) else qkv


def is_supported_attention(module: nn.Module) -> bool:
    """True for a ``timm.layers.Attention`` whose heads this module knows how to prune."""
    return (type(module) is Attention
            and isinstance(_qkv_output_layer(module), nn.Linear)
            and all(isinstance(getattr(module, name, nn.Identity()), nn.Identity)
                    for name in ("q_norm", "k_norm", "norm"))
            and getattr(module, "gate", None) is None)


def supported_attention(model: nn.Module) -> List[nn.Module]:
    """The attention modules of ``model`` whose heads may be pruned."""
    return [m for m in model.modules() if is_supported_attention(m)]


def attention_num_heads(model: nn.Module) -> Dict[nn.Module, int]:
    """``{qkv output Linear: num_heads}`` for ``BasePruner(num_heads=...)``."""
    return {_qkv_output_layer(m): m.num_heads for m in supported_attention(model)}


def _fixed_head_projections(model: nn.Module) -> List[nn.Module]:
    """Per-head projections of attention-like modules that are not supported."""
    return [child for m in model.modules() if hasattr(m, "num_heads") and not is_supported_attention(m)
            for name in HEAD_PROJECTION_NAMES
            for child in [getattr(m, name, None)] if isinstance(child, nn.Module)]


def ignored_layers(model: nn.Module) -> List[nn.Module]:
    """Layers Torch-Pruning must not shrink: the heads and unsupported attention projections."""
    return unique_modules(classifier_layers(model) + _fixed_head_projections(model))


def pruner_kwargs(model: nn.Module, *, prune_num_heads: bool = False,
                  prune_head_dims: bool = True) -> dict:
    """``torch_pruning.pruner.BasePruner`` keyword arguments for a timm model.

    Pass ``pruner.num_heads`` to :func:`fix_attention_after_pruning` when
    ``prune_num_heads=True`` (Torch-Pruning updates that dict as it removes heads).
    """
    return dict(ignored_layers=ignored_layers(model), num_heads=attention_num_heads(model),
                prune_num_heads=prune_num_heads, prune_head_dims=prune_head_dims)


def fix_attention_after_pruning(model: nn.Module,
                                num_heads: Optional[Dict[nn.Module, int]] = None) -> nn.Module:
    """Update every supported attention module to its pruned ``qkv``; returns ``model``.

    ``num_heads`` maps qkv layers to head counts after pruning (``pruner.num_heads``); a module
    missing from it keeps its ``num_heads``. With ``H`` heads and ``qkv`` of ``3 H d`` outputs:
    ``head_dim = d``, ``attn_dim = H d``, ``scale = d^{-1/2}`` (the value timm's fused path,
    ``scaled_dot_product_attention``, uses implicitly, so both paths agree).

    Logit scale: removing head dimensions must act like zeroing them, as every importance
    criterion assumes, so the logits ``q·k / √d_old`` are kept: the q rows of ``qkv`` are
    multiplied by ``√(d / d_old)``. Calling this again is a no-op.
    """
    plan = []
    for attention in supported_attention(model):
        qkv = _qkv_output_layer(attention)
        heads = (num_heads or {}).get(qkv, attention.num_heads)
        if heads < 1 or qkv.out_features % (3 * heads):
            raise InvalidArgumentError(f"qkv layer {qkv} has {qkv.out_features} outputs, not 3 x {heads} heads x head_dim; "
                             "pass num_heads=pruner.num_heads when whole heads were pruned")
        plan.append((attention, qkv, heads, qkv.out_features // (3 * heads)))
    with torch.no_grad():
        for attention, qkv, heads, head_dim in plan:
            q_rows = slice(0, heads * head_dim)
            factor = math.sqrt(head_dim / attention.head_dim)
            qkv.weight[q_rows] *= factor
            if qkv.bias is not None:
                qkv.bias[q_rows] *= factor
            attention.num_heads, attention.head_dim = heads, head_dim
            attention.attn_dim, attention.scale = heads * head_dim, head_dim ** -0.5
    return model
