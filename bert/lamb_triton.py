"""A fused multi-tensor LAMB step in Triton, for :class:`bert.optim.Lamb` on CUDA.

LAMB is memory-bound: per fp32 parameter a step must read p, g, m, v and write p, m, v (28 bytes). torch's
foreach ops spend several full passes and full-size temporaries on it. Here one launch walks all tensors
of a bucket through a table of base addresses, split into fixed-size chunks (rannc.kernels.multi_tensor, as
apex's multi_tensor_apply does), and the step takes three launches:

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

import torch
import triton
import triton.language as tl

from rannc.kernels.multi_tensor import (
    CHUNK,
    INTERPRETED,
    SUPPORTED_DTYPES,
    TL_DTYPES,
    TableCache,
    TensorTable,
    chunk_span,
    grad_norm,
    launch_context,
    layout_problem,
    load_fp32,
    row_pointers,
    store_as,
    support_problem,
    table_ptr,
)

__all__ = ["CHUNK", "INTERPRETED", "SUPPORTED_DTYPES", "TableCache", "TensorTable", "grad_norm", "lamb_update",
           "layout_problem", "row_pointers", "support_problem"]

# The LAMB kernels' block and warps (the table's chunk is rannc.kernels.multi_tensor.CHUNK). Read at each launch,
# so that a benchmark can try other values.
BLOCK = 2048
NUM_WARPS = 8
_RATIO_BLOCK = 1024


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
    g = load_fp32(g_ptr, offs, mask, MASKED)
    m = load_fp32(m_ptr, offs, mask, MASKED)
    v = load_fp32(v_ptr, offs, mask, MASKED)
    p = load_fp32(p_ptr, offs, mask, MASKED)
    if HAS_CLIP:
        g = tl.div_rn(g, clip)
    m = m * beta1 + beta3 * g
    v = v * beta2 + one_minus_beta2 * g * g
    store_as(m_ptr, offs, m, mask, MASKED)
    store_as(v_ptr, offs, v, mask, MASKED)
    u = _adam_update(m, v, p, bias_correction1, bias_correction2, eps, weight_decay, DECAY)
    if APPLY:
        new_p = p - u * lr
        store_as(p_ptr, offs, new_p, mask, MASKED)
        if HAS_COPY:
            store_as(c_ptr, offs, new_p, mask, MASKED)
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
    tensor, start, length, full = chunk_span(numels, chunk_tensor, chunk_index, CHUNK, BLOCK)
    p_ptr = table_ptr(table, tensor, P_DTYPE)
    g_ptr = table_ptr(table, n_tensors + tensor, G_DTYPE)
    m_ptr = table_ptr(table, 2 * n_tensors + tensor, tl.float32)
    v_ptr = table_ptr(table, 3 * n_tensors + tensor, tl.float32)
    c_ptr = p_ptr
    if HAS_COPY:
        c_ptr = table_ptr(table, 4 * n_tensors + tensor, C_DTYPE)
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
    m = load_fp32(m_ptr, offs, mask, MASKED)
    v = load_fp32(v_ptr, offs, mask, MASKED)
    p = load_fp32(p_ptr, offs, mask, MASKED)
    u = _adam_update(m, v, p, bias_correction1, bias_correction2, eps, weight_decay, DECAY)
    new_p = p - u * ratio
    store_as(p_ptr, offs, new_p, mask, MASKED)
    if HAS_COPY:
        store_as(c_ptr, offs, new_p, mask, MASKED)


@triton.jit
def _apply_kernel(
    table, numels, chunk_tensor, chunk_index, ratios, n_tensors,
    bias_correction1, bias_correction2, eps, weight_decay,
    P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, C_DTYPE: tl.constexpr, DECAY: tl.constexpr,
    HAS_COPY: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    """Pass 2 over one chunk: recompute u from the new m and v and write p - ratio·u (and its compute copy)."""
    tensor, start, length, full = chunk_span(numels, chunk_tensor, chunk_index, CHUNK, BLOCK)
    p_ptr = table_ptr(table, tensor, P_DTYPE)
    m_ptr = table_ptr(table, 2 * n_tensors + tensor, tl.float32)
    v_ptr = table_ptr(table, 3 * n_tensors + tensor, tl.float32)
    c_ptr = p_ptr
    if HAS_COPY:
        c_ptr = table_ptr(table, 4 * n_tensors + tensor, C_DTYPE)
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
    flags = {"P_DTYPE": TL_DTYPES[dtypes[0]], "G_DTYPE": TL_DTYPES[dtypes[1]],
             "C_DTYPE": TL_DTYPES[dtypes[2] if has_copy else dtypes[0]], "HAS_COPY": has_copy,
             "DECAY": weight_decay != 0.0, "CHUNK": table.chunk, "BLOCK": BLOCK}
    clip = clip_divisor if clip_divisor is not None else table.ratios  # any fp32 tensor: never read then
    with launch_context(table.device):
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
