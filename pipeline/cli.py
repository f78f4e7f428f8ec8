"""`controlforge` console script: one subcommand per job."""

from __future__ import annotations

import argparse
import importlib
import sys

#: name -> (module, one-line help, function adding its flags, function running it)
COMMANDS = {
    "build": ("pipeline.build", "images -> captions -> conditions -> WebDataset shards", "build_parser", "run_from_args"),
    "preview": ("pipeline.preview", "draw a contact sheet of a build", "add_arguments", "run_from_args"),
    "report": ("pipeline.report", "write OUT/report.html: counts, rejections, timings, histograms, a sample grid",
               "add_arguments", "run_from_args"),
    "verify": ("pipeline.verify", "check every shard of a build against its manifest", "add_arguments", "run_from_args"),
    "publish": ("pipeline.publish", "export a build as a Hugging Face dataset (folder or Hub)", "add_arguments",
                "run_from_args"),
    "train": ("train.cli", "train a ControlNet on a build's shards (torchrun / accelerate / Ray Train for DDP)",
              "add_arguments", "run_from_args"),
    "sample": ("train.sample_cli", "sample trained ControlNets (prompt modes, guidance weighting)",
               "add_sample_arguments", "run_sample_from_args"),
    "eval": ("train.sample_cli", "controllability of samples: re-annotate and compare with the condition",
             "add_eval_arguments", "run_eval_from_args"),
}


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="controlforge", description="Build ControlNet training sets, publish them, "
                                     "train ControlNets on them and sample them.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text, add_name, run_name) in COMMANDS.items():
        module = importlib.import_module(module_name)
        command = sub.add_parser(name, help=help_text, description=module.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
        getattr(module, add_name)(command)
        command.set_defaults(func=getattr(module, run_name))
    return parser


def exit_on_sigterm() -> None:
    """SIGTERM (`kill`, `ray job stop`, a scheduler) unwinds like Ctrl-C: locks are released
    and the embedded Ray cluster is shut down by its exit hook instead of being orphaned."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    if argv is None:  # as a program, not called from Python
        exit_on_sigterm()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
