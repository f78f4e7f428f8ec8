"""`controlforge` console script: one subcommand per job."""

from __future__ import annotations

import argparse
import sys

from pipeline import build, preview, publish, verify


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="controlforge", description="Build ControlNet training sets (and, later, train and sample ControlNets).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p_build = sub.add_parser("build", help="images -> captions -> conditions -> WebDataset shards",
                             description=build.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    build.build_parser(p_build)
    p_build.set_defaults(func=build.run_from_args)
    p_preview = sub.add_parser("preview", help="draw a contact sheet of a build", description=preview.__doc__)
    preview.add_arguments(p_preview)
    p_preview.set_defaults(func=preview.run_from_args)
    p_verify = sub.add_parser("verify", help="check every shard of a build against its manifest", description=verify.__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    verify.add_arguments(p_verify)
    p_verify.set_defaults(func=verify.run_from_args)
    p_publish = sub.add_parser("publish", help="export a build as a Hugging Face dataset (folder or Hub)",
                               description=publish.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    publish.add_arguments(p_publish)
    p_publish.set_defaults(func=publish.run_from_args)
    from train import cli as train_cli

    p_train = sub.add_parser("train", help="train a ControlNet on a build's shards (accelerate launch for DDP)",
                             description=train_cli.__doc__)
    train_cli.add_arguments(p_train)
    p_train.set_defaults(func=train_cli.run_from_args)
    from train import sample_cli

    p_sample = sub.add_parser("sample", help="sample trained ControlNets (prompt modes, guidance weighting)",
                              description=sample_cli.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sample_cli.add_sample_arguments(p_sample)
    p_sample.set_defaults(func=sample_cli.run_sample_from_args)
    p_eval = sub.add_parser("eval", help="controllability of samples: re-annotate and compare with the condition",
                            description=sample_cli.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sample_cli.add_eval_arguments(p_eval)
    p_eval.set_defaults(func=sample_cli.run_eval_from_args)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
