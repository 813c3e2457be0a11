"""Attention over short sequences in Triton against torch's fused attention: an experiment, not used by rannc.

At BERT's phase-1 shapes (128 tokens, heads of 64) one head's whole score matrix is one 128 x 128 tile, so no
online softmax is needed. torch's fused kernels (cuDNN's, which `F.scaled_dot_product_attention` picks there)
took BERT-large's attention at batch 256 16-18 ms a step on one H200 (forward and backward of 24 layers, dropout
0.1), about three times what its bytes take. The kernels here tie with cuDNN's without dropout and lose with it
(docs/benchmarks.md, session 11), so `F.scaled_dot_product_attention` stays.

Three kernels: the forward writes the output and each row's log-sum-exp; the backward's first kernel computes
dQ per block of queries (and each row's dO·O, which the softmax's gradient needs), its second dK and dV per
block of keys. Dropout's mask is never stored: each kernel draws it again from Philox with the same seed and
counters, so the forward and both backward kernels drop the same weights. The seed is drawn from torch's
default generator of the device when the forward runs, so a recomputation that restores the generator's state
would draw the same masks. Outputs and input gradients are laid out as [batch, sequence, heads, head size] in
memory (viewed as [batch, heads, sequence, head size]), the layout of a projection split into heads. Scores,
softmax and accumulation are fp32; fp32 inputs take IEEE products (no TF32). Under Triton's interpreter
(``TRITON_INTERPRET=1``) the kernels run on CPU tensors (fp32 and fp16; its bf16 products are wrong).

The comparison: one layer's forward, and forward and backward, with dropout and a key-padding mask, against
`F.scaled_dot_product_attention` with its own choice of kernel and with cuDNN's, flash's and the
memory-efficient kernels forced. Queries, keys and values are views into one fused projection's output and the
result is merged back into [batch, sequence, hidden], so that the copies each layout costs are timed too. Times
are medians of CUDA graph replays (Triton's launcher alone takes tens of microseconds a kernel, more than a
forward's device time here). Before timing, each contender's output and gradients (dropout off) are compared
with fp32 math, and the Triton dropout is checked: the fraction of kept weights, and gradients against the math
with the kernels' own mask (read through identity values).

    python benchmarks/short_attention.py --batch 256 --heads 16 --seq 128 --head_size 64
    python benchmarks/short_attention.py --batch 256 --dropout 0
    python benchmarks/short_attention.py --sweep     # block sizes and warps of the Triton kernels
"""

from __future__ import annotations

import argparse
import itertools
import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench_cudagraph

# Query rows per program: the forward's and dQ's blocks of queries, dK/dV's blocks of keys.
BLOCK_M = 64
BLOCK_N = 64
NUM_WARPS = 4


