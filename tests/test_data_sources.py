"""Record sources: local files of every kind, Hub loading (on local files), bad input."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storyseek.data import sources
from storyseek.data.sources import expand_files, file_records, hub_records
from storyseek.errors import StoryseekError

ROWS = [{"prompt": f"Write a story {i}", "text": f"Story number {i}, with \"quotes\", commas\nand lines."} for i in range(5)]


def write(path, rows, kind):
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif kind == "json":
        path.write_text(json.dumps({"data": rows}), encoding="utf-8")
    elif kind == "csv":
        import csv

        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    elif kind == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "parquet"])
def test_each_file_kind_reads_all_rows(tmp_path, kind):
    path = write(tmp_path / f"stories.{kind}", ROWS, kind)
    assert list(file_records(expand_files([str(path)]))) == ROWS


def test_txt_blocks_and_json_lines_named_json(tmp_path):
    (tmp_path / "a.txt").write_text("First story\nline two.\n\n\n  \nSecond story.\n", encoding="utf-8")
    assert list(file_records([tmp_path / "a.txt"])) == [{"text": "First story\nline two.\n"}, {"text": "Second story.\n"}]
    jl = write(tmp_path / "b.json", ROWS[:2], "jsonl")
    assert list(file_records([jl])) == ROWS[:2]


def test_globs_sorted_and_max_files(tmp_path):
    for i in range(3):
        write(tmp_path / f"part{i}.jsonl", ROWS[i : i + 1], "jsonl")
    paths = expand_files([str(tmp_path / "part*.jsonl")], max_files=2)
    assert [p.name for p in paths] == ["part0.jsonl", "part1.jsonl"]
    assert list(file_records(paths)) == ROWS[:2]


@pytest.mark.parametrize(
    "content, pattern",
    [
        (b'{"text": "ok"}\n{"text": "broken\n', r"line 2 is not valid JSON"),
        (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', r"line 2 is not valid UTF-8 \(byte 0xe9"),
        (b'[1, 2]\n', r"line 1 is a JSON list"),
    ],
)
def test_bad_jsonl(tmp_path, content, pattern):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(content)
    with pytest.raises(StoryseekError, match=pattern):
        list(file_records([p]))


def test_ragged_csv_names_the_line(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("prompt,text\na,b\nc,d,e\n", encoding="utf-8")
    with pytest.raises(StoryseekError, match="line 3 has 3 fields, the header has 2"):
        list(file_records([p]))


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(StoryseekError, match="file not found"):
        expand_files([str(tmp_path / "nope.jsonl")])
    with pytest.raises(StoryseekError, match="no files match"):
        expand_files([str(tmp_path / "*.jsonl")])
    (tmp_path / "x.xml").write_text("<a/>")
    with pytest.raises(StoryseekError, match="unsupported file type .xml"):
        expand_files([str(tmp_path / "x.xml")])


@pytest.mark.parametrize("streaming", [False, True])
def test_hub_loader_on_local_json(tmp_path, monkeypatch, streaming):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    files = [str(write(tmp_path / f"s{i}.jsonl", ROWS[2 * i : 2 * i + 2], "jsonl")) for i in range(2)]
    assert list(hub_records("json", data_files=files, streaming=streaming)) == ROWS[:4]
    assert list(hub_records("json", data_files=files, streaming=streaming, max_files=1)) == ROWS[:2]
    with pytest.raises(StoryseekError, match="cannot load dataset json: .*split"):
        hub_records("json", data_files=files, split="nosuchsplit", streaming=streaming)


def test_unreachable_hub_names_offline_options(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on port 9
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(StoryseekError, match="cannot reach the Hugging Face Hub.*--dataset builtin.*--data-files"):
        hub_records(sources.DEFAULT_DATASET)
