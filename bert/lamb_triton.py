"""A fused multi-tensor LAMB step in Triton, for :class:`bert.optim.Lamb` on CUDA.

LAMB is memory-bound: per fp32 parameter a step must read p, g, m, v and write p, m, v (28 bytes). torch's
foreach ops spend several full passes and full-size temporaries on it. Here one launch walks all tensors
of a bucket through a table of base addresses, split into fixed-size chunks (as apex's multi_tensor_apply
does), and the step takes three launches:

1. ``_moments_kernel`` reads g, m, v, p, writes the new m and v, and leaves per-chunk sums of p² and u²,
   where u = m̂/(√v̂+eps) + wd·p is the Adam(W) update (24 bytes per parameter);
2. ``_ratio_kernel`` sums each tensor's chunks in float64 and turns them into the trust ratio lr·‖p‖/‖u‖
   (lr where a norm is zero), a few bytes per tensor;
3. ``_apply_kernel`` reads m, v, p again, recomputes u exactly as pass 1 did and writes p - ratio·u
   (16 bytes per parameter).

The per-tensor norm is needed before any element can move, so 40 bytes per parameter is this design's
floor (44 with the optimizer's own gradient clipping, which first reads g once for the global norm).
Groups without a trust ratio (weight_decay 0 and no nvlamb) are applied inside pass 1, in one pass
(28 bytes).

The math is the foreach path's formulas in its order, with IEEE division and square root as torch's
kernels use; only the compiler's fused multiply-adds round differently (about 1e-7 relative on a step).
States are fp32; fp16/bf16 parameters and grads are upcast to fp32 and the new parameter is rounded back
once. Grads may have a dtype of their own (bf16 grads of fp32 master weights), and an optional fifth row of
compute copies gets the new parameter rounded to its dtype wherever the parameter is written (+2 bytes per
parameter for a bf16 copy, against a separate cast and copy of 12). Under Triton's interpreter
(``TRITON_INTERPRET=1``) the same kernels run on CPU tensors, so that they can be checked without a GPU; the
interpreter truncates fp32 to bf16 instead of rounding, so there bf16 results may be one ulp off the GPU's.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

__all__ = ["INTERPRETED", "SUPPORTED_DTYPES", "TensorTable", "grad_norm", "lamb_update", "layout_problem",
           "row_pointers"]

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

# One program walks one chunk of one tensor, BLOCK elements at a time. Chunks bound the table's size and
# keep the partial sums few; the block is what one iteration holds in registers. Read at each launch, so a
# benchmark can try other values.
CHUNK = 65536
BLOCK = 2048
NUM_WARPS = 8
# Vector loads need 16-byte aligned bases; torch's allocator gives far more, views into a flat buffer may not.
_ALIGNMENT = 16
_RATIO_BLOCK = 1024


@triton.jit
def _table_ptr(table, index, DTYPE: tl.constexpr):
    """Read a base address from the table as a pointer that Triton may use for 16-byte vector accesses."""
    # The hint must sit on the pointer: Triton does not carry an integer's divisibility through the cast.
    return tl.multiple_of(tl.load(table + index).to(tl.pointer_type(DTYPE)), 16)


@triton.jit
def _chunk_span(numels, chunk_tensor, chunk_index, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """The tensor, first element and length of this program's chunk, and the length rounded down to blocks."""
    tensor = tl.load(chunk_tensor + tl.program_id(0))
    start = tl.load(chunk_index + tl.program_id(0)).to(tl.int64) * CHUNK
    length = tl.minimum(tl.load(numels + tensor) - start, CHUNK)
    return tensor, start, length, (length // BLOCK) * BLOCK


@triton.jit
def _load(ptr, offs, mask, MASKED: tl.constexpr):
    """Load as fp32; full blocks go unmasked so that they compile to vector loads."""
    if MASKED:
        x = tl.load(ptr + offs, mask=mask, other=0.0)
    else:
        x = tl.load(ptr + offs)
    return x.to(tl.float32)


@triton.jit
def _store(ptr, offs, x, mask, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptr + offs, x.to(ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(ptr + offs, x.to(ptr.dtype.element_ty))


@triton.jit
def _adam_update(m, v, p, bias_correction1, bias_correction2, eps, weight_decay, DECAY: tl.constexpr):
    """u = (m/bc1) / (sqrt(v/bc2) + eps) + wd·p, in the foreach path's order of operations."""
    denom = tl.sqrt_rn(tl.div_rn(v, bias_correction2)) + eps
    u = tl.div_rn(tl.div_rn(m, bias_correction1), denom)
    if DECAY:
        u = u + weight_decay * p
    return u


@triton.jit
def _moments_block(
    offs, n, p_ptr, g_ptr, m_ptr, v_ptr, c_ptr, clip, beta1, beta2, beta3, one_minus_beta2,
    bias_correction1, bias_correction2, eps, weight_decay, lr,
    MASKED: tl.constexpr, HAS_CLIP: tl.constexpr, DECAY: tl.constexpr, APPLY: tl.constexpr,
    HAS_COPY: tl.constexpr,
):
    """Update m and v for one block; return its p² and u², or apply p -= lr·u when there is no trust ratio."""
    mask = offs < n
    g = _load(g_ptr, offs, mask, MASKED)
    m = _load(m_ptr, offs, mask, MASKED)
    v = _load(v_ptr, offs, mask, MASKED)
    p = _load(p_ptr, offs, mask, MASKED)
    if HAS_CLIP:
        g = tl.div_rn(g, clip)
    m = m * beta1 + beta3 * g
    v = v * beta2 + one_minus_beta2 * g * g
    _store(m_ptr, offs, m, mask, MASKED)
    _store(v_ptr, offs, v, mask, MASKED)
    u = _adam_update(m, v, p, bias_correction1, bias_correction2, eps, weight_decay, DECAY)
    if APPLY:
        new_p = p - u * lr
        _store(p_ptr, offs, new_p, mask, MASKED)
        if HAS_COPY:
            _store(c_ptr, offs, new_p, mask, MASKED)
    p_sq = p * p
    u_sq = u * u
    if MASKED:
        # Masked lanes hold zeros, but u = 0/(0+eps) is NaN when eps is 0: keep them out of the sums.
        p_sq = tl.where(mask, p_sq, 0.0)
        u_sq = tl.where(mask, u_sq, 0.0)
    return p_sq, u_sq


@triton.jit
def _moments_kernel(
    table, numels, chunk_tensor, chunk_index, partials, clip_ptr, n_tensors, n_chunks,
    beta1, beta2, beta3, one_minus_beta2, bias_correction1, bias_correction2, eps, weight_decay, lr,
    P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, C_DTYPE: tl.constexpr, HAS_CLIP: tl.constexpr,
    DECAY: tl.constexpr, APPLY: tl.constexpr, HAS_COPY: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    """Pass 1 over one chunk: new m and v, and the chunk's sums of p² and u² (table rows: p, g, m, v, and the
    compute copies c where HAS_COPY)."""
    tensor, start, length, full = _chunk_span(numels, chunk_tensor, chunk_index, CHUNK, BLOCK)
    p_ptr = _table_ptr(table, tensor, P_DTYPE)
    g_ptr = _table_ptr(table, n_tensors + tensor, G_DTYPE)
    m_ptr = _table_ptr(table, 2 * n_tensors + tensor, tl.float32)
    v_ptr = _table_ptr(table, 3 * n_tensors + tensor, tl.float32)
    c_ptr = p_ptr
    if HAS_COPY:
        c_ptr = _table_ptr(table, 4 * n_tensors + tensor, C_DTYPE)
    clip = 1.0
    if HAS_CLIP:
        clip = tl.load(clip_ptr)
    end = start + length
    p_acc = tl.zeros([BLOCK], dtype=tl.float32)
    u_acc = tl.zeros([BLOCK], dtype=tl.float32)
    for off in range(0, full, BLOCK):
        offs = start + off + tl.arange(0, BLOCK)
        p_sq, u_sq = _moments_block(
            offs, end, p_ptr, g_ptr, m_ptr, v_ptr, c_ptr, clip, beta1, beta2, beta3, one_minus_beta2,
            bias_correction1, bias_correction2, eps, weight_decay, lr, False, HAS_CLIP, DECAY, APPLY, HAS_COPY,
        )
        p_acc += p_sq
        u_acc += u_sq
    if full < length:
        offs = start + full + tl.arange(0, BLOCK)
        p_sq, u_sq = _moments_block(
            offs, end, p_ptr, g_ptr, m_ptr, v_ptr, c_ptr, clip, beta1, beta2, beta3, one_minus_beta2,
            bias_correction1, bias_correction2, eps, weight_decay, lr, True, HAS_CLIP, DECAY, APPLY, HAS_COPY,
        )
        p_acc += p_sq
        u_acc += u_sq
    if not APPLY:
        tl.store(partials + tl.program_id(0), tl.sum(p_acc, axis=0))
        tl.store(partials + n_chunks + tl.program_id(0), tl.sum(u_acc, axis=0))


@triton.jit
def _ratio_kernel(partials, chunk_first, chunk_count, ratios, n_chunks, lr, BLOCK: tl.constexpr):
    """One program per tensor: ‖p‖ and ‖u‖ from its chunks' sums, then lr·‖p‖/‖u‖, or lr if either is 0."""
    tensor = tl.program_id(0)
    first = tl.load(chunk_first + tensor)
    count = tl.load(chunk_count + tensor)
    p_acc = tl.zeros([BLOCK], dtype=tl.float64)
    u_acc = tl.zeros([BLOCK], dtype=tl.float64)
    for i in range(0, count, BLOCK):
        idx = i + tl.arange(0, BLOCK)
        mask = idx < count
        p_acc += tl.load(partials + first + idx, mask=mask, other=0.0).to(tl.float64)
        u_acc += tl.load(partials + n_chunks + first + idx, mask=mask, other=0.0).to(tl.float64)
    # Norms in fp32, as torch._foreach_norm returns them, so the ratio is formed as the foreach path forms it.
    p_norm = tl.sqrt(tl.sum(p_acc, axis=0)).to(tl.float32)
    u_norm = tl.sqrt(tl.sum(u_acc, axis=0)).to(tl.float32)
    usable = (p_norm > 0.0) & (u_norm > 0.0)
    ratio = tl.where(usable, tl.div_rn(p_norm, tl.where(usable, u_norm, 1.0)), 1.0) * lr
    tl.store(ratios + tensor, ratio)


@triton.jit
def _apply_block(
    offs, n, p_ptr, m_ptr, v_ptr, c_ptr, ratio, bias_correction1, bias_correction2, eps, weight_decay,
    MASKED: tl.constexpr, DECAY: tl.constexpr, HAS_COPY: tl.constexpr,
):
    mask = offs < n
    m = _load(m_ptr, offs, mask, MASKED)
    v = _load(v_ptr, offs, mask, MASKED)
    p = _load(p_ptr, offs, mask, MASKED)
    u = _adam_update(m, v, p, bias_correction1, bias_correction2, eps, weight_decay, DECAY)
    new_p = p - u * ratio
    _store(p_ptr, offs, new_p, mask, MASKED)
    if HAS_COPY:
        _store(c_ptr, offs, new_p, mask, MASKED)


@triton.jit
def _apply_kernel(
    table, numels, chunk_tensor, chunk_index, ratios, n_tensors,
    bias_correction1, bias_correction2, eps, weight_decay,
    P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, C_DTYPE: tl.constexpr, DECAY: tl.constexpr,
    HAS_COPY: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    """Pass 2 over one chunk: recompute u from the new m and v and write p - ratio·u (and its compute copy)."""
    tensor, start, length, full = _chunk_span(numels, chunk_tensor, chunk_index, CHUNK, BLOCK)
    p_ptr = _table_ptr(table, tensor, P_DTYPE)
    m_ptr = _table_ptr(table, 2 * n_tensors + tensor, tl.float32)
    v_ptr = _table_ptr(table, 3 * n_tensors + tensor, tl.float32)
    c_ptr = p_ptr
    if HAS_COPY:
        c_ptr = _table_ptr(table, 4 * n_tensors + tensor, C_DTYPE)
    ratio = tl.load(ratios + tensor)
    end = start + length
    for off in range(0, full, BLOCK):
        offs = start + off + tl.arange(0, BLOCK)
        _apply_block(
            offs, end, p_ptr, m_ptr, v_ptr, c_ptr, ratio, bias_correction1, bias_correction2, eps, weight_decay,
            False, DECAY, HAS_COPY,
        )
    if full < length:
        offs = start + full + tl.arange(0, BLOCK)
        _apply_block(
            offs, end, p_ptr, m_ptr, v_ptr, c_ptr, ratio, bias_correction1, bias_correction2, eps, weight_decay,
            True, DECAY, HAS_COPY,
        )


@triton.jit
def _sum_squares_kernel(
    table, numels, chunk_tensor, chunk_index, partials, G_DTYPE: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Each chunk's sum of g² (table row 0), for the global gradient norm."""
    tensor, start, length, full = _chunk_span(numels, chunk_tensor, chunk_index, CHUNK, BLOCK)
    g_ptr = _table_ptr(table, tensor, G_DTYPE)
    end = start + length
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for off in range(0, full, BLOCK):
        offs = start + off + tl.arange(0, BLOCK)
        g = _load(g_ptr, offs, offs < end, False)
        acc += g * g
    if full < length:
        offs = start + full + tl.arange(0, BLOCK)
        g = _load(g_ptr, offs, offs < end, True)
        acc += g * g
    tl.store(partials + tl.program_id(0), tl.sum(acc, axis=0))


def row_pointers(rows: list[list[torch.Tensor]]) -> list[tuple[int, ...]]:
    """Each row's base addresses: one walk over the tensors, which the optimizer's step makes once and hands to
    :meth:`TensorTable.moved_rows`, :func:`layout_problem` and :meth:`TensorTable.point_to`."""
    return [tuple(t.data_ptr() for t in row) for row in rows]


def layout_problem(rows: list[list[torch.Tensor]], dtypes: tuple[torch.dtype, ...],
                   pointers: list[tuple[int, ...]] | None = None) -> str | None:
    """Why these tensors cannot go through the kernels, or None when they can.

    The kernels index each tensor as one dense run of elements of its row's dtype (``dtypes``) from a
    16-byte aligned base, so they need contiguous tensors: torch's default for parameters, grads and the
    states the optimizer creates, which its allocator aligns far beyond 16 bytes. ``pointers``: the rows'
    :func:`row_pointers`, when the caller has them.
    """
    for i, (row, dtype) in enumerate(zip(rows, dtypes)):
        for j, t in enumerate(row):
            if t.dtype != dtype:
                return f"a grad or state is {t.dtype} where {dtype} was expected"
            if t.is_sparse or not t.is_contiguous():
                return "a parameter, grad or state is sparse or not contiguous"
            if (pointers[i][j] if pointers is not None else t.data_ptr()) % _ALIGNMENT:
                return f"a parameter, grad or state does not start on a {_ALIGNMENT}-byte boundary"
    return None


class TensorTable:
    """Device-side tables that let one launch walk many tensors.

    ``rows`` are lists of tensors of the same sizes (parameters, grads, exp_avg, exp_avg_sq): their base
    addresses go into one int64 table, and every tensor is cut into ``chunk``-element chunks, each of which
    is one program. The table stays valid while the tensors keep their addresses; an optimizer builds it once
    and each step compares the rows' addresses with it (:meth:`moved_rows`), re-pointing it where only some
    moved (grads set to None and created again each step).
    """

    def __init__(self, rows: list[list[torch.Tensor]], chunk: int = CHUNK,
                 pointers: list[tuple[int, ...]] | None = None) -> None:
        first = rows[0]
        self.device = first[0].device
        self.chunk = chunk
        self.n_tensors = len(first)
        self.n_rows = len(rows)
        self.numel_key = tuple(t.numel() for t in first)
        numels = torch.tensor(self.numel_key, dtype=torch.int64)
        counts = (numels + chunk - 1) // chunk
        self.n_chunks = int(counts.sum())
        chunk_first = torch.cumsum(counts, 0) - counts
        chunk_tensor = torch.repeat_interleave(torch.arange(self.n_tensors), counts)
        chunk_index = torch.arange(self.n_chunks) - chunk_first[chunk_tensor]
        self.numels = self._to_device(numels, torch.int64)
        self.chunk_tensor = self._to_device(chunk_tensor, torch.int32)
        self.chunk_index = self._to_device(chunk_index, torch.int32)
        self.chunk_first = self._to_device(chunk_first, torch.int32)
        self.chunk_count = self._to_device(counts, torch.int32)
        self.addresses = torch.empty(self.n_rows * self.n_tensors, dtype=torch.int64, device=self.device)
        self.pointers: list[tuple[int, ...]] = []
        self.point_to(pointers if pointers is not None else row_pointers(rows))
        # Scratch reused every step: two sums per chunk, one ratio per tensor.
        self.partials = torch.empty(2 * max(self.n_chunks, 1), dtype=torch.float32, device=self.device)
        self.ratios = torch.empty(self.n_tensors, dtype=torch.float32, device=self.device)

    def _to_device(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A host tensor on the table's device without making the host wait for the device: from pinned memory,
        asynchronously (torch's pinned allocator keeps the source until the copy has run). A copy from pageable
        memory would wait for everything queued before it, e.g. the backward whose grads the table points to."""
        x = x.to(dtype=dtype)
        if self.device.type != "cuda":
            return x.to(self.device)
        return x.pin_memory().to(self.device, non_blocking=True)

    def point_to(self, pointers: list[tuple[int, ...]]) -> None:
        """Point the table at tensors with these base addresses (:func:`row_pointers` of rows of the sizes it was
        built for, see :meth:`fits`): only the addresses are copied, queued behind the work already issued, so
        no kernel still reading the old ones sees the new ones."""
        addresses = torch.tensor([a for row in pointers for a in row], dtype=torch.int64)
        self.addresses.copy_(self._to_device(addresses, torch.int64))
        self.pointers = pointers

    def moved_rows(self, pointers: list[tuple[int, ...]]) -> list[int]:
        """The rows whose tensors are not those the table points to (all of them when the shape differs)."""
        if len(pointers) != self.n_rows:
            return list(range(len(pointers)))
        return [i for i, (now, then) in enumerate(zip(pointers, self.pointers)) if now != then]

    def fits(self, rows: list[list[torch.Tensor]]) -> bool:
        """Whether these tensors have the layout the table was built for (same rows, counts and sizes), so that
        :meth:`point_to` can take them."""
        return (len(rows) == self.n_rows and len(rows[0]) == self.n_tensors
                and tuple(t.numel() for t in rows[0]) == self.numel_key)


def _launch_context(device: torch.device):
    # Triton launches on the current CUDA device; parameters may live on another one.
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def grad_norm(table: TensorTable, dtype: torch.dtype) -> torch.Tensor:
    """‖g‖ over table row 0 as a one-element fp32 tensor on the device, with no host sync."""
    if table.n_chunks == 0:
        return torch.zeros(1, dtype=torch.float32, device=table.device)
    partials = table.partials[: table.n_chunks]
    with _launch_context(table.device):
        _sum_squares_kernel[(table.n_chunks,)](
            table.addresses, table.numels, table.chunk_tensor, table.chunk_index, partials,
            G_DTYPE=_TL_DTYPES[dtype], CHUNK=table.chunk, BLOCK=BLOCK, num_warps=NUM_WARPS,
        )
    return partials.sum(dtype=torch.float64).sqrt().float().reshape(1)


def lamb_update(
    table: TensorTable,
    dtypes: tuple[torch.dtype, ...],
    clip_divisor: torch.Tensor | None,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    beta3: float,
    eps: float,
    weight_decay: float,
    bias_correction1: float,
    bias_correction2: float,
    adapt: bool,
) -> None:
    """One LAMB step over a table whose rows are (params, grads, exp_avg, exp_avg_sq), in place, and a fifth
    row of compute copies (the bf16 weights a model computes with, of fp32 masters) given the new parameters.

    ``dtypes`` are the rows' dtypes (params, grads, then the copies' where there are copies); ``clip_divisor``
    is a one-element fp32 tensor on the device (grads are divided by it) or None; ``adapt`` says whether the
    trust ratio applies (weight_decay != 0 or nvlamb), else p -= lr·u.
    """
    if table.n_chunks == 0:
        return
    grid = (table.n_chunks,)
    scalars = {
        "beta1": beta1, "beta2": beta2, "beta3": beta3, "one_minus_beta2": 1.0 - beta2,
        "bias_correction1": bias_correction1, "bias_correction2": bias_correction2, "eps": eps,
        "weight_decay": weight_decay, "lr": lr,
    }
    update_scalars = {k: scalars[k] for k in ("bias_correction1", "bias_correction2", "eps", "weight_decay")}
    has_copy = len(dtypes) > 2
    flags = {"P_DTYPE": _TL_DTYPES[dtypes[0]], "G_DTYPE": _TL_DTYPES[dtypes[1]],
             "C_DTYPE": _TL_DTYPES[dtypes[2] if has_copy else dtypes[0]], "HAS_COPY": has_copy,
             "DECAY": weight_decay != 0.0, "CHUNK": table.chunk, "BLOCK": BLOCK}
    clip = clip_divisor if clip_divisor is not None else table.ratios  # any fp32 tensor: never read then
    with _launch_context(table.device):
        _moments_kernel[grid](
            table.addresses, table.numels, table.chunk_tensor, table.chunk_index, table.partials, clip,
            table.n_tensors, table.n_chunks, **scalars, HAS_CLIP=clip_divisor is not None, APPLY=not adapt,
            **flags, num_warps=NUM_WARPS,
        )
        if not adapt:
            return
        _ratio_kernel[(table.n_tensors,)](
            table.partials, table.chunk_first, table.chunk_count, table.ratios, table.n_chunks, lr,
            BLOCK=_RATIO_BLOCK, num_warps=4,
        )
        _apply_kernel[grid](
            table.addresses, table.numels, table.chunk_tensor, table.chunk_index, table.ratios,
            table.n_tensors, **update_scalars, **flags, num_warps=NUM_WARPS,
        )
