"""storyseek eval: bits per byte equals an independent transformers computation, the sliding window
scores every token once, sources, story checks, and one-line errors."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from storyseek.cli import main
from storyseek.data.prepare import PrepareConfig, prepare
from storyseek.data.template import SPECIAL_PATTERN, story_document
from storyseek.data.tokenizer import BPETokenizer, GPT2Tokenizer
from storyseek.eval.score import score, windows
from storyseek.eval.stories import Prompt, Sample, prompts_from_file, sample_stories, split_story, story_checks
from storyseek.generate.config import GenerateConfig
from storyseek.model import Transformer, get_preset, pad_vocab

from helpers import write_ckpt

pytestmark = pytest.mark.usefixtures("one_thread")

STORIES = [
    ("Write a story about a brave mouse.", "Once upon a time, a little mouse named Pip lived under the stairs. "
     "One night he heard a noise — “Who is there?” he asked. It was only the wind. Pip smiled and went to sleep.",
     "Be brave."),
    ("Write a story about a kind bear.", "Bella the bear found a bird with a hurt wing. She made a warm nest "
     "and fed it berries. Soon the bird could fly again, and it sang for Bella every morning. 🐦", None),
    ("Write a story about two friends and a kite.", "Tom and Lily made a red kite. The wind took it high "
     "over the trees, and they laughed and ran after it until the sun went down.", "Sharing makes fun bigger."),
]
DOCS = [story_document(p, t, m) for p, t, m in STORIES]


@pytest.fixture(scope="module")
def bpe():
    return BPETokenizer.train(400, [t for _, t, _ in STORIES] * 30)


def random_model(tokenizer, seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = get_preset("tiny").replace(**{"vocab_size": pad_vocab(tokenizer.vocab_size), "n_layer": 2, "block_size": 64,
                                        **overrides})
    model = Transformer(cfg).eval()
    with torch.no_grad():  # sharper than the initial weights, so a wrong position or mask shows
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return model


def text_bytes(doc):
    return len(SPECIAL_PATTERN.sub("", doc).encode())


# ------------------------------------------------------------------------------ bytes and windows
@pytest.mark.parametrize("kind", ["gpt2", "bpe"])
def test_token_bytes_sum_to_the_text_bytes(kind, bpe):
    tok = GPT2Tokenizer() if kind == "gpt2" else bpe
    table = tok.token_bytes()
    assert table.shape == (tok.vocab_size,) and all(table[i] == 0 for i in tok.special_ids.values())
    for doc in DOCS:
        assert table[tok.encode(doc)].sum() == text_bytes(doc)


@pytest.mark.parametrize("n_ids, block, stride", [(5, 8, 4), (9, 8, 8), (30, 8, 3), (30, 8, 8), (31, 8, 1), (100, 16, 5)])
def test_windows_score_every_token_once_with_enough_context(n_ids, block, stride):
    scored = []
    for start, end, skip in windows(n_ids, block, stride):
        assert end - start <= block + 1
        for j in range(skip, end - start - 1):
            t = start + 1 + j  # the id this target position predicts
            scored.append(t)
            assert t - start >= min(t, block - stride + 1)  # context: ids start..t-1
    assert scored == list(range(1, n_ids))


# ---------------------------------------------------------------------------------- the scorer
def test_score_of_short_documents_matches_a_direct_computation(bpe):
    model = random_model(bpe, block_size=128)
    got = score(model, bpe, DOCS[:2], stride=16, batch_size=3, progress=False)
    nats, tokens = 0.0, 0
    table = bpe.token_bytes()
    for doc in DOCS[:2]:
        ids = torch.tensor([[bpe.eot_id, *bpe.encode(doc)]])
        with torch.no_grad():
            logp = model(ids[:, :-1]).logits.float().log_softmax(-1)[0]
        for i, t in enumerate(ids[0, 1:].tolist()):
            if table[t]:
                nats -= logp[i, t].item()
                tokens += 1
    assert got.tokens == tokens and got.bytes == sum(text_bytes(d) for d in DOCS[:2])
    assert got.nats == pytest.approx(nats, rel=1e-5)
    assert got.bpb == pytest.approx(nats / (math.log(2) * got.bytes), rel=1e-5)
    assert got.perplexity == pytest.approx(math.exp(nats / tokens), rel=1e-5)


def test_sliding_window_gives_each_token_its_stated_context(bpe):
    """stride 1: every token is predicted from exactly the block_size ids before it (or all of them)."""
    model = random_model(bpe, block_size=16)
    doc = DOCS[0]
    ids = [bpe.eot_id, *bpe.encode(doc)]
    assert len(ids) > 40
    table = bpe.token_bytes()
    nats = 0.0
    with torch.no_grad():
        for t in range(1, len(ids)):
            if table[ids[t]]:
                ctx = torch.tensor([ids[max(0, t - 16) : t]])
                nats -= model(ctx).logits[0, -1].float().log_softmax(-1)[ids[t]].item()
    got = score(model, bpe, [doc], stride=1, batch_size=7, progress=False)
    assert got.nats == pytest.approx(nats, rel=1e-5)
    half = score(model, bpe, [doc], stride=8, progress=False)  # less context, same tokens and bytes
    assert (half.tokens, half.bytes) == (got.tokens, got.bytes) and half.nats != pytest.approx(got.nats, rel=1e-6)


@pytest.mark.parametrize("kind", ["bpe", "gpt2"])
def test_bits_per_byte_of_an_export_equals_transformers(kind, bpe, tmp_path, capsys):
    """The target: `storyseek eval` on an exported model vs. an independent computation with
    transformers' own tokenizer and model on the same text, within 0.5%."""
    transformers = pytest.importorskip("transformers")
    tok = GPT2Tokenizer() if kind == "gpt2" else bpe
    write_ckpt(tmp_path / "m.pt", random_model(tok, block_size=256), tok)
    assert main(["export", "--model", str(tmp_path / "m.pt"), "--out", str(tmp_path / "hf")]) == 0
    (tmp_path / "s.jsonl").write_text("".join(json.dumps({"prompt": p, "text": t, **({"moral": m} if m else {})}) + "\n"
                                              for p, t, m in STORIES))
    capsys.readouterr()
    assert main(["eval", "--model", str(tmp_path / "hf"), "--files", str(tmp_path / "s.jsonl"), "--json",
                 "--device", "cpu", "--dtype", "float32"]) == 0
    (ours,) = json.loads(capsys.readouterr().out)["sources"]

    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    special = set(hf_tok.all_special_ids)
    nats, nbytes = 0.0, 0
    for doc in DOCS:  # what the file's records become in the training template
        ids = hf_tok(hf_tok.eos_token + doc, return_tensors="pt").input_ids
        assert ids[0, 0] == hf_tok.eos_token_id and ids.shape[1] < 256
        with torch.no_grad():
            logits = hf(ids).logits[0, :-1].float()
        target = ids[0, 1:]
        keep = torch.tensor([t not in special for t in target.tolist()])
        nats += F.cross_entropy(logits[keep], target[keep], reduction="sum").item()
        nbytes += len(hf_tok.decode(target[keep]).encode())
    assert ours["bytes"] == nbytes == sum(text_bytes(d) for d in DOCS)
    assert ours["bits_per_byte"] == pytest.approx(nats / (math.log(2) * nbytes), rel=5e-3)
    assert ours["bits_per_byte"] == pytest.approx(nats / (math.log(2) * nbytes), rel=1e-5)  # in fact: rounding only


