"""Decoding: the three paths agree, the speculative rule keeps the target distribution, sampling
options, stops, batching, sliding window, streaming text."""

import copy
import logging

import pytest
import torch

from storyseek.generate import draft
from storyseek.generate.draft import draft_head
from storyseek.generate.config import HEADER_TOKENS
from storyseek.generate.decode import PROBE_STEPS, DecodeStats, GenerateConfig, _Decoder, decode, generate_ids
from storyseek.generate.sampling import SamplingConfig, draw, nucleus, probabilities, speculative_accept
from storyseek.generate.text import summary
from storyseek.model import Transformer, get_preset
from storyseek.model.linear import set_weight_major_rows

MICRO = get_preset("tiny").replace(
    vocab_size=128, block_size=48, n_layer=2, n_head=2, n_embd=64, kv_lora_rank=32, qk_nope_head_dim=16,
    qk_rope_head_dim=8, v_head_dim=16, inter_dim=128, moe_inter_dim=64,
)
GREEDY = SamplingConfig(temperature=0)
PROMPTS = [[1, 2, 3, 4, 5], [7], [9, 10, 11, 12, 13, 14, 15, 16, 17]]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def random_model():
    torch.manual_seed(0)
    return Transformer(MICRO).eval()


@pytest.fixture(scope="module")
def trained_model():
    """Briefly trained on "count up by one, mod 64": deterministic, so a working MTP drafts well."""
    torch.manual_seed(0)
    model = Transformer(MICRO)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(40):
        seq = (torch.randint(0, 64, (16, 1)) + torch.arange(33)) % 64
        loss = model(seq[:, :-1], seq[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _modes(model, prompts, max_tokens, stop_ids=()):
    out = {}
    for name, kw in {"no-cache": dict(use_cache=False), "cache": dict(speculative=False),
                     "speculative": dict(speculative=True)}.items():
        stats = DecodeStats()
        cfg = GenerateConfig(max_tokens=max_tokens, sampling=GREEDY, **kw)
        out[name] = (generate_ids(model, prompts, cfg, vocab_size=120, stop_ids=stop_ids, stats=stats), stats)
    return out


@pytest.mark.parametrize("weight_major_rows", [0, 8])  # decoding's few-row layout off / on (model/linear.py)
def test_greedy_no_cache_cache_speculative_identical_random_weights(random_model, weight_major_rows):
    set_weight_major_rows(random_model, weight_major_rows)
    out = _modes(random_model, PROMPTS, 30)
    set_weight_major_rows(random_model, 0)
    ref = out["no-cache"][0]
    assert [len(r) for r in ref] == [30, 30, 30]
    assert out["cache"][0] == ref
    assert out["speculative"][0] == ref
    assert out["speculative"][1].drafted > 0


@pytest.mark.slow
def test_greedy_identical_and_mtp_drafts_accepted_on_trained_model(trained_model):
    out = _modes(trained_model, [[3, 4, 5], [40]], 40)
    ref = out["no-cache"][0]
    assert ref[0][:5] == [6, 7, 8, 9, 10]  # it did learn to count
    assert out["cache"][0] == ref and out["speculative"][0] == ref
    stats = out["speculative"][1]
    # A trained MTP module (drafting without its attention) predicts the token after next well.
    assert stats.acceptance_rate > 0.8, stats


@pytest.mark.parametrize("keep", [True, False])
def test_auto_probes_both_paths_and_either_choice_keeps_greedy_output(trained_model, monkeypatch, keep):
    ref = generate_ids(trained_model, [[3, 4, 5], [40]], GenerateConfig(max_tokens=70, sampling=GREEDY, use_cache=False))
    monkeypatch.setattr(_Decoder, "_keep_speculative", lambda self, probe: keep)
    stats = DecodeStats()
    steps = list(decode(trained_model, [[3, 4, 5], [40]], GenerateConfig(max_tokens=70, sampling=GREEDY), stats=stats))
    assert [sum((s[r] for s in steps), []) for r in range(2)] == ref
    # The probe runs plain steps (1 token each), then speculative ones (1 or 2), then one path runs.
    probe = [max(len(t) for t in s) for s in steps[1 : 1 + 2 * PROBE_STEPS]]
    assert probe[:PROBE_STEPS] == [1] * PROBE_STEPS and max(probe[PROBE_STEPS:]) == 2
    after = [max(len(t) for t in s) for s in steps[1 + 2 * PROBE_STEPS : -1]]
    assert max(after) == (2 if keep else 1)


def test_auto_probe_leaves_mtp_where_speculative_decoding_would(random_model, monkeypatch):
    """After auto's plain steps MTP drafts from the last of them: the drafts that follow are the ones
    speculative decoding proposes at the same positions."""
    drafts = {}  # mode -> {(row, position of the drafted token's predecessor): draft logits}
    verify = _Decoder._verify

    def record(self, forward, mtp, tok, draft, q, pos, length):
        out = verify(self, forward, mtp, tok, draft, q, pos, length)
        accepted, logits = out[0], out[3]
        for r, p in enumerate((pos + 1 + accepted).tolist()):
            drafts[mode].setdefault((r, p), logits[r])
        return out

    monkeypatch.setattr(_Decoder, "_verify", record)
    monkeypatch.setattr(_Decoder, "_keep_speculative", lambda self, probe: True)
    for mode, spec in (("auto", None), ("speculative", True)):
        drafts[mode] = {}
        generate_ids(random_model, PROMPTS, GenerateConfig(max_tokens=30, sampling=GREEDY, speculative=spec))
    shared = drafts["auto"].keys() & drafts["speculative"].keys()
    assert len(shared) >= 30
    for k in shared:
        torch.testing.assert_close(drafts["auto"][k], drafts["speculative"][k], rtol=1e-4, atol=1e-5)


def test_auto_rule_compares_tokens_per_second():
    decoder = _Decoder.__new__(_Decoder)
    decoder.stats, decoder.auto_key = DecodeStats(), None
    probe = dict(plain=[1.0] * 3, speculative=[1.5, 1.5, 9.0], drafted=10)
    assert decoder._keep_speculative({**probe, "accepted": 9})  # 1.9 tokens per 1.5 s beats 1 per 1 s
    assert "speculative" in decoder.stats.auto and "90%" in decoder.stats.auto
    assert not decoder._keep_speculative({**probe, "accepted": 4})  # 1.4 tokens per 1.5 s
    assert "chose plain" in decoder.stats.auto
    tie = {**probe, "drafted": 100}
    assert decoder._keep_speculative({**tie, "accepted": 60})  # 1.6 tokens per 1.5 s: 1.07x
    assert not decoder._keep_speculative({**tie, "accepted": 54})  # 1.54 per 1.5 s: 1.03x, within the margin


def test_auto_caches_its_choice_per_model_so_a_seed_reproduces(trained_model, monkeypatch, tmp_path):
    monkeypatch.delenv("STORYSEEK_NO_CACHE")
    monkeypatch.setenv("STORYSEEK_CACHE_DIR", str(tmp_path))
    cfg = GenerateConfig(max_tokens=60, sampling=SamplingConfig(temperature=1.0), seed=5)

    def run(prompts):
        stats = DecodeStats()
        return generate_ids(trained_model, prompts, cfg, stats=stats), stats.auto

    _, probed = run([[3, 4, 5]])
    assert probed.startswith("auto chose") and "cached" not in probed
    (a, again), (b, _) = run([[3, 4, 5]]), run([[3, 4, 5]])
    assert "cached" in again and again.split()[2] == probed.split()[2]  # the same path, without probing
    assert a == b  # so the seed reproduces the sampled text
    assert "cached" not in run([[3, 4, 5], [9]])[1]  # another batch size is measured anew


def test_speculative_rule_keeps_target_distribution():
    torch.manual_seed(0)
    p = torch.tensor([0.50, 0.25, 0.15, 0.10, 0.00])
    q = torch.tensor([0.10, 0.20, 0.30, 0.20, 0.20])  # differs a lot, and drafts a token p never picks
    n = 200_000
    draft = torch.multinomial(q, n, replacement=True)
    accepted, tokens = speculative_accept(p.expand(n, -1), q.expand(n, -1), draft)
    freq = torch.bincount(tokens, minlength=5).double() / n
    tol = 0.006  # > 5 standard errors (sqrt(0.25 / n) = 0.0011)
    assert (freq - p).abs().max() < tol, freq
    # The acceptance rate is sum_x min(p, q) = 0.55, and the test cannot pass by accident: the
    # usual mistakes give distributions far outside the tolerance.
    assert abs(accepted.double().mean() - 0.55) < tol
    always_accept = q
    resample_from_p = torch.minimum(p, q) + (1 - torch.minimum(p, q).sum()) * p
    assert (always_accept - p).abs().max() > 5 * tol and (resample_from_p - p).abs().max() > 5 * tol


def test_int8_draft_head_tracks_the_exact_head(trained_model):
    """Where the int8 head copy is faster (injected: 2x), it drafts, and proposes the exact head's
    argmax nearly always (the output stays exact whatever it proposes: the tests above)."""
    if draft.int8_linear(trained_model.head.weight) is None:
        pytest.skip("this PyTorch build has no dynamic int8 linear (the exact head drafts)")
    d = draft_head(trained_model)
    assert d.int8 is not None and d.why == "int8 draft head (int8 2.0x the exact one here)"
    h = torch.randn(512, MICRO.n_embd, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        exact, approx = trained_model.head(trained_model.mtp[0].norm(h)), d(h)
    assert (exact.argmax(-1) == approx.argmax(-1)).float().mean() > 0.95
    assert (exact - approx).abs().max() < 0.05 * exact.abs().max()


def test_exact_draft_head_where_int8_is_slower_and_a_new_one_when_weights_change(monkeypatch, tmp_path):
    monkeypatch.setattr(draft, "measure_int8_speedup", lambda head, int8, **kw: 0.8)
    monkeypatch.delenv("STORYSEEK_NO_CACHE")
    monkeypatch.setenv("STORYSEEK_CACHE_DIR", str(tmp_path))
    torch.manual_seed(0)
    model = Transformer(MICRO).eval()
    d = draft_head(model)
    assert d.int8 is None and d.why.startswith("exact draft head")
    if draft.int8_linear(model.head.weight) is not None:  # a PyTorch with the quantized kernels measured it
        assert d.why == "exact draft head (int8 0.8x the exact one here)"
        # measured slower on this machine before: the next model of this shape is not even quantized
        monkeypatch.setattr(draft, "int8_linear", lambda w: pytest.fail("quantized a head known to be slower"))
        assert draft_head(Transformer(MICRO).eval()).why == d.why
    assert draft_head(model) is d  # made once per model
    h = torch.randn(4, MICRO.n_embd)
    with torch.inference_mode():
        assert torch.equal(d(h), model.head(model.mtp[0].norm(h)))
    with torch.no_grad():
        model.head.weight.mul_(2)
    assert draft_head(model) is not d
    with torch.inference_mode():  # weights made here keep no version counter (and cannot change)
        made_here = Transformer(MICRO).eval()
        assert draft_head(made_here) is draft_head(made_here)


def test_top_k_one_equals_greedy(random_model):
    greedy = generate_ids(random_model, PROMPTS, GenerateConfig(max_tokens=12, sampling=GREEDY, speculative=False))
    for spec in (False, True):
        cfg = GenerateConfig(max_tokens=12, sampling=SamplingConfig(temperature=1.5, top_k=1), seed=3, speculative=spec)
        assert generate_ids(random_model, PROMPTS, cfg) == greedy


def test_top_p_keeps_smallest_nucleus_and_top_k_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    probs = probabilities(logits, SamplingConfig(temperature=1.0, top_p=0.7))
    assert torch.allclose(probs, torch.tensor([[0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0]]))
    probs = probabilities(logits, SamplingConfig(temperature=1.0, top_p=0.1))  # the top token always stays
    assert probs.tolist() == [[1.0, 0.0, 0.0, 0.0]]
    probs = probabilities(logits, SamplingConfig(temperature=1.0, top_k=3, top_p=1.0))
    assert probs[0, 3] == 0 and torch.allclose(probs.sum(), torch.tensor(1.0))


@pytest.mark.parametrize("vocab", [50, 1664, 50304])
def test_nucleus_is_what_a_full_sort_keeps(vocab):
    """Sorting only the most likely tokens keeps exactly the nucleus of a full sort: peaky rows (a
    nucleus of a few tokens), medium and flat ones (thousands: the sort of everything)."""
    def full_sort(probs, top_p):
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = (sorted_p.cumsum(dim=-1) - sorted_p) >= top_p
        kept = probs.masked_fill(drop.scatter(-1, order, drop), 0.0)
        return kept / kept.sum(dim=-1, keepdim=True)

    g = torch.Generator().manual_seed(0)
    for scale in (0.5, 2.0, 4.0, 8.0):
        probs = (torch.randn(4, vocab, generator=g) * scale).softmax(-1)
        for top_p in (0.3, 0.9, 0.999):
            assert torch.equal(nucleus(probs, top_p), full_sort(probs, top_p))


def test_draw_follows_the_distribution_and_never_draws_a_zero():
    probs = torch.tensor([[0.5, 0.0, 0.2, 0.3, 0.0]]).expand(100_000, -1)
    freq = torch.bincount(draw(probs, torch.Generator().manual_seed(1)), minlength=5) / 100_000
    assert freq[1] == 0 and freq[4] == 0
    assert torch.allclose(freq, probs[0], atol=0.006)  # 4 standard deviations of the 0.5 bin


def test_repetition_penalty_lowers_seen_tokens():
    logits = torch.tensor([[2.0, 2.0, -1.0, -1.0]])
    seen = torch.tensor([[True, False, True, False]])
    probs = probabilities(logits, SamplingConfig(temperature=1.0, top_p=1.0, repetition_penalty=2.0), seen)
    assert probs[0, 0] < probs[0, 1] and probs[0, 2] < probs[0, 3]


def test_seed_reproduces_and_padded_ids_never_sampled(random_model):
    def sample(seed, spec):
        cfg = GenerateConfig(max_tokens=25, sampling=SamplingConfig(temperature=3.0, top_p=1.0), seed=seed, speculative=spec)
        return generate_ids(random_model, PROMPTS, cfg, vocab_size=100)

    for spec in (False, True):
        a, b, c = sample(1, spec), sample(1, spec), sample(2, spec)
        assert a == b and a != c
        assert max(max(r) for r in a + c) < 100  # the model has 128 embeddings, the "tokenizer" 100


@pytest.mark.slow
def test_stops_at_end_token_and_rows_stop_independently(trained_model):
    prompts = [[3, 4, 5], [40], [20, 21]]  # counting: row 0 meets 9 after 3 tokens, row 2 after 53
    for name, (rows, _) in _modes(trained_model, prompts, 20, stop_ids={9}).items():
        assert rows == [[6, 7, 8], list(range(41, 61)), list(range(22, 42))], name


@pytest.mark.parametrize("min_tokens", [0, 1, 3])
@pytest.mark.parametrize("begin", [None, 11])
def test_min_tokens_holds_the_end_back_on_every_path(random_model, min_tokens, begin):
    """A model that always wants to end (token 9 pushed far above the rest): each row ends right
    after min_tokens new tokens, none of them the end, on every path, greedy and sampled. With a
    begin token (story mode's <|story|>, its second choice) the row writes it first and min_tokens
    count from there: a model that would end in the header still writes a story."""
    model = copy.deepcopy(random_model)
    push = torch.zeros(MICRO.vocab_size)
    push[9] = 100.0
    if begin:
        push[begin] = 50.0
    model.head.register_forward_hook(lambda module, args, out: out + push)
    paths = {"no-cache": dict(use_cache=False), "cache": dict(speculative=False), "speculative": dict(speculative=True),
             "auto": dict(speculative=None)}
    samplings = {"greedy": GREEDY, "sampled": SamplingConfig(temperature=1.0),
                 "penalized": SamplingConfig(temperature=0, repetition_penalty=1.3)}
    for path, kw in paths.items():
        for name, sampling in samplings.items():
            sampling = SamplingConfig(**{**vars(sampling), "min_tokens": min_tokens})
            cfg = GenerateConfig(max_tokens=8, sampling=sampling, seed=1, **kw)
            rows = generate_ids(model, PROMPTS, cfg, vocab_size=120, stop_ids={9}, begin_id=begin)
            if begin:  # the marker, then min_tokens more (the model's next choice is the marker again)
                assert rows == [[begin] * (min_tokens + 1) if min_tokens else []] * 3, (path, name, rows)
            else:
                assert [len(r) for r in rows] == [min_tokens] * 3 and all(9 not in r for r in rows), (path, name, rows)


def test_a_header_without_the_story_marker_is_held_only_so_long(random_model):
    """A model that never writes the begin marker (one trained on plain text, run in story mode)
    is held for HEADER_TOKENS tokens, then min_tokens more, then it may end again."""
    model = copy.deepcopy(random_model)
    push = torch.zeros(MICRO.vocab_size)
    push[9] = 100.0
    model.head.register_forward_hook(lambda module, args, out: out + push)
    for spec in (False, True):
        cfg = GenerateConfig(max_tokens=100, sampling=SamplingConfig(temperature=0, min_tokens=2), speculative=spec)
        rows = generate_ids(model, [[3, 4, 5]], cfg, vocab_size=120, stop_ids={9}, begin_id=11)
        assert len(rows[0]) == HEADER_TOKENS + 2 and 9 not in rows[0] and 11 not in rows[0], (spec, rows)


@pytest.mark.slow
def test_min_tokens_hold_in_compiled_steps(random_model):
    """--compile: the hold is applied inside the compiled plain step and the whole compiled verify,
    and released without recompiling (the story marker first, then min_tokens more, then the end)."""
    model = copy.deepcopy(random_model)
    push = torch.zeros(MICRO.vocab_size)
    push[9], push[11] = 100.0, 50.0
    model.head.register_forward_hook(lambda module, args, out: out + push)
    for spec in (False, True):
        cfg = GenerateConfig(max_tokens=8, sampling=SamplingConfig(temperature=0, min_tokens=3), speculative=spec,
                             compile=True)
        first, again = DecodeStats(), DecodeStats()
        for stats in (first, again):
            rows = generate_ids(model, PROMPTS, cfg, vocab_size=120, stop_ids={9}, begin_id=11, stats=stats)
            assert rows == [[11] * 4] * 3, (spec, rows)
        assert again.compile_s == 0


def test_decode_yields_step_by_step_and_slides_past_the_context(random_model):
    prompt = list(range(1, 41))  # 40 of 48 positions used: generation runs far past the context
    for spec in (False, True):
        stats = DecodeStats()
        cfg = GenerateConfig(max_tokens=100, sampling=SamplingConfig(temperature=1.0), seed=0, speculative=spec)
        steps = list(decode(random_model, [prompt, [5]], cfg, stats=stats))
        assert sum(len(s[0]) for s in steps) == 100 and sum(len(s[1]) for s in steps) == 100
        assert all(len(s[0]) <= (2 if spec else 1) for s in steps)
        assert stats.new_tokens == 200 and stats.prompt_tokens == 41


def test_long_prompt_keeps_last_tokens(random_model):
    long = list(range(1, 100))  # > block_size 48
    cfg = GenerateConfig(max_tokens=5, sampling=GREEDY, speculative=False)
    stats = DecodeStats()
    got = generate_ids(random_model, [long], cfg, stats=stats)
    assert stats.truncated_prompts == 1 and got == generate_ids(random_model, [long[-47:]], cfg)


def test_bfloat16_cache_decodes(random_model):
    from storyseek.generate.load import to_inference

    model = to_inference(Transformer(MICRO), torch.bfloat16)
    model.load_state_dict(random_model.state_dict())
    cfg = GenerateConfig(max_tokens=10, sampling=GREEDY)
    rows = generate_ids(model, PROMPTS, cfg)
    assert [len(r) for r in rows] == [10, 10, 10]
    assert model.rope_cos.dtype == torch.float32 and model.moe_layers()[0].gate.weight.dtype == torch.float32


class _Replay:
    """graphs.GraphedStep's stand-in on a CPU: runs the captured function, records the input shapes."""

    shapes: set = set()

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *args):
        _Replay.shapes.add(tuple(tuple(a.shape) for a in args))
        return self.fn(*args)


def test_graph_steps_attend_the_whole_cache_and_write_the_same_tokens(random_model, monkeypatch):
    """What a CUDA graph replays (generate/graphs.py): steps of fixed shapes that attend to all
    block_size cache positions, the unwritten ones masked. They write the exact-length steps' tokens
    through the sliding window (60 tokens > block_size 48): plain, speculative (a greedy verify is
    one graph: tokens, drafts and positions [B] in), sampled speculative with a seed, and auto."""
    from storyseek.generate import graphs

    sampled = SamplingConfig(temperature=1.0, top_p=0.9)
    for spec, sampling in ((False, GREEDY), (True, GREEDY), (True, sampled), (None, GREEDY)):
        cfg = GenerateConfig(max_tokens=60, sampling=sampling, speculative=spec, seed=5)
        exact = generate_ids(random_model, PROMPTS, cfg)
        with monkeypatch.context() as m:
            m.setattr(graphs, "graphs_supported", lambda device: True)
            m.setattr(graphs, "GraphedStep", _Replay)
            _Replay.shapes = set()
            assert generate_ids(random_model, PROMPTS, cfg) == exact
            verify = {((3,), (3,), (3,))}  # the whole greedy verify
            split = {((3, 2), (3, 2)), ((3, 64), (3,))}  # the main model's step, MTP's draft from one position
            plain = {((3, 1), (3, 1))}
            if spec is None:  # auto: its probe's plain steps (then one eager draft), then verifies
                assert _Replay.shapes == plain | verify
            else:
                assert _Replay.shapes == (plain if not spec else verify if sampling.greedy else split)
        assert generate_ids(random_model, PROMPTS, GenerateConfig(max_tokens=60, sampling=sampling, speculative=spec,
                                                                  seed=5, cuda_graphs=False)) == exact


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_decode_writes_the_eager_greedy_tokens():
    torch.manual_seed(0)
    model = Transformer(MICRO).cuda().eval()
    for spec in (False, True):
        eager = generate_ids(model, PROMPTS, GenerateConfig(max_tokens=60, sampling=GREEDY, speculative=spec,
                                                            cuda_graphs=False))
        stats = DecodeStats()
        graphed = generate_ids(model, PROMPTS, GenerateConfig(max_tokens=60, sampling=GREEDY, speculative=spec),
                               stats=stats)
        assert graphed == eager and stats.new_tokens == 180


@pytest.mark.slow
def test_compiled_decode_step_writes_the_same_greedy_tokens(random_model):
    """--compile: torch.compile (inductor) runs the plain and the speculative steps, and dynamo traces
    each once (no restart of its analysis to specialize a float: device.compile_step), with the
    experts fused as generation loads a model (compiled, moe_decode never reads the routing back)."""
    random_model = copy.deepcopy(random_model)
    for moe in random_model.moe_layers():
        moe.fuse_experts()
    dynamo_log = logging.getLogger("torch._dynamo.convert_frame")
    restarts = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: restarts.append(record.getMessage()) if "Restarting" in record.msg else None
    level = dynamo_log.level
    dynamo_log.addHandler(handler)
    dynamo_log.setLevel(logging.INFO)
    try:
        for spec in (False, True):
            eager = generate_ids(random_model, PROMPTS, GenerateConfig(max_tokens=20, sampling=GREEDY, speculative=spec))
            cfg = GenerateConfig(max_tokens=20, sampling=GREEDY, speculative=spec, compile=True)
            first, again = DecodeStats(), DecodeStats()
            assert generate_ids(random_model, PROMPTS, cfg, stats=first) == eager
            assert generate_ids(random_model, PROMPTS, cfg, stats=again) == eager
            # The compiling is timed apart: the first run compiled its steps, the second found them compiled.
            assert 0 < first.compile_s < first.total_s and again.compile_s == 0
            assert "s compiling the decode step" in summary(first) and "compiling" not in summary(again)
    finally:
        dynamo_log.removeHandler(handler)
        dynamo_log.setLevel(level)
    assert restarts == []
