"""``tp-eigendamage``: train → prune → fine-tune a timm model on real data, with a report.

``tp-eigendamage`` (no arguments) runs the default job on the embedded digits data;
``tp-eigendamage compare`` prunes one trained model with several methods and targets under
the same statistics data and fine-tuning budget, over several seeds.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List, Optional

import torch

from . import jobs
from ._options import FIRST_ORDERS, RANKINGS, SIDES, did_you_mean
from .errors import InvalidArgumentError, TPEigenDamageError
from .methods import METHODS

__all__ = ["main", "build_parser", "build_compare_parser", "CLIError", "COMMANDS"]

#: Subcommands (the default job has none).
COMMANDS = {"compare": "prune ONE trained model with several methods, targets and seeds"}


class CLIError(InvalidArgumentError):
    """A bad command line or environment, reported in one line before any long work."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        prefix = "unrecognized arguments: "
        if message.startswith(prefix):
            options = [o for action in self._actions for o in action.option_strings]
            message += "".join(did_you_mean(word.split("=")[0], options)
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
    p.add_argument("--ranking", choices=RANKINGS, default=None,
                   help="global channel order: by damage, or by damage per unit of the budgeted cost "
                        "(FLOPs, or parameters for a parameter target); default: damage_per_cost for "
                        "FLOPs and latency targets with the second-order methods, damage otherwise")
    p.add_argument("--side", choices=SIDES, default=None,
                   help="second-order methods: which layers of a channel group carry its damage "
                        "(prune(criterion_options={'side': ...})); default: the method's")
    p.add_argument("--first-order", choices=FIRST_ORDERS, default=None,
                   help="second-order methods: the damages' first-order term -G.w (positive part, "
                        "signed, or off: the paper's damage); default: the method's")
    p.add_argument("--no-recalibrate-bn", action="store_true",
                   help="keep the BatchNorm running statistics of the kept channels instead of "
                        "re-estimating them on the statistics batches after each round")
    p.add_argument("--iterative-steps", type=int, default=1)
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the data split, initialisation, batch order and label sampling")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--checkpoint", default=None,
                   help="start from a model saved with tp_eigendamage.save instead of training")
    p.add_argument("--max-train-batches", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty --out folder (replacing files of the same name)")


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
    target.add_argument("--target-latency", type=float, default=None,
                        help="share of the original model's measured latency to KEEP (batch 1 "
                             "on --device; each trial of the search is timed)")
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
        raise CLIError(f"unknown timm model {args.model!r}{did_you_mean(args.model, timm.list_models())}; "
                       "see timm.list_models()")
    for name in ("image_size", "epochs", "batch_size", "stat_batches", "iterative_steps"):
        value, least = getattr(args, name), (0 if name == "epochs" else 1)
        if value < least:
            raise CLIError(f"--{name.replace('_', '-')} must be >= {least}, got {value}")
    if args.data != "digits" and not os.path.isdir(args.data):
        raise CLIError(f"--data {args.data!r} is neither 'digits' nor an existing folder")
    if args.data == "digits" and args.image_size < 8:
        raise CLIError(f"--image-size {args.image_size} is smaller than the 8x8 digits; use 8 or more (e.g. 32)")
    if args.checkpoint is not None and not os.path.isfile(args.checkpoint):
        raise CLIError(f"--checkpoint {args.checkpoint!r} does not exist")
    args.device = _device(args.device)
    _check_out(args.out, args.overwrite)


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if not (name == "cpu" or name.startswith("cuda")):
        raise CLIError(f"--device {name!r}: use cpu, cuda, cuda:N or auto")
    return name


def _check_out(path: str, overwrite: bool) -> None:
    """``--out`` must be new or empty (unless ``--overwrite``), and writable."""
    entries = sorted(os.listdir(path)) if os.path.isdir(path) else []
    if entries and not overwrite:
        raise CLIError(f"--out {path!r} is not empty (it holds {', '.join(entries[:3])}"
                       f"{', ...' if len(entries) > 3 else ''}); choose another folder or pass --overwrite")
    _check_writable(path)


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
        raise CLIError(f"unknown method {method!r}{did_you_mean(method, METHODS)}; choose one of "
                       f"{', '.join(METHODS)}")


def _check_fraction(value: float, flag: str) -> None:
    if not 0 < value < 1:
        raise CLIError(f"{flag} {value} must be strictly between 0 and 1")


def _target_of(args) -> Dict[str, float]:
    for name in ("target_flops", "target_latency"):
        if getattr(args, name) is not None:
            _check_fraction(getattr(args, name), f"--{name.replace('_', '-')}")
            return {name: getattr(args, name)}
    if args.pruning_ratio is not None:
        _check_fraction(args.pruning_ratio, "--pruning-ratio")
        return {"pruning_ratio": args.pruning_ratio}
    value = 0.5 if args.target_params is None else args.target_params
    _check_fraction(value, "--target-params")
    return {"target_params": value}


def _run(args) -> None:
    _check_method(args.method)
    target = _target_of(args)
    if args.finetune_epochs < 0:
        raise CLIError(f"--finetune-epochs must be >= 0, got {args.finetune_epochs}")
    _check_common(args)
    jobs.run(args, target)


def _compare(args) -> None:
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
    jobs.compare(args, methods, targets, budgets, seeds)


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


def main(argv: Optional[List[str]] = None) -> int:
    """Run ``tp-eigendamage [compare] [options]``; returns the exit code (2: bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["compare"]:
            _compare(build_compare_parser().parse_args(argv[1:]))
        elif argv and not argv[0].startswith("-"):
            raise CLIError(f"unknown command {argv[0]!r}{did_you_mean(argv[0], COMMANDS)}; the commands "
                           f"are {', '.join(COMMANDS)} (or none, for the default job); see tp-eigendamage --help")
        else:
            _run(build_parser().parse_args(argv))
    except InvalidArgumentError as exc:   # bad input: the command line, files, data
        print(f"tp-eigendamage: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except TPEigenDamageError as exc:     # e.g. an unreachable target
        print(f"tp-eigendamage: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
