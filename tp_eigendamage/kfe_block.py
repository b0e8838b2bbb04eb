"""The KFE block: a layer rewritten as ``rotate_in → core → rotate_out`` (docs/method.md §3).

A layer ``y = W x + b`` becomes three plain layers that Torch-Pruning traces as usual::

    x → rotate_in (Q_Aᵀ, 1×1 conv / linear) → core (W* = Q_Sᵀ W Q_A, original kernel)
      → rotate_out (Q_S, original bias) → y

In these coordinates the K-FAC Fisher ``A ⊗ S`` is diagonal with entries ``λ_S,i λ_A,j``, so
removing a core input channel (eigen-direction j of A) or output channel (direction i of S)
costs exactly the ``damage_in`` / ``damage_out`` of docs/method.md §4.
"""
from __future__ import annotations

import weakref
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._basis_matching import exact_indices
from ._block_damage import remember_output_terms, select
from .errors import StaleBasisError
from .layers import adapter_for
from .plain_layers import layer_like, load_weight, rotation_matrix, weight_3d

__all__ = ["KFEBlock", "Survivors"]


def _mean_grad_in_kfe(eigen, factors) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """:func:`_in_kfe` of the ungrouped layer's mean data-label gradient ``(out, in, K)``, or
    ``(None, None)`` without one."""
    mean_grad = factors.mean_grad
    return (None, None) if mean_grad is None else _in_kfe(eigen, mean_grad[0])


