"""Our checkpoint file (`.pt`): one self-contained file per save, written atomically, read without pickles.

A checkpoint is a dict that `torch.load(..., weights_only=True)` accepts:

    format          "storyseek-checkpoint"
    version         CHECKPOINT_VERSION
    model_config    ModelConfig.to_dict()
    tokenizer       Tokenizer.to_dict(): generation needs nothing else
    model           the model's state_dict (MoE biases included: they are buffers)
    iter            optimizer steps taken
    ... and whatever training adds (optimizer, RNG states, losses, its own config)

Training writes these files and generation, export and `--init-from` read them; the format lives
below all three so that loading a model for inference never goes through the training package.
A training run's directory also holds the metrics log and plot, named here for the same reason
(the model card reads them).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

from ..errors import StoryseekError
from ..files import atomic_write
from ..model import ModelConfig, Transformer

CHECKPOINT_FORMAT = "storyseek-checkpoint"
CHECKPOINT_VERSION = 1
# A training run's directory (`storyseek train --out`): checkpoints beside the metrics log and plot.
LATEST, BEST, FINAL = "latest.pt", "best_model.pt", "final_model.pt"
METRICS_CSV, METRICS_PLOT = "training_log.csv", "training_metrics.png"


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Write `state` atomically: a crash at any moment leaves the old file or the new one, never a torn one."""
    with atomic_write(path) as f:
        torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}, f)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint with `weights_only=True`; a clear StoryseekError for anything else.

    A directory is read as an exported Hugging Face DeepseekV3 model (`storyseek export`, or one
    `transformers` saved) into the same dict: model_config, tokenizer, model, iter.
    """
    path = Path(path)
    if path.is_dir():
        from .hf import is_hf_dir, load_hf_dir

        if not is_hf_dir(path):
            raise StoryseekError(f"{path} is a directory without config.json: "
                                 "neither a checkpoint file nor an exported model directory")
        return load_hf_dir(path)
    if not path.is_file():
        raise StoryseekError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated file, not a torch file, or a pickle with arbitrary objects
        reason = ("it holds Python objects that safe loading (weights_only) refuses"
                  if "weights only" in str(e).lower() else "corrupt, truncated or not a PyTorch file")
        raise StoryseekError(f"{path} is not a readable storyseek checkpoint: {reason}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise StoryseekError(f"{path} is not a storyseek checkpoint (no '{CHECKPOINT_FORMAT}' marker)")
    if state.get("version", 0) > CHECKPOINT_VERSION:
        raise StoryseekError(f"{path} was written by a newer storyseek (checkpoint version {state['version']}); upgrade storyseek")
    return state


class _SkipInit(TorchFunctionMode):
    """torch.nn.init's random initializations as no-ops, for a model whose every weight is about to
    be overwritten by a strict load_state_dict: building the default preset on a CPU spends 0.8 s
    drawing random numbers otherwise. (Building on the meta device instead costs more: its init
    kernels import torch._dynamo.)"""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__module__", None) == "torch.nn.init" and func.__name__.endswith("_"):
            return args[0] if args else kwargs["tensor"]  # the tensor, left as allocated
        return func(*args, **(kwargs or {}))


def model_from_checkpoint(state: dict, device: str | torch.device = "cpu") -> Transformer:
    """Rebuild the model a checkpoint describes and load its weights (strictly: every tensor must match)."""
    cfg = ModelConfig.from_dict(state["model_config"])
    with _SkipInit():
        model = Transformer(cfg)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise StoryseekError(f"checkpoint weights do not match its model config ({first})") from None
    return model.to(device)


def load_pretrained(path: str | Path) -> dict:
    """Weights to start training from (`storyseek train --init-from PATH`), as a checkpoint-shaped
    dict with at least model_config and model (and tokenizer when known).

    Reads storyseek checkpoint files and exported Hugging Face DeepseekV3 directories (ours, or one
    `transformers` saved): `load_checkpoint` handles both."""
    path = Path(path)
    if path.is_dir() and not (path / "config.json").is_file():
        raise StoryseekError(f"--init-from {path}: a directory without config.json; give a storyseek checkpoint "
                             f"file (e.g. {path}/{BEST}) or an exported model directory")
    state = load_checkpoint(path)
    return {k: state[k] for k in ("model_config", "model", "tokenizer") if k in state}
