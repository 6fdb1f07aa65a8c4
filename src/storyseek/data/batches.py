"""Training batches: random windows of a prepared token stream, as nanoGPT's `get_batch`.

A batch is B windows of T + 1 consecutive tokens at uniformly random starts; x is the first T of
each, y the last T (the next token at every position). Documents are back to back in the stream,
so a window may cross an end-of-text token, as in nanoGPT and GPT-2's training.

The sampler owns its `torch.Generator` and exposes its state, so a checkpoint can store it and a
resumed run draws exactly the batches the uninterrupted run would have drawn.
"""

from __future__ import annotations

import numpy as np
import torch


class RandomWindows:
    """Batches of random [B, T] windows (x) and the windows one token later (y) from a token stream.

    The next batch is read ahead, so on a GPU the disk read and host->device copy overlap the step
    that is still running. `state()` is the generator state that redraws that pending batch."""

    def __init__(self, data: np.ndarray, batch_size: int, block_size: int, device: torch.device,
                 seed: int, state: torch.Tensor | None = None):
        self.data, self.B, self.T, self.device = data, batch_size, block_size, device
        self.gen = torch.Generator().manual_seed(seed)
        if state is not None:
            self.gen.set_state(state)
        self._state = self.gen.get_state()
        self._next = self._draw()

    def _draw(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(len(self.data) - self.T, (self.B,), generator=self.gen).tolist()
        w = torch.from_numpy(np.stack([self.data[i : i + self.T + 1] for i in starts]).astype(np.int64))  # [B, T+1]
        x, y = w[:, :-1], w[:, 1:]
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)

    def __iter__(self) -> RandomWindows:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self._next
        self._state = self.gen.get_state()
        self._next = self._draw()
        return batch

    def state(self) -> torch.Tensor:
        return self._state
