"""The exact storage forms of a KFE block, and what each one costs.

A pruned block computes ``y = R_out (W*_k ⋆ (R_in x)) + b``: the 1×1 rotation ``R_in``
``(r_in × C_in)``, the core ``W*`` ``(r_out × r_in × K)`` with the original kernel geometry, and
the 1×1 rotation ``R_out`` ``(C_out × r_out)`` carrying the bias. Merging neighbouring factors
gives four forms that compute the same function:

* ``kfe``: ``R_in`` 1×1 → ``W*`` k×k → ``R_out`` 1×1, costing
  ``C_in r_in L_in + r_in r_out K L_out + r_out C_out L_out`` multiply-accumulates (MACs);
* ``in_merged``: ``W* R_in`` k×k ``C_in → r_out`` → ``R_out`` 1×1,
  ``C_in r_out K L_out + r_out C_out L_out``;
* ``out_merged``: ``R_in`` 1×1 → ``R_out W*`` k×k ``r_in → C_out``,
  ``C_in r_in L_in + r_in C_out K L_out``;
* ``dense``: ``R_out W* R_in`` k×k ``C_in → C_out``, ``C_in C_out K L_out``.

``L_in`` is the number of positions the block reads (``N·H_in·W_in`` for a conv, rows for a
Linear on tokens), ``L_out`` the number it writes (after the core's stride). Parameters are the
same sums with ``L_in = L_out = 1``. The bias (``C_out`` values on the last layer of every form)
costs the same in every form and is left out of the comparison.

Why merging is exact: per kernel offset ``k`` the core reads ``R_in x`` at a shifted position,
and ``W*_k (R_in x_p) = (W*_k R_in) x_p``. ``R_in`` acts on each position alone and has no
bias, so it commutes with the core's stride and dilation and with padding: zero padding stays
zero, and reflect / replicate / circular padding copy positions, which a per-position map
commutes with. ``R_out`` likewise merges into the core from the other side.

A two-layer form is a :class:`TwoLayerForm`: two plain ``nn.Conv2d`` / ``nn.Linear`` layers that
Torch-Pruning traces, :func:`~tp_eigendamage.fuse_for_inference` fuses into and ``torch.jit`` /
ONNX export as usual. It is a deployment form: it holds no eigenbasis, so it cannot be
re-rotated or scored in the KFE again (:func:`tp_eigendamage.to_kfe` treats its layers as plain
layers).
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch
import torch.nn as nn

from .kfe_block import KFEBlock
from .latency import measure_latency
from .layers import adapter_for
from .plain_layers import layer_like, load_weight, rotation_matrix, weight_3d

__all__ = ["FORMS", "FORM_LAYERS", "COSTS", "TwoLayerForm", "form_module", "form_macs", "cheapest",
           "FormLatencies"]

#: The forms of a block, fewest layers first (:func:`cheapest` breaks ties in this order).
FORMS = ("dense", "in_merged", "out_merged", "kfe")
#: How many layers each form has.
FORM_LAYERS = {"dense": 1, "in_merged": 2, "out_merged": 2, "kfe": 3}
#: The costs a form can be chosen by.
COSTS = ("params", "flops", "latency")


class TwoLayerForm(nn.Module):
    """A KFE block stored as two plain layers, ``second(first(x))`` (module docstring).

    ``form`` says which: ``"in_merged"`` (``first`` = core with ``rotate_in`` merged in, a k×k
    layer ``C_in → r_out``; ``second`` = ``rotate_out``) or ``"out_merged"`` (``first`` =
    ``rotate_in``; ``second`` = core with ``rotate_out`` merged in, ``r_in → C_out``).
    """

    def __init__(self, first: nn.Module, second: nn.Module, form: str):
        super().__init__()
        self.first, self.second, self.form = first, second, form

    def forward(self, x):
        return self.second(self.first(x))

    def __getattr__(self, name: str):
        """The replaced layer's shape attributes and bias, as for :class:`KFEBlock`."""
        if name in ("in_features", "in_channels"):
            return getattr(self.first, name)
        if name in ("out_features", "out_channels", "bias"):
            return getattr(self.second, name)
        return super().__getattr__(name)

    @property
    def width(self) -> int:
        """Channels between the two layers (``r_out`` or ``r_in``)."""
        return adapter_for(self.first).out_features(self.first)


