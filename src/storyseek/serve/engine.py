"""Continuous batching on one latent cache: rows join and leave a running decode batch.

The cache has `max_batch` slots. The active rows always occupy slots 0..B-1, so one decode step
is one forward over the cache's first B slots: no compute is spent on free slots.

    join:   a new row is prefilled alone into slot B (positions 0..len-1, the expanded-attention
            prefill) and takes its first token from that prefill; the next step decodes it with the rest.
    step:   every active row feeds its last token at its own position: idx, pos [B, 1]. Rows sit at
            independent positions; the latent attention masks each row to positions <= its own.
    leave:  a finished or cancelled row's slot is refilled with the last row (its latents up to its
            length are copied over), keeping the active rows contiguous.

State per row, as in generate/decode.py: the row holds tokens t_0..t_{n-1}, the cache holds
positions 0..n-2 and t_{n-1} is fed by the next step. A row that outgrows the context slides its
window the way `storyseek generate` does (keep the last 3/4, re-prefill into its own slot).

Each row samples with its own settings and its own random generator, so a seeded request gets the
same tokens whatever else is in the batch. Text (incremental detokenizing, the story view, stop
strings) is rendered here too, so the thread that serves HTTP only forwards strings.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..data.tokenizer import Tokenizer
from ..device import CompiledStep, require_compiler
from ..generate import graphs
from ..generate.config import SamplingConfig
from ..generate.sampling import draw, end_held, probabilities, since_begin, story_start
from ..generate.text import TextStream
from ..model import Transformer


@dataclass(eq=False)  # rows are compared by identity: two choices of one request look alike
class Row:
    """One sequence being decoded: a choice of a request (n choices are n rows)."""

    prompt: list[int]  # token ids, at most block_size - 1
    max_tokens: int
    sampling: SamplingConfig
    stop_ids: frozenset[int]
    raw: bool  # text as decoded; False: the story view (what follows <|story|>, the moral on its own line)
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings: the text ends before the first one
    logit_bias: dict[int, float] = field(default_factory=dict)
    begin_id: int | None = None  # story rows: <|story|>, where min_tokens start counting (data.tokenizer.begin_id)
    # ----- decoding state
    tokens: list[int] = field(default_factory=list)  # the current window: prompt + new tokens
    generated: int = 0
    story_tokens: int = field(init=False)  # new tokens since the story began (negative: in the header)
    finish_reason: str | None = None  # "stop" | "length" once finished
    text_sent: int = 0  # characters of `text` already handed out
    text: str = ""

    def __post_init__(self) -> None:
        self.tokens = list(self.prompt)
        self.story_tokens = story_start(self.begin_id)


@dataclass
class Output:
    """What one row produced in one step: text that became final, and whether the row ended."""

    row: Row
    text: str
    finish_reason: str | None


class Engine:
    """The decode batch. Not thread-safe: one thread (the scheduler's decode loop) drives it."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, max_batch: int, compile: bool = False,
                 cuda_graphs: bool = True):
        self.model, self.tokenizer = model, tokenizer
        if compile:
            require_compiler(model.embed.weight.device)
        # Decode steps compiled under --compile (device.CompiledStep); prefills stay eager.
        self.forward_step = CompiledStep(model) if compile else model
        self.V = tokenizer.vocab_size  # ids >= it are the embedding's padding: never sampled
        self.block = model.cfg.block_size
        self.device = model.embed.weight.device
        self.max_batch = max_batch
        self.cache = model.new_cache(max_batch)
        # On a GPU: a CUDA graph per batch size, attending to the whole cache (generate/graphs.py),
        # recording the compiled step under --compile.
        self.graphed = None
        if graphs.use_graphs(cuda_graphs, self.device):
            self.graphed = graphs.GraphedStep(lambda idx, pos: self.forward_step(
                idx, cache=self.cache, pos=pos, length=self.block).logits[:, -1])
        self.rows: list[Row] = []  # rows[i] lives in cache slot i
        self._streams: dict[int, TextStream] = {}
        self._generators: dict[int, torch.Generator] = {}
        if compile:
            self._compile()

    def _compile(self) -> None:
        """Compile before the first request, so that no request waits for a recompile: a step of
        every batch size, written at position 0 of slots a prefill will overwrite (with CUDA graphs,
        in the graphs' shape: the whole cache attended). torch.compile specializes sizes of 1 (a batch
        of one; so the attended length here is 2) and inputs that alias (so idx and pos are two
        tensors), and a batch size where the layout of a product changes (model/linear.py) compiles
        once more; sizes in between reuse a graph. Every step passes the whole cache (the model takes
        its first B rows): a view of the first B rows would be a new input layout when B reaches
        max_batch, and recompile."""
        with torch.inference_mode():
            for B in range(1, self.max_batch + 1):
                idx, pos = (torch.zeros(B, 1, dtype=torch.long, device=self.device) for _ in range(2))
                self.forward_step(idx, cache=self.cache, pos=pos, length=self.block if self.graphed else 2)

    @property
    def free(self) -> int:
        return self.max_batch - len(self.rows)

    # ------------------------------------------------------------------ join/leave
    def add(self, row: Row) -> Output:
        """Prefill `row` into the next free slot and choose its first token."""
        if not self.free:
            raise RuntimeError("no free slot")
        if not 0 < len(row.prompt) < self.block:
            raise ValueError(f"a prompt needs 1..{self.block - 1} tokens, got {len(row.prompt)}")
        slot = len(self.rows)
        self.rows.append(row)
        self._streams[id(row)] = TextStream(self.tokenizer, row.raw)
        gen = torch.Generator(device=self.device)
        gen.seed() if row.seed is None else gen.manual_seed(row.seed)
        self._generators[id(row)] = gen
        with torch.inference_mode():
            logits = self._prefill(slot, row.tokens)
            (out,) = self._advance([row], logits)
        return out

    def remove(self, row: Row) -> None:
        """Free the row's slot (finished or cancelled): the last row moves into it."""
        i, last = self.rows.index(row), len(self.rows) - 1
        if i != last:
            n = min(len(self.rows[last].tokens), self.block)
            # Every cache tensor (MLA latents; MHA keys and values) is [layers, slots, positions, ...].
            for t in vars(self.cache).values():
                if isinstance(t, torch.Tensor):
                    t[:, i, :n] = t[:, last, :n]
            self.rows[i] = self.rows[last]
        self.rows.pop()
        del self._streams[id(row)], self._generators[id(row)]

    # ------------------------------------------------------------------ decoding
    def step(self) -> list[Output]:
        """One token for every active row (finished rows must have been removed)."""
        if not self.rows:
            return []
        with torch.inference_mode():
            for i, row in enumerate(self.rows):
                if len(row.tokens) > self.block:
                    self._slide(i, row)
            positions = [len(r.tokens) - 1 for r in self.rows]
            idx = torch.tensor([[r.tokens[-1]] for r in self.rows], device=self.device)  # [B, 1]: slots 0..B-1
            pos = torch.tensor(positions, device=self.device).unsqueeze(1)  # [B, 1]
            if self.graphed:
                logits = self.graphed(idx, pos)  # [B, vocab]: the graph's output, valid until its next replay
            else:
                logits = self.forward_step(idx, cache=self.cache, pos=pos,
                                           length=max(positions) + 1).logits[:, -1]  # [B, vocab]
            return self._advance(self.rows, logits)

    def _prefill(self, slot: int, tokens: list[int]) -> torch.Tensor:
        """A fresh prefill: tokens at positions 0..len-1 into `slot` -> the last position's logits [1, vocab]."""
        idx = torch.tensor([tokens], device=self.device)
        return self.model(idx, cache=self.cache.narrow(slot), last_only=True).logits[:, -1]

    def _slide(self, slot: int, row: Row) -> None:
        """Keep the last 3/4 of the context (as `storyseek generate` does) and re-prefill all but the
        last token into the row's own slot; the next step feeds the last one."""
        row.tokens = row.tokens[-(self.block - self.block // 4):]
        self._prefill(slot, row.tokens[:-1])

    def _advance(self, rows: list[Row], logits: torch.Tensor) -> list[Output]:
        """logits [B, vocab] of each row's next token -> choose, append, render, apply stops."""
        tokens = self._choose(rows, logits[:, : self.V].float())
        outs = []
        for row, t in zip(rows, tokens):
            new = []
            if t in row.stop_ids:
                row.finish_reason = "stop"
            else:
                new = [t]
                row.tokens.append(t)
                row.generated += 1
                row.story_tokens = since_begin(row.story_tokens, t, row.begin_id)
                if row.generated >= row.max_tokens:
                    row.finish_reason = "length"
            outs.append(Output(row, self._render(row, new), row.finish_reason))
        return outs

    def _choose(self, rows: list[Row], logits: torch.Tensor) -> list[int]:
        """Greedy rows take the argmax together; rows that sample share one `probabilities` per
        setting (temperature, top-k, top-p) and draw one by one, each from its own generator.
        Before a row has min_tokens new tokens (a story row: after its <|story|>), its stop tokens are
        out of the running."""
        for i, row in enumerate(rows):
            if row.logit_bias:
                ids = torch.tensor(list(row.logit_bias), device=self.device)
                logits[i, ids] += torch.tensor(list(row.logit_bias.values()), device=self.device)
            if end_held(row.story_tokens, row.sampling.min_tokens):
                logits[i, [t for t in row.stop_ids if t < self.V]] = float("-inf")
        chosen = logits.argmax(-1).tolist()
        groups: dict[tuple, list[int]] = {}
        for i, row in enumerate(rows):
            if not row.sampling.greedy:
                s = row.sampling
                groups.setdefault((s.temperature, s.top_k, s.top_p), []).append(i)
        for members in groups.values():
            probs = probabilities(logits[members], rows[members[0]].sampling)  # [G, V]
            for j, i in enumerate(members):
                chosen[i] = int(draw(probs[j : j + 1], self._generators[id(rows[i])]))
        return chosen

    def _render(self, row: Row, new: list[int]) -> str:
        """The text that is final after this step: what the tokens spell, cut at a stop string,
        holding back a tail that could still become the start of one."""
        stream = self._streams[id(row)]
        row.text += stream.push(new)
        if row.finish_reason:
            row.text += stream.finish()
        hold = 0
        if row.stop:
            start = max(0, row.text_sent - max(map(len, row.stop)) + 1)
            hits = [i for i in (row.text.find(s, start) for s in row.stop) if i >= 0]
            if hits:
                row.text = row.text[: min(hits)]
                row.finish_reason = "stop"
            elif not row.finish_reason:
                hold = max(map(len, row.stop)) - 1
        end = max(row.text_sent, len(row.text) - hold)
        piece, row.text_sent = row.text[row.text_sent : end], end
        return piece
