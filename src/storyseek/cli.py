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


def _add_train(sub) -> None:
    from .model.config import FIELD_HELP
    from .train.config import DTYPES, model_flag_fields

    p = sub.add_parser(
        "train", help="train a model on a prepared data directory (resumable, multi-GPU with torchrun)",
        description="Train on DIR (made by `storyseek prepare`) into OUT: console line and OUT/training_log.csv "
        "per evaluation, best_model.pt / ckpt_<iter>.pt / final_model.pt / latest.pt, training_metrics.png. "
        "Multi-GPU: torchrun --nproc_per_node N -m storyseek train ... "
        "Settings may also come from --config FILE (TOML or YAML, flag names as keys); flags win.",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--data", metavar="DIR", help="prepared data directory (train.bin, val.bin, meta.json)")
    p.add_argument("--out", metavar="DIR", help="output directory (default: out)")
    p.add_argument("--preset", choices=["default", "tiny"], help="model preset and its training defaults (default: default)")
    p.add_argument("--config", metavar="FILE", help="TOML or YAML file of settings (any flag; flags win)")
    t = p.add_argument_group("training")
    for flag, kind, text in (
        ("batch-size", int, "sequences per micro-step per GPU (default 12; tiny 8)"),
        ("block-size", int, "tokens per sequence: the model's context for a new model; for --resume/--init-from at "
                            "most the checkpoint's"),
        ("grad-accum", int, "micro-steps per optimizer step (default 1)"),
        ("max-iters", int, "optimizer steps (default 20000; tiny 2000)"),
        ("max-minutes", float, "stop cleanly after this many minutes: evaluate, write final_model.pt; the lr schedule "
                                 "decays over whichever of --max-iters and this ends first (default: no limit)"),
        ("learning-rate", float, "peak learning rate (default 6e-4; tiny 4e-3)"),
        ("min-lr", float, "learning rate at the end of the cosine decay (default 6e-5; tiny 4e-4)"),
        ("warmup-iters", int, "linear warmup steps (default 2000; tiny 30)"),
        ("lr-decay-iters", int, "steps of the cosine decay (default: --max-iters)"),
        ("weight-decay", float, "AdamW weight decay on matrices (default 0.1)"),
        ("beta1", float, "AdamW beta1 (default 0.9)"),
        ("beta2", float, "AdamW beta2 (default 0.95)"),
        ("grad-clip", float, "clip the gradient norm to this (default 1.0; 0 disables)"),
        ("eval-interval", int, "evaluate, log and save latest.pt every N steps (default 1000; tiny 200)"),
        ("eval-iters", int, "batches per evaluation and split (default 200; tiny 10)"),
        ("log-interval", int, "progress-bar refresh every N steps (default 10)"),
        ("checkpoint-interval", int, "write ckpt_<iter>.pt every N steps (default 2500; 0: never)"),
        ("seed", int, "random seed (default 1337)"),
        ("device", str, "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps (default: auto)"),
        ("init-from", str, "start from the weights of this checkpoint (fine-tuning)"),
        ("wandb-project", str, "W&B project (default: storyseek)"),
    ):
        t.add_argument(f"--{flag}", type=kind, help=text)
    t.add_argument("--dtype", choices=DTYPES, help="auto (default): bf16 autocast on GPUs and CPUs with "
                   "AVX512-BF16/AMX, fp16 + grad scaler on GPUs without bf16, else float32")
    for flag, text in (("compile", "torch.compile the model"), ("resume", "continue from OUT/latest.pt"),
                       ("tensorboard", "also log to OUT/tensorboard"), ("wandb", "also log to W&B (offline unless configured)")):
        t.add_argument(f"--{flag}", action="store_const", const=True, help=text)
    m = p.add_argument_group("model (default: the preset's; fixed by the checkpoint for --resume/--init-from)")
    m.add_argument("--multi-token", type=int, help="tokens predicted per position: 2 = next token + 1 MTP depth "
                   "(default 2); 1 disables MTP")
    m.add_argument("--moe-experts", type=int, help="routed experts per MoE layer (default 4)")
    for flag, f in model_flag_fields():
        if flag in ("multi-token", "moe-experts"):
            continue
        text = f"{FIELD_HELP[f.name]} (default {f.default})"
        if f.type in ("bool", bool):
            m.add_argument(f"--{flag}", action=argparse.BooleanOptionalAction, help=text)
        else:
            kind = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
            m.add_argument(f"--{flag}", type=kind, help=text)

    def run(args):
        from .train.config import build_train_config
        from .train.loop import train

        values = {k: v for k, v in vars(args).items() if k not in ("func", "command", "config")}
        train(build_train_config(values, getattr(args, "config", None)))

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
        help="export a checkpoint to a Hugging Face transformers DeepseekV3 model directory",
        description="Write config.json, model.safetensors (MTP included), generation_config.json, tokenizer "
        "files and a model card README.md to OUT, loadable with AutoModelForCausalLM / AutoTokenizer; "
        "optionally upload OUT to the Hugging Face Hub.",
    )
    p.add_argument("--model", required=True, metavar="CKPT", help="checkpoint file (e.g. out/ckpt.pt) or exported directory")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (must be empty or absent)")
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--push-to-hub", metavar="USER/NAME", help="then upload OUT to this Hub model repository "
                   "(token from HF_TOKEN or `hf auth login`)")
    p.add_argument("--private", action="store_true", help="create the Hub repository as private")

    def run(args):
        if args.private and not args.push_to_hub:
            p.error("--private only applies with --push-to-hub")
        from .export.hf import export_model

        export_model(args.model, args.out, push_to_hub=args.push_to_hub, private=args.private, force=args.force)

    p.set_defaults(func=run)


