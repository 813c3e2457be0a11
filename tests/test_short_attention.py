"""The short-sequence attention kernels of benchmarks/short_attention.py (an experiment rannc does not use) under
Triton's interpreter on the CPU: outputs and gradients against fp32 math, with padding masks and sequences that
are not powers of two, and with dropout, whose mask the forward and both backward kernels must draw alike."""

from __future__ import annotations

from interpreter import run_interpreted

INTERPRETER_CHECK = """
import math
import torch
from benchmarks.short_attention import attention


def math_attention(q, k, v, mask, kept=None, p=0.0):
    weights = torch.softmax((q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~mask, float("-inf")), -1)
    if kept is not None:
        weights = weights * kept / (1 - p)
    return weights @ v


torch.manual_seed(0)
worst = 0.0
for seq, head_size, batch, heads, dtype, p in [(64, 64, 2, 3, torch.float32, 0.3), (50, 32, 2, 2, torch.float32, 0.0),
                                               (9, 16, 3, 1, torch.float32, 0.0), (32, 32, 2, 2, torch.float16, 0.5)]:
    q, k, v = (torch.randn(batch, seq, heads, head_size).to(dtype).transpose(1, 2).requires_grad_() for _ in range(3))
    lengths = torch.randint(1, seq + 1, (batch,))
    mask = (torch.arange(seq)[None, :] < lengths[:, None])[:, None, None, :]
    kept = None
    if p:
        # dropout's mask, read through identity values (head size = sequence length)
        eye = torch.eye(seq, dtype=dtype).expand(batch, heads, seq, seq).contiguous()
        torch.manual_seed(5)
        weights = attention(q.detach(), k.detach(), eye, mask, p)
        kept = (weights != 0).to(dtype)
        attended = mask.expand_as(weights)
        rate = 1 - kept[attended].mean().item()
        assert abs(rate - p) < 0.03, (rate, p)
        torch.manual_seed(5)
    out = attention(q, k, v, mask, p)
    assert out.transpose(1, 2).is_contiguous()
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    ref = math_attention(*(t.double() for t in (q, k, v)), mask, None if kept is None else kept.double(), p)
    want = torch.autograd.grad(ref, (q, k, v), grad.double())
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    for a, b in zip((out, *got), (ref, *want)):
        error = ((a.double() - b).abs().max() / b.abs().max()).item()
        worst = max(worst, error)
        assert error < tolerance, (seq, head_size, dtype, p, error)
print("short attention matches math", worst)
"""


def test_short_attention_kernels_match_math_under_the_interpreter():
    assert "short attention matches math" in run_interpreted(INTERPRETER_CHECK).stdout
