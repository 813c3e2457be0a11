"""The executor of one rank's part of the pipeline: runs a schedule's actions on the rank's pieces of the
model, receiving the values crossing a piece's first cut from the rank running the piece before it and
sending those crossing its last cut (or, on the model's last piece, handing the outputs back), and runs the
backward actions with gradients flowing the other way.

Shapes and dtypes of the values sent depend on the micro-batch size and on autocast; the sender sends
them once per such combination as a small header, and both sides cache it.

Under gloo a message moves only once its receive is posted (the sender waits for the receiver's notice), so a
receive posted when its action starts would keep the whole transfer on the receiver's critical path. There
every receive whose shape is known is posted ahead, in the order the actions receive (messages between two
ranks are matched in posting order), and the transfer runs while the rank computes: the step the planner's
simulator prices, where a message travels from the moment it is sent. NCCL queues receives on the device as
the host reaches them, ahead of the device's work, and posting them earlier could hold a pair's send behind a
receive on the same stream, so there receives are posted in place.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from rannc.graph.compiled import CompiledModule
from rannc.graph.dropout import checkpointed, recomputing
from rannc.graph.stage import ROWS_NONE, StageGraph
from rannc.runtime.chunks import Chunk, Route
from rannc.schedule import Action
from rannc.split_backward import WeightGradient, backward_input

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
    sources: list[Route]
    targets: list[Route]


@dataclass
class PieceLayout:
    """Per micro-batch: this replica's rows of it on one piece, and the routes its values take from the
    previous piece's replicas and to the next one's (one route each way unless their replica counts differ)."""

    chunks: list[Chunk]
    sources: list[list[Route]]
    targets: list[list[Route]]


@dataclass
class _ValueMeta:
    shape: tuple[int, ...]
    dtype: torch.dtype
    requires_grad: bool


@dataclass
class Piece:
    """One contiguous piece of the model this rank runs (one per virtual stage)."""

    stage: StageGraph
    recompute: bool
    compiled: CompiledModule | None = None   # the stage's module under torch.compile (the compile item)

    def __post_init__(self) -> None:
        self.params = self.stage.parameters()
        self.run = self.compiled if self.compiled is not None else self.stage.module


@dataclass
class StageRuntime:
    """One rank's part of the pipeline: its pieces (one unless the schedule has virtual stages) and the one
    entry point that runs any schedule's list of actions."""

    pieces: list[Piece]
    batched_inputs: list[bool]
    device: torch.device
    keep_graph: bool = False
    forward_group: object = None   # process groups of the forward values and of the gradients (None: the
    gradient_group: object = None  # default one; two when a pair of ranks exchanges both ways: virtual stages)
    trace: list | None = None      # Chrome trace events (host-side times) when trace_events is on
    trace_pid: int = 0
    peak_held: int = 0             # most (micro-batch, piece) activation sets held at once so far
    received_ahead: int = 0        # tensors that arrived through a receive posted ahead (gloo), so far
    _recv_meta: dict = field(default_factory=dict)
    _sent_meta: set = field(default_factory=set)
    _saved: dict[tuple[int, int], _Saved] = field(default_factory=dict)
    _weights: dict[tuple[int, int], WeightGradient] = field(default_factory=dict)
    _pending_sends: list = field(default_factory=list)
    _posted: dict[Action, list] = field(default_factory=dict)   # receives posted ahead: (work, buffer) in order
    _post_ahead: bool = field(init=False, default=False)         # gloo: receives are posted ahead

    def __post_init__(self) -> None:
        self._post_ahead = dist.is_initialized() and dist.get_backend(self.forward_group) == "gloo"

    @property
    def stage(self) -> StageGraph:
        """The first piece (the only one without virtual stages)."""
        return self.pieces[0].stage

    def claim_grads(self) -> None:
        """Gradients that a compiled piece's CUDA graphs may still own, copied out of their memory."""
        for piece in self.pieces:
            if piece.compiled is not None:
                piece.compiled.claim_grads()

    def parameters(self) -> list[torch.nn.Parameter]:
        """The parameters of all pieces, each once."""
        return list({id(p): p for piece in self.pieces for p in piece.params}.values())

    def run_actions(self, actions: list[Action], layouts: list[PieceLayout], inputs: list[torch.Tensor], key: tuple,
                    output_grads: OutputGrads | None = None) -> list[tuple[Chunk, tuple]]:
        """Run a schedule's actions in order: forwards (F), backwards (B) or a backward split into input
        (BI) and weight (BW) gradients. The last piece's backwards take its outputs' gradients from
        `output_grads(outputs, chunk)` (None where an output has none). Returns (chunk, outputs) of the last
        piece's forwards. Sends are asynchronous, so neighbours never wait on each other's sends."""
        results: list[tuple[Chunk, tuple]] = []
        posted_to = 0   # the actions before it have their receives posted, or done
        try:
            for i, action in enumerate(actions):
                if self._post_ahead:
                    posted_to = self._post_receives(actions, i, max(posted_to, i), layouts, key)
                started = time.perf_counter()
                if action.kind == "F":
                    self._forward_one(action, layouts[action.stage], inputs, key, results)
                elif action.kind == "BW":
                    self._weights.pop((action.microbatch, action.stage)).run()
                else:
                    self._backward_one(action, output_grads)
                self.peak_held = max(self.peak_held, len(self._saved) + len(self._weights))
                self._record(action, started)
        except BaseException:
            # receives still posted hold gloo's connections open past the process group's destruction, and
            # the peers would learn of this rank's failure only when its process ends
            self._posted.clear()
            raise
        self.wait_sends()
        return results

    # ---- receives posted ahead (gloo) ------------------------------------------------------------------
    def _post_receives(self, actions: list[Action], running: int, start: int, layouts: list[PieceLayout],
                       key: tuple) -> int:
        """Post the receives of actions[start:] in order, up to the first whose shapes are not known yet (a
        first header, or gradients of a forward not run yet), which receives in place when it runs. Returns
        the index of that action, or the one after it if it is actions[running], about to run: its receives
        are then done before any later one is posted."""
        for index in range(start, len(actions)):
            action = actions[index]
            wanted = self._receives_of(action, layouts, key)
            if wanted is None:
                return index + 1 if index == running else index
            if wanted and action not in self._posted:
                self._posted[action] = []
                for shape, dtype, src, group in wanted:
                    buf = torch.empty(shape, dtype=dtype, device=self.device)
                    self._posted[action].append((dist.irecv(buf, src, group=group), buf))
        return len(actions)

    def _receives_of(self, action: Action, layouts: list[PieceLayout], key: tuple) -> list[tuple] | None:
        """What `action` receives, in the order it receives it: (shape, dtype, source rank, group) per tensor;
        None while a shape is not known."""
        piece = self.pieces[action.stage]
        if action.kind == "BW":
            return []
        if action.kind == "F":
            if not piece.stage.received:
                return []
            layout = layouts[action.stage]
            chunk = layout.chunks[action.microbatch]
            mb_key = (action.stage, chunk.rows) + key
            wanted = []
            for route in layout.sources[action.microbatch]:
                metas = self._recv_meta.get(_meta_key(mb_key, route))
                if metas is None:
                    return None
                wanted += [(meta.shape, meta.dtype, route.rank, self.forward_group) for meta in metas]
            return wanted
        if piece.stage.is_last:
            return []
        saved = self._saved.get((action.microbatch, action.stage))
        if saved is None:
            return None
        return [(shape, o.dtype, route.rank, self.gradient_group)
                for k, o in enumerate(saved.outputs) if o.requires_grad
                for route, shape in _gradient_parts(o, piece.stage.sent_rows[k], saved)]

    def _received(self, posted: list | None, shape, dtype: torch.dtype, src: int, group) -> torch.Tensor:
        """The next tensor of an action's receives: its posted receive, waited for, or a receive in place."""
        if posted:
            work, buf = posted.pop(0)
            if buf.shape != shape or buf.dtype != dtype:
                raise RuntimeError(f"rannc: a receive posted ahead from rank {src} holds {tuple(buf.shape)} "
                                   f"{buf.dtype} where {tuple(shape)} {dtype} is due; this is a rannc bug")
            work.wait()
            self.received_ahead += 1
            return buf
        buf = torch.empty(shape, dtype=dtype, device=self.device)
        dist.recv(buf, src, group=group)
        return buf

    # ---- forward -------------------------------------------------------------------------------------
    def _forward_one(self, action: Action, layout: PieceLayout, inputs: list[torch.Tensor], key: tuple,
                     results: list) -> None:
        piece = self.pieces[action.stage]
        grad = torch.is_grad_enabled()
        mb = action.microbatch
        chunk, sources, targets = layout.chunks[mb], layout.sources[mb], layout.targets[mb]
        mb_key = (action.stage, chunk.rows) + key
        received = self._receive_values(piece, sources, mb_key, grad, self._posted.pop(action, None))
        args = received + [inputs[i][chunk.start:chunk.stop] if self.batched_inputs[i] else inputs[i]
                           for i in piece.stage.inputs]
        # a call whose backward may run twice (keep_graph) runs eagerly: torch.compile's backward refuses
        # retain_graph (AOTAutograd's donated buffers), and compiled with them off, its second run added next to
        # nothing (an MLP of Linear + ReLU with mse_loss, torch 2.13 on the CPU)
        run = piece.stage.module if self.keep_graph and grad else piece.run
        if piece.recompute and grad:
            outputs = checkpoint(_first_run_then_recompute(run), *args, use_reentrant=False)
        else:
            outputs = run(*args)
        if piece.stage.is_last:
            results.append((chunk, outputs))
        else:
            self._send_values(piece, targets, chunk, mb_key, outputs)
        if grad:
            self._saved[mb, action.stage] = _Saved(received, outputs, chunk, sources, targets)

    def _receive_values(self, piece: Piece, sources: list[Route], mb_key: tuple, grad: bool,
                        posted: list | None) -> list[torch.Tensor]:
        """The values crossing the piece's first cut, assembled from the rows each source sends (a value
        not cut by rows is taken from the first source)."""
        count = len(piece.stage.received)
        if not count:
            return []
        parts: list[list[torch.Tensor]] = [[] for _ in range(count)]
        needs_grad = [False] * count
        for route in sources:
            meta_key = _meta_key(mb_key, route)
            metas = self._recv_meta.get(meta_key)
            if metas is None:
                header = torch.empty(count, _HEADER, dtype=torch.int64, device=self.device)
                dist.recv(header, route.rank, group=self.forward_group)
                metas = [_decode(row) for row in header.tolist()]
                self._recv_meta[meta_key] = metas
            for k, meta in enumerate(metas):
                buf = self._received(posted, meta.shape, meta.dtype, route.rank, self.forward_group)
                needs_grad[k] = meta.requires_grad
                if piece.stage.received_rows[k] != ROWS_NONE or route.primary:
                    parts[k].append(buf)
        values = []
        for k in range(count):
            value = parts[k][0] if len(parts[k]) == 1 else torch.cat(parts[k])
            if grad and needs_grad[k]:
                value.requires_grad_(True)
            values.append(value)
        return values

    def _send_values(self, piece: Piece, targets: list[Route], chunk: Chunk, mb_key: tuple, outputs: tuple) -> None:
        for route in targets:
            part = [_rows(o, piece.stage.sent_rows[k], route, chunk) for k, o in enumerate(outputs)]
            meta_key = _meta_key(mb_key, route)
            if meta_key not in self._sent_meta:
                header = torch.tensor([_encode(o) for o in part], dtype=torch.int64, device=self.device)
                self._isend(header, route.rank, self.forward_group)
                self._sent_meta.add(meta_key)
            for o in part:
                self._isend(o.detach().contiguous(), route.rank, self.forward_group)

    def _isend(self, tensor: torch.Tensor, dst: int, group) -> None:
        self._pending_sends.append((dist.isend(tensor, dst, group=group), tensor))

    def wait_sends(self) -> None:
        for work, _ in self._pending_sends:
            work.wait()
        self._pending_sends.clear()

    # ---- backward ------------------------------------------------------------------------------------
    def _backward_one(self, action: Action, output_grads: OutputGrads | None) -> None:
        """B: the whole backward of one micro-batch on one piece; BI: only its inputs' gradients, leaving
        the weights' part for the BW that follows later."""
        piece = self.pieces[action.stage]
        where = (action.microbatch, action.stage)
        saved = self._saved.pop(where, None)
        if saved is None:
            raise RuntimeError("loss.backward() was called twice for one forward (or without a forward "
                               "in grad mode); use rannc.keep_graph(True) to keep the graph")
        tensors, grads = [], []
        if piece.stage.is_last:
            for o, g in zip(saved.outputs, output_grads(saved.outputs, saved.chunk)):
                if isinstance(o, torch.Tensor) and o.requires_grad and g is not None:
                    tensors.append(o)
                    grads.append(g.to(o.device, o.dtype).reshape(o.shape))
        else:
            posted = self._posted.pop(action, None)
            for k, o in enumerate(saved.outputs):
                if o.requires_grad:
                    tensors.append(o)
                    grads.append(self._receive_grad(o, piece.stage.sent_rows[k], saved, posted))
        senders = [(k, r) for k, r in enumerate(saved.received) if r.requires_grad]
        if action.kind == "BI":
            input_grads, self._weights[where] = backward_input(tensors, grads, [r for _, r in senders], piece.params)
        else:
            if tensors:
                torch.autograd.backward(tensors, grads, retain_graph=self.keep_graph)
            input_grads = [r.grad for _, r in senders]
            if self.keep_graph:
                self._saved[where] = saved
                for _, r in senders:
                    r.grad = None
        for (k, r), g in zip(senders, input_grads):
            g = g if g is not None else torch.zeros_like(r)
            factor = piece.stage.received_rows[k]
            for route in saved.sources:
                if factor != ROWS_NONE or route.primary:
                    self._isend(_rows(g, factor, route, saved.chunk).contiguous(), route.rank, self.gradient_group)

    def _receive_grad(self, output: torch.Tensor, factor: int, saved: _Saved, posted: list | None) -> torch.Tensor:
        """The gradient of one sent value: the rows each receiver sends back, or for a value not cut by
        rows the sum of what the receivers it was the first source of send (zeros if none)."""
        parts = [self._received(posted, shape, output.dtype, route.rank, self.gradient_group)
                 for route, shape in _gradient_parts(output, factor, saved)]
        if factor == ROWS_NONE:
            return torch.stack(parts).sum(0) if len(parts) > 1 else (parts[0] if parts else torch.zeros_like(output))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _record(self, action: Action, started: float) -> None:
        if self.trace is not None:
            self.trace.append({"name": str(action), "ph": "X", "pid": self.trace_pid, "tid": 0,
                               "ts": started * 1e6, "dur": (time.perf_counter() - started) * 1e6})

    def clear(self) -> None:
        self._saved.clear()
        self._weights.clear()
        self._posted.clear()


