"""`kdkit` command line: a thin skin over the Python API in `kdkit.pipelines`.

    kdkit demo [overrides...] [--resume]          Fashion-MNIST: teacher, scratch/KD/DKD students, report
    kdkit run CONFIG [overrides...] [--resume]    any validated YAML config (classifier, LM or text)
    kdkit eval RUN_DIR                            re-evaluate a finished run and rewrite its report
    kdkit cache CONFIG [overrides...] [--only N]  run an LM config's teacher once: its logit caches
    kdkit methods                                 every registered method, objective and divergence
    kdkit limit MODEL --texts FILE --widths W...  predict the narrowest student (minimum-width theorem)

Overrides are `key.sub=value` (YAML values). A config a person must fix is refused before any
work starts with one line naming the field, and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pydantic import ValidationError

from kdkit.config import ConfigError, validation_message

EXIT_CONFIG_ERROR = 2


def _l1(text: str) -> float | str:
    """`--l1`: 'auto' or a positive number."""
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither 'auto' nor a number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"l1 must be > 0, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdkit", description="Knowledge distillation toolkit.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="distil a Fashion-MNIST CNN teacher and write a report")
    demo.add_argument("overrides", nargs="*", help="key.sub=value overrides of the demo config")
    demo.add_argument("--resume", action="store_true", help="continue from the last checkpoints")
    demo.add_argument("--output-dir", type=Path, help="run folder (default: from the config)")

    run = commands.add_parser("run", help="run a YAML config")
    run.add_argument("config", type=Path)
    run.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    run.add_argument("--resume", action="store_true", help="continue from the last checkpoints")
    run.add_argument("--output-dir", type=Path, help="run folder (default: from the config)")

    evaluate = commands.add_parser("eval", help="re-evaluate a finished run and rewrite its report")
    evaluate.add_argument("run_dir", type=Path)

    commands.add_parser("methods", help="list registered methods, objectives and divergences")

    cache = commands.add_parser(
        "cache", help="build (or finish, or repair) an LM config's teacher-logit caches"
    )
    cache.add_argument("config", type=Path)
    cache.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    cache.add_argument("--only", action="append", help="build only this cache (repeatable)")

    limit = commands.add_parser("limit", help="predict loss floors and the critical width of a student")
    limit.add_argument("model", help="teacher: a Hugging Face model folder or hub id")
    limit.add_argument(
        "--texts", type=Path, required=True, help=".txt (one per line), .csv or .jsonl with 'text'"
    )
    limit.add_argument("--widths", type=int, nargs="+", required=True, help="candidate student widths")
    limit.add_argument("--layer", type=int, default=-1, help="hidden-state index (0 = embeddings, -1 = last)")
    limit.add_argument("--out", type=Path, default=Path("limit"), help="folder for limit.json/.md/.png")
    limit.add_argument("--max-tokens", type=int, default=20_000)
    limit.add_argument("--steps", type=int, default=3000, help="sparse-autoencoder training steps")
    limit.add_argument(
        "--l1", type=_l1, default="auto",
        help="SAE sparsity penalty (standardised inputs), or 'auto' (default): the largest of 0.3, 0.1, "
        "0.03, 0.01 whose SAE explains >= 90%% of the variance",
    )
    limit.add_argument("--dictionary-size", type=int, default=None, help="SAE entries (default 8 x width)")
    limit.add_argument("--seed", type=int, default=0)
    limit.add_argument(
        "--per-dimension", action=argparse.BooleanOptionalAction, default=True,
        help="scale each activation dimension to unit variance before the SAE (default: on)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="kdkit: %(message)s", stream=sys.stderr
    )
    try:
        return _dispatch(args)
    except ValidationError as error:
        print(f"kdkit: {validation_message(error)}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except ConfigError as error:
        print(f"kdkit: {error}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except Exception as error:
        from kdkit.teachers.base import TeacherError  # a text teacher's final word (never a credential)

        if not isinstance(error, TeacherError):
            raise
        print(f"kdkit: teacher error: {error}", file=sys.stderr)
        return 1


def _dispatch(args: argparse.Namespace) -> int:
    from kdkit import api

    if args.command == "methods":
        print(api.describe_registries())
        return 0
    if args.command == "cache":
        summaries = api.cache(args.config, args.overrides, only=args.only)
        return 0 if summaries else 1

    if args.command == "limit":
        prediction = api.limit(
            args.model,
            args.texts,
            args.widths,
            out=args.out,
            layer=args.layer,
            max_tokens=args.max_tokens,
            steps=args.steps,
            l1=args.l1,
            dictionary_size=args.dictionary_size,
            seed=args.seed,
            per_dimension=args.per_dimension,
        )
        print((args.out / "limit.md").read_text(), end="")
        return 0 if prediction.num_features else 1
    if args.command == "demo":
        run_dir = api.demo(args.overrides, resume=args.resume, output_dir=args.output_dir)
    elif args.command == "run":
        run_dir = api.run(args.config, args.overrides, resume=args.resume, output_dir=args.output_dir)
    else:
        run_dir = api.evaluate(args.run_dir)
    return 0 if (run_dir / "report.html").is_file() else 1


if __name__ == "__main__":
    sys.exit(main())
