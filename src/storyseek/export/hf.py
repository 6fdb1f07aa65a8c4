"""`storyseek export`: a checkpoint -> a Hugging Face `transformers` DeepseekV3 model directory.

    OUT/config.json              DeepseekV3Config (model_type deepseek_v3), every dimension mapped
    OUT/model.safetensors        HF names, one key set per expert, MTP as model.layers.{n_layer}
    OUT/generation_config.json   eos/bos = our end-of-text id, padded vocabulary rows suppressed
    OUT/tokenizer.json           HF `tokenizers` file encoding exactly as our tokenizer (specials included)
    OUT/tokenizer_config.json    so AutoTokenizer.from_pretrained(OUT) builds it
    OUT/tokenizer.storyseek.json our own description (storyseek reads the directory back with it)
    OUT/README.md                the model card (+ training_metrics.png when the run has one)

The directory is built in a temporary sibling and renamed into place, so OUT is never half-written.
Names and config live in `checkpoint/hf.py`, which also reads such a directory back.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..checkpoint import load_checkpoint
from ..checkpoint.hf import CONFIG_FILE, WEIGHTS_FILE, check_exportable, hf_config, to_hf_tensors
from ..checkpoint.pt import METRICS_PLOT
from ..data.template import END, SPECIAL_TOKENS
from ..data.tokenizer import HF_TOKENIZER_FILE, TOKENIZER_FILE, Tokenizer, hf_tokenizer_json, stop_ids
from ..errors import StoryseekError
from ..files import atomic_dir, fsync_path, write_atomic
from ..model import ModelConfig

GENERATION_CONFIG_FILE = "generation_config.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CARD_FILE = "README.md"


def export_model(model: str | Path, out: str | Path, *, push_to_hub: str | None = None, private: bool = False,
                 force: bool = False) -> Path:
    """Export checkpoint (or exported directory) `model` to the directory `out`; optionally push it.

    Refuses a non-empty `out` unless `force` (then replaces it whole). Returns `out`.
    """
    out = Path(out)
    if push_to_hub:
        from .hub import check_can_push

        check_can_push(push_to_hub)  # before the slow part: a bad repo id or no login fails now
    _check_out_dir(out, force)
    state = load_checkpoint(model)
    cfg = ModelConfig.from_dict(state["model_config"])
    check_exportable(cfg)
    tokenizer = Tokenizer.from_dict(state["tokenizer"])
    run_dir = Path(model).parent if Path(model).is_file() else Path(model)

    with atomic_dir(out) as tmp:
        write_model_dir(tmp, state, cfg, tokenizer, run_dir, repo_id=push_to_hub)
    print(f"exported {model} -> {out} (transformers DeepseekV3ForCausalLM)")
    if push_to_hub:
        from .hub import push_folder

        url = push_folder(out, push_to_hub, private=private)
        print(f"pushed {out} -> {url}")
    return out


def write_model_dir(directory: Path, state: dict, cfg: ModelConfig, tokenizer: Tokenizer, run_dir: Path,
                    repo_id: str | None = None) -> None:
    """Write every file of the exported model into `directory` (which must exist), each fsync'ed."""
    from safetensors.torch import save_file

    from .card import model_card

    tensors = to_hf_tensors(state["model"], cfg)
    dtype = tensors["model.embed_tokens.weight"].dtype
    _write_json(directory / CONFIG_FILE, hf_config(cfg, tokenizer.eot_id, dtype, state.get("iter")))
    _write_json(directory / GENERATION_CONFIG_FILE, generation_config(cfg, tokenizer))
    save_file(tensors, directory / WEIGHTS_FILE, metadata={"format": "pt"})
    fsync_path(directory / WEIGHTS_FILE)
    write_atomic(directory / HF_TOKENIZER_FILE, hf_tokenizer_json(tokenizer))
    _write_json(directory / TOKENIZER_CONFIG_FILE, tokenizer_config(tokenizer, cfg.block_size))
    write_atomic(directory / TOKENIZER_FILE, json.dumps(tokenizer.to_dict()))
    plot = run_dir / METRICS_PLOT
    if plot.is_file():
        shutil.copyfile(plot, directory / METRICS_PLOT)
        fsync_path(directory / METRICS_PLOT)
    write_atomic(directory / CARD_FILE, model_card(state, cfg, tokenizer, run_dir, repo_id=repo_id,
                                                  has_plot=plot.is_file()))


def generation_config(cfg: ModelConfig, tokenizer: Tokenizer) -> dict:
    """Decode as `storyseek generate` does: stop where it stops (end of text, or a template marker
    that would begin a new document) and never emit the embedding's padding rows (ids >= the tokenizer's)."""
    eot = tokenizer.eot_id
    return {"bos_token_id": eot, "eos_token_id": [eot, *sorted(stop_ids(tokenizer, raw=False) - {eot})],
            "pad_token_id": eot,
            "suppress_tokens": list(range(tokenizer.vocab_size, cfg.vocab_size)) or None}


def tokenizer_config(tokenizer: Tokenizer, max_length: int) -> dict:
    """What AutoTokenizer needs beside tokenizer.json: the class and which tokens are special."""
    return {"tokenizer_class": "PreTrainedTokenizerFast", "backend": "tokenizers",
            "bos_token": END, "eos_token": END, "pad_token": END,
            "extra_special_tokens": [t for t in SPECIAL_TOKENS if t != END],
            "model_max_length": max_length, "clean_up_tokenization_spaces": False, "add_prefix_space": False}


# -------------------------------------------------------------------------------- file system
def _check_out_dir(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise StoryseekError(f"output path {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise StoryseekError(f"output directory {out} is not empty; use --force to replace it")


def _write_json(path: Path, obj: dict) -> None:
    write_atomic(path, json.dumps(obj, indent=2) + "\n")
