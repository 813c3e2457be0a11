"""Each step's loss and gradient norm, read on the host once the device has computed them, not before.

Reading a device value (`loss.item()`) makes the host wait until the device has run everything queued before
it. In a training loop that read sits between a micro-batch's forward and its backward, or at the end of each
step, and the device then idles while the host prepares the next launches (the data loader, the next forward).
Here the values are copied to the host behind the step's own work (a non-blocking copy into pinned memory and
a CUDA event) and collected at a later step, once the event says the copy is done, so the loop only logs them
a step or two late. On the CPU the values are ready at once.
"""

from __future__ import annotations

import collections
from typing import Any

import torch


class StepValues:
    """A queue of (step, values, extra) whose values are device scalars on their way to the host."""

    def __init__(self) -> None:
        self._queue: collections.deque = collections.deque()

    def __len__(self) -> int:
        return len(self._queue)

    def put(self, step: int, values: list[torch.Tensor], extra: Any = None) -> None:
        """Start copying one step's scalar values (same device) to the host; `extra` travels along as it is."""
        stacked = torch.stack([v.detach().float().reshape(()) for v in values])
        event = None
        if stacked.is_cuda:
            host = torch.empty(stacked.shape, dtype=stacked.dtype, pin_memory=True)
            host.copy_(stacked, non_blocking=True)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(stacked.device))   # the copy's stream, whatever device is current
        else:
            host = stacked
        self._queue.append((step, host, event, extra))

    def ready(self, wait: bool = False) -> list[tuple[int, list[float], Any]]:
        """The steps whose values have reached the host, oldest first, as floats; with `wait`, all of them
        (waiting for the device where needed)."""
        out = []
        while self._queue:
            step, host, event, extra = self._queue[0]
            if event is not None:
                if not wait and not event.query():
                    break
                event.synchronize()
            self._queue.popleft()
            out.append((step, host.tolist(), extra))
        return out
