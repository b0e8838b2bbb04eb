"""Per-layer-kind adapters: the one home of every ``if conv ... elif linear`` branch.

Each adapter knows, for one layer kind, how to turn what flows through the layer into
K-FAC samples and how to view its weight as a stack of per-group matrices. Everything
downstream (factor collection, the KFE rewrite, every importance criterion) asks the
adapter instead of branching on the module type.

Shapes used throughout (``G`` = groups, ``K`` = kernel offsets, 1 for Linear):

* input samples  ``a`` live in ``R^{d_in}``  with ``d_in  = in/G`` (channel mode) or
  ``in/G * K`` (patch mode);
* output samples ``g`` live in ``R^{d_out}`` with ``d_out = out/G``;
* ``weight_blocks(module)`` is a ``(G, d_out, in/G, K)`` view of the weight.

A Linear that reads a map ``(N, C, H, W)`` flattened to ``(N, C·H·W)`` can instead be seen as
a conv with one output location and an ``H×W`` kernel: ``C`` input channels, each read at
``P = H·W`` positions (``positions=P``: weight blocks ``(1, out, C, P)``, input samples the
``C``-vectors at each position). That is exactly how Torch-Pruning couples such inputs to the
channels that produce them. :func:`~tp_eigendamage.collect_kfac` uses it for layers whose
dense input factor would exceed its ``max_factor_dim``.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["LayerAdapter", "LinearAdapter", "Conv2dAdapter", "adapter_for", "example_chunks",
           "conv_explicit_padding", "conv_coverage", "CHUNK_ELEMENTS"]

#: Per-example weight gradients are formed for at most this many entries at a time.
CHUNK_ELEMENTS = 1 << 24


def example_chunks(num_examples: int, per_example: int) -> List[slice]:
    """Slices of the batch holding at most :data:`CHUNK_ELEMENTS` entries when each example
    needs ``per_example`` of them (at least one example per chunk)."""
    step = max(1, CHUNK_ELEMENTS // max(1, per_example))
    return [slice(lo, lo + step) for lo in range(0, num_examples, step)]


class LayerAdapter:
    """Interface shared by the layer kinds K-FAC understands."""

    layer_kind: str = ""

    def groups(self, module: nn.Module) -> int:
        return 1

    def kernel_numel(self, module: nn.Module) -> int:
        return 1

    def in_features(self, module: nn.Module) -> int:
        raise NotImplementedError

    def out_features(self, module: nn.Module) -> int:
        raise NotImplementedError

    def input_dim(self, module: nn.Module, factor_mode: str, positions: int = 1) -> int:
        """Size of one input sample ``a`` (per group)."""
        per_group = self.in_features(module) // self.groups(module) // positions
        return per_group * (self.kernel_numel(module) if factor_mode == "patch" else 1)

    def output_dim(self, module: nn.Module) -> int:
        return self.out_features(module) // self.groups(module)

    def flattened_map(self, module: nn.Module, x: torch.Tensor) -> Optional[Tuple[int, int]]:
        """``(C, P)`` if the layer reads ``x`` as a flattened map of ``C`` channels at ``P``
        positions each (module docstring), else ``None``."""
        return None

    def input_moments(
        self, module: nn.Module, x: torch.Tensor, output_shape: torch.Size, factor_mode: str,
        positions: int = 1,
    ) -> Tuple[torch.Tensor, torch.Tensor, int]:
        """Return ``(Σ a aᵀ, Σ a, number of samples)`` for one call of the layer.

        Shapes ``(G, d_in, d_in)`` and ``(G, d_in)``; sums in float32.
        """
        raise NotImplementedError

    def grad_moment(self, module: nn.Module, g: torch.Tensor) -> torch.Tensor:
        """Return ``Σ g gᵀ`` over every output location of one call, ``(G, d_out, d_out)``."""
        raise NotImplementedError

    def weight_blocks(self, module: nn.Module, positions: int = 1,
                      weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The weight (or ``weight``, a tensor shaped like it, e.g. its gradient) as a
        ``(G, d_out, in/G, K)`` view (``K = positions`` for a Linear reading a flattened map)."""
        raise NotImplementedError

    def empty_layer(self, like: nn.Module, in_features: int, out_features: int, *, bias: bool,
                    pointwise: bool = False) -> nn.Module:
        """A new ungrouped layer of ``like``'s kind, device and dtype, weights uninitialised.

        ``pointwise=True`` gives a 1×1 layer (a rotation); otherwise the layer keeps ``like``'s
        geometry (kernel, stride, padding, dilation, padding mode).
        """
        raise NotImplementedError


