"""Measured latency of pruned models: EigenDamage vs Kron-OBD vs Torch-Pruning's criteria.

For every model (timm, random init, 10 classes; fixed-size models built with
``img_size=--size``; timm ResNets zero-initialise the last BatchNorm of each block, which does
not matter for latency) and every target in ``--targets`` (share of the unpruned FLOPs to keep,
``--target-kind params`` for parameters), ``tp_eigendamage.prune`` prunes a copy of the same
model with the same statistics batches and each method:

* ``eigendamage``, ``kron_obd`` — the package's second-order methods;
* ``magnitude``, ``taylor`` — Torch-Pruning's ``GroupMagnitudeImportance(p=2)`` and
  ``GroupTaylorImportance`` (gradients of the mean cross entropy over the statistics batches),
  as ``prune(method="magnitude")`` / ``prune(method="taylor")``.

Latency: eval mode, ``torch.inference_mode()``, batch 1 and batch ``--batch``. Every model of
one architecture (the unpruned one and all pruned copies) runs ``--warmup`` forward passes;
then ``--repeats`` rounds time ``--passes`` consecutive forward passes of each model, the
order of the models rotated every round so that drifts in machine load hit all alike; the
median per-pass time is divided by the unpruned model's.

Run (CPU defaults: 96 px, one thread):
    python benchmarks/latency.py
    python benchmarks/latency.py --models resnet18 --targets 0.5
    python benchmarks/latency.py --size 224 --batch 64 --device cuda

Prints a markdown table (per model, target and method: params and FLOPs kept, latency at
batch 1 and at ``--batch`` relative to the unpruned model, number of modules, status — the
error if the model could not be pruned), then the latency targets per model and target:
eigendamage latency / kron_obd latency ≤ 1.05 at both batch sizes, and eigendamage's latency
ratio minus its FLOPs ratio ≤ 0.10 (a target at FLOPs 0.5 on resnet18 / resnet50).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn as nn

import tp_eigendamage as ted
from _common import (checked, create_model, error_text, example_input, markdown_table, random_batches,
                     synchronize)

MODELS = ["resnet18", "resnet50", "convnext_atto", "mobilenetv3_small_100", "vit_tiny_patch16_224"]
METHODS = ["eigendamage", "kron_obd", "magnitude", "taylor"]
#: where the target "latency ratio ≤ FLOPs ratio + 0.10" for eigendamage applies
FLOPS_GAP_TARGET = dict(models=("resnet18", "resnet50"), target=0.5, bound=0.10)
SAME_COST_BOUND = 1.05


@dataclass
class Variant:
    """One model of an architecture: unpruned (``method=None``) or pruned."""

    method: Optional[str]
    target: Optional[float]
    model: Optional[nn.Module]
    params: float = float("nan")
    flops: float = float("nan")
    error: str = ""
    latency: tuple = ()   # seconds per forward at batch 1 and at --batch

    @property
    def modules(self) -> int:
        return len(list(self.model.modules()))


def pruned_variants(args, name: str) -> List[Variant]:
    """The unpruned model, then one variant per target and method (``model=None`` on error)."""
    base = create_model(name, args.size, args.device)
    batches = random_batches(args.stat_batches, args.stat_batch_size, args.size, args.device)
    example = example_input(args.size, args.device)
    variants = [Variant(None, None, base, 1.0, 1.0)]
    for target in args.targets:
        for method in METHODS:
            start = time.perf_counter()
            try:
                model, report = ted.prune(copy.deepcopy(base), batches, example, method=method,
                                          progress=False, **{f"target_{args.target_kind}": target})
                variants.append(Variant(method, target, model, report.params_fraction, report.flops_fraction))
                status = "ok"
            except Exception as exc:   # the table records failures
                status = error_text(exc)
                variants.append(Variant(method, target, None, error=status))
            print(f"{name:<24}{method:<13}{target:<6}{time.perf_counter() - start:7.1f} s  {status}",
                  flush=True)
    return variants


def measure_latency(args, variants: List[Variant]) -> None:
    """Fill ``variant.latency`` for every variant with a model, timed interleaved."""
    timed = [v for v in variants if v.model is not None]
    per_batch = []
    for batch in (1, args.batch):
        x = example_input(args.size, args.device, batch)
        samples = [[] for _ in timed]
        with torch.inference_mode():
            for v in timed:
                for _ in range(args.warmup):
                    v.model(x)
            for rep in range(args.repeats):
                for k in range(len(timed)):
                    i = (k + rep) % len(timed)
                    synchronize(args.device)
                    start = time.perf_counter()
                    for _ in range(args.passes):
                        timed[i].model(x)
                    synchronize(args.device)
                    samples[i].append((time.perf_counter() - start) / args.passes)
        per_batch.append([statistics.median(s) for s in samples])
    for v, latency in zip(timed, zip(*per_batch)):
        v.latency = latency


def table(results: dict, args) -> str:
    head = ["model", "method", f"target {args.target_kind}", "params kept", "FLOPs kept",
            "latency b=1", f"latency b={args.batch}", "modules", "status"]
    rows = []
    for name, variants in results.items():
        base = variants[0]
        for v in variants:
            if v.model is None:
                cells = [name, v.method, f"{v.target}"] + ["–"] * 5 + [v.error]
            elif v.method is None:
                cells = [name, "unpruned", "–", "1.000", "1.000"] + \
                        [f"1.000 ({s * 1e3:.1f} ms)" for s in v.latency] + [str(v.modules), "ok"]
            else:
                cells = [name, v.method, f"{v.target}", f"{v.params:.3f}", f"{v.flops:.3f}"] + \
                        [f"{s / s0:.3f}" for s, s0 in zip(v.latency, base.latency)] + [str(v.modules), "ok"]
            rows.append(cells)
    return markdown_table(head, rows)


def checks(results: dict, args) -> str:
    """The latency targets, per model and target."""
    head = ["model", f"target {args.target_kind}",
            f"eigendamage / kron_obd latency b=1 (≤ {SAME_COST_BOUND})",
            f"eigendamage / kron_obd latency b={args.batch} (≤ {SAME_COST_BOUND})",
            "eigendamage latency − FLOPs ratio b=1", f"eigendamage latency − FLOPs ratio b={args.batch}"]
    rows = []
    nan = float("nan")
    for name, variants in results.items():
        base = variants[0]
        for target in args.targets:
            found = {v.method: v for v in variants if v.target == target}
            ed, obd = found["eigendamage"], found["kron_obd"]
            lat = lambda v, b: v.latency[b] if v.latency else nan   # noqa: E731
            gap_is_target = (args.target_kind == "flops" and name in FLOPS_GAP_TARGET["models"]
                             and target == FLOPS_GAP_TARGET["target"])
            gap_bound = FLOPS_GAP_TARGET["bound"] if gap_is_target else None
            cells = [name, f"{target}"]
            cells += [checked(lat(ed, b) / lat(obd, b), SAME_COST_BOUND, 3) for b in (0, 1)]
            cells += [checked(lat(ed, b) / lat(base, b) - ed.flops, gap_bound, 3) for b in (0, 1)]
            rows.append(cells)
    return markdown_table(head, rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=MODELS, help="timm model names")
    p.add_argument("--targets", nargs="+", type=float, default=[0.5, 0.25],
                   help="shares of the unpruned cost to keep")
    p.add_argument("--target-kind", choices=("flops", "params"), default="flops",
                   help="which cost the targets are shares of (prune's target_<kind>)")
    p.add_argument("--size", type=int, default=96, help="image side (img_size of fixed-size models)")
    p.add_argument("--batch", type=int, default=8, help="the larger latency batch (besides 1)")
    p.add_argument("--stat-batches", type=int, default=2, help="statistics (and gradient) batches")
    p.add_argument("--stat-batch-size", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3, help="untimed forward passes per model")
    p.add_argument("--repeats", type=int, default=7, help="interleaved timed rounds (median)")
    p.add_argument("--passes", type=int, default=3, help="forward passes per timed sample")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    print(f"{args.size}×{args.size}, target_{args.target_kind} {args.targets}, statistics "
          f"{args.stat_batches} × {args.stat_batch_size}, {args.device}, torch {torch.__version__}, "
          f"{args.threads} thread(s), latency median of {args.repeats} × {args.passes} passes", flush=True)
    results = {}
    for name in args.models:
        results[name] = pruned_variants(args, name)
        measure_latency(args, results[name])
    print()
    print(table(results, args))
    print()
    print(checks(results, args))
    gap = FLOPS_GAP_TARGET
    print(f"The latency − FLOPs target (≤ {gap['bound']}) applies to eigendamage at FLOPs "
          f"{gap['target']} on {' and '.join(gap['models'])} (✓/✗ there).")


if __name__ == "__main__":
    main()
