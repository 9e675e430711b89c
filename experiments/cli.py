"""`specroll`: one command line over the experiment entry points.

Each subcommand lives in its own module, imported only when it runs, so `specroll --help` is fast
and works in a checkout where some of them are missing. Commands that take a run config accept
`--config PRESET_OR_PATH` and `key.sub=value` overrides (experiments/config.py); the others
(bench, plot, compare, sweep) own their flags and get the rest of the command line as-is.
A config or data error the user can fix prints `error: <message>` and exits 2, without a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import textwrap
from dataclasses import dataclass

EXIT_USAGE = 2  # bad config / data / arguments: the user can fix it
EXIT_MISSING = 3  # the command's module is not in this installation


@dataclass(frozen=True)
class Command:
    module: str
    func: str  # "run" takes a Config; "main" takes the remaining argv; "show_config" is here
    summary: str  # one line, for `specroll --help`
    description: str  # one paragraph, for `specroll <cmd> --help`
    examples: str

    @property
    def takes_config(self) -> bool:
        """--config and key=value overrides; otherwise the module parses its own flags."""
        return self.func in ("run", "show_config")


COMMANDS: dict[str, Command] = {
    "train": Command(
        "experiments.train", "run", "RL-train a policy with speculative rollouts (GRPO/PPO)",
        "Run RL training: rollout workers generate with the policy's draft heads and exact rejection "
        "sampling, the learner updates the policy, and the heads are re-fitted when acceptance drops. "
        "Writes the resolved config, metrics and checkpoints to out_dir/name; resume=RUN_DIR continues "
        "a run.",
        "specroll train\n"
        "specroll train spec.mode=off train.steps=5 name=no-spec\n"
        "specroll train --config smollm2-gsm8k ray.address=auto"),
    "pretrain": Command(
        "experiments.pretrain", "run", "supervised warm-up of the tiny policy on the task",
        "Pre-train (supervised fine-tune) the policy on worked task answers so RL starts from a model "
        "that gets some rewards; the tiny policy learns a built-in task (arith, longtail) on a CPU in minutes. "
        "It is saved in Hugging Face format under $SPECROLL_CACHE/models/tiny-<task>-<hash> (default "
        "~/.cache/specroll), where `specroll train` (model.name=tiny) finds it; train builds it when missing.",
        "specroll pretrain\n"
        "specroll pretrain pretrain.steps=200 pretrain.target_accuracy=0.7\n"
        "specroll pretrain --config longtail"),
    "fit-heads": Command(
        "experiments.fit_heads", "run", "fit draft heads to a frozen policy",
        "Fit the draft (MTP) heads to a frozen policy's own sampling distributions on its rollouts, "
        "with the loss in fit.loss (TV maximises acceptance; a KL warm-up helps fresh heads), and "
        "save them for heads_path=... in later runs.",
        "specroll fit-heads\n"
        "specroll fit-heads heads.kind=sequential fit.loss=e2e_tv fit.steps=200"),
    "bench": Command(
        "experiments.bench", "main", "rollout throughput: speculation vs plain sampling",
        "Benchmark rollout throughput and mean accepted length, speculative against plain sampling "
        "in the same run on the same machine, and print a table of ratios (CPU timings are only "
        "ratios; GPU timings name the card). Takes its own flags, listed below.",
        "specroll bench --help\n"
        "specroll bench --model tiny --batch 1 8 64"),
    "plot": Command(
        "experiments.plots", "main", "plot acceptance, reward and throughput curves of runs",
        "Plot the metrics of one or more run directories (acceptance per depth, mean accepted length, "
        "reward, tokens/s, re-fit steps) to PNG files. Takes run directories and its own flags.",
        "specroll plot runs/default\n"
        "specroll plot runs/default runs/ablation-no-refit"),
    "compare": Command(
        "experiments.compare", "main", "compare runs side by side in a table",
        "Print a table comparing run directories: final reward, mean accepted length, rollout "
        "speedup against a speculation-off baseline, wall time. Takes run directories and its own "
        "flags.",
        "specroll compare runs/default runs/baseline-off\n"
        "specroll compare runs/*"),
    "sweep": Command(
        "experiments.sweep", "main", "run a grid of configs as Ray Tune trials",
        "Sweep config values: each trial is a `specroll train` run with overrides drawn from a grid, "
        "scheduled as Ray Tune trials on the local or a running cluster (ray.address=auto). Takes "
        "its own flags.",
        "specroll sweep --help\n"
        "specroll sweep --config default spec.mode=off,fixed,entropy refit.schedule=never,on_drop"),
    "config": Command(
        "experiments.cli", "show_config", "print the resolved config (preset + overrides)",
        "Print the fully resolved run config that `specroll train` would use for the same --config "
        "and overrides, after every check; a bad key or value exits 2 with the dotted key and the "
        "fix. --list-presets lists the presets in configs/.",
        "specroll config\n"
        "specroll config --config smollm2-gsm8k train.steps=5\n"
        "specroll config --list-presets"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="specroll", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Exact speculative rollouts for RL training of language models.",
        epilog="Run `specroll <command> --help` for a command's description and examples.")
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for name, cmd in COMMANDS.items():
        usage = None if cmd.takes_config else f"specroll {name} [its own arguments ...]"
        p = sub.add_parser(name, help=cmd.summary, description=textwrap.fill(cmd.description, 90), usage=usage,
                           epilog="examples:\n" + "\n".join("  " + e for e in cmd.examples.splitlines()),
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           add_help=cmd.takes_config)
        if cmd.takes_config:
            p.add_argument("--config", default="default", metavar="PRESET_OR_PATH",
                           help="a preset in configs/ (default: %(default)s) or a YAML file")
            p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                           help="config overrides, applied after the preset")
        if name == "config":
            p.add_argument("--list-presets", action="store_true", help="list the presets and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    cmd = COMMANDS[args.command]
    if rest and cmd.takes_config:
        parser.error(f"unrecognized arguments: {' '.join(rest)} (overrides look like key.sub=value)")
    from experiments.config import ConfigError
    from experiments.data import DataError
    from rollout.types import LengthError

    try:
        if args.command == "config":
            return show_config(args)
        if cmd.takes_config:
            from experiments.config import load_config

            cfg = load_config(args.config, args.overrides)  # fail on a bad config before importing torch
            check_data(cfg)  # and on bad data before a model is loaded or converted
            entry = _entry(args.command)
            # train re-applies the command line's overrides on top of a resumed run's saved config
            result = entry(cfg, args.overrides) if args.command == "train" else entry(cfg)
        elif {"-h", "--help"} & set(rest):
            return _passthrough_help(parser, args.command)
        else:
            result = _entry(args.command)(rest)
    except (ConfigError, DataError, LengthError) as e:
        # from a Ray worker the error arrives wrapped (it is still a LengthError): show its cause
        print(f"error: {getattr(e, 'cause', None) or e}", file=sys.stderr)
        return EXIT_USAGE
    except _Missing as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_MISSING
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return result if isinstance(result, int) else 0


def show_config(args: argparse.Namespace) -> int:
    from experiments.config import format_config, list_presets, load_config

    if args.list_presets:
        print("\n".join(list_presets()))
        return 0
    cfg = load_config(args.config, args.overrides)
    check_data(cfg)
    print(format_config(cfg), end="")
    return 0


def check_data(cfg) -> None:
    """Read and check the task's data file (DataError on a missing, empty or malformed file)."""
    if cfg.task.name == "gsm8k":
        from experiments.tasks import load_task_records

        load_task_records(cfg.task)


