"""The Kronecker-factored eigenbasis (KFE) reparameterization (MATH.md §2, §4, §5).

A layer ``y = W x + b`` becomes three plain layers that Torch-Pruning traces as usual::

    x → rotate_in (Q_Aᵀ, 1×1 conv / linear) → core (W* = Q_Sᵀ W Q_A, original kernel)
      → rotate_out (Q_S, original bias) → y

In these coordinates the K-FAC Fisher ``A ⊗ S`` is diagonal with entries ``λ_S,i λ_A,j``, so
removing a core input channel (eigen-direction j of A) or output channel (direction i of S)
costs exactly the ``damage_in`` / ``damage_out`` of MATH.md §3.

* :func:`to_kfe` rewrites eligible layers in place; on a model that already holds KFE blocks it
  re-rotates each block whose core has fresh statistics and merges the new rotations into the
  existing rotation layers (MATH.md §5), so a block never gets deeper than three stages.
* :func:`fold_kfe` multiplies a block back into one dense layer ``W' = Q_S' W*' Q_A'ᵀ`` (§4).
"""
from __future__ import annotations

import weakref
from typing import Dict, Iterable, List, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .kfac import KFACStats, StaleStatisticsError
from .layers import adapter_for


class KFEError(ValueError):
    """Bad input to :func:`to_kfe` / :func:`fold_kfe` / a KFE block; the model is left unchanged."""


class StaleBasisError(KFEError):
    """A block's rotation weights no longer match its stored bases AND its outer channels were
    pruned, so neither its directions nor its outer channels can be identified."""


# -- plain layers -----------------------------------------------------------------------------
_PLAIN_FORWARDS = (nn.Conv2d.forward, nn.Linear.forward)


def is_plain_layer(module: nn.Module) -> bool:
    """``nn.Conv2d`` / ``nn.Linear`` (or a subclass keeping their forward), so ``y = W ⋆ x + b``.

    Subclasses that change the forward (timm's ``Conv2dSame``, ``StdConv2d``, ...) compute
    something else than ``W ⋆ x`` and cannot be rotated exactly.
    """
    kind = type(module)
    return (kind.forward in _PLAIN_FORWARDS
            and getattr(kind, "_conv_forward", nn.Conv2d._conv_forward) is nn.Conv2d._conv_forward)


def layer_like(like: nn.Module, in_features: int, out_features: int, *, bias: bool,
               pointwise: bool = False) -> nn.Module:
    """A fresh plain layer of ``like``'s kind, device, dtype and ``requires_grad``, weights unset.

    ``pointwise=True`` gives the rotation layer (1×1 conv / linear). Otherwise a conv keeps
    ``like``'s kernel size, stride, padding (string padding included), dilation and padding mode.
    """
    kw = dict(bias=bias, device=like.weight.device, dtype=like.weight.dtype)
    if isinstance(like, nn.Conv2d):
        geometry = (dict(kernel_size=1) if pointwise else dict(
            kernel_size=like.kernel_size, stride=like.stride, padding=like.padding,
            dilation=like.dilation, padding_mode=like.padding_mode))
        layer = torch.nn.utils.skip_init(nn.Conv2d, in_features, out_features, **geometry, **kw)
    else:
        layer = torch.nn.utils.skip_init(nn.Linear, in_features, out_features, **kw)
    layer.requires_grad_(like.weight.requires_grad)
    return layer


def weight_3d(layer: nn.Module) -> torch.Tensor:
    """The weight of an ungrouped layer as ``(out, in, K)`` float64 (K kernel offsets, 1 for Linear)."""
    return adapter_for(layer).weight_blocks(layer)[0].detach().double()


def _mean_grad_3d(factors) -> Optional[torch.Tensor]:
    """The ungrouped layer's mean data-label gradient as ``(out, in, K)``, or ``None``."""
    mean_grad = factors.mean_grad
    return None if mean_grad is None else mean_grad[0]


def _load_weight(layer: nn.Module, value: torch.Tensor) -> None:
    with torch.no_grad():
        layer.weight.copy_(value.reshape(layer.weight.shape))


def _matrix(layer: nn.Module) -> torch.Tensor:
    """A rotation layer's weight as an ``(out, in)`` float64 matrix."""
    return layer.weight.detach().double().reshape(layer.weight.shape[0], -1)


