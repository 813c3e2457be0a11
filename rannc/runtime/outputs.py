"""Forward's results on every rank, and the gradients of every rank's loss back to the stage that made them.

The last stage's replicas compute the outputs of their micro-batches, which hold rows of the global batch.
A scalar output is combined as the mean of the micro-batches' values weighted by their rows (for a
per-sample mean loss: the loss of the global batch) and is the same on every rank. A batched output comes
back to each rank as the rows of its own local batch. In backward, each rank's gradients for its rows go
back to the replica that computed them; scalar outputs take the local upstream gradient (every rank is
expected to pass the same one: 1, or a loss scale), scaled by each micro-batch's weight.

Under plain data parallelism in one micro-batch each replica's rows are its own local batch, and nothing
but the scalars travels. Otherwise each batched output is assembled over the global batch by a summing
all-reduce (every row is written by exactly one replica), and its gradient the same way.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from rannc import dist as rdist
from rannc.graph.signature import BATCHED, SCALAR, OutputSignature
from rannc.runtime.chunks import Chunk


class OutputRouter:
    """Moves one deployment's outputs and their gradients between the last stage and all ranks."""

    def __init__(self, signature: OutputSignature, rank: int, world: int, device: torch.device,
                 gather_inputs: bool = True):
        self.signature = signature
        self.rank = rank
        self.world = world
        self.device = device
        self.gather_inputs = gather_inputs
        self.scalars = [k for k, kind in enumerate(signature.kinds) if kind == SCALAR]
        self.batched = [k for k, kind in enumerate(signature.kinds) if kind == BATCHED]

    # ---- forward -------------------------------------------------------------------------------------
    def collect(self, results: list[tuple[Chunk, tuple]], batch: int, local_rows: int, local: bool) -> list:
        """Every output leaf as this rank sees it. `results`: (chunk, outputs) of this rank's last-stage
        micro-batches (none on other ranks); `local`: each replica ran exactly its own local batch."""
        leaves: list = [None] * len(self.signature.kinds)
        if self.scalars:
            partial = torch.zeros(len(self.scalars), dtype=torch.float32, device=self.device)
            for chunk, outputs in results:
                partial += torch.stack([outputs[k].detach().float() for k in self.scalars]) * chunk.weight
            if self.world > 1:
                comm = rdist.comm_device()
                reduced = partial.to(comm)
                dist.all_reduce(reduced)
                partial = reduced.to(self.device)
            for i, k in enumerate(self.scalars):
                leaves[k] = partial[i]
        for k in self.batched:
            if local:
                leaves[k] = results[0][1][k].detach() if results else self._empty(k, local_rows)
                continue
            full = self._empty(k, batch)
            for chunk, outputs in results:
                full[chunk.start:chunk.stop] = outputs[k].detach().to(full.dtype)
            full = self._sum_over_ranks(full)
            leaves[k] = self._my_rows(full, local_rows)
        return leaves

    def direct(self, results: list[tuple[Chunk, tuple]]) -> list:
        """The output leaves of the one micro-batch that covered the whole batch on the only rank, as the stage
        returned them: still tied to its graph, so that their backward is the stage's own."""
        (_, outputs), = results
        return list(outputs)

    # ---- backward ------------------------------------------------------------------------------------
    def gradients(self, grads: list, batch: int, local_rows: int, local: bool):
        """From this rank's gradients of the output leaves, the function the pipeline's last stage asks
        for each micro-batch's output gradients."""
        full_grads: dict[int, torch.Tensor] = {}
        for k in self.batched:
            g = grads[k]
            if local:
                if g is not None:
                    full_grads[k] = g
                continue
            dtype = self.signature.dtypes[k] if self.signature.dtypes[k].is_floating_point else torch.float32
            full = torch.zeros((batch,) + self.signature.row_shapes[k], dtype=dtype, device=self.device)
            if g is not None:
                if self.gather_inputs:
                    full[self.rank * local_rows:(self.rank + 1) * local_rows] = g.to(self.device, dtype)
                else:
                    full += g.to(self.device, dtype) / self.world  # every rank holds the whole output
            full_grads[k] = self._sum_over_ranks(full)
        scalar_grads = {k: grads[k] for k in self.scalars if grads[k] is not None}

        def output_grads(outputs: tuple, chunk: Chunk) -> list:
            out: list = [None] * len(outputs)
            for k, g in scalar_grads.items():
                out[k] = g * chunk.weight
            for k, g in full_grads.items():
                out[k] = g if local else g[chunk.start:chunk.stop]
            return out

        return output_grads

    # ---- helpers -------------------------------------------------------------------------------------
    def _empty(self, k: int, rows: int) -> torch.Tensor:
        dtype = self.signature.dtypes[k]
        return torch.zeros((rows,) + self.signature.row_shapes[k], dtype=dtype, device=self.device)

    def _sum_over_ranks(self, full: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return full
        comm = rdist.comm_device()
        wire = full.to(comm, torch.uint8 if full.dtype == torch.bool else full.dtype)
        dist.all_reduce(wire)
        return wire.to(self.device, full.dtype)

    def _my_rows(self, full: torch.Tensor, local_rows: int) -> torch.Tensor:
        if not self.gather_inputs:
            return full
        return full[self.rank * local_rows:(self.rank + 1) * local_rows]


class PipelineOutputs(torch.autograd.Function):
    """Ties the returned outputs to the pipeline: their backward runs the backward schedule with the
    gradients autograd brings (zeros for outputs the loss did not use)."""

    @staticmethod
    def forward(ctx, anchor, backward_fn, *values):
        ctx.backward_fn = backward_fn
        ctx.count = len(values)
        outs = tuple(v.clone() for v in values)
        ctx.mark_non_differentiable(*[o for o in outs if not o.is_floating_point()])
        return outs

    @staticmethod
    def backward(ctx, *grads):
        ctx.backward_fn(list(grads))
        return (None, None) + (None,) * ctx.count
