"""Training, fine-tuning and evaluation of classifiers (the CLI's train / fine-tune stages).

Optimizer as in the paper's fine-tuning: SGD with momentum 0.9 and weight decay 1e-4. The
learning rate follows, per optimization step ``t`` of ``T``, either

* ``schedule="cosine"`` (default): ``η_t = η · ½ (1 + cos(π t / T))``, or
* ``schedule="constant"``: ``η_t = η``.

Batches are ``(inputs, targets)`` pairs. ``train(..., seed=s)`` is deterministic: it seeds
torch's global RNG and the loader's shuffling generator (a ``DataLoader`` made with
``generator=``, as :func:`tp_eigendamage.data.make_loaders` does), so the batch order does not
depend on how often the loader was iterated before. Every function leaves each submodule in
the train/eval mode it had on entry.
"""
from __future__ import annotations

import contextlib
import copy
import itertools
import math
from typing import Callable, Dict, Iterable, Iterator, List, Literal, Optional, get_args

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ._model_state import model_device, restored_modes
from ._options import check_choice
from .errors import InvalidArgumentError, TrainingDivergedError

__all__ = ["train", "evaluate", "finetune_callback", "SCHEDULES"]

Schedule = Literal["cosine", "constant"]
SCHEDULES = get_args(Schedule)


@contextlib.contextmanager
def _restored_on_error(model: nn.Module, state: dict) -> Iterator[None]:
    """Load ``state`` back into ``model`` if the body raises."""
    try:
        yield
    except BaseException:
        model.load_state_dict(state)
        raise


def _steps_per_epoch(loader: Iterable, max_batches: Optional[int]) -> int:
    if max_batches is not None and max_batches < 1:
        raise InvalidArgumentError(f"max_batches={max_batches} must be >= 1 (or None for the whole loader)")
    if not hasattr(loader, "__len__"):
        if max_batches is None:
            raise InvalidArgumentError("the loader has no len(); pass max_batches= to fix the epoch length")
        return max_batches
    steps = len(loader) if max_batches is None else min(len(loader), max_batches)
    if steps == 0:
        raise InvalidArgumentError("the loader is empty; give a dataset with at least one batch")
    return steps


def _seed_everything(loader: Iterable, seed: int) -> None:
    torch.manual_seed(seed)
    generator = getattr(loader, "generator", None)
    if generator is not None:
        generator.manual_seed(seed)


def _lr_factor(schedule: str, total_steps: int) -> Callable[[int], float]:
    """``η_t / η`` for step ``t`` (see the module docstring)."""
    if schedule == "cosine":
        return lambda t: 0.5 * (1.0 + math.cos(math.pi * t / total_steps))
    return lambda t: 1.0


def train(model: nn.Module, loader: Iterable, *, epochs: int = 1, lr: float = 0.05,
          weight_decay: float = 1e-4, momentum: float = 0.9, schedule: Schedule = "cosine",
          device=None, progress: bool = True, max_batches: Optional[int] = None,
          seed: Optional[int] = None, loss_fn: Callable = F.cross_entropy) -> List[float]:
    """Train ``model`` in place with SGD; returns the mean training loss of each epoch.

    ``loss_fn(logits, targets)`` returns the batch-mean loss. ``max_batches`` caps the batches
    per epoch; ``device`` defaults to the model's device (the model is moved there). ``seed``
    makes the run reproducible (module docstring). ``epochs=0`` does nothing (one-shot pruning
    budgets). If training fails (e.g. the loss diverges), parameters and buffers are restored
    to their values on entry before the error propagates.
    """
    if epochs < 0:
        raise InvalidArgumentError(f"epochs={epochs} must be >= 0")
    if lr <= 0:
        raise InvalidArgumentError(f"lr={lr} must be > 0")
    check_choice(schedule, "schedule", SCHEDULES)
    steps = _steps_per_epoch(loader, max_batches)
    if epochs == 0:
        return []
    if seed is not None:
        _seed_everything(loader, seed)
    device = model_device(model, device)
    model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(schedule, epochs * steps))
    history, initial = [], copy.deepcopy(model.state_dict())
    with _restored_on_error(model, initial), restored_modes(model), tqdm(total=epochs * steps, desc="train", disable=not progress,
                                      leave=False) as bar:
        model.train()
        for epoch in range(epochs):
            total, count = 0.0, 0
            for inputs, targets in itertools.islice(loader, steps):
                inputs, targets = inputs.to(device), targets.to(device)
                loss = loss_fn(model(inputs), targets)
                if not torch.isfinite(loss):
                    raise TrainingDivergedError(f"training loss became {loss.item()} in epoch {epoch + 1}; "
                                             f"lower the learning rate (lr={lr})")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                total += loss.item() * len(targets)
                count += len(targets)
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
            history.append(total / count)
    return history


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device=None, *, max_batches: Optional[int] = None,
             loss_fn: Callable = F.cross_entropy) -> Dict[str, float]:
    """Top-1 accuracy and mean per-example loss over ``loader``, in eval mode.

    Returns ``{"accuracy": correct / N, "loss": Σ_n ℓ_n / N, "examples": N}``; ``loss_fn``
    must accept ``reduction="sum"`` (as ``F.cross_entropy`` does).
    """
    steps = _steps_per_epoch(loader, max_batches)
    device = model_device(model, device)
    model.to(device)
    correct, loss_sum, count = 0, 0.0, 0
    with restored_modes(model):
        model.eval()
        for inputs, targets in itertools.islice(loader, steps):
            inputs, targets = inputs.to(device), targets.to(device)
            logits = model(inputs)
            loss_sum += loss_fn(logits, targets, reduction="sum").item()
            correct += (logits.argmax(dim=1) == targets).sum().item()
            count += len(targets)
    return {"accuracy": correct / count, "loss": loss_sum / count, "examples": count}


def finetune_callback(loader: Iterable, *, epochs: int = 1, lr: float = 0.01, seed: Optional[int] = None,
                      **train_kwargs) -> Callable[[nn.Module, int], List[float]]:
    """A ``finetune(model, round_index)`` callback for :func:`tp_eigendamage.prune`.

    Each call runs :func:`train` with these settings; with ``seed`` given, round ``r`` trains
    with ``seed + r`` so every round is reproducible.
    """
    if epochs < 0:
        raise InvalidArgumentError(f"epochs={epochs} must be >= 0")

    def finetune(model: nn.Module, round_index: int) -> List[float]:
        round_seed = None if seed is None else seed + round_index
        return train(model, loader, epochs=epochs, lr=lr, seed=round_seed, **train_kwargs)

    return finetune