def _with_weight(layer: nn.Module, value: torch.Tensor) -> nn.Module:
    load_weight(layer, value)
    return layer


def _with_bias(layer: nn.Module, block: KFEBlock) -> nn.Module:
    if layer.bias is not None:
        with torch.no_grad():
            layer.bias.copy_(block.rotate_out.bias)
    return layer


def form_module(block: KFEBlock, form: str) -> nn.Module:
    """``block`` stored in ``form`` (one of :data:`FORMS`): the block itself for ``"kfe"``, else a
    new module with fresh weights computing the block's function (in float64, stored in the
    block's dtype)."""
    if form == "kfe":
        return block
    if form == "dense":
        return block.fold()
    R_in, R_out = rotation_matrix(block.rotate_in), rotation_matrix(block.rotate_out)
    core = weight_3d(block.core)
    (r_in, c_in), (c_out, r_out) = R_in.shape, R_out.shape
    bias = block.rotate_out.bias is not None
    if form == "in_merged":
        first = _with_weight(layer_like(block.core, c_in, r_out, bias=False),
                             torch.einsum("rsk,si->rik", core, R_in))
        second = _with_weight(layer_like(block.rotate_out, r_out, c_out, bias=bias, pointwise=True), R_out)
    elif form == "out_merged":
        first = _with_weight(layer_like(block.rotate_in, c_in, r_in, bias=False, pointwise=True), R_in)
        second = _with_weight(layer_like(block.core, r_in, c_out, bias=bias),
                              torch.einsum("or,rsk->osk", R_out, core))
    else:
        raise ValueError(f"unknown form {form!r}; choose one of {', '.join(FORMS)}")
    pair = TwoLayerForm(first, _with_bias(second, block), form)
    return pair.train(block.training)


def form_macs(block: KFEBlock, locations_in: int = 1, locations_out: int = 1) -> Dict[str, int]:
    """Multiply-accumulates of each form without the bias (the table in the module docstring);
    with the default ``locations_in = locations_out = 1``, the number of weights."""
    (r_in, c_in), (c_out, r_out) = block.rotation_in_matrix().shape, block.rotation_out_matrix().shape
    k = adapter_for(block.core).kernel_numel(block.core)
    rotate_in, rotate_out = c_in * r_in * locations_in, r_out * c_out * locations_out
    return {"kfe": rotate_in + r_in * r_out * k * locations_out + rotate_out,
            "in_merged": c_in * r_out * k * locations_out + rotate_out,
            "out_merged": rotate_in + r_in * c_out * k * locations_out,
            "dense": c_in * c_out * k * locations_out}


def cheapest(costs: Dict[str, float], allowed: Sequence[str] = FORMS) -> str:
    """The allowed form with the smallest cost; ties go to the form with fewer layers."""
    return min(allowed, key=lambda f: (costs[f], FORM_LAYERS[f], FORMS.index(f)))


class FormLatencies:
    """Measured latency of each form of a block on the input it reads, cached by shape.

    The key is the block's layers (``repr``: kind, channels, kernel geometry, bias), the input's
    shape, dtype and device, and the forms: a block of the same shape met again (e.g. in the
    next trial of a ratio search) gets the same answer without being timed again, which keeps
    the choice deterministic within one cache. ``timing``: options of
    :func:`~tp_eigendamage.latency.measure_latency` (default: 5 samples of at least 2 ms, enough
    for the several-fold differences between forms that decide a choice).
    """

    def __init__(self, **timing):
        self.timing = {"repeats": 5, "min_sample_s": 0.002, **timing}
        self.seconds: Dict[tuple, Dict[str, float]] = {}

    def __call__(self, block: KFEBlock, x: torch.Tensor, allowed: Sequence[str]) -> Dict[str, float]:
        key = (tuple(repr(p) for p in (block.rotate_in, block.core, block.rotate_out)),
               tuple(x.shape), x.dtype, str(x.device), tuple(allowed))
        if key not in self.seconds:
            candidates: List[nn.Module] = [form_module(block, f) for f in allowed]
            self.seconds[key] = dict(zip(allowed, measure_latency(candidates, x, **self.timing)))
        return self.seconds[key]
