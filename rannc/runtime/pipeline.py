"""The executor of one rank's stage: runs a schedule's actions, receiving the values crossing the
stage's first cut from the previous stage's rank and sending those crossing its last cut (or, on the
last stage, accumulating the loss), then runs the backward actions with gradients flowing the other way.

Shapes and dtypes of the values sent depend on the micro-batch size and on autocast; the sender sends
them once per such combination as a small header, and both sides cache it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from rannc.graph.dropout import recomputing
from rannc.graph.stage import StageGraph
from rannc.runtime.chunks import Chunk
from rannc.schedule import Action

_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
           torch.int8, torch.uint8, torch.bool]
_MAX_DIMS = 8
_HEADER = 3 + _MAX_DIMS   # dtype, requires_grad, ndim, dims

OutputGrads = Callable[[tuple, Chunk], list]


@dataclass
class _Saved:
    received: list[torch.Tensor]
    outputs: tuple
    chunk: Chunk


@dataclass
class _ValueMeta:
    shape: tuple[int, ...]
    dtype: torch.dtype
    requires_grad: bool


@dataclass
class StageRuntime:
    """One rank's part of the pipeline."""

    stage: StageGraph
    batched_inputs: list[bool]
    device: torch.device
    prev_rank: int | None
    next_rank: int | None
    recompute: bool
    keep_graph: bool = False
    trace: list | None = None      # Chrome trace events (host-side times) when trace_events is on
    trace_pid: int = 0
    _recv_meta: dict = field(default_factory=dict)
    _sent_meta: set = field(default_factory=set)
    _saved: dict[int, _Saved] = field(default_factory=dict)
    _pending_sends: list = field(default_factory=list)

    # ---- forward -------------------------------------------------------------------------------------
    def run_forward(self, actions: list[Action], chunks: list[Chunk], inputs: list[torch.Tensor],
                    key: tuple) -> list[tuple[Chunk, tuple]]:
        """Run forward actions; returns (chunk, outputs) of the last stage's micro-batches."""
        results: list[tuple[Chunk, tuple]] = []
        for action in actions:
            self._forward_one(action, chunks, inputs, key, results)
        self.wait_sends()
        return results

    def run_actions(self, actions: list[Action], chunks: list[Chunk], inputs: list[torch.Tensor], key: tuple,
                    output_grads: OutputGrads) -> list[tuple[Chunk, tuple]]:
        """Run an interleaved schedule (1F1B): forwards and backwards in the given order, the backwards with
        the last stage's output gradients from `output_grads`. Sends are asynchronous, so neighbours never
        wait on each other's sends."""
        results: list[tuple[Chunk, tuple]] = []
        for action in actions:
            if action.kind == "F":
                self._forward_one(action, chunks, inputs, key, results)
            else:
                self._backward_one(action, output_grads)
        self.wait_sends()
        return results

    def _forward_one(self, action: Action, chunks: list[Chunk], inputs: list[torch.Tensor], key: tuple,
                     results: list) -> None:
        started = time.perf_counter()
        grad = torch.is_grad_enabled()
        chunk = chunks[action.microbatch]
        mb_key = (chunk.rows,) + key
        received = self._receive_values(mb_key, grad)
        args = received + [inputs[i][chunk.start:chunk.stop] if self.batched_inputs[i] else inputs[i]
                           for i in self.stage.inputs]
        if self.recompute and grad:
            outputs = checkpoint(_first_run_then_recompute(self.stage.module), *args, use_reentrant=False)
        else:
            outputs = self.stage.module(*args)
        if self.stage.is_last:
            results.append((chunk, outputs))
        else:
            self._send_values(mb_key, outputs)
        if grad:
            self._saved[action.microbatch] = _Saved(received, outputs, chunk)
        self._record(action, started)

    def _receive_values(self, mb_key: tuple, grad: bool) -> list[torch.Tensor]:
        if not self.stage.received:
            return []
        metas = self._recv_meta.get(mb_key)
        if metas is None:
            header = torch.empty(len(self.stage.received), _HEADER, dtype=torch.int64, device=self.device)
            dist.recv(header, self.prev_rank)
            metas = [_decode(row) for row in header.tolist()]
            self._recv_meta[mb_key] = metas
        values = []
        for meta in metas:
            buf = torch.empty(meta.shape, dtype=meta.dtype, device=self.device)
            dist.recv(buf, self.prev_rank)
            if grad and meta.requires_grad:
                buf.requires_grad_(True)
            values.append(buf)
        return values

    def _send_values(self, mb_key: tuple, outputs: tuple) -> None:
        if mb_key not in self._sent_meta:
            header = torch.tensor([_encode(o) for o in outputs], dtype=torch.int64, device=self.device)
            self._isend(header, self.next_rank)
            self._sent_meta.add(mb_key)
        for o in outputs:
            self._isend(o.detach().contiguous(), self.next_rank)

    def _isend(self, tensor: torch.Tensor, dst: int) -> None:
        self._pending_sends.append((dist.isend(tensor, dst), tensor))

    def wait_sends(self) -> None:
        for work, _ in self._pending_sends:
            work.wait()
        self._pending_sends.clear()

    # ---- backward ------------------------------------------------------------------------------------
    def run_backward(self, actions: list[Action], output_grads: OutputGrads) -> None:
        """Run backward actions; on the last stage `output_grads(outputs, chunk)` gives the gradient of each
        of a micro-batch's outputs (None where there is none)."""
        for action in actions:
            self._backward_one(action, output_grads)
        self.wait_sends()

    def _backward_one(self, action: Action, output_grads: OutputGrads) -> None:
        started = time.perf_counter()
        saved = self._saved.pop(action.microbatch, None)
        if saved is None:
            raise RuntimeError("loss.backward() was called twice for one forward (or without a forward "
                               "in grad mode); use rannc.keep_graph(True) to keep the graph")
        if self.stage.is_last:
            tensors, grads = [], []
            for o, g in zip(saved.outputs, output_grads(saved.outputs, saved.chunk)):
                if isinstance(o, torch.Tensor) and o.requires_grad and g is not None:
                    tensors.append(o)
                    grads.append(g.to(o.device, o.dtype).reshape(o.shape))
        else:
            tensors, grads = [], []
            for o in saved.outputs:
                if o.requires_grad:
                    g = torch.empty_like(o, memory_format=torch.contiguous_format)
                    dist.recv(g, self.next_rank)
                    tensors.append(o)
                    grads.append(g)
        if tensors:
            torch.autograd.backward(tensors, grads[:len(tensors)], retain_graph=self.keep_graph)
        if self.keep_graph:
            self._saved[action.microbatch] = saved
        for r in saved.received:
            if r.requires_grad:
                g = r.grad if r.grad is not None else torch.zeros_like(r)
                self._isend(g.contiguous(), self.prev_rank)
                if self.keep_graph:
                    r.grad = None
        self._record(action, started)

    def _record(self, action: Action, started: float) -> None:
        if self.trace is not None:
            self.trace.append({"name": str(action), "ph": "X", "pid": self.trace_pid, "tid": 0,
                               "ts": started * 1e6, "dur": (time.perf_counter() - started) * 1e6})

    def clear(self) -> None:
        self._saved.clear()


def _first_run_then_recompute(module):
    """The stage's forward for torch.utils.checkpoint: its second run (the recomputation in backward) runs
    under the recomputing switch, so that layers with running statistics count the micro-batch once."""
    runs = 0

    def run(*args):
        nonlocal runs
        runs += 1
        if runs == 1:
            return module(*args)
        with recomputing():
            return module(*args)

    return run


def _encode(t: torch.Tensor) -> list[int]:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"a stage sends a non-tensor value {type(t).__name__}; this is a rannc bug")
    if t.dim() > _MAX_DIMS:
        raise ValueError(f"rannc sends tensors of at most {_MAX_DIMS} dimensions, got {t.dim()}")
    dims = list(t.shape) + [0] * (_MAX_DIMS - t.dim())
    return [_DTYPES.index(t.dtype), int(t.requires_grad), t.dim()] + dims


def _decode(row: list[int]) -> _ValueMeta:
    ndim = row[2]
    return _ValueMeta(tuple(row[3:3 + ndim]), _DTYPES[row[0]], bool(row[1]))
