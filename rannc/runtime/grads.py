"""Gradient all-reduce within each holder set (a stage's replicas, plus the other stages that share a
tensor) and clipping by the global gradient norm, each parameter counted once."""

from __future__ import annotations

import logging
import math

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from rannc.plan.cost import GRAD_BUCKET_BYTES as BUCKET_BYTES
from rannc.runtime.placement import Placement

try:
    from rannc.kernels import multi_tensor
except ImportError:  # no Triton: torch's foreach ops only
    multi_tensor = None

logger = logging.getLogger(__name__)


def allreduce_grads(placement: Placement, scale: float = 1.0) -> None:
    """Sum every local gradient over the ranks that hold its parameter (then multiply by `scale`)."""
    by_group: dict[tuple[int, ...], list[torch.nn.Parameter]] = {}
    for p in placement.local_parameters():
        if p.requires_grad:
            by_group.setdefault(placement.holders_of(p), []).append(p)
    for ranks, params in by_group.items():
        if len(ranks) == 1:
            if scale != 1.0:
                for p in params:
                    if p.grad is not None:
                        p.grad.mul_(scale)
            continue
        group = placement.groups[ranks]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        for bucket in _buckets(params):
            grads = [p.grad for p in bucket]
            flat = _flatten_dense_tensors(grads)
            dist.all_reduce(flat, group=group)
            if scale != 1.0:
                flat.mul_(scale)
            for g, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
                g.copy_(reduced)


def _buckets(params: list[torch.nn.Parameter]):
    bucket, size, dtype = [], 0, None
    for p in params:
        nbytes = p.numel() * p.element_size()
        if bucket and (size + nbytes > BUCKET_BYTES or p.grad.dtype != dtype):
            yield bucket
            bucket, size = [], 0
        bucket.append(p)
        size += nbytes
        dtype = p.grad.dtype
    if bucket:
        yield bucket


