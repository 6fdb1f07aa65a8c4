"""The Tokenizer interface: GPT-2 via tiktoken and a trained byte-level BPE."""

import json

import numpy as np
import pytest

from storyseek.data.template import END, PROMPT, SPECIAL_TOKENS, STORY, story_document
from storyseek.data.tokenizer import (
    BPETokenizer,
    Tokenizer,
    build_tokenizer,
    load_tokenizer,
    parse_spec,
)
from storyseek.errors import StoryseekError

DOCS = [
    story_document("Write a story about a cat.", f"Tom the cat had a red ball number {i}. He was happy.\n\nThe end.", "Share.")
    for i in range(40)
] + ["Caf\u00e9 na\u00efve \u201cquotes\u201d \u2014 emoji \U0001F600 and mojibake \u00e2\u20ac\u0153." + END]


@pytest.fixture(scope="module")
def gpt2():
    return build_tokenizer("gpt2")


@pytest.fixture(scope="module")
def bpe():
    return build_tokenizer("bpe:400", training_texts=DOCS)


def test_gpt2_ids_and_specials(gpt2):
    assert gpt2.spec == "gpt2" and gpt2.vocab_size == 50261
    assert gpt2.eot_id == 50256  # GPT-2's own <|endoftext|>
    assert sorted(gpt2.special_ids.values()) == [50256, 50257, 50258, 50259, 50260]
    assert gpt2.encode("Hello world", allow_special=False) == [15496, 995]  # GPT-2's known ids
    ids = gpt2.encode(PROMPT + "Hi" + STORY + END)
    assert ids[0] == gpt2.special_ids[PROMPT] and ids[-1] == gpt2.eot_id
    assert len(gpt2.encode(END, allow_special=False)) > 1  # spelled out as text


@pytest.mark.parametrize("name", ["gpt2", "bpe"])
def test_round_trip_and_bulk_path(name, request):
    tok: Tokenizer = request.getfixturevalue(name if name == "gpt2" else "bpe")
    text = "".join(DOCS)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert np.array_equal(tok.encode_array(text), np.array(ids, dtype=np.uint32))
    assert tok.encode_batch(DOCS[:3]) == [tok.encode(d) for d in DOCS[:3]]
    assert ids.count(tok.eot_id) == len(DOCS)
    plain = tok.encode(text, allow_special=False)
    assert tok.eot_id not in plain and tok.decode(plain) == text


def test_bpe_specials_and_size(bpe):
    assert bpe.spec == "bpe:400"
    assert bpe.vocab_size <= 400
    assert [bpe.special_ids[t] for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert len(bpe.encode(DOCS[0])) < len(DOCS[0].encode()) / 2  # it learned merges


@pytest.mark.parametrize("name", ["gpt2", "bpe"])
def test_to_dict_is_complete_and_json(name, request, tmp_path):
    tok = request.getfixturevalue(name)
    d = json.loads(json.dumps(tok.to_dict()))
    again = Tokenizer.from_dict(d)
    assert (again.spec, again.vocab_size, again.special_ids) == (tok.spec, tok.vocab_size, tok.special_ids)
    assert again.encode(DOCS[1]) == tok.encode(DOCS[1])
    tok.save(tmp_path)
    assert load_tokenizer(tmp_path).encode(DOCS[2]) == tok.encode(DOCS[2])


def test_bpe_hf_file_loads_with_tokenizers(bpe, tmp_path):
    from tokenizers import Tokenizer as HF

    bpe.save(tmp_path)
    hf = HF.from_file(str(tmp_path / "tokenizer.json"))
    assert hf.encode(DOCS[0], add_special_tokens=False).ids == bpe.encode(DOCS[0])
    assert isinstance(bpe, BPETokenizer)


@pytest.mark.parametrize("spec", ["gpt3", "bpe", "bpe:abc", "bpe:100", "BPE:4096", ""])
def test_bad_specs(spec):
    with pytest.raises(StoryseekError, match="bpe"):
        parse_spec(spec)


def test_gpt2_unavailable_offline_says_how(monkeypatch):
    import tiktoken

    def offline(name):
        raise ConnectionError("no network")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(StoryseekError, match="TIKTOKEN_CACHE_DIR"):
        build_tokenizer("gpt2")


def test_load_tokenizer_missing(tmp_path):
    with pytest.raises(StoryseekError, match="storyseek prepare"):
        load_tokenizer(tmp_path)


def test_from_dict_rejects_other_special_ids(gpt2):
    d = gpt2.to_dict()
    d["special_ids"] = {**d["special_ids"], "<|story|>": 7}
    with pytest.raises(StoryseekError, match="special token ids differ"):
        Tokenizer.from_dict(d)
    with pytest.raises(StoryseekError, match="not a storyseek tokenizer"):
        Tokenizer.from_dict({"spec": "bpe:300"})
