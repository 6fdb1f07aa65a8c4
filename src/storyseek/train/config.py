"""TrainConfig: every knob of `storyseek train`, its presets, and config files (TOML, YAML or JSON).

Precedence, lowest first: dataclass defaults < the preset's training values < the config file < flags.
A config file may set any flag, training or model, by its flag name (`batch_size` or `batch-size`):

    # tiny.toml
    preset = "tiny"
    batch_size = 16
    n_layer = 2          # model fields go to the model config
    multi_token = 1      # 1 disables MTP

Model fields are kept apart (`TrainConfig.model`) as only the ones the user asked for, because the
base they apply to is the preset for a fresh run but the checkpoint's config for --resume/--init-from.
No torch import here: the CLI builds its flags from these dataclasses.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import StoryseekError
from ..model.config import ModelConfig
from ..settings import setting

DTYPES = ("auto", "float32", "bfloat16", "float16")

# Model-config fields renamed for the command line (the names users of the original project know);
# value maps flag -> field. vocab_size comes from the data, block_size is a training flag too.
MODEL_FLAG_ALIASES = {"moe_experts": "n_routed_experts", "multi_token": "mtp_depth"}
_MODEL_NOT_FLAGS = ("vocab_size", "block_size")


@dataclass
class TrainConfig:
    data: str = setting("", "prepared data directory (train.bin, val.bin, meta.json)", metavar="DIR", default_text="")
    out: str = setting("out", "output directory", metavar="DIR")
    preset: str = setting("default", "model preset and its training defaults", choices=("default", "tiny"))
    model: dict = field(default_factory=dict)  # model-config fields set explicitly (flags / file)
    # batches: tokens per optimizer step = batch_size * block_size * grad_accum * world size
    batch_size: int = setting(12, "sequences per micro-step per GPU")
    block_size: int | None = setting(None, "tokens per sequence: the model's context for a new model; for "
                                           "--resume/--init-from at most the checkpoint's")
    grad_accum: int = setting(1, "micro-steps per optimizer step")
    # optimizer and schedule: AdamW, linear warmup, cosine decay to min_lr at lr_decay_iters
    max_iters: int = setting(20000, "optimizer steps")
    max_minutes: float = setting(0.0, "stop cleanly after this many minutes: evaluate, write final_model.pt; the lr "
                                      "schedule decays over whichever of --max-iters and this ends first",
                                 default_text="no limit")
    learning_rate: float = setting(6e-4, "peak learning rate")
    min_lr: float = setting(6e-5, "learning rate at the end of the cosine decay")
    warmup_iters: int = setting(2000, "linear warmup steps")
    lr_decay_iters: int | None = setting(None, "steps of the cosine decay", default_text="--max-iters")
    weight_decay: float = setting(0.1, "AdamW weight decay on matrices")
    beta1: float = setting(0.9, "AdamW beta1")
    beta2: float = setting(0.95, "AdamW beta2")
    grad_clip: float = setting(1.0, "clip the gradient norm to this; 0 disables")
    # evaluation, logging, checkpoints
    eval_interval: int = setting(1000, "evaluate, log and save latest.pt every N steps")
    eval_iters: int = setting(200, "batches per evaluation and split")
    log_interval: int = setting(10, "progress-bar refresh (and, under torchrun, the stop-signal check) every N steps")
    checkpoint_interval: int = setting(2500, "also write ckpt_<iter>.pt every N steps; 0: never")
    tensorboard: bool = setting(False, "also log to OUT/tensorboard")
    wandb: bool = setting(False, "also log to W&B (offline unless configured)")
    wandb_project: str = setting("storyseek", "W&B project")
    # system
    device: str = setting("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    dtype: str = setting("auto", "auto: bf16 autocast on GPUs (fp16 + grad scaler without bf16); on a CPU bf16 "
                                 "only where a short cached probe measures it clearly faster, else float32",
                         choices=DTYPES)
    compile: bool | None = setting(None, "torch.compile the training step and the evaluation's forward (inductor, "
                                         "GPU or CPU); the first evaluation and iteration wait for the compiling",
                                   default_text="auto: on for a CUDA GPU that triton supports (there about a minute of "
                                                "compiling, then 1.7-2.3x the eager tokens/s on an H100); on a CPU, "
                                                "on after 20 eager iterations if the rest of the run would take over "
                                                "10 minutes eagerly (on 2 cores 45-105 s of compiling, then 1.15-1.6x); off "
                                                "under torchrun on CPUs and on MPS")
    cuda_graphs: bool = setting(True, "with --compile on one CUDA GPU, replay the compiled forward and backward as "
                                      "CUDA graphs (torch.compile's reduce-overhead mode): the step no longer waits "
                                      "for its kernel launches")
    seed: int = setting(1337, "random seed")
    resume: bool = setting(False, "continue from OUT/latest.pt")
    init_from: str | None = setting(None, "start from the weights of this checkpoint or exported directory (fine-tuning)",
                                    metavar="PATH")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise StoryseekError(msg)

        for name in ("batch_size", "grad_accum", "max_iters", "eval_interval", "eval_iters", "log_interval"):
            v = getattr(self, name)
            need(isinstance(v, int) and v > 0, f"--{_flag(name)} must be a positive integer, got {v!r}")
        for name in ("warmup_iters", "checkpoint_interval"):
            need(getattr(self, name) >= 0, f"--{_flag(name)} must be >= 0, got {getattr(self, name)}")
        need(self.block_size is None or self.block_size > 1, f"--block-size must be at least 2, got {self.block_size}")
        need(self.learning_rate > 0, f"--learning-rate must be positive, got {self.learning_rate}")
        need(0 <= self.min_lr <= self.learning_rate, f"--min-lr must be between 0 and --learning-rate, got {self.min_lr}")
        need(self.weight_decay >= 0 and self.grad_clip >= 0, "--weight-decay and --grad-clip must be >= 0")
        need(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "--beta1 and --beta2 must be in [0, 1)")
        need(self.max_minutes >= 0, f"--max-minutes must be >= 0, got {self.max_minutes}")
        need(self.dtype in DTYPES, f"unknown --dtype {self.dtype!r}: choose one of {', '.join(DTYPES)}")
        need(not (self.resume and self.init_from), "--resume and --init-from exclude each other")
        model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
        unknown = sorted(set(self.model) - model_fields)
        need(not unknown, f"unknown model setting(s): {', '.join(unknown)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Training defaults per model preset: the default preset trains like the original project
# (bs 12, lr 6e-4 -> 6e-5, warmup 2000, 20K iters); tiny is sized for a CPU in minutes.
TRAIN_PRESETS: dict[str, dict] = {
    "default": {},
    "tiny": dict(batch_size=8, max_iters=2000, learning_rate=4e-3, min_lr=4e-4, warmup_iters=30,
                 eval_interval=200, eval_iters=10, checkpoint_interval=1000),
}


def _flag(name: str) -> str:
    return name.replace("_", "-")


def model_flag_fields() -> list[tuple[str, dataclasses.Field]]:
    """(flag name, ModelConfig field) for every model setting the command line exposes."""
    renamed = {v: k for k, v in MODEL_FLAG_ALIASES.items()}
    return [(_flag(renamed.get(f.name, f.name)), f) for f in dataclasses.fields(ModelConfig)
            if f.name not in _MODEL_NOT_FLAGS]


def load_config_file(path: str | Path) -> dict:
    """A TOML (.toml) or YAML (.yaml/.yml) file of flag settings -> {name_with_underscores: value}."""
    path = Path(path)
    if not path.is_file():
        raise StoryseekError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".toml":
            if sys.version_info >= (3, 11):
                import tomllib
            else:  # the same parser, before it joined the standard library
                import tomli as tomllib

            values = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text) or {}
        elif path.suffix == ".json":
            values = json.loads(text)
        else:
            raise StoryseekError(f"config file {path}: use .toml, .yaml/.yml or .json")
    except StoryseekError:
        raise
    except Exception as e:  # the parsers' own errors name the line
        raise StoryseekError(f"config file {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise StoryseekError(f"config file {path}: expected a table of settings at the top level")
    return {str(k).replace("-", "_"): v for k, v in values.items()}


def build_train_config(values: dict, config_file: str | Path | None = None) -> TrainConfig:
    """TrainConfig from explicitly given settings (`values`, e.g. the flags a user typed), on top of
    the config file, on top of the preset's training defaults. Model settings go to `.model`."""
    merged = {**(load_config_file(config_file) if config_file else {}), **values}
    preset = merged.get("preset", TrainConfig.preset)
    train_names = {f.name for f in dataclasses.fields(TrainConfig)} - {"model"}
    model_names = {f.name for f in dataclasses.fields(ModelConfig)} - set(_MODEL_NOT_FLAGS)
    train_values, model_values = dict(TRAIN_PRESETS.get(preset, {})), {}
    for name, value in merged.items():
        if name in MODEL_FLAG_ALIASES:
            name, value = MODEL_FLAG_ALIASES[name], value
            if name == "mtp_depth":  # --multi-token N predicts N tokens: MTP depth N - 1
                if not isinstance(value, int) or value < 1:
                    raise StoryseekError(f"--multi-token must be an integer >= 1 (1 disables MTP), got {value!r}")
                value -= 1
        if name in train_names:
            train_values[name] = value
        elif name in model_names:
            model_values[name] = value
        else:
            raise StoryseekError(f"unknown setting {name!r}" + (f" in {config_file}" if config_file else ""))
    try:
        return TrainConfig(**train_values, model=model_values)
    except TypeError as e:
        raise StoryseekError(f"bad training setting: {e}") from None
