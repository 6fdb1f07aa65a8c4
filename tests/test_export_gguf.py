"""storyseek export --format gguf: keys, names, shapes and weights read back with `gguf`'s reader, bad
inputs; and (slow, needs llama-cpp-python) llama.cpp running the file: the same greedy tokens and
logits as storyseek."""

import numpy as np
import pytest
import torch

from storyseek.cli import main
from storyseek.data.template import PROMPT
from storyseek.data.tokenizer import BPETokenizer, GPT2Tokenizer
from storyseek.errors import StoryseekError
from storyseek.export.gguf import export_gguf
from storyseek.model import Transformer, get_preset, pad_vocab

from helpers import random_model, write_ckpt

gguf = pytest.importorskip("gguf")

TEXTS = ["Once upon a time there was a little fox who loved the moon.",
         "The brave mouse said: \"I will find the cheese!\" and ran into the dark forest.",
         "Lily and Tom played in the park. They were happy and kind to each other."] * 20

VARIANTS = {
    "tiny": dict(),
    "qlora-untied-nodense": dict(q_lora_rank=32, tie_embeddings=False, n_dense_layers=0, mtp_depth=0),
    "softmax-noshared-scale": dict(n_layer=2, score_func="softmax", n_shared_experts=0, route_scale=2.5,
                                   n_routed_experts=6, n_activated_experts=3),
}


@pytest.fixture(scope="module")
def bpe():
    return BPETokenizer.train(400, TEXTS)


def fields(reader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items()}


def expected_shapes(cfg) -> dict[str, list[int]]:
    """Every tensor llama.cpp's deepseek2 loader creates, in GGUF (ggml) dimension order, written
    out from its `create_tensor` calls."""
    D, H, V, E = cfg.n_embd, cfg.n_head, cfg.vocab_size, cfg.n_routed_experts
    d_c, d_n, d_r, d_v, q = cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.q_lora_rank
    I, I_e, I_s = cfg.inter_dim, cfg.moe_inter_dim, cfg.moe_inter_dim * max(cfg.n_shared_experts, 1)
    shapes = {"token_embd.weight": [D, V], "output_norm.weight": [D]}
    if not cfg.tie_embeddings:
        shapes["output.weight"] = [D, V]
    for i in range(cfg.n_layer):
        b = f"blk.{i}."
        shapes.update({b + "attn_norm.weight": [D], b + "attn_kv_a_norm.weight": [d_c],
                       b + "attn_kv_a_mqa.weight": [D, d_c + d_r], b + "attn_k_b.weight": [d_n, d_c, H],
                       b + "attn_v_b.weight": [d_c, d_v, H], b + "attn_output.weight": [H * d_v, D],
                       b + "ffn_norm.weight": [D]})
        if q:
            shapes.update({b + "attn_q_a.weight": [D, q], b + "attn_q_a_norm.weight": [q],
                           b + "attn_q_b.weight": [q, H * (d_n + d_r)]})
        else:
            shapes[b + "attn_q.weight"] = [D, H * (d_n + d_r)]
        if i < cfg.n_dense_layers:
            shapes.update({b + "ffn_gate.weight": [D, I], b + "ffn_up.weight": [D, I], b + "ffn_down.weight": [I, D]})
        else:
            shapes.update({b + "ffn_gate_inp.weight": [D, E], b + "exp_probs_b.bias": [E],
                           b + "ffn_gate_exps.weight": [D, I_e, E], b + "ffn_up_exps.weight": [D, I_e, E],
                           b + "ffn_down_exps.weight": [I_e, D, E], b + "ffn_gate_shexp.weight": [D, I_s],
                           b + "ffn_up_shexp.weight": [D, I_s], b + "ffn_down_shexp.weight": [I_s, D]})
    return shapes


