"""Which rows of the global batch each micro-batch of each replica holds, and its weight in the loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Chunk:
    start: int
    stop: int
    weight: float      # rows / global batch size: the chunk's share of a per-sample mean loss

    @property
    def rows(self) -> int:
        return self.stop - self.start


def split_batch(batch_size: int, microbatch_count: int, replicas: int) -> list[list[Chunk]]:
    """chunks[m][j]: the rows of micro-batch m that replica j runs. Micro-batch m is the m-th of
    `microbatch_count` near-equal slices of the global batch, cut again into `replicas` slices."""
    if batch_size < microbatch_count * replicas:
        raise ValueError(f"global batch of {batch_size} samples cannot be cut into {microbatch_count} "
                         f"micro-batches for {replicas} replicas")
    bounds = [int(b[0]) if len(b) else 0 for b in
              torch.tensor_split(torch.arange(batch_size), microbatch_count * replicas)]
    sizes = [len(b) for b in torch.tensor_split(torch.arange(batch_size), microbatch_count * replicas)]
    out = []
    for m in range(microbatch_count):
        row = []
        for j in range(replicas):
            k = m * replicas + j
            row.append(Chunk(bounds[k], bounds[k] + sizes[k], sizes[k] / batch_size))
        out.append(row)
    return out
