"""The `storyseek` command: argument parsing only.

Each subcommand is declared in its own `_add_<name>` function and hands the parsed arguments to
one function of the stage it belongs to (imported lazily, so `storyseek --help` stays instant).
Every expected failure is a `StoryseekError`, printed here as one line on stderr with exit code 1.
"""

from __future__ import annotations

import argparse
import os
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
    from .data.prepare import PRESETS, PrepareConfig

    p = sub.add_parser(
        "prepare",
        help="turn a dataset into tokenized train/val shards (train.bin, val.bin, meta.json)",
        description="Read stories (Hugging Face Hub, local files, FineWeb-edu, or the builtin generator), "
        "format them with the document template, tokenize, and write OUT/train.bin, OUT/val.bin, OUT/meta.json.",
    )
    _add_settings(p, PrepareConfig, presets=PRESETS)

    def run(args):
        from .data.prepare import prepare

        typed = _typed(args)
        prepare(PrepareConfig.from_preset(typed.pop("preset", None), **typed))

    p.set_defaults(func=run)


def _add_train(sub) -> None:
    from .model.config import FIELD_HELP, PRESETS
    from .train.config import TRAIN_PRESETS, TrainConfig, model_flag_fields

    p = sub.add_parser(
        "train", help="train a model on a prepared data directory (resumable, multi-GPU with torchrun)",
        description="Train on DIR (made by `storyseek prepare`) into OUT: console line and OUT/training_log.csv "
        "per evaluation, best_model.pt / ckpt_<iter>.pt / final_model.pt / latest.pt, training_metrics.png. "
        "Multi-GPU: torchrun --nproc_per_node N -m storyseek train ... "
        "Settings may also come from --config FILE (TOML, YAML or JSON, flag names as keys); flags win.",
    )
    p.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                   help="TOML, YAML or JSON file of settings (any flag by its name; flags win)")
    _add_settings(p, TrainConfig, presets=TRAIN_PRESETS, group="training", ungrouped=("data", "out", "preset"))
    m = p.add_argument_group("model (default: the preset's; fixed by the checkpoint for --resume/--init-from)")
    for flag, f in model_flag_fields():
        text, shown = FIELD_HELP[f.name], lambda v: v
        if f.name == "mtp_depth":  # --multi-token N sets mtp_depth N - 1: shown as the user types it
            text, shown = "tokens predicted per position: 2 = next token + 1 MTP depth; 1 disables MTP", lambda v: v + 1
        values = [f"default: {_shown(shown(f.default))}"] + [f"{name}: {_shown(shown(getattr(cfg, f.name)))}"
                                                    for name, cfg in PRESETS.items() if getattr(cfg, f.name) != f.default]
        text += f" ({'; '.join(values)})"
        if f.type in ("bool", bool):
            m.add_argument(f"--{flag}", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=text)
        else:
            kind = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
            m.add_argument(f"--{flag}", type=kind, default=argparse.SUPPRESS, help=text)

    def run(args):
        from .train.config import build_train_config
        from .train.loop import train

        typed = _typed(args)
        config_file = typed.pop("config", None)
        train(build_train_config(typed, config_file))

    p.set_defaults(func=run)


def _add_plot(sub) -> None:
    p = sub.add_parser("plot", help="plot a training log: OUT/training_log.csv -> OUT/training_metrics.png")
    p.add_argument("csv", metavar="CSV", help="the training_log.csv written by `storyseek train`")
    p.add_argument("--out", metavar="PNG", help="image to write (default: training_metrics.png beside the CSV)")

    def run(args):
        from .train.metrics import plot_metrics

        print(f"wrote {plot_metrics(args.csv, args.out)}")

    p.set_defaults(func=run)


