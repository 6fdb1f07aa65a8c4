"""`storyseek serve` end to end: a real server on 127.0.0.1 (a subprocess), the official `openai`
client, raw HTTP for the error cases, concurrent streams, a headless Chromium on the story page.

The model is the tiny preset trained for a few seconds on four stories in the template (once per
session): its stories are short on sense but real, it writes the template's markers and words of its own.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="needs the serve extra: pip install -e '.[serve]'")
openai = pytest.importorskip("openai", reason="needs the openai client (the dev extra)")
import httpx  # noqa: E402
import torch  # noqa: E402

from storyseek.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
KEY = "sekret"


STORIES = [  # (prompt, story, moral): few enough that a minute of CPU teaches a tiny model the template
    ("a brave mouse", "Once upon a time a little mouse lived in a hole under the stairs. One night she heard a noise, "
     "took a deep breath and went to look. It was only the wind. She smiled and went back to sleep.",
     "Being brave means trying even when you are scared."),
    ("a shy rabbit", "A shy rabbit sat alone at the edge of the meadow. A duck came by and asked him to play. They "
     "played all day in the warm sun, and the rabbit was not shy any more.", "A friend can make you feel at home."),
    ("a clever fox", "A clever fox wanted the grapes on a high vine. He asked the bird to help him, and the bird shook "
     "the vine. The grapes fell down and they shared them under the tree.", "It is okay to ask for help."),
    ("a lost kitten", "A little kitten lost her way in the big town. A kind dog walked with her from street to street "
     "until they found her home. Her mother purred and gave the dog a hug.", "Kindness helps everyone find their way."),
]


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory) -> Path:
    """A 2 x 64 model with MLA, MoE and MTP and its own 300-token BPE, trained 100 AdamW steps on
    STORIES in the story template: it writes the template's markers (so the page has a story to show)
    and text of its own, differently for every seed."""
    from storyseek.checkpoint import save_checkpoint
    from storyseek.data.template import story_document
    from storyseek.data.tokenizer import BPETokenizer
    from storyseek.model import Transformer, get_preset, pad_vocab

    docs = [story_document(*s) for s in STORIES]
    tok = BPETokenizer.train(300, docs * 4)
    ids = torch.tensor([i for d in docs for i in tok.encode(d)])
    cfg = get_preset("tiny").replace(
        vocab_size=pad_vocab(tok.vocab_size), block_size=64, n_layer=2, n_head=2, n_embd=64, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, inter_dim=128, moe_inter_dim=64)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = Transformer(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        first = None
        for _ in range(100):
            starts = torch.randint(0, len(ids) - cfg.block_size - 1, (8,)).tolist()
            x = torch.stack([ids[s : s + cfg.block_size] for s in starts])
            y = torch.stack([ids[s + 1 : s + cfg.block_size + 1] for s in starts])
            out = model(x, y)
            loss = out.main_loss
            first = first or loss.item()
            opt.zero_grad()
            out.loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    assert loss.item() < 0.6 * first  # it learned something
    path = tmp_path_factory.mktemp("serve-model") / "model.pt"
    save_checkpoint(path, {"model_config": cfg.to_dict(), "tokenizer": tok.to_dict(), "model": model.state_dict(),
                           "iter": 100})
    return path


# The server gets the CPU probes' results that conftest.py injects into this process (float32, the
# weight-major layout up to 8 rows): measured, they depend on the host's load, and a different layout
# or dtype rounds differently, which can flip a near-tie of the barely trained model against `generate`.
SERVE_MAIN = """
import sys
from storyseek import device
device.measure_bf16_speedup = lambda shapes, **kw: 0.5
device.measure_weight_major_rows = lambda weights: {tuple(w.shape): 8 for w in weights}
from storyseek.cli import main
sys.exit(main(sys.argv[1:]))
"""


class Server:
    """`storyseek serve --port 0` in a subprocess; the URL is read from its first stderr line."""

    def __init__(self, ckpt: Path, *flags: str):
        self.ckpt = ckpt
        self.proc = subprocess.Popen([sys.executable, "-c", SERVE_MAIN, "serve", "--model", str(ckpt), "--port", "0",
                                      *flags], env=ENV, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        first = self.proc.stderr.readline()
        threading.Thread(target=self._drain, daemon=True).start()
        m = re.search(r"listening on (http://[\d.]+:\d+)/", first)
        assert m, f"no URL in {first!r}"
        self.url = m.group(1)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if httpx.get(self.url + "/health").status_code == 200:
                return
            assert self.proc.poll() is None, self.stderr
            time.sleep(0.1)
        raise AssertionError("the model did not load in 120 s")

    @property
    def eot_id(self) -> int:
        from storyseek.generate.load import load_model

        return load_model(self.ckpt, device="cpu")[1].eot_id

    def _drain(self):
        for line in self.proc.stderr:
            self.lines.append(line)

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    def health(self) -> dict:
        return httpx.get(self.url + "/health").json()

    def client(self, key: str = "none", **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60, **kw)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=30)


@pytest.fixture(scope="session")
def server(ckpt):
    s = Server(ckpt, "--max-batch", "16", "--max-tokens", "200", "--max-prompt-chars", "150")
    yield s
    s.stop()


@pytest.fixture(scope="session")
def small(ckpt):
    """One slot, one waiting request, an API key: for the queue, disconnect and auth tests."""
    s = Server(ckpt, "--max-batch", "1", "--max-queue", "1", "--max-tokens", "5000", "--api-key", KEY)
    yield s
    s.stop()


def _generate(ckpt, capsys, prompt: str, *extra) -> str:
    assert main(["generate", "--model", str(ckpt), "--prompt", prompt, "--no-stream", *map(str, extra)]) == 0
    return capsys.readouterr().out.removesuffix("\n")


# --------------------------------------------------------------------- the openai client
@pytest.mark.slow  # a real server in a subprocess
def test_greedy_stream_equals_whole_equals_generate(server, ckpt, capsys):
    client = server.client()
    assert [m.id for m in client.models.list()] == ["storyseek"]
    prompt = "a brave little mouse"
    # Chat is story mode: the same prompt template and story view as `storyseek generate`.
    chat = client.chat.completions.create(model="storyseek", messages=[{"role": "user", "content": prompt}],
                                          max_tokens=60, temperature=0)
    text = chat.choices[0].message.content
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="storyseek", messages=[{"role": "user", "content": prompt}], max_tokens=60, temperature=0, stream=True)
        if c.choices]
    assert "".join(pieces) == text
    # --no-speculative: auto's choice is timed, and a 2-token verify can round differently from a 1-token step
    assert text and text == _generate(ckpt, capsys, prompt, "--max-tokens", 60, "--temperature", 0, "--no-speculative")
    assert chat.usage.completion_tokens <= 60 and chat.choices[0].finish_reason in ("stop", "length")
    # Completions continue the raw text.
    raw = client.completions.create(model="storyseek", prompt="Once upon a time", max_tokens=40, temperature=0)
    chunks = list(client.completions.create(model="storyseek", prompt="Once upon a time", max_tokens=40,
                                            temperature=0, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == raw.choices[0].text
    assert chunks[-1].usage.completion_tokens == raw.usage.completion_tokens == 40
    assert raw.choices[0].text == _generate(ckpt, capsys, "Once upon a time", "--raw", "--max-tokens", 40,
                                            "--temperature", 0, "--no-speculative")


@pytest.mark.slow  # a real server in a subprocess
def test_seeded_sampling_is_reproducible_and_matches_generate(server, ckpt, capsys):
    client = server.client()
    ask = dict(model="storyseek", prompt="The little fox", max_tokens=30, temperature=0.8, top_p=0.9, seed=7)
    a, b = (client.completions.create(**ask).choices[0].text for _ in range(2))
    assert a == b == _generate(ckpt, capsys, "The little fox", "--raw", "--max-tokens", 30, "--seed", 7,
                               "--no-speculative")
    assert client.completions.create(**{**ask, "seed": 8}).choices[0].text != a


@pytest.mark.slow  # a real server in a subprocess
def test_stop_strings_n_and_echo(server):
    client = server.client()
    whole = client.completions.create(model="storyseek", prompt="Once upon a time", max_tokens=40, temperature=0)
    text = whole.choices[0].text
    stop = text[10:12]  # two characters the greedy text contains
    cut = client.completions.create(model="storyseek", prompt="Once upon a time", max_tokens=40, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="storyseek", prompt="Once upon a time", max_tokens=40, temperature=0,
                                         stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text
    two = client.completions.create(model="storyseek", prompt="Once upon a time", max_tokens=10, n=2, seed=3, echo=True)
    assert [c.index for c in two.choices] == [0, 1] and all(c.text.startswith("Once upon a time") for c in two.choices)
    assert two.usage.completion_tokens <= 20


# --------------------------------------------------------------------- batching
@pytest.mark.parametrize("attention, mode", [
    ("mla", "eager"), ("mha", "eager"), ("mla", "graphs"), ("mha", "graphs"),
    pytest.param("mla", "compile", marks=pytest.mark.slow),
    pytest.param("mla", "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_engine_rows_join_and_leave_as_if_alone(ckpt, attention, mode, one_thread, monkeypatch):
    """Rows joining a running batch, a middle row leaving (the last one moves into its slot), a row
    sliding past the context: every row's greedy tokens are the ones `generate` gives it alone
    (also with the decode step compiled, `serve --compile`, and with the fixed-shape step a CUDA
    graph replays, run through a stand-in that records the batch sizes, and on a GPU for real)."""
    from storyseek.generate import graphs
    from storyseek.generate.config import GenerateConfig, SamplingConfig
    from storyseek.generate.decode import generate_ids
    from storyseek.generate.load import load_model
    from storyseek.model import Transformer
    from storyseek.serve.engine import Engine, Row

    device = "cuda" if mode == "cuda" else "cpu"
    model, tok = load_model(ckpt, device=device, dtype="float32")
    if attention == "mha":
        torch.manual_seed(0)
        model = Transformer(model.cfg.replace(attention="mha")).eval()
    greedy = SamplingConfig(temperature=0)
    asks = [("Once upon a time", 80), ("A shy rabbit", 12), ("The fox", 30), ("A kitten", 25)]  # 80 > context 64
    rows = [Row(prompt=tok.encode(p), max_tokens=n, sampling=greedy, stop_ids=frozenset(), raw=True) for p, n in asks]
    alone = [generate_ids(model, [r.prompt], GenerateConfig(max_tokens=r.max_tokens, sampling=greedy, speculative=False,
                                                             cuda_graphs=False), vocab_size=tok.vocab_size)[0]
             for r in rows]
    batches = set()
    if mode == "graphs":
        monkeypatch.setattr(graphs, "graphs_supported", lambda device: True)
        monkeypatch.setattr(graphs, "GraphedStep", lambda fn: lambda idx, pos: batches.add(len(idx)) or fn(idx, pos))
    if mode == "cuda":  # the real graphs, recording the batch sizes they capture
        real = graphs.GraphedStep
        monkeypatch.setattr(graphs, "GraphedStep", lambda fn: real(lambda idx, pos: batches.add(len(idx)) or fn(idx, pos)))
    engine = Engine(model, tok, max_batch=3, compile=mode == "compile")
    compiled_s = engine.forward_step.compile_s if mode == "compile" else 0.0
    waiting = list(rows)
    for step in range(200):
        if waiting and engine.free and step % 3 == 0:  # join every third step while a slot is free
            outs = [engine.add(waiting.pop(0))]
        else:
            outs = engine.step()
        for out in outs:
            if out.finish_reason:
                engine.remove(out.row)
        if not waiting and not engine.rows:
            break
    assert [r.text for r in rows] == [tok.decode(a) for a in alone]
    assert all(r.finish_reason == "length" and r.generated == n for r, (_, n) in zip(rows, asks))
    assert batches == ({1, 2, 3} if mode in ("graphs", "cuda") else set())
    if mode == "compile":  # compiled at startup for every batch size: no request waited for a recompile
        assert engine.forward_step.compile_s == compiled_s > 0


def test_engine_graphs_record_the_compiled_step_under_compile(ckpt, monkeypatch, one_thread):
    """serve --compile on a GPU: the CUDA graph of each batch size records the compiled step, not the
    eager model (torch.compile and the graphs replaced by stand-ins that record what they run)."""
    from storyseek import device
    from storyseek.generate import graphs
    from storyseek.generate.config import SamplingConfig
    from storyseek.generate.load import load_model
    from storyseek.serve.engine import Engine, Row

    compiled = []  # batch sizes of the steps that went through the "compiled" step

    def fake_compile(model, **kw):
        return lambda idx, **k: compiled.append(idx.shape[0]) or model(idx, **k)

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(device, "compiler_error", lambda dev: None)  # the toolchain probe would compile too
    monkeypatch.setattr(graphs, "graphs_supported", lambda device: True)
    monkeypatch.setattr(graphs, "GraphedStep", lambda fn: fn)  # a replay is a call
    model, tok = load_model(ckpt, device="cpu", dtype="float32")
    engine = Engine(model, tok, max_batch=2, compile=True)
    assert compiled == [1, 2]  # compiled before the first request, in the graphs' shape
    row = Row(prompt=tok.encode("A shy rabbit"), max_tokens=5, sampling=SamplingConfig(temperature=0),
              stop_ids=frozenset(), raw=True)
    engine.add(row)  # the prefill (eager) gives the first token
    while not any(out.finish_reason for out in engine.step()):
        pass
    assert compiled == [1, 2, 1, 1, 1, 1]  # each of the 4 decode steps ran the compiled step


PROMPTS = ["a brave little mouse", "a shy rabbit", "a clever fox", "a lost kitten"]


@pytest.mark.slow  # a real server in a subprocess
def test_sixteen_concurrent_streams_each_get_their_own_story(server):
    client = server.client()
    asks = [dict(prompt=PROMPTS[i % 4], seed=i) for i in range(16)]

    def story(ask, stream):
        kw = dict(model="storyseek", messages=[{"role": "user", "content": ask["prompt"]}], max_tokens=60,
                  temperature=0.8, seed=ask["seed"])
        if not stream:
            return client.chat.completions.create(**kw).choices[0].message.content
        chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
        tokens.append(chunks[-1].usage.completion_tokens)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    tokens = []
    alone = [story(a, stream=False) for a in asks]  # one at a time
    steps = server.health()["steps"]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda a: story(a, stream=True), asks))
    # A seeded request gets the same story whatever else shares its batch: nothing leaks between rows.
    assert together == alone
    assert len(set(together)) > 8  # and they are different stories
    # ... and they really were decoded together: far fewer decode steps than tokens.
    assert server.health()["steps"] - steps < 0.5 * sum(tokens)


def _long_stream(server, key: str | None = KEY):
    """A raw completion that never ends on its own (the end-of-text token banned) until max_tokens."""
    body = {"prompt": "Once", "max_tokens": 5000, "stream": True, "logit_bias": {str(server.eot_id): -100}}
    client = httpx.Client(timeout=30)
    response = client.send(client.build_request("POST", server.url + "/v1/completions", json=body,
                                                headers={"Authorization": f"Bearer {key}"} if key else {}), stream=True)
    assert response.status_code == 200, response.read()
    response.lines = response.iter_lines()  # kept: a dropped iterator would close the stream
    assert next(line for line in response.lines if line.startswith("data:"))
    return client, response


def _wait(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.slow  # a real server in a subprocess
def test_disconnect_frees_the_slot(small):
    steps = small.health()["steps"]
    client, response = _long_stream(small)
    assert small.health()["active"] == 1, (small.health(), small.stderr)
    response.close()
    client.close()
    assert _wait(lambda: small.health()["active"] == 0)
    assert small.health()["steps"] - steps < 4000  # it stopped long before its 5000 tokens
    # The slot serves the next request.
    out = small.client(KEY).completions.create(model="storyseek", prompt="Once", max_tokens=5, temperature=0)
    assert out.usage.completion_tokens >= 1


@pytest.mark.slow  # a real server in a subprocess
def test_queue_limit_answers_429(small):
    first = _long_stream(small)  # holds the only slot
    waiting = threading.Thread(target=lambda: small.client(KEY).completions.create(
        model="storyseek", prompt="Once", max_tokens=3, timeout=60), daemon=True)
    waiting.start()  # fills the queue of one
    assert _wait(lambda: small.health()["queued"] == 1)
    r = httpx.post(small.url + "/v1/completions", json={"prompt": "Once", "max_tokens": 3},
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
    with pytest.raises(openai.RateLimitError):
        small.client(KEY).completions.create(model="storyseek", prompt="Once", max_tokens=3)
    first[1].close()
    first[0].close()
    waiting.join(timeout=30)  # the waiting request got the slot and finished
    assert not waiting.is_alive() and _wait(lambda: small.health()["active"] == 0)


def test_engine_holds_the_end_back_until_min_tokens(ckpt, one_thread):
    """A model that always wants to end: a row asking for min_tokens 4 ends right after 4 tokens,
    one asking for 0 ends at once, in one batch; a story row (its second choice the <|story|> marker)
    writes the marker first and then min_tokens more."""
    from storyseek.generate.config import SamplingConfig
    from storyseek.generate.load import load_model
    from storyseek.serve.engine import Engine, Row

    model, tok = load_model(ckpt, device="cpu", dtype="float32")
    push = torch.zeros(model.cfg.vocab_size)
    story = tok.special_ids["<|story|>"]
    push[tok.eot_id], push[story] = 100.0, 50.0
    model.head.register_forward_hook(lambda module, args, out: out + push)
    engine = Engine(model, tok, max_batch=3)
    rows = [Row(prompt=tok.encode("A shy rabbit"), max_tokens=10, sampling=SamplingConfig(temperature=t, min_tokens=n),
                stop_ids=frozenset({tok.eot_id}), raw=b is None, begin_id=b)
            for t, n, b in ((0, 4, None), (1.0, 0, None), (0, 2, story))]
    outs = [engine.add(row) for row in rows]
    while outs:
        for out in outs:
            if out.finish_reason:
                engine.remove(out.row)
        outs = engine.step()
    assert [r.generated for r in rows] == [4, 0, 3] and [r.finish_reason for r in rows] == ["stop"] * 3
    assert tok.eot_id not in rows[0].tokens and rows[2].tokens[-3:] == [story] * 3


# --------------------------------------------------------------------- bad requests
BAD = [
    ("post", "/v1/completions", b"{not json", 400, "invalid_json"),
    ("post", "/v1/completions", {"prompt": "x", "max_tokens": -1}, 400, None),
    ("post", "/v1/completions", {"prompt": "x", "temperature": -1}, 400, None),
    ("post", "/v1/completions", {"prompt": "x", "top_p": 0}, 400, None),
    ("post", "/v1/completions", {"prompt": "x", "min_tokens": -1}, 400, None),
    ("post", "/v1/completions", {"max_tokens": 5}, 400, None),  # no prompt
    ("post", "/v1/completions", {"prompt": "x", "n": 17}, 400, None),
    ("post", "/v1/completions", {"prompt": "x", "logprobs": 3}, 400, None),
    ("post", "/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model_not_found"),
    ("post", "/v1/completions", {"prompt": "x" * 151}, 413, "prompt_too_long"),
    ("post", "/v1/completions", {"prompt": "".join(chr(97 + i * 7 % 26) for i in range(140))}, 413, "context_length_exceeded"),
    ("post", "/v1/completions", {"prompt": "x" * (2 << 20)}, 413, "request_too_large"),
    ("post", "/v1/chat/completions", {"messages": []}, 400, None),
    ("post", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, None),
    ("post", "/v1/chat/completions", {"messages": [{"role": "system", "content": "hi"}]}, 400, None),
    ("post", "/v1/nothing", {}, 404, None),
    ("get", "/v1/completions", None, 405, None),
    ("get", "/static/../../../etc/passwd", None, 404, None),
]


@pytest.mark.slow  # a real server in a subprocess
@pytest.mark.parametrize("method, path, body, status, code", BAD, ids=[f"{b[1]}-{b[3]}-{i}" for i, b in enumerate(BAD)])
def test_bad_requests_get_openai_errors(server, method, path, body, status, code):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body} if body is not None else {}
    r = httpx.request(method, server.url + path, headers={"content-type": "application/json"}, **kw)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"]
    if code:
        assert error["code"] == code
    if status == 400 and isinstance(body, dict) and body.get("temperature") == -1:
        assert error["param"] == "temperature"


@pytest.mark.slow  # a real server in a subprocess
def test_server_keeps_serving_after_bad_requests(server):
    for method, path, body, _, _ in BAD[:4]:
        httpx.request(method, server.url + path, **({"content": body} if isinstance(body, bytes) else {"json": body}))
    out = server.client().completions.create(model="storyseek", prompt="Once", max_tokens=5, temperature=0)
    assert out.choices[0].text and server.health()["status"] == "ok"
    assert "Traceback" not in server.stderr


@pytest.mark.slow  # a real server in a subprocess
def test_api_key(small):
    with pytest.raises(openai.AuthenticationError):
        small.client("wrong").models.list()
    r = httpx.get(small.url + "/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert [m.id for m in small.client(KEY).models.list()] == ["storyseek"]
    assert httpx.get(small.url + "/health").status_code == 200  # the page and health need no key
    assert "<title>" in httpx.get(small.url + "/").text


def test_loading_answers_503(ckpt):
    """While the model loads, health and the API say so (503); then they serve."""
    from starlette.testclient import TestClient

    from storyseek.generate.load import load_model
    from storyseek.serve.app import ServeConfig, create_app

    gate = threading.Event()

    def slow_load():
        gate.wait(30)
        return load_model(ckpt, device="cpu")

    with TestClient(create_app(ServeConfig(model=str(ckpt)), load=slow_load)) as c:
        assert c.get("/health").status_code == 503 and c.get("/health").json()["status"] == "loading"
        r = c.post("/v1/completions", json={"prompt": "x"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
        gate.set()
        assert _wait(lambda: c.get("/health").status_code == 200)
        assert c.post("/v1/completions", json={"prompt": "Once", "max_tokens": 3}).json()["usage"]["completion_tokens"] >= 1


# --------------------------------------------------------------------- the command
@pytest.mark.slow  # a real server in a subprocess
def test_sigterm_mid_stream_shuts_down_cleanly(ckpt):
    s = Server(ckpt, "--max-tokens", "5000")
    client, response = _long_stream(s, key=None)
    s.proc.send_signal(signal.SIGTERM)
    assert s.proc.wait(timeout=30) == 0
    response.close()
    client.close()
    assert "storyseek serve: stopped" in s.stderr and "Traceback" not in s.stderr


@pytest.mark.slow  # a real server in a subprocess
def test_serve_bad_inputs(tmp_path, ckpt, capsys):
    assert main(["serve", "--model", str(tmp_path / "missing.pt")]) == 1
    assert "no such checkpoint" in capsys.readouterr().err
    assert main(["serve", "--model", str(ckpt), "--max-batch", "0"]) == 1
    assert "--max-batch must be >= 1" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    r = subprocess.run([sys.executable, "-m", "storyseek", "serve", "--model", str(bad), "--port", "0"],
                       env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "storyseek: error: cannot load" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow  # a real server in a subprocess
def test_port_in_use(server, ckpt, capsys):
    port = server.url.rsplit(":", 1)[1]
    assert main(["serve", "--model", str(ckpt), "--port", port]) == 1
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


# --------------------------------------------------------------------- the page in a browser
def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


@pytest.mark.slow  # a real server in a subprocess
def test_page_in_headless_chromium(server):
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (the dev extra)")
    browser, driver_path = _chromium(), shutil.which("chromedriver")
    if not browser or not driver_path:
        pytest.skip("no headless browser: apt-get install chromium chromium-driver")
    from selenium.webdriver.common.by import By

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=420,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
    try:
        driver.get(server.url + "/")
        assert driver.find_element(By.TAG_NAME, "h1").text == "Storyseek"
        # A slow line (1 kB/s) spreads the tiny model's story over time, as a real model's would be,
        # whatever the load on this machine: the test sees streaming, not one burst.
        driver.execute_cdp_cmd("Network.enable", {})
        driver.execute_cdp_cmd("Network.emulateNetworkConditions", {
            "offline": False, "latency": 0, "downloadThroughput": 1000, "uploadThroughput": 100000})
        # Record the length of every text the page puts into the story box (each render replaces the
        # box's text node, so every added node is one state the reader saw, however callbacks batch).
        driver.execute_script("""
            window.lengths = [];
            new MutationObserver((records) => records.forEach((r) => r.addedNodes.forEach(
                (n) => window.lengths.push(n.textContent.length))))
                .observe(document.getElementById('story'), {childList: true});""")
        driver.find_element(By.ID, "prompt").send_keys("a brave little mouse")
        driver.find_element(By.CSS_SELECTOR, "input[value=long]").click()

        def story(button: str) -> list[int]:
            driver.execute_script("window.lengths = [];")
            driver.find_element(By.ID, button).click()
            assert _wait(lambda: driver.find_element(By.ID, "again").is_displayed(), timeout=60)
            assert driver.find_element(By.ID, "story").text.strip()
            return [n for n in driver.execute_script("return window.lengths") if n]

        # The story appears and never shrinks while it streams. On a quiet machine the toy model's
        # whole story can reach the page in one network read (the line throttle does not always
        # split it), so growth is not required here; SSE streaming itself is checked with the
        # openai client above. "Another one" writes a new story.
        seen = [story("go"), story("again")]
        assert all(s and s == sorted(s) for s in seen), seen
        # Too long a prompt is explained, not sent.
        driver.find_element(By.ID, "prompt").send_keys("x" * 200)
        driver.find_element(By.ID, "go").click()
        message = driver.find_element(By.ID, "message")
        assert message.is_displayed() and "too long" in message.text
    finally:
        driver.quit()


def test_static_files_are_package_data():
    from storyseek.serve.app import STATIC

    html = (STATIC / "index.html").read_text()
    assert {"index.html", "app.js", "style.css"} <= {p.name for p in STATIC.iterdir()}
    assert "http://" not in html and "https://" not in html  # no CDN: the page works offline
