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


def _add_prepare(sub) -> None:
    p = sub.add_parser(
        "prepare",
        help="turn a dataset into tokenized train/val shards (train.bin, val.bin, meta.json)",
        description="Read stories (Hugging Face Hub, local files, FineWeb-edu, or the builtin generator), "
        "format them with the document template, tokenize, and write OUT/train.bin, OUT/val.bin, OUT/meta.json.",
    )
    src = p.add_argument_group("source")
    src.add_argument("--dataset", help="Hugging Face dataset name, or 'builtin' for the offline story generator "
                     "(default: ajibawa-2023/Children-Stories-Collection)")
    src.add_argument("--config", help="dataset configuration (subset) on the Hub")
    src.add_argument("--split", help="Hub split to read (default: train)")
    src.add_argument("--streaming", action="store_const", const=True, help="stream from the Hub instead of downloading")
    src.add_argument("--data-files", nargs="+", metavar="PATH",
                     help="local .jsonl/.json/.csv/.parquet/.txt files or globs (instead of --dataset)")
    src.add_argument("--preset", choices=["fineweb-edu"], help="fineweb-edu: HuggingFaceFW/fineweb-edu sample-10BT, "
                     "streamed, text format, English, score >= 3, 100-3000 chars, 80/20 split")
    src.add_argument("--max-docs", type=int, help="stop after N kept documents (builtin: stories to generate, default 20000)")
    src.add_argument("--max-files", type=int, help="read only the first N data files")
    src.add_argument("--seed", type=int, help="builtin generator seed (default: 0)")
    rec = p.add_argument_group("records")
    rec.add_argument("--format", choices=["story", "text"], help="story: prompt/character/story/moral template "
                     "(default); text: plain text continuation")
    rec.add_argument("--prompt-column", help="column holding the prompt (default: prompt)")
    rec.add_argument("--text-column", help="column holding the story/text (default: text)")
    rec.add_argument("--min-score", type=float, help="keep rows whose 'score' column is >= this (fineweb-edu: 3.0)")
    rec.add_argument("--min-chars", type=int, help="drop texts shorter than this (default: 32; fineweb-edu: 100)")
    rec.add_argument("--max-chars", type=int, help="drop texts longer than this (default: none; fineweb-edu: 3000)")
    rec.add_argument("--lowercase", action="store_const", const=True, help="lowercase everything (default: keep case)")
    rec.add_argument("--val-fraction", type=float, help="share of documents for validation (default: 0.05; fineweb-edu: 0.2)")
    tok = p.add_argument_group("tokenizer and output")
    tok.add_argument("--tokenizer", help="gpt2 (default) or bpe:N, a byte-level BPE of N tokens trained on the data")
    tok.add_argument("--num-proc", type=int, help="tokenizer threads (default: all cores)")
    tok.add_argument("--out", help="output directory (default: data/<dataset>-<tokenizer>)")
    tok.add_argument("--force", action="store_const", const=True, help="rebuild even if OUT holds a preparation")

    def run(args):
        from .data.prepare import PrepareConfig, prepare

        given = {k: v for k, v in vars(args).items() if k not in ("command", "func", "preset") and v is not None}
        if "data_files" in given:
            given["data_files"] = tuple(given["data_files"])
        prepare(PrepareConfig.from_preset(args.preset, **given))

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
    for add in (_add_info, _add_prepare):
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