def _add_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="export a checkpoint to a Hugging Face transformers model directory or a llama.cpp GGUF file",
        description="--format hf (default): write config.json, model.safetensors (MTP included), "
        "generation_config.json, tokenizer files and a model card README.md to OUT, loadable with "
        "AutoModelForCausalLM / AutoTokenizer; optionally upload OUT to the Hugging Face Hub. "
        "--format gguf: write one GGUF file (architecture deepseek2, tokenizer and story template included) "
        "that llama.cpp, llama-cpp-python, Ollama and LM Studio run; the MTP module is left out.",
    )
    p.add_argument("--model", required=True, metavar="CKPT", help="checkpoint file (e.g. out/ckpt.pt) or exported directory")
    p.add_argument("--out", required=True, metavar="PATH", help="output directory (hf: must be empty or absent) "
                   "or file (gguf, e.g. story.gguf)")
    p.add_argument("--format", choices=("hf", "gguf"), default="hf",
                   help="hf: transformers DeepseekV3 directory; gguf: llama.cpp file (default: hf)")
    p.add_argument("--gguf-type", choices=("f32", "f16", "q8_0"), default=None,
                   help="GGUF weight type; norms and the router stay f32 (default: f32)")
    p.add_argument("--force", action="store_true", help="replace an existing output (a non-empty directory or a file)")
    p.add_argument("--push-to-hub", metavar="USER/NAME", help="then upload OUT to this Hub model repository "
                   "(token from HF_TOKEN or `hf auth login`)")
    p.add_argument("--private", action="store_true", help="create the Hub repository as private")

    def run(args):
        if args.private and not args.push_to_hub:
            p.error("--private only applies with --push-to-hub")
        if args.format == "gguf":
            if args.push_to_hub:
                p.error("--push-to-hub only applies to --format hf")
            from .export.gguf import export_gguf

            export_gguf(args.model, args.out, gguf_type=args.gguf_type or "f32", force=args.force)
            return
        if args.gguf_type:
            p.error("--gguf-type only applies with --format gguf")
        from .export.hf import export_model

        export_model(args.model, args.out, push_to_hub=args.push_to_hub, private=args.private, force=args.force)

    p.set_defaults(func=run)


