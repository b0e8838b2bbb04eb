"""The command line's jobs: train (or load) a timm model on real data, prune it, fine-tune it
and report (``run``), or compare methods, targets and seeds from the same trained models
(``compare``). The arguments come validated from :mod:`tp_eigendamage.cli`.
"""
from __future__ import annotations

import copy
import json
import os
import statistics
import time
from typing import Dict, List

import torch
import torch.nn as nn

from ._model_state import restored_modes
from ._version import versions
from .errors import InvalidArgumentError, ModelFileError
from .methods import METHODS
from .report import format_table

__all__ = ["run", "compare"]


class _Experiment:
    """Data, loaders and example inputs shared by ``run`` and ``compare``."""

    def __init__(self, args):
        from . import data as data_mod

        torch.manual_seed(args.seed)
        if args.data == "digits":
            self.train_set, self.test_set = data_mod.digits_datasets(image_size=args.image_size,
                                                                     seed=args.seed)
            self.data_name = "digits"
        else:
            try:
                self.train_set, self.test_set = data_mod.image_folder_datasets(
                    args.data, image_size=args.image_size, seed=args.seed)
            except ValueError as exc:
                raise InvalidArgumentError(str(exc)) from None
            self.data_name = args.data
        self.num_classes = data_mod.num_classes(self.train_set)
        self.train_loader, self.test_loader = data_mod.make_loaders(
            self.train_set, self.test_set, batch_size=args.batch_size, seed=args.seed)
        self.example_inputs = next(iter(self.test_loader))[0][:1].to(args.device)


def _create_model(args, num_classes: int) -> nn.Module:
    import timm

    kwargs = dict(pretrained=False, num_classes=num_classes)
    try:
        return timm.create_model(args.model, img_size=args.image_size, **kwargs)
    except TypeError:
        return timm.create_model(args.model, **kwargs)


def _stats_batches(loader, n: int):
    batches = []
    for batch in loader:
        if len(batches) >= n:
            break
        batches.append(batch)
    return batches


def _evaluate(model, experiment, args) -> Dict[str, float]:
    from .budget import measure_cost
    from .training import evaluate

    result = dict(evaluate(model, experiment.test_loader, device=args.device))
    cost = measure_cost(model, experiment.example_inputs)
    result.update(params=cost.params, flops=cost.flops)
    return result


def _finetune_fn(experiment, args, epochs: int):
    from .training import finetune_callback

    return finetune_callback(experiment.train_loader, epochs=epochs, lr=args.finetune_lr, seed=args.seed,
                             device=args.device, progress=not args.no_progress,
                             max_batches=args.max_train_batches)


def _check_runs(model: nn.Module, experiment, args) -> None:
    """One forward on an example input before any training: a model that cannot take the
    chosen image size fails here, in one line."""
    try:
        with torch.no_grad(), restored_modes(model):
            model.eval()(experiment.example_inputs)
    except Exception as exc:
        first_line = (str(exc).strip().splitlines() or [""])[0]
        raise InvalidArgumentError(f"the model cannot run on {args.image_size}x{args.image_size} inputs "
                       f"({type(exc).__name__}: {first_line}); use a larger --image-size") from None


def _prepare(args):
    """Load data and train (or load) the starting model; returns (experiment, model, timings)."""
    from .io import load
    from .training import train

    experiment = _Experiment(args)
    timings = {}
    start = time.perf_counter()
    if args.checkpoint:
        try:
            model = load(args.checkpoint, map_location=args.device)
        except ModelFileError as exc:
            raise InvalidArgumentError(f"--checkpoint: {exc}") from None
        _check_runs(model, experiment, args)
    else:
        torch.manual_seed(args.seed)
        model = _create_model(args, experiment.num_classes).to(args.device)
        _check_runs(model, experiment, args)
        train(model, experiment.train_loader, epochs=args.epochs, lr=args.lr, device=args.device,
              seed=args.seed, progress=not args.no_progress, max_batches=args.max_train_batches)
    timings["train"] = time.perf_counter() - start
    return experiment, model, timings


