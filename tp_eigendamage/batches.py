"""How batches are split into inputs and targets, moved to a device and fed to a model.

Every pass over data in the package (statistics, fine-tuning hooks, tracing) goes through
these defaults; users adapt other batch layouts with ``batch_fn`` / ``forward_fn``.
"""
from __future__ import annotations

from typing import Any, Mapping, Tuple, Union

import torch
import torch.nn as nn

from .errors import KFACError

__all__ = ["Inputs", "TARGET_KEYS", "default_batch_fn", "default_forward_fn", "to_device", "batch_size"]

#: What a model is called with: a tensor, a tuple of positional inputs, or a dict of keyword inputs.
Inputs = Union[torch.Tensor, Tuple[Any, ...], Mapping[str, Any]]

#: Keys a dict batch may hold its targets under, in order of preference.
TARGET_KEYS = ("targets", "target", "labels", "label", "y")


def default_batch_fn(batch: Any) -> Tuple[Any, Any]:
    """Split a batch into ``(inputs, targets)``.

    * a tensor → ``(batch, None)``;
    * a tuple/list → ``(batch[0], batch[1])`` (targets ``None`` if there is one element);
    * a dict → targets from the first of ``targets/target/labels/label/y`` present, inputs =
      the remaining entries, passed to the model as keyword arguments.
    """
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)):
        if len(batch) == 0:
            raise KFACError("got an empty batch; each batch must hold inputs (and targets)")
        return batch[0], (batch[1] if len(batch) > 1 else None)
    if isinstance(batch, Mapping):
        key = next((k for k in TARGET_KEYS if k in batch), None)
        inputs = {k: v for k, v in batch.items() if k != key}
        return inputs, (batch[key] if key is not None else None)
    raise KFACError(f"cannot split a batch of type {type(batch).__name__} into inputs and "
                    "targets; pass batch_fn=lambda batch: (inputs, targets)")


def default_forward_fn(model: nn.Module, inputs: Inputs) -> Any:
    """``model(**inputs)`` for dicts, ``model(*inputs)`` for tuples, else ``model(inputs)``."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def to_device(obj: Any, device) -> Any:
    """``obj`` with every tensor (in tuples, lists, dicts) moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def batch_size(outputs: Any, default: int) -> int:
    """Leading size of the (first) output tensor: the number of examples in the batch."""
    if isinstance(outputs, torch.Tensor) and outputs.dim() > 0:
        return outputs.shape[0]
    return default
