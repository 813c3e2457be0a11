"""Ground floor: fp32 master weights for a model computed in bfloat16 (config item `param_dtype`).

Under autocast, fp32 weights are cast to bfloat16 by every forward (one cast kernel per weight per step: on one
H200 the plain BERT-large's eager forward took 32.5 ms against 17.9 with bf16 weights, benchmarks/bf16_grads.py),
and their gradients come back in fp32 (twice the bytes to reduce and clip). With `param_dtype="bfloat16"` the
model's own Parameter objects are cast in place, so that placement, the gradient all-reduce, clipping and tied
weights work on them as they are, and the optimizer steps fp32 masters kept here: its param groups hold the masters once
deployed, a step copies the bf16 gradients into the masters' fp32 gradients before the user's step and the masters
into the bf16 weights after it, and state dicts hold the masters (the values a single-process fp32 run saves).
An optimizer with `steps_compute_copies = True` (bert.optim.Lamb) is given `compute_copies` = {master: bf16
parameter} instead: it reads a master's gradient from its copy and writes the copy with the master, inside its
own passes over the parameters (no fp32 gradient buffer, no copies before and after).

Gradients are summed in bfloat16 (over micro-batches, replicas and accumulated calls) as FSDP's mixed precision
does with `reduce_dtype=param_dtype`; the masters see them only at the step."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn as nn

DTYPES = {"bfloat16": torch.bfloat16}


class MasterWeights:
    """The fp32 masters of every fp32 parameter of `params`, which are cast to `dtype` in place."""

    def __init__(self, params: Iterable[torch.Tensor], dtype: torch.dtype):
        self._master: dict[int, nn.Parameter] = {}
        with torch.no_grad():
            for p in {id(t): t for t in params}.values():
                if p.dtype == torch.float32:
                    self._master[id(p)] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
                    p.data = p.data.to(dtype)
        self.cast_ids = frozenset(self._master)   # every parameter cast, held here or not
        self._pairs: list[tuple[torch.Tensor, nn.Parameter]] = []
        self._copies: dict[torch.Tensor, torch.Tensor] | None = None

    def has(self, t: torch.Tensor) -> bool:
        """Whether `t` was cast (on every rank, whether or not this rank holds its master)."""
        return id(t) in self.cast_ids

    def of(self, t: torch.Tensor) -> torch.Tensor:
        """The master of `t` where this rank holds one, else `t` itself."""
        return self._master.get(id(t), t)

    def restore(self, params: Iterable[torch.Tensor]) -> None:
        """Give every parameter whose master is held here its fp32 value back (a first call that failed)."""
        with torch.no_grad():
            for p in params:
                master = self._master.get(id(p))
                if master is not None:
                    p.data = master.data
        self._master.clear()

    def keep(self, params: list[torch.Tensor], device: torch.device) -> None:
        """Keep the masters of `params` (this rank's parameters) on `device`, drop the others'; the ones that
        train are the ones the steps copy."""
        mine = {id(p) for p in params}
        for key in [k for k in self._master if k not in mine]:
            del self._master[key]
        for master in self._master.values():
            if master.device != device:
                master.data = master.data.to(device)
        self._pairs = [(p, self._master[id(p)]) for p in params if id(p) in self._master and p.requires_grad]
        self._copies = None

    def grads_in(self) -> None:
        """The parameters' gradients into fp32 gradients of their masters, made for this step only: one buffer,
        freed by `release` after the step (it would otherwise hold 4 bytes per parameter through the forward
        and backward, next to the activations). A master whose parameter has no gradient gets none, so the
        optimizer skips it as it skips the parameter."""
        pairs = [(p, m) for p, m in self._pairs if p.grad is not None]
        self.release()
        if not pairs:
            return
        flat = torch.empty(sum(m.numel() for _, m in pairs), dtype=torch.float32, device=pairs[0][1].device)
        for (_, master), view in zip(pairs, torch.split(flat, [m.numel() for _, m in pairs])):
            master.grad = view.view_as(master)
        torch._foreach_copy_([m.grad for _, m in pairs], [p.grad for p, _ in pairs])

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The optimizer's zero_grad() clears the gradients the model computed too (of the bf16 parameters,
        which the optimizer does not hold): a training loop that zeroes through the optimizer would otherwise
        accumulate them from step to step."""
        for p, _ in self._pairs:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.detach_().zero_()

    def release(self) -> None:
        for _, master in self._pairs:
            master.grad = None

    def weights_out(self) -> None:
        """The masters' new values into the parameters the model computes with."""
        if self._pairs:
            with torch.no_grad():
                torch._foreach_copy_([p for p, _ in self._pairs], [m for _, m in self._pairs])

    def step(self, optimizer_step: Callable[[], object], optimizer: object = None) -> object:
        """One optimizer step over the masters, between the two copies; an optimizer that `steps_compute_copies`
        is handed {master: parameter} instead and does both itself, in the passes it makes anyway."""
        if getattr(optimizer, "steps_compute_copies", False):
            if self._copies is None:
                self._copies = {master: p for p, master in self._pairs}
            optimizer.compute_copies = self._copies
            return optimizer_step()
        self.grads_in()
        try:
            result = optimizer_step()
        finally:
            self.release()
        self.weights_out()
        return result