class _Missing(Exception):
    """The module behind a subcommand, or a package it needs, is not installed."""


def _entry(command: str):
    cmd = COMMANDS[command]
    try:
        module = importlib.import_module(cmd.module)
    except ModuleNotFoundError as e:
        if e.name and cmd.module.startswith(e.name):
            raise _Missing(f"`specroll {command}` is not available: its module {cmd.module} is not in "
                           f"this installation") from None
        if e.name and e.name.split(".")[0] in ("experiments", "learner", "rollout", "spec_heads"):
            raise _Missing(f"`specroll {command}`: {cmd.module} imports {e.name}, which is not in this "
                           f"installation (an incomplete checkout?)") from None
        raise _Missing(f"`specroll {command}` needs the package {e.name!r}, which is not installed; "
                       f"install it (pip install {e.name}) or use another command") from None
    func = getattr(module, cmd.func, None)
    if func is None:
        raise _Missing(f"`specroll {command}`: {cmd.module} has no {cmd.func}() entry point")
    return func


def _passthrough_help(parser: argparse.ArgumentParser, command: str) -> int:
    """Our description and examples, then the module's own flags (when it is installed)."""
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    action.choices[command].print_help()
    try:
        func = _entry(command)
    except _Missing as e:
        print(f"\n({e})")
        return 0
    print(f"\noptions of {COMMANDS[command].module}:", flush=True)
    try:
        func(["--help"])
    except SystemExit as e:  # argparse exits after printing help
        return e.code if isinstance(e.code, int) else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
