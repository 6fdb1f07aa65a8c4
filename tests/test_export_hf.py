"""storyseek export -> transformers DeepseekV3: identical logits, import back, round trip, bad inputs."""

import json

import pytest
import torch

from storyseek.cli import main
from storyseek.data.tokenizer import BPETokenizer
from storyseek.errors import StoryseekError
from storyseek.export.hf import export_model
from storyseek.model import Transformer, get_preset, pad_vocab
from storyseek.checkpoint import load_checkpoint, load_pretrained, model_from_checkpoint

from helpers import random_model, write_ckpt

transformers = pytest.importorskip("transformers")

TEXTS = ["Once upon a time there was a little fox who loved the moon.",
         "The brave mouse said: \"I will find the cheese!\" and ran into the dark forest.",
         "Lily and Tom played in the park. They were happy and kind to each other."] * 20


@pytest.fixture(scope="module")
def bpe():
    return BPETokenizer.train(400, TEXTS)


def hf_logits(directory, idx, attn="sdpa"):
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation=attn)
    with torch.no_grad():
        return hf.eval()(idx).logits


TINY_VARIANTS = {
    "tiny": dict(),
    "tiny-no-dense-qlora": dict(n_dense_layers=0, q_lora_rank=32),
    "tiny-2dense-untied-nomtp": dict(n_layer=3, n_dense_layers=2, tie_embeddings=False, mtp_depth=0),
    "tiny-dense-nomtp": dict(ffn="dense", mtp_depth=0),  # the --ffn dense baseline exports (first_k_dense_replace = n_layer)
    "tiny-shared0-scale": dict(n_layer=2, n_shared_experts=0, route_scale=2.5, n_routed_experts=6, n_activated_experts=3),
}


