"""Benchmark `storyseek prepare` end to end (read, format, tokenize, write) on real stories.

The real sample in ../shared/data is repeated (each copy's prompts made distinct, so deduplication
keeps them) into JSONL files of growing size; each size is prepared in a fresh subprocess so peak
memory (max RSS) can be compared across sizes: it should stay flat as the input grows. Side by side,
the same documents are encoded by tiktoken alone on all cores (the ceiling for end to end), and the
demo's path (builtin stories, bpe:4096) is timed.

    python benchmarks/bench_prepare.py            # 16 and 48 MB inputs
    python benchmarks/bench_prepare.py --quick    # 4 and 12 MB inputs
    python benchmarks/bench_prepare.py --json     # also print the results as JSON
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
if (SHARED / "tiktoken-cache").is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken-cache"))

_CHILD = """
import json, resource, sys, time
from storyseek.data.prepare import PrepareConfig, prepare
from storyseek.data.shards import load_meta
cfg = PrepareConfig(**json.loads(sys.argv[1]))
t0, c0 = time.perf_counter(), time.process_time()
out = prepare(cfg)
wall, cpu = time.perf_counter() - t0, time.process_time() - c0
m = load_meta(out)
try:  # VmHWM is this program's peak; ru_maxrss would include the parent's pages before exec
    rss = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 1024
except OSError:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"wall_s": wall, "cpu_s": cpu, "max_rss_mb": rss,
                  "docs": sum(s["documents"] for s in m["splits"].values()),
                  "tokens": sum(s["tokens"] for s in m["splits"].values())}))
"""


def _make_input(path: Path, megabytes: float) -> None:
    rows = [json.loads(line) for f in sorted(glob.glob(str(SHARED / "data" / "*.jsonl"))) for line in open(f, encoding="utf-8")]
    size, copy = 0, 0  # whole copies of the sample (~3 MB each) until at least `megabytes`
    with open(path, "w", encoding="utf-8") as f:
        while size < megabytes * 1e6:
            for r in rows:
                line = json.dumps({**r, "prompt": f"{r.get('prompt') or 'Write a story'} (copy {copy})"}) + "\n"
                f.write(line)
                size += len(line)
            copy += 1


def _prepare(cfg: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    r = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(cfg)], capture_output=True, text=True, env=env)
    if r.returncode:
        raise SystemExit(f"prepare failed: {r.stderr.strip().splitlines()[-1]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _tiktoken_alone(path: Path) -> dict:
    """Encode the same documents with tiktoken only (all cores, no reading/formatting/writing)."""
    from storyseek.data.template import story_document
    from storyseek.data.tokenizer import GPT2Tokenizer

    docs = []
    for line in open(path, encoding="utf-8"):
        r = json.loads(line)
        docs.append(story_document(r["prompt"], r["text"], r.get("moral")))
    tok = GPT2Tokenizer()  # encode_batch: tiktoken's own thread pool, one thread per core
    t0 = time.perf_counter()
    n = sum(map(len, tok.encode_batch(docs)))
    return {"wall_s": time.perf_counter() - t0, "tokens": n, "docs": len(docs)}


def run(quick: bool) -> dict:
    if not (SHARED / "data").is_dir():
        raise SystemExit(f"the real sample is not at {SHARED / 'data'}")
    sizes = (4, 12) if quick else (16, 48)
    results: dict = {"machine": f"{os.cpu_count()} CPU cores", "prepare_gpt2": [], "quick": quick}
    with tempfile.TemporaryDirectory() as tmp:
        for mb in sizes:
            src = Path(tmp) / f"stories_{mb}mb.jsonl"
            _make_input(src, mb)
            r = _prepare({"data_files": [str(src)], "out": f"{tmp}/out_{mb}", "force": True})
            r.update(input_mb=round(src.stat().st_size / 1e6, 1), docs_per_s=r["docs"] / r["wall_s"], tokens_per_s=r["tokens"] / r["wall_s"])
            results["prepare_gpt2"].append(r)
        alone = _tiktoken_alone(src)
        alone["tokens_per_s"] = alone["tokens"] / alone["wall_s"]
        results["tiktoken_alone"] = alone
        n = 2000 if quick else 20000
        demo = _prepare({"dataset": "builtin", "max_docs": n, "tokenizer": "bpe:4096", "out": f"{tmp}/demo", "force": True})
        demo.update(stories=n, docs_per_s=demo["docs"] / demo["wall_s"], tokens_per_s=demo["tokens"] / demo["wall_s"])
        results["builtin_bpe4096"] = demo
    return results


def markdown(res: dict) -> str:
    rows = ["| run | input | docs | tokens | wall s | CPU s | docs/s | tokens/s | max RSS MB |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["prepare_gpt2"]:
        rows.append(f"| prepare, gpt2 | {r['input_mb']} MB | {r['docs']:,} | {r['tokens']:,} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | "
                    f"{r['docs_per_s']:,.0f} | {r['tokens_per_s'] / 1e6:.2f}M | {r['max_rss_mb']:.0f} |")
    a = res["tiktoken_alone"]
    rows.append(f"| tiktoken alone (same docs, in memory) | - | {a['docs']:,} | {a['tokens']:,} | {a['wall_s']:.1f} | - | - | "
                f"{a['tokens_per_s'] / 1e6:.2f}M | - |")
    d = res["builtin_bpe4096"]
    rows.append(f"| prepare, builtin bpe:4096 (demo) | {d['stories']:,} stories | {d['docs']:,} | {d['tokens']:,} | {d['wall_s']:.1f} | "
                f"{d['cpu_s']:.1f} | {d['docs_per_s']:,.0f} | {d['tokens_per_s'] / 1e6:.2f}M | {d['max_rss_mb']:.0f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small inputs (4 and 12 MB, 2,000 builtin stories)")
    ap.add_argument("--json", action="store_true", help="also print the results as JSON")
    a = ap.parse_args()
    res = run(a.quick)
    print(f"machine: {res['machine']}\n\n{markdown(res)}")
    if a.json:
        print(json.dumps(res, indent=2))