def _by_device_and_dtype(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    return list(groups.values())


class FusedGrads:
    """Clipping's two passes over a group of gradients (one device and dtype) as one launch each on CUDA: the
    multi-tensor sum of squares and scale of rannc.kernels.multi_tensor, which read the 4.9B model's fp32
    gradients in about half the time of torch's foreach norm (4.35 vs 8.1 ms on one H200). torch's foreach ops
    elsewhere: on CPUs, without Triton, for dtypes other than fp32/bf16/fp16, for norms other than 2, for
    gradients the kernels cannot index (not contiguous: said once in the log), and from the first time Triton
    fails to build or launch a kernel on this device (a warning with the reason). A table is re-pointed where
    the grads' addresses moved; grads at the same addresses and sizes as before are taken to be laid out as
    before.

    Keeps each group's table of addresses between steps and re-points it when the gradients are new tensors
    (after zero_grad(set_to_none=True)), as the fused optimizer does."""

    def __init__(self) -> None:
        self._tables = multi_tensor.TableCache() if multi_tensor is not None else {}
        self._told: set[str] = set()
        self._failed: str | None = None   # why the kernels could not run here (then foreach from there on)

    def _fall_back(self, exc: Exception) -> None:
        """A kernel that Triton cannot build or launch on this device: clipping goes on with torch's foreach ops,
        said once as a warning with the reason."""
        self._failed = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"
        logger.warning("rannc: the fused clipping kernels failed (%s); clipping takes torch's foreach ops from "
                       "here on", self._failed)

    def _table(self, role: str, grads: list[torch.Tensor]):
        device, dtype = grads[0].device, grads[0].dtype
        if multi_tensor is None or self._failed is not None or multi_tensor.support_problem(device, dtype):
            return None
        rows = [grads]
        try:
            pointers = multi_tensor.row_pointers(rows)   # one walk over the grads, for every check below
        except RuntimeError:   # a grad without storage (sparse): the lookup names it
            pointers = None
        if role == "scale" and pointers is not None:   # the norm's table serves the scale where both take the
            shared = self._tables.get(("norm", device, dtype))   # same grads (one rank's)
            if shared is not None and shared.fits(rows) and not shared.moved_rows(pointers):
                return shared
        table, problem = self._tables.lookup((role, device, dtype), rows, (dtype,), pointers)
        if problem is not None and problem not in self._told:
            self._told.add(problem)
            logger.info("rannc: gradient clipping takes torch's foreach ops: %s", problem)
        return table

    def norms(self, grads: list[torch.Tensor], norm_type: float) -> list[torch.Tensor]:
        """fp32 norms whose norm is that of all of `grads` (each group's, or each tensor's)."""
        norms = []
        for group in _by_device_and_dtype(grads):
            table = self._table("norm", group) if norm_type == 2.0 else None
            if table is not None:
                try:
                    norms.append(multi_tensor.grad_norm(table, group[0].dtype))
                    continue
                except Exception as exc:   # a kernel is built on its first launch: nothing was written yet
                    self._fall_back(exc)
            # fp32 norms of bf16 gradients too (their own dtype would keep three significant digits)
            norms.extend(torch._foreach_norm(group, norm_type, dtype=torch.float32))
        return norms

    def scale_(self, grads: list[torch.Tensor], factor: torch.Tensor) -> None:
        """Multiply every gradient in place by the one-element `factor`, taken in each group's dtype (a factor
        of another dtype takes torch's slow path, tensor by tensor)."""
        for group in _by_device_and_dtype(grads):
            table = self._table("scale", group)
            if table is not None:
                try:
                    multi_tensor.scale_(table, group[0].dtype, factor)
                    continue
                except Exception as exc:   # a kernel is built on its first launch: nothing was written yet
                    self._fall_back(exc)
            torch._foreach_mul_(group, factor.to(group[0].device, group[0].dtype))


def global_grad_norm(placement: Placement, device: torch.device, norm_type: float = 2.0,
                     fused: FusedGrads | None = None) -> torch.Tensor:
    """The norm over all parameters' gradients, each counted once (by its owner); collective.

    One fused norm per device and dtype (`fused`'s kernels, or `torch._foreach_norm` as
    torch.nn.utils.clip_grad_norm_ does), then one one-element all-reduce: no per-parameter launches, no host
    synchronisation."""
    owned = [p.grad for p in placement.owned_parameters() if p.grad is not None]
    with torch.no_grad():
        norms = (fused or FusedGrads()).norms(owned, norm_type)
        stacked = (torch.stack([n.to(device, torch.float32).reshape(()) for n in norms]) if norms
                   else torch.zeros(1, dtype=torch.float32, device=device))
        inf = norm_type == math.inf
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return stacked.max() if inf else torch.linalg.vector_norm(stacked, norm_type)
        total = (stacked.max() if inf else torch.linalg.vector_norm(stacked, norm_type) ** norm_type).reshape(1)
        dist.all_reduce(total, op=dist.ReduceOp.MAX if inf else dist.ReduceOp.SUM)
        return total[0] if inf else total[0] ** (1.0 / norm_type)


def clip_grad_norm(placement: Placement, device: torch.device, max_norm: float,
                   norm_type: float = 2.0, fused: FusedGrads | None = None) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ over the whole distributed model; returns the total norm. `fused` keeps
    the kernels' tables from step to step."""
    fused = fused or FusedGrads()
    total = global_grad_norm(placement, device, norm_type, fused)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    with torch.no_grad():
        fused.scale_([p.grad for p in placement.local_parameters() if p.grad is not None], coef)
    return total


class OverlappedAllReduce:
    """Gradient all-reduce that overlaps the backward pass, as DDP does: parameters are put in buckets
    (per holder set, in reverse order of use, at most BUCKET_BYTES), and a bucket is reduced
    asynchronously as soon as the last micro-batch's backward has produced all of its gradients.

    Buckets are launched strictly in index order, so every rank of a group issues its collectives in
    the same order whatever order autograd finishes them in. Only buckets held by this stage's replicas
    overlap the backward; a tensor shared with other stages (a tied embedding) is reduced after this rank's
    whole backward, in `finish`: its holders reach it at different points of the pipeline (the last stage
    early in its backward, the first stage at the end of its own), and a collective issued between the
    pipeline's sends and receives in different orders on two ranks deadlocks NCCL's communicators."""

    def __init__(self, placement: Placement, params_in_use_order: list[torch.nn.Parameter],
                 stage_ranks: list[int] | None = None):
        self.buckets: list[tuple[object, list[torch.nn.Parameter]]] = []
        self.overlapped = 0   # buckets [0, overlapped) may launch during backward
        by_group: dict[tuple[int, ...], list[torch.nn.Parameter]] = {}
        for p in reversed(params_in_use_order):
            ranks = placement.holders_of(p)
            if p.requires_grad and len(ranks) > 1:
                by_group.setdefault(ranks, []).append(p)
        deferred = {ranks for ranks in by_group if stage_ranks is not None and not set(ranks) <= set(stage_ranks)}
        # overlapped buckets first: a deferred one launches only in finish(), and would hold back those after it
        global_order = {id(t): i for i, t in enumerate(placement.tensors.values())}
        for ranks, params in sorted(by_group.items(), key=lambda item: (item[0] in deferred, item[0])):
            if ranks in deferred:  # each stage uses them in its own order; the flat buffers must line up
                params = sorted(params, key=lambda p: global_order[id(p)])
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)  # buckets are sized by dtype; real grads replace these
            for bucket in _buckets(params):
                self.buckets.append((placement.groups[ranks], bucket))
                if ranks not in deferred:
                    self.overlapped = len(self.buckets)
        self.bucket_of = {id(p): k for k, (_, bucket) in enumerate(self.buckets) for p in bucket}
        self.active = False
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad)
                         for _, bucket in self.buckets for p in bucket]

    def begin(self, accumulations_per_param: int) -> None:
        """Arm for one backward in which every parameter's gradient is accumulated this many times."""
        self.expected = accumulations_per_param
        self.counts: dict[int, int] = {}
        self.missing = [len(bucket) for _, bucket in self.buckets]
        self.next_bucket = 0
        self.launched: list[tuple[int, torch.Tensor, object]] = []
        self.active = True

    def _on_grad(self, p: torch.nn.Parameter) -> None:
        if not self.active:
            return
        count = self.counts[id(p)] = self.counts.get(id(p), 0) + 1
        if count == self.expected:
            self.missing[self.bucket_of[id(p)]] -= 1
            while self.next_bucket < self.overlapped and self.missing[self.next_bucket] == 0:
                self._launch(self.next_bucket)
                self.next_bucket += 1

    def _launch(self, index: int) -> None:
        group, bucket = self.buckets[index]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in bucket]
        flat = _flatten_dense_tensors(grads)
        self.launched.append((index, flat, dist.all_reduce(flat, group=group, async_op=True)))

    def finish(self) -> None:
        """Launch what never became ready (parameters without gradient this step), wait, write back."""
        while self.next_bucket < len(self.buckets):
            self._launch(self.next_bucket)
            self.next_bucket += 1
        for index, flat, work in self.launched:
            work.wait()
            bucket = self.buckets[index][1]
            for p in bucket:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            grads = [p.grad for p in bucket]
            for g, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
                g.copy_(reduced)
        self.launched = []
        self.active = False

    def cancel(self) -> None:
        self.active = False
