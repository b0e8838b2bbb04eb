"""Which loss the Fisher is taken of: label sampling rules and per-example losses.

K-FAC needs ``g = ∂ℓ_n/∂s`` for the loss ``ℓ_n`` of each example. The *true* Fisher draws the
label from the model's own predictive distribution, ``y ~ p(y | x)``; the *empirical* Fisher
uses the dataset label. Both plug into one contract:

* ``sample_fn(outputs) -> targets`` draws labels for ``fisher_type="true"``;
* ``loss_fn(outputs, targets) -> (N,)`` returns ONE loss per example (``reduction="none"``),
  so that the factors are scaled per example whatever the batch size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import FisherInputError

__all__ = ["sample_categorical", "sample_gaussian", "cross_entropy", "gaussian_nll", "check_logits"]

LOGITS_HINT = (
    "fisher_type='true' with the default sampler expects classification logits of shape (N, C) "
    "with C >= 2. For other outputs pass sample_fn= (e.g. tp_eigendamage.sample_gaussian) and "
    "loss_fn= (e.g. tp_eigendamage.gaussian_nll), or use fisher_type='empirical' with your "
    "own loss_fn."
)


def check_logits(outputs) -> None:
    if not (isinstance(outputs, torch.Tensor) and outputs.is_floating_point()
            and outputs.dim() == 2 and outputs.shape[1] >= 2):
        got = (f"tensor of shape {tuple(outputs.shape)} and dtype {outputs.dtype}"
               if isinstance(outputs, torch.Tensor) else type(outputs).__name__)
        raise FisherInputError(f"model output is a {got}. {LOGITS_HINT}")


def sample_categorical(logits: torch.Tensor) -> torch.Tensor:
    """``y ~ softmax(logits)``, one label per row (the classification true Fisher)."""
    check_logits(logits)
    probs = torch.softmax(logits.detach().float(), dim=-1)
    return torch.multinomial(probs, 1).squeeze(-1)


def sample_gaussian(outputs: torch.Tensor) -> torch.Tensor:
    """``y ~ N(outputs, I)``: the true Fisher of a unit-variance Gaussian likelihood."""
    mean = outputs.detach()
    return mean + torch.randn_like(mean)


def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-example cross entropy, ``ℓ_n = -log p(y_n | x_n)``."""
    return F.cross_entropy(outputs, targets, reduction="none")


def gaussian_nll(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-example ``½‖y - f(x)‖²`` summed over output dimensions (unit-variance Gaussian)."""
    return 0.5 * (outputs - targets).pow(2).flatten(1).sum(1)
