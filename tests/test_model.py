"""The DeepSeek-V3 model core: causality, latent-cache decoding, MoE routing and balancing, MTP, counts."""

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from storyseek.model import ModelConfig, Transformer, get_preset, mla
from storyseek.model.info import cache_bytes_per_token, count_parameters
from storyseek.model.linear import set_weight_major_rows
from storyseek.model.moe import MoE, moe_decode

ROOT = Path(__file__).resolve().parents[1]

SMALL = dict(vocab_size=128, block_size=48, n_layer=3, n_head=4, n_embd=64, kv_lora_rank=32,
             qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_dense_layers=1, inter_dim=128,
             moe_inter_dim=32, n_routed_experts=4, n_activated_experts=2)


def small_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**{**SMALL, **overrides}))
    # Random router biases, so that the bias's role in selection is exercised everywhere.
    for moe in model.moe_layers():
        moe.gate.bias.normal_(0, 0.1)
    return model.eval()


VARIANTS = {
    "default-like": {},
    "q_lora": dict(q_lora_rank=24),
    "softmax-all-moe": dict(score_func="softmax", n_dense_layers=0, route_scale=2.0),
    "mtp-depth-2": dict(mtp_depth=2),
    "mha-dense": dict(attention="mha", ffn="dense"),  # the plain-GPT baseline (with MTP)
    "mha-moe-nomtp": dict(attention="mha", mtp_depth=0),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_changing_a_token_changes_nothing_before_it(variant):
    model = small_model(**VARIANTS[variant])
    tokens = torch.randint(0, 128, (2, 33))
    j = 17
    changed = tokens.clone()
    changed[:, j] = (changed[:, j] + 1) % 128
    with torch.no_grad():
        a = model(tokens[:, :-1], tokens[:, 1:], return_logits=True)
        b = model(changed[:, :-1], changed[:, 1:], return_logits=True)
    # Main logits at position i see tokens <= i. (Not bit-equal: the MoE groups tokens by expert, so
    # a later token's routing changes matmul shapes and the rounding of earlier rows.)
    assert torch.allclose(a.logits[:, :j], b.logits[:, :j], atol=1e-5)
    assert not torch.allclose(a.logits[:, j], b.logits[:, j])
    # MTP depth k logits at position i see tokens <= i + k.
    for k, (la, lb) in enumerate(zip(a.mtp_logits, b.mtp_logits), start=1):
        assert torch.allclose(la[:, : j - k], lb[:, : j - k], atol=1e-5)
        assert not torch.allclose(la[:, j - k], lb[:, j - k])


# Every variant once in the fast lane; the one-token prefills (the longest decodes) of all but the
# default in the slow lane (`pytest -m slow`).
@pytest.mark.parametrize("prompt_len,variant", [
    pytest.param(n, v, marks=[pytest.mark.slow] if n == 1 and v != "default-like" else [])
    for n in (1, 7, 48) for v in VARIANTS])
def test_latent_cache_decoding_equals_full_forward(variant, prompt_len):
    model = small_model(**VARIANTS[variant])
    T = model.cfg.block_size  # decode all the way to the context limit
    tokens = torch.randint(0, 128, (2, T))
    with torch.no_grad():
        full = model(tokens).logits
        cache = model.new_cache(batch=2)
        steps = [model(tokens[:, :prompt_len], cache=cache).logits]  # a fresh prefill (expanded attention)
        for t in range(prompt_len, T):
            # The attended length is the caller's: exactly t + 1, or more (masked) every other step.
            length = t + 1 if t % 2 else T
            steps.append(model(tokens[:, t : t + 1], cache=cache, pos=torch.full((2, 1), t), length=length).logits)
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-4


def test_continuous_batching_requests_join_and_leave_cache_slots():
    """The serving API: one cache of slots, each an independent sequence. A request joins by a
    fresh prefill of its slot while the others are mid-decode; a finished one just leaves; a free
    slot is fed a dummy token at position 0. Every request sees exactly its own full forward."""
    model = small_model()
    requests = [torch.randint(0, 128, (n,)) for n in (20, 14, 17)]
    with torch.no_grad():
        ref = [model(r[None]).logits[0] for r in requests]
        cache = model.new_cache(batch=2)
        slot_of, fed = {0: 0}, {0: 6}  # request 0 in slot 0, its first 6 tokens prefilled
        model(requests[0][None, :6], cache=cache.narrow(0))
        joins = {3: (1, 1, 5), 9: (2, 0, 4)}  # at step s: (request, slot, prompt tokens); request 2 reuses slot 0
        for s in range(12):
            if s in joins:
                r, slot, n = joins[s]
                slot_of = {q: sl for q, sl in slot_of.items() if sl != slot}  # the slot's old request has left
                logits = model(requests[r][None, :n], cache=cache.narrow(slot), last_only=True).logits
                assert (logits[0, -1] - ref[r][n - 1]).abs().max().item() <= 1e-4
                slot_of[r], fed[r] = slot, n
            tok, pos = torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 1, dtype=torch.long)
            for r, slot in slot_of.items():
                tok[slot, 0], pos[slot, 0] = requests[r][fed[r]], fed[r]
            logits = model(tok, cache=cache, pos=pos, length=int(pos.max()) + 1).logits
            for r, slot in slot_of.items():
                assert (logits[slot, 0] - ref[r][fed[r]]).abs().max().item() <= 1e-4, (s, r)
                fed[r] += 1


