"""``tp-eigendamage``: train → prune → fine-tune a timm model on real data, with a report.

``tp-eigendamage`` (no arguments) runs the default job on the embedded digits data;
``tp-eigendamage compare`` prunes one trained model with several methods and targets under
the same statistics data and fine-tuning budget, over several seeds.
"""
from __future__ import annotations

import argparse
import copy
import difflib
import json
import os
import statistics
import sys
import time
from typing import Dict, Iterable, List, Optional

import torch
import torch.nn as nn

from ._version import versions
from .errors import InvalidArgumentError
from .methods import METHODS
from .report import format_table

__all__ = ["main", "run", "compare", "build_parser", "build_compare_parser", "CLIError", "COMMANDS"]

#: Subcommands (the default job has none).
COMMANDS = {"compare": "prune ONE trained model with several methods, targets and seeds"}


class CLIError(InvalidArgumentError):
    """A bad command line or environment, reported in one line before any long work."""


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest choice, or ``""``."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        prefix = "unrecognized arguments: "
        if message.startswith(prefix):
            options = [o for action in self._actions for o in action.option_strings]
            message += "".join(_did_you_mean(word.split("=")[0], options)
                               for word in message[len(prefix):].split() if word.startswith("-"))
        raise CLIError(f"{message}; see {self.prog} --help")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="resnet18", help="any timm model name (random init)")
    p.add_argument("--data", default="digits",
                   help="'digits' (embedded scikit-learn 8x8 digits) or an image-folder path")
    p.add_argument("--image-size", type=int, default=32, help="input resolution (default 32)")
    p.add_argument("--epochs", type=int, default=3, help="training epochs before pruning (0: none)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05, help="training learning rate")
    p.add_argument("--finetune-lr", type=float, default=0.01, help="fine-tuning learning rate")
    p.add_argument("--stat-batches", type=int, default=8, help="batches for curvature statistics")
    p.add_argument("--fisher-type", choices=("true", "empirical"), default="true")
    p.add_argument("--iterative-steps", type=int, default=1)
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the data split, initialisation, batch order and label sampling")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--checkpoint", default=None,
                   help="start from a model saved with tp_eigendamage.save instead of training")
    p.add_argument("--max-train-batches", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def build_parser() -> argparse.ArgumentParser:
    commands = "\n".join(f"  {name:<9} {text} (tp-eigendamage {name} --help)"
                         for name, text in COMMANDS.items())
    parser = _Parser(prog="tp-eigendamage", description=__doc__.split("\n\n")[0],
                     formatter_class=argparse.RawDescriptionHelpFormatter,
                     epilog=f"commands:\n  (none)    this job: train, prune, fine-tune, report\n{commands}")
    _add_common(parser)
    parser.add_argument("--method", default="eigendamage", help=f"one of {', '.join(METHODS)}")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--target-params", type=float, default=None,
                        help="share of the original parameters to KEEP (default 0.5)")
    target.add_argument("--target-flops", type=float, default=None,
                        help="share of the original FLOPs to KEEP")
    target.add_argument("--pruning-ratio", type=float, default=None,
                        help="share of the channels to REMOVE (Torch-Pruning's pruning_ratio; "
                             "removing 50%% of the channels keeps about 25%% of the parameters)")
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument("--out", default="tp_eigendamage_out",
                        help="output folder: pruned model, report.json, plots")
    return parser


def build_compare_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tp-eigendamage compare",
                     description="Prune ONE trained model per seed with several methods and targets "
                                 "(same statistics batches and fine-tuning budget for every method); "
                                 "mean ± std over the seeds.")
    _add_common(parser)
    parser.add_argument("--methods", default="eigendamage,kron_obd,magnitude,random",
                        help=f"comma-separated methods among {', '.join(METHODS)}")
    parser.add_argument("--targets", default="0.5,0.3,0.1",
                        help="comma-separated shares of the original parameters to KEEP")
    parser.add_argument("--seeds", default="0,1,2",
                        help="comma-separated seeds; each trains its own model (replaces --seed)")
    parser.add_argument("--finetune-epochs", default="0,1",
                        help="comma-separated fine-tuning budgets (0 = one-shot)")
    parser.add_argument("--out", default="tp_eigendamage_compare", help="output folder")
    return parser


