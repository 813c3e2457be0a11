"""Every call after deployment: run this rank's part of the schedule on the global batch, deliver the outputs,
and in backward run the backward schedule and sum the gradients over each parameter's holders.

Gradient accumulation follows RaNNC. Under `delay_grad_allreduce(True)` a backward leaves its gradients
unsummed; the first backward without the delay then sums the whole accumulated gradient (RaNNC's pattern:
delay on the early micro-steps, off for the last). Gradients already summed by an earlier backward without
the delay are set aside while this backward's part is summed, so that no contribution is summed twice.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from rannc import dist as rdist
from rannc import faults
from rannc.graph.dropout import dropout_active, train_mode
from rannc.graph.stage import StageGraph
from rannc.plan.deployment import Deployment
from rannc.runtime import grads as grad_ops
from rannc.runtime.chunks import Chunk, routes, split_batch
from rannc.runtime.outputs import OutputRouter, PipelineOutputs
from rannc.runtime.pipeline import PieceLayout, StageRuntime
from rannc.runtime.placement import Placement
from rannc.schedule import Action, gpipe_backward, gpipe_forward
from rannc.schedule import get as get_schedule


@dataclass
class CallFlags:
    """RaNNC's process-wide switches, as one call sees them."""

    delay_grad_allreduce: bool = False
    keep_graph: bool = False