def _gradient_parts(output: torch.Tensor, factor: int, saved: _Saved) -> list[tuple[Route, torch.Size]]:
    """The receivers that send back a part of a sent value's gradient, and each part's shape: every receiver
    its rows, or for a value not cut by rows the receivers it was the first source of."""
    return [(route, _rows(output, factor, route, saved.chunk).shape) for route in saved.targets
            if factor != ROWS_NONE or route.primary]


def _first_run_then_recompute(module):
    """The stage's forward for torch.utils.checkpoint: its second run (the recomputation in backward) runs
    under the recomputing switch, so that layers with running statistics count the micro-batch once; both
    under the checkpointed switch, so that recurrent layers draw their dropout masks where the recomputation
    draws them again (rannc.graph.dropout)."""
    runs = 0

    def run(*args):
        nonlocal runs
        runs += 1
        with checkpointed():
            if runs == 1:
                return module(*args)
            with recomputing():
                return module(*args)

    return run


def _meta_key(mb_key: tuple, route: Route) -> tuple:
    """The key both sides cache a route's header under: the micro-batch's, the peer and the rows it carries."""
    return mb_key, route.rank, route.stop - route.start


def _rows(value: torch.Tensor, factor: int, route: Route, chunk: Chunk) -> torch.Tensor:
    """The part of a value of `chunk` that travels on `route`: its rows, or all of it when the route takes
    the whole chunk or the value is not cut by rows."""
    if route.start == chunk.start and route.stop == chunk.stop or factor <= 0:
        return value
    return value[(route.start - chunk.start) * factor:(route.stop - chunk.start) * factor]


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