# ------------------------------------------------------------------------------------- sources
@pytest.fixture(scope="module")
def story_dir(tmp_path_factory, bpe):
    """A prepared directory (bpe:300) of 120 stories with morals, and a model checkpoint of another tokenizer."""
    root = tmp_path_factory.mktemp("evaldata")
    rows = [{"prompt": f"Write a story about animal number {i}.", "moral": "Be kind." if i % 2 else None,
             "text": f"Once upon a time there was animal {i}. " + STORIES[i % 3][1]} for i in range(120)]
    (root / "s.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if v}) + "\n" for r in rows))
    prepare(PrepareConfig(data_files=(str(root / "s.jsonl"),), tokenizer="bpe:300", out=str(root / "d"),
                          val_fraction=0.2))
    return root


def _eval_json(args, capsys):
    capsys.readouterr()
    assert main(["eval", *args, "--json", "--device", "cpu"]) == 0
    return json.loads(capsys.readouterr().out)


def test_data_dir_scores_the_validation_split_with_any_tokenizer(story_dir, bpe, tmp_path, capsys):
    """The directory's tokenizer (bpe:300) differs from the model's (bpe:400): documents are decoded and
    re-tokenized, and the bytes (the denominator) do not depend on the tokenizer."""
    meta = json.loads((story_dir / "d" / "meta.json").read_text())
    a = _eval_json(["--model", str(write_ckpt(tmp_path / "a.pt", random_model(bpe, block_size=128), bpe)),
                    "--data", str(story_dir / "d")], capsys)
    from storyseek.data.tokenizer import load_tokenizer

    own = load_tokenizer(story_dir / "d")
    b = _eval_json(["--model", str(write_ckpt(tmp_path / "b.pt", random_model(own, block_size=128), own)),
                    "--data", str(story_dir / "d"), "--max-docs", "5"], capsys)
    (ra,), (rb,) = a["sources"], b["sources"]
    assert ra["documents"] == meta["splits"]["val"]["documents"] and rb["documents"] == 5
    assert a["tokenizer"] == "bpe:400" and b["tokenizer"] == "bpe:300" and a["variant"] == "MLA + MoE + MTP"
    val = np.fromfile(story_dir / "d" / "val.bin", dtype=meta["dtype"])
    assert ra["bytes"] == int(own.token_bytes()[val].sum())  # the whole split's text, in bytes
    assert ra["tokens"] != int(np.count_nonzero(own.token_bytes()[val]))  # ... in another tokenizer's tokens
    assert 0 < ra["bits_per_byte"] < 20 and ra["loss"] == pytest.approx(math.log(ra["perplexity"]))


def test_files_and_dataset_sources_per_file_with_a_total(story_dir, bpe, tmp_path, capsys):
    ckpt = write_ckpt(tmp_path / "m.pt", random_model(bpe, block_size=128), bpe)
    notes = tmp_path / "notes.txt"
    notes.write_text("The fox ran into the woods. It was a cold night.\n\nThe owl said hello to the moon, "
                     "and the moon said nothing at all, as moons do.\n")
    (tmp_path / "hub").mkdir()
    (tmp_path / "hub" / "validation.jsonl").write_text((story_dir / "s.jsonl").read_text())
    out = _eval_json(["--model", str(ckpt), "--files", str(story_dir / "s.jsonl"), str(notes), "--format", "text",
                      "--max-docs", "10"], capsys)
    rows = out["sources"]
    assert [r["source"] for r in rows] == [str(story_dir / "s.jsonl"), str(notes), "all"]
    assert rows[1]["documents"] == 2  # one per blank-line-separated block, as `prepare` reads .txt
    assert rows[1]["bytes"] == len(notes.read_text().replace("\n", "").encode())
    assert rows[2]["bytes"] == rows[0]["bytes"] + rows[1]["bytes"]
    assert rows[2]["bits_per_byte"] == pytest.approx(
        (rows[0]["bits_per_byte"] * rows[0]["bytes"] + rows[1]["bits_per_byte"] * rows[1]["bytes"]) / rows[2]["bytes"])
    # the Hub code path, on a local dataset folder (the real Hub is unreachable here)
    hub = _eval_json(["--model", str(ckpt), "--dataset", str(tmp_path / "hub"), "--split", "validation",
                      "--max-docs", "10"], capsys)
    files = _eval_json(["--model", str(ckpt), "--files", str(story_dir / "s.jsonl"), "--max-docs", "10"], capsys)
    assert {k: v for k, v in hub["sources"][0].items() if k != "source"} == \
           {k: v for k, v in files["sources"][0].items() if k != "source"}


@pytest.mark.parametrize("args, words", [
    (["--model", "nope.pt", "--files", "x.jsonl"], "file not found: x.jsonl"),
    (["--model", "nope.pt", "--data", "nodir"], "data directory not found: nodir"),
    (["--model", "nope.pt"], "nothing to evaluate"),
    (["--model", "{ckpt}", "--files", "{notes}", "--format", "text", "--stride", "500"], "--stride must be between 1 and"),
    (["--model", "{ckpt}", "--files", "{notes}", "--format", "text", "--stories", "2"], "--stories needs prompts"),
    (["--model", "{ckpt}", "--files", "{notes}", "--max-docs", "0"], "--max-docs must be >= 1"),
    (["--model", "{notes}", "--files", "{notes}", "--format", "text"], "not a readable storyseek checkpoint"),
    (["--model", "{ckpt}", "--stories", "2", "--prompts", "missing.txt"], "prompt file not found"),
])
def test_bad_inputs_are_one_line(args, words, bpe, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("The fox ran into the woods. It was a cold night and the stars were out.\n")
    ckpt = write_ckpt(tmp_path / "m.pt", random_model(bpe), bpe)
    args = [a.format(ckpt=ckpt, notes=notes) for a in args]
    capsys.readouterr()
    assert main(["eval", *args]) == 1
    captured = capsys.readouterr()
    assert words in captured.err and captured.err.count("\n") == 1 and captured.out == "", captured.err


# -------------------------------------------------------------------------------- story checks
def _sample(story, moral=None, ended=True, has_moral=True):
    return Sample(Prompt("p", has_moral), story, story, moral, 10, ended)


def test_story_check_measures():
    samples = [_sample("the cat sat on the mat the cat sat on the mat", moral="Be kind."),
               _sample("A dog ran. A dog ran far away!", ended=False),
               _sample("One two three", has_moral=False)]
    m = story_checks(samples)
    # 4-grams: story 1 has 9, of which 3 repeat ("the cat sat on", "cat sat on the", "sat on the mat");
    # story 2 has 5 ("a dog ran a", "dog ran a dog", "ran a dog ran", "a dog ran far", "dog ran far away"): none repeat.
    assert m["repeat_4gram"] == pytest.approx(3 / 14)
    # bigrams: 11 + 7 + 2 = 20; distinct: 6 ("the cat".."mat the") + 5 ("a dog", "dog ran", "ran a", "ran far", "far away") + 2
    assert m["distinct_2"] == pytest.approx(13 / 20)
    assert m["ended"] == pytest.approx(2 / 3) and m["mean_words"] == pytest.approx((12 + 8 + 3) / 3)
    assert m["moral"] == pytest.approx(1 / 2)  # over the two prompts whose record had a moral
    assert story_checks([_sample("x y", has_moral=False)])["moral"] is None


def test_split_story_and_prompt_files(tmp_path):
    assert split_story("<|character|>Pip<|story|>Once upon a time.<|moral|>Be brave.") == ("Once upon a time.", "Be brave.")
    assert split_story("Once upon<|prompt|> a time.") == ("Once upon  a time.", None)
    (tmp_path / "p.txt").write_text("a brave mouse\n\n  a kind bear  \n")
    assert [p.text for p in prompts_from_file(tmp_path / "p.txt")] == ["a brave mouse", "a kind bear"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "a fox", "moral": "Be kind."}\n{"prompt": "an owl"}\n')
    assert [(p.text, p.has_moral) for p in prompts_from_file(tmp_path / "p.jsonl")] == [("a fox", True), ("an owl", False)]


def test_sampled_stories_are_reproducible_and_counted(bpe):
    model = random_model(bpe, block_size=128)
    prompts = [Prompt("a brave mouse", True), Prompt("a kind bear", False)]
    cfg = GenerateConfig(max_tokens=12, seed=3)
    a = sample_stories(model, bpe, prompts, 5, cfg, batch_size=2, progress=False)
    b = sample_stories(model, bpe, prompts, 5, cfg, batch_size=2, progress=False)
    assert [s.text for s in a] == [s.text for s in b] and len(a) == 5
    assert [s.prompt.text for s in a] == ["a brave mouse", "a kind bear"] * 2 + ["a brave mouse"]
    assert all(s.new_tokens <= 12 and s.ended == (s.new_tokens < 12) for s in a)


def test_eval_command_prints_table_and_stories(story_dir, bpe, tmp_path, capsys):
    ckpt = write_ckpt(tmp_path / "m.pt", random_model(bpe, block_size=128), bpe)
    capsys.readouterr()
    assert main(["eval", "--model", str(ckpt), "--data", str(story_dir / "d"), "--stories", "3", "--max-tokens", "20",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "bits/byte" in out and "(val, story)" in out and "story checks (3 stories" in out
    assert "moral present" in out and out.count("--- story ") == 2


# ------------------------------------------------------------------------------ training's val_bpb
def test_training_logs_val_bpb_as_eval_defines_it(story_dir, tmp_path, capsys):
    """The CSV's val_bpb is the text tokens' nats over ln 2 x their bytes on the evaluation batches:
    recomputed here from final_model.pt on the same batches."""
    import csv

    from storyseek.checkpoint import load_checkpoint, model_from_checkpoint
    from storyseek.data.batches import RandomWindows
    from storyseek.data.shards import open_tokens
    from storyseek.data.tokenizer import load_tokenizer

    data, out = story_dir / "d", tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(out), "--preset", "tiny", "--n-layer", "2", "--block-size",
                 "32", "--batch-size", "4", "--max-iters", "6", "--eval-interval", "3", "--eval-iters", "3",
                 "--device", "cpu", "--dtype", "float32"]) == 0
    console = capsys.readouterr().out
    with open(out / "training_log.csv", newline="") as f:
        last = list(csv.DictReader(f))[-1]
    assert f"val_bpb {float(last['val_bpb']):.4f}" in console
    model = model_from_checkpoint(load_checkpoint(out / "final_model.pt")).eval()
    table = torch.from_numpy(load_tokenizer(data).token_bytes())
    batches = RandomWindows(open_tokens(data, "val"), 4, 32, torch.device("cpu"), seed=20_000)  # the val batches
    nats = nbytes = 0.0
    with torch.no_grad():
        for _ in range(3):
            x, y = next(batches)
            ce = F.cross_entropy(model(x).logits.flatten(0, 1), y.flatten(), reduction="none")
            b = table[y.flatten()]
            nats += ce[b > 0].sum().item()
            nbytes += b.sum().item()
    assert float(last["val_bpb"]) == pytest.approx(nats / (math.log(2) * nbytes), rel=1e-5)
    assert (out / "training_metrics.png").stat().st_size > 10_000