def _add_generate(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="write stories with a trained model (latent-cache decoding, MTP speculative decoding)",
        description="Story mode (default) places --prompt in the training template and stops at the end of "
        "the story; --raw continues the text as given. The tokenizer comes from the checkpoint.",
    )
    p.add_argument("--model", required=True, metavar="PATH", help="checkpoint file (e.g. out/best_model.pt) or exported directory")
    p.add_argument("--prompt", action="append", metavar="TEXT",
                   help="what the story is about (repeat for several prompts, decoded as one batch; default: empty, "
                   "the model invents one)")
    p.add_argument("--max-tokens", type=int, default=200, help="new tokens per story at most (default: 200)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 = greedy (default: 0.8)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens; 0 = off (default: 0)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass in (0, 1]; 1 = off (default: 0.9)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="> 1 discourages repeating tokens already in the text; 1 = off (default: 1.0)")
    p.add_argument("--seed", type=int, default=None, help="random seed for reproducible samples (default: random)")
    p.add_argument("--num-samples", type=int, default=1, help="stories per prompt, decoded as one batch (default: 1)")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="print tokens as they come (default: when stdout is a terminal and there is one story)")
    p.add_argument("--speculative", action=argparse.BooleanOptionalAction, default=None,
                   help="MTP self-speculative decoding (default: on when the model has MTP weights)")
    p.add_argument("--no-cache", action="store_true", help="recompute everything every token (slow reference path)")
    p.add_argument("--raw", action="store_true", help="continue the prompt as plain text, no story template")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="weights and cache dtype (default: auto = bfloat16 on GPUs that support it, else float32)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (default: auto)")
    p.add_argument("--verbose", action="store_true", help="print the model, speed and MTP acceptance on stderr")

    def run(args):
        from .generate.decode import GenerateConfig
        from .generate.sampling import SamplingConfig
        from .generate.text import generate_command

        sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                  repetition_penalty=args.repetition_penalty)
        cfg = GenerateConfig(max_tokens=args.max_tokens, sampling=sampling, seed=args.seed, num_samples=args.num_samples,
                             speculative=args.speculative, use_cache=not args.no_cache, raw=args.raw)
        generate_command(args.model, args.prompt or [""], cfg, device=args.device, dtype=args.dtype,
                         stream_output=args.stream, verbose=args.verbose)

    p.set_defaults(func=run)


def _env(name: str, default, kind):
    """A default taken from the environment (how tests and CI shrink the demo)."""
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return kind(value)
    except ValueError:
        sys.exit(f"storyseek: error: ${name} must be a number, got {value!r}")


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="offline end-to-end demo: corpus -> tokenizer -> train tiny model -> stories",
                       description="Prepare the embedded story corpus, train the tiny preset (MLA + MoE + MTP) for a few "
                       "minutes on this machine, write the log, plot and checkpoints under --out, and print two stories.")
    p.add_argument("--out", default="demo-run", help="output directory (default: demo-run)")
    p.add_argument("--minutes", type=float, default=_env("STORYSEEK_DEMO_MINUTES", 4.0, float),
                   help="training time budget in minutes (default: 4, or $STORYSEEK_DEMO_MINUTES)")
    p.add_argument("--stories", type=int, default=_env("STORYSEEK_DEMO_STORIES", 20_000, int),
                   help="stories drawn from the corpus (default: 20000, or $STORYSEEK_DEMO_STORIES)")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, ... (default: auto)")
    p.add_argument("--seed", type=int, default=1337, help="random seed (default: 1337)")
    p.add_argument("--force", action="store_true", help="start over if --out holds an earlier demo run")

    def run(args):
        from .demo import DemoConfig, run_demo

        run_demo(DemoConfig(out=args.out, minutes=args.minutes, stories=args.stories, device=args.device,
                            seed=args.seed, force=args.force))

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
    for add in (_add_info, _add_prepare, _add_train, _add_plot, _add_export, _add_generate, _add_demo):
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