@triton.jit
def _kept(seed, head, rows, col_start, threshold, KEYS: tl.constexpr, COLS: tl.constexpr):
    """Whether dropout keeps each weight of this head's rows and its keys col_start .. col_start + COLS. One
    Philox call gives four 32-bit numbers, each two 16-bit draws: the eight keys of a row's aligned group of
    eight share a call, counted by the row, the group and the head. A weight is dropped where its draw is below
    `threshold` = round(p · 2¹⁶), so the rate is p rounded to a multiple of 2⁻¹⁶."""
    GROUPS: tl.constexpr = COLS // 8
    groups = col_start // 8 + tl.arange(0, GROUPS)
    counter = (rows[:, None] * (KEYS // 8) + groups[None, :]).to(tl.uint32)
    zero = tl.zeros_like(counter)
    r0, r1, r2, r3 = tl.philox(seed, counter, zero + head.to(tl.uint32), zero, zero)
    draws = tl.join(tl.join(tl.join(r0 & 0xFFFF, r0 >> 16), tl.join(r1 & 0xFFFF, r1 >> 16)),
                    tl.join(tl.join(r2 & 0xFFFF, r2 >> 16), tl.join(r3 & 0xFFFF, r3 >> 16)))
    return draws.reshape(rows.shape[0], COLS) >= threshold


@triton.jit
def _load_tile(ptr, b, h, s_b, s_h, s_s, rows, d, inside):
    """Rows `rows` of head h of batch element b (zeros outside)."""
    return tl.load(ptr + b * s_b + h * s_h + rows[:, None] * s_s + d[None, :], mask=inside[:, None], other=0.0)


@triton.jit
def _store_tile(ptr, value, b, h, s_b, s_h, s_s, rows, d, inside):
    tl.store(ptr + b * s_b + h * s_h + rows[:, None] * s_s + d[None, :], value.to(ptr.dtype.element_ty),
             mask=inside[:, None])


@triton.jit
def _scores(q, k, bias, cols, keys, scale, PRECISION: tl.constexpr):
    """q kᵀ · scale plus the key bias, -inf past the sequence's end."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale + bias[None, :]
    return tl.where(cols[None, :] < keys, s, float("-inf"))


@triton.jit
def _forward_kernel(Q, K, V, BIAS, OUT, LSE, seed_ptr,
                    sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, so_b, so_h, so_s, sbias_b,
                    heads, keys, scale, p_drop, threshold,
                    BLOCK: tl.constexpr, KEYS: tl.constexpr, D: tl.constexpr, DROPOUT: tl.constexpr,
                    PRECISION: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // heads
    h = bh % heads
    rows = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, KEYS)
    d = tl.arange(0, D)
    row_in = rows < keys
    col_in = cols < keys
    q = _load_tile(Q, b, h, sq_b, sq_h, sq_s, rows, d, row_in)
    k = _load_tile(K, b, h, sk_b, sk_h, sk_s, cols, d, col_in)
    v = _load_tile(V, b, h, sv_b, sv_h, sv_s, cols, d, col_in)
    bias = tl.load(BIAS + b * sbias_b + cols, mask=col_in, other=0.0)
    s = _scores(q, k, bias, cols, keys, scale, PRECISION)
    row_max = tl.max(s, 1)
    # A row whose keys are all masked gets no weights at all: output 0, and no gradient in backward.
    row_max = tl.where(row_max == float("-inf"), 0.0, row_max)
    p = tl.exp(s - row_max[:, None])
    total = tl.sum(p, 1)
    total = tl.where(total == 0.0, 1.0, total)
    p = p / total[:, None]
    if DROPOUT:
        kept = _kept(tl.load(seed_ptr), bh, rows, 0, threshold, KEYS, KEYS)
        p = tl.where(kept, p / (1.0 - p_drop), 0.0)
    o = tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    _store_tile(OUT, o, b, h, so_b, so_h, so_s, rows, d, row_in)
    tl.store(LSE + bh * keys + rows, row_max + tl.log(total), mask=row_in)


@triton.jit
def _recompute(q, k, v, do, bias, lse, seed_ptr, bh, rows, col_start, cols, keys, scale, p_drop, threshold,
               KEYS: tl.constexpr, COLS: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr):
    """The backward's weights P (softmax), P after dropout, and dP = dO Vᵀ back through dropout's mask."""
    p = tl.exp(_scores(q, k, bias, cols, keys, scale, PRECISION) - lse[:, None])
    p = tl.where((rows < keys)[:, None], p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    if DROPOUT:
        kept = _kept(tl.load(seed_ptr), bh, rows, col_start, threshold, KEYS, COLS)
        return p, tl.where(kept, p / (1.0 - p_drop), 0.0), tl.where(kept, dp / (1.0 - p_drop), 0.0)
    return p, p, dp


@triton.jit
def _backward_dq_kernel(Q, K, V, OUT, DO, BIAS, LSE, DELTA, DQ, seed_ptr,
                        sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, so_b, so_h, so_s,
                        sdo_b, sdo_h, sdo_s, sdq_b, sdq_h, sdq_s, sbias_b,
                        heads, keys, scale, p_drop, threshold,
                        BLOCK: tl.constexpr, KEYS: tl.constexpr, D: tl.constexpr, DROPOUT: tl.constexpr,
                        PRECISION: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // heads
    h = bh % heads
    rows = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, KEYS)
    d = tl.arange(0, D)
    row_in = rows < keys
    col_in = cols < keys
    q = _load_tile(Q, b, h, sq_b, sq_h, sq_s, rows, d, row_in)
    do = _load_tile(DO, b, h, sdo_b, sdo_h, sdo_s, rows, d, row_in)
    o = _load_tile(OUT, b, h, so_b, so_h, so_s, rows, d, row_in)
    k = _load_tile(K, b, h, sk_b, sk_h, sk_s, cols, d, col_in)
    v = _load_tile(V, b, h, sv_b, sv_h, sv_s, cols, d, col_in)
    bias = tl.load(BIAS + b * sbias_b + cols, mask=col_in, other=0.0)
    lse = tl.load(LSE + bh * keys + rows, mask=row_in, other=0.0)
    # Σ_j P_ij dP_ij of the softmax's gradient equals the row's dO·O, with or without dropout.
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(DELTA + bh * keys + rows, delta, mask=row_in)
    p, _, dp = _recompute(q, k, v, do, bias, lse, seed_ptr, bh, rows, 0, cols, keys, scale, p_drop, threshold,
                          KEYS, KEYS, DROPOUT, PRECISION)
    ds = p * (dp - delta[:, None])
    dq = tl.dot(ds.to(k.dtype), k, input_precision=PRECISION) * scale
    _store_tile(DQ, dq, b, h, sdq_b, sdq_h, sdq_s, rows, d, row_in)


@triton.jit
def _backward_dkdv_kernel(Q, K, V, DO, BIAS, LSE, DELTA, DK, DV, seed_ptr,
                          sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, sdo_b, sdo_h, sdo_s,
                          sdk_b, sdk_h, sdk_s, sdv_b, sdv_h, sdv_s, sbias_b,
                          heads, keys, scale, p_drop, threshold,
                          BLOCK: tl.constexpr, QUERIES: tl.constexpr, D: tl.constexpr, DROPOUT: tl.constexpr,
                          PRECISION: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // heads
    h = bh % heads
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    rows = tl.arange(0, QUERIES)
    d = tl.arange(0, D)
    row_in = rows < keys
    col_in = cols < keys
    q = _load_tile(Q, b, h, sq_b, sq_h, sq_s, rows, d, row_in)
    do = _load_tile(DO, b, h, sdo_b, sdo_h, sdo_s, rows, d, row_in)
    k = _load_tile(K, b, h, sk_b, sk_h, sk_s, cols, d, col_in)
    v = _load_tile(V, b, h, sv_b, sv_h, sv_s, cols, d, col_in)
    bias = tl.load(BIAS + b * sbias_b + cols, mask=col_in, other=0.0)
    lse = tl.load(LSE + bh * keys + rows, mask=row_in, other=0.0)
    delta = tl.load(DELTA + bh * keys + rows, mask=row_in, other=0.0)
    p, p_dropped, dp = _recompute(q, k, v, do, bias, lse, seed_ptr, bh, rows, tl.program_id(1) * BLOCK, cols, keys,
                                  scale, p_drop, threshold, QUERIES, BLOCK, DROPOUT, PRECISION)
    dv = tl.dot(tl.trans(p_dropped.to(do.dtype)), do, input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    dk = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION) * scale
    _store_tile(DK, dk, b, h, sdk_b, sdk_h, sdk_s, cols, d, col_in)
    _store_tile(DV, dv, b, h, sdv_b, sdv_h, sdv_s, cols, d, col_in)


def key_bias(mask: torch.Tensor | None, batch: int, seq_len: int, device: torch.device) -> torch.Tensor:
    """The mask as an fp32 bias per key, [B or 1, S]: a boolean mask's False is -inf (SDPA's convention)."""
    if mask is None:
        return torch.zeros(1, seq_len, device=device, dtype=torch.float32)
    flat = mask.reshape(mask.shape[0], seq_len)
    if flat.dtype == torch.bool:
        return torch.zeros(flat.shape, device=device, dtype=torch.float32).masked_fill_(~flat, float("-inf"))
    return flat.to(torch.float32)


def _split_heads_like(x: torch.Tensor) -> torch.Tensor:
    """An empty [B, H, S, D] tensor laid out as [B, S, H, D] in memory."""
    batch, heads, seq_len, head_size = x.shape
    return x.new_empty(batch, seq_len, heads, head_size).transpose(1, 2)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _threshold(dropout_p: float) -> int:
    return round(dropout_p * 65536)


def _keys_block(seq_len: int) -> int:
    return max(16, triton.next_power_of_2(seq_len))


@torch.library.custom_op("benchmarks::short_attention", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def _forward_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor, dropout_p: float,
                scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, heads, seq_len, head_size = query.shape
    out = _split_heads_like(query)
    lse = torch.empty(batch * heads, seq_len, device=query.device, dtype=torch.float32)
    # Drawn from the device's default generator: a recomputation that restores its state draws the same seed.
    seed = (torch.randint(0, 2**62, (1,), device=query.device, dtype=torch.int64) if dropout_p > 0
            else torch.zeros(1, device=query.device, dtype=torch.int64))
    keys_block = _keys_block(seq_len)
    block = min(BLOCK_M, keys_block)
    _forward_kernel[(batch * heads, triton.cdiv(seq_len, block))](
        query, key, value, bias, out, lse, seed,
        query.stride(0), query.stride(1), query.stride(2), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2), out.stride(0), out.stride(1), out.stride(2),
        bias.stride(0) if bias.shape[0] > 1 else 0,
        heads, seq_len, scale, dropout_p, _threshold(dropout_p),
        BLOCK=block, KEYS=keys_block, D=head_size, DROPOUT=dropout_p > 0, PRECISION=_precision(query.dtype),
        num_warps=NUM_WARPS)
    return out, lse, seed


@_forward_op.register_fake
def _(query, key, value, bias, dropout_p, scale):
    batch, heads, seq_len, _ = query.shape
    return (_split_heads_like(query), query.new_empty(batch * heads, seq_len, dtype=torch.float32),
            query.new_empty(1, dtype=torch.int64))


@torch.library.custom_op("benchmarks::short_attention_backward", mutates_args=())
def _backward_op(grad_out: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 out: torch.Tensor, bias: torch.Tensor, lse: torch.Tensor, seed: torch.Tensor, dropout_p: float,
                 scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, heads, seq_len, head_size = query.shape
    grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
    dq, dk, dv = _split_heads_like(query), _split_heads_like(key), _split_heads_like(value)
    delta = torch.empty_like(lse)
    keys_block = _keys_block(seq_len)
    block = min(BLOCK_M, keys_block)
    common = dict(D=head_size, DROPOUT=dropout_p > 0, PRECISION=_precision(query.dtype), num_warps=NUM_WARPS)
    bias_stride = bias.stride(0) if bias.shape[0] > 1 else 0
    _backward_dq_kernel[(batch * heads, triton.cdiv(seq_len, block))](
        query, key, value, out, grad_out, bias, lse, delta, dq, seed,
        query.stride(0), query.stride(1), query.stride(2), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2), out.stride(0), out.stride(1), out.stride(2),
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2), dq.stride(0), dq.stride(1), dq.stride(2),
        bias_stride, heads, seq_len, scale, dropout_p, _threshold(dropout_p), BLOCK=block, KEYS=keys_block, **common)
    key_block = min(BLOCK_N, keys_block)
    _backward_dkdv_kernel[(batch * heads, triton.cdiv(seq_len, key_block))](
        query, key, value, grad_out, bias, lse, delta, dk, dv, seed,
        query.stride(0), query.stride(1), query.stride(2), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2), grad_out.stride(0), grad_out.stride(1),
        grad_out.stride(2), dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        bias_stride, heads, seq_len, scale, dropout_p, _threshold(dropout_p), BLOCK=key_block, QUERIES=keys_block,
        **common)
    return dq, dk, dv


@_backward_op.register_fake
def _(grad_out, query, key, value, out, bias, lse, seed, dropout_p, scale):
    return _split_heads_like(query), _split_heads_like(key), _split_heads_like(value)


def _setup_context(ctx, inputs, output):
    query, key, value, bias, dropout_p, scale = inputs
    out, lse, seed = output
    ctx.save_for_backward(query, key, value, out, bias, lse, seed)
    ctx.dropout_p, ctx.scale = dropout_p, scale


def _backward(ctx, grad_out, _grad_lse, _grad_seed):
    query, key, value, out, bias, lse, seed = ctx.saved_tensors
    dq, dk, dv = _backward_op(grad_out, query, key, value, out, bias, lse, seed, ctx.dropout_p, ctx.scale)
    return dq, dk, dv, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None = None,
              dropout_p: float = 0.0, scale: float | None = None) -> torch.Tensor:
    """`F.scaled_dot_product_attention(query, key, value, mask, dropout_p, scale=scale)` for [B, H, S, D]
    inputs of one float dtype with S at most 128, D a power of two from 16 to 128, the last dimension contiguous,
    and a key-padding mask ([B or 1, 1, 1, S], boolean or additive) or none. The result is laid out as
    [B, S, H, D]."""
    batch, _, seq_len, head_size = query.shape
    bias = key_bias(mask, batch, seq_len, query.device)
    scale = 1.0 / math.sqrt(head_size) if scale is None else scale
    out, _, _ = _forward_op(query, key, value, bias, float(dropout_p), float(scale))
    return out


BACKENDS = {"sdpa": None, "cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def inputs(batch: int, heads: int, seq: int, head_size: int, dtype: torch.dtype):
    hidden = heads * head_size
    fused = torch.randn(batch, seq, 3 * hidden, device="cuda", dtype=dtype, requires_grad=True)
    lengths = torch.randint(seq // 2, seq + 1, (batch,), device="cuda")
    mask = (torch.arange(seq, device="cuda")[None, :] < lengths[:, None])[:, None, None, :]
    return fused, mask


def split(fused: torch.Tensor, heads: int):
    batch, seq, width = fused.shape
    return [t.view(batch, seq, heads, width // 3 // heads).transpose(1, 2) for t in fused.split(width // 3, -1)]


def run(name: str, fused, mask, heads: int, dropout_p: float):
    q, k, v = split(fused, heads)
    if name == "triton":
        out = attention(q, k, v, mask, dropout_p)
    elif BACKENDS[name] is None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    else:
        with sdpa_kernel(BACKENDS[name]):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    return out.transpose(1, 2).reshape(fused.shape[0], fused.shape[1], -1)


def reference(q, k, v, mask, kept=None, dropout_p=0.0):
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1)
    if kept is not None:
        weights = weights * kept / (1 - dropout_p)
    return weights @ v.float()


def check(args, dtype) -> None:
    fused, mask = inputs(args.batch, args.heads, args.seq, args.head_size, dtype)
    q, k, v = split(fused, args.heads)
    grad = torch.randn(args.batch, args.seq, args.heads * args.head_size, device="cuda", dtype=dtype)
    expected = reference(q, k, v, mask).transpose(1, 2).reshape(grad.shape)
    (expected_grad,) = torch.autograd.grad(expected, fused, grad.float())
    scale = expected.abs().max().item(), expected_grad.abs().max().item()
    for name in ["triton", *BACKENDS]:
        try:
            out = run(name, fused, mask, args.heads, 0.0)
            (got_grad,) = torch.autograd.grad(out, fused, grad)
        except RuntimeError as error:
            print(f"  {name:9s} not run: {str(error).splitlines()[0][:100]}")
            continue
        print(f"  {name:9s} max error against fp32 math, relative to the largest value: output "
              f"{(out.float() - expected).abs().max().item() / scale[0]:.2e}, gradient "
              f"{(got_grad.float() - expected_grad).abs().max().item() / scale[1]:.2e}")
    # the Triton dropout: the weights themselves through identity values (head size = sequence length)
    p = args.dropout
    seq = args.head_size
    qd, kd = (torch.randn(args.batch, args.heads, seq, args.head_size, device="cuda", dtype=dtype) for _ in range(2))
    eye = torch.eye(seq, device="cuda", dtype=dtype).expand(args.batch, args.heads, seq, seq).contiguous()
    md = mask[..., :seq]
    torch.manual_seed(7)
    weights = attention(qd, kd, eye, md, p)
    attended = md.expand_as(weights)
    kept = (weights != 0) & attended
    print(f"  triton dropout {p}: kept {kept.sum().item() / attended.sum().item():.4f} of the attended weights")
    qd, kd, vd = (t.requires_grad_() for t in (qd, kd, torch.randn_like(qd)))
    torch.manual_seed(7)
    out = attention(qd, kd, vd, md, p)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (qd, kd, vd), g)
    ref = reference(qd, kd, vd, md, kept.float(), p)
    want = torch.autograd.grad(ref, (qd, kd, vd), g.float())
    print("  triton with dropout against math with its mask: output "
          f"{(out.float() - ref).abs().max().item() / ref.abs().max().item():.2e}, gradients "
          + ", ".join(f"{(a.float() - b).abs().max().item() / b.abs().max().item():.2e}" for a, b in zip(got, want)))


def time_ms(name, fused, mask, heads, dropout_p) -> tuple[float, float]:
    grad = torch.randn(fused.shape[0], fused.shape[1], fused.shape[2] // 3, device="cuda", dtype=fused.dtype)

    def step():
        out = run(name, fused, mask, heads, dropout_p)
        torch.autograd.grad(out, fused, grad)

    def forward():
        with torch.no_grad():
            run(name, fused, mask, heads, dropout_p)

    return (do_bench_cudagraph(forward, rep=200, return_mode="median"),
            do_bench_cudagraph(step, rep=200, return_mode="median"))


def main() -> None:
    global BLOCK_M, BLOCK_N, NUM_WARPS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--head_size", type=int, default=64)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--layers", type=int, default=24, help="layers per step, for the per-step column")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--sweep", action="store_true", help="time the Triton kernels at other blocks and warps")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    print(f"batch {args.batch}, {args.heads} heads of {args.head_size}, sequence {args.seq}, dropout {args.dropout}, "
          f"{args.dtype}, {torch.cuda.get_device_name()}, torch {torch.__version__}")
    check(args, dtype)
    fused, mask = inputs(args.batch, args.heads, args.seq, args.head_size, dtype)
    print(f"| contender | forward ms | forward + backward ms | x {args.layers} layers ms |")
    print("| --- | ---: | ---: | ---: |")
    for name in ["triton", *BACKENDS]:
        try:
            forward, step = time_ms(name, fused, mask, args.heads, args.dropout)
        except RuntimeError as error:
            print(f"| {name} | not run: {str(error).splitlines()[0][:80]} | | |")
            continue
        print(f"| {name} | {forward:.4f} | {step:.4f} | {step * args.layers:.2f} |")
    if args.sweep:
        defaults = BLOCK_M, BLOCK_N, NUM_WARPS
        for block_m, block_n, warps in itertools.product((32, 64, 128), (32, 64, 128), (4, 8)):
            BLOCK_M, BLOCK_N, NUM_WARPS = block_m, block_n, warps
            try:
                forward, step = time_ms("triton", fused, mask, args.heads, args.dropout)
            except Exception as error:  # noqa: BLE001 - a configuration the compiler refuses (registers, memory)
                print(f"  block_m {block_m} block_n {block_n} warps {warps}: {type(error).__name__}")
                continue
            print(f"  block_m {block_m:3d} block_n {block_n:3d} warps {warps}: forward {forward:.4f} ms, "
                  f"forward + backward {step:.4f} ms")
        BLOCK_M, BLOCK_N, NUM_WARPS = defaults


if __name__ == "__main__":
    main()
