"""What a stage replayed as CUDA graphs needs from the code around it.

Under a torch.compile mode with CUDA graphs (reduce-overhead), inductor's CUDA graph trees give out tensors
that live in the graphs' own memory pool, and that memory is written over when a graph replays in a later
"generation" (torch starts one at the next compiled call once no backward is pending). Two kinds of tensors
outlive that point in training:

- gradients: where p.grad is None, autograd installs the backward graph's output tensor itself as p.grad.
  A gradient kept past the next compiled call (accumulated over micro-batches or calls, or set aside by the
  engine) would be overwritten, or raise "accessing tensor output of CUDAGraphs that has been overwritten by
  a subsequent run" (pytorch/pytorch#169545);
- outputs: the loss a training loop keeps for its log, a boundary value still being sent.

`GraphGrads.claim` copies every gradient that may live in the pool out of it once, before the next compiled
call; later backwards add into the copy in place, so a loop accumulating over k micro-batches pays one copy
per step and a loop that drops its gradients every step (zero_grad(set_to_none=True)) pays none. The pool is
one per device, shared by every compiled module: `claim_all` claims for every module alive, so that one
model's call (a teacher's, a discriminator's) does not write over another's gradients.
`own_outputs` copies a compiled call's outputs out of the pool (differentiably, so their backward runs on).
"""

from __future__ import annotations

import weakref

import torch

_ALIVE: weakref.WeakSet = weakref.WeakSet()   # every GraphGrads with parameters, while its module lives


class GraphGrads:
    """The gradients of `params` (the parameters of one compiled module), kept out of CUDA graphs' memory."""

    def __init__(self, params) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.copies = 0   # gradients copied out of the pool so far (a test reads it)
        self._mine: dict[int, weakref.ref] = {}   # parameter index -> the copy it holds as its gradient
        if self.params:
            _ALIVE.add(self)

    def claim(self) -> None:
        """Give every parameter whose gradient this object did not make a copy of that gradient."""
        moving = [i for i, p in enumerate(self.params) if p.grad is not None and not self._holds_copy(i, p)]
        if not moving:
            return
        # x * 1 is x to the bit (signed zeros and NaNs included), in one launch per group of tensors
        copies = torch._foreach_mul([self.params[i].grad for i in moving], 1)
        for i, copy in zip(moving, copies):
            self.params[i].grad = copy
            self._mine[i] = weakref.ref(copy)
        self.copies += len(moving)

    def _holds_copy(self, i: int, p: torch.Tensor) -> bool:
        ref = self._mine.get(i)
        return ref is not None and ref() is p.grad


def claim_all() -> None:
    """`GraphGrads.claim` for every module replayed as CUDA graphs in this process."""
    for grads in list(_ALIVE):
        grads.claim()


def own_outputs(out):
    """The tensors of `out` (a tensor, or a tuple or list of them and other values) copied out of the pool."""
    if isinstance(out, torch.Tensor):
        return out.clone() if out.is_cuda else out
    if isinstance(out, (tuple, list)):
        return type(out)(own_outputs(o) for o in out)
    return out
