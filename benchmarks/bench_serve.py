"""`storyseek serve` under load: N concurrent streaming clients vs the same requests one at a time.

    python benchmarks/bench_serve.py                      # tiny preset, 8 clients, 2 rounds of 15 s per phase
    python benchmarks/bench_serve.py --clients 16 --seconds 30 --model demo-run/best_model.pt
    python benchmarks/bench_serve.py --json

A real server (`storyseek serve --port 0` in a subprocess) on loopback; the clients are asyncio
tasks streaming `POST /v1/completions` over HTTP. Every request asks for exactly `--max-tokens`
new tokens (the end-of-text token is banned with `logit_bias`), so both phases do the same work per
request. Phases alternate (serial, concurrent, serial, concurrent ...) so a change in the machine's
load hits both; each phase runs closed-loop for `--seconds` (a client sends its next request when
the last one ends), and its aggregate throughput is the tokens of finished requests over the time
from the phase's start to its last finished request. Time to first token is measured at the client
(request sent -> first text chunk). Without --model, the tiny preset with random weights and a
BPE trained on the builtin corpus (speed does not depend on what the weights are).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tiny_checkpoint(directory: Path) -> Path:
    """The tiny preset (random weights) with a 2048-token BPE trained on 300 builtin stories."""
    import itertools

    import torch

    from storyseek.checkpoint import save_checkpoint
    from storyseek.data.builtin import iter_stories
    from storyseek.data.template import story_document
    from storyseek.data.tokenizer import BPETokenizer
    from storyseek.model import Transformer, get_preset, pad_vocab

    docs = [story_document(r["prompt"], r["text"], r.get("moral"), r.get("character"))
            for r in itertools.islice(iter_stories(300, seed=0), 300)]
    tok = BPETokenizer.train(2048, docs)
    cfg = get_preset("tiny").replace(vocab_size=pad_vocab(tok.vocab_size))
    torch.manual_seed(0)
    path = directory / "tiny.pt"
    save_checkpoint(path, {"model_config": cfg.to_dict(), "tokenizer": tok.to_dict(),
                           "model": Transformer(cfg).state_dict(), "iter": 0})
    return path


PROMPTS = ["Once upon a time, a little mouse", "The shy rabbit looked at the big meadow and",
           "Write a children's story about a clever fox.", "Tom and Lily went to the park. They saw",
           "In a small red house at the edge of the forest lived", "The kite flew high over the hill, and"]


class Server:
    def __init__(self, model: Path, max_batch: int, threads: int, compile: bool = False):
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        self.proc = subprocess.Popen([sys.executable, "-m", "storyseek", "serve", "--model", str(model), "--port", "0",
                                      "--max-batch", str(max_batch), "--threads", str(threads), "--max-queue", "1000",
                                      *(["--compile"] if compile else [])],
                                     env=env, stderr=subprocess.PIPE, text=True)
        m = re.search(r"listening on (http://[\d.]+:\d+)/", self.proc.stderr.readline())
        assert m, "the server did not start"
        self.url = m.group(1)
        while "ready" not in self.proc.stderr.readline():
            assert self.proc.poll() is None, "the server stopped while loading"

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


async def one_request(client, url: str, prompt: str, max_tokens: int, eot: int) -> tuple[float, float, int]:
    """-> (seconds to the first text, seconds in all, completion tokens)."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8, "stream": True,
            "stream_options": {"include_usage": True}, "logit_bias": {str(eot): -100}}
    t0 = time.perf_counter()
    first, tokens = None, 0
    async with client.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["text"] and first is None:
                first = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return first if first is not None else float("nan"), time.perf_counter() - t0, tokens


