"""Token-level decoding: prefill, cached decode, MTP self-speculative decode, and the no-cache reference.

One loop serves every mode. Each row of the batch is a sequence with its own position, its own stop
and its own window; the loop yields, after every step, the tokens each row confirmed.

State between steps (all modes): row r holds tokens t_0..t_{n-1}; the main model's latent cache holds
positions 0..n-2 and the last token t_{n-1} is not fed yet.

Plain step:        feed t_{n-1} at n-1 -> p(t_n) -> sample t_n.
Speculative step (MTP depth 1, DeepSeek-V3 section 2.2 used as a draft model, "self-speculative"):
  MTP has proposed a draft d ~ q for t_n from (h_{n-2}, t_{n-1}). One main forward on [t_{n-1}, d]
  at [n-1, n] gives p(t_n) and p(t_{n+1} | d). Accept d with probability min(1, p(d)/q(d)) (greedy:
  iff d = argmax p); if accepted also take a bonus token from p(t_{n+1} | d), else resample t_n from
  norm(max(0, p - q)). In the same step, without a host round-trip, MTP drafts the next token from
  the last confirmed position: (h_n, t_{n+1}) if accepted, else (h_{n-1}, t_n). Drafts run MTP
  without its block's attention, so they need no cache (model/mtp.py says why that pays), and the
  head in an int8 copy where that measures faster (a draft needs no exact logits, generate/draft.py).
  A rejected draft's latents at position n are simply overwritten by the next write (the cache is
  indexed by position), so rollback costs nothing.

Between steps the host holds each row's tokens (for stops, min_tokens, the budget and the sliding
window); the device holds the next input token and its position. One read-back per step carries the
new tokens. A row with fewer than min_tokens new tokens cannot choose a stop token (its logits are
-inf there), so a barely trained model that would end at once still writes a story. In story mode
they count from the `<|story|>` marker the model writes after the header (`begin_id`), and before
it no row may end: a prompt the model merely completes ("...afraid of the dark" -> " woods.") is no
story (a header without the marker ends after config.HEADER_TOKENS: that model ignores the template).
On a CUDA GPU each step is replayed as a CUDA graph (generate/graphs.py): one launch, not a thousand.

auto (speculative=None, the default for a model with MTP): the first steps are a few plain steps,
then a few speculative ones, each timed up to its read-back, and decoding keeps the path with more
tokens per second (a speculative step yields 1 + acceptance tokens), plain unless speculative is
clearly ahead (SPECULATIVE_MARGIN). It measures the device, the
model and the text at hand instead of assuming that drafting pays; DecodeStats.auto says what it
chose and why. The choice is cached per machine, model, batch size, greedy/sampled and
eager/compiled (with --dtype auto's probe results), so later runs skip the probe and a seed
reproduces them; the first run's sampled text depends on the path taken while probing (pin it with
speculative=True/False).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass

import torch

from ..device import CompiledStep, cached_probe, require_compiler, store_probe
from ..errors import StoryseekError
from ..model import LatentCache, Transformer
from . import graphs
from .config import GenerateConfig
from .draft import draft_head
from .sampling import draw, end_held, probabilities, since_begin, speculative_accept, story_start


PROBE_STEPS = 12  # auto: plain and speculative steps each timed before keeping the faster path
# Compiled, a path's steps keep getting faster for 10-25 steps after it compiled (the demo's model on a
# 2-core CPU: speculative 1.9 -> 1.2-1.3 ms by step 20, plain 1.5 -> 0.75 ms): twelve misjudged speculative
COMPILED_PROBE_STEPS = 30
SPECULATIVE_MARGIN = 1.05  # auto keeps speculative decoding only where it measured this much faster


def _auto_key(model: Transformer, batch: int, greedy: bool, step: str) -> str:
    """What auto's cached choice depends on: the model (its shape, dtype, device and a digest of its
    MTP weights, which set the acceptance: the first rows identify a checkpoint and cost nothing to
    hash), the batch, greedy vs sampled decoding, and how a step runs (`step`: eager, compiled, in
    CUDA graphs: on a CPU the two paths' costs differ compiled and eager). "attention-free drafts":
    choices measured while drafts still ran MTP's attention stay unused."""
    w = model.mtp[0].eh_proj.weight.detach()
    digest = hashlib.sha1(w[:16].float().cpu().numpy().tobytes()).hexdigest()[:12]
    c = model.cfg
    return (f"speculative | {c.n_layer}x{c.n_embd} vocab {c.vocab_size} {w.dtype} {w.device.type} | mtp {digest} | "
            f"batch {batch} | {'greedy' if greedy else 'sampled'} | {step} | attention-free drafts")


@dataclass
class DecodeStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    drafted: int = 0  # MTP drafts verified
    accepted: int = 0  # ... of which the main model accepted
    first_token_s: float = 0.0  # prompt in -> first token out
    total_s: float = 0.0
    truncated_prompts: int = 0  # prompts longer than the context (their last tokens were kept)
    auto: str = ""  # how `speculative=None` (auto) chose between plain and speculative decoding
    draft: str = ""  # speculative decoding: which head drafted, and why (generate/draft.py)
    compile_s: float = 0.0  # --compile: of total_s, the seconds torch.compile spent compiling steps

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.total_s if self.total_s > 0 else 0.0


def decode(model: Transformer, prompts: list[list[int]], cfg: GenerateConfig, *, vocab_size: int | None = None,
           stop_ids: Collection[int] = (), begin_id: int | None = None,
           stats: DecodeStats | None = None) -> Iterator[list[list[int]]]:
    """Generate for every prompt (lists of ids, each non-empty) in one batch.

    Yields once per step a list with each row's newly confirmed tokens (possibly empty). A row ends
    at a token of `stop_ids` (not yielded) or after cfg.max_tokens tokens; min_tokens count from its
    first token of `begin_id` (story mode's `<|story|>`), and before it (up to HEADER_TOKENS) the row
    cannot end.
    `vocab_size` is the tokenizer's: ids >= it (the embedding's padding) are never sampled. The model
    must be in eval mode.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise StoryseekError("every prompt needs at least one token")
    stats = stats if stats is not None else DecodeStats()
    with torch.inference_mode():
        yield from _Decoder(model, prompts, cfg, vocab_size or model.cfg.vocab_size, stop_ids, begin_id, stats).run()


def generate_ids(model: Transformer, prompts: list[list[int]], cfg: GenerateConfig, *, vocab_size: int | None = None,
                 stop_ids: Collection[int] = (), begin_id: int | None = None,
                 stats: DecodeStats | None = None) -> list[list[int]]:
    """`decode` run to the end: the new tokens of each row."""
    out: list[list[int]] = [[] for _ in prompts]
    for step in decode(model, prompts, cfg, vocab_size=vocab_size, stop_ids=stop_ids, begin_id=begin_id, stats=stats):
        for row, new in zip(out, step):
            row.extend(new)
    return out


class _Decoder:
    def __init__(self, model, prompts, cfg: GenerateConfig, vocab_size, stop_ids, begin_id, stats: DecodeStats):
        self.model, self.cfg, self.sampling = model, cfg, cfg.sampling
        self.V, self.stop_ids, self.begin_id, self.stats = vocab_size, frozenset(stop_ids), begin_id, stats
        self.block = model.cfg.block_size
        self.speculative = cfg.use_speculative(model)
        self.device = model.embed.weight.device
        self.graphs = graphs.use_graphs(cfg.cuda_graphs, self.device)
        # auto: a choice this machine already measured for this model is reused (no probe steps, and
        # a seed then reproduces the run); otherwise the first steps measure it and it is kept.
        self.auto_key = None
        if cfg.speculative is None and self.speculative:
            # "whole verify": choices cached before the compiled verify became one function stay unused
            step = ("compiled, whole verify" if cfg.compile else "eager") + (" in CUDA graphs" if self.graphs else "")
            self.auto_key = _auto_key(model, len(prompts), cfg.sampling.greedy, step)
            known = cached_probe(self.auto_key)
            if known is not None:
                self.speculative, self.auto_key = bool(known), None
                stats.auto = f"auto chose {'speculative' if known else 'plain'} decoding (measured for this model before, cached)"
        if cfg.compile:
            require_compiler(self.device)
        # Decode steps (one token per row, or a 2-token verify, and MTP's draft after it) compiled
        # under --compile (device.CompiledStep). Prefills stay eager (one per prompt). Compiled code
        # is cached per process, keyed on this model.
        self.forward_step = CompiledStep(model) if cfg.compile else model
        self.mtp_step = CompiledStep(model.mtp_draft) if cfg.compile else model.mtp_draft
        self.verify_step = None  # --compile, greedy: the whole verify compiled (_steps)
        self.draft = draft_head(model, cfg.compile) if self.speculative else None  # MTP's head: int8 where faster
        stats.draft = self.draft.why if self.draft else ""
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
        self.rows = torch.arange(B, device=self.device)
        self.generated = [0] * B
        self.story_tokens = [story_start(begin_id)] * B  # tokens since the story began (negative: header)
        self.done = [False] * B
        self.seen = None
        if self.sampling.repetition_penalty != 1.0:
            self.seen = torch.zeros(B, self.V, dtype=torch.bool, device=self.device)
            for r, s in enumerate(self.seqs):
                self.seen[r, torch.tensor(s, device=self.device).clamp_(max=self.V - 1)] = True
        # min_tokens: held[k, r] says row r may not end at this step's k-th new token (k = 1: a
        # verify's bonus token; a row yet to write begin_id holds both). On the device, so a CUDA
        # graph replays the current rows' state.
        self.is_end = None
        ends = [t for t in self.stop_ids if t < self.V]
        if self.sampling.min_tokens and ends:
            self.is_end = torch.zeros(self.V, dtype=torch.bool, device=self.device)
            self.is_end[ends] = True
            self.held = torch.zeros(2, B, dtype=torch.bool, device=self.device)
            self.held_host: list[list[bool]] = []
            self._hold()

    # ----------------------------------------------------------------- helpers
    def _logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits[..., : self.V]  # padded vocab ids can never be chosen

    def _hold(self) -> None:
        """Which rows may not end yet (min_tokens), at this step's first new token and the next."""
        held = [[not d and end_held(g, self.sampling.min_tokens, k) for g, d in zip(self.story_tokens, self.done)]
                for k in (0, 1)]
        if held != self.held_host:
            self.held.copy_(torch.tensor(held))
            self.held_host = held

    def _ends_held(self, logits: torch.Tensor, k: int = 0) -> torch.Tensor:
        """logits [B, V] with the stop tokens at -inf in the rows that may not end at this step's
        k-th new token. Compiled, always masked: a branch on the host's state would recompile."""
        if self.is_end is None or (not torch.compiler.is_compiling() and not any(self.held_host[k])):
            return logits
        return logits.masked_fill(self.held[k].unsqueeze(-1) & self.is_end, float("-inf"))

    def _choose(self, logits: torch.Tensor, seen: torch.Tensor | None, k: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """logits [B, V] of each row's k-th new token in this step -> (token [B], the distribution
        it came from, or None when greedy)."""
        logits = self._ends_held(logits, k)
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
            for t in kept:
                self.story_tokens[r] = since_begin(self.story_tokens[r], t, self.begin_id)
            self.seqs[r].extend(kept)
            if self.seen is not None and kept:
                self.seen[r, torch.tensor(kept, device=self.device)] = True
            out.append(kept)
        self.stats.new_tokens += sum(len(k) for k in out)
        if self.is_end is not None and any(self.held_host[0]):  # once no row is held, none is again
            self._hold()
        return out

    def _pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad rows by repeating each row's last token -> (idx [B, S], index of each row's
        last real token [B]). Attention is causal and a row only ever reads cache positions it has
        written since, so padding never reaches a real token."""
        S = max(len(r) for r in rows)
        idx = torch.tensor([r + [r[-1]] * (S - len(r)) for r in rows], device=self.device)
        return idx, torch.tensor([len(r) - 1 for r in rows], device=self.device)

    def _last(self, out, last: torch.Tensor) -> torch.Tensor:
        """Each row's logits at its last real token [B, V], from a forward run with last_only."""
        if bool((last == out.hidden.shape[1] - 1).all()):
            return self._logits(out.logits[:, -1])
        return self._logits(self.model.head(out.hidden[self.rows[: last.numel()], last]))

    def _steps(self, cache: LatentCache):
        """The decode steps on `cache` -> (forward, verify):
        forward(idx [B, S], pos [B, S], length) -> (logits [B, S, V], hidden [B, S, D]);
        verify(tok, draft, q, pos, length) -> a speculative step's device work (_verify: the main
        model on two positions, then MTP's draft from the last confirmed one).
        On a GPU they are CUDA graphs per shape (generate/graphs.py) attending to the whole cache, and
        a greedy verify without a repetition penalty is a single graph, from the draft to the next
        draft's logits (it needs no random generator and no host read). Under --compile elsewhere
        such a verify is one compiled function: compiled in pieces, the eager work between them and
        dynamo's guards on each piece (~0.2 ms a call on a 2-core CPU) made a speculative step of
        the demo's model cost ~2.1 compiled plain steps, whole ~1.7."""
        def forward_fn(model_step):
            def forward(idx, pos, length):
                out = model_step(idx, cache=cache, pos=pos, length=length)
                return self._logits(out.logits), out.hidden

            return forward

        forward, mtp = forward_fn(self.forward_step), self.mtp_step

        def verify(tok, draft, q, pos, length):
            return self._verify(forward, mtp, tok, draft, q, pos, length)

        whole = self.sampling.greedy and self.seen is None
        if not self.graphs:
            if self.cfg.compile and whole:
                eager_forward = forward_fn(self.model)  # traced into the one function, as mtp_draft
                self.verify_step = CompiledStep(lambda tok, draft, pos, length: self._verify(
                    eager_forward, self.model.mtp_draft, tok, draft, None, pos, length))
                return forward, lambda tok, draft, q, pos, length: self.verify_step(tok, draft, pos, length)
            return forward, verify

        def whole_cache(fn):  # fn(*tensors, length) as a CUDA graph per shape, attending to all positions
            graph = graphs.GraphedStep(lambda *args: fn(*args, self.block))
            return lambda *args: graph(*args[:-1])  # the caller's attended length is not needed

        graphed_forward, graphed_mtp = whole_cache(forward), graphs.GraphedStep(mtp)
        if whole:
            graphed_verify = whole_cache(lambda tok, draft, pos, length: verify(tok, draft, None, pos, length))
            return graphed_forward, lambda tok, draft, q, pos, length: graphed_verify(tok, draft, pos, length)
        return graphed_forward, lambda tok, draft, q, pos, length: self._verify(
            graphed_forward, graphed_mtp, tok, draft, q, pos, length)

    def _verify(self, forward, mtp, tok, draft, q, pos, length):
        """A speculative step's device work. tok [B]: t_{n-1} (unfed) at pos [B]; draft [B]: the
        proposal for t_n, drawn from q [B, V] (None when greedy) -> (accepted [B], first [B]: t_n,
        bonus [B]: t_{n+1} where accepted, the next draft's logits [B, V], the next unfed token [B]:
        bonus where accepted, else first)."""
        # The main model on [t_{n-1}, d] at [n-1, n] gives p(t_n) and p(t_{n+1} | d).
        pos2 = torch.stack([pos, pos + 1], dim=1)
        logits, hidden = forward(torch.stack([tok, draft], dim=1), pos2, length)  # [B, 2, V], [B, 2, D]
        seen, seen2 = self.seen, None
        if seen is not None:
            seen2 = seen.clone()
            seen2[self.rows, draft] = True
        if self.sampling.greedy:
            first, _ = self._choose(logits[:, 0], seen)
            accepted = first == draft
        else:
            p = probabilities(self._ends_held(logits[:, 0]), self.sampling, seen)
            accepted, first = speculative_accept(p, q, draft, self.gen)
        bonus, _ = self._choose(logits[:, 1], seen2, k=1)
        # The next draft comes from the last confirmed position: n (h_n, t_{n+1}) if accepted, else
        # n-1 (h_{n-1}, t_n).
        nxt = torch.where(accepted, bonus, first)  # [B]
        h = mtp(hidden[self.rows, accepted.long()], nxt)  # [B, D]
        return accepted, first, bonus, self._logits(self.draft(h)), nxt

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
            if self.cfg.compile:  # compiling happens in the first steps (and in any recompile)
                compiled = (self.forward_step, self.mtp_step, self.verify_step)
                self.stats.compile_s = sum(c.compile_s for c in compiled if c is not None)
            yield new
            if all(self.done):
                break
        self.stats.total_s = time.perf_counter() - start

    def _no_cache(self) -> Iterator[list[list[int]]]:
        """The reference: every step runs the full forward on each row's last block_size tokens."""
        while True:
            idx, last = self._pad([s[-self.block :] for s in self.seqs])
            # Causal, so padding after a row cannot change it; the head runs on each row's last position only.
            out = self.model(idx, last_only=True)
            tok, _ = self._choose(self._last(out, last), self.seen)
            yield self._accept([[t] for t in tok.tolist()])

    def _plain(self) -> Iterator[list[list[int]]]:
        """One token per row and step. The token and its position stay on the device between
        steps; the host reads the new tokens once per step and passes the attended length."""
        cache = self.model.new_cache(len(self.seqs))
        idx, last = self._pad(self.seqs)
        tok, _ = self._choose(self._last(self.model(idx, cache=cache, last_only=True), last), self.seen)
        yield self._accept([[t] for t in tok.tolist()])
        yield from self._plain_steps(cache, self._steps(cache)[0], tok, last + 1)

    def _plain_steps(self, cache: LatentCache, forward, tok: torch.Tensor, pos: torch.Tensor) -> Iterator[list[list[int]]]:
        """tok [B]: each row's unfed last token, pos [B]: where it goes; forward: self._steps'."""
        while True:
            for r in range(len(self.seqs)):
                if not self.done[r] and len(self.seqs[r]) > self.block:
                    self._slide(cache, r)
                    pos[r] = len(self.seqs[r]) - 1
            length = max(min(len(s), self.block) for s in self.seqs)
            logits, _ = forward(tok[:, None], pos[:, None], length)
            tok, _ = self._choose(logits[:, -1], self.seen)
            pos = (pos + 1).clamp_(max=self.block - 1)  # finished rows run on harmlessly, in range
            yield self._accept([[t] for t in tok.tolist()])

    def _slide(self, cache: LatentCache, r: int) -> torch.Tensor:
        """Row r outgrew the context: keep its last 3/4 block, re-prefill it at positions 0.. in the
        row's own cache slice (its last token stays unfed, as the loop expects). Returns the hidden
        state at the last fed position [1, D], from which speculative decoding drafts anew."""
        keep = self.block - self.block // 4
        self.seqs[r] = self.seqs[r][-keep:]
        fed = torch.tensor([self.seqs[r][:-1]], device=self.device)
        return self.model(fed, cache=cache.narrow(r), last_only=True).hidden[:, -1]

    def _draft_logits(self, h: torch.Tensor, nxt: torch.Tensor) -> torch.Tensor:
        """Eager MTP draft: h [B, D] the hidden at each row's last fed position, nxt [B] the token
        after it -> logits [B, V] proposing the token after that."""
        return self._logits(self.draft(self.model.mtp_draft(h, nxt)))

    def _speculative(self) -> Iterator[list[list[int]]]:
        model, rows = self.model, self.rows
        cache = model.new_cache(len(self.seqs))
        forward, verify = self._steps(cache)
        idx, last = self._pad(self.seqs)
        out = model(idx, cache=cache, last_only=True)
        tok, _ = self._choose(self._last(out, last), self.seen)
        draft_logits = self._draft_logits(out.hidden[rows, last], tok)  # [B, V]: proposes the token after tok
        pos = last + 1  # [B]: where tok (t_{n-1}, unfed) goes
        yield self._accept([[t] for t in tok.tolist()])
        # auto: time PROBE_STEPS plain steps, then PROBE_STEPS speculative ones (COMPILED_PROBE_STEPS
        # compiled), then keep the faster path. Each path's steps run back to back, as they will after
        # the choice: a compiled plain step ran 1.5x slower on a CPU when MTP's step ran between two of
        # them (caches refilled).
        probe = None
        if self.auto_key:
            probe = {"plain": [], "speculative": [], "drafted": 0, "accepted": 0,
                     "steps": COMPILED_PROBE_STEPS if self.cfg.compile else PROBE_STEPS}
        while True:
            for r in range(len(self.seqs)):
                if not self.done[r] and len(self.seqs[r]) + 1 > self.block:  # a verify writes at n-1 and n
                    draft_logits[r] = self._draft_logits(self._slide(cache, r), tok[r : r + 1])[0]
                    pos[r] = len(self.seqs[r]) - 1
            length = max(min(len(s) + 1, self.block) for s in self.seqs)
            active = [not d for d in self.done]
            started = time.perf_counter()
            if probe is not None and len(probe["plain"]) < probe["steps"]:
                logits, hidden = forward(tok[:, None], pos[:, None], length - 1)
                tok, _ = self._choose(logits[:, -1], self.seen)
                new = [[t] for t in tok.tolist()]
                probe["plain"].append(time.perf_counter() - started)
                if len(probe["plain"]) == probe["steps"]:  # untimed, eager (once per run)
                    draft_logits = self._draft_logits(hidden[:, -1], tok)
                pos = (pos + 1).clamp_(max=self.block - 2)
                yield self._accept(new)
                continue
            draft, q = self._choose(draft_logits, self.seen)
            accepted, first, bonus, draft_logits, tok = verify(tok, draft, q, pos, length)
            pos = (pos + 1 + accepted).clamp_(max=self.block - 2)  # finished rows stay in range
            acc, first_l, bonus_l = torch.stack([accepted, first, bonus]).tolist()
            n_acc = sum(a and b for a, b in zip(acc, active))
            self.stats.drafted += sum(active)
            self.stats.accepted += n_acc
            if probe is not None:
                probe["speculative"].append(time.perf_counter() - started)
                probe["drafted"] += sum(active)
                probe["accepted"] += n_acc
            yield self._accept([[f, b] if a else [f] for a, f, b in zip(acc, first_l, bonus_l)])
            if probe is not None and len(probe["speculative"]) == probe["steps"]:
                if not self._keep_speculative(probe):
                    yield from self._plain_steps(cache, forward, tok, pos)
                    return
                probe = None

    def _keep_speculative(self, probe: dict) -> bool:
        """auto's choice: tokens per second of each path, a speculative step yielding 1 + acceptance
        tokens per row. Each path's fastest step counts: a noisy neighbour, the compiling of a first
        step and the caches a prefill left cold only ever add time (the first plain steps after the
        prefill ran 1.3-1.7x slower than later ones, compiled, on a CPU, and kept getting faster for
        8-10 steps: with 6 steps each, auto estimated speculative at 0.94-1.07x for the demo's model
        compiled, chose it in half of the runs, and it ran at 0.7-0.9x plain; with 12, 0.72-0.92x,
        while eagerly the estimate stayed at 1.1-1.25x, for a true 1.3x). Speculative must come out
        SPECULATIVE_MARGIN faster, a tie-break against the noise of a few steps."""
        plain_s, spec_s = min(probe["plain"]), min(probe["speculative"])
        acceptance = probe["accepted"] / max(probe["drafted"], 1)
        keep = (1 + acceptance) / spec_s > SPECULATIVE_MARGIN / plain_s
        if self.auto_key:
            store_probe(self.auto_key, float(keep))
        self.stats.auto = (f"auto chose {'speculative' if keep else 'plain'} decoding: a speculative step "
                           f"{spec_s * 1000:.1f} ms at {acceptance:.0%} acceptance, a plain step {plain_s * 1000:.1f} ms")
        return keep
