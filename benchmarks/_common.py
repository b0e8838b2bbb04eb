"""Helpers shared by the benchmark scripts (imported as ``_common`` from ``benchmarks/``).

* workloads: :func:`create_model` (random-init timm model at a chosen input size),
  :func:`random_batches`, :func:`example_input`;
* measuring: :func:`synchronize`, :class:`PeakMemory`, :func:`run_child` (one measurement in a
  fresh process, with glibc returning freed memory so that resident memory follows live tensors);
* trained models: :func:`digits_data` (the scikit-learn digits, statistics subset and held-out
  split), :func:`digits_model` (a timm model trained on them once, cached under
  ``benchmarks/.cache/``);
* printing: :func:`markdown_table`, :func:`checked` (a number against a target bound),
  :func:`error_text`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import List, NamedTuple, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn

NUM_CLASSES = 10
CACHE = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".cache")


def create_model(name: str, size: int, device="cpu", seed: int = 0, **options) -> nn.Module:
    """Random-init timm model (``NUM_CLASSES`` classes) in eval mode on ``device``.

    Models whose pretrained config has a fixed input size (ViT, DeiT, Swin, ...) are built for
    ``size`` (``img_size=size``); the others take any input size as they are. ``options`` go
    to the model's constructor (e.g. ``zero_init_last=False`` for a timm ResNet).
    """
    torch.manual_seed(seed)
    fixed = timm.models.get_pretrained_cfg(name).fixed_input_size
    kwargs = dict(img_size=size, **options) if fixed else dict(options)
    return timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **kwargs).to(device).eval()


def random_batches(count: int, batch: int, size: int, device="cpu",
                   seed: int = 0) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """``count`` batches of ``batch`` random ``3×size×size`` images with random labels."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, size, size, generator=g).to(device),
             torch.randint(0, NUM_CLASSES, (batch,), generator=g).to(device)) for _ in range(count)]


class DigitsData(NamedTuple):
    """The digits at one image size: datasets, a fixed statistics subset and the held-out split."""

    train_set: object
    test_set: object
    stat: Tuple[torch.Tensor, torch.Tensor]       # ``stat_examples`` training images, labels
    held_out: Tuple[torch.Tensor, torch.Tensor]   # the whole test split
    batches: List[Tuple[torch.Tensor, torch.Tensor]]   # ``stat`` in batches of ``batch_size``


def digits_data(stat_examples: int, size: int = 32, batch_size: int = 64) -> DigitsData:
    """scikit-learn's digits at ``size``×``size`` (3 channels; :func:`tp_eigendamage.data.digits_datasets`)
    with a fixed random subset of ``stat_examples`` training images for the statistics."""
    from tp_eigendamage.data import digits_datasets

    train_set, test_set = digits_datasets(size, 3, seed=0)
    stack = lambda ds: (torch.stack([ds[i][0] for i in range(len(ds))]),  # noqa: E731
                        torch.tensor([int(ds[i][1]) for i in range(len(ds))]))
    (x, y), held_out = stack(train_set), stack(test_set)
    pick = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[:stat_examples]
    stat = (x[pick], y[pick])
    batches = [(stat[0][i:i + batch_size], stat[1][i:i + batch_size]) for i in range(0, len(pick), batch_size)]
    return DigitsData(train_set, test_set, stat, held_out, batches)


def digits_model(key: str, arch: str, data: DigitsData, *, epochs: int, lr: float,
                 weight_decay: float, size: int = 32, **options) -> nn.Module:
    """timm ``arch`` (``options`` to its constructor) trained on ``data`` (SGD with momentum,
    cosine schedule, batches of 64, seed 0; :func:`tp_eigendamage.training.train`), in eval
    mode. Trained once: the weights are cached under ``benchmarks/.cache/`` by ``key``, the
    recipe and (other than 32) the image size."""
    from tp_eigendamage.data import make_loaders
    from tp_eigendamage.training import evaluate, train

    suffix = "" if size == 32 else f"-{size}px"
    path = os.path.join(CACHE, f"{key}-e{epochs}-lr{lr}-wd{weight_decay}{suffix}.pt")
    model = create_model(arch, size, **options)
    if os.path.exists(path):
        model.load_state_dict(torch.load(path))
        return model.eval()
    train_loader, test_loader = make_loaders(data.train_set, data.test_set, batch_size=64, seed=0)
    start = time.time()
    train(model, train_loader, epochs=epochs, lr=lr, weight_decay=weight_decay, seed=0, progress=False)
    result = evaluate(model, test_loader)
    print(f"  trained {key} in {time.time() - start:.0f} s: test accuracy {result['accuracy']:.3f}", flush=True)
    os.makedirs(CACHE, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval()


def example_input(size: int, device="cpu", batch: int = 1) -> torch.Tensor:
    """The input Torch-Pruning traces and counts FLOPs on."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, 3, size, size, generator=g).to(device)


def synchronize(device) -> None:
    """Wait for queued CUDA work (timing); nothing on the CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakMemory:
    """``with PeakMemory(device) as peak: work()`` → ``peak.mib``: memory ``work`` needed on top
    of what was allocated when it started.

    CUDA: ``torch.cuda.max_memory_allocated`` minus ``memory_allocated`` at the start (peak
    statistics reset on entry). CPU: the resident high-water mark ``VmHWM`` minus ``VmRSS`` at
    the start; the high-water mark is reset on entry through ``/proc/self/clear_refs`` (where
    the kernel refuses, it counts from the process start: use a fresh process). torch's CPU
    allocations are invisible to ``tracemalloc``, hence resident memory; run under
    ``MALLOC_MMAP_THRESHOLD_=65536`` (as :func:`run_child` does) so that freed tensors leave
    the resident set.
    """

    def __init__(self, device):
        self.device = torch.device(device)
        self.mib = float("nan")

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            try:
                with open("/proc/self/clear_refs", "w") as fh:
                    fh.write("5")
            except OSError:
                pass
            self._base = _status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = _status_kib("VmHWM") * 1024
        self.mib = (peak - self._base) / 2 ** 20


def run_child(script: str, argv: List[str], *, return_freed_memory: bool = True) -> dict:
    """Run ``python script *argv`` in a fresh process; its last stdout line, parsed as JSON.

    ``return_freed_memory`` sets ``MALLOC_MMAP_THRESHOLD_=65536``: glibc serves every tensor
    buffer from ``mmap`` and unmaps it on free, so the resident set follows live tensors
    (:class:`PeakMemory`). It makes allocations slower: leave it off for timing.
    """
    env = dict(os.environ)
    if return_freed_memory:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    done = subprocess.run([sys.executable, script, *argv], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{os.path.basename(script)} {' '.join(argv)} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def markdown_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c).replace("|", "/") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def checked(value: float, bound: Optional[float] = None, digits: int = 2) -> str:
    """``value`` with ✓/✗ for ``value ≤ bound`` if a bound is given; n/a if ``value`` is nan
    (not measured in this run)."""
    if value != value:
        return "n/a"
    return f"{value:.{digits}f}" + ("" if bound is None else f" {'✓' if value <= bound else '✗'}")


def error_text(exc: Exception) -> str:
    """A failure as one table cell: the error type and the first line of its message."""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
