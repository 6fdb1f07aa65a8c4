"""The baselines built into the model config: --attention mha and --ffn dense train, decode and
count like the DeepSeek-V3 model, and export refuses what the DeepseekV3 format cannot express."""

import math

import pytest
import torch

from storyseek.cli import main
from storyseek.data.tokenizer import BPETokenizer
from storyseek.errors import StoryseekError
from storyseek.generate.decode import GenerateConfig, generate_ids
from storyseek.generate.sampling import SamplingConfig
from storyseek.model import KVCache, ModelConfig, Transformer
from storyseek.model.info import cache_bytes_per_token, count_parameters, variant
from storyseek.model.mha import MHA
from storyseek.model.moe import MLP, MoE
from storyseek.checkpoint import save_checkpoint
from storyseek.train.config import build_train_config

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(vocab_size=128, block_size=40, n_layer=2, n_head=4, n_embd=64, kv_lora_rank=32,
             qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, inter_dim=128, moe_inter_dim=32)


def test_mha_equals_per_head_reference():
    """softmax((q_i . k_i) / sqrt(d_n + d_r)) v_i per head, written out with the rotation done by hand."""
    torch.manual_seed(0)
    cfg = ModelConfig(**SMALL, attention="mha")
    attn = MHA(cfg).eval()
    model = Transformer(cfg)
    S, H, dn, dr = 11, 4, 16, 8
    x = torch.randn(2, S, 64)
    angles = torch.outer(torch.arange(S, dtype=torch.float64), cfg.rope_theta ** (-torch.arange(0, dr, 2) / dr))
    cos, sin = angles.cos().float(), angles.sin().float()  # [S, d_r/2]: pair j turns by pos * theta^(-2j/d_r)

    def rotate(t):  # t: [B, S, H, dn + dr]; consecutive pairs of the last dr dims rotate by position
        out = t.clone()
        for j in range(dr // 2):
            a, b = t[..., dn + 2 * j], t[..., dn + 2 * j + 1]
            c, s = cos[:, j, None], sin[:, j, None]  # [S, 1]
            out[..., dn + 2 * j], out[..., dn + 2 * j + 1] = a * c - b * s, a * s + b * c
        return out

    q = rotate(attn.wq(x).view(2, S, H, dn + dr))
    k = rotate(attn.wk(x).view(2, S, H, dn + dr))
    v = attn.wv(x).view(2, S, H, 16)
    scores = torch.einsum("bshd,bthd->bhst", q, k) / math.sqrt(dn + dr)
    scores = scores.masked_fill(torch.ones(S, S).triu(1).bool(), float("-inf"))
    ref = attn.wo(torch.einsum("bhst,bthd->bshd", scores.softmax(-1), v).flatten(2))
    with torch.no_grad():
        got = attn(x, model.rope_cos[None, :S], model.rope_sin[None, :S])
    assert torch.allclose(got, ref, atol=1e-5)


def test_dense_has_no_moe_anywhere_and_counts_add_up():
    cfg = ModelConfig(**SMALL, ffn="dense", n_dense_layers=1)
    model = Transformer(cfg)
    assert cfg.n_dense_layers == cfg.n_layer and cfg.n_moe_layers == 0
    assert model.moe_layers() == [] and not any(isinstance(m, MoE) for m in model.modules())
    assert isinstance(model.mtp[0].block.ffn, MLP)  # the MTP block too
    p = count_parameters(cfg)
    assert p["active"] == p["non_embedding"]
    swiglu, norms = 3 * 64 * 128, 2 * 64
    mla = 64 * 4 * 24 + 64 * (32 + 8) + 32 + 32 * 4 * (16 + 16) + 4 * 16 * 64
    assert p["non_embedding"] == 2 * (swiglu + norms + mla) + 64  # + the final norm
    assert variant(cfg) == "MLA + dense + MTP"
    assert variant(cfg.replace(attention="mha", mtp_depth=0)) == "MHA + dense"
    assert variant(ModelConfig(**SMALL)) == "MLA + MoE + MTP"


def test_mha_counts_and_cache_size():
    cfg = ModelConfig(**SMALL, attention="mha", mtp_depth=0)
    p = count_parameters(cfg)
    mla_p = count_parameters(cfg.replace(attention="mla"))
    per_layer_mha = 64 * 4 * 24 * 2 + 64 * 4 * 16 + 4 * 16 * 64
    per_layer_mla = 64 * 4 * 24 + 64 * (32 + 8) + 32 + 32 * 4 * (16 + 16) + 4 * 16 * 64
    assert p["non_embedding"] - mla_p["non_embedding"] == 2 * (per_layer_mha - per_layer_mla)
    cache = Transformer(cfg).new_cache(batch=3)
    assert isinstance(cache, KVCache) and cache.k.shape == (2, 3, 40, 4, 24) and cache.v.shape == (2, 3, 40, 4, 16)
    assert cache.nbytes_per_token() == cache_bytes_per_token(cfg)["mha"]
    view = cache.narrow(1)
    view.k.fill_(1.0)
    assert cache.k[:, 1].eq(1).all() and cache.k[:, 0].eq(0).all()


@pytest.mark.parametrize("overrides", [dict(attention="mha"), dict(attention="mha", ffn="dense"),
                                       dict(ffn="dense")])
def test_generate_paths_agree_for_baselines(overrides):
    """Greedy no-cache, cache and MTP-speculative decoding produce the same tokens (long enough to slide)."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**SMALL, **overrides)).eval()
    prompts = [[1, 2, 3, 4, 5], [7], [9, 10, 11, 12, 13, 14, 15, 16, 17]]
    outs = [generate_ids(model, prompts, GenerateConfig(max_tokens=60, sampling=SamplingConfig(temperature=0), **kw))
            for kw in (dict(use_cache=False), dict(speculative=False), dict(speculative=True))]
    assert outs[0] == outs[1] == outs[2]
    assert all(len(row) == 60 for row in outs[0])


@pytest.mark.parametrize("overrides", [dict(attention="mha"), dict(ffn="dense", mtp_depth=0)])
def test_baselines_learn(overrides):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**SMALL, **overrides))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    seq = (torch.randint(0, 64, (8, 1)) + torch.arange(33)) % 64
    first = None
    for _ in range(30):
        loss = model(seq[:, :-1], seq[:, 1:]).main_loss
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_flags_reach_the_model_config():
    cfg = build_train_config({"attention": "mha", "ffn": "dense", "multi_token": 1})
    assert cfg.model == {"attention": "mha", "ffn": "dense", "mtp_depth": 0}
    with pytest.raises(StoryseekError, match="attention must be mla or mha, got 'gqa'"):
        ModelConfig(attention="gqa")
    with pytest.raises(StoryseekError, match="ffn must be moe or dense"):
        ModelConfig(ffn="sparse")


@pytest.mark.parametrize("overrides, words", [
    (dict(attention="mha"), "attention 'mha': the DeepseekV3 format has only Multi-head Latent Attention"),
    (dict(ffn="dense"), "ffn 'dense' with MTP"),
])
def test_export_refuses_what_deepseek_v3_cannot_express(overrides, words, tmp_path, capsys):
    tok = BPETokenizer.train(300, ["Once upon a time a fox and a bear were friends."] * 20)
    model = Transformer(ModelConfig(**{**SMALL, "vocab_size": 320}, **overrides))
    save_checkpoint(tmp_path / "m.pt", {"model_config": model.cfg.to_dict(), "tokenizer": tok.to_dict(),
                                        "model": model.state_dict(), "iter": 1})
    assert main(["export", "--model", str(tmp_path / "m.pt"), "--out", str(tmp_path / "hf")]) == 1
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1
    assert not (tmp_path / "hf").exists()
