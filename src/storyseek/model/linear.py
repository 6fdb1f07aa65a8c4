"""nn.Linear, plus the layout a decode step's few-row products run fastest in on this CPU.

y = x W^T. With a handful of rows (a decode step: one token per sequence) the product does little
arithmetic per weight it reads, so it runs at the speed the BLAS kernel streams W from memory. That
speed depends on how the product is written: on an AMD EPYC with MKL, x W^T with 1-4 rows (a
matrix-vector kernel) streams W at 7-10 GB/s, while the same product written W x^T (the weight as
the left operand of a matrix-matrix kernel) streams at 15-24 GB/s, 2-6x faster; a single row runs
fastest duplicated into two. Other CPUs and libraries may differ, so the choice is measured per
machine and weight shape (`device.weight_major_rows`), never assumed: `weight_major_rows` is the row
count up to which this layer computes (W x^T)^T; 0 (the default, and always in training) keeps
nn.Linear's x W^T.
`generate.load.to_inference` sets it for a model about to decode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Linear):
    weight_major_rows: int = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if self.weight_major_rows else 0
        if not 0 < rows <= self.weight_major_rows:
            return F.linear(x, self.weight, self.bias)
        y = weight_major(x.reshape(rows, x.shape[-1]), self.weight)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)


def weight_major(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [rows, in] @ weight[out, in]^T computed as (weight @ x^T)^T -> [rows, out] contiguous."""
    rows = x.shape[0]
    if rows == 1:
        x = x.expand(2, -1).contiguous()  # [2, in]: the matrix-matrix kernel, not the vector one
    return (weight @ x.T)[:, :rows].T.contiguous()


def set_weight_major_rows(model: nn.Module, rows: int | dict[tuple[int, int], int]) -> None:
    """Every Linear of `model` computes products of at most `rows` rows weight-major (0: never);
    a dict gives the row count per [out, in] weight shape (a shape it lacks: never)."""
    for module in model.modules():
        if isinstance(module, Linear):
            module.weight_major_rows = rows if isinstance(rows, int) else rows.get(tuple(module.weight.shape), 0)
