"""`spjax` command line: train, prepare-data, sweep, fit.

User errors (config, data, checkpoint, arguments) print one line `spjax: error: ...` and exit
with status 2; an interrupted training run exits with 128 + the signal number after saving.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Sequence

from spjax.errors import SpjaxError, is_disk_full, write_failure

STARTED = time.time()  # the process's start, near enough: summary.json's start-up time


def _train(args: argparse.Namespace) -> int:
    from spjax import distributed
    from spjax.config import load_config
    from spjax.train.loop import TrainingInterrupted, dry_run, train

    config = load_config(args.config, args.overrides)
    # Before anything touches devices: a multi-process run must see all processes' devices.
    distributed.initialize()
    if args.dry_run:
        dry_run(config)
        return 0
    try:
        train(config, started=STARTED)
    except TrainingInterrupted as e:
        print(f"spjax: {e}", file=sys.stderr)
        return 128 + e.signum
    return 0


def _prepare_data(args: argparse.Namespace) -> int:
    from spjax.data.prepare import prepare_dataset

    meta = prepare_dataset(args.inputs, args.out, tokenizer=args.tokenizer,
                           val_fraction=args.val_fraction, bpe_vocab_size=args.vocab_size,
                           seed=args.seed, overwrite=args.overwrite)
    counts = ", ".join(f"{split} {info['tokens']:,}" for split, info in meta["splits"].items())
    print(f"spjax: prepared {args.out}: tokens {counts}; vocabulary {meta['vocab_size']}, "
          f"unigram entropy {meta['unigram_entropy_nats']:.3f} nats")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spjax", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train (or resume) a model")
    train.add_argument("config", help="YAML config, e.g. configs/tiny.yaml")
    train.add_argument("overrides", nargs="*", metavar="key=value",
                       help="dotted overrides, e.g. run_dir=runs/a train.steps=100 model=60m")
    train.add_argument("--dry-run", action="store_true",
                       help="print parameter and optimizer memory per structure, then exit")
    train.set_defaults(run=_train)

    prep = commands.add_parser("prepare-data", help="tokenize text into training shards")
    prep.add_argument("inputs", nargs="+", metavar="INPUT",
                      help="text files, globs, directories, or JSONL files with a 'text' field")
    prep.add_argument("--out", required=True, help="output dataset directory")
    prep.add_argument("--tokenizer", default="byte",
                      help="'byte' (default), 'bpe' (train one here), or a tokenizer.json path")
    prep.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size")
    prep.add_argument("--val-fraction", type=float, default=0.01,
                      help="fraction of documents held out for validation")
    prep.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    prep.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    prep.set_defaults(run=_prepare_data)

    from spjax.sweep.commands import add_parsers  # sweep and fit; light imports only

    add_parsers(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come on either side of options (`train C.yaml --dry-run a=1 b=2`):
    # argparse stops collecting positionals at the first option, so gather the rest here.
    args, rest = parser.parse_known_args(argv)
    stray = [item for item in rest if item.startswith("-") or "=" not in item]
    if stray or (rest and args.command != "train"):
        parser.error(f"unrecognized arguments: {' '.join(stray or rest)}")
    if rest:
        args.overrides = [*args.overrides, *rest]
    # Quiet TensorFlow-style C++ logs from XLA unless the user asked for them.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        return args.run(args)
    except SpjaxError as e:
        print(f"spjax: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk where no error of ours names it (config.yaml, shards)
        if not is_disk_full(e):
            raise
        print(f"spjax: error: {write_failure(e.filename or 'a file', e)}, then run the same "
              f"command again", file=sys.stderr)
        return 2


def run() -> None:
    """Console-script entry point."""
    code = main()
    if code == 2:
        # A user error may leave library threads mid-flight (a failed orbax restore has pending
        # tensorstore reads) that print 'Event loop is closed' tracebacks during interpreter
        # teardown. Nothing is left to save, so leave without it: the message stays one line.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
