"""AutoTokenizer.from_pretrained(export dir) encodes exactly as our tokenizers, special tokens included."""

import hashlib
import json
import os

import pytest

from storyseek.data.template import story_document
from storyseek.data.tokenizer import BPETokenizer, GPT2Tokenizer
from storyseek.data.tokenizer import hf_tokenizer_json
from storyseek.export.hf import tokenizer_config

transformers = pytest.importorskip("transformers")

EDGE_CASES = ["", " ", "  leading and trailing  ", "tabs\tand\nnew\n\nlines", "émoji 🐱🦊 and ünïcödé — “quotes”",
              "<|endoftext|><|prompt|>x<|story|>y<|moral|>z<|character|>", "<|prompt", "a<|endoftext|>b",
              "numbers 1234567 and 3.14, punctuation?!...", "   \n  \t  "]


def story_texts(shared_data, n=40):
    texts = []
    for name in ("aesop_fables.jsonl", "tinystories_train_first1000.jsonl"):
        with open(shared_data / name, encoding="utf-8") as f:
            for line, _ in zip(f, range(n)):
                r = json.loads(line)
                texts.append(story_document(r.get("prompt", "Write a story."), r["text"], r.get("moral")))
    return texts


def write_tokenizer_files(tokenizer, directory):
    (directory / "tokenizer.json").write_text(hf_tokenizer_json(tokenizer))
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(tokenizer, 1024)))
    return directory


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """GPT-2's tokenizer files, converted once (it takes seconds) for the tests below."""
    return write_tokenizer_files(GPT2Tokenizer(), tmp_path_factory.mktemp("gpt2"))


def assert_same_ids(ours, theirs, texts):
    for text in texts:
        ids = ours.encode(text)
        assert theirs(text)["input_ids"] == ids, text[:80]
        assert theirs.decode(ids) == ours.decode(ids)
    assert theirs.eos_token == "<|endoftext|>" and theirs.eos_token_id == ours.eot_id
    for token, i in ours.special_ids.items():
        assert theirs.convert_tokens_to_ids(token) == i
        assert token in theirs.all_special_tokens


def test_gpt2_auto_tokenizer_matches(shared_data, gpt2_dir):
    theirs = transformers.AutoTokenizer.from_pretrained(gpt2_dir)
    assert_same_ids(GPT2Tokenizer(), theirs, story_texts(shared_data) + EDGE_CASES)


def test_bpe_auto_tokenizer_matches(shared_data, tmp_path):
    texts = story_texts(shared_data)
    ours = BPETokenizer.train(2048, texts)
    theirs = transformers.AutoTokenizer.from_pretrained(write_tokenizer_files(ours, tmp_path))
    assert_same_ids(ours, theirs, texts + EDGE_CASES)


def test_gpt2_tokenizer_json_equals_transformers_tiktoken_converter(gpt2_dir):
    """Our dependency-free conversion builds what transformers' TikTokenConverter builds from the
    same r50k_base file (located through tiktoken's own cache naming), plus our special tokens."""
    import tiktoken_ext.openai_public as openai_public
    from tokenizers import Tokenizer as HFTokenizer
    from transformers.convert_slow_tokenizer import TikTokenConverter

    urls = []
    real = openai_public.load_tiktoken_bpe
    openai_public.load_tiktoken_bpe = lambda url, *a, **k: urls.append(url) or real(url, *a, **k)
    try:
        pat = openai_public.ENCODING_CONSTRUCTORS["r50k_base"]()["pat_str"]
    finally:
        openai_public.load_tiktoken_bpe = real
    cache = os.environ.get("TIKTOKEN_CACHE_DIR")
    if not cache:
        pytest.skip("TIKTOKEN_CACHE_DIR not set")
    vocab_file = os.path.join(cache, hashlib.sha1(urls[0].encode()).hexdigest())
    ours = GPT2Tokenizer()
    specials = [t for t, _ in sorted(ours.special_ids.items(), key=lambda kv: kv[1])]
    reference = TikTokenConverter(vocab_file=vocab_file, pattern=pat, extra_special_tokens=specials).converted()
    mine = HFTokenizer.from_file(str(gpt2_dir / "tokenizer.json"))
    assert json.loads(mine.to_str())["model"] == json.loads(reference.to_str())["model"]
    assert mine.get_vocab(with_added_tokens=True) == reference.get_vocab(with_added_tokens=True)
