"""The chunked vocabulary loss equals the plain logits -> cross-entropy path, alone and in the model."""

import pytest
import torch
import torch.nn.functional as F

import storyseek.model.loss as vocab_loss
from storyseek.model import ModelConfig, Transformer
from storyseek.model.loss import linear_cross_entropy


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# one chunk; 7-row chunks (a ragged last one); compiled: the fusible form of the gradient
@pytest.mark.parametrize("chunk_elements, compiled", [(1 << 25, False), (7 * 300, False), (7 * 300, True)])
def test_linear_cross_entropy_equals_the_plain_path(monkeypatch, chunk_elements, compiled):
    monkeypatch.setattr(vocab_loss, "CHUNK_ELEMENTS", chunk_elements)
    loss = torch.compile(linear_cross_entropy, fullgraph=True) if compiled else linear_cross_entropy
    torch.manual_seed(0)
    h = torch.randn(2, 25, 48, requires_grad=True)
    w = (0.3 * torch.randn(300, 48)).requires_grad_()
    t = torch.randint(0, 300, (2, 25))
    t[0, ::4] = -1  # ignored positions count neither in the sum nor in the mean
    plain = F.cross_entropy((h @ w.T).flatten(0, 1), t.flatten(), ignore_index=-1)
    ph, pw = torch.autograd.grad(plain, (h, w))
    ours = loss(h, w, t)
    oh, ow = torch.autograd.grad(2.5 * ours, (h, w))  # the incoming gradient scales both
    assert abs(ours.item() - plain.item()) <= 1e-5 * plain.item()
    assert rel(oh, 2.5 * ph) <= 1e-4 and rel(ow, 2.5 * pw) <= 1e-4
    with torch.no_grad():  # evaluation: the same loss, no gradient work
        assert abs(loss(h, w, t).item() - plain.item()) <= 1e-5 * plain.item()


@pytest.mark.skipif(not hasattr(torch.compiler, "nested_compile_region"), reason="torch < 2.8: no nested regions")
@pytest.mark.parametrize("region", [True, False])
def test_compiled_loss_is_one_traced_chunk_on_region_devices_else_unrolled(monkeypatch, region):
    # unrolled, the compile time grew faster than the chunks (74 per head at batch 48 x 1024); on an
    # H200 the region ran slower and took more memory, so devices outside REGION_DEVICES unroll
    monkeypatch.setattr(vocab_loss, "CHUNK_ELEMENTS", 8 * 300)
    monkeypatch.setattr(vocab_loss, "REGION_DEVICES", ("cpu",) if region else ())
    graphs = []

    def keep_graph(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    h = torch.randn(48, 32, requires_grad=True)
    w = torch.randn(300, 32, requires_grad=True)
    t = torch.randint(0, 300, (48,))
    loss = torch.compile(linear_cross_entropy, backend=keep_graph, fullgraph=True, dynamic=False)  # as training compiles
    ours = loss(h, w, t)
    oh, ow = torch.autograd.grad(ours, (h, w))
    code = "\n".join(m.code for g in graphs for m in g.modules() if isinstance(m, torch.fx.GraphModule))
    assert code.count("torch.ops.higher_order.invoke_subgraph(") == (6 if region else 0)  # 48 rows, 8 a chunk
    assert code.count("log_softmax") == (1 if region else 6)  # traced once, or once per chunk
    plain = F.cross_entropy(h @ w.T, t)
    ph, pw = torch.autograd.grad(plain, (h, w))
    assert abs(ours.item() - plain.item()) <= 1e-5 * plain.item()
    assert rel(oh, ph) <= 1e-4 and rel(ow, pw) <= 1e-4


def test_linear_cross_entropy_under_bf16_autocast_matches_the_plain_path():
    torch.manual_seed(0)
    h = torch.randn(64, 32, requires_grad=True)
    w = (0.3 * torch.randn(200, 32)).requires_grad_()
    t = torch.randint(0, 200, (64,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = F.cross_entropy(F.linear(h, w).float(), t)
        ours = linear_cross_entropy(h, w, t)
    ph, pw = torch.autograd.grad(plain, (h, w))
    oh, ow = torch.autograd.grad(ours, (h, w))
    assert oh.dtype == ow.dtype == torch.float32  # gradients reach fp32 inputs in fp32
    assert abs(ours.item() - plain.item()) <= 1e-2 * plain.item()
    assert rel(oh, ph) <= 2e-2 and rel(ow, pw) <= 2e-2


def test_model_losses_and_gradients_equal_the_logits_path(monkeypatch):
    """Main head and every MTP depth: the chunked loss against cross-entropy of the returned logits."""
    monkeypatch.setattr(vocab_loss, "CHUNK_ELEMENTS", 10 * 128)  # several chunks per call
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=128, block_size=32, n_layer=2, n_head=2, n_embd=32,
                                    kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                                    inter_dim=64, moe_inter_dim=16, mtp_depth=2, aux_loss_alpha=0.0))
    tokens = torch.randint(0, 128, (3, 21))
    out = model(tokens[:, :-1], tokens[:, 1:], return_logits=True)
    y = tokens[:, 1:]
    main = F.cross_entropy(out.logits.flatten(0, 1), y.flatten())
    mtp = torch.stack([F.cross_entropy(lk.flatten(0, 1), y[:, k:].flatten())
                       for k, lk in enumerate(out.mtp_logits, start=1)]).mean()
    plain = main + model.cfg.mtp_lambda * mtp
    assert abs(out.main_loss.item() - main.item()) <= 1e-5 * main.item()
    assert abs(out.mtp_loss.item() - mtp.item()) <= 1e-5 * mtp.item()
    params = [p for p in model.parameters() if p.requires_grad]
    ours = torch.autograd.grad(out.loss, params, retain_graph=True, allow_unused=True)
    ref = torch.autograd.grad(plain, params, allow_unused=True)
    for (name, _), a, b in zip(model.named_parameters(), ours, ref):
        if b is not None and b.norm() > 0:
            assert rel(a, b) <= 1e-4, name
    # Training asks for no logits: none are made.
    plain_out = model(tokens[:, :-1], tokens[:, 1:])
    assert plain_out.logits is None and plain_out.mtp_logits == []


def test_token_nats_in_chunks_equal_full_logits_cross_entropy(monkeypatch):
    """Evaluation's per-position nats (training's val loss and val_bpb, `storyseek eval`) through the
    head in chunks of SCORE_ROWS positions: the same numbers as from [N, vocab] logits at once."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    h, targets = torch.randn(23, 16), torch.randint(0, 50, (23,))
    monkeypatch.setattr(vocab_loss, "SCORE_ROWS", 5)  # 5 chunks, the last one short
    with torch.no_grad():
        torch.testing.assert_close(vocab_loss.token_nats(head, h, targets),
                                   F.cross_entropy(head(h), targets, reduction="none"))
