"""Measured latency: seconds per forward pass, timed side by side.

Latency is what a deployed model costs, and unlike parameters or FLOPs it can only be
measured. :func:`measure_latency` times several modules on the same inputs so that their
ratios are meaningful on a shared, noisy machine:

* every module runs in eval mode (modes restored afterwards) under ``torch.inference_mode()``:
  no autograd bookkeeping, BatchNorm statistics do not move;
* warm-up: ``warmup`` untimed passes each (allocator, caches, lazy initialisation; CUDA
  kernels selected); the last warm-up pass also sizes a sample: a sample times ``passes``
  consecutive forward passes, enough to last at least ``min_sample_s`` (the timer's resolution
  and Python overhead stay small next to a very fast module);
* ``repeats`` rounds, each timing one sample of every module, the order rotated every round,
  so that a drift of the machine's load hits all modules alike;
* the result per module is the MEDIAN of its samples (a sample hit by another process is an
  outlier, not an average shift); on CUDA, ``torch.cuda.synchronize`` brackets every sample.

The clock (``clock="auto"``): on the CPU with one intra-op thread (``torch.get_num_threads()
== 1``) the process's CPU time (``time.process_time``): the forward pass runs on the calling
thread, so its CPU time is its latency on an idle machine, without the time the process waits
for a core on a busy one. Otherwise (CUDA, several threads) the wall clock
(``time.perf_counter``), which such a wait does include. ``clock="wall"`` / ``"cpu"`` force one.
On a shared two-core machine running four other processes, the ratio of two ResNet-18s
measured this way varied with a standard deviation of 1.3 % (CPU time) against 3.4 % (wall
clock) between repeated calls.
"""
from __future__ import annotations

import math
import statistics
import time
from contextlib import ExitStack
from typing import Any, Callable, List, Sequence

import torch
import torch.nn as nn

from ._model_state import restored_modes
from .batches import Inputs, default_forward_fn
from .errors import InvalidArgumentError

__all__ = ["measure_latency", "latency_clock", "LATENCY_DEFAULTS", "CLOCKS"]

#: ``measure_latency``'s defaults, shared by :func:`tp_eigendamage.prune`.
LATENCY_DEFAULTS = dict(warmup=2, repeats=7, min_sample_s=0.005)
#: The clocks :func:`measure_latency` can time with.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def _devices(obj: Any) -> set:
    if isinstance(obj, torch.Tensor):
        return {obj.device}
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (tuple, list)):
        return set().union(*(_devices(v) for v in obj)) if obj else set()
    return set()


def _module_devices(modules: Sequence[nn.Module]) -> set:
    return {t.device for m in modules for t in (next(m.parameters(), None), next(m.buffers(), None))
            if t is not None}


def _synchronizer(inputs: Inputs, modules: Sequence[nn.Module]) -> Callable[[], None]:
    """Waits for every CUDA device the inputs or modules live on; nothing on CPU."""
    cuda = [d for d in _devices(inputs) | _module_devices(modules) if d.type == "cuda"]

    def synchronize() -> None:
        for d in cuda:
            torch.cuda.synchronize(d)
    return synchronize


def latency_clock(inputs: Inputs, modules: Sequence[nn.Module] = (), clock: str = "auto") -> str:
    """The clock ``measure_latency(modules, inputs, clock=clock)`` uses: ``"wall"`` or ``"cpu"``
    (module docstring)."""
    if clock != "auto":
        if clock not in CLOCKS:
            raise InvalidArgumentError(f"clock={clock!r}: choose 'auto', 'wall' or 'cpu'")
        return clock
    on_cpu = all(d.type == "cpu" for d in _devices(inputs) | _module_devices(modules))
    return "cpu" if on_cpu and torch.get_num_threads() == 1 else "wall"


def measure_latency(modules: Sequence[nn.Module], inputs: Inputs, *,
                    forward_fn: Callable[[nn.Module, Inputs], Any] = default_forward_fn,
                    warmup: int = LATENCY_DEFAULTS["warmup"], repeats: int = LATENCY_DEFAULTS["repeats"],
                    min_sample_s: float = LATENCY_DEFAULTS["min_sample_s"], clock: str = "auto") -> List[float]:
    """Median seconds per ``forward_fn(module, inputs)`` of each module, timed interleaved.

    Args:
        modules: the modules to time (on the inputs' device).
        inputs: what each module is called with (a tensor, tuple or dict, as in ``prune``).
        forward_fn: how a module is called.
        warmup: untimed passes per module before timing (at least 1).
        repeats: timed samples per module; the median is returned.
        min_sample_s: a sample repeats the forward pass until it lasts about this long.
        clock: ``"auto"``, ``"wall"`` or ``"cpu"`` (module docstring; :func:`latency_clock`).

    Returns:
        Seconds per forward pass, one per module, in order (module docstring).
    """
    synchronize = _synchronizer(inputs, modules)
    now = CLOCKS[latency_clock(inputs, modules, clock)]
    with ExitStack() as stack, torch.inference_mode():
        for m in modules:
            stack.enter_context(restored_modes(m))
            m.eval()
        passes = []
        for m in modules:
            for _ in range(max(warmup, 1)):
                synchronize()
                start = now()
                forward_fn(m, inputs)
                synchronize()
                single = now() - start
            passes.append(max(1, math.ceil(min_sample_s / max(single, 1e-9))))
        samples: List[List[float]] = [[] for _ in modules]
        for rep in range(repeats):
            for k in range(len(modules)):
                i = (k + rep) % len(modules)
                synchronize()
                start = now()
                for _ in range(passes[i]):
                    forward_fn(modules[i], inputs)
                synchronize()
                samples[i].append((now() - start) / passes[i])
    return [statistics.median(s) for s in samples]
