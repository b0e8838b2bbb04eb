"""What ``tp_eigendamage.prune()`` costs: EigenDamage vs Kron-OBD vs Torch-Pruning's Taylor.

For every model (timm, random init, 10 classes), one run measures side by side, on the same
statistics batches and the same parameter target (``target_params``, default 0.6):

* ``eigendamage`` — ``prune(method="eigendamage")``;
* ``kron_obd``    — ``prune(method="kron_obd")``;
* ``taylor``      — Torch-Pruning's Taylor pipeline as ``prune(method="taylor")``: gradients
                    of the mean cross entropy over the same batches (its "statistics" stage),
                    then ``tp.importance.GroupTaylorImportance`` in the same ``BasePruner`` and
                    ratio search that lands on the target;
* ``eigh-once``   — ``collect_kfac`` once, then the factors of the layers ``to_kfe`` rewrites
                    (``tp_eigendamage.kfe.kfe_targets``) decomposed with the scheduling
                    ``prune()`` uses (``KFACStats.eigendecompose``), at each precision of
                    ``--precisions`` in turn on the same statistics: the cost of decomposing
                    each factor exactly once. Also printed: the largest eigenvalue error of the
                    float32 policy, relative to the factor's largest eigenvalue.

Each measurement runs in a fresh process (``--repeats`` rounds interleave the jobs of a model;
medians). Time is the wall time of the ``prune()`` call. Peak memory is what the call needs on
top of the model and data (``_common.PeakMemory``): on the CPU the resident high-water mark,
measured in a second fresh process with glibc returning freed memory (slower allocation, so
not the one timed); on CUDA ``torch.cuda.max_memory_allocated`` in the timed process.

``PruneReport.timings`` splits each method's time into stages (statistics, eigendecomposition,
rewrite, scoring, ratio_search, pruning, fold); "other" is the wall time no stage accounts for
(the deep copy taken for rollback, the before/after cost count).

Run (CPU defaults: 64 px, ``img_size=64`` for fixed-size models, 2 statistics batches of 8):
    python benchmarks/prune_cost.py
    python benchmarks/prune_cost.py --models resnet50 --repeats 3
    python benchmarks/prune_cost.py --size 224 --batch 32 --stat-batches 4 --device cuda

Prints a row per model and method as it goes, then two markdown tables: per method (wall
seconds, extra peak MiB, params and FLOPs kept, stage seconds) and per model (eigendamage and
taylor time over kron_obd, eigendamage's eigendecomposition against decomposing each factor
once, and the speed targets: (eigendamage − eigendecomposition)/kron_obd ≤ 1.5,
eigendecomposition/eigh-once ≤ 1.3 at the precision prune() used, eigendamage/kron_obd ≤ 3).
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

import tp_eigendamage as ted
from tp_eigendamage.eigen import PRECISIONS
from tp_eigendamage.kfe import kfe_targets
from tp_eigendamage.prune import STAGES
from _common import (PeakMemory, checked, create_model, error_text, example_input, markdown_table,
                     random_batches, run_child, synchronize)

MODELS = ["resnet50", "convnext_tiny", "vit_small_patch16_224", "densenet121"]
METHODS = ["eigendamage", "kron_obd", "taylor"]
JOBS = METHODS + ["eigh-once"]


# -- in the child process ------------------------------------------------------------------------
def workload(args, name: str):
    model = create_model(name, args.size, args.device)
    batches = random_batches(args.stat_batches, args.batch, args.size, args.device)
    example = example_input(args.size, args.device)
    with torch.no_grad():
        model(example)   # library initialisation outside the measurement
    return model, batches, example


def prune_job(args, name: str, method: str) -> dict:
    model, batches, example = workload(args, name)
    with PeakMemory(args.device) as peak:
        synchronize(args.device)
        start = time.perf_counter()
        model, report = ted.prune(model, batches, example, method=method, target_params=args.target_params,
                                  eigen_precision=args.precision, progress=False)
        synchronize(args.device)
        seconds = time.perf_counter() - start
    return dict(seconds=seconds, peak_mib=peak.mib, params=report.params_fraction,
                flops=report.flops_fraction, timings=report.timings)


def eigh_once_job(args, name: str) -> dict:
    model, batches, _ = workload(args, name)
    stats = ted.collect_kfac(model, batches, progress=False)
    targets = kfe_targets(model, stats)
    out = dict(layers=len(targets))
    eigenvalues = {}
    for precision in args.precisions:
        fresh = copy.deepcopy(stats).for_model(model)   # nothing decomposed yet
        synchronize(args.device)
        start = time.perf_counter()
        fresh.eigendecompose(targets, precision)
        synchronize(args.device)
        out[precision] = time.perf_counter() - start
        eigenvalues[precision] = [t for m in targets for t in fresh[m].eigen()[0::2]]
    if {"float32", "float64"} <= set(eigenvalues):
        out["float32_eigenvalue_error"] = max(
            float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))
            for a, b in zip(eigenvalues["float32"], eigenvalues["float64"]))
    return out


def child(args) -> None:
    torch.set_num_threads(args.threads)
    name, job = args.child
    try:
        result = eigh_once_job(args, name) if job == "eigh-once" else prune_job(args, name, job)
    except Exception as exc:   # the table records failures
        result = dict(error=error_text(exc))
    print(json.dumps(result))


# -- in the parent -------------------------------------------------------------------------------
def run_job(args, name: str, job: str, for_memory: bool) -> dict:
    argv = ["--child", name, job, "--size", str(args.size), "--batch", str(args.batch),
            "--stat-batches", str(args.stat_batches), "--target-params", str(args.target_params),
            "--device", args.device, "--threads", str(args.threads), "--precision", args.precision,
            "--precisions", *args.precisions]
    return run_child(__file__, argv, return_freed_memory=for_memory)


def median_result(results: list) -> dict:
    """Medians over repeats of the seconds (stage seconds, seconds per precision); other fields
    from the first."""
    if any("error" in r for r in results):
        return next(r for r in results if "error" in r)
    out = dict(results[0])
    for key in ("seconds", *PRECISIONS):
        if key in out:
            out[key] = statistics.median(r[key] for r in results)
    if "timings" in out:
        out["timings"] = {k: statistics.median(r["timings"][k] for r in results) for k in STAGES}
    return out


def measure_model(args, name: str) -> dict:
    runs = {job: [] for job in JOBS}
    for _ in range(args.repeats):
        for job in JOBS:
            runs[job].append(run_job(args, name, job, for_memory=False))
    out = {job: median_result(r) for job, r in runs.items()}
    for method in METHODS:
        if "error" in out[method]:
            continue
        if not args.memory:
            out[method]["peak_mib"] = float("nan")
        elif torch.device(args.device).type == "cpu":   # CUDA: measured in the timed process
            memory_run = run_job(args, name, method, for_memory=True)
            out[method]["peak_mib"] = memory_run.get("peak_mib", float("nan"))
    return out


def _stage_seconds(result: dict) -> list:
    """Seconds per stage, then the wall time no stage accounts for."""
    timings = result["timings"]
    return [f"{timings[k]:.2f}" for k in STAGES] + [f"{result['seconds'] - sum(timings.values()):.2f}"]


def method_table(results: dict) -> str:
    head = ["model", "method", "wall s", "extra peak MiB", "params kept", "FLOPs kept"]
    head += list(STAGES) + ["other"]
    rows = []
    for name, jobs in results.items():
        for method in METHODS:
            r = jobs[method]
            if "error" in r:
                cells = [name, method, r["error"]] + ["–"] * (len(head) - 3)
            else:
                cells = [name, method, f"{r['seconds']:.1f}", f"{r['peak_mib']:.0f}",
                         f"{r['params']:.3f}", f"{r['flops']:.3f}"]
                cells += _stage_seconds(r)
            rows.append(cells)
    return markdown_table(head, rows)


def ratio_table(results: dict, args) -> str:
    head = ["model", "eigendamage / kron_obd (≤ 3)", "taylor / kron_obd",
            "(eigendamage − eigendecomposition) / kron_obd (≤ 1.5)", "eigendecomposition s",
            "layers"] + [f"eigh-once {p} s" for p in args.precisions] + [
            f"eigendecomposition / eigh-once {args.precision} (≤ 1.3)", "float32 eigenvalue error",
            "peak MiB eigendamage / kron_obd", "peak MiB taylor / kron_obd"]
    rows = []
    nan = float("nan")
    for name, jobs in results.items():
        ed, obd, taylor, once = (jobs[j] for j in JOBS)
        t = lambda r: nan if "error" in r else r["seconds"]          # noqa: E731
        m = lambda r: nan if "error" in r else r["peak_mib"]         # noqa: E731
        eig = ed["timings"]["eigendecomposition"] if "timings" in ed else nan
        once_s = lambda p: nan if "error" in once else once.get(p, nan)   # noqa: E731
        rows.append([name, checked(t(ed) / t(obd), 3.0), checked(t(taylor) / t(obd)),
                     checked((t(ed) - eig) / t(obd), 1.5), checked(eig), once.get("error") or once["layers"]]
                    + [checked(once_s(p)) for p in args.precisions]
                    + [checked(eig / once_s(args.precision), 1.3),
                       _scientific(once.get("float32_eigenvalue_error", nan)),
                       checked(m(ed) / m(obd)), checked(m(taylor) / m(obd))])
    return markdown_table(head, rows)


def _scientific(value: float) -> str:
    return "n/a" if value != value else f"{value:.1e}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=MODELS, help="timm model names")
    p.add_argument("--size", type=int, default=64, help="image side (img_size of fixed-size models)")
    p.add_argument("--batch", type=int, default=8, help="images per statistics batch")
    p.add_argument("--stat-batches", type=int, default=2, help="statistics (and gradient) batches")
    p.add_argument("--target-params", type=float, default=0.6, help="share of parameters to keep")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="float64", choices=PRECISIONS,
                   help="prune(eigen_precision=...) of the eigendamage runs")
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS,
                   help="precisions eigh-once decomposes the factors at")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--repeats", type=int, default=1, help="interleaved rounds per model (median)")
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                   help="measure peak memory (on the CPU: one more process per method)")
    p.add_argument("--child", nargs=2, metavar=("MODEL", "JOB"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    print(f"prune(target_params={args.target_params}), {args.stat_batches} batches × {args.batch} × "
          f"3×{args.size}², {args.device}, torch {torch.__version__}, {args.threads} thread(s), "
          f"median of {args.repeats}", flush=True)
    results = {}
    for name in args.models:
        results[name] = measure_model(args, name)
        for job in JOBS:
            r = results[name][job]
            text = r.get("error") or ", ".join(f"{r[k]:.1f} s" + ("" if k == "seconds" else f" ({k})")
                                               for k in ("seconds", *PRECISIONS) if k in r)
            print(f"{name:<24}{job:<13}{text}", flush=True)
    print()
    print(method_table(results))
    print()
    print(ratio_table(results, args))


if __name__ == "__main__":
    main()
