"""Memory and time of K-FAC statistics (and pruning) on a model with a huge Linear layer.

Workload: torchvision ``vgg11`` (random init, 10 classes) on B batches of 8 random 32×32
images. Its first classifier layer is ``Linear(512·7·7 = 25088, 4096)``: a dense K-FAC input
factor would be 25088² float32 = 2.3 GiB (plus a float64 eigendecomposition of that size, an
hour or more on a CPU). Above ``max_factor_dim`` (8192) ``collect_kfac`` gives it
channel-structured factors (512×512, the 49 positions of the 7×7 map as kernel offsets).

Variants, each in a FRESH subprocess (so earlier variants cannot inflate its high-water mark):

* ``plain`` — the reference: eval mode, forward, batch-mean cross entropy, ``backward()``;
* ``kfac``  — ``collect_kfac`` over every Conv2d / Linear (true Fisher, channel mode);
* ``prune`` — ``prune(method="kron_obd", target_params=0.5)`` (with ``--prune``; it includes
  the statistics pass, the private copy of the model, tracing and the ratio search).

Each subprocess builds the model and data, runs the variant once on a 2-example batch
(initialisation), reads its resident set size (VmRSS) as the baseline, runs the variant on the
B batches timing it, and reads the resident high-water mark (VmHWM). Reported: wall seconds
and peak − baseline (extra memory), each also as a ratio to ``plain``. The factor bytes
``collect_kfac`` allocated are printed next to what dense factors would have needed.
``MALLOC_MMAP_THRESHOLD_=65536`` makes freed tensor memory leave the resident set.

Run:  python benchmarks/huge_layers.py [--batches 2] [--threads 1] [--prune]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from kfac_overhead import rss_kib   # benchmarks/ is on sys.path when this script runs


def build(batches: int, seed: int = 0):
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.vgg11(num_classes=10).eval()
    g = torch.Generator().manual_seed(seed)
    data = [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g))
            for _ in range(batches)]
    return model, data


def run_variant(name: str, model, data) -> dict:
    import tp_eigendamage as ted

    if name == "plain":
        for x, y in data:
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
        model.zero_grad(set_to_none=True)
        return {}
    if name == "kfac":
        stats = ted.collect_kfac(model, data, progress=False)
        factor_bytes = sum(t.numel() * t.element_size() for f in stats.values() for t in f.state_tensors())
        dense = sum(4 * ((f.input_factor.shape[-1] * f.flattened_positions) ** 2 + f.grad_factor.shape[-1] ** 2)
                    for f in stats.values())
        fc1 = stats[model.classifier[0]]
        return {"factor_MiB": factor_bytes / 2 ** 20, "dense_factor_MiB": dense / 2 ** 20,
                "fc1_A": list(fc1.input_factor.shape), "fc1_positions": fc1.flattened_positions}
    _, report = ted.prune(model, data, data[0][0][:1], method="kron_obd", target_params=0.5, progress=False)
    return {"params_fraction": report.after.params / report.before.params}


def child(name: str, batches: int, threads: int) -> None:
    torch.set_num_threads(threads)
    model, data = build(batches)
    if name != "prune":
        run_variant(name, model, [(data[0][0][:2], data[0][1][:2])])
    base = rss_kib("VmRSS")
    start = time.perf_counter()
    extra = run_variant(name, model, data)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "extra_MiB": (rss_kib("VmHWM") - base) / 1024, **extra}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prune", action="store_true", help="also time prune(kron_obd) (~1 min)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.batches, args.threads)
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(args.threads),
           "PYTHONWARNINGS": "ignore"}
    results = {}
    for name in ("plain", "kfac") + (("prune",) if args.prune else ()):
        done = subprocess.run([sys.executable, __file__, "--child", name, "--batches", str(args.batches),
                               "--threads", str(args.threads)], capture_output=True, text=True, env=env,
                              check=True)
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    plain = results["plain"]
    print(f"vgg11, {args.batches} batches of 8 at 32x32, {args.threads} thread(s)")
    print(f"{'variant':<8} {'seconds':>8} {'time ratio':>10} {'extra MiB':>10} {'memory ratio':>12}")
    for name, r in results.items():
        print(f"{name:<8} {r['seconds']:>8.1f} {r['seconds'] / plain['seconds']:>10.2f} "
              f"{r['extra_MiB']:>10.0f} {r['extra_MiB'] / plain['extra_MiB']:>12.2f}")
    k = results["kfac"]
    print(f"fc1 (Linear 25088→4096): A {k['fc1_A']} over {k['fc1_positions']} positions; all factors "
          f"{k['factor_MiB']:.0f} MiB allocated, dense factors would need {k['dense_factor_MiB']:.0f} MiB")
    if "prune" in results:
        print(f"prune(kron_obd, target_params=0.5) kept {results['prune']['params_fraction']:.3f} of the parameters")


if __name__ == "__main__":
    main()
