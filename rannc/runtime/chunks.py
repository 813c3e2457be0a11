"""Which rows of the global batch each micro-batch of each replica holds, its weight in the loss, and which
rows pass between the replicas of neighbouring stages (the same rows when their replica counts are equal)."""

from __future__ import annotations

from dataclasses import dataclass


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
    `microbatch_count` near-equal slices of the global batch, cut again into `replicas` slices: the same
    micro-batches whatever a stage's replica count, so stages with different counts exchange rows of one
    micro-batch (see `routes`)."""
    if batch_size < microbatch_count * replicas:
        raise ValueError(f"global batch of {batch_size} samples cannot be cut into {microbatch_count} "
                         f"micro-batches for {replicas} replicas")
    out = []
    for start, stop in _near_equal(0, batch_size, microbatch_count):
        out.append([Chunk(a, b, (b - a) / batch_size) for a, b in _near_equal(start, stop, replicas)])
    return out


def _near_equal(start: int, stop: int, parts: int) -> list[tuple[int, int]]:
    """[start, stop) cut into `parts` slices, the first ones one row larger where it does not divide (as
    torch.tensor_split cuts)."""
    size, extra = divmod(stop - start, parts)
    bounds = [start]
    for k in range(parts):
        bounds.append(bounds[-1] + size + (1 if k < extra else 0))
    return list(zip(bounds, bounds[1:]))


@dataclass(frozen=True)
class Route:
    """Rows of one micro-batch that pass between this rank and another: rows [start, stop) of the global
    batch, which the two ranks' chunks share. `primary`: the other rank (when receiving) or this rank (when
    sending) is the receiver's first source, which alone carries values that are not cut by rows."""

    rank: int
    start: int
    stop: int
    primary: bool


def routes(mine: Chunk, others: list[Chunk], other_ranks: list[int], receiving: bool) -> list[Route]:
    """The routes between my chunk of a micro-batch and the chunks the neighbouring stage's replicas hold
    of it, in row order. `receiving`: the others send to me (else I send to them)."""
    found = []
    for rank, other in zip(other_ranks, others):
        start, stop = max(mine.start, other.start), min(mine.stop, other.stop)
        if start < stop:
            # the receiver's first source is the one holding the receiver's first row
            primary = other.start <= mine.start < other.stop if receiving else mine.start <= other.start < mine.stop
            found.append(Route(rank, start, stop, primary))
    return found