def test_cache_rows_at_different_positions_and_rollback():
    """Right-padded prefill of two prompts of different lengths, then per-row decode positions;
    a speculative-style rollback just rewrites positions."""
    model = small_model()
    tokens = torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        ref = [model(tokens[r : r + 1]).logits[0] for r in range(2)]
        cache = model.new_cache(batch=2)
        lengths = torch.tensor([5, 9])
        model(tokens[:, :9], cache=cache, pos=torch.arange(9).expand(2, -1))  # row 0 padded past 5
        pos = lengths.clone()
        for _ in range(8):
            # write garbage at pos + 1 (a rejected draft), then the real token at pos: garbage is overwritten
            model(torch.zeros(2, 1, dtype=torch.long), cache=cache, pos=(pos + 1).unsqueeze(1))
            step = model(tokens.gather(1, pos.unsqueeze(1)), cache=cache, pos=pos.unsqueeze(1)).logits[:, 0]
            for r in range(2):
                assert (step[r] - ref[r][pos[r]]).abs().max().item() <= 1e-4
            pos += 1


def test_mtp_draft_is_the_training_mtp_without_its_attention():
    model = small_model()
    attn_out = model.mtp[0].block.attn.wo.weight
    tokens = torch.randint(0, 128, (1, 25))
    x, y = tokens[:, :-1], tokens[:, 1:]
    with torch.no_grad():
        attn_out.zero_()  # the MTP block's attention adds nothing: training's MTP is the draft's function
        ref = model(x, y, return_logits=True).mtp_logits[0]  # [1, 23, V]: position i predicts token i + 2
        hidden = model(x).hidden[0, :23]  # [23, D]
        got = model.head(model.mtp[0].norm(model.mtp_draft(hidden, y[0, :23])))
    assert (got - ref[0]).abs().max().item() <= 1e-4


def naive_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Per-token reference straight from DeepSeek-V3 eq. 12-16 / the official Gate."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        logits = moe.gate.weight @ x[t]
        s = logits.sigmoid() if moe.gate.score_func == "sigmoid" else logits.softmax(-1)
        chosen = sorted(range(len(s)), key=lambda e: -(s[e] + moe.gate.bias[e]).item())[: moe.topk]
        g = s[chosen]
        if moe.gate.score_func == "sigmoid":
            g = g / g.sum()
        g = g * moe.gate.route_scale
        for e, w in zip(chosen, g):
            out[t] += w * moe.experts[e](x[t : t + 1])[0]
        out[t] += moe.shared_experts(x[t : t + 1])[0]
    return out


@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
def test_vectorized_moe_equals_per_token_reference(score_func):
    model = small_model(score_func=score_func, route_scale=2.5)
    moe = model.moe_layers()[0]
    x = torch.randn(3, 11, 64)
    with torch.no_grad():
        fast, _ = moe(x)
        slow = naive_moe(moe, x.view(-1, 64)).view(3, 11, 64)
    assert (fast - slow).abs().max().item() <= 1e-5