def _in_kfe(eigen, W: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(Q_Sᵀ W_k Q_A, W_k Q_A)`` for every kernel offset k of an ``(out, in, K)`` tensor
    (float64): the tensor in the KFE, and on the way its input side in the eigenbasis of ``A``."""
    _, q_a, _, q_s = (t.to(W.device, torch.float64) for t in eigen)
    input_side = torch.einsum("sik,ij->sjk", W.double(), q_a)
    return torch.einsum("so,sjk->ojk", q_s, input_side), input_side


def _rows(basis: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``basis[rows]`` in float64 (no gather when ``rows`` are all of them, in order)."""
    return select(basis, 0, rows).double()


def _rotated(eigen, W_kfe, R_in=None, R_out=None):
    """Rotate ``R_out · W · R_in`` into the eigenbases ``(λ_A, Q_A, λ_S, Q_S)`` of the core,
    given ``W_kfe = Q_Sᵀ W_k Q_A`` (:func:`_in_kfe`).

    Returns ``(Q_Aᵀ R_in, Q_Sᵀ W_k Q_A, R_out Q_S)``; ``R = None`` means the identity. The
    product of the three is unchanged because ``Q_A`` and ``Q_S`` are orthogonal.
    """
    _, q_a, _, q_s = (t.to(W_kfe.device, torch.float64) for t in eigen)
    return (q_a.T if R_in is None else q_a.T @ R_in), W_kfe, (q_s if R_out is None else R_out @ q_s)


def _buffers(eigen, R_in, R_out, like: torch.Tensor, mean_grad_kfe: Optional[torch.Tensor]):
    """``(eigen_in, eigen_out, basis_in, basis_out, fisher_diag, mean_grad)`` of a freshly
    rotated block.

    ``basis_in = R_inᵀ`` and ``basis_out = R_out`` (the current directions), ``fisher_diag =
    λ_S λ_Aᵀ``, ``mean_grad = Q_Sᵀ Ḡ_k Q_A`` given (the layer's mean data-label gradient in the
    KFE, :func:`_mean_grad_in_kfe`; ``None`` stays ``None``); on ``like``'s device and dtype.
    """
    lam_a, _, lam_s, _ = eigen
    rotated = (lam_a, lam_s, R_in.T, R_out, torch.outer(lam_s, lam_a), mean_grad_kfe)
    return tuple(None if t is None else t.detach().to(like.device, like.dtype).contiguous() for t in rotated)


class Survivors(NamedTuple):
    """What is left of a block: indices into its buffers (see :meth:`KFEBlock.surviving`)."""

    directions_in: torch.Tensor   # columns of basis_in / entries of eigen_in, in core-input order
    directions_out: torch.Tensor  # columns of basis_out / entries of eigen_out, in core-output order
    channels_in: torch.Tensor     # rows of basis_in, in block-input order
    channels_out: torch.Tensor    # rows of basis_out, in block-output order


class _Lookup(NamedTuple):
    """What :meth:`KFEBlock.surviving` knows about a block, valid while ``tensors`` (weak
    references to the rotation weights and bases) still point to the block's tensors at
    ``versions``."""

    tensors: tuple
    versions: tuple
    survivors: Survivors
    exact: bool                      # the rotations hold exact copies of basis entries
    orthonormal: Tuple[bool, bool]   # basis_in / basis_out have orthonormal columns


# block → _Lookup. Set when the block is built, re-rotated or cut to its survivors (nothing to
# match then: every rotation entry is where the buffers say); redone only when a rotation or
# basis was replaced (Torch-Pruning) or changed in place (training). Kept outside the module
# so that copies and pickles of a block start without one.
_LOOKUPS: "weakref.WeakKeyDictionary[nn.Module, _Lookup]" = weakref.WeakKeyDictionary()

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
      damages' first-order term; refit with ``fisher_diag``;
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
        """The block of a plain ungrouped layer from its :class:`~tp_eigendamage.KFACFactors`
        (eigenbases ``(λ_A, Q_A, λ_S, Q_S)`` and mean gradient)."""
        out_f, in_f = layer.weight.shape[:2]
        has_bias = getattr(layer, "bias", None) is not None
        eigen = factors.eigen()
        core, weight_a = _in_kfe(eigen, weight_3d(layer))
        mean_grad, mean_grad_a = _mean_grad_in_kfe(eigen, factors)
        weights = _rotated(eigen, core)
        blk = cls(layer_like(layer, in_f, in_f, bias=False, pointwise=True),
                  layer_like(layer, in_f, out_f, bias=False),
                  layer_like(layer, out_f, out_f, bias=has_bias, pointwise=True),
                  *_buffers(eigen, weights[0], weights[2], layer.weight, mean_grad))
        blk.training = layer.training
        blk._load(weights)
        if has_bias:
            with torch.no_grad():
                blk.rotate_out.bias.copy_(layer.bias)
        blk._remember_as_set((True, True))   # the bases are the eigenvectors Q_A, Q_S
        remember_output_terms(blk, eigen, weight_a, mean_grad_a)
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

    def _lookup_tensors(self) -> Tuple[torch.Tensor, ...]:
        return (self.rotate_in.weight, self.rotate_out.weight, self.basis_in, self.basis_out)

    def _cached_lookup(self) -> Optional[_Lookup]:
        """The cached :class:`_Lookup` if the rotations and bases are unchanged since, else None."""
        cached = _LOOKUPS.get(self)
        tensors = self._lookup_tensors()
        if cached is None or any(ref() is not t for ref, t in zip(cached.tensors, tensors)):
            return None
        return cached if cached.versions == tuple(t._version for t in tensors) else None

    def _remember(self, survivors: Survivors, exact: bool, orthonormal: Tuple[bool, bool]) -> _Lookup:
        tensors = self._lookup_tensors()
        lookup = _Lookup(tuple(weakref.ref(t) for t in tensors), tuple(t._version for t in tensors),
                         survivors, exact, orthonormal)
        _LOOKUPS[self] = lookup
        return lookup

    def _remember_as_set(self, orthonormal: Tuple[bool, bool]) -> None:
        """The rotations were just set from the buffers: every direction and outer channel is
        where the buffers say (``rotate_in = basis_inᵀ``, ``rotate_out = basis_out``)."""
        (n_in, r_in), (n_out, r_out) = self.basis_in.shape, self.basis_out.shape
        device = self.basis_in.device
        self._remember(Survivors(*(torch.arange(n, device=device) for n in (r_in, r_out, n_in, n_out))),
                       True, orthonormal)

    def _survivors_lookup(self) -> _Lookup:
        """:meth:`surviving` with how the survivors were found (see :class:`_Lookup`)."""
        cached = self._cached_lookup()
        if cached is not None:
            return cached
        stale = _LOOKUPS.get(self)
        same_bases = (stale is not None and stale.tensors[2]() is self.basis_in and stale.tensors[3]() is self.basis_out
                      and stale.versions[2:] == (self.basis_in._version, self.basis_out._version))
        channels_in, directions_in, exact_in = self._locate(self.rotation_in_matrix().detach().T, self.basis_in, "input")
        channels_out, directions_out, exact_out = self._locate(self.rotation_out_matrix().detach(), self.basis_out, "output")
        return self._remember(Survivors(directions_in, directions_out, channels_in, channels_out),
                              exact_in and exact_out, stale.orthonormal if same_bases else (False, False))

    def surviving(self) -> Survivors:
        """Which stored directions and outer channels the block still has, after any removals.

        Right after the block is built or re-rotated, every direction and outer channel is
        where the buffers say (identity indices, nothing to look up). After Torch-Pruning
        removed some, as long as the rotation weights are unchanged they are exact copies of
        basis entries, ``rotate_in[d, c] = basis_in[s_c, j_d]`` and ``rotate_out[c, d] =
        basis_out[s_c, j_d]``, and :func:`~tp_eigendamage._basis_matching.exact_indices`
        recovers ``s`` (outer channels) and ``j`` (directions) exactly. Otherwise (rotations
        fine-tuned) each direction is matched to the stored one with the largest ``|cos|``,
        which needs the outer channels intact; if they were pruned too, :class:`StaleBasisError`.
        The result is cached until a rotation weight or basis is replaced or changed in place.
        """
        return self._survivors_lookup().survivors

    def surviving_directions(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Indices into ``eigen_in`` / ``eigen_out`` (columns of the bases) of the directions left."""
        s = self.surviving()
        return s.directions_in, s.directions_out

    def surviving_outer(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Indices into the rows of ``basis_in`` / ``basis_out`` of the block's inputs / outputs left."""
        s = self.surviving()
        return s.channels_in, s.channels_out

    @staticmethod
    def _locate(current: torch.Tensor, basis: torch.Tensor, side: str) -> Tuple[torch.Tensor, torch.Tensor, bool]:
        """``(channels, directions, exact)`` of ``current`` ``(outer_now, r_now)`` in ``basis``
        ``(outer, r)``; ``exact``: ``current`` holds exact copies of basis entries."""
        if current.shape == basis.shape and torch.equal(current.to(basis.dtype), basis):
            return torch.arange(basis.shape[0], device=basis.device), torch.arange(basis.shape[1], device=basis.device), True
        found = exact_indices(current, basis)
        if found is not None:
            return (*found, True)
        if current.shape[0] != basis.shape[0]:
            raise StaleBasisError(
                f"the {side} rotation of this KFE block changed since it was built (e.g. it was "
                f"fine-tuned) and its {side} channels were pruned ({basis.shape[0]} → "
                f"{current.shape[0]}), so its stored eigenbasis cannot be matched any more; run "
                "collect_kfac on the current model and to_kfe(model, stats) again, which "
                "re-rotates the block and re-bases its buffers")
        cos = F.normalize(basis.double(), dim=0).T @ F.normalize(current.double(), dim=0)
        return torch.arange(basis.shape[0], device=basis.device), cos.abs().argmax(dim=0), False

    def keep_surviving_buffers(self) -> None:
        """Cut the buffers down to the surviving directions and outer channels, in the layers' order."""
        lookup = self._survivors_lookup()
        s = lookup.survivors
        all_in, all_out = (len(s.channels_in) == self.basis_in.shape[0], len(s.channels_out) == self.basis_out.shape[0])
        self.basis_in = self.basis_in[s.channels_in][:, s.directions_in]
        self.basis_out = self.basis_out[s.channels_out][:, s.directions_out]
        self.eigen_in, self.eigen_out = self.eigen_in[s.directions_in], self.eigen_out[s.directions_out]
        self.fisher_diag = self.fisher_diag[s.directions_out][:, s.directions_in]
        if self.mean_grad is not None:
            self.mean_grad = self.mean_grad[s.directions_out][:, s.directions_in]
        if self.removal_fisher_in is not None:
            self.removal_fisher_in = self.removal_fisher_in[s.directions_in]
            self.removal_fisher_out = self.removal_fisher_out[s.directions_out]
        if lookup.exact:   # a subset of orthonormal columns over all their rows stays orthonormal
            self._remember_as_set((lookup.orthonormal[0] and all_in, lookup.orthonormal[1] and all_out))

    def outer_kron_operands(self, side: str) -> Tuple[torch.Tensor, ...]:
        """``(w, A, S, Ḡ)`` for Kron-OBD of the block's outer ``"input"`` or ``"output"`` channels
        (:func:`~tp_eigendamage.damage.kron_in_damage` / ``kron_out_damage``), the block taken
        as one layer in coordinates where the factor that is not read off its diagonal is
        diagonal (docs/method.md §8). Float64, with a leading group dimension of 1.

        As one layer the block has weight ``w_k = R_out W*_k R_in`` and factors ``A = B Λ_A Bᵀ``,
        ``S = D Λ_S Dᵀ`` with ``B``/``D`` the rows of ``basis_in``/``basis_out`` of the outer
        channels still present. Output channel c needs ``S_cc`` and ``w_k A w_kᵀ = V_k Λ_A V_kᵀ``
        with ``V_k = w_k B = R_out W*_k (R_in B)``; input channel j needs ``A_jj`` and
        ``w_kᵀ S w_k = U_kᵀ Λ_S U_k`` with ``U_k = Dᵀ w_k = (Dᵀ R_out) W*_k R_in``. Neither ``w``
        nor ``A``/``S`` is formed. While the rotations hold exact copies of bases with
        orthonormal columns over all their rows (as built from a layer, until an outer channel
        is removed or a rotation changed), ``R_in B`` and ``Dᵀ R_out`` are rows / columns of the
        identity: ``V = R_out W*`` with ``Λ_A`` of the surviving directions (likewise ``U``).
        The mean gradient ``Ḡ_k = D Ḡ*_k Bᵀ`` of the block as one layer enters the first-order
        term through ``Σ_j w_cjk Ḡ_cjk = (V_k (D Ḡ*_k)ᵀ)_cc`` and ``Σ_o w_ojk Ḡ_ojk =
        (U_kᵀ (Ḡ*_k Bᵀ))_jj``: ``D Ḡ*`` pairs with ``V``, ``Ḡ* Bᵀ`` with ``U`` (``None`` without
        ``mean_grad``). Returns ``(V, Λ_A, diag S, D Ḡ*)`` for ``"output"``, ``(U, diag A, Λ_S,
        Ḡ* Bᵀ)`` for ``"input"``.
        """
        lookup = self._survivors_lookup()
        s = lookup.survivors
        core = weight_3d(self.core)
        lam_a, lam_s = self.eigen_in.double(), self.eigen_out.double()
        grad = None if self.mean_grad is None else self.mean_grad.double()
        B, D = _rows(self.basis_in, s.channels_in), _rows(self.basis_out, s.channels_out)
        if side == "output":
            V = torch.einsum("or,rsk->osk", rotation_matrix(self.rotate_out), core)
            if lookup.exact and lookup.orthonormal[0] and len(s.channels_in) == self.basis_in.shape[0]:
                lam_a = lam_a[s.directions_in]
                grad = None if grad is None else grad[:, s.directions_in]
            else:
                V = torch.einsum("osk,st->otk", V, rotation_matrix(self.rotate_in) @ B)
            grad = None if grad is None else torch.einsum("or,rsk->osk", D, grad)[None]
            return V[None], lam_a[None], (D.square() @ lam_s)[None], grad
        U = torch.einsum("rsk,si->rik", core, rotation_matrix(self.rotate_in))
        if lookup.exact and lookup.orthonormal[1] and len(s.channels_out) == self.basis_out.shape[0]:
            lam_s = lam_s[s.directions_out]
            grad = None if grad is None else grad[s.directions_out]
        else:
            U = torch.einsum("or,rik->oik", D.T @ rotation_matrix(self.rotate_out), U)
        grad = None if grad is None else torch.einsum("rsk,js->rjk", grad, B)[None]
        return U[None], (B.square() @ lam_a)[None], lam_s[None], grad

    def rerotation(self, eigen):
        """New ``(rotate_in, core, rotate_out)`` weights from the core's ``(λ_A, Q_A, λ_S, Q_S)``.

        ``Q_A,new`` / ``Q_S,new`` diagonalize the core's own factors; they are merged into the
        rotation layers (``R_in ← Q_A,newᵀ R_in``, ``R_out ← R_out Q_S,new``) and the core
        becomes ``Q_S,newᵀ W* Q_A,new``: same function, still three stages (docs/method.md §7).
        """
        return _rotated(eigen, _in_kfe(eigen, weight_3d(self.core))[0], rotation_matrix(self.rotate_in),
                        rotation_matrix(self.rotate_out))

    def _load(self, weights) -> None:
        for layer, value in zip((self.rotate_in, self.core, self.rotate_out), weights):
            load_weight(layer, value)

    def _set_rotation(self, factors, *weights) -> None:
        """Load rotated ``(R_in, W*, R_out)`` and re-base every buffer on the current directions
        (``factors``: the core's :class:`~tp_eigendamage.KFACFactors`).

        The new bases ``R_inᵀ Q_A,new`` / ``R_out Q_S,new`` have orthonormal columns where the
        old ones had and the rotation lost no outer channel and was not changed otherwise."""
        before = self._cached_lookup()
        orthonormal = (False, False) if before is None else (
            before.exact and before.orthonormal[0] and len(before.survivors.channels_in) == self.basis_in.shape[0],
            before.exact and before.orthonormal[1] and len(before.survivors.channels_out) == self.basis_out.shape[0])
        self._load(weights)
        (self.eigen_in, self.eigen_out, self.basis_in, self.basis_out, self.fisher_diag,
         self.mean_grad) = _buffers(factors.eigen(), weights[0], weights[2], self.core.weight,
                                    _mean_grad_in_kfe(factors.eigen(), factors)[0])
        self.removal_fisher_in = self.removal_fisher_out = None
        self.eigen_corrected = False
        self._remember_as_set(orthonormal)

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
        R_in, R_out = rotation_matrix(self.rotate_in), rotation_matrix(self.rotate_out)
        dense = layer_like(self.core, R_in.shape[1], R_out.shape[0], bias=self.rotate_out.bias is not None)
        load_weight(dense, torch.einsum("or,rsk,si->oik", R_out, weight_3d(self.core), R_in))
        if dense.bias is not None:
            with torch.no_grad():
                dense.bias.copy_(self.rotate_out.bias)
        return dense
