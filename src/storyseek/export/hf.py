"""`storyseek export`: a checkpoint -> a Hugging Face `transformers` DeepseekV3 model directory.

    OUT/config.json              DeepseekV3Config (model_type deepseek_v3), every dimension mapped
    OUT/model.safetensors        HF names, one key set per expert, MTP as model.layers.{n_layer}
    OUT/generation_config.json   eos/bos = our end-of-text id, padded vocabulary rows suppressed
    OUT/tokenizer.json           HF `tokenizers` file encoding exactly as our tokenizer (specials included)
    OUT/tokenizer_config.json    so AutoTokenizer.from_pretrained(OUT) builds it
    OUT/tokenizer.storyseek.json our own description (storyseek reads the directory back with it)
    OUT/README.md                the model card (+ training_metrics.png when the run has one)

The directory is built in a temporary sibling and renamed into place, so OUT is never half-written.
Names and config live in `train/hf_checkpoint.py`, which also reads such a directory back.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from pathlib import Path

from ..data.template import END, SPECIAL_TOKENS
from ..data.tokenizer import HF_TOKENIZER_FILE, TOKENIZER_FILE, Tokenizer
from ..errors import StoryseekError
from ..model import ModelConfig
from ..train.checkpoint import load_checkpoint
from ..train.hf_checkpoint import CONFIG_FILE, WEIGHTS_FILE, check_exportable, hf_config, to_hf_tensors

GENERATION_CONFIG_FILE = "generation_config.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CARD_FILE = "README.md"
PLOT_FILE = "training_metrics.png"


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

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir()  # not mkdtemp: the export gets the user's usual permissions, not 0700
    try:
        write_model_dir(tmp, state, cfg, tokenizer, run_dir, repo_id=push_to_hub)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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
    _fsync(directory / WEIGHTS_FILE, chmod=True)  # safetensors creates it 0600
    _write_text(directory / HF_TOKENIZER_FILE, hf_tokenizer_json(tokenizer))
    _write_json(directory / TOKENIZER_CONFIG_FILE, tokenizer_config(tokenizer, cfg.block_size))
    _write_text(directory / TOKENIZER_FILE, json.dumps(tokenizer.to_dict()))
    plot = run_dir / PLOT_FILE
    if plot.is_file():
        shutil.copyfile(plot, directory / PLOT_FILE)
        _fsync(directory / PLOT_FILE)
    _write_text(directory / CARD_FILE, model_card(state, cfg, tokenizer, run_dir, repo_id=repo_id,
                                                  has_plot=plot.is_file()))


def generation_config(cfg: ModelConfig, tokenizer: Tokenizer) -> dict:
    """Decode as `storyseek generate` does: stop where it stops (end of text, or a template marker
    that would begin a new document) and never emit the embedding's padding rows (ids >= the tokenizer's)."""
    from ..generate.text import stop_ids

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


# --------------------------------------------------------------------------------- tokenizer
def hf_tokenizer_json(tokenizer: Tokenizer) -> str:
    """A `tokenizers` JSON that gives exactly our ids: the trained BPE already is one; GPT-2 is
    rebuilt from tiktoken's ranks, as transformers' TikTokenConverter does, with our special tokens."""
    if tokenizer.spec != "gpt2":
        return tokenizer.to_dict()["tokenizer_json"]
    import tiktoken
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFTokenizer

    enc = tiktoken.get_encoding("r50k_base")  # already loaded (and checked) by our GPT2Tokenizer
    ranks = enc._mergeable_ranks
    char = _bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(char[x] for x in b)

    # tiktoken merges the adjacent pair whose concatenation has the lowest rank; a BPE merge list
    # ordered by the rank of the merged token reproduces that. ignore_merges: a pre-token that is
    # itself in the vocabulary is taken whole, as tiktoken does.
    merges = []
    for token, rank in ranks.items():
        splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        merges += [(rank, ranks[a], ranks[b], a, b) for a, b in splits]
    merges.sort()
    bpe = models.BPE({text(t): r for t, r in ranks.items()}, [(text(a), text(b)) for *_, a, b in merges],
                     fuse_unk=False, ignore_merges=True)
    tok = HFTokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(enc._pat_str), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = sorted(tokenizer.special_ids.items(), key=lambda kv: kv[1])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t, _ in specials])
    wrong = [t for t, i in specials if tok.token_to_id(t) != i]
    if wrong:
        raise StoryseekError(f"cannot give {wrong[0]} its id {tokenizer.special_ids[wrong[0]]} in tokenizer.json")
    return tok.to_str()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE works on these characters)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


# -------------------------------------------------------------------------------- file system
def _check_out_dir(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise StoryseekError(f"output path {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise StoryseekError(f"output directory {out} is not empty; use --force to replace it")


def _replace_dir(new: Path, out: Path) -> None:
    """Put `new` at `out`; an existing `out` is moved aside first and deleted only once `new` is in place."""
    if not out.exists():
        os.replace(new, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    os.replace(out, old / out.name)
    os.replace(new, out)
    shutil.rmtree(old, ignore_errors=True)


def _write_json(path: Path, obj: dict) -> None:
    _write_text(path, json.dumps(obj, indent=2) + "\n")


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync(path: Path, chmod: bool = False) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    if chmod:
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(path, 0o666 & ~mask)