@pytest.mark.parametrize("major_rows", [0, 8])
@pytest.mark.parametrize("experts", [4, 9])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
@pytest.mark.parametrize("shape", [(1, 1), (1, 2), (4, 1), (3, 5)])
def test_moe_decode_path_equals_per_token_reference(score_func, shape, fused, experts, major_rows):
    """Decode-step MoE: a few tokens run only their chosen experts, more weigh every expert by the
    gate matrix (with fused experts: all of them in two products); all are the same function as the
    training dispatch, in either product layout (model/linear.py)."""
    model = small_model(score_func=score_func, route_scale=2.5, n_shared_experts=2, n_routed_experts=experts)
    moe = model.moe_layers()[0]
    if fused:
        moe.fuse_experts()
    set_weight_major_rows(model, major_rows)
    x = torch.randn(*shape, 64)
    with torch.no_grad():
        fast = moe_decode(moe, x)
        slow = naive_moe(moe, x.view(-1, 64)).view(*shape, 64)
    assert (fast - slow).abs().max().item() <= 1e-5


def test_fuse_experts_keeps_every_weight_and_one_copy():
    """Fusing moves the experts' weights into two matrices without changing a value or the state
    dict, and the experts' Linears become views of them: a later in-place load reaches both."""
    model = small_model()
    moe = model.moe_layers()[0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moe.fuse_experts()
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    w1 = moe.experts[1].w1.weight
    assert w1.untyped_storage().data_ptr() == moe.w13.untyped_storage().data_ptr()
    with torch.no_grad():
        w1.fill_(0.5)
        moe.shared_experts.w2.weight.fill_(-0.25)
    H = w1.shape[0]
    assert (moe.w13[H : 2 * H] == 0.5).all() and (moe.w2[:, -moe.shared_experts.w2.in_features :] == -0.25).all()
    assert moe.w13.shape[0] == 2 * moe.w2.shape[1]  # every w1 row, then every w3 row


@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
def test_bias_changes_selection_but_not_gate_weights(score_func):
    moe = small_model(score_func=score_func).moe_layers()[0]
    x = torch.randn(200, 64)
    with torch.no_grad():
        moe.gate.bias.zero_()
        w0, idx0, scores = moe.gate(x)
        moe.gate.bias.copy_(torch.tensor([10.0, 0.0, 0.0, -10.0]))  # force expert 0 in, expert 3 out
        w1, idx1, _ = moe.gate(x)
    assert not torch.equal(idx0, idx1)
    assert (idx1 == 0).any(dim=1).all() and not (idx1 == 3).any()
    # The weights are the *unbiased* scores of the chosen experts (normalized for sigmoid).
    expect = scores.gather(1, idx1)
    if score_func == "sigmoid":
        expect = expect / expect.sum(-1, keepdim=True)
    assert torch.allclose(w1, expect * moe.gate.route_scale)


def test_bias_update_moves_skewed_load_toward_balance():
    moe = small_model().train().moe_layers()[0]
    x = torch.randn(4, 32, 64)
    x[..., 0] = 3.0  # one constant channel ...
    with torch.no_grad():
        moe.gate.bias.zero_()
        moe.gate.weight[0, 0] = 1.0  # ... that every token's router turns into a strong pull to expert 0
    moe.bias_update_speed = 0.01

    def step() -> torch.Tensor:
        """Route the batch, apply the bias rule; return the per-expert load shares."""
        with torch.no_grad():
            moe(x)
            share = moe.load / moe.load.sum()
            moe.update_bias(moe.load.clone())
        return share

    shares = torch.stack([step() for _ in range(300)])  # [steps, E]
    spread = shares.max(dim=1).values - shares.min(dim=1).values
    assert shares[0, 0] > 0.45 and spread[0] > 0.3  # deliberately skewed: expert 0 takes every token
    late = shares[-50:].mean(dim=0)  # the sign rule oscillates around balance; average it
    assert (late - 0.25).abs().max() < 0.05, late
    assert spread[-50:].mean() < spread[0] / 2
    assert moe.gate.bias[0] < -0.1  # the overloaded expert was pushed down


def test_every_parameter_gets_a_gradient_and_the_bias_none():
    model = small_model(aux_loss_alpha=1e-2, q_lora_rank=16, mtp_depth=2).train()
    for moe in model.moe_layers():
        moe.gate.bias.zero_()  # so that every expert receives some of the 128 tokens
    tokens = torch.randint(0, 128, (4, 33))
    out = model(tokens[:, :-1], tokens[:, 1:])
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for moe in model.moe_layers():
        assert not moe.gate.bias.requires_grad and moe.gate.bias.grad is None
    assert out.balance_loss is not None and out.balance_loss > 0
    expected = out.main_loss + model.cfg.mtp_lambda * out.mtp_loss + out.balance_loss
    assert torch.allclose(out.loss, expected)


def test_balance_loss_sequence_vs_batch():
    """f_i P_i summed over experts is E/k * sum f'_i P_i >= 1 *alpha for perfectly uniform routing."""
    model = small_model(aux_loss_alpha=1.0).train()
    moe = model.moe_layers()[0]
    x = torch.randn(2, 16, 64)
    _, seq = moe(x)
    moe.aux_loss_type = "batch"
    _, batch = moe(x)
    # Recompute both from the definition.
    with torch.no_grad():
        _, idx, s = moe.gate(x.view(-1, 64))
    p = (s / s.sum(-1, keepdim=True)).view(2, 16, 4)
    hits = F.one_hot(idx, 4).sum(1).view(2, 16, 4).float()
    seq_ref = ((hits.mean(1) * 2) * p.mean(1)).sum(-1).mean()
    batch_ref = ((hits.view(-1, 4).mean(0) * 2) * p.view(-1, 4).mean(0)).sum()
    assert torch.allclose(seq, seq_ref) and torch.allclose(batch, batch_ref)


@pytest.mark.slow
def test_tiny_model_with_mtp_overfits_one_batch():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**SMALL, "n_layer": 2, "block_size": 32})).train()
    tokens = torch.randint(0, 128, (4, 33))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for step in range(100):
        out = model(tokens[:, :-1], tokens[:, 1:])
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        model.update_expert_bias()
        first = first if first is not None else out.loss.item()
    assert out.mtp_loss is not None
    assert out.loss.item() < first / 10, (first, out.loss.item())


