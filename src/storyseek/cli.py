"""The `storyseek` command: argument parsing only.

Each subcommand is declared in its own `_add_<name>` function and hands the parsed arguments to
one function of the stage it belongs to (imported lazily, so `storyseek --help` stays instant).
Every expected failure is a `StoryseekError`, printed here as one line on stderr with exit code 1.
"""

from __future__ import annotations

import argparse
import sys

from .errors import StoryseekError


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line on stderr (not a usage dump) and exit code 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="print a model preset: config, parameter counts, KV cache bytes")
    p.add_argument("--preset", default="default", help="model preset (default: default)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")

    def run(args):
        from .model.info import info_command

        info_command(args.preset, as_json=args.json)

    p.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="storyseek",
        description="Train and run small DeepSeek-V3-architecture models (MLA, DeepSeekMoE, MTP) "
        "that write children's stories.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"storyseek {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for add in (_add_info,):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except StoryseekError as e:
        print(f"storyseek: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("storyseek: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