# -- validation (before any long work) ---------------------------------------------------------
def _csv(text: str, cast, what: str) -> list:
    try:
        values = [cast(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CLIError(f"--{what} must be a comma-separated list, got {text!r}") from None
    if not values:
        raise CLIError(f"--{what} is empty")
    return values


def _check_common(args) -> None:
    import timm

    if not timm.is_model(args.model):
        raise CLIError(f"unknown timm model {args.model!r}{_did_you_mean(args.model, timm.list_models())}; "
                       "see timm.list_models()")
    for name in ("image_size", "epochs", "batch_size", "stat_batches", "iterative_steps"):
        value, least = getattr(args, name), (0 if name == "epochs" else 1)
        if value < least:
            raise CLIError(f"--{name.replace('_', '-')} must be >= {least}, got {value}")
    if args.data != "digits" and not os.path.isdir(args.data):
        raise CLIError(f"--data {args.data!r} is neither 'digits' nor an existing folder")
    if args.checkpoint is not None and not os.path.isfile(args.checkpoint):
        raise CLIError(f"--checkpoint {args.checkpoint!r} does not exist")
    args.device = _device(args.device)
    _check_writable(args.out)


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if not (name == "cpu" or name.startswith("cuda")):
        raise CLIError(f"--device {name!r}: use cpu, cuda, cuda:N or auto")
    return name


def _check_writable(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".write_test")
        with open(probe, "w") as fh:
            fh.write("ok")
        os.remove(probe)
    except OSError as exc:
        raise CLIError(f"--out {path!r} is not writable ({exc.strerror or exc})") from None


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise CLIError(f"unknown method {method!r}{_did_you_mean(method, METHODS)}; choose one of "
                       f"{', '.join(METHODS)}")


def _check_fraction(value: float, flag: str) -> None:
    if not 0 < value < 1:
        raise CLIError(f"{flag} {value} must be strictly between 0 and 1")


# -- the job -----------------------------------------------------------------------------------
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
                raise CLIError(str(exc)) from None
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


def _prepare(args):
    """Load data and train (or load) the starting model; returns (experiment, model, timings)."""
    from .io import load
    from .training import train

    experiment = _Experiment(args)
    timings = {}
    start = time.perf_counter()
    if args.checkpoint:
        model = load(args.checkpoint, map_location=args.device)
    else:
        torch.manual_seed(args.seed)
        model = _create_model(args, experiment.num_classes).to(args.device)
        train(model, experiment.train_loader, epochs=args.epochs, lr=args.lr, device=args.device,
              seed=args.seed, progress=not args.no_progress, max_batches=args.max_train_batches)
    timings["train"] = time.perf_counter() - start
    return experiment, model, timings


def _prune_once(model, experiment, args, method: str, target: dict, finetune_epochs: int):
    from .prune import prune

    torch.manual_seed(args.seed)
    stats_data = _stats_batches(experiment.train_loader, args.stat_batches)
    finetune = _finetune_fn(experiment, args, finetune_epochs) if finetune_epochs > 0 else None
    return prune(model, stats_data, experiment.example_inputs, method=method,
                 iterative_steps=args.iterative_steps, finetune=finetune,
                 fisher_type=args.fisher_type, progress=not args.no_progress, **target)


def _target_of(args) -> dict:
    if args.target_flops is not None:
        _check_fraction(args.target_flops, "--target-flops")
        return {"target_flops": args.target_flops}
    if args.pruning_ratio is not None:
        _check_fraction(args.pruning_ratio, "--pruning-ratio")
        return {"pruning_ratio": args.pruning_ratio}
    value = 0.5 if args.target_params is None else args.target_params
    _check_fraction(value, "--target-params")
    return {"target_params": value}


def run(args) -> dict:
    """The default job: train, prune, fine-tune, report."""
    from .io import save
    from .kfac import collect_kfac
    from .plots import plot_layer_widths, plot_spectra

    from .training import evaluate

    _check_method(args.method)
    target = _target_of(args)
    _check_common(args)
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
            f"{stats_loss['after']:.4f} (measured change {change:+.4f}")
    if report.loss_units:
        line += f"; predicted by the damages: {report.predicted_damage:+.4f}"
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


def _aggregate(results: List[dict], keys=("params_fraction", "flops_fraction", "accuracy", "loss")) -> List[dict]:
    """Mean and standard deviation over seeds of every (method, target, budget) cell."""
    cells: Dict[tuple, List[dict]] = {}
    for r in results:
        cells.setdefault((r["method"], r["target_params"], r["finetune_epochs"]), []).append(r)
    return [{"method": m, "target_params": t, "finetune_epochs": b, "seeds": len(rs),
             **{k: _mean_std([r[k] for r in rs]) for k in keys}} for (m, t, b), rs in cells.items()]


def _pm(stat: Dict[str, float], fmt: str) -> str:
    return f"{format(stat['mean'], fmt)} ± {format(stat['std'], fmt)}"


def compare(args) -> dict:
    """Per seed: one trained model, the same statistics data and fine-tuning budget for every
    method and target; the table and plot show mean ± std over the seeds."""
    from .plots import plot_compare

    methods = _csv(args.methods, str, "methods")
    for m in methods:
        _check_method(m)
    targets = _csv(args.targets, float, "targets")
    for t in targets:
        _check_fraction(t, "--targets")
    budgets = _csv(args.finetune_epochs, int, "finetune-epochs")
    if any(b < 0 for b in budgets):
        raise CLIError("--finetune-epochs values must be >= 0")
    seeds = _csv(args.seeds, int, "seeds")
    _check_common(args)
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
                                    "accuracy": ev["accuracy"], "loss": ev["loss"], "seconds": seconds})
    summary = _aggregate(results)
    base = {k: _mean_std([b[k] for b in baselines]) for k in ("accuracy", "loss")}
    rows = [[r["method"], f"{r['target_params']:.2f}", str(r["finetune_epochs"]),
             f"{r['params_fraction']['mean']:.3f}", f"{r['flops_fraction']['mean']:.3f}",
             _pm({k: 100 * v for k, v in r["accuracy"].items()}, ".2f") + "%", _pm(r["loss"], ".4f")]
            for r in summary]
    print(f"\n{args.model} on {data_name}, seeds {seeds}: unpruned test accuracy "
          f"{_pm({k: 100 * v for k, v in base['accuracy'].items()}, '.2f')}%, loss {_pm(base['loss'], '.4f')}")
    print(format_table(["method", "target", "ft epochs", "params kept", "FLOPs kept", "test acc",
                        "test loss"], rows))
    out = {"config": {**vars(args), "threads": torch.get_num_threads()}, "seeds": seeds,
           "baseline": base, "baselines": baselines, "summary": summary, "results": results,
           "versions": versions()}
    with open(os.path.join(args.out, "compare.json"), "w") as fh:
        json.dump(out, fh, indent=2)
    plot_compare(summary, os.path.join(args.out, "compare.png"))
    print(f"\nwrote {args.out}/compare.json, compare.png")
    return out


def main(argv: Optional[List[str]] = None) -> int:
    """Run ``tp-eigendamage [compare] [options]``; returns the exit code (2: bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["compare"]:
            compare(build_compare_parser().parse_args(argv[1:]))
        elif argv and not argv[0].startswith("-"):
            raise CLIError(f"unknown command {argv[0]!r}{_did_you_mean(argv[0], COMMANDS)}; the commands "
                           f"are {', '.join(COMMANDS)} (or none, for the default job); see tp-eigendamage --help")
        else:
            run(build_parser().parse_args(argv))
    except CLIError as exc:
        print(f"tp-eigendamage: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