def gram(t: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``Σ_{n,l} w_l² t_{n,g,:,l} t_{n,g,:,l}ᵀ`` per group ``g`` of ``t`` shaped ``(N, G, C, L)``
    (``w = weight``, shape ``(L,)``, or 1): ``(G, C, C)``.

    One contiguous ``(G, C, N·L)`` copy, weighted in place, times its own transpose
    (:func:`symmetric_product`; ``einsum`` over ``n`` and ``l`` would permute each operand
    separately and compute both triangles)."""
    n, G, C, L = t.shape
    rows = torch.empty((G, C, n, L), dtype=t.dtype, device=t.device)
    rows.copy_(t.permute(1, 2, 0, 3))
    if weight is not None:
        rows.mul_(weight)
    return symmetric_product(rows.view(G, C, n * L))


#: below this many rows, :func:`symmetric_product` is one plain batched matmul
SYMMETRIC_SPLIT_ROWS = 256


def symmetric_product(rows: torch.Tensor) -> torch.Tensor:
    """``R Rᵀ`` of ``rows`` ``(G, C, L)`` computing each off-diagonal block once.

    ``[R₁; R₂][R₁; R₂]ᵀ = [[R₁R₁ᵀ, (R₂R₁ᵀ)ᵀ], [R₂R₁ᵀ, R₂R₂ᵀ]]`` with the diagonal blocks split
    again down to :data:`SYMMETRIC_SPLIT_ROWS` rows: 3/4 of the multiply-adds of the full
    product at one split, 5/8 at two, tending to 1/2 (BLAS's symmetric rank-k update ``syrk``
    does this, but torch does not expose it)."""
    C = rows.shape[1]
    if C < SYMMETRIC_SPLIT_ROWS:
        return torch.bmm(rows, rows.transpose(1, 2))
    h = C // 2
    top, bottom = rows[:, :h], rows[:, h:]
    out = rows.new_empty(rows.shape[0], C, C)
    out[:, :h, :h] = symmetric_product(top)
    out[:, h:, h:] = symmetric_product(bottom)
    off = torch.bmm(bottom, top.transpose(1, 2))
    out[:, h:, :h] = off
    out[:, :h, h:] = off.transpose(1, 2)
    return out


class LinearAdapter(LayerAdapter):
    """``nn.Linear`` on ``(N, D)`` or token inputs ``(N, ..., D)``: every row is a sample."""

    layer_kind = "linear"

    def in_features(self, module: nn.Linear) -> int:
        return module.in_features

    def out_features(self, module: nn.Linear) -> int:
        return module.out_features

    #: autograd nodes of ``x.view`` / ``x.reshape`` / ``x.flatten`` (channel-major order)
    _FLATTENING_NODES = ("ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0")

    def flattened_map(self, module, x):
        """Read from autograd: ``x`` is ``(N, C·P)`` made by flattening an ``(N, C, ...)`` tensor."""
        node = x.grad_fn
        sizes = getattr(node, "_saved_self_sym_sizes", None)
        if (x.dim() != 2 or sizes is None or type(node).__name__ not in self._FLATTENING_NODES
                or len(sizes) < 3 or sizes[0] != x.shape[0] or math.prod(sizes[1:]) != x.shape[1]):
            return None
        return int(sizes[1]), int(math.prod(sizes[2:]))

    def input_moments(self, module, x, output_shape, factor_mode, positions=1):
        rows = x.detach().reshape(-1, 1, x.shape[-1] // positions, positions).float()
        return gram(rows), rows.sum(dim=(0, 3)), rows.shape[0] * positions

    def grad_moment(self, module, g):
        return gram(g.detach().reshape(-1, 1, g.shape[-1], 1).float())

    def weight_blocks(self, module, positions=1, weight=None):
        w = module.weight if weight is None else weight
        return w.reshape(1, w.shape[0], w.shape[1] // positions, positions)

    def empty_layer(self, like, in_features, out_features, *, bias, pointwise=False):
        return torch.nn.utils.skip_init(nn.Linear, in_features, out_features, bias=bias,
                                        device=like.weight.device, dtype=like.weight.dtype)

    # -- per-example gradients (C-OBD, tp_eigendamage.importance) --------------------------
    def per_example_grads(self, module, x, g):
        """``G_n = Σ_t g_t a_tᵀ`` for each example n (batch-first), ``(N, 1, out, in, 1)``."""
        a = x.detach().float().reshape(x.shape[0], -1, x.shape[-1])
        gg = g.detach().float().reshape(g.shape[0], -1, g.shape[-1])
        return torch.einsum("nto,nti->noi", gg, a)[:, None, :, :, None]


def conv_explicit_padding(module: nn.Conv2d) -> Tuple[int, int, int, int]:
    """Padding of a Conv2d as ``(left, right, top, bottom)``, string padding resolved."""
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return (0, 0, 0, 0)
        pads = []
        for k, d in zip(reversed(module.kernel_size), reversed(module.dilation)):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return tuple(pads)
    ph, pw = module.padding
    return (pw, pw, ph, ph)


def conv_coverage(module: nn.Conv2d, padded_hw: Tuple[int, int], out_hw: Tuple[int, int],
                  device, dtype=torch.float32) -> torch.Tensor:
    """How many (output location, kernel offset) pairs read each pixel of the padded input.

    ``Σ_{t,k} x_{t,k} x_{t,k}ᵀ = Σ_p c(p) x_p x_pᵀ`` (docs/method.md §2): ``c`` is a transposed
    convolution of an all-ones output map with an all-ones kernel.
    """
    kh, kw = module.kernel_size
    ones_out = torch.ones(1, 1, *out_hw, device=device, dtype=dtype)
    ones_kernel = torch.ones(1, 1, kh, kw, device=device, dtype=dtype)
    cov = F.conv_transpose2d(ones_out, ones_kernel, stride=module.stride, dilation=module.dilation)
    cov = cov[0, 0, : padded_hw[0], : padded_hw[1]]
    return F.pad(cov, (0, padded_hw[1] - cov.shape[1], 0, padded_hw[0] - cov.shape[0]))


class Conv2dAdapter(LayerAdapter):
    """``nn.Conv2d`` (any stride, padding, dilation, groups); factors per group."""

    layer_kind = "conv2d"

    def __init__(self):
        self._coverage_cache = {}

    def groups(self, module):
        return module.groups

    def kernel_numel(self, module):
        return module.kernel_size[0] * module.kernel_size[1]

    def in_features(self, module):
        return module.in_channels

    def out_features(self, module):
        return module.out_channels

    def _padded(self, module, x):
        """Input with non-zero padding modes applied explicitly, and the pad amounts."""
        pad = conv_explicit_padding(module)
        if module.padding_mode != "zeros" and any(pad):
            return F.pad(x, pad, mode=module.padding_mode), (0, 0, 0, 0)
        return x, pad

    def _patches(self, module, x, pad):
        """im2col patch vectors of (already mode-padded) ``x``, ``(N, G, in/G·K, locations)``."""
        if any(pad):
            x = F.pad(x, pad)
        patches = F.unfold(x, module.kernel_size, dilation=module.dilation, stride=module.stride)
        return patches.view(x.shape[0], module.groups, -1, patches.shape[-1])

    def _coverage(self, module, x_hw, pad, out_hw, device):
        """The coverage of the unpadded input pixels (flattened) and its square root, or
        ``None`` for the root where every pixel is read exactly once (1×1, stride 1)."""
        key = (id(module), tuple(x_hw), pad, tuple(out_hw), str(device))
        cached = self._coverage_cache.get(key)
        if cached is None:
            padded_hw = (x_hw[0] + pad[2] + pad[3], x_hw[1] + pad[0] + pad[1])
            cov = conv_coverage(module, padded_hw, out_hw, device)
            cov = cov[pad[2]: pad[2] + x_hw[0], pad[0]: pad[0] + x_hw[1]].reshape(-1)
            cached = (cov, None if bool((cov == 1).all()) else cov.sqrt())
            self._coverage_cache[key] = cached
        return cached

    def input_moments(self, module, x, output_shape, factor_mode, positions=1):
        x = x.detach().float()
        n, G = x.shape[0], module.groups
        out_hw = tuple(output_shape[-2:])
        num_locations = n * out_hw[0] * out_hw[1]
        x, pad = self._padded(module, x)
        if factor_mode == "channel":
            cov, root = self._coverage(module, x.shape[-2:], pad, out_hw, x.device)
            xg = x.reshape(n, G, -1, x.shape[-2] * x.shape[-1])
            return gram(xg, root), xg.sum(dim=0) @ cov, num_locations * self.kernel_numel(module)
        patches = self._patches(module, x, pad)
        return gram(patches), patches.sum(dim=(0, 3)), num_locations

    def grad_moment(self, module, g):
        g = g.detach().float()
        return gram(g.reshape(g.shape[0], module.groups, -1, g.shape[-2] * g.shape[-1]))

    def weight_blocks(self, module, positions=1, weight=None):
        w = module.weight if weight is None else weight
        G = module.groups
        return w.view(G, w.shape[0] // G, w.shape[1], -1)

    def empty_layer(self, like, in_features, out_features, *, bias, pointwise=False):
        geometry = (dict(kernel_size=1) if pointwise else dict(
            kernel_size=like.kernel_size, stride=like.stride, padding=like.padding,
            dilation=like.dilation, padding_mode=like.padding_mode))
        return torch.nn.utils.skip_init(nn.Conv2d, in_features, out_features, bias=bias,
                                        device=like.weight.device, dtype=like.weight.dtype, **geometry)

    # -- per-example gradients (C-OBD, tp_eigendamage.importance) --------------------------
    def per_example_grads(self, module, x, g):
        """``G_n = Σ_t g_t a_tᵀ`` over output locations t, ``(N, G, out/G, in/G, K)``.

        ``a_t`` is the im2col patch of location t; materializes the unfolded input of the
        examples passed in (the caller chunks the batch).
        """
        n, G = x.shape[0], module.groups
        patches = self._patches(module, *self._padded(module, x.detach().float()))
        gg = g.detach().float().reshape(n, G, -1, patches.shape[-1])
        grads = torch.einsum("ngol,ngil->ngoi", gg, patches)
        return grads.view(n, G, gg.shape[2], module.in_channels // G, self.kernel_numel(module))


_ADAPTERS = {nn.Linear: LinearAdapter, nn.Conv2d: Conv2dAdapter}


def adapter_for(module: nn.Module) -> Optional[LayerAdapter]:
    """A fresh adapter for ``module``'s kind, or ``None`` if K-FAC does not cover it."""
    for cls in type(module).__mro__:
        if cls in _ADAPTERS:
            return _ADAPTERS[cls]()
    return None