class Engine:
    def __init__(self, deployment: Deployment, placement: Placement, runtime: StageRuntime | None,
                 pieces: list[StageGraph], router: OutputRouter, batched_inputs: list[bool], rank: int,
                 world: int, device: torch.device, in_call: bool):
        self.deployment = deployment
        self.placement = placement
        self.runtime = runtime
        self.router = router
        self.batched_inputs = batched_inputs
        self.rank = rank
        self.world = world
        self.device = device
        self.in_call = in_call              # backwards run inside the call (one scalar output only)
        self.reducer = None
        if runtime is not None and world > 1:
            stage_ranks = deployment.stages[deployment.stage_of_rank(rank)].ranks
            self.reducer = grad_ops.OverlappedAllReduce(placement, runtime.parameters(), stage_ranks)
        self.synced_buffers = self._replicated_buffers(pieces)
        self.unreduced = False              # local gradients hold parts not yet summed over holders
        self._anchor = torch.zeros((), requires_grad=True)
        self._pending: tuple | None = None  # (batch, local rows, local, flags) of the last grad-mode call
        self._call_grads: dict | None = None   # gradients an in-call schedule's backwards left (d(loss) = 1)
        self._call_delay = False
        self._actions, self._forwards, self._backwards = self._schedule_lists()
        self._layout_cache: dict[tuple, list[PieceLayout]] = {}
        # One process running the whole model in one micro-batch: nothing to sum or route, so the outputs
        # can stay tied to the stage's own graph (see run)
        self.direct = (world == 1 and runtime is not None and not in_call and len(deployment.stages) == 1
                       and deployment.microbatch_count == 1 and deployment.virtual_stages == 1)

    def _schedule_lists(self) -> tuple[list[Action], list[Action], list[Action]]:
        """This rank's whole list of the schedule, its forwards alone (calls without grad, and GPipe's call),
        and GPipe's backwards (run by loss.backward())."""
        deployment = self.deployment
        physical = deployment.stage_of_rank(self.rank)
        if physical is None:
            return [], [], []
        depth, m = deployment.pipeline_depth, deployment.microbatch_count
        if not self.in_call:
            return [], gpipe_forward(m), gpipe_backward(m)
        actions = get_schedule(deployment.schedule)(depth, m, deployment.virtual_stages)[physical]
        return actions, [a for a in actions if a.kind == "F"], []

    # ---- forward -------------------------------------------------------------------------------------
    def run(self, batch_args: list[torch.Tensor], local: bool, gather_inputs: bool, train: bool, dropout: bool,
            flags: Callable[[], CallFlags]) -> list:
        """`batch_args`: the global batch, or with `local` this rank's rows of it (data parallelism).
        Returns the output leaves, tied to the pipeline's backward in grad mode. `flags()` gives RaNNC's
        switches; the backward reads them again when it runs."""
        flags_now = flags()
        deployment = self.deployment
        grad = torch.is_grad_enabled()
        key = (_autocast_key(self.device), grad)
        rows = batch_args[self.batched_inputs.index(True)].shape[0] if any(self.batched_inputs) else 1
        batch = rows * self.world if local else rows
        if batch != deployment.batch_size:
            raise ValueError(f"the global batch has {batch} samples but the deployment was planned for "
                             f"{deployment.batch_size}; keep the local batch size fixed")
        local_rows = rows if local else (batch // self.world if gather_inputs else batch)
        results: list[tuple[Chunk, tuple]] = []
        if self.runtime is not None:
            layouts = self._layouts(batch, rows if local else None)
            self.runtime.keep_graph = flags_now.keep_graph
            self.runtime.clear()
            with dropout_active(dropout), train_mode(train):
                if grad and self.in_call:
                    results = self._run_in_call(layouts, batch_args, key, flags_now)
                else:
                    results = self.runtime.run_actions(self._forwards, layouts, batch_args, key)
        if train and self.synced_buffers:
            self._average_buffers()
        if grad and self.direct and not flags_now.keep_graph:
            # loss.backward() runs the stage's backward itself, as in the plain model: no backward of
            # PipelineOutputs running a second autograd pass inside the first, no per-parameter bookkeeping
            # of gradients that no other rank shares (under keep_graph the pipeline path keeps the graph)
            self._pending = None
            return self.router.direct(results)
        leaves = self.router.collect(results, batch, local_rows, local)
        if not grad:
            return leaves
        self._pending = (batch, local_rows, local, flags)
        return list(PipelineOutputs.apply(self._anchor, self._backward, *leaves))

    def _layouts(self, batch: int, local_rows: int | None) -> list[PieceLayout]:
        """Per piece this rank runs: its rows of every micro-batch and their routes from and to the
        neighbouring pieces' replicas. `local_rows`: each replica runs exactly its own local batch (one
        stage, one micro-batch), indexed from 0."""
        key = (batch, local_rows)
        if key not in self._layout_cache:
            d, m = self.deployment, self.deployment.microbatch_count
            split = functools.cache(lambda c: split_batch(batch, m, d.stages[c].replicas))
            layouts = []
            for c in d.pieces_of_rank(self.rank):
                mine = [row[d.stages[c].ranks.index(self.rank)] for row in split(c)]
                sources = [routes(mine[k], split(c - 1)[k], d.stages[c - 1].ranks, True) if c > 0 else []
                           for k in range(m)]
                targets = [routes(mine[k], split(c + 1)[k], d.stages[c + 1].ranks, False)
                           if c + 1 < len(d.stages) else [] for k in range(m)]
                if local_rows is not None:
                    mine = [Chunk(0, local_rows, ch.weight) for ch in mine]
                layouts.append(PieceLayout(mine, sources, targets))
            self._layout_cache[key] = layouts
        return self._layout_cache[key]

    def _run_in_call(self, layouts, batch_args, key, flags: CallFlags):
        """Schedules other than GPipe run the backwards inside the call with d(loss) = 1, summed over holders
        as they go (unless delayed). This call's gradients are then held apart, and p.grad restored to what
        it was, until loss.backward(g) adds them scaled by g (gradients are linear in g): a forward in grad
        mode never followed by a backward leaves the gradients as they were."""
        if flags.keep_graph:
            raise ValueError(f"keep_graph(True) needs schedule='gpipe': {self.deployment.schedule} frees each "
                             f"micro-batch's graph as it goes")
        before = self._set_aside_grads()
        ones = torch.ones((), dtype=torch.float32, device=self.device)
        output_grads = self.router.gradients([ones], self.deployment.batch_size, 0, False)
        try:
            results = self._reducing_gradients(
                lambda: self.runtime.run_actions(self._actions, layouts, batch_args, key, output_grads),
                flags.delay_grad_allreduce, flags.keep_graph)
            self._call_grads = self._set_aside_grads()
            self._call_delay = flags.delay_grad_allreduce
        finally:
            _add_back(before)
        return results

    # ---- backward ------------------------------------------------------------------------------------
    @faults.guarded("backward")
    def _backward(self, grads: list) -> None:
        if self._pending is None:
            raise RuntimeError("backward ran twice for one forward; use rannc.keep_graph(True) to keep the graph")
        batch, local_rows, local, flags_fn = self._pending
        flags = flags_fn()
        if not flags.keep_graph:
            self._pending = None
        if self.in_call:
            self._finish_in_call(grads)
            return
        delay = flags.delay_grad_allreduce
        output_grads = self.router.gradients(grads, batch, local_rows, local)
        # Parts summed by an earlier backward are set aside while this one's part is summed; unsummed parts
        # (left by backwards under the delay) are summed together with it.
        reduced_before = self._set_aside_grads() if not delay and not self.unreduced else {}

        def run_backwards():
            if self.runtime is not None:
                self.runtime.run_actions(self._backwards, [], [], (), output_grads)   # layouts are saved

        self._reducing_gradients(run_backwards, delay, flags.keep_graph)
        _add_back(reduced_before)
        self.unreduced = delay

    def _finish_in_call(self, grads: list) -> None:
        """The call's backwards already ran with d(loss) = 1 (summed unless delayed): add their gradients
        scaled by the real d(loss), first summing the earlier gradients if they were left unsummed and this
        call was not delayed."""
        call, self._call_grads = self._call_grads, None
        if call is None:
            return        # an idle rank (no pieces): nothing ran
        g = grads[self.router.scalars[0]]
        if g is None:
            call = {}     # the loss got no gradient: its backwards contribute nothing
        elif call:
            current = list(call.values())
            torch._foreach_mul_(current, g.to(current[0].device, current[0].dtype))
        if not self._call_delay and self.unreduced:
            grad_ops.allreduce_grads(self.placement)
        _add_back(call)
        self.unreduced = self._call_delay

    def _reducing_gradients(self, run_backwards, delay: bool, keep_graph: bool):
        """Run the backward actions with the gradient all-reduce overlapping them (or after them, or not
        at all under delay_grad_allreduce)."""
        overlap = self.reducer is not None and not delay and not keep_graph
        if overlap:
            self.reducer.begin(self.deployment.microbatch_count)
        try:
            result = run_backwards()
        except BaseException:
            if overlap:
                self.reducer.cancel()
            raise
        if overlap:
            self.reducer.finish()
        elif not delay:
            grad_ops.allreduce_grads(self.placement)
        return result

    def allreduce_grads(self) -> None:
        """Sum every local gradient over its holders (after backwards under delay_grad_allreduce)."""
        grad_ops.allreduce_grads(self.placement)
        self.unreduced = False

    def _set_aside_grads(self) -> dict:
        if self.runtime is not None:
            self.runtime.claim_grads()   # held past the next compiled call: out of CUDA graphs' memory first
        before = {}
        for p in self.placement.local_parameters():
            if p.grad is not None:
                before[p] = p.grad
                p.grad = None
        return before

    # ---- buffers -------------------------------------------------------------------------------------
    def _replicated_buffers(self, pieces: list[StageGraph]) -> list[tuple[tuple[int, ...], torch.Tensor]]:
        """Floating-point buffers this rank's pieces write that other ranks hold too (BatchNorm statistics
        of a replicated stage): averaged after every training call so that every holder keeps the same values."""
        out = []
        written = {id(t): t for piece in pieces for t in piece.mutated_buffers()}
        for t in written.values():
            holders = self.placement.holders_of(t)
            if t.is_floating_point() and len(holders) > 1:
                out.append((holders, t))
        return out

    def _average_buffers(self) -> None:
        for holders, t in self.synced_buffers:
            buf = t.detach().to(rdist.comm_device())
            dist.all_reduce(buf, group=self.placement.groups[holders])
            # through .data: batch_norm saved these tensors for backward (unused there in train mode), and an
            # in-place write seen by autograd's version counter would fail that backward
            t.data.copy_(buf.to(t.device) / len(holders))


def _add_back(before: dict) -> None:
    for p, grad in before.items():
        if p.grad is None:
            p.grad = grad
        else:
            p.grad.add_(grad)


def _autocast_key(device: torch.device):
    if torch.is_autocast_enabled(device.type):
        return str(torch.get_autocast_dtype(device.type))
    return None
