"""MTP's draft head: speculative drafts read an int8 copy of the vocabulary-sized head where that is faster.

A speculative step (decode.py) reads the head twice: the verify needs exact logits at two positions,
the draft only a proposal for the next token. A proposal need not be exact. Greedy decoding keeps a
draft only if it is the main model's own argmax; sampling accepts it with probability min(1, p/q)
under the q it was drawn from. So the text is the same whatever computes q, and a coarser q only
lowers acceptance. For the default preset the tied head is 103 MB of fp32 out of the ~150 MB a
token reads; an int8 copy (one scale per vocabulary row, PyTorch's dynamic int8 linear, which also
quantizes each input row) reads 26 MB.

Whether that is faster is measured per machine and head (cached with the other probes): a small head
that sits in cache gains nothing, and a PyTorch without the quantized kernels falls back to the exact
head. The copy is made once per model (kept on it) and remade if the head's weights change.
"""

from __future__ import annotations

import time
import warnings

import torch
from torch import nn

from ..device import cached_probe, store_probe
from ..model import Transformer

INT8_MARGIN = 1.2  # the int8 head must be this much faster than the exact one to draft


def int8_linear(weight: torch.Tensor) -> nn.Module | None:
    """x [..., in] -> x W^T [..., out] (fp32) with W [out, in] rounded to int8 per row, or None where
    this PyTorch build has no dynamic int8 linear."""
    w = weight.detach().float().cpu()
    scales = (w.abs().amax(dim=1).clamp(min=1e-12) / 127).double()  # [out]: row max -> 127
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao's quantized tensors are deprecated; its kernel is not replaced yet
            qw = torch.quantize_per_channel(w, scales, torch.zeros(len(w), dtype=torch.long), 0, torch.qint8)
            layer = torch.ao.nn.quantized.dynamic.Linear(w.shape[1], w.shape[0], bias_=False, dtype=torch.qint8)
            layer.set_weight_bias(qw, None)
            layer(torch.zeros(1, w.shape[1]))  # fails here, not mid-decode, where the engine is missing
    except (AttributeError, RuntimeError, NotImplementedError):
        return None
    return layer


def measure_int8_speedup(head: nn.Module, int8: nn.Module, rounds: int = 10) -> float:
    """Time of the exact head over the int8 one for one row (a draft), in alternating rounds, the best
    of each: the least disturbed by other processes."""
    x = torch.randn(1, head.in_features, dtype=head.weight.dtype)
    best = [float("inf"), float("inf")]
    with torch.inference_mode():
        for _ in range(rounds):
            for i, f in enumerate((lambda: head(x), lambda: int8(x.float()))):
                t = time.perf_counter()
                f()
                best[i] = min(best[i], time.perf_counter() - t)
    return best[0] / best[1]


class DraftHead:
    """h [..., D] (MTP depth 1's hidden state, before its norm) -> draft logits [..., vocab]."""

    def __init__(self, model: Transformer, compiled: bool = False):
        self.norm, self.head = model.mtp[0].norm, model.head
        w = self.head.weight
        self.version = _version(w)
        self.int8, self.why = None, "exact draft head (not a CPU)"
        if w.device.type != "cpu":
            return
        if compiled:  # torch.compile cannot trace the quantized kernel: it would split the compiled step
            self.why = "exact draft head (compiled)"
            return
        key = f"int8 draft head | {w.dtype} {tuple(w.shape)} | weight-major {self.head.weight_major_rows}"
        speedup = cached_probe(key)
        # The copy is made only to be measured or used: not where this machine already found it slower.
        int8 = int8_linear(w) if speedup is None or speedup >= INT8_MARGIN else None
        if int8 is None and speedup is None:
            self.why = "exact draft head (this PyTorch has no dynamic int8 linear)"
            return
        if speedup is None:
            speedup = round(measure_int8_speedup(self.head, int8), 3)
            store_probe(key, speedup)
        if int8 is not None and speedup >= INT8_MARGIN:
            self.int8 = int8
        self.why = f"{'int8' if self.int8 else 'exact'} draft head (int8 {speedup:.1f}x the exact one here)"

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        x = self.norm(h)
        return self.head(x) if self.int8 is None else self.int8(x.float())


def draft_head(model: Transformer, compiled: bool = False) -> DraftHead:
    """The model's draft head (`compiled`: for steps under torch.compile, always exact), made once
    and kept on the model (remade when the head's weights change: a later training step, a cast, a move)."""
    name = "_draft_head_compiled" if compiled else "_draft_head"
    known = model.__dict__.get(name)
    if known is None or known.version != _version(model.head.weight):
        known = model.__dict__[name] = DraftHead(model, compiled)
    return known


def _version(w: torch.Tensor) -> tuple:
    """What identifies a weight's values: its storage, in-place write count (inference tensors, made
    under torch.inference_mode, keep none and cannot change), dtype and device."""
    return w.data_ptr(), 0 if w.is_inference() else w._version, w.dtype, w.device
