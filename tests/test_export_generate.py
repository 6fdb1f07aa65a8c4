"""transformers greedy generate on the export (plain and use_mtp=True) = storyseek greedy decoding."""

import pytest
import torch

from storyseek.data.tokenizer import BPETokenizer
from storyseek.export.hf import export_model
from storyseek.generate.decode import GenerateConfig
from storyseek.generate.load import load_model
from storyseek.generate.sampling import SamplingConfig
from storyseek.data.tokenizer import stop_ids
from storyseek.generate.text import encode_prompt, generate
from storyseek.model import Transformer, get_preset, pad_vocab
from storyseek.checkpoint import save_checkpoint

transformers = pytest.importorskip("transformers")

PROMPTS = ["Write a story about a fox who loves the moon.", "Write a story about a brave mouse."]
TEXTS = ["Once upon a time there was a little fox who loved the moon. The fox was happy.",
         "The brave mouse said: \"I will find the cheese!\" and ran into the dark forest."] * 20
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    tok = BPETokenizer.train(400, TEXTS)
    cfg = get_preset("tiny").replace(vocab_size=pad_vocab(tok.vocab_size) + 64, n_layer=2)  # 64 padding rows
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("gate.bias"):
                b.uniform_(-0.1, 0.1)
        # Let the padding rows win wherever they are not suppressed: both sides must mask them.
        model.embed.weight[tok.vocab_size:] = 0.05 * model.norm.weight.sign()
        # Keep a random model from stopping at once: the stop tokens' logits are 0.
        model.embed.weight[list(stop_ids(tok, raw=False))] = 0.0
    save_checkpoint(root / "ckpt.pt", {"model_config": cfg.to_dict(), "tokenizer": tok.to_dict(),
                                       "model": model.state_dict(), "iter": 1})
    export_model(root / "ckpt.pt", root / "hf")
    return root / "hf", cfg


def storyseek_greedy(directory, prompt, speculative):
    model, tok = load_model(directory, device="cpu", dtype="float32")  # `storyseek generate --model DIR`
    cfg = GenerateConfig(max_tokens=NEW_TOKENS, sampling=SamplingConfig(temperature=0), speculative=speculative)
    result = generate(model, tok, prompt, cfg)
    return encode_prompt(tok, prompt, raw=False), result.token_ids[0], result.stats


@pytest.mark.slow
@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_generate_matches_with_and_without_mtp(exported, prompt):
    directory, cfg = exported
    ids, ours, stats = storyseek_greedy(directory, prompt, speculative=False)
    _, ours_mtp, mtp_stats = storyseek_greedy(directory, prompt, speculative=True)
    assert ours_mtp == ours and mtp_stats.drafted > 0

    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    stops = set(hf.generation_config.eos_token_id)
    x = torch.tensor([ids])

    def hf_new(**kw):
        out = hf.generate(x, do_sample=False, max_new_tokens=NEW_TOKENS, **kw)[0, len(ids):].tolist()
        return out[:-1] if out and out[-1] in stops else out  # storyseek does not emit the stop token

    assert hf_new() == ours
    # transformers only looks for MTP weights at model.layers.61: point it at ours (see the model card).
    hf._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{cfg.n_layer}\..*"]
    assert hf_new(use_mtp=True) == ours
