"""Cost of a K-FAC statistics pass relative to a plain forward+backward.

Workload: timm models (random init, 10 classes; default ``resnet18``) on B batches of random
images (default 4 batches of 64 at 32×32). Variants, each over the same B batches:

* ``plain``          — the reference: ``model.eval()``, forward, batch-mean cross entropy,
                       ``loss.backward()`` (parameter gradients accumulated into ``.grad``).
                       Eval mode because ``collect_kfac`` runs in eval mode (docs/method.md §1), so
                       both do the same forward arithmetic; ``plain-train`` (train-mode BN)
                       is printed as well for orientation.
* ``kfac-channel``   — ``collect_kfac(factor_mode="channel", fisher_type="true")``, the default:
                       A from the coverage identity (no im2col), importance-sampled labels,
                       and the mean data-label gradient (a second, plain backward pass with
                       the data labels forms the weight gradients; docs/method.md §4).
* ``kfac-channel-2nd`` — the same with ``mean_gradient=False`` (second-order statistics only:
                       one backward pass that stops at the layer outputs).
* ``kfac-empirical`` — ``fisher_type="empirical"``: one backward pass serves both the factors
                       and the mean gradient.
* ``kfac-patch``     — ``factor_mode="patch"`` (im2col/unfold-based A, ``in·kh·kw``-sized
                       factors), for comparison.

Time: every variant runs ``--warmup`` times, then ``--repeats`` rounds interleave the variants
(plain, kfac-channel, kfac-patch, plain-train, plain, ...) so that drifts in machine load hit
all alike; the median per variant is reported and divided by ``plain``'s median. On the CPU
with one thread the clock is the process's CPU time (other processes on a shared machine do
not inflate it), otherwise the wall clock.

Peak memory: each variant runs in a FRESH subprocess (so earlier variants cannot inflate its
high-water mark). The subprocess builds the model and data, runs the variant once on a
2-example batch (library initialisation, lazy buffers), then measures the extra peak memory of
the variant on the B batches on top of model and data (``_common.PeakMemory``: resident
high-water mark minus resident set at the start on the CPU, under
``MALLOC_MMAP_THRESHOLD_=65536`` so that resident memory follows live tensors;
``torch.cuda.max_memory_allocated`` on CUDA).

Run:
    python benchmarks/kfac_overhead.py [--batches 4] [--repeats 7] [--threads 1]
    # at the resolution users run (target: collect_kfac ≤ 1.3× time and memory):
    python benchmarks/kfac_overhead.py --models resnet50 convnext_tiny vit_small_patch16_224 \\
        --size 224 --batch 32 --batches 1 --warmup 1 --repeats 3 --variants plain kfac-channel

Prints one row per model and variant: median seconds (CPU or wall), time ratio to ``plain``, extra peak MiB,
memory ratio to ``plain``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

import tp_eigendamage as ted
from _common import PeakMemory, create_model, random_batches, run_child, synchronize

VARIANTS = ("plain", "kfac-channel", "kfac-channel-2nd", "kfac-empirical", "kfac-patch", "plain-train")
KFAC_OPTIONS = {
    "kfac-channel": dict(factor_mode="channel", fisher_type="true"),
    "kfac-channel-2nd": dict(factor_mode="channel", fisher_type="true", mean_gradient=False),
    "kfac-empirical": dict(factor_mode="channel", fisher_type="empirical"),
    "kfac-patch": dict(factor_mode="patch", fisher_type="true"),
}


def build(name: str, args):
    model = create_model(name, args.size, args.device)
    return model, random_batches(args.batches, args.batch, args.size, args.device)


def run_variant(name: str, model, data) -> None:
    if name.startswith("plain"):
        model.train(name == "plain-train")
        for x, y in data:
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
        model.zero_grad(set_to_none=True)
        model.eval()
    else:
        ted.collect_kfac(model, data, progress=False, **KFAC_OPTIONS[name])


def memory_child(args) -> None:
    """In a fresh process: extra peak memory of one variant, in MiB (printed as JSON)."""
    torch.set_num_threads(args.threads)
    model, data = build(args.models[0], args)
    run_variant(args.memory_child, model, [(x[:2], y[:2]) for x, y in data[:1]])
    with PeakMemory(args.device) as peak:
        run_variant(args.memory_child, model, data)
    print(json.dumps({"variant": args.memory_child, "extra_peak_mib": peak.mib}))


def measure_memory(args, model: str, variant: str) -> float:
    argv = ["--memory-child", variant, "--models", model, "--batches", str(args.batches),
            "--batch", str(args.batch), "--size", str(args.size), "--threads", str(args.threads),
            "--device", args.device]
    return run_child(__file__, argv)["extra_peak_mib"]


def measure_time(args, name: str) -> dict:
    model, data = build(name, args)
    for _ in range(args.warmup):
        for variant in args.variants:
            run_variant(variant, model, data)
    clock = time.process_time if args.device == "cpu" and args.threads == 1 else time.perf_counter
    times = {variant: [] for variant in args.variants}
    for _ in range(args.repeats):
        for variant in args.variants:
            synchronize(args.device)
            start = clock()
            run_variant(variant, model, data)
            synchronize(args.device)
            times[variant].append(clock() - start)
    return {variant: statistics.median(t) for variant, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet18"], help="timm model names")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                   help="what to measure (plain is always included: it is the reference)")
    p.add_argument("--batches", type=int, default=4, help="B, batches per pass")
    p.add_argument("--batch", "--batch-size", type=int, default=64, help="images per batch")
    p.add_argument("--size", "--image-size", type=int, default=32, help="image side in pixels")
    p.add_argument("--repeats", type=int, default=7, help="interleaved timed rounds (median)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="torch intra-op threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--memory-child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        return memory_child(args)
    args.variants = ["plain"] + [v for v in args.variants if v != "plain"]

    print(f"{args.batches} batches × {args.batch} × 3×{args.size}², {args.device}, "
          f"torch {torch.__version__}, {args.threads} thread(s), median of {args.repeats}")
    print(f"{'model':<24}{'variant':<18}{'time s':>9}{'time ratio':>12}{'extra peak MiB':>16}"
          f"{'mem ratio':>11}", flush=True)
    for name in args.models:
        mem = {variant: measure_memory(args, name, variant) for variant in args.variants}
        secs = measure_time(args, name)
        for variant in args.variants:
            print(f"{name:<24}{variant:<18}{secs[variant]:>9.3f}{secs[variant] / secs['plain']:>12.2f}"
                  f"{mem[variant]:>16.1f}{mem[variant] / mem['plain']:>11.2f}", flush=True)
    print("targets for kfac-channel vs plain: time ratio ≤ 1.3; memory ratio ≤ 1.2 "
          "(≤ 1.3 at 224 px, batch 32)")


if __name__ == "__main__":
    main()
