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

import functools
import weakref

import torch

_ALIVE: weakref.WeakSet = weakref.WeakSet()   # every GraphGrads with parameters, while its module lives
# id(parameter) -> weak references to the parameter and to the copy it holds as its gradient. Shared by all
# modules, so that a weight tied across two graphed pieces of one rank is copied once, not by each piece in turn
# at every call. Keyed by id: tensors compare by value, and an attribute on the parameter would not pickle.
_COPIES: dict[int, tuple[weakref.ref, weakref.ref]] = {}


class GraphGrads:
    """The gradients of `params` (the parameters of one compiled module), kept out of CUDA graphs' memory.
    `cuda_only`: only CUDA gradients can be in a graph's memory, the others keep what autograd made; which ones
    are on CUDA is read at each claim, since a module may be made before its parameters move there (the
    profiler's runs of blocks). The bookkeeping's tests run on the CPU without it."""

    def __init__(self, params, cuda_only: bool = False) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.cuda_only = cuda_only
        self.copies = 0   # gradients copied out of the pool so far (a test reads it)
        if self.params:
            _ALIVE.add(self)

    def claim(self) -> None:
        """Give every parameter whose gradient is not a copy made here a copy of that gradient."""
        moving = [p for p in self.params if p.grad is not None and (p.grad.is_cuda or not self.cuda_only)
                  and not _holds_copy(p)]
        if not moving:
            return
        # x * 1 is x to the bit (signed zeros and NaNs included), in one launch per group of tensors
        copies = torch._foreach_mul([p.grad for p in moving], 1)
        for p, copy in zip(moving, copies):
            p.grad = copy
            _COPIES[id(p)] = (weakref.ref(p, functools.partial(_forget, id(p))), weakref.ref(copy))
        self.copies += len(moving)


def _forget(key: int, dead: weakref.ref) -> None:
    """Drop a parameter's entry once the parameter is gone (a later tensor given its id has an entry of its
    own, which stays)."""
    entry = _COPIES.get(key)
    if entry is not None and entry[0] is dead:
        del _COPIES[key]


def _holds_copy(p: torch.Tensor) -> bool:
    entry = _COPIES.get(id(p))
    return entry is not None and entry[0]() is p and entry[1]() is p.grad


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