def _in_kfe(eigen, W: torch.Tensor) -> torch.Tensor:
    """``Q_Sᵀ W_k Q_A`` for every kernel offset k of an ``(out, in, K)`` tensor (float64)."""
    _, q_a, _, q_s = (t.to(W.device, torch.float64) for t in eigen)
    return torch.einsum("so,sik,ij->ojk", q_s, W.double(), q_a)


def _rotated(eigen, W, R_in=None, R_out=None):
    """Rotate ``R_out · W · R_in`` into the eigenbases ``(λ_A, Q_A, λ_S, Q_S)`` of the core.

    Returns ``(Q_Aᵀ R_in, Q_Sᵀ W_k Q_A, R_out Q_S)``; ``R = None`` means the identity. The
    product of the three is unchanged because ``Q_A`` and ``Q_S`` are orthogonal.
    """
    _, q_a, _, q_s = (t.to(W.device, torch.float64) for t in eigen)
    return (q_a.T if R_in is None else q_a.T @ R_in), _in_kfe(eigen, W), (q_s if R_out is None else R_out @ q_s)


def _buffers(eigen, R_in, R_out, like: torch.Tensor, mean_grad: Optional[torch.Tensor]):
    """``(eigen_in, eigen_out, basis_in, basis_out, fisher_diag, mean_grad)`` of a freshly
    rotated block.

    ``basis_in = R_inᵀ`` and ``basis_out = R_out`` (the current directions), ``fisher_diag =
    λ_S λ_Aᵀ``, ``mean_grad = Q_Sᵀ Ḡ_k Q_A`` from the layer's mean data-label gradient ``Ḡ``
    ``(out, in, K)`` (``None`` stays ``None``); on ``like``'s device and dtype.
    """
    lam_a, _, lam_s, _ = eigen
    rotated = (lam_a, lam_s, R_in.T, R_out, torch.outer(lam_s, lam_a),
               None if mean_grad is None else _in_kfe(eigen, mean_grad))
    return tuple(None if t is None else t.detach().to(like.device, like.dtype).contiguous() for t in rotated)


def _anchors(at: torch.Tensor, once: torch.Tensor) -> torch.Tensor:
    """Per row, the position ``at`` of an entry whose value occurs ONCE in the basis (so it can
    only sit there); -1 where the row has no such entry."""
    pick = once.int().argmax(dim=1, keepdim=True)
    return torch.where(once.any(dim=1), at.gather(1, pick).squeeze(1), -1)


def _match_rows(current: torch.Tensor, target: torch.Tensor) -> Optional[torch.Tensor]:
    """Distinct indices ``s`` with ``current == target[s]`` exactly, or ``None``.

    Rows that are equal (e.g. all zero) are interchangeable and taken in order.
    """
    m, both = current.shape[0], torch.cat([current, target])
    ids = (torch.unique(both, dim=0, return_inverse=True)[1] if both.shape[1] else
           torch.zeros(both.shape[0], dtype=torch.long, device=both.device))
    cur_sorted, cur_order = ids[:m].sort(stable=True)
    tgt_sorted, tgt_order = ids[m:].sort(stable=True)
    start = torch.searchsorted(tgt_sorted, cur_sorted)
    count = torch.searchsorted(tgt_sorted, cur_sorted, right=True) - start
    rank = torch.arange(m, device=ids.device) - torch.searchsorted(cur_sorted, cur_sorted)
    if not (rank < count).all():
        return None
    rows = torch.empty_like(cur_order)
    rows[cur_order] = tgt_order[start + rank]
    return rows


def _complete(rows: torch.Tensor, current: torch.Tensor, target: torch.Tensor) -> Optional[torch.Tensor]:
    """Fill the unknown (-1) entries of ``rows`` by exact matches of those rows of ``current``
    among the rows of ``target`` not used yet; ``None`` if some row has none."""
    todo = rows < 0
    if not todo.any():
        return rows
    free = torch.ones(target.shape[0], dtype=torch.bool, device=rows.device)
    free[rows[~todo]] = False
    free = free.nonzero().squeeze(1)
    found = _match_rows(current[todo], target[free])
    return None if found is None else rows.masked_scatter(todo, free[found])