@pytest.mark.parametrize("variant", sorted(TINY_VARIANTS))
def test_tiny_logits_equal_transformers(variant, bpe, tmp_path):
    cfg = get_preset("tiny").replace(vocab_size=pad_vocab(bpe.vocab_size), **TINY_VARIANTS[variant])
    model = random_model(cfg)
    export_model(write_ckpt(tmp_path / "ckpt.pt", model, bpe), tmp_path / "hf")
    idx = torch.randint(0, bpe.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(idx).logits
    # eager attention as well: it breaks if num_key_value_heads were not n_head
    attn = "eager" if variant == "tiny" else "sdpa"
    diff = (hf_logits(tmp_path / "hf", idx, attn) - ours).abs().max().item()
    assert diff <= 1e-4, f"{variant}: max abs logit diff {diff}"


@pytest.fixture(scope="module")
def default_export(tmp_path_factory):
    """The default preset (GPT-2 tokenizer, 6 x 512, MTP) exported once for several tests."""
    from storyseek.data.tokenizer import GPT2Tokenizer

    root = tmp_path_factory.mktemp("default")
    tok = GPT2Tokenizer()
    model = random_model(get_preset("default"))
    export_model(write_ckpt(root / "ckpt.pt", model, tok), root / "hf")
    return model, tok, root / "hf"


@pytest.mark.slow
def test_default_preset_logits_equal_transformers(default_export):
    model, tok, directory = default_export
    idx = torch.randint(0, tok.vocab_size, (2, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model(idx).logits
    diff = (hf_logits(directory, idx) - ours).abs().max().item()
    assert diff <= 1e-4, f"default preset: max abs logit diff {diff}"


def test_export_files_and_config(default_export):
    model, tok, directory = default_export
    names = {p.name for p in directory.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "tokenizer.storyseek.json", "README.md"} <= names
    c = json.loads((directory / "config.json").read_text())
    assert c["model_type"] == "deepseek_v3" and c["architectures"] == ["DeepseekV3ForCausalLM"]
    assert c["num_key_value_heads"] == c["num_attention_heads"] == 8
    assert (c["n_group"], c["topk_group"], c["bos_token_id"], c["eos_token_id"]) == (1, 1, 50256, 50256)
    assert c["num_nextn_predict_layers"] == 1 and c["tie_word_embeddings"] and c["rope_interleave"]
    g = json.loads((directory / "generation_config.json").read_text())
    assert g["eos_token_id"][0] == 50256 and g["suppress_tokens"] == list(range(tok.vocab_size, 50304))
    from safetensors import safe_open

    with safe_open(directory / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.layers.1.mlp.experts.3.gate_proj.weight" in keys  # one key set per expert
    assert "lm_head.weight" not in keys  # tied
    mtp = "model.layers.6."
    for k in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight", "shared_head.head.weight",
              "embed_tokens.weight", "self_attn.kv_b_proj.weight", "mlp.experts.0.down_proj.weight"):
        assert mtp + k in keys
    card = (directory / "README.md").read_text()
    assert "non-embedding" in card and r'model._keys_to_ignore_on_load_unexpected = [r"model\.layers\.6\..*"]' in card


def test_import_round_trip(bpe, tmp_path):
    """export -> storyseek reads the directory -> same logits; export again -> identical tensors."""
    from safetensors.torch import load_file

    cfg = get_preset("tiny").replace(vocab_size=pad_vocab(bpe.vocab_size), n_layer=2, q_lora_rank=16)
    model = random_model(cfg)
    export_model(write_ckpt(tmp_path / "ckpt.pt", model, bpe), tmp_path / "a")
    state = load_checkpoint(tmp_path / "a")
    assert state["model_config"] == cfg.to_dict() and state["iter"] == 7
    back = model_from_checkpoint(state).eval()
    idx = torch.randint(0, bpe.vocab_size, (1, 32))
    with torch.no_grad():
        assert torch.equal(back(idx).logits, model(idx).logits)
    assert load_pretrained(tmp_path / "a")["model_config"] == cfg.to_dict()  # --init-from DIR
    export_model(tmp_path / "a", tmp_path / "b")
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a" / "config.json").read_text() == (tmp_path / "b" / "config.json").read_text()


def test_import_directory_saved_by_transformers(bpe, tmp_path):
    """A DeepseekV3 dir written by save_pretrained (no MTP, no storyseek files) loads for generation."""
    cfg = get_preset("tiny").replace(vocab_size=pad_vocab(bpe.vocab_size), n_layer=2)
    model = random_model(cfg)
    export_model(write_ckpt(tmp_path / "ckpt.pt", model, bpe), tmp_path / "ours")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32)
    hf.save_pretrained(tmp_path / "theirs")
    transformers.AutoTokenizer.from_pretrained(tmp_path / "ours").save_pretrained(tmp_path / "theirs")
    state = load_checkpoint(tmp_path / "theirs")
    assert state["model_config"]["mtp_depth"] == 0
    back = model_from_checkpoint(state).eval()
    idx = torch.randint(0, bpe.vocab_size, (2, 24))
    with torch.no_grad():
        assert (back(idx).logits - model(idx).logits).abs().max() <= 1e-5
    assert BPETokenizer.from_dict(state["tokenizer"]).encode(TEXTS[1]) == bpe.encode(TEXTS[1])


# ------------------------------------------------------------------------------ bad inputs
@pytest.fixture
def tiny_ckpt(bpe, tmp_path):
    cfg = get_preset("tiny").replace(vocab_size=pad_vocab(bpe.vocab_size), n_layer=2)
    return write_ckpt(tmp_path / "ckpt.pt", random_model(cfg), bpe)


def test_non_empty_out_dir_needs_force(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", "--model", str(tiny_ckpt), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not empty" in err and "--force" in err
    assert (out / "keep.txt").exists()
    assert main(["export", "--model", str(tiny_ckpt), "--out", str(out), "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp leftovers


def test_not_a_storyseek_checkpoint(tmp_path, capsys):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    assert main(["export", "--model", str(tmp_path / "other.pt"), "--out", str(tmp_path / "o")]) == 1
    assert "not a storyseek checkpoint" in capsys.readouterr().err
    (tmp_path / "plain").mkdir()
    with pytest.raises(StoryseekError, match="without config.json"):
        export_model(tmp_path / "plain", tmp_path / "o")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("change, words", [
    (dict(score_func="softmax"), ["softmax", "sigmoid"]),
    (dict(mtp_depth=2), ["mtp_depth 2", "mtp_depth 1"]),
    (dict(n_routed_experts=1, n_activated_experts=1), ["n_routed_experts", ">= 2"]),
])
def test_unsupported_model_option_refused(change, words, bpe, tmp_path):
    cfg = get_preset("tiny").replace(vocab_size=pad_vocab(bpe.vocab_size), n_layer=2, **change)
    ckpt = write_ckpt(tmp_path / "ckpt.pt", Transformer(cfg), bpe)
    with pytest.raises(StoryseekError) as e:
        export_model(ckpt, tmp_path / "o")
    assert all(w in str(e.value) for w in words), str(e.value)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("edit, words", [
    ({"rope_interleave": False}, "rope_interleave false"),
    ({"n_group": 2, "topk_group": 1}, "group-limited routing"),
    ({"model_type": "llama"}, "not 'deepseek_v3'"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope type 'yarn'"),
])
def test_unsupported_hf_config_refused(edit, words, tiny_ckpt, tmp_path):
    export_model(tiny_ckpt, tmp_path / "hf")
    c = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**c, **edit}))
    with pytest.raises(StoryseekError, match=words):
        load_checkpoint(tmp_path / "hf")