def _built_counts(cfg) -> dict[str, int]:
    """What count_parameters promises, counted on a model built on the meta device."""
    with torch.device("meta"):
        model = Transformer(cfg)
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    embedding = model.embed.weight.numel() + (0 if cfg.tie_embeddings else model.head.weight.numel())
    mtp = sum(p.numel() for p in model.mtp.parameters())
    moe = model.moe_layers()
    idle = sum(p.numel() for m in moe[: cfg.n_moe_layers] for e in m.experts[cfg.n_activated_experts:]
               for p in e.parameters())
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding - mtp,
            "active": total - embedding - mtp - idle, "mtp": mtp}


@pytest.mark.parametrize("changes", [
    {}, dict(attention="mha"), dict(ffn="dense"), dict(q_lora_rank=24), dict(tie_embeddings=False),
    dict(mtp_depth=0), dict(mtp_depth=2, n_shared_experts=0), dict(n_dense_layers=0, n_routed_experts=6),
    dict(ffn="dense", attention="mha", mtp_depth=0),
], ids=str)
def test_parameter_counts_from_the_config_equal_a_built_model(changes):
    for preset in ("tiny", "default"):
        cfg = get_preset(preset).replace(**changes)
        assert count_parameters(cfg) == _built_counts(cfg), (preset, changes)


def test_default_preset_counts_in_range_and_match_readme():
    counts = count_parameters(get_preset("default"))
    assert 12e6 <= counts["non_embedding"] <= 20e6
    assert 12e6 <= counts["non_embedding"] + counts["mtp"] <= 20e6
    assert counts["active"] < counts["non_embedding"]
    cfg = get_preset("default")
    assert counts["embedding"] == cfg.vocab_size * cfg.n_embd
    # Matches a direct count of a real model.
    model = Transformer(cfg)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    readme = (ROOT / "README.md").read_text()
    for name in ("default", "tiny"):
        c = count_parameters(get_preset(name))
        row = re.search(rf"^\| `{name}` \|(.*)$", readme, re.M)
        assert row, f"README has no parameter table row for preset {name}"
        cells = [x.strip() for x in row.group(1).split("|")]
        for key in ("total", "embedding", "non_embedding", "active", "mtp"):
            assert f"{c[key] / 1e6:.2f}M" in cells, (name, key, cells)


