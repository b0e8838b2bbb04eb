"""Small reference models on the embedded digits, for tests, benchmarks and experiments.

:func:`trained_digits_net` gives a small residual CNN (:class:`DigitsNet`) trained briefly on
scikit-learn's 8×8 handwritten digits — a real, trained network with coupled (residual)
channels that takes seconds to make on a CPU — and :func:`mean_loss` its loss, to compare
predicted damages with measured loss changes.
"""
from __future__ import annotations

import functools
from typing import Dict, List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._model_state import restored_modes

__all__ = ["DigitsNet", "digits_batches", "trained_digits_net", "mean_loss"]

Batches = List[Tuple[torch.Tensor, torch.Tensor]]


class DigitsNet(nn.Module):
    """Stem, one residual block, a strided conv and a Linear head; 1×8×8 inputs, 10 classes."""

    def __init__(self, width=16):
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(width)
        self.c1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.c2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.c3 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(2 * width)
        self.fc = nn.Linear(2 * width, 10)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        x = F.relu(x + self.bn2(self.c2(F.relu(self.bn1(self.c1(x))))))
        x = F.relu(self.bn3(self.c3(x)))
        return self.fc(x.mean((2, 3)))


def digits_batches(batch_size: int = 128, n: int = 256) -> Batches:
    """The first ``n`` digits as ``(x, y)`` batches, ``x`` standardized, shape ``(B, 1, 8, 8)``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images[:n], dtype=torch.float32)[:, None] / 16.0
    x = (x - x.mean()) / x.std()
    y = torch.tensor(digits.target[:n])
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, n, batch_size)]


@functools.lru_cache(maxsize=None)
def _trained_state(steps: int, seed: int, n: int, weight_decay: float) -> Dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = DigitsNet()
    batches = digits_batches(n=n)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=weight_decay)
    model.train()
    for step in range(steps):
        x, y = batches[step % len(batches)]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return {k: v.clone() for k, v in model.state_dict().items()}


def trained_digits_net(steps: int = 30, seed: int = 0, n: int = 256,
                       weight_decay: float = 0.0) -> Tuple[DigitsNet, Batches]:
    """A DigitsNet after ``steps`` Adam steps (L2 ``weight_decay`` added to the gradient) on the
    first ``n`` digits (trained once per session), a fresh copy each call, and those digits'
    batches; the global RNG is re-seeded so what follows is reproducible."""
    model = DigitsNet()
    model.load_state_dict(_trained_state(steps, seed, n, weight_decay))
    torch.manual_seed(seed)
    return model.eval(), digits_batches(n=n)


@torch.no_grad()
def mean_loss(model: nn.Module, batches: Batches) -> float:
    """Mean cross entropy of ``model`` in eval mode over ``batches`` (modes restored after)."""
    with restored_modes(model):
        model.eval()
        total = sum(F.cross_entropy(model(x), y, reduction="sum").item() for x, y in batches)
    return total / sum(len(y) for _, y in batches)
