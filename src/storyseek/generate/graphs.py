"""Decode steps replayed as CUDA graphs.

At batch 1 a decode step of these models is ~1,000 small kernels, and on a GPU launching them from
Python costs far more than running them: the GPU idles between launches. A CUDA graph records the
launches of one step once and replays them with a single call. What that needs from the step:

- fixed shapes: the step attends to the whole cache (`length` = block_size) and masks the positions
  after each query's own, so the attended length never changes (exact: masked scores weigh 0);
- no host reads inside (the model's decode step has none on a GPU: model/moe.py runs every expert);
- fixed addresses: the inputs are copied into tensors the graph owns, the cache is allocated once per
  decode, and the outputs are the graph's own tensors, valid until its next replay.

A step is idempotent (it writes the same latents at the same positions), so the warm-up runs that
precede the capture can use the real first inputs. Random sampling stays outside the graph (its
generator advances on the host); greedy choices (argmax) may be inside.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

WARMUP = 2  # eager runs on a side stream before capture: cuBLAS picks its kernels, the allocator warms up


def graphs_supported(device: torch.device) -> bool:
    return device.type == "cuda"


def use_graphs(requested: bool, device: torch.device) -> bool:
    """Whether decode steps run as CUDA graphs: asked for (--cuda-graphs, the default) on a device
    that has them. A compiled step (--compile) is recorded too: its fused kernels, replayed (1.2x the
    eager step's graph for the demo's model on an H100)."""
    return requested and graphs_supported(device)


class GraphedStep:
    """fn(*tensors) -> tensor or tuple of tensors, captured once per input shapes and replayed after."""

    def __init__(self, fn: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]]):
        self.fn = fn
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list[torch.Tensor], object]] = {}

    def __call__(self, *args: torch.Tensor):
        key = tuple((a.shape, a.dtype) for a in args)
        if key not in self.graphs:
            self.graphs[key] = self._capture(args)
        graph, inputs, outputs = self.graphs[key]
        for buf, a in zip(inputs, args):
            buf.copy_(a)
        graph.replay()
        return outputs

    def _capture(self, args: tuple[torch.Tensor, ...]):
        inputs = [a.clone() for a in args]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP):
                self.fn(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = self.fn(*inputs)
        return graph, inputs, outputs
