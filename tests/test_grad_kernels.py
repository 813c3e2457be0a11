"""rannc's gradient clipping through the multi-tensor kernels (rannc.kernels.multi_tensor) equals clipping
through torch's foreach ops: run on CPU tensors under Triton's interpreter, in a process of its own (the
interpreter is chosen when Triton is imported)."""

from __future__ import annotations

from interpreter import run_interpreted

INTERPRETER_CHECK = """
import logging, math
import torch
from rannc.kernels import multi_tensor
from rannc.runtime import grads as grad_ops

assert multi_tensor.INTERPRETED
logging.basicConfig(level=logging.INFO)


class Holder:
    # what clipping asks of a Placement: the parameters this rank owns (counted in the norm) and holds (scaled)
    def __init__(self, owned, local):
        self.owned, self.local = owned, local

    def owned_parameters(self):
        return self.owned

    def local_parameters(self):
        return self.local


# one tensor over a chunk (65536), odd sizes (masked blocks), a bf16 group, a parameter without a grad
shapes = [(70001,), (5,), (3, 7), (2048,), (33,)]
params = [torch.nn.Parameter(torch.zeros(s, dtype=torch.bfloat16 if i == 4 else torch.float32))
          for i, s in enumerate(shapes)]
unused = torch.nn.Parameter(torch.zeros(3))
holder = Holder(params[1:] + [unused], params + [unused])   # params[0]: held here, owned by another rank
fused = grad_ops.FusedGrads()
for step, max_norm in enumerate((1e9, 1.0, 0.5)):
    gen = torch.Generator().manual_seed(step)
    for p in params:   # new grads each step, as after zero_grad(set_to_none=True): the tables re-point
        p.grad = (torch.randn(p.shape, generator=gen) * (step + 1)).to(p.dtype)
    expected = [p.grad.clone() for p in params]
    fused_total = grad_ops.clip_grad_norm(holder, torch.device("cpu"), max_norm, fused=fused)
    norms = torch._foreach_norm([g for g in expected[1:]], 2.0, dtype=torch.float32)
    total = torch.linalg.vector_norm(torch.stack(norms))
    coef = torch.clamp(max_norm / (fused_total + 1e-6), max=1.0)   # the scale checked apart from the norm
    for g in expected:
        g.mul_(coef.to(g.dtype))
    torch.testing.assert_close(fused_total, total, rtol=1e-6, atol=0)
    for p, g in zip(params, expected):
        # the interpreter truncates fp32 to bf16 where the GPU rounds: one bf16 ulp apart at most
        tolerance = dict(rtol=2 ** -7, atol=0) if p.dtype == torch.bfloat16 else dict(rtol=0, atol=0)
        torch.testing.assert_close(p.grad, g, **tolerance)
    # fp32: the norm's grads (owned) are not the scale's (held); bf16: the norm's table serves the scale too
    assert sorted(role for role, _, _ in fused._tables) == ["norm", "norm", "scale"], fused._tables.keys()

# norms other than 2 and grads the kernels cannot index take torch's foreach ops, with a line in the log
params[1].grad = torch.randn(5, 2)[:, 0]   # a strided view: not contiguous
inf = grad_ops.global_grad_norm(Holder(params, params), torch.device("cpu"), math.inf, fused)
assert inf == max(p.grad.abs().max().float() for p in params)
two = grad_ops.global_grad_norm(Holder(params[:2], params[:2]), torch.device("cpu"), 2.0, fused)
torch.testing.assert_close(two, torch.cat([p.grad for p in params[:2]]).norm())

# the factor is taken in the grads' dtype before it multiplies, as torch's multiplication of two fp16 tensors:
# 3 x fp16(1 + 2^-11 + 2^-13) rounds to 3 + 2 ulp, 3 x the fp32 factor to 3 + 1 ulp
halves = [torch.full((70001,), 3.0, dtype=torch.float16)]
expected_halves = [h.clone() for h in halves]
factor = torch.tensor(1 + 2 ** -11 + 2 ** -13)
grad_ops.FusedGrads().scale_(halves, factor)
torch._foreach_mul_(expected_halves, factor.to(torch.float16))
assert torch.equal(halves[0], expected_halves[0]) and halves[0][0].item() == 3.00390625, halves[0][0]

# a kernel Triton cannot build or launch: clipping goes on with the foreach ops, said once as a warning
def fail(*args, **kwargs):
    raise RuntimeError("no kernel for this device")


real, multi_tensor.grad_norm = multi_tensor.grad_norm, fail
broken = grad_ops.FusedGrads()
params[1].grad = torch.randn(5)
total = grad_ops.global_grad_norm(Holder(params, params), torch.device("cpu"), 2.0, broken)
multi_tensor.grad_norm = real
torch.testing.assert_close(total, torch.cat([p.grad.float().flatten() for p in params]).norm(), rtol=1e-6, atol=0)
assert broken._failed == "RuntimeError: no kernel for this device", broken._failed
print("fused clipping matches foreach")
"""


def test_fused_clipping_matches_foreach_under_triton_interpreter():
    """Norm (to 1e-6) and scale (exactly, fp32; fp16 with the factor rounded to fp16 first, as torch does) of
    the fused kernels against torch's foreach ops over three steps of new grads, with a grad held but not owned
    (scaled, not counted), a bf16 group, a parameter without a grad, and the foreach fallback for the inf norm, a
    non-contiguous grad (named in the log) and a kernel that fails (a warning, once)."""
    result = run_interpreted(INTERPRETER_CHECK)
    assert "fused clipping matches foreach" in result.stdout
    assert "gradient clipping takes torch's foreach ops: a parameter, grad or state is sparse or not contiguous" \
        in result.stderr
    assert result.stderr.count("the fused clipping kernels failed (RuntimeError: no kernel for this device)") == 1