def llama_cpp_graph(path, ids: list[int]) -> np.ndarray:
    """llama.cpp's deepseek2 forward (src/models/deepseek2.cpp, the MLA branch; build_moe_ffn in
    src/llama-graph.cpp) redone in float64 numpy from an f32 GGUF alone, so a tensor in the wrong
    layout fails here even where llama.cpp is not installed. Arrays are in torch order (GGUF's
    dimensions reversed); ggml_mul_mat(a, b) contracts the first GGUF dimension of both."""
    r = gguf.GGUFReader(path)
    kv = fields(r)
    w = {t.name: np.array(t.data, dtype=np.float64) for t in r.tensors}
    g = lambda key: kv[f"deepseek2.{key}"]  # noqa: E731
    eps, n_rot, base = g("attention.layer_norm_rms_epsilon"), g("rope.dimension_count"), g("rope.freq_base")
    d_c, d_k = g("attention.kv_lora_rank"), g("attention.key_length_mla")
    S, H, k = len(ids), g("attention.head_count"), g("expert_used_count")

    def rms(x, weight):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * weight

    def rope(x):  # "normal" RoPE: consecutive pairs, theta_i = pos * base^(-2i / n_rot)
        angle = np.arange(S)[:, None] * base ** (-np.arange(0, n_rot, 2) / n_rot)  # [S, n_rot/2]
        angle = angle.reshape(S, *([1] * (x.ndim - 2)), -1)
        x0, x1 = x[..., 0::2], x[..., 1::2]
        return np.stack([x0 * np.cos(angle) - x1 * np.sin(angle), x0 * np.sin(angle) + x1 * np.cos(angle)], -1).reshape(x.shape)

    def silu(x):
        return x / (1 + np.exp(-x))

    x = w["token_embd.weight"][ids]  # [S, D]
    for i in range(g("block_count")):
        b = lambda name: w[f"blk.{i}.{name}"]  # noqa: E731
        h = rms(x, b("attn_norm.weight"))
        q = h @ b("attn_q.weight").T if f"blk.{i}.attn_q.weight" in w else \
            rms(h @ b("attn_q_a.weight").T, b("attn_q_a_norm.weight")) @ b("attn_q_b.weight").T
        q = q.reshape(S, H, d_k)
        kv_pe = h @ b("attn_kv_a_mqa.weight").T
        c, k_pe = rms(kv_pe[:, :d_c], b("attn_kv_a_norm.weight")), rope(kv_pe[:, d_c:])
        q_lat = np.einsum("shn,hcn->shc", q[..., : d_k - n_rot], b("attn_k_b.weight"))  # absorbed W^UK
        scores = (np.einsum("shc,tc->hst", q_lat, c) + np.einsum("shr,tr->hst", rope(q[..., d_k - n_rot:]), k_pe))
        scores = np.where(np.tril(np.ones((S, S), bool)), scores / np.sqrt(d_k), -np.inf)
        p = np.exp(scores - scores.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        o = np.einsum("shc,hvc->shv", np.einsum("hst,tc->shc", p, c), b("attn_v_b.weight"))  # W^UV
        x = x + o.reshape(S, -1) @ b("attn_output.weight").T
        h = rms(x, b("ffn_norm.weight"))
        if i < g("leading_dense_block_count"):
            x = x + (silu(h @ b("ffn_gate.weight").T) * (h @ b("ffn_up.weight").T)) @ b("ffn_down.weight").T
            continue
        logits = h @ b("ffn_gate_inp.weight").T  # [S, E]
        if g("expert_gating_func") == 2:
            probs = 1 / (1 + np.exp(-logits))
        else:
            probs = np.exp(logits - logits.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
        chosen = np.argsort(-(probs + b("exp_probs_b.bias")), axis=-1, kind="stable")[:, :k]  # bias selects only
        weights = np.take_along_axis(probs, chosen, -1)
        if g("expert_weights_norm"):
            weights /= weights.sum(-1, keepdims=True)
        if g("expert_weights_scale") not in (0.0, 1.0):
            weights *= g("expert_weights_scale")
        out = (silu(h @ b("ffn_gate_shexp.weight").T) * (h @ b("ffn_up_shexp.weight").T)) @ b("ffn_down_shexp.weight").T
        for t in range(S):
            for e, wt in zip(chosen[t], weights[t]):
                y = silu(b("ffn_gate_exps.weight")[e] @ h[t]) * (b("ffn_up_exps.weight")[e] @ h[t])
                out[t] += wt * (b("ffn_down_exps.weight")[e] @ y)
        x = x + out
    head = w.get("output.weight", w["token_embd.weight"])
    return rms(x, w["output_norm.weight"]) @ head.T


# ------------------------------------------------------------------------------ read back
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_keys_shapes_and_f32_weights_read_back(variant, bpe, tmp_path):
    cfg = get_preset("tiny").replace(vocab_size=pad_vocab(bpe.vocab_size) + 64, **VARIANTS[variant])
    model = random_model(cfg)
    out = export_gguf(write_ckpt(tmp_path / "ckpt.pt", model, bpe), tmp_path / "m.gguf")
    r = gguf.GGUFReader(out)
    kv = fields(r)
    want = {
        "general.architecture": "deepseek2", "general.file_type": 0,
        "deepseek2.block_count": cfg.n_layer, "deepseek2.context_length": cfg.block_size,
        "deepseek2.embedding_length": cfg.n_embd, "deepseek2.feed_forward_length": cfg.inter_dim,
        "deepseek2.vocab_size": cfg.vocab_size, "deepseek2.leading_dense_block_count": cfg.n_dense_layers,
        "deepseek2.attention.head_count": cfg.n_head, "deepseek2.attention.head_count_kv": 1,
        "deepseek2.attention.key_length": cfg.kv_lora_rank + cfg.qk_rope_head_dim,
        "deepseek2.attention.value_length": cfg.kv_lora_rank,
        "deepseek2.attention.key_length_mla": cfg.qk_head_dim, "deepseek2.attention.value_length_mla": cfg.v_head_dim,
        "deepseek2.attention.q_lora_rank": cfg.q_lora_rank, "deepseek2.attention.kv_lora_rank": cfg.kv_lora_rank,
        "deepseek2.rope.dimension_count": cfg.qk_rope_head_dim,
        "deepseek2.expert_count": cfg.n_routed_experts, "deepseek2.expert_used_count": cfg.n_activated_experts,
        "deepseek2.expert_shared_count": max(cfg.n_shared_experts, 1),
        "deepseek2.expert_feed_forward_length": cfg.moe_inter_dim,
        "deepseek2.expert_group_count": 1, "deepseek2.expert_group_used_count": 1,
        "deepseek2.expert_gating_func": 2 if cfg.score_func == "sigmoid" else 1,
        "deepseek2.expert_weights_norm": cfg.score_func == "sigmoid",
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.eos_token_id": bpe.eot_id, "tokenizer.ggml.bos_token_id": bpe.eot_id,
        "tokenizer.ggml.eom_token_id": bpe.special_ids[PROMPT], "tokenizer.ggml.add_bos_token": False,
    }
    assert {k: kv.get(k) for k in want} == want
    for key, value in (("deepseek2.attention.layer_norm_rms_epsilon", cfg.norm_eps),
                       ("deepseek2.rope.freq_base", cfg.rope_theta), ("deepseek2.expert_weights_scale", cfg.route_scale)):
        assert kv[key] == pytest.approx(value, rel=1e-6)
    assert "<|prompt|>{{ message['content'] | trim }}<|story|>" in kv["tokenizer.chat_template"]

    tokens, types = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == cfg.vocab_size
    assert [tokens[i] for i in sorted(bpe.special_ids.values())] == sorted(bpe.special_ids, key=bpe.special_ids.get)
    assert {types[i] for i in bpe.special_ids.values()} == {gguf.TokenType.CONTROL}
    assert tokens[bpe.vocab_size:] == [f"[PAD{i}]" for i in range(bpe.vocab_size, cfg.vocab_size)]
    assert set(types[bpe.vocab_size:]) == {gguf.TokenType.UNUSED}
    assert len(kv["tokenizer.ggml.merges"]) > 0 and all(m.count(" ") == 1 for m in kv["tokenizer.ggml.merges"])

    tensors = {t.name: t for t in r.tensors}
    assert {n: t.shape.tolist() for n, t in tensors.items()} == expected_shapes(cfg)
    assert {t.tensor_type for t in r.tensors} == {gguf.GGMLQuantizationType.F32}
    assert not any("mtp" in n or "nextn" in n for n in tensors)  # MTP is left out

    # f32 data equals our weights; kv_b is rebuilt from the two halves llama.cpp gets
    sd = model.state_dict()
    get = lambda name: torch.from_numpy(np.array(tensors[name].data))  # noqa: E731
    assert torch.equal(get("token_embd.weight"), sd["embed.weight"])
    assert torch.equal(get("output_norm.weight"), sd["norm.weight"])
    H, d_n, d_v, d_c = cfg.n_head, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    for i in range(cfg.n_layer):
        b, p = f"blk.{i}.", f"layers.{i}."
        kv_b = torch.cat([get(b + "attn_k_b.weight").transpose(1, 2), get(b + "attn_v_b.weight")], dim=1)
        assert torch.equal(kv_b.reshape(H * (d_n + d_v), d_c), sd[p + "attn.wkv_b.weight"])
        assert torch.equal(get(b + "attn_kv_a_mqa.weight"), sd[p + "attn.wkv_a.weight"])
        assert torch.equal(get(b + "attn_output.weight"), sd[p + "attn.wo.weight"])
        q = "attn_q_b.weight" if cfg.q_lora_rank else "attn_q.weight"
        assert torch.equal(get(b + q), sd[p + ("attn.wq_b.weight" if cfg.q_lora_rank else "attn.wq.weight")])
        if i >= cfg.n_dense_layers:
            assert torch.equal(get(b + "exp_probs_b.bias"), sd[p + "ffn.gate.bias"])
            assert torch.equal(get(b + "ffn_gate_inp.weight"), sd[p + "ffn.gate.weight"])
            for e in range(cfg.n_routed_experts):
                assert torch.equal(get(b + "ffn_up_exps.weight")[e], sd[f"{p}ffn.experts.{e}.w3.weight"])
                assert torch.equal(get(b + "ffn_down_exps.weight")[e], sd[f"{p}ffn.experts.{e}.w2.weight"])
            if cfg.n_shared_experts:
                assert torch.equal(get(b + "ffn_gate_shexp.weight"), sd[p + "ffn.shared_experts.w1.weight"])
            else:  # the stand-in shared expert contributes exactly 0
                assert not get(b + "ffn_down_shexp.weight").any()
        else:
            assert torch.equal(get(b + "ffn_gate.weight"), sd[p + "ffn.w1.weight"])
    if not cfg.tie_embeddings:
        assert torch.equal(get("output.weight"), sd["head.weight"])

    # the file alone, computed the way llama.cpp's graph computes, gives our logits
    ids = torch.randint(0, bpe.vocab_size, (40,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(ids[None]).logits[0].double().numpy()
    diff = np.abs(llama_cpp_graph(out, ids.tolist()) - ours).max()
    assert diff <= 1e-4, f"{variant}: max abs logit diff {diff}"


def test_q8_0_and_f16_types_and_values(bpe, tmp_path):
    cfg = get_preset("tiny").replace(vocab_size=pad_vocab(bpe.vocab_size))
    model = random_model(cfg)
    ckpt = write_ckpt(tmp_path / "ckpt.pt", model, bpe)
    sd = model.state_dict()
    for kind, file_type in (("q8_0", 7), ("f16", 1)):
        r = gguf.GGUFReader(export_gguf(ckpt, tmp_path / f"{kind}.gguf", gguf_type=kind))
        assert fields(r)["general.file_type"] == file_type
        t = {x.name: x for x in r.tensors}
        F32, F16, Q8 = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.Q8_0)
        # norms, biases and the router stay f32 (as llama.cpp's converter keeps them)
        for name in ("blk.1.attn_norm.weight", "blk.1.exp_probs_b.bias", "blk.1.ffn_gate_inp.weight"):
            assert t[name].tensor_type == F32
        big = Q8 if kind == "q8_0" else F16
        assert t["blk.1.ffn_down_exps.weight"].tensor_type == big and t["token_embd.weight"].tensor_type == big
        # rows of d_c = 48 values do not fill 32-value blocks: q8_0 falls back to f16 there
        assert t["blk.0.attn_v_b.weight"].tensor_type == F16
        w = gguf.quants.dequantize(t["blk.0.attn_output.weight"].data, t["blk.0.attn_output.weight"].tensor_type)
        ref = sd["layers.0.attn.wo.weight"].numpy()
        assert np.abs(w - ref).max() <= np.abs(ref).max() / 100  # q8_0: 1/127 of each block's max


@pytest.mark.slow
def test_gpt2_tokenizer_vocabulary(tmp_path):
    tok = GPT2Tokenizer()
    cfg = get_preset("tiny").replace(vocab_size=pad_vocab(tok.vocab_size), n_layer=2)
    out = export_gguf(write_ckpt(tmp_path / "ckpt.pt", random_model(cfg), tok), tmp_path / "g.gguf", gguf_type="f16")
    kv = fields(gguf.GGUFReader(out))
    tokens, types = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"]
    assert len(tokens) == 50304 and tokens[50256] == "<|endoftext|>" and tokens[50257] == "<|prompt|>"
    assert tokens[464] == "The" and tokens[318] == "Ġis"  # GPT-2's ids, byte-level text
    assert types[50256] == gguf.TokenType.CONTROL and types[50261] == gguf.TokenType.UNUSED
    assert "Ġ t" in kv["tokenizer.ggml.merges"] and kv["tokenizer.ggml.eos_token_id"] == 50256


# ------------------------------------------------------------------------------ bad inputs
@pytest.fixture
def tiny_ckpt(bpe, tmp_path):
    cfg = get_preset("tiny").replace(vocab_size=pad_vocab(bpe.vocab_size), n_layer=2)
    return write_ckpt(tmp_path / "ckpt.pt", random_model(cfg), bpe)


def _one_line_error(capsys, argv, *words, rc=1):
    try:
        code = main(argv)
    except SystemExit as e:  # usage errors exit through argparse
        code = e.code
    assert code == rc
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and all(w in err for w in words), err


def test_cli_writes_once_and_replaces_only_with_force(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "story.gguf"
    assert main(["export", "--model", str(tiny_ckpt), "--format", "gguf", "--out", str(out)]) == 0
    assert "deepseek2" in capsys.readouterr().out
    first = out.read_bytes()
    _one_line_error(capsys, ["export", "--model", str(tiny_ckpt), "--format", "gguf", "--out", str(out)],
                    "exists", "--force")
    assert main(["export", "--model", str(tiny_ckpt), "--format", "gguf", "--out", str(out), "--force",
                 "--gguf-type", "q8_0"]) == 0
    assert out.read_bytes() != first and gguf.GGUFReader(out).fields["general.file_type"].contents() == 7
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp leftovers


def test_bad_inputs_one_line_nothing_written(tiny_ckpt, bpe, tmp_path, capsys):
    gg = ["export", "--model", str(tiny_ckpt), "--format", "gguf", "--out"]
    _one_line_error(capsys, [*gg, str(tmp_path)], "is a directory")
    _one_line_error(capsys, ["export", "--model", str(tiny_ckpt), "--out", str(tmp_path / "d"), "--gguf-type", "f16"],
                    "--gguf-type only applies with --format gguf", rc=2)
    _one_line_error(capsys, [*gg, str(tmp_path / "a.gguf"), "--push-to-hub", "me/story"], "--format hf", rc=2)
    _one_line_error(capsys, [*gg, str(tmp_path / "a.gguf"), "--gguf-type", "q4_k"], "invalid choice", rc=2)
    _one_line_error(capsys, [*gg[:2], str(tmp_path / "none.pt"), *gg[3:], str(tmp_path / "a.gguf")], "not found")

    # a model llama.cpp would compute differently
    cfg = get_preset("tiny").replace(vocab_size=pad_vocab(bpe.vocab_size), n_layer=2, route_scale=0.0)
    ckpt = write_ckpt(tmp_path / "scale0.pt", Transformer(cfg), bpe)
    _one_line_error(capsys, [*gg[:2], str(ckpt), *gg[3:], str(tmp_path / "a.gguf")], "route_scale 0")

    # a tokenizer llama.cpp's gpt2 tokenizer cannot reproduce (whitespace pre-tokenizer)
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=300, special_tokens=list(bpe.special_ids)))
    other = BPETokenizer(hf.to_str(), "bpe:300")
    cfg = get_preset("tiny").replace(vocab_size=pad_vocab(other.vocab_size), n_layer=2)
    ckpt = write_ckpt(tmp_path / "ws.pt", Transformer(cfg), other)
    with pytest.raises(StoryseekError, match="not a GPT-2-style byte-level BPE"):
        export_gguf(ckpt, tmp_path / "a.gguf")
    assert sorted(p.name for p in tmp_path.iterdir() if "gguf" in p.name) == []


# ------------------------------------------------------- llama.cpp itself (llama-cpp-python)
PROMPTS = ["Write a children's story about a shy little rabbit who learns that everyone needs a friend.",
           "Write a children's story about a clever fox."]


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (`pip install "
                               "llama-cpp-python` builds llama.cpp, about 7 minutes on 2 cores)")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny preset (4 x 128, MLA + MoE + MTP) trained briefly on the builtin corpus, so its greedy
    stories are text, not noise; and its f32 and q8_0 GGUF exports."""
    from storyseek.data.prepare import PrepareConfig, prepare

    root = tmp_path_factory.mktemp("gguf-run")
    data = prepare(PrepareConfig(dataset="builtin", tokenizer="bpe:512", max_docs=800, out=str(root / "data"),
                                 num_proc=1))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model trains fastest on one thread, above all on a busy machine
    try:
        assert main(["train", "--data", str(data), "--out", str(root / "run"), "--preset", "tiny", "--block-size",
                     "128", "--batch-size", "4", "--max-iters", "150", "--eval-interval", "150", "--eval-iters", "2",
                     "--warmup-iters", "15", "--checkpoint-interval", "0", "--device", "cpu", "--dtype", "float32"]) == 0
    finally:
        torch.set_num_threads(threads)
    ckpt = root / "run" / "final_model.pt"
    files = {kind: export_gguf(ckpt, root / f"story-{kind}.gguf", gguf_type=kind) for kind in ("f32", "q8_0")}
    return ckpt, files


def _llama(llama_cpp, path):
    # f32 KV cache: the comparison should measure the weights' format, not a cache rounded to f16
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, n_batch=256, n_threads=1, logits_all=True,
                           type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, verbose=False)


def _llama_greedy(llm, ids, n):
    """Greedy decoding one token at a time on llama.cpp's KV cache; returns the new ids and the
    logits llama.cpp computed at every position of prompt + new tokens but the last."""
    llm.reset()
    llm.eval(ids)
    new = []
    for _ in range(n):
        new.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([new[-1]])
    return new, np.array(llm.scores[: llm.n_tokens - 1])


def _storyseek(ckpt):
    from storyseek.generate.load import load_model

    return load_model(ckpt, device="cpu", dtype="float32")


@pytest.mark.slow
def test_llama_cpp_f32_same_greedy_tokens_and_logits(llama_cpp, trained, capsys):
    from storyseek.generate.config import GenerateConfig, SamplingConfig
    from storyseek.generate.decode import generate_ids
    from storyseek.generate.text import encode_prompt

    ckpt, files = trained
    model, tok = _storyseek(ckpt)
    llm = _llama(llama_cpp, files["f32"])
    for prompt in PROMPTS:
        ids = encode_prompt(tok, prompt, raw=False)  # what `storyseek generate --prompt` feeds the model
        # llama.cpp's tokenizer (gpt2 model, gpt-2 pre-tokenizer, control tokens) gives our ids
        text = "<|prompt|>" + prompt
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
        assert llm.tokenize(TEXTS[1].encode(), add_bos=False, special=False) == tok.encode(TEXTS[1])

        greedy = GenerateConfig(max_tokens=48, sampling=SamplingConfig(temperature=0))
        ours = generate_ids(model, [ids], greedy, vocab_size=tok.vocab_size)[0]  # no stops: all 48 tokens
        theirs, logits = _llama_greedy(llm, ids, 48)
        assert theirs == ours, (tok.decode(ours), tok.decode(theirs))
        with torch.no_grad():
            ref = model(torch.tensor([ids + ours[:-1]])).logits[0].numpy()
        diff = np.abs(logits - ref).max()
        with capsys.disabled():
            print(f"\nllama.cpp f32 vs storyseek: 48/48 greedy tokens equal, max |logit diff| {diff:.2e} "
                  f"(logits span {ref.min():.1f}..{ref.max():.1f}); story: {tok.decode(ours)[:120]!r}")
        assert diff <= 1e-3


@pytest.mark.slow
def test_llama_cpp_stops_where_storyseek_generate_stops(llama_cpp, trained, capsys):
    """`storyseek generate --temperature 0` (the CLI, story mode) and llama.cpp's own greedy sampler
    with its end-of-generation tokens produce the same story; the chat template gives the story too."""
    from storyseek.data.template import STORY
    from storyseek.data.tokenizer import stop_ids
    from storyseek.generate.text import encode_prompt, render

    ckpt, files = trained
    model, tok = _storyseek(ckpt)
    llm = _llama(llama_cpp, files["f32"])
    # llama.cpp ends generation exactly where storyseek's story mode does
    eog = {i for i in range(tok.vocab_size) if llama_cpp.llama_vocab_is_eog(llm._model.vocab, i)}
    assert eog == stop_ids(tok, raw=False) == {tok.eot_id, tok.special_ids[PROMPT]}
    for prompt in PROMPTS:
        ids = encode_prompt(tok, prompt, raw=False)
        room = model.cfg.block_size - len(ids)  # past its context storyseek slides its window, llama.cpp does not
        assert main(["generate", "--model", str(ckpt), "--prompt", prompt, "--temperature", "0", "--max-tokens",
                     str(room), "--device", "cpu", "--dtype", "float32", "--no-stream"]) == 0
        cli_story = capsys.readouterr().out.strip()
        new = []
        for t in llm.generate(ids, temp=0.0, reset=True):
            if llama_cpp.llama_vocab_is_eog(llm._model.vocab, t) or len(new) == room:
                break
            new.append(t)
        assert render(tok, new, raw=False).strip() == cli_story

        # chat: the template turns the message into <|prompt|>...<|story|>
        story_ids = tok.encode(f"<|prompt|>{prompt}{STORY}")
        room = model.cfg.block_size - len(story_ids)
        chat = llm.create_chat_completion(messages=[{"role": "user", "content": prompt}], temperature=0.0,
                                          max_tokens=room)["choices"][0]["message"]["content"]
        expected = []
        for t in llm.generate(story_ids, temp=0.0, reset=True):
            if llama_cpp.llama_vocab_is_eog(llm._model.vocab, t) or len(expected) == room:
                break
            expected.append(t)
        specials = set(tok.special_ids.values())
        assert chat == tok.decode([t for t in expected if t not in specials])


@pytest.mark.slow
def test_llama_cpp_q8_0_agrees_on_the_first_tokens(llama_cpp, trained, capsys):
    from storyseek.generate.config import GenerateConfig, SamplingConfig
    from storyseek.generate.decode import generate_ids
    from storyseek.generate.text import encode_prompt

    ckpt, files = trained
    model, tok = _storyseek(ckpt)
    llm = _llama(llama_cpp, files["q8_0"])
    for prompt in PROMPTS:
        ids = encode_prompt(tok, prompt, raw=False)
        ours = generate_ids(model, [ids], GenerateConfig(max_tokens=48, sampling=SamplingConfig(temperature=0)),
                            vocab_size=tok.vocab_size)[0]
        theirs, logits = _llama_greedy(llm, ids, 48)
        same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), len(ours))
        with torch.no_grad():
            ref = model(torch.tensor([ids + theirs[:-1]])).logits[0].numpy()
        with capsys.disabled():
            print(f"\nllama.cpp q8_0 vs storyseek f32: first {same}/48 greedy tokens equal, "
                  f"max |logit diff| {np.abs(logits - ref).max():.3f}")
        assert same >= 8
