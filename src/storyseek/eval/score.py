"""Loss, perplexity and bits per byte of a model on documents, with a sliding window.

Every model is scored the same way, whatever its tokenizer:

  * each document is tokenized by the model's tokenizer and preceded by `<|endoftext|>` (what
    precedes it in the training stream), so its first token is predicted too;
  * the template's special tokens (`<|prompt|>`, `<|character|>`, `<|story|>`, `<|moral|>`,
    `<|endoftext|>`) are context only: they are never scored and cover no bytes;
  * every other token is scored exactly once, with the main next-token head (MTP plays no part):

        loss = nats / tokens,   perplexity = e^loss,   bits per byte = nats / (ln 2 x bytes)

    where nats is the summed -log p of the scored tokens and bytes the UTF-8 bytes of the text they
    spell (byte-level BPE is lossless, so that is the document's text without its markers).

A document longer than the context is cut into windows of block_size + 1 tokens, `stride` apart
(the last one aligned to the document's end): the first window scores all its tokens, each later
one only those no earlier window scored, so every token keeps at least block_size - stride tokens
of context (HF's "perplexity of fixed-length models" recipe). stride = block_size: no overlap;
smaller: more context, more compute.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ..data.tokenizer import Tokenizer
from ..errors import StoryseekError
from ..model import Transformer
from ..model.loss import token_nats

LOG2 = math.log(2)


@dataclass
class Score:
    name: str = ""
    documents: int = 0
    tokens: int = 0  # tokens scored
    bytes: int = 0  # UTF-8 bytes of the text they cover
    nats: float = 0.0  # summed negative log-likelihood of the scored tokens

    @property
    def loss(self) -> float:
        return self.nats / self.tokens if self.tokens else math.nan

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.tokens else math.nan

    @property
    def bpb(self) -> float:
        return self.nats / (LOG2 * self.bytes) if self.bytes else math.nan

    def __add__(self, other: Score) -> Score:
        return Score("all", self.documents + other.documents, self.tokens + other.tokens,
                     self.bytes + other.bytes, self.nats + other.nats)

    def to_dict(self) -> dict:
        return {"source": self.name, "documents": self.documents, "tokens": self.tokens, "bytes": self.bytes,
                "loss": self.loss, "perplexity": self.perplexity, "bits_per_byte": self.bpb}


def windows(n_ids: int, block: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """(start, end, skip) for a sequence of n_ids ids: the window is ids[start:end] (at most block + 1
    ids: block inputs, block targets) and its first `skip` targets were scored by an earlier window."""
    if not 1 <= stride <= block:
        raise StoryseekError(f"--stride must be between 1 and the model's context ({block}), got {stride}")
    start, scored = 0, 0  # ids[1 : scored + 1] have been scored
    while True:
        end = min(start + block + 1, n_ids)
        yield start, end, max(0, scored - start)
        scored = end - 1
        if end == n_ids:
            return
        start = min(start + stride, n_ids - block - 1)


def _batches(docs: list[list[int]], block: int, stride: int, batch_size: int):
    """Lists of (window ids, skip), longest windows first so a batch pads little."""
    items = [(ids[s:e], skip) for ids in docs for s, e, skip in windows(len(ids), block, stride)]
    items.sort(key=lambda it: -len(it[0]))
    for i in range(0, len(items), batch_size):
        yield items[i : i + batch_size]


@torch.no_grad()
def score(model: Transformer, tokenizer: Tokenizer, texts: list[str], *, name: str = "", stride: int | None = None,
          batch_size: int = 8, progress: bool = True) -> Score:
    """Score documents (template text, as `prepare` writes it) with `model` (in eval mode)."""
    block = model.cfg.block_size
    stride = stride or max(1, block // 2)
    device = model.embed.weight.device
    table = tokenizer.token_bytes()  # [vocab]
    nbytes = torch.from_numpy(table).to(device)
    eot = tokenizer.eot_id
    docs = [[eot, *tokenizer.encode(t)] for t in texts]
    result = Score(name, documents=len(docs))
    total = sum(int(np.count_nonzero(table[d[1:]])) for d in docs)
    from tqdm import tqdm

    bar = tqdm(total=total, desc=f"scoring {name}".strip(), unit=" tokens", disable=None if progress else True,
               file=sys.stderr, dynamic_ncols=True, leave=False)
    nats = torch.zeros((), dtype=torch.float64, device=device)
    for batch in _batches(docs, block, stride, batch_size):
        S = max(len(w) for w, _ in batch) - 1
        x = torch.zeros(len(batch), S, dtype=torch.long)
        y = torch.full((len(batch), S), -1, dtype=torch.long)  # -1: not scored
        for r, (w, skip) in enumerate(batch):
            w = torch.tensor(w)
            x[r, : len(w) - 1] = w[:-1]
            y[r, skip : len(w) - 1] = w[1 + skip :]
        x, y = x.to(device), y.to(device)
        y = torch.where((y >= 0) & (nbytes[y.clamp(min=0)] > 0), y, -1)  # special tokens are context only
        # Causal: the right padding of shorter windows cannot reach their scored positions.
        hidden = model(x, last_only=True).hidden  # [B, S, D]
        h, t = hidden[y >= 0], y[y >= 0]  # [M, D], [M]
        nats += token_nats(model.head, h, t).double().sum()
        result.tokens += len(t)
        result.bytes += int(nbytes[t].sum())
        bar.update(len(t))
    bar.close()
    result.nats = float(nats)
    return result