async def phase(url: str, clients: int, seconds: float, max_tokens: int, eot: int) -> dict:
    """`clients` closed-loop clients for `seconds` -> aggregate tokens/s and first-token times."""
    import httpx

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(limits=limits) as client:
        start = time.perf_counter()
        deadline = start + seconds
        results: list[tuple[float, float, int]] = []

        async def loop(i: int):
            n = 0
            while time.perf_counter() < deadline:
                results.append(await one_request(client, url, PROMPTS[(i + n) % len(PROMPTS)], max_tokens, eot))
                n += 1

        await asyncio.gather(*(loop(i) for i in range(clients)))
        wall = time.perf_counter() - start
    firsts = sorted(r[0] for r in results)
    tokens = sum(r[2] for r in results)
    return {"clients": clients, "requests": len(results), "tokens": tokens, "wall_s": round(wall, 2),
            "tokens_per_s": round(tokens / wall, 1),
            "ttft_p50_s": round(statistics.median(firsts), 3),
            "ttft_p95_s": round(firsts[min(len(firsts) - 1, int(0.95 * len(firsts)))], 3),
            "request_s_p50": round(statistics.median(r[1] for r in results), 3)}


def run(quick: bool = True, clients: int = 8, seconds: float | None = None, rounds: int = 2, max_tokens: int = 128,
        threads: int = 1, model: str | None = None, compile: bool = False) -> dict:
    from storyseek.generate.load import load_model

    seconds = seconds or (10.0 if quick else 30.0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(model) if model else tiny_checkpoint(Path(tmp))
        m, tok = load_model(path, device="cpu")
        eot, shape = tok.eot_id, f"{m.cfg.n_layer} layers x {m.cfg.n_embd}, vocab {tok.vocab_size}"
        del m
        server = Server(path, max_batch=max(clients, 1), threads=threads, compile=compile)
        try:
            asyncio.run(phase(server.url, 1, 2.0, 16, eot))  # warm-up
            serial, together = [], []
            for _ in range(rounds):
                serial.append(asyncio.run(phase(server.url, 1, seconds, max_tokens, eot)))
                together.append(asyncio.run(phase(server.url, clients, seconds, max_tokens, eot)))
        finally:
            server.stop()
    med = lambda rows, key: statistics.median(r[key] for r in rows)  # noqa: E731
    return {"model": str(model or f"tiny preset, random weights ({shape})"), "clients": clients, "threads": threads,
            "compile": compile,
            "max_tokens": max_tokens, "seconds_per_phase": seconds, "rounds": rounds,
            "serial": serial, "concurrent": together,
            "speedup": round(med(together, "tokens_per_s") / med(serial, "tokens_per_s"), 2),
            "load_average": os.getloadavg()}


def markdown(res: dict) -> str:
    med = lambda rows, key: statistics.median(r[key] for r in rows)  # noqa: E731
    flags = f"--threads {res['threads']}" + (" --compile" if res.get("compile") else "")
    lines = [f"{res['model']}, `{flags}`, {res['max_tokens']} new tokens per request, "
             f"{res['rounds']} alternating rounds of {res['seconds_per_phase']:g} s per phase (medians); "
             f"load average after: {', '.join(f'{x:.1f}' for x in res['load_average'])}", "",
             "| clients | requests | aggregate tokens/s | first token p50 | first token p95 | request p50 |",
             "|---|---|---|---|---|---|"]
    for rows in (res["serial"], res["concurrent"]):
        lines.append(f"| {rows[0]['clients']} | {sum(r['requests'] for r in rows)} | {med(rows, 'tokens_per_s'):.0f} | "
                     f"{med(rows, 'ttft_p50_s') * 1000:.0f} ms | {med(rows, 'ttft_p95_s') * 1000:.0f} ms | "
                     f"{med(rows, 'request_s_p50'):.2f} s |")
    lines += ["", f"{res['clients']} concurrent clients: **{res['speedup']:.2f}x** the aggregate throughput of one at a time."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=15.0, help="per phase and round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1, help="the server's --threads")
    ap.add_argument("--model", help="a checkpoint (default: the tiny preset with random weights)")
    ap.add_argument("--compile", action="store_true", help="the server's --compile (its startup waits for it)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    args = ap.parse_args()
    res = run(clients=args.clients, seconds=args.seconds, rounds=args.rounds, max_tokens=args.max_tokens,
              threads=args.threads, model=args.model, compile=args.compile)
    print(json.dumps(res, indent=2) if args.json else markdown(res))


if __name__ == "__main__":
    main()