def _add_generate(sub) -> None:
    from .generate.config import GenerateConfig, SamplingConfig

    p = sub.add_parser(
        "generate",
        help="write stories with a trained model (latent-cache decoding, MTP speculative decoding)",
        description="Story mode (default) places --prompt in the training template and stops at the end of "
        "the story; --raw continues the text as given. The tokenizer comes from the checkpoint.",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--model", required=True, metavar="PATH", help="checkpoint file (e.g. out/best_model.pt) or exported directory")
    p.add_argument("--prompt", action="append", metavar="TEXT",
                   help="what the story is about (repeat for several prompts, decoded as one batch; default: empty, "
                   "the model invents one)")
    _add_settings(p, GenerateConfig)
    _add_settings(p, SamplingConfig)
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, dest="stream_output",
                   help="print tokens as they come (default: when stdout is a terminal and there is one story)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"),
                   help="weights and cache dtype (default: auto = bfloat16 on GPUs; on a CPU where measured faster)")
    p.add_argument("--device", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps (default: auto)")
    p.add_argument("--verbose", action="store_true",
                   help="also print the model (layers, tokenizer, dtype, device, decoding path) and the speed summary "
                   "on stderr (the summary prints without it whenever MTP speculative decoding runs, and under "
                   "--compile, where it says how long the compiling took)")

    def run(args):
        from .generate.text import generate_command

        typed = _typed(args)
        sampling = SamplingConfig(**_take(typed, SamplingConfig))
        cfg = GenerateConfig(sampling=sampling, **_take(typed, GenerateConfig))
        generate_command(typed.pop("model"), typed.pop("prompt", None) or [""], cfg, **typed)

    p.set_defaults(func=run)


def _add_eval(sub) -> None:
    from .eval.config import EvalConfig
    from .generate.config import SamplingConfig

    p = sub.add_parser(
        "eval", help="held-out loss, perplexity and bits per byte; story checks on sampled stories",
        description="Score a model (checkpoint or exported directory) per source: mean loss, perplexity and bits "
        "per byte (comparable across tokenizers) over the text tokens, the template's special tokens being "
        "context only; long documents in sliding windows. --stories N samples N stories and reports how many end "
        "by themselves, repeated 4-grams, distinct-2, length and morals.",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--model", required=True, metavar="PATH", help="checkpoint file or exported directory")
    _add_settings(p, EvalConfig)
    _add_settings(p, SamplingConfig, group="story sampling")

    def run(args):
        from .eval.command import eval_command

        typed = _typed(args)
        sampling = SamplingConfig(**_take(typed, SamplingConfig))
        eval_command(EvalConfig(**typed), sampling)

    p.set_defaults(func=run)


def _add_serve(sub) -> None:
    from .serve.config import ServeConfig

    p = sub.add_parser(
        "serve", help="the story page and an OpenAI-compatible API over one model (batches concurrent requests)",
        description="Serve the story page at / and the OpenAI-compatible API at /v1 (completions, chat completions, "
        "models) and /health. Concurrent requests share one decode batch. Needs the serve extra: "
        "pip install 'storyseek[serve]'. Stop with Ctrl-C or SIGTERM.",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--model", required=True, metavar="PATH", help="checkpoint file (e.g. out/best_model.pt) or exported directory")
    _add_settings(p, ServeConfig)

    def run(args):
        from .settings import with_env

        try:
            from .serve.app import serve_command
        except ImportError as e:
            raise StoryseekError(f"storyseek serve needs the serve extra ({e.name} is missing): "
                                 "pip install 'storyseek[serve]'") from None
        serve_command(ServeConfig(**with_env(ServeConfig, _typed(args), os.environ)))

    p.set_defaults(func=run)


def _add_demo(sub) -> None:
    from .demo import DemoConfig

    p = sub.add_parser("demo", help="offline end-to-end demo: corpus -> tokenizer -> train tiny model -> stories",
                       description="Prepare the embedded story corpus, train the tiny preset (MLA + MoE + MTP) for a few "
                       "minutes on this machine, write the log, plot and checkpoints under --out, and print two stories.")
    _add_settings(p, DemoConfig)

    def run(args):
        from .demo import run_demo
        from .settings import with_env

        run_demo(DemoConfig(**with_env(DemoConfig, _typed(args), os.environ)))

    p.set_defaults(func=run)


# ------------------------------------------------------------------------ flags from config dataclasses
def _add_settings(p: argparse.ArgumentParser, cls: type, *, presets: dict[str, dict] | None = None,
                  group: str | None = None, ungrouped: tuple[str, ...] = ()) -> None:
    """One flag per field of `cls` declared with `settings.setting` (help, choices, default shown from
    the field itself and, after it, each preset's own value). No flag has an argparse default: a
    command receives only what the user typed (`_typed`) and the dataclass supplies the rest."""
    import dataclasses

    from .settings import default_text, flag_name

    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if not meta.get("help"):
            continue
        shown = [f"default: {default_text(f)}"] if default_text(f) else []
        shown += [f"{name}: {_shown(values[f.name])}" for name, values in (presets or {}).items() if f.name in values]
        text = meta["help"] + (f" ({'; '.join(shown)})" if shown else "")
        title = None if f.name in ungrouped else meta.get("group") or group
        target = p if title is None else groups.setdefault(title, p.add_argument_group(title))
        kind = str(f.type).split(" |")[0]  # "int | None" -> "int"
        kw = {"help": text, "default": argparse.SUPPRESS}
        if kind == "bool":
            # A field that defaults to False is a switch; True or None (automatic) can be turned either way.
            kw["action"] = "store_true" if f.default is False else argparse.BooleanOptionalAction
        else:
            kw["type"] = {"int": int, "float": float, "str": str}.get(kind, str)
            kw |= {k: meta[k] for k in ("choices", "metavar") if meta.get(k)}
            if kind.startswith("tuple"):
                kw["nargs"] = "+"
        target.add_argument(f"--{flag_name(f)}", dest=f.name, **kw)


def _shown(value) -> str:
    return {True: "on", False: "off"}.get(value, str(value)) if isinstance(value, bool) else str(value)


def _typed(args: argparse.Namespace) -> dict:
    """What the user typed: every parser suppresses its defaults, so the namespace holds nothing else."""
    return {k: v for k, v in vars(args).items() if k not in ("command", "func")}


def _take(typed: dict, cls: type) -> dict:
    """Remove and return the entries of `typed` that are fields of `cls`."""
    import dataclasses

    return {f.name: typed.pop(f.name) for f in dataclasses.fields(cls) if f.name in typed}


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
    for add in (_add_info, _add_prepare, _add_train, _add_plot, _add_export, _add_generate, _add_eval, _add_serve,
                _add_demo):
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
    except BrokenPipeError:  # `storyseek ... | head`: the reader left; nothing to report
        sys.stderr.close()
        return 141
    return 0


if __name__ == "__main__":
    sys.exit(main())
