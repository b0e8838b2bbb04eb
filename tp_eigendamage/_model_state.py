"""What of a model's state the package must leave as it found it: device, modes, flags."""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
import torch.nn as nn

__all__ = ["model_device", "restored_modes", "preserved_model_state"]


def model_device(model: nn.Module, device: Optional[torch.device] = None) -> torch.device:
    """``device`` if given, else the device of the model's first parameter or buffer (CPU for
    a model without tensors)."""
    if device is not None:
        return torch.device(device)
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


@contextlib.contextmanager
def restored_modes(model: nn.Module) -> Iterator[None]:
    """Restore every submodule's ``training`` flag on exit (also after an exception)."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


@contextlib.contextmanager
def preserved_model_state(model: nn.Module) -> Iterator[None]:
    """Eval mode and trainable parameters inside; every mode flag and ``requires_grad`` back after.

    Parameters' ``.grad`` are never touched (gradients are taken with ``torch.autograd.grad``)
    and BatchNorm statistics do not move in eval mode.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    with restored_modes(model):
        try:
            model.eval()
            for p, _ in flags:
                p.requires_grad_(True)
            yield
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)
