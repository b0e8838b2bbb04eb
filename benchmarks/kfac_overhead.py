"""Cost of a K-FAC statistics pass relative to a plain forward+backward, on the CPU.

Workload: timm ``resnet18`` (random init, 10 classes) on B batches of 64 random 32×32 images.
Variants, each over the same B batches:

* ``plain``          — the reference: ``model.eval()``, forward, batch-mean cross entropy,
                       ``loss.backward()`` (parameter gradients accumulated into ``.grad``).
                       Eval mode because ``collect_kfac`` runs in eval mode (MATH.md §1), so
                       both do the same forward arithmetic; ``plain-train`` (train-mode BN)
                       is printed as well for orientation.
* ``kfac-channel``   — ``collect_kfac(factor_mode="channel", fisher_type="true")``, the default:
                       A from the coverage identity (no im2col), importance-sampled labels,
                       and the mean data-label gradient (a second, plain backward pass with
                       the data labels forms the weight gradients; docs/fidelity.md).
* ``kfac-channel-2nd`` — the same with ``mean_gradient=False`` (second-order statistics only:
                       one backward pass that stops at the layer outputs).
* ``kfac-empirical`` — ``fisher_type="empirical"``: one backward pass serves both the factors
                       and the mean gradient.
* ``kfac-patch``     — ``factor_mode="patch"`` (im2col/unfold-based A, ``in·kh·kw``-sized
                       factors), for comparison.

Time: every variant runs ``--warmup`` times, then ``--repeats`` rounds interleave the variants
(plain, kfac-channel, kfac-patch, plain-train, plain, ...) so that drifts in machine load hit
all alike; the median per variant is reported and divided by ``plain``'s median.

Peak memory: each variant runs in a FRESH subprocess (so earlier variants cannot inflate its
high-water mark). The subprocess builds the model and data, runs the variant once on a
2-example batch (library initialisation, lazy buffers), reads its current resident set size
(VmRSS) as the baseline, runs the variant on the B batches, and reads the resident high-water
mark (VmHWM, i.e. ``ru_maxrss``). Reported: peak − baseline = extra memory the pass needs on
top of model and data. ``MALLOC_MMAP_THRESHOLD_=65536`` makes glibc serve every tensor buffer
from ``mmap`` and return it on free, so resident memory follows live tensors (without it,
freed heap memory may stay resident and blur the comparison). tracemalloc would not see
torch's allocations, hence RSS.

Run:  python benchmarks/kfac_overhead.py [--batches 4] [--repeats 7] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

VARIANTS = ("plain", "kfac-channel", "kfac-channel-2nd", "kfac-empirical", "kfac-patch", "plain-train")
KFAC_OPTIONS = {
    "kfac-channel": dict(factor_mode="channel", fisher_type="true"),
    "kfac-channel-2nd": dict(factor_mode="channel", fisher_type="true", mean_gradient=False),
    "kfac-empirical": dict(factor_mode="channel", fisher_type="empirical"),
    "kfac-patch": dict(factor_mode="patch", fisher_type="true"),
}


def build(batches: int, batch_size: int, image_size: int, seed: int = 0):
    import timm

    torch.manual_seed(seed)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    g = torch.Generator().manual_seed(seed)
    data = [(torch.randn(batch_size, 3, image_size, image_size, generator=g),
             torch.randint(0, 10, (batch_size,), generator=g)) for _ in range(batches)]
    return model, data


def run_variant(name: str, model, data) -> None:
    import tp_eigendamage as ted

    if name.startswith("plain"):
        model.train(name == "plain-train")
        for x, y in data:
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
        model.zero_grad(set_to_none=True)
        model.eval()
    else:
        ted.collect_kfac(model, data, progress=False, **KFAC_OPTIONS[name])


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(args) -> None:
    """In a fresh process: extra peak resident memory of one variant, in MiB (printed as JSON)."""
    torch.set_num_threads(args.threads)
    model, data = build(args.batches, args.batch_size, args.image_size)
    run_variant(args.memory_child, model, [(x[:2], y[:2]) for x, y in data[:1]])
    base = rss_kib("VmRSS")
    run_variant(args.memory_child, model, data)
    peak = rss_kib("VmHWM")
    print(json.dumps({"variant": args.memory_child, "extra_peak_mib": (peak - base) / 1024}))


def measure_memory(args, name: str) -> float:
    cmd = [sys.executable, __file__, "--memory-child", name, "--batches", str(args.batches),
           "--batch-size", str(args.batch_size), "--image-size", str(args.image_size),
           "--threads", str(args.threads)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["extra_peak_mib"]


def measure_time(args) -> dict:
    torch.set_num_threads(args.threads)
    model, data = build(args.batches, args.batch_size, args.image_size)
    for _ in range(args.warmup):
        for name in VARIANTS:
            run_variant(name, model, data)
    times = {name: [] for name in VARIANTS}
    for _ in range(args.repeats):
        for name in VARIANTS:
            start = time.perf_counter()
            run_variant(name, model, data)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, default=4, help="B, batches per pass")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=7, help="interleaved timed rounds (median)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="torch intra-op threads")
    p.add_argument("--memory-child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        return memory_child(args)

    print(f"resnet18, {args.batches} batches × {args.batch_size} × 3×{args.image_size}², "
          f"torch {torch.__version__}, {args.threads} thread(s), median of {args.repeats}")
    mem = {name: measure_memory(args, name) for name in VARIANTS}
    secs = measure_time(args)
    print(f"{'variant':<18}{'time s':>9}{'time ratio':>12}{'extra peak MiB':>16}{'mem ratio':>11}")
    for name in VARIANTS:
        print(f"{name:<18}{secs[name]:>9.3f}{secs[name] / secs['plain']:>12.2f}"
              f"{mem[name]:>16.1f}{mem[name] / mem['plain']:>11.2f}")
    print("targets for kfac-channel: time ratio ≤ 1.3, memory ratio ≤ 1.2 (vs plain, eval mode)")


if __name__ == "__main__":
    main()
