"""`storyseek prepare` end to end: shards, meta, round trip, reuse, splits, and every bad input."""

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storyseek.cli import main
from storyseek.data.prepare import PrepareConfig, prepare
from storyseek.data.shards import load_meta, open_tokens
from storyseek.data.template import END, story_document, text_document
from storyseek.data.tokenizer import load_tokenizer
from storyseek.errors import StoryseekError


def stories(n, start=0):
    return [
        {"prompt": f"Write a story titled: Tale {i}", "text": f"Once upon a time there was tale number {i}.\n\nIt ended well.",
         **({"moral": "Be kind."} if i % 2 else {})}
        for i in range(start, start + n)
    ]


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def run_cli(capsys, *argv):
    code = main(["prepare", *argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def decode_split(out, split):
    tok = load_tokenizer(out)
    return tok.decode(open_tokens(out, split).tolist())


@pytest.mark.parametrize("spec", ["gpt2", "bpe:300"])
def test_round_trip_is_exact(tmp_path, capsys, spec):
    rows = stories(60)
    src = jsonl(tmp_path / "s.jsonl", rows)
    out = tmp_path / "out"
    code, stdout, _ = run_cli(capsys, "--data-files", str(src), "--tokenizer", spec, "--val-fraction", "0.3", "--out", str(out))
    assert code == 0 and "prepared" in stdout
    meta = load_meta(out)
    expected = {story_document(r["prompt"], r["text"], r.get("moral")) for r in rows}
    got = decode_split(out, "train") + decode_split(out, "val")
    docs = [d + END for d in got.split(END)[:-1]]
    assert sorted(docs) == sorted(expected)
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 60
    assert 0 < meta["splits"]["val"]["documents"] < 30
    tok = load_tokenizer(out)
    assert meta["tokenizer"]["eot_id"] == tok.eot_id and meta["dtype"] == "uint16"
    train = open_tokens(out, "train")
    assert train[-1] == tok.eot_id and len(train) == meta["splits"]["train"]["tokens"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["meta.json", "train.bin", "val.bin", "tokenizer.storyseek.json"] + ["tokenizer.json"] * (spec != "gpt2")
    )


def test_builtin_bpe_then_reuse_force_and_refuse(tmp_path, capsys):
    out = tmp_path / "b"
    args = ["--dataset", "builtin", "--max-docs", "300", "--tokenizer", "bpe:512", "--out", str(out)]
    assert run_cli(capsys, *args)[0] == 0
    meta = load_meta(out)
    assert meta["records_read"] == 300 and meta["tokenizer"]["spec"] == "bpe:512"
    first = open_tokens(out, "train").copy()
    code, stdout, _ = run_cli(capsys, *args)
    assert code == 0 and "reusing" in stdout
    assert run_cli(capsys, *args, "--force")[0] == 0
    assert np.array_equal(open_tokens(out, "train"), first)  # deterministic for a seed
    code, _, err = run_cli(capsys, *args[:-4], "--tokenizer", "gpt2", "--out", str(out))
    assert code == 1 and "holds a different preparation (differs in: tokenizer)" in err and "--force" in err
    assert load_meta(out)["tokenizer"]["spec"] == "bpe:512"  # untouched
    assert run_cli(capsys, *args[:-4], "--tokenizer", "gpt2", "--out", str(out), "--force")[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "tokenizer.storyseek.json", "train.bin", "val.bin"]


def test_split_is_stable_when_data_is_added_and_independent_of_threads(tmp_path):
    small = jsonl(tmp_path / "small.jsonl", stories(80))
    big = jsonl(tmp_path / "big.jsonl", stories(80) + stories(80, start=80))
    a = prepare(PrepareConfig(data_files=(str(small),), val_fraction=0.25, out=str(tmp_path / "a"), num_proc=1))
    b = prepare(PrepareConfig(data_files=(str(big),), val_fraction=0.25, out=str(tmp_path / "b"), num_proc=2))
    val_a = set(decode_split(a, "val").split(END)[:-1])
    val_b = set(decode_split(b, "val").split(END)[:-1])
    train_b = set(decode_split(b, "train").split(END)[:-1])
    assert val_a <= val_b and not (val_a & train_b)


def test_text_mode_filters_dedup_and_counts(tmp_path):
    rows = [
        {"text": "x" * 150, "score": 3.4, "language": "en"},
        {"text": "x" * 150, "score": 3.9, "language": "en"},  # duplicate
        {"text": "y" * 150, "score": 2.7, "language": "en"},  # low score
        {"text": "z" * 150, "score": 4.0, "language": "fr"},  # wrong language
        {"text": "short", "score": 4.0, "language": "en"},
        {"text": "w" * 4000, "score": 4.0, "language": "en"},
        {"text": "   ", "score": 4.0, "language": "en"},
    ] + [{"text": f"A fine educational page number {i}. " * 5, "score": 3.0, "language": "en"} for i in range(20)]
    src = tmp_path / "fw.parquet"
    pq.write_table(pa.Table.from_pylist(rows), src)
    cfg = PrepareConfig.from_preset("fineweb-edu", data_files=(str(src),), tokenizer="bpe:300", out=str(tmp_path / "o"))
    assert (cfg.format, cfg.min_score, cfg.min_chars, cfg.max_chars, cfg.val_fraction) == ("text", 3.0, 100, 3000, 0.2)
    meta = load_meta(prepare(cfg))
    assert meta["dropped"] == {"duplicate": 1, "empty_text": 1, "low_score": 1, "too_long": 1, "too_short": 1,
                               "wrong_language": 1}
    assert meta["stories_without_prompt"] == 0  # text mode has no prompts to miss
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 21
    text = decode_split(tmp_path / "o", "train") + decode_split(tmp_path / "o", "val")
    assert text_document("x" * 150) in text and "<|prompt|>" not in text


def test_a_mixed_folder_keeps_text_only_stories_with_an_empty_prompt(tmp_path, capsys):
    """TinyStories rows have only `text`: in story mode they are stories too, beside prompted ones."""
    folder = tmp_path / "stories"
    folder.mkdir()
    prompted = stories(30)
    text_only = [{"id": i, "text": f"Lily and Ben played with ball number {i} in the sunny park."} for i in range(30)]
    jsonl(folder / "a_prompted.jsonl", prompted)
    jsonl(folder / "b_tinystories.jsonl", text_only + [{"id": 99, "text": "  "}])
    out = tmp_path / "out"
    code, stdout, _ = run_cli(capsys, "--data-files", str(folder / "*.jsonl"), "--tokenizer", "bpe:300",
                              "--val-fraction", "0.2", "--out", str(out))
    assert code == 0
    meta = load_meta(out)
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 60
    assert meta["stories_without_prompt"] == 30 and meta["dropped"] == {"empty_text": 1}
    assert "61 records read" in stdout and "30 of them stories without a 'prompt' (kept, empty prompt)" in stdout
    assert "dropped: empty_text 1;" in stdout
    docs = set((decode_split(out, "train") + decode_split(out, "val")).split(END)[:-1])
    assert {story_document("", r["text"]).removesuffix(END) for r in text_only} <= docs
    assert story_document(prompted[0]["prompt"], prompted[0]["text"]).removesuffix(END) in docs


def test_real_stories(shared_data, tmp_path):
    files = sorted(str(p) for p in shared_data.glob("*.jsonl") if "tinystories" not in p.name)
    before = {p.name: p.stat().st_mtime_ns for p in shared_data.iterdir()}
    out = prepare(PrepareConfig(data_files=tuple(files), out=str(tmp_path / "real")))
    meta = load_meta(out)
    assert meta["splits"]["train"]["documents"] > 600 and meta["splits"]["train"]["tokens"] > 300_000
    text = decode_split(out, "val")
    assert text.count(END) == meta["splits"]["val"]["documents"] and text.startswith("<|prompt|>Write a")
    assert "<|moral|>" in decode_split(out, "train")  # Aesop's morals
    assert {p.name: p.stat().st_mtime_ns for p in shared_data.iterdir()} == before
    tiny = prepare(PrepareConfig(data_files=(str(shared_data / "tinystories_train_first1000.jsonl"),), format="text",
                                 tokenizer="bpe:1000", lowercase=True, out=str(tmp_path / "tiny")))
    sample = decode_split(tiny, "train")
    assert sample == sample.lower() and sample.count(END) > 900


# Each bad input: one line on stderr, exit 1, no traceback, and no output directory left behind.
BAD = {
    "missing file": (lambda d: ["--data-files", str(d / "nope.jsonl")], "file not found"),
    "empty dataset": (lambda d: ["--data-files", str(jsonl(d / "e.jsonl", []))], "dataset is empty"),
    "all dropped": (lambda d: ["--data-files", str(jsonl(d / "e.jsonl", [{"prompt": "p", "text": "hi"}]))],
                    "no training documents: all 1 records were dropped \\(too_short 1\\)"),
    "missing column": (lambda d: ["--data-files", str(jsonl(d / "m.jsonl", [{"id": 1, "story": "x"}]))],
                       "no 'text' column \\(columns: id, story\\)"),
    "non-utf8": (lambda d: ["--data-files", str(_bytes(d / "b.jsonl", b'{"prompt": "p", "text": "caf\xe9"}\n'))],
                 "line 1 is not valid UTF-8"),
    "ragged csv": (lambda d: ["--data-files", str(_bytes(d / "r.csv", b"prompt,text\np,t\np,t,extra\n"))],
                   "r.csv: row ending at line 3 has 3 fields"),
    "broken jsonl line": (lambda d: ["--data-files", str(_bytes(d / "j.jsonl", b'{"prompt": "p", "text": "' + b"x" * 60 + b'"}\n{"prompt": \n'))],
                          "j.jsonl: line 2 is not valid JSON"),
    "unknown tokenizer": (lambda d: ["--dataset", "builtin", "--tokenizer", "sentencepiece"], "unknown tokenizer spec 'sentencepiece'"),
    "empty val split": (lambda d: ["--data-files", str(jsonl(d / "o.jsonl", stories(1))), "--val-fraction", "0.001"],
                        "validation split is empty"),
}


def _bytes(path, data):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_one_line_no_output(tmp_path, capsys, case):
    make_args, pattern = BAD[case]
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, *make_args(tmp_path), "--out", str(out))
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("storyseek: error: "), err
    import re

    assert re.search(pattern, lines[0]), lines[0]
    assert not out.exists()


def test_different_preparation_and_foreign_dir_refused(tmp_path, capsys):
    out = tmp_path / "o"
    src = jsonl(tmp_path / "s.jsonl", stories(40))
    assert run_cli(capsys, "--data-files", str(src), "--out", str(out), "--val-fraction", "0.5")[0] == 0
    code, _, err = run_cli(capsys, "--data-files", str(src), "--out", str(out), "--lowercase", "--val-fraction", "0.5")
    assert code == 1 and "differs in: lowercase" in err
    jsonl(src, stories(41))  # the input changed: same flags no longer mean the same data
    code, _, err = run_cli(capsys, "--data-files", str(src), "--out", str(out), "--val-fraction", "0.5")
    assert code == 1 and "differs in: files" in err
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    code, _, err = run_cli(capsys, "--dataset", "builtin", "--max-docs", "50", "--out", str(foreign), "--force")
    assert code == 1 and "holds no storyseek preparation" in err
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


def test_readers_reject_missing_and_incomplete_dirs(tmp_path):
    with pytest.raises(StoryseekError, match="data directory not found"):
        load_meta(tmp_path / "none")
    with pytest.raises(StoryseekError, match="no meta.json"):
        open_tokens(tmp_path, "train")
    out = prepare(PrepareConfig(dataset="builtin", max_docs=100, val_fraction=0.2, out=str(tmp_path / "b")))
    with pytest.raises(StoryseekError, match="unknown split"):
        open_tokens(out, "test")
    with open(out / "val.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(StoryseekError, match="truncated"):
        open_tokens(out, "val")


def test_cli_subprocess_usage_error_and_help():
    r = subprocess.run([sys.executable, "-m", "storyseek", "prepare", "--format", "xml"], capture_output=True, text=True)
    assert r.returncode == 2 and "invalid choice: 'xml'" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "storyseek", "prepare", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--val-fraction" in r.stdout and "--num-proc" in r.stdout


def test_offline_hub_via_cli_names_offline_options(tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on port 9
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    code, _, err = run_cli(capsys, "--tokenizer", "bpe:300", "--out", str(tmp_path / "o"))
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "cannot reach the Hugging Face Hub" in err and "--dataset builtin" in err and "--data-files" in err
    assert not (tmp_path / "o").exists()


def test_output_identical_whatever_num_proc(tmp_path):
    outs = [prepare(PrepareConfig(dataset="builtin", max_docs=400, num_proc=n, out=str(tmp_path / f"n{n}"))) for n in (1, 3)]
    for split in ("train", "val"):
        assert np.array_equal(open_tokens(outs[0], split), open_tokens(outs[1], split))