def test_latent_cache_is_smaller_than_multi_head_cache():
    cfg = get_preset("default")
    b = cache_bytes_per_token(cfg)
    assert b["latent"] == cfg.n_layer * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4
    assert b["mha"] / b["latent"] == pytest.approx(6.4)
    model = small_model()
    assert model.new_cache(1).nbytes_per_token() == model.cfg.n_layer * (32 + 8) * 4  # MTP drafts need none


def test_invalid_config_is_one_clear_error():
    from storyseek.errors import StoryseekError

    with pytest.raises(StoryseekError, match="n_activated_experts"):
        ModelConfig(n_routed_experts=4, n_activated_experts=5)
    with pytest.raises(StoryseekError, match="qk_rope_head_dim"):
        ModelConfig(qk_rope_head_dim=7)


def test_softmax_scale_uses_the_full_query_key_width():
    cfg = get_preset("tiny")
    assert math.isclose(Transformer(cfg).layers[0].attn.softmax_scale, (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5)


def test_attention_from_scores_in_memory_equals_flash_attention():
    """MLA._attend_scores (a CPU's bf16 path while the scores are small) computes causal SDPA: in fp32
    to float precision, values and gradients; and a bf16 training forward that takes it stays as
    close to the fp32 forward (loss and every gradient) as the flash path does."""
    attn = small_model().layers[0].attn
    torch.manual_seed(1)
    B, H, S = 2, attn.n_head, 12
    q, k = (torch.randn(B, H, S, attn.d_n + attn.d_r, requires_grad=True) for _ in range(2))
    v = torch.randn(B, H, S, attn.d_v, requires_grad=True)
    ours = attn._attend_scores(q, k, v)
    grads = torch.autograd.grad(ours.square().sum(), (q, k, v))
    flash = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=attn.softmax_scale)
    torch.testing.assert_close(ours, flash, rtol=1e-5, atol=1e-6)
    for mine, ref in zip(grads, torch.autograd.grad(flash.square().sum(), (q, k, v))):
        torch.testing.assert_close(mine, ref, rtol=1e-4, atol=1e-5)

    model = small_model().train()
    idx = torch.randint(0, SMALL["vocab_size"], (4, SMALL["block_size"] + 1))

    def loss_and_grads(dtype, scores_in_memory):
        mla.SCORES_IN_MEMORY = scores_in_memory
        model.zero_grad()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = model(idx[:, :-1], idx[:, 1:]).loss
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    limit = mla.SCORES_IN_MEMORY
    try:
        ref_loss, ref_grad = loss_and_grads(torch.float32, limit)
        for scores_in_memory in (limit, 0):  # bf16 through _attend_scores, then through flash
            loss, grad = loss_and_grads(torch.bfloat16, scores_in_memory)
            assert abs(loss - ref_loss) < 0.01 * ref_loss
            assert (grad - ref_grad).norm() < 0.05 * ref_grad.norm()
    finally:
        mla.SCORES_IN_MEMORY = limit


def test_training_forward_and_loss_compile_as_one_graph():
    """No host synchronization in training (MoE dispatch, chunked vocabulary loss): fullgraph capture
    succeeds, and the compiled step computes the eager step's loss and gradients. (aot_eager: the
    graph capture and AOT autograd, without inductor's C++ build; `train --compile` runs inductor.)"""
    model = small_model(mtp_depth=2, aux_loss_alpha=1e-2).train()
    tokens = torch.randint(0, 128, (2, 17))
    x, y = tokens[:, :-1], tokens[:, 1:]
    eager = model(x, y).loss
    eager_grads = torch.autograd.grad(eager, list(model.parameters()))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(x, y).loss
    grads = torch.autograd.grad(compiled, list(model.parameters()))
    assert torch.allclose(compiled, eager, rtol=1e-5)
    for (name, _), a, b in zip(model.named_parameters(), grads, eager_grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), name
    assert model.moe_layers()[0].load.sum() == 2 * 2 * 16 * 2  # both forwards counted k=2 experts per token