def _exact_indices(current: torch.Tensor, basis: torch.Tensor) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """``(rows, cols)`` with ``current == basis[rows][:, cols]`` exactly, or ``None``.

    Every entry of ``current`` is looked up among the sorted entries of ``basis``; one whose
    value occurs once in ``basis`` pins its row and column. Columns left unpinned (holding only
    repeated values such as the zeros and ±1 of dead channels) are matched exactly on the
    pinned rows, then unpinned rows on all columns, and the whole result is checked.
    Where the remaining entries fit several choices (equal values), one of them is returned.
    """
    current = current.to(basis.dtype)
    flat, order = basis.reshape(-1).sort()
    distinct, counts = torch.unique_consecutive(flat, return_counts=True)
    values = current.reshape(-1).contiguous()
    k = torch.searchsorted(distinct, values).clamp(max=distinct.numel() - 1)
    at = order[(counts.cumsum(0) - counts)[k]].reshape(current.shape)
    once = ((distinct[k] == values) & (counts[k] == 1)).reshape(current.shape)
    rows, cols = _anchors(at // basis.shape[1], once), _anchors((at % basis.shape[1]).T, once.T)
    pinned = rows >= 0
    cols = _complete(cols, current[pinned].T, basis[rows[pinned]].T)
    rows = None if cols is None else _complete(rows, current, basis[:, cols])
    if rows is None or not (basis[rows][:, cols] == current).all():
        return None
    return rows, cols


class Survivors(NamedTuple):
    """What is left of a block: indices into its buffers (see :meth:`KFEBlock.surviving`)."""

    directions_in: torch.Tensor   # columns of basis_in / entries of eigen_in, in core-input order
    directions_out: torch.Tensor  # columns of basis_out / entries of eigen_out, in core-output order
    channels_in: torch.Tensor     # rows of basis_in, in block-input order
    channels_out: torch.Tensor    # rows of basis_out, in block-output order


# block → (rotation weights and bases, their versions, Survivors): the lookup is redone only
# when one of them was replaced (Torch-Pruning, re-rotation) or changed in place (training).
_SURVIVORS: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


# -- the block --------------------------------------------------------------------------------
class KFEBlock(nn.Module):
    """``rotate_in → core → rotate_out``, built only from ``nn.Conv2d`` / ``nn.Linear``.

    Buffers (set when the block is built or re-rotated, never pruned by Torch-Pruning):

    * ``basis_in``  ``(in, r_in)``:  the input directions, i.e. ``rotate_in``'s rows at build /
      re-rotation time (the columns of ``Q_A``; after re-rotation the full effective rotation);
    * ``basis_out`` ``(out, r_out)``: the output directions (``rotate_out``'s columns, ``Q_S``);
    * ``eigen_in``  ``(r_in,)``:  ``λ_A``, eigenvalue of each column of ``basis_in``;
    * ``eigen_out`` ``(r_out,)``: ``λ_S``;
    * ``fisher_diag`` ``(r_out, r_in)``: the Fisher diagonal in the KFE, ``λ_S,i λ_A,j`` or,
      after :func:`tp_eigendamage.ekfac.fit_eigen_correction`, the EK-FAC refit (then
      ``eigen_corrected`` is True);
    * ``mean_grad`` ``(r_out, r_in, K)`` or ``None``: the mean data-label gradient in the KFE,
      ``Ḡ* = Q_Sᵀ Ḡ_k Q_A`` (the gradient of the loss w.r.t. the core weight ``W*``), for the
      damages' first-order term; refit with ``fisher_diag``.
    * ``removal_fisher_in`` ``(r_in,)`` / ``removal_fisher_out`` ``(r_out,)`` or ``None``: the
      Fisher's exact quadratic form along the removal of each direction, set by
      :func:`~tp_eigendamage.ekfac.fit_eigen_correction` (``None`` after a re-rotation).

    Torch-Pruning removes rows of ``rotate_in`` / columns of ``core`` (input directions),
    rows of ``core`` / columns of ``rotate_out`` (output directions) and columns of
    ``rotate_in`` / rows of ``rotate_out`` (the block's outer channels, e.g. a residual stream)
    without knowing these buffers; :meth:`surviving` recovers which stored directions and
    outer channels are still present. Re-rotation (:func:`to_kfe`) re-bases every buffer on
    the current directions and outer channels.
    """

    def __init__(self, rotate_in: nn.Module, core: nn.Module, rotate_out: nn.Module,
                 eigen_in: torch.Tensor, eigen_out: torch.Tensor,
                 basis_in: torch.Tensor, basis_out: torch.Tensor,
                 fisher_diag: torch.Tensor, mean_grad: Optional[torch.Tensor] = None):
        super().__init__()
        self.rotate_in = rotate_in
        self.core = core
        self.rotate_out = rotate_out
        self.register_buffer("eigen_in", eigen_in)
        self.register_buffer("eigen_out", eigen_out)
        self.register_buffer("basis_in", basis_in)
        self.register_buffer("basis_out", basis_out)
        self.register_buffer("fisher_diag", fisher_diag)
        self.register_buffer("mean_grad", mean_grad)
        self.register_buffer("removal_fisher_in", None)
        self.register_buffer("removal_fisher_out", None)
        self.eigen_corrected = False

    @classmethod
    def from_layer(cls, layer: nn.Module, factors) -> "KFEBlock":
        """The block of a plain ungrouped layer from its :class:`~tp_eigendamage.kfac.KFACFactors`
        (eigenbases ``(λ_A, Q_A, λ_S, Q_S)`` and mean gradient)."""
        out_f, in_f = layer.weight.shape[:2]
        has_bias = getattr(layer, "bias", None) is not None
        eigen = factors.eigen()
        weights = _rotated(eigen, weight_3d(layer))
        blk = cls(layer_like(layer, in_f, in_f, bias=False, pointwise=True),
                  layer_like(layer, in_f, out_f, bias=False),
                  layer_like(layer, out_f, out_f, bias=has_bias, pointwise=True),
                  *_buffers(eigen, weights[0], weights[2], layer.weight, _mean_grad_3d(factors)))
        blk._load(weights)
        if has_bias:
            with torch.no_grad():
                blk.rotate_out.bias.copy_(layer.bias)
        return blk

    def forward(self, x):
        return self.rotate_out(self.core(self.rotate_in(x)))

    def __getattr__(self, name: str):
        """The replaced layer's shape attributes and bias (``in_features``/``in_channels`` from
        ``rotate_in``; ``out_features``/``out_channels``/``bias`` from ``rotate_out``), which code
        written for the plain layer reads (e.g. Torch-Pruning's FLOP counter for timm attention)."""
        if name in ("in_features", "in_channels"):
            return getattr(self.rotate_in, name)
        if name in ("out_features", "out_channels", "bias"):
            return getattr(self.rotate_out, name)
        return super().__getattr__(name)

    def rotation_in_matrix(self) -> torch.Tensor:
        """Current input rotation as ``(r_in_now, in)`` (rows are directions)."""
        return self.rotate_in.weight.reshape(self.rotate_in.weight.shape[0], -1)

    def rotation_out_matrix(self) -> torch.Tensor:
        """Current output rotation as ``(out, r_out_now)`` (columns are directions)."""
        return self.rotate_out.weight.reshape(self.rotate_out.weight.shape[0], -1)

    def surviving(self) -> Survivors:
        """Which stored directions and outer channels the block still has, after any removals.

        As long as the rotation weights are unchanged since the block was built / re-rotated,
        they are exact copies of basis entries, ``rotate_in[d, c] = basis_in[s_c, j_d]`` and
        ``rotate_out[c, d] = basis_out[s_c, j_d]``, and :func:`_exact_indices` recovers ``s``
        (outer channels) and ``j`` (directions) exactly. Otherwise (rotations fine-tuned) each
        direction is matched to the stored one with the largest ``|cos|``, which needs the outer
        channels intact; if they were pruned too, :class:`StaleBasisError`. The result is
        cached until a rotation weight or basis is replaced or changed in place.
        """
        tensors = (self.rotate_in.weight, self.rotate_out.weight, self.basis_in, self.basis_out)
        versions = tuple(t._version for t in tensors)
        cached = _SURVIVORS.get(self)
        if cached is None or cached[1] != versions or any(a is not b for a, b in zip(cached[0], tensors)):
            channels_in, directions_in = self._locate(self.rotation_in_matrix().detach().T, self.basis_in, "input")
            channels_out, directions_out = self._locate(self.rotation_out_matrix().detach(), self.basis_out, "output")
            cached = (tensors, versions, Survivors(directions_in, directions_out, channels_in, channels_out))
            _SURVIVORS[self] = cached
        return cached[2]

    def surviving_directions(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Indices into ``eigen_in`` / ``eigen_out`` (columns of the bases) of the directions left."""
        s = self.surviving()
        return s.directions_in, s.directions_out

    def surviving_outer(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Indices into the rows of ``basis_in`` / ``basis_out`` of the block's inputs / outputs left."""
        s = self.surviving()
        return s.channels_in, s.channels_out

    @staticmethod
    def _locate(current: torch.Tensor, basis: torch.Tensor, side: str) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(channels, directions)`` of ``current`` ``(outer_now, r_now)`` in ``basis`` ``(outer, r)``."""
        found = _exact_indices(current, basis)
        if found is not None:
            return found
        if current.shape[0] != basis.shape[0]:
            raise StaleBasisError(
                f"the {side} rotation of this KFE block changed since it was built (e.g. it was "
                f"fine-tuned) and its {side} channels were pruned ({basis.shape[0]} → "
                f"{current.shape[0]}), so its stored eigenbasis cannot be matched any more; run "
                "collect_kfac on the current model and to_kfe(model, stats) again, which "
                "re-rotates the block and re-bases its buffers")
        cos = F.normalize(basis.double(), dim=0).T @ F.normalize(current.double(), dim=0)
        return torch.arange(basis.shape[0], device=basis.device), cos.abs().argmax(dim=0)

    def keep_surviving_buffers(self) -> None:
        """Cut the buffers down to the surviving directions and outer channels, in the layers' order."""
        s = self.surviving()
        self.basis_in = self.basis_in[s.channels_in][:, s.directions_in]
        self.basis_out = self.basis_out[s.channels_out][:, s.directions_out]
        self.eigen_in, self.eigen_out = self.eigen_in[s.directions_in], self.eigen_out[s.directions_out]
        self.fisher_diag = self.fisher_diag[s.directions_out][:, s.directions_in]
        if self.mean_grad is not None:
            self.mean_grad = self.mean_grad[s.directions_out][:, s.directions_in]
        if self.removal_fisher_in is not None:
            self.removal_fisher_in = self.removal_fisher_in[s.directions_in]
            self.removal_fisher_out = self.removal_fisher_out[s.directions_out]

    def rerotation(self, eigen):
        """New ``(rotate_in, core, rotate_out)`` weights from the core's ``(λ_A, Q_A, λ_S, Q_S)``.

        ``Q_A,new`` / ``Q_S,new`` diagonalize the core's own factors; they are merged into the
        rotation layers (``R_in ← Q_A,newᵀ R_in``, ``R_out ← R_out Q_S,new``) and the core
        becomes ``Q_S,newᵀ W* Q_A,new``: same function, still three stages (MATH.md §5).
        """
        return _rotated(eigen, weight_3d(self.core), _matrix(self.rotate_in), _matrix(self.rotate_out))

    def _load(self, weights) -> None:
        for layer, value in zip((self.rotate_in, self.core, self.rotate_out), weights):
            _load_weight(layer, value)

    def _set_rotation(self, factors, *weights) -> None:
        """Load rotated ``(R_in, W*, R_out)`` and re-base every buffer on the current directions
        (``factors``: the core's :class:`~tp_eigendamage.kfac.KFACFactors`)."""
        self._load(weights)
        (self.eigen_in, self.eigen_out, self.basis_in, self.basis_out, self.fisher_diag,
         self.mean_grad) = _buffers(factors.eigen(), weights[0], weights[2], self.core.weight,
                                    _mean_grad_3d(factors))
        self.removal_fisher_in = self.removal_fisher_out = None
        self.eigen_corrected = False

    def num_parameters(self) -> int:
        """Parameters of the three layers (rotations included)."""
        return sum(p.numel() for p in self.parameters())

    def dense_num_parameters(self) -> int:
        """Parameters of the one dense layer with the block's outer shape (what :meth:`fold` gives)."""
        out_f, in_f = self.rotation_out_matrix().shape[0], self.rotation_in_matrix().shape[1]
        bias = 0 if self.rotate_out.bias is None else out_f
        return out_f * in_f * adapter_for(self.core).kernel_numel(self.core) + bias

    def fold(self) -> nn.Module:
        """One dense layer with weight ``W'_k = R_out W*_k R_in`` (per kernel offset) and the bias."""
        R_in, R_out = _matrix(self.rotate_in), _matrix(self.rotate_out)
        dense = layer_like(self.core, R_in.shape[1], R_out.shape[0], bias=self.rotate_out.bias is not None)
        _load_weight(dense, torch.einsum("or,rsk,si->oik", R_out, weight_3d(self.core), R_in))
        if dense.bias is not None:
            with torch.no_grad():
                dense.bias.copy_(self.rotate_out.bias)
        return dense


def kfe_blocks(model: nn.Module) -> List[Tuple[str, KFEBlock]]:
    """Every :class:`KFEBlock` of ``model`` as ``(qualified name, block)``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, KFEBlock)]


# -- model surgery -------------------------------------------------------------------------------
def _parents(model: nn.Module) -> Dict[int, List[Tuple[nn.Module, str]]]:
    """``id(child) → [(parent, attribute)]`` over every place a module is registered."""
    places: Dict[int, List[Tuple[nn.Module, str]]] = {}
    for _, parent in model.named_modules(remove_duplicate=False):
        for attr, child in parent._modules.items():
            if child is not None:
                places.setdefault(id(child), []).append((parent, attr))
    return places


def _swap(places, old: nn.Module, new: nn.Module) -> None:
    for parent, attr in places[id(old)]:
        setattr(parent, attr, new)


def _owners(model: nn.Module) -> Dict[int, KFEBlock]:
    """``id(module) → KFEBlock`` for every module inside a block (the block's parts)."""
    return {id(m): blk for _, blk in kfe_blocks(model)
            for part in (blk.rotate_in, blk.core, blk.rotate_out) for m in part.modules()}


def classifier_modules(model: nn.Module) -> List[nn.Module]:
    """The classifier left out by default.

    ``model.get_classifier()`` when the model has it (timm; tuples, e.g. distilled heads,
    give several modules), otherwise the LAST ``nn.Conv2d`` / ``nn.Linear`` registered in the
    model — where torchvision and most hand-written models keep their head.
    """
    get = getattr(model, "get_classifier", None)
    if callable(get):
        head = get()
        return [m for m in (head if isinstance(head, (tuple, list)) else [head]) if isinstance(m, nn.Module)]
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return layers[-1:]


ModuleRef = Union[nn.Module, str]


def _resolve(model: nn.Module, ref: ModuleRef, what: str) -> nn.Module:
    if isinstance(ref, str):
        try:
            return model.get_submodule(ref)
        except AttributeError:
            raise KFEError(f"{what} names '{ref}', which is not a submodule of the model") from None
    if not any(ref is m for m in model.modules()):
        raise KFEError(f"{what} contains a {type(ref).__name__} that is not a submodule of the model")
    return ref


def _skipped(model, skip, include_classifier, owners) -> Dict[int, str]:
    """``id(module) → why`` for every module (and submodule) the pass must leave alone."""
    refs = [(m, "skip=") for m in (_resolve(model, r, "skip=") for r in skip)]
    if not include_classifier:
        refs += [(m, "the classifier (include_classifier=False)") for m in classifier_modules(model)]
    out: Dict[int, str] = {}
    for ref, why in refs:
        blk = owners.get(id(ref))
        for m in (blk or ref).modules():
            out[id(m)] = why
    return out


def _ineligible(module: nn.Module, owners) -> Optional[str]:
    """Why ``module`` cannot be rewritten / re-rotated, or ``None``."""
    if not (isinstance(module, (nn.Conv2d, nn.Linear)) and is_plain_layer(module)):
        return (f"is a {type(module).__name__}; only nn.Conv2d / nn.Linear (or subclasses that "
                "keep their forward) can be rewritten")
    if adapter_for(module).groups(module) != 1:
        return (f"is a grouped conv (groups={module.groups}); grouped and depthwise convs are "
                "left out of the KFE pass (score them in channel space)")
    blk = owners.get(id(module))
    if blk is not None and module is not blk.core:
        return "is a rotation layer of a KFE block; blocks are re-rotated through their core"
    return None


def _check_stats(model: nn.Module, stats) -> None:
    if not isinstance(stats, KFACStats):
        raise KFEError(f"stats must be the KFACStats returned by collect_kfac, got {type(stats).__name__}")
    if stats.model is not None and stats.model is not model:
        raise StaleStatisticsError(
            f"stats were collected on another model ({type(stats.model).__name__} at "
            f"{id(stats.model):#x}), not on this {type(model).__name__}; run collect_kfac on "
            "this model")


def _targets(model, stats, modules, skipped, owners) -> List[Tuple[str, nn.Module]]:
    names = {id(m): n for n, m in model.named_modules()}
    if modules is None:
        return [(names[id(m)], m) for m in stats if id(m) in names and id(m) not in skipped
                and _ineligible(m, owners) is None]
    chosen = []
    for ref in modules:
        m = _resolve(model, ref, "modules=")
        m = m.core if isinstance(m, KFEBlock) else m
        name = names[id(m)] or type(model).__name__
        why = _ineligible(m, owners) or (skipped.get(id(m)) and f"is {skipped[id(m)]}; remove it "
                                         "from skip= / pass include_classifier=True to rewrite it")
        if why is None and m not in stats:
            why = "has no K-FAC factors in stats; run collect_kfac with it covered"
        if why is not None:
            raise KFEError(f"modules= contains '{name}', which {why}")
        chosen.append((name, m))
    if not chosen:
        raise KFEError("modules= is empty; pass None to rewrite every eligible layer")
    return chosen


def _factors(name: str, module: nn.Module, stats):
    f = stats[module]  # raises StaleStatisticsError on a shape change
    if f.factor_mode != "channel" and adapter_for(module).kernel_numel(module) > 1:
        raise KFEError(
            f"'{name}' has factor_mode={f.factor_mode!r} factors; the KFE rotates conv inputs "
            "with a 1×1 conv, which needs collect_kfac(..., factor_mode='channel')")
    f.eigen()
    return f


def to_kfe(model: nn.Module, stats: KFACStats, *, modules: Optional[Iterable[ModuleRef]] = None,
           skip: Iterable[ModuleRef] = (), include_classifier: bool = False) -> nn.Module:
    """Rewrite layers into KFE blocks in place (MATH.md §2); re-rotate existing blocks (§5).

    Args:
        model: the model ``stats`` were collected on.
        stats: :func:`~tp_eigendamage.collect_kfac` output (conv factors in ``"channel"`` mode).
        modules: layers (modules or qualified names) to rewrite; a :class:`KFEBlock` or its
            core means "re-rotate". Default: every eligible layer with factors in ``stats``.
        skip: layers (modules or names, subtrees included) to leave alone.
        include_classifier: also rewrite the classifier (see :func:`classifier_modules`).

    Eligible: ungrouped plain ``nn.Conv2d`` / ``nn.Linear`` with factors in ``stats`` and the
    cores of existing blocks (whose factors, collected on the core, give the re-rotation).
    Grouped/depthwise convs and the rotation layers of existing blocks are never rewritten.
    Every new weight is computed before the model is touched, so on error nothing changes.
    """
    _check_stats(model, stats)
    owners = _owners(model)
    skipped = _skipped(model, list(skip), include_classifier, owners)
    targets = _targets(model, stats, None if modules is None else list(modules), skipped, owners)
    if not targets:
        raise KFEError("nothing to rewrite: no eligible layer (ungrouped Conv2d/Linear, not "
                       "skipped, not the classifier) has factors in stats; collect_kfac again "
                       "on the current model")
    places = _parents(model)
    plan = []
    for name, m in targets:
        factors = _factors(name, m, stats)
        blk = owners.get(id(m))
        if blk is not None:
            plan.append((blk, factors, blk.rerotation(factors.eigen())))
        elif id(m) not in places:
            raise KFEError(f"the model itself is a {type(m).__name__}; wrap it in nn.Sequential "
                           "so the layer can be replaced in place")
        else:
            plan.append((m, None, KFEBlock.from_layer(m, factors)))
    for target, factors, new in plan:
        if factors is None:
            _swap(places, target, new)
        else:
            target._set_rotation(factors, *new)
    return model


def fold_kfe(model: nn.Module, *, only_unprofitable: bool = True) -> nn.Module:
    """Replace KFE blocks by one dense layer each, ``W' = Q_S' W*' Q_A'ᵀ`` (MATH.md §4); in place.

    With ``only_unprofitable=True`` only blocks whose three layers hold at least as many
    parameters as the dense layer are folded (the bottleneck does not pay); ``False`` folds
    every block. Exact: the dense layer computes the pruned block's function.
    """
    blocks = kfe_blocks(model)
    if any(name == "" for name, _ in blocks):
        raise KFEError("the model itself is a KFEBlock; call model.fold() instead")
    chosen = [b for _, b in blocks
              if not only_unprofitable or b.num_parameters() >= b.dense_num_parameters()]
    folded = [(b, b.fold()) for b in chosen]
    places = _parents(model)
    for blk, dense in folded:
        _swap(places, blk, dense)
    return model