def _prune_once(model, experiment, args, method: str, target: dict, finetune_epochs: int):
    from .prune import prune

    torch.manual_seed(args.seed)
    stats_data = _stats_batches(experiment.train_loader, args.stat_batches)
    finetune = _finetune_fn(experiment, args, finetune_epochs) if finetune_epochs > 0 else None
    chosen = {"side": args.side, "first_order": args.first_order}
    criterion_options = {k: v for k, v in chosen.items() if v is not None and k in METHODS[method].criterion_defaults}
    return prune(model, stats_data, experiment.example_inputs, method=method, criterion_options=criterion_options,
                 recalibrate_bn=not args.no_recalibrate_bn,
                 iterative_steps=args.iterative_steps, finetune=finetune,
                 fisher_type=args.fisher_type, ranking=args.ranking, progress=not args.no_progress, **target)


def run(args, target: Dict[str, float]) -> dict:
    """The default job: train, prune to ``target`` (a ``prune()`` budget), fine-tune, report.
    ``args`` are the command line's (validated by :mod:`tp_eigendamage.cli`)."""
    from .io import save
    from .kfac import collect_kfac
    from .plots import plot_layer_widths, plot_spectra

    from .training import evaluate

    experiment, model, timings = _prepare(args)
    first = "loaded" if args.checkpoint else "trained"
    stages = {first: _evaluate(model, experiment, args)}

    stats_data = _stats_batches(experiment.train_loader, args.stat_batches)
    spectra = _largest_spectra(collect_kfac(model, stats_data, fisher_type=args.fisher_type, progress=False), k=4)
    stats_loss = {"before": evaluate(model, stats_data, device=args.device)["loss"]}
    start = time.perf_counter()
    model, report = _prune_once(model, experiment, args, args.method, target, finetune_epochs=0)
    timings["prune"] = time.perf_counter() - start
    stats_loss["after"] = evaluate(model, stats_data, device=args.device)["loss"]
    stages["pruned"] = _evaluate(model, experiment, args)
    start = time.perf_counter()
    if args.finetune_epochs > 0:
        _finetune_fn(experiment, args, args.finetune_epochs)(model, 1)
    timings["finetune"] = time.perf_counter() - start
    stages["fine-tuned"] = _evaluate(model, experiment, args)

    stage_time = {first: timings["train"], "pruned": timings["prune"], "fine-tuned": timings["finetune"]}
    rows = [[name, f"{s['params']:,}", f"{s['flops'] / 1e6:.2f}M", f"{s['accuracy']:.2%}",
             f"{s['loss']:.4f}", f"{stage_time[name]:.1f}s"] for name, s in stages.items()]
    print(f"\n{args.model} on {experiment.data_name} ({args.image_size}px), method {args.method}, "
          f"target: {report.target_text()}")
    print(format_table(["stage", "params", "FLOPs", "test acc", "test loss", "time"], rows))
    print(_damage_check(report, stats_loss))
    print(f"\n{report}")

    os.makedirs(args.out, exist_ok=True)
    save(model, os.path.join(args.out, "pruned_model.pt"))
    report_dict = report.to_dict()
    plot_layer_widths(report_dict["layers"], os.path.join(args.out, "layer_widths.png"))
    plot_spectra(spectra, os.path.join(args.out, "eigen_spectra.png"))
    result = {"config": {**vars(args), "threads": torch.get_num_threads()}, "target": target,
              "stages": stages, "timings": timings, "statistics_batches_loss": stats_loss,
              "pruning": report_dict, "versions": versions()}
    with open(os.path.join(args.out, "report.json"), "w") as fh:
        json.dump(result, fh, indent=2)
    print(f"\nwrote {args.out}/pruned_model.pt, report.json, layer_widths.png, eigen_spectra.png")
    return result


def _damage_check(report, stats_loss: Dict[str, float]) -> str:
    """The measured change of the loss on the statistics batches, next to the prediction."""
    change = stats_loss["after"] - stats_loss["before"]
    line = (f"training loss on the statistics batches: {stats_loss['before']:.4f} → "
            f"{stats_loss['after']:.4f} (measured change {change:+.3g}")
    if report.loss_units:
        line += f"; predicted by the damages: {report.predicted_damage:+.3g}"
    return line + ")"


