"""Token-level decoding: prefill, cached decode, MTP self-speculative decode, and the no-cache reference.

One loop serves every mode. Each row of the batch is a sequence with its own position, its own stop
and its own window; the loop yields, after every step, the tokens each row confirmed.

State between steps (all modes): row r holds tokens t_0..t_{n-1}; the main model's latent cache holds
positions 0..n-2 and the last token t_{n-1} is not fed yet.

Plain step:        feed t_{n-1} at n-1 -> p(t_n) -> sample t_n.
Speculative step (MTP depth 1, DeepSeek-V3 section 2.2 used as a draft model, "self-speculative"):
  the MTP module has already seen positions 0..n-2 (hidden h_i of the main model + token t_{i+1})
  and proposed a draft d ~ q for t_n. One main forward on [t_{n-1}, d] at [n-1, n] gives p(t_n)
  and p(t_{n+1} | d). Accept d with probability min(1, p(d)/q(d)) (greedy: iff d = argmax p);
  if accepted also take a bonus token from p(t_{n+1} | d), else resample t_n from norm(max(0, p - q)).
  Then MTP runs on the newly confirmed positions (n-1, and n if accepted), which both keeps its cache
  in sync and yields the next draft. A rejected draft's latent at position n is simply overwritten
  by the next write (the cache is indexed by position), so rollback costs nothing.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass

import torch

from ..errors import StoryseekError
from ..model import LatentCache, Transformer
from .config import GenerateConfig
from .sampling import draw, probabilities, speculative_accept


@dataclass
class DecodeStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    drafted: int = 0  # MTP drafts verified
    accepted: int = 0  # ... of which the main model accepted
    first_token_s: float = 0.0  # prompt in -> first token out
    total_s: float = 0.0
    truncated_prompts: int = 0  # prompts longer than the context (their last tokens were kept)

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.total_s if self.total_s > 0 else 0.0


def decode(model: Transformer, prompts: list[list[int]], cfg: GenerateConfig, *, vocab_size: int | None = None,
           stop_ids: Collection[int] = (), stats: DecodeStats | None = None) -> Iterator[list[list[int]]]:
    """Generate for every prompt (lists of ids, each non-empty) in one batch.

    Yields once per step a list with each row's newly confirmed tokens (possibly empty). A row ends
    at a token of `stop_ids` (not yielded) or after cfg.max_tokens tokens. `vocab_size` is the tokenizer's:
    ids >= it (the embedding's padding) are never sampled. The model must be in eval mode.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise StoryseekError("every prompt needs at least one token")
    stats = stats if stats is not None else DecodeStats()
    with torch.inference_mode():
        yield from _Decoder(model, prompts, cfg, vocab_size or model.cfg.vocab_size, stop_ids, stats).run()


def generate_ids(model: Transformer, prompts: list[list[int]], cfg: GenerateConfig, *, vocab_size: int | None = None,
                 stop_ids: Collection[int] = (), stats: DecodeStats | None = None) -> list[list[int]]:
    """`decode` run to the end: the new tokens of each row."""
    out: list[list[int]] = [[] for _ in prompts]
    for step in decode(model, prompts, cfg, vocab_size=vocab_size, stop_ids=stop_ids, stats=stats):
        for row, new in zip(out, step):
            row.extend(new)
    return out


class _Decoder:
    def __init__(self, model, prompts, cfg: GenerateConfig, vocab_size, stop_ids, stats: DecodeStats):
        self.model, self.cfg, self.sampling = model, cfg, cfg.sampling
        self.V, self.stop_ids, self.stats = vocab_size, frozenset(stop_ids), stats
        self.block = model.cfg.block_size
        self.speculative = cfg.use_speculative(model)
        self.device = model.embed.weight.device
        self.gen = torch.Generator(device=self.device)
        if cfg.seed is None:
            self.gen.seed()
        else:
            self.gen.manual_seed(cfg.seed)
        # A prompt keeps its last block_size - 1 tokens: room for at least one new token.
        keep = self.block - 1
        stats.truncated_prompts = sum(len(p) > keep for p in prompts)
        self.seqs = [list(p[-keep:]) for p in prompts]  # the tokens of each row's current window
        stats.prompt_tokens = sum(len(s) for s in self.seqs)
        B = len(prompts)
        self.generated = [0] * B
        self.done = [False] * B
        self.seen = None
        if self.sampling.repetition_penalty != 1.0:
            self.seen = torch.zeros(B, self.V, dtype=torch.bool, device=self.device)
            for r, s in enumerate(self.seqs):
                self.seen[r, torch.tensor(s, device=self.device).clamp_(max=self.V - 1)] = True

    # ----------------------------------------------------------------- helpers
    def _logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits[..., : self.V]  # padded vocab ids can never be chosen

    def _choose(self, logits: torch.Tensor, seen: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """logits [B, V] -> (token [B], the distribution it came from, or None when greedy)."""
        if self.sampling.greedy:
            if seen is not None:
                logits = probabilities(logits, self.sampling, seen)  # one-hot after the penalty
            return logits.argmax(-1), None
        probs = probabilities(logits, self.sampling, seen)
        return draw(probs, self.gen), probs

    def _accept(self, rows_new: list[list[int]]) -> list[list[int]]:
        """Apply stops and the token budget to each row's candidate tokens; record what is kept."""
        out = []
        for r, new in enumerate(rows_new):
            if self.done[r]:
                out.append([])
                continue
            kept = []
            for t in new:
                if t in self.stop_ids:
                    self.done[r] = True
                    break
                kept.append(t)
                if self.generated[r] + len(kept) >= self.cfg.max_tokens:
                    self.done[r] = True
                    break
            self.generated[r] += len(kept)
            self.seqs[r].extend(kept)
            if self.seen is not None and kept:
                self.seen[r, torch.tensor(kept, device=self.device)] = True
            out.append(kept)
        self.stats.new_tokens += sum(len(k) for k in out)
        return out

    def _pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad rows by repeating each row's last token at its last position: a duplicate write
        of the same latent to the same place, so no row ever sees padding. -> idx, pos [B, S]."""
        S = max(len(r) for r in rows)
        idx = torch.tensor([r + [r[-1]] * (S - len(r)) for r in rows], device=self.device)
        pos = torch.tensor([list(range(len(r))) + [len(r) - 1] * (S - len(r)) for r in rows], device=self.device)
        return idx, pos

    # ---------------------------------------------------------------- the loop
    def run(self) -> Iterator[list[list[int]]]:
        start = time.perf_counter()
        steps = self._no_cache() if not self.cfg.use_cache else self._speculative() if self.speculative else self._plain()
        first = True
        for new in steps:
            if first:
                self.stats.first_token_s = time.perf_counter() - start
                first = False
            self.stats.total_s = time.perf_counter() - start
            yield new
            if all(self.done):
                break
        self.stats.total_s = time.perf_counter() - start

    def _prefill(self, cache: LatentCache, rows: list[list[int]]):
        """Feed whole windows (each at positions 0..len-1) -> (last logits [B, V], hidden [B, S, D], pos)."""
        idx, pos = self._pad(rows)
        out = self.model(idx, cache=cache, pos=pos, last_only=True)
        return self._logits(out.logits[:, -1]), out.hidden, idx, pos

    def _no_cache(self) -> Iterator[list[list[int]]]:
        """The reference: every step runs the full forward on each row's last block_size tokens."""
        while True:
            windows = [s[-self.block :] for s in self.seqs]
            lengths = torch.tensor([len(w) for w in windows], device=self.device)
            idx, _ = self._pad(windows)
            # Causal, so padding after a row cannot change it; the head runs on each row's last position only.
            hidden = self.model(idx, last_only=True).hidden  # [B, S, D]
            last = self._logits(self.model.head(hidden[torch.arange(len(windows)), lengths - 1]))
            tok, _ = self._choose(last, self.seen)
            yield self._accept([[t] for t in tok.tolist()])

    def _plain(self) -> Iterator[list[list[int]]]:
        B = len(self.seqs)
        cache = self.model.new_cache(B)
        logits, _, _, _ = self._prefill(cache, self.seqs)
        tok, _ = self._choose(logits, self.seen)
        yield self._accept([[t] for t in tok.tolist()])
        rows = torch.arange(B, device=self.device)
        while True:
            for r in range(B):
                if not self.done[r] and len(self.seqs[r]) > self.block:
                    self._slide(cache, r)
            # Finished rows keep re-feeding their last token at its old position: harmless, no growth.
            pos = torch.tensor([[min(len(s), self.block) - 1] for s in self.seqs], device=self.device)
            idx = torch.tensor([[s[-1]] for s in self.seqs], device=self.device)
            out = self.model(idx, cache=cache, pos=pos)
            tok, _ = self._choose(self._logits(out.logits[rows, -1]), self.seen)
            yield self._accept([[t] for t in tok.tolist()])

    def _slide(self, cache: LatentCache, r: int) -> tuple:
        """Row r outgrew the context: keep its last 3/4 block, re-prefill it at positions 0.. in the
        row's own cache slice (its last token stays unfed, as the loop expects). Returns what MTP
        needs to catch up: (the row's cache view, hidden [1, S, D], next tokens [1, S], pos [1, S])."""
        keep = self.block - self.block // 4
        self.seqs[r] = self.seqs[r][-keep:]
        view = cache.narrow(r)
        _, hidden, idx, pos = self._prefill(view, [self.seqs[r][:-1]])
        nxt = torch.tensor([self.seqs[r][1:]], device=self.device)
        return view, hidden, nxt, pos

    def _speculative(self) -> Iterator[list[list[int]]]:
        model, B = self.model, len(self.seqs)
        cache = model.new_cache(B)
        rows = torch.arange(B, device=self.device)
        greedy = self.sampling.greedy
        logits, hidden, idx, pos = self._prefill(cache, self.seqs)
        tok, _ = self._choose(logits, self.seen)
        # MTP sees every prompt position i with (h_i, t_{i+1}); the last one's next token is `tok`.
        # Padding columns repeat the last position, so they must repeat its pair (h_{len-1}, tok) too.
        lengths = torch.tensor([len(s) for s in self.seqs], device=self.device)
        cols = torch.arange(idx.size(1), device=self.device)
        nxt = torch.where(cols >= lengths[:, None] - 1, tok[:, None], idx.roll(-1, dims=1))
        yield self._accept([[t] for t in tok.tolist()])
        draft_logits, _ = model.mtp_step(hidden, nxt, cache, pos, last_only=True)
        draft_logits = self._logits(draft_logits[:, -1])  # [B, V]: proposes t_n
        while True:
            for r in range(B):
                if not self.done[r] and len(self.seqs[r]) + 1 > self.block:  # verify writes at n-1 and n
                    view, h, nx, ps = self._slide(cache, r)
                    draft_logits[r] = self._logits(model.mtp_step(h, nx, view, ps, last_only=True)[0][0, -1])
            seen = self.seen
            draft, q = self._choose(draft_logits, seen)
            last = torch.tensor([s[-1] for s in self.seqs], device=self.device)
            # position of t_{n-1} (a finished row may sit at the very end: keep its writes in range)
            n1 = torch.tensor([min(len(s) - 1, self.block - 2) for s in self.seqs], device=self.device)
            idx = torch.stack([last, draft], dim=1)  # [B, 2]
            pos = torch.stack([n1, n1 + 1], dim=1)
            out = model(idx, cache=cache, pos=pos)
            logits = self._logits(out.logits)  # [B, 2, V]
            seen2 = None
            if seen is not None:
                seen2 = seen.clone()
                seen2[rows, draft] = True
            if greedy:
                target, _ = self._choose(logits[:, 0], seen)
                accepted = target == draft
                first = target
            else:
                p = probabilities(logits[:, 0], self.sampling, seen)
                accepted, first = speculative_accept(p, q, draft, self.gen)
            bonus, _ = self._choose(logits[:, 1], seen2)
            acc, first_l, bonus_l = accepted.tolist(), first.tolist(), bonus.tolist()
            active = [not d for d in self.done]
            self.stats.drafted += sum(active)
            self.stats.accepted += sum(a and b for a, b in zip(acc, active))
            yield self._accept([[f, b] if a else [f] for a, f, b in zip(acc, first_l, bonus_l)])
            # MTP on the confirmed positions: (h_{n-1}, t_n) and, if accepted, (h_n, t_{n+1}).
            # A rejected row repeats its single pair so the batch stays rectangular.
            second = torch.where(accepted, 1, 0)
            h = torch.stack([out.hidden[:, 0], out.hidden[rows, second]], dim=1)  # [B, 2, D]
            nxt = torch.stack([first, torch.where(accepted, bonus, first)], dim=1)
            mpos = torch.stack([n1, n1 + second], dim=1)
            draft_logits, _ = model.mtp_step(h, nxt, cache, mpos, last_only=True)
            draft_logits = self._logits(draft_logits[:, -1])
