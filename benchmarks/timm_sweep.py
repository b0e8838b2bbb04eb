"""Prune the timm zoo with ``tp_eigendamage.prune`` and write a markdown table.

Every model: random init (no download), ``num_classes=10``, statistics from ``--batches``
random batches of ``--batch-size`` images, ``prune(method=..., target_params=--target)``.
CNNs run at ``--size`` pixels; ViT-style models (patch 16) at ``--vit-size`` via ``img_size``.

    python benchmarks/timm_sweep.py                       # the issue's list, both methods
    python benchmarks/timm_sweep.py --models resnet18 convnext_atto --methods eigendamage
    python benchmarks/timm_sweep.py --out sweep.md        # table also written to a file

Status is ``ok`` (ran, finite output of the same shape, parameters within 2 % of the target)
or the error type and message (e.g. a ``PruningError`` naming the layer Torch-Pruning cannot
handle).
"""
from __future__ import annotations

import argparse
import time

import timm
import torch

import tp_eigendamage as ted

MODELS = ["resnet18", "resnet50", "resnext26ts", "seresnext26d_32x4d", "regnetx_002", "regnety_002",
          "convnext_atto", "efficientnet_b0", "mobilenetv2_050", "mobilenetv3_small_100",
          "densenet121", "ghostnet_100", "vit_tiny_patch16_224", "deit_tiny_patch16_224"]
METHODS = ["eigendamage", "kron_obd"]


def takes_img_size(name: str) -> bool:
    """Transformers with a patch grid: built for a small ``img_size`` instead of 224."""
    return name.startswith(("vit_", "deit_"))


def build(name: str, size: int, vit_size: int):
    torch.manual_seed(0)
    kwargs = dict(img_size=vit_size) if takes_img_size(name) else {}
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()
    side = vit_size if takes_img_size(name) else size
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(batch_size, 3, side, side, generator=g), torch.randint(0, 10, (batch_size,), generator=g))
            for batch_size in [ARGS.batch_size] * ARGS.batches]
    example = torch.randn(2, 3, side, side, generator=g)
    return model, data, example


def run_one(name: str, method: str) -> dict:
    model, data, example = build(name, ARGS.size, ARGS.vit_size)
    with torch.no_grad():
        shape = model(example).shape
    start = time.perf_counter()
    row = dict(model=name, method=method)
    try:
        model, report = ted.prune(model, data, example, method=method, target_params=ARGS.target,
                                  progress=False)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            out = model(example)
        fraction = report.params_fraction
        problems = [p for p, bad in (("output shape changed", out.shape != shape),
                                     ("non-finite output", not torch.isfinite(out).all()),
                                     (f"params {fraction:.3f} not within 2 % of {ARGS.target}",
                                      abs(fraction / ARGS.target - 1) > 0.02)) if bad]
        row.update(params=(report.before.params, report.after.params),
                   flops=(report.before.flops, report.after.flops),
                   blocks=(report.kfe_blocks_kept, report.kfe_blocks_folded),
                   trials=sum(r.get("search_trials", 0) for r in report.rounds),
                   seconds=seconds, status="; ".join(problems) or "ok")
    except Exception as exc:  # the table records failures; it is what the sweep is for
        row.update(seconds=time.perf_counter() - start,
                   status=f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
    return row


def _m(n: float) -> str:
    return f"{n / 1e6:.2f}M"


def table(rows) -> str:
    head = ("model", "method", "params before → after", "FLOPs before → after",
            "KFE blocks kept / folded", "trials", "seconds", "status")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], r["method"]]
        if "params" in r:
            (p0, p1), (f0, f1) = r["params"], r["flops"]
            cells += [f"{_m(p0)} → {_m(p1)} ({p1 / p0:.1%})", f"{_m(f0)} → {_m(f1)} ({f1 / f0:.1%})",
                      "{} / {}".format(*r["blocks"]), str(r["trials"])]
        else:
            cells += ["–"] * 4
        cells += [f"{r['seconds']:.1f}", r["status"].replace("|", "/")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    global ARGS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--target", type=float, default=0.6, help="target_params fraction")
    parser.add_argument("--size", type=int, default=64, help="CNN input size")
    parser.add_argument("--vit-size", type=int, default=32, help="img_size for patch-16 transformers")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", help="also write the markdown table to this file")
    ARGS = parser.parse_args()
    torch.set_num_threads(ARGS.threads)
    rows = []
    for name in ARGS.models:
        for method in ARGS.methods:
            rows.append(run_one(name, method))
            r = rows[-1]
            print(f"{name:28s} {method:12s} {r['seconds']:7.1f}s  {r['status']}", flush=True)
    text = table(rows)
    print(text)
    if ARGS.out:
        with open(ARGS.out, "w") as fh:
            fh.write(text + "\n")


ARGS = argparse.Namespace()

if __name__ == "__main__":
    main()