def _largest_spectra(stats, k: int) -> Dict[str, Dict[str, List[float]]]:
    """λ_A and λ_S of the ``k`` layers with the most weights."""
    largest = sorted(stats.items(), key=lambda kv: -kv[0].weight.numel())[:k]
    out = {}
    for module, f in largest:
        lam_a, _, lam_s, _ = f.eigen()
        out[f.name] = {"input": lam_a.flatten().tolist(), "grad": lam_s.flatten().tolist()}
    return out


def _mean_std(values: List[float]) -> Dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def _aggregate(results: List[dict],
               keys=("params_fraction", "flops_fraction", "latency_fraction", "accuracy", "loss")) -> List[dict]:
    """Mean and standard deviation over seeds of every (method, target, budget) cell."""
    cells: Dict[tuple, List[dict]] = {}
    for r in results:
        cells.setdefault((r["method"], r["target_params"], r["finetune_epochs"]), []).append(r)
    return [{"method": m, "target_params": t, "finetune_epochs": b, "seeds": len(rs),
             **{k: _mean_std([r[k] for r in rs]) for k in keys}} for (m, t, b), rs in cells.items()]


def _pm(stat: Dict[str, float], fmt: str) -> str:
    return f"{format(stat['mean'], fmt)} ± {format(stat['std'], fmt)}"


def compare(args, methods: List[str], targets: List[float], budgets: List[int], seeds: List[int]) -> dict:
    """Per seed: one trained model, the same statistics data and fine-tuning budget for every
    method and target; the table and plot show mean ± std over the seeds."""
    from .plots import plot_compare

    baselines, results, data_name = [], [], args.data
    for seed in seeds:
        seed_args = copy.copy(args)
        seed_args.seed = seed
        experiment, trained, _ = _prepare(seed_args)
        data_name = experiment.data_name
        baselines.append(_evaluate(trained, experiment, seed_args))
        for method in methods:
            for target in targets:
                for budget in budgets:
                    start = time.perf_counter()
                    model, report = _prune_once(copy.deepcopy(trained), experiment, seed_args, method,
                                                {"target_params": target}, budget)
                    seconds = time.perf_counter() - start
                    ev = _evaluate(model, experiment, seed_args)
                    results.append({"seed": seed, "method": method, "target_params": target,
                                    "finetune_epochs": budget, "params_fraction": report.params_fraction,
                                    "flops_fraction": report.flops_fraction,
                                    "latency_fraction": report.latency_fraction,
                                    "accuracy": ev["accuracy"], "loss": ev["loss"], "seconds": seconds})
    summary = _aggregate(results)
    base = {k: _mean_std([b[k] for b in baselines]) for k in ("accuracy", "loss")}
    rows = [[r["method"], f"{r['target_params']:.2f}", str(r["finetune_epochs"]),
             f"{r['params_fraction']['mean']:.3f}", f"{r['flops_fraction']['mean']:.3f}",
             _pm(r["latency_fraction"], ".3f"),
             _pm({k: 100 * v for k, v in r["accuracy"].items()}, ".2f") + "%", _pm(r["loss"], ".4f")]
            for r in summary]
    print(f"\n{args.model} on {data_name}, seeds {seeds}: unpruned test accuracy "
          f"{_pm({k: 100 * v for k, v in base['accuracy'].items()}, '.2f')}%, loss {_pm(base['loss'], '.4f')}")
    print(format_table(["method", "target", "ft epochs", "params kept", "FLOPs kept", "latency kept",
                        "test acc", "test loss"], rows))
    print(f"latency kept: measured latency of the pruned model over the unpruned one (batch 1, "
          f"{args.device}), mean ± std over the seeds")
    out = {"config": {**vars(args), "threads": torch.get_num_threads()}, "seeds": seeds,
           "baseline": base, "baselines": baselines, "summary": summary, "results": results,
           "versions": versions()}
    with open(os.path.join(args.out, "compare.json"), "w") as fh:
        json.dump(out, fh, indent=2)
    plot_compare(summary, os.path.join(args.out, "compare.png"))
    print(f"\nwrote {args.out}/compare.json, compare.png")
    return out
