"""Tests for BERT's optimizer pieces: Lamb against a plain float64 reference of apex FusedLAMB's steps,
the poly warm-up schedule against NVIDIA's formula, and the dynamic loss scaler.
"""

from __future__ import annotations

import copy
import math
import threading

import pytest
import torch
from interpreter import run_interpreted
from torch import nn

import bert.optim
from bert.loss_scaling import DynamicLossScaler, unscale_
from bert.optim import Lamb, bert_param_groups
from bert.schedulers import PolyWarmUpScheduler

BETAS = (0.9, 0.999)
EPS = 1e-6


class TinyEncoder(nn.Module):
    """A few tensors of each kind bert_param_groups must sort: weights, biases, LayerNorms under odd names."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.dense = nn.Linear(8, 16)
        self.LayerNorm = nn.LayerNorm(16)
        self.layernorm = nn.LayerNorm(16)
        self.out_norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.out_norm(self.layernorm(self.LayerNorm(self.dense(self.embed(ids))))))


def make_model(dtype: torch.dtype) -> TinyEncoder:
    torch.manual_seed(0)
    model = TinyEncoder().to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # LayerNorm starts at exactly 1 / 0: move off it
    return model


def make_grads(params: list[torch.Tensor], steps: int, grad_scale: float) -> list[list[torch.Tensor | None]]:
    """Float64 grads for every step; one parameter gets no grad on step 2 to check that it is skipped."""
    gen = torch.Generator().manual_seed(1)
    grads = []
    for step in range(1, steps + 1):
        step_grads = [grad_scale * torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
        if step == 2:
            step_grads[1] = None
        grads.append(step_grads)
    return grads


def reference_lamb(groups, grads_per_step, lr, max_grad_norm):
    """apex FusedLAMB (adam_w_mode, bias correction, grad averaging, no nvlamb), one tensor at a time, float64.

    ``groups`` is a list of (params, weight_decay); ``grads_per_step[t]`` lists grads in the same flat order.
    Follows the reference's §5 steps: global clip, moments, bias correction, u = m̂/(√v̂+eps) + wd·p,
    trust ratio lr·‖p‖/‖u‖ (lr when a norm is zero, or for wd = 0), p -= ratio·u.
    """
    beta1, beta2 = BETAS
    params = [p.detach().clone().double() for group_params, _ in groups for p in group_params]
    decays = [wd for group_params, wd in groups for _ in group_params]
    exp_avg = [torch.zeros_like(p) for p in params]
    exp_avg_sq = [torch.zeros_like(p) for p in params]
    for t, grads in enumerate(grads_per_step, start=1):
        grad_norm = math.sqrt(sum(float((g * g).sum()) for g in grads if g is not None))
        clip = grad_norm / max_grad_norm if max_grad_norm and grad_norm > max_grad_norm else 1.0
        for i, (p, g, wd) in enumerate(zip(params, grads, decays)):
            if g is None:
                continue
            g = g / clip
            exp_avg[i] = beta1 * exp_avg[i] + (1 - beta1) * g
            exp_avg_sq[i] = beta2 * exp_avg_sq[i] + (1 - beta2) * g * g
            m_hat = exp_avg[i] / (1 - beta1**t)
            v_hat = exp_avg_sq[i] / (1 - beta2**t)
            update = m_hat / (v_hat.sqrt() + EPS) + wd * p
            ratio = lr
            if wd != 0:
                p_norm, u_norm = float(p.norm()), float(update.norm())
                if p_norm > 0 and u_norm > 0:
                    ratio = lr * p_norm / u_norm
            p -= ratio * update
    return params


def run_lamb(model, grads_per_step, lr, max_grad_norm, **kwargs):
    groups = bert_param_groups(model, weight_decay=0.01)
    optimizer = Lamb(groups, lr=lr, max_grad_norm=max_grad_norm, **kwargs)
    params = [p for group in groups for p in group["params"]]
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.to(p.dtype)
        optimizer.step()
    return optimizer, params


@pytest.mark.parametrize(
    "max_grad_norm, grad_scale",
    [(1.0, 10.0), (1.0, 1e-3), (0.0, 10.0), (None, 10.0)],
    ids=["clipping-triggers", "clipping-idle", "clipping-off-zero", "clipping-off-none"],
)
@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_lamb_matches_reference_loop(max_grad_norm, grad_scale, dtype, atol):
    model = make_model(torch.float64)
    groups = bert_param_groups(model, weight_decay=0.01)
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0]
    flat = [p for group in groups for p in group["params"]]
    grads = make_grads(flat, steps=6, grad_scale=grad_scale)
    total_norm = math.sqrt(sum(float((g * g).sum()) for g in grads[0]))
    assert (total_norm > 1.0) == (grad_scale > 1.0)  # the clipping cases really clip (or don't)

    expected = reference_lamb([(g["params"], g["weight_decay"]) for g in groups], grads, 0.02, max_grad_norm)
    lamb_model = copy.deepcopy(model).to(dtype)
    optimizer, params = run_lamb(lamb_model, grads, lr=0.02, max_grad_norm=max_grad_norm)

    assert all(group["step"] == 6 for group in optimizer.param_groups)
    for p, want in zip(params, expected):
        torch.testing.assert_close(p.double(), want, rtol=0, atol=atol)
    moved = sum(float((p.detach().double() - p0.detach()).abs().max()) for p, p0 in zip(params, flat))
    assert moved > 0.1  # the comparison is not vacuous


@pytest.mark.parametrize("grad_scale", [10.0, 1e-3], ids=["clipping-triggers", "clipping-idle"])
def test_lamb_split_over_two_holders_clips_by_the_norm_it_is_given(grad_scale):
    """The model's parameters split between two Lambs (two pipeline stages), each stepped with the whole
    model's grad norm: the single Lamb's steps (the float64 reference). Each clipping by its own part's norm
    does not give them."""
    model = make_model(torch.float64)
    groups = bert_param_groups(model, weight_decay=0.01)
    flat = [p for group in groups for p in group["params"]]
    grads = make_grads(flat, steps=4, grad_scale=grad_scale)
    expected = reference_lamb([(g["params"], g["weight_decay"]) for g in groups], grads, 0.02, 1.0)

    def split_run(pass_norm: bool) -> list[torch.Tensor]:
        params = [(p.detach().clone().requires_grad_(), group["weight_decay"]) for group in groups
                  for p in group["params"]]
        optimizers = []
        for half in (params[: len(params) // 2], params[len(params) // 2:]):
            by_decay: dict[float, list] = {}
            for p, decay in half:
                by_decay.setdefault(decay, []).append(p)
            optimizers.append(Lamb([{"params": ps, "weight_decay": wd} for wd, ps in by_decay.items()],
                                   lr=0.02, max_grad_norm=1.0))
        params = [p for p, _ in params]
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g
            norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in step_grads if g is not None]))
            for optimizer in optimizers:
                optimizer.step(grad_norm=norm if pass_norm else None)
        return params

    for p, want in zip(split_run(pass_norm=True), expected):
        torch.testing.assert_close(p.detach(), want, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="max_grad_norm=0"):
        Lamb(model.parameters(), lr=0.02, max_grad_norm=0).step(grad_norm=torch.tensor(2.0))
    local = split_run(pass_norm=False)
    worst = max(float((p.detach() - want).abs().max()) for p, want in zip(local, expected))
    assert (worst > 1e-6) == (grad_scale > 1.0)   # by its own part's norm: right only where nothing clips

def test_lamb_skips_params_without_grad_and_leaves_grads_alone():
    w = nn.Parameter(torch.ones(3))
    idle = nn.Parameter(torch.ones(2))
    optimizer = Lamb([w, idle], lr=0.1)
    w.grad = torch.full((3,), 5.0)
    optimizer.step()
    assert torch.equal(idle, torch.ones(2)) and idle not in optimizer.state
    assert torch.equal(w.grad, torch.full((3,), 5.0))  # clipping and the update do not write into grads


def test_trust_ratio_is_lr_for_zero_param_norm():
    # A zero weight with decay: ‖p‖ = 0, so the ratio falls back to lr and p = -lr·u, u = g/(|g|+eps) at t=1.
    p = nn.Parameter(torch.zeros(4, dtype=torch.float64))
    grad = torch.tensor([0.5, -0.25, 0.125, 0.0], dtype=torch.float64)
    p.grad = grad.clone()
    Lamb([p], lr=0.1, weight_decay=0.01, max_grad_norm=0).step()
    torch.testing.assert_close(p.detach(), -0.1 * grad / (grad.abs() + EPS), rtol=0, atol=1e-15)


def test_trust_ratio_is_lr_for_zero_update_norm():
    # nvlamb with zero grads and no decay: u = 0, the ratio must not become 0/0.
    p = nn.Parameter(torch.ones(3))
    p.grad = torch.zeros(3)
    Lamb([p], lr=0.1, weight_decay=0.0, use_nvlamb=True).step()
    assert torch.equal(p.detach(), torch.ones(3))


@pytest.mark.parametrize(
    "weight_decay, use_nvlamb, adapted", [(0.01, False, True), (0.0, True, True), (0.0, False, False)]
)
def test_trust_ratio_applies_per_tensor(weight_decay, use_nvlamb, adapted):
    # With the trust ratio every tensor moves by exactly lr·‖p‖; without it, by lr·‖u‖ (a plain Adam step).
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(5, dtype=torch.float64) * s) for s in (0.01, 1.0, 30.0)]
    for p in params:
        p.grad = torch.randn_like(p)
    before = [p.detach().clone() for p in params]
    Lamb(params, lr=0.1, weight_decay=weight_decay, use_nvlamb=use_nvlamb, max_grad_norm=0).step()
    for p, p0 in zip(params, before):
        moved = float((p.detach() - p0).norm())
        if adapted:
            assert moved == pytest.approx(0.1 * float(p0.norm()), rel=1e-12)
        else:
            update = p.grad / (p.grad.abs() + EPS)  # m̂/(√v̂+eps) at t = 1
            assert moved == pytest.approx(0.1 * float(update.norm()), rel=1e-12)


def test_lamb_state_dict_round_trip_continues_identically():
    model = make_model(torch.float32)
    groups = bert_param_groups(model)
    grads = make_grads([p for g in groups for p in g["params"]], steps=6, grad_scale=3.0)
    optimizer, params = run_lamb(model, grads[:3], lr=0.02, max_grad_norm=1.0)
    saved_optimizer = copy.deepcopy(optimizer.state_dict())
    resumed_model = copy.deepcopy(model)

    for step_grads in grads[3:]:
        for p, g in zip(params, step_grads):
            p.grad = None if g is None else g.float()
        optimizer.step()

    resumed_groups = bert_param_groups(resumed_model)
    resumed = Lamb(resumed_groups, lr=0.5, max_grad_norm=1.0)  # lr comes back from the state dict
    resumed.load_state_dict(saved_optimizer)
    assert [g["step"] for g in resumed.param_groups] == [3, 3]
    assert resumed.param_groups[0]["lr"] == 0.02
    resumed_params = [p for g in resumed_groups for p in g["params"]]
    for step_grads in grads[3:]:
        for p, g in zip(resumed_params, step_grads):
            p.grad = None if g is None else g.float()
        resumed.step()
    for p, q in zip(params, resumed_params):
        assert torch.equal(p, q)


def test_lamb_keeps_fp32_moments_for_bf16_params_across_load():
    model = make_model(torch.float32)
    ref_params = [p for g in bert_param_groups(model) for p in g["params"]]
    grads = make_grads(ref_params, steps=3, grad_scale=1.0)
    low = copy.deepcopy(model).to(torch.bfloat16)
    optimizer, low_params = run_lamb(low, grads, lr=0.02, max_grad_norm=1.0)
    _, fp32_params = run_lamb(model, grads, lr=0.02, max_grad_norm=1.0)
    assert all(s["exp_avg"].dtype == torch.float32 for s in optimizer.state.values())
    for p, q in zip(low_params, fp32_params):
        assert p.dtype == torch.bfloat16
        torch.testing.assert_close(p.float(), q, rtol=2e-2, atol=2e-2)

    reloaded = Lamb(bert_param_groups(copy.deepcopy(low)), lr=0.02)
    reloaded.load_state_dict(optimizer.state_dict())
    for s, t in zip(reloaded.state.values(), optimizer.state.values()):
        assert s["exp_avg_sq"].dtype == torch.float32 and torch.equal(s["exp_avg_sq"], t["exp_avg_sq"])


@pytest.fixture
def plain_cpu(monkeypatch):
    """Under Triton's interpreter the kernels also run on CPU; these tests are about a plain CPU build."""
    if bert.optim.lamb_triton is not None:
        monkeypatch.setattr(bert.optim.lamb_triton, "INTERPRETED", False)


def test_lamb_dispatch_takes_foreach_on_cpu(plain_cpu, monkeypatch):
    # fused=None chooses per bucket: CPU tensors have no fused kernels, so the foreach update must run.
    calls = []
    foreach_update = Lamb._update_bucket
    monkeypatch.setattr(Lamb, "_update_bucket", lambda self, *a: calls.append("foreach") or foreach_update(self, *a))
    monkeypatch.setattr(Lamb, "_update_bucket_fused", lambda self, *a: calls.append("fused"))
    model = make_model(torch.float32)
    flat = [p for group in bert_param_groups(model) for p in group["params"]]
    before = [p.detach().clone() for p in flat]
    optimizer, params = run_lamb(model, make_grads(flat, steps=2, grad_scale=3.0), lr=0.02, max_grad_norm=1.0)
    assert optimizer.fused is None and calls == ["foreach"] * 4  # two groups, two steps
    assert not optimizer._fused_tables
    assert all(not torch.equal(p, q) for p, q in zip(params, before))


def test_lamb_fused_true_on_cpu_raises(plain_cpu):
    with pytest.raises(ValueError, match=r"fused=True.*CUDA tensors.*cpu"):
        Lamb([nn.Parameter(torch.ones(3))], lr=0.1, fused=True)
    Lamb([nn.Parameter(torch.ones(3))], lr=0.1, fused=False)  # the foreach path is always available


def test_lamb_pickling_keeps_global_settings():
    optimizer = Lamb([nn.Parameter(torch.ones(3))], lr=0.1, max_grad_norm=0, fused=False)
    clone = copy.deepcopy(optimizer)
    assert clone.max_grad_norm == 0.0 and clone.fused is False and clone._fused_tables == {}


INTERPRETER_CHECK = """
import torch
from bert.optim import Lamb
torch.manual_seed(0)
shapes = [(70001,), (5,), (3, 7), (2048,)]
runs = []
for fused in (None, False):
    params = [torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i)))
              for i, s in enumerate(shapes)]
    with torch.no_grad():
        params[2].zero_()
    groups = [{"params": params[:3], "weight_decay": 0.01}, {"params": params[3:], "weight_decay": 0.0}]
    optimizer = Lamb(groups, lr=0.02, max_grad_norm=1.0, fused=fused)
    gen = torch.Generator().manual_seed(7)
    for step in range(3):
        for p in params:   # new grads every step, as after zero_grad(set_to_none=True)
            p.grad = 3.0 * torch.randn(p.shape, generator=gen)
        optimizer.step()
        if step == 0:
            first_tables = dict(optimizer._fused_tables)
    assert bool(optimizer._fused_tables) == (fused is None)
    # the tables were re-pointed at the new grads, not built again
    assert all(optimizer._fused_tables[k] is t for k, t in first_tables.items())
    # a parameter without a grad (its group's table is built anew, then again with it back), then a grad that
    # is not contiguous (its bucket takes the foreach path)
    for step, (missing, transposed) in enumerate([(1, False), (None, False), (None, True)]):
        for i, p in enumerate(params):
            p.grad = None if i == missing else 3.0 * torch.randn(p.shape, generator=gen)
        if transposed:
            params[2].grad = params[2].grad.t().contiguous().t()
        optimizer.step()
    runs.append(params)
for p, q in zip(*runs):
    torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
from test_bert_optim import train_with_compute_copies
fused, foreach = train_with_compute_copies(None), train_with_compute_copies(False)
for (m, c), (m2, c2) in zip(fused, foreach):
    torch.testing.assert_close(m, m2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(c.float(), c2.float(), rtol=2 ** -7, atol=0)   # the interpreter truncates
print("fused matches foreach")
"""


def train_with_compute_copies(fused, by_hand: bool = False):
    """Three LAMB steps over fp32 masters whose bf16 compute copies hold the grads (rannc's param_dtype), by
    `compute_copies` or, `by_hand`, with the grads cast into the masters and the masters copied back."""
    shapes = [(70001,), (5,), (3, 7), (2048,)]
    masters = [nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i))) for i, s in enumerate(shapes)]
    copies = [nn.Parameter(m.detach().to(torch.bfloat16)) for m in masters]
    groups = [{"params": masters[:3], "weight_decay": 0.01}, {"params": masters[3:], "weight_decay": 0.0}]
    optimizer = Lamb(groups, lr=0.02, max_grad_norm=1.0, fused=fused)
    if not by_hand:
        optimizer.compute_copies = dict(zip(masters, copies))
    gen = torch.Generator().manual_seed(7)
    for _ in range(3):
        for c in copies:
            c.grad = (3.0 * torch.randn(c.shape, generator=gen)).to(torch.bfloat16)
        if by_hand:
            for m, c in zip(masters, copies):
                m.grad = c.grad.float()
        optimizer.step()
        if by_hand:
            with torch.no_grad():
                for m, c in zip(masters, copies):
                    c.copy_(m)
                    m.grad = None
    return [(m.detach(), c.detach()) for m, c in zip(masters, copies)]


def test_lamb_compute_copies_equal_grads_cast_into_masters_and_copied_back():
    """rannc's param_dtype hands Lamb {master: bf16 copy}: the same step as the generic path's casts."""
    for (m, c), (m2, c2) in zip(train_with_compute_copies(False), train_with_compute_copies(False, by_hand=True)):
        assert torch.equal(m, m2) and torch.equal(c, c2)
        assert m.dtype == torch.float32 and c.dtype == torch.bfloat16
        assert torch.equal(c, m.to(torch.bfloat16))


def test_fused_kernels_match_foreach_under_triton_interpreter():
    """The Triton kernels on CPU through Triton's interpreter (skipped where Triton is not installed)."""
    result = run_interpreted(INTERPRETER_CHECK)
    assert "fused matches foreach" in result.stdout


def test_bert_param_groups_excludes_biases_and_layer_norms_by_name_or_type():
    model = make_model(torch.float32)
    model.head.weight.requires_grad_(False)
    decay, no_decay = bert_param_groups(model, weight_decay=0.02)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.02 and no_decay["weight_decay"] == 0.0
    assert sorted(names[id(p)] for p in decay["params"]) == ["dense.weight", "embed.weight"]
    assert sorted(names[id(p)] for p in no_decay["params"]) == sorted(
        [
            "dense.bias",
            "head.bias",
            *(f"{ln}.{kind}" for ln in ("LayerNorm", "layernorm", "out_norm") for kind in ("weight", "bias")),
        ]
    )


def nvidia_poly_lr(base, step, warmup, total, degree=0.5):
    """NVIDIA schedulers.py PolyWarmUpScheduler.get_lr, written out."""
    progress = step / total
    return base * progress / warmup if progress < warmup else base * (1.0 - progress) ** degree


def test_poly_warmup_schedule_matches_nvidia_formula():
    w = nn.Parameter(torch.ones(2))
    b = nn.Parameter(torch.ones(2))
    optimizer = Lamb([{"params": [w]}, {"params": [b], "weight_decay": 0.0, "lr": 3e-3}], lr=6e-3)
    scheduler = PolyWarmUpScheduler(optimizer, warmup=0.2843, total_steps=7038)
    # Before any optimizer step the group has no counter: step 1.
    assert optimizer.param_groups[0]["lr"] == pytest.approx(6e-3 * (1 / 7038) / 0.2843, rel=1e-12)
    hand = {
        1: 6e-3 * (1 / 7038) / 0.2843,
        1000: 6e-3 * (1000 / 7038) / 0.2843,
        2001: 6e-3 * (1 - 2001 / 7038) ** 0.5,
        5000: 6e-3 * (1 - 5000 / 7038) ** 0.5,
        7038: 0.0,
        9000: 0.0,
    }
    for step, want in hand.items():
        optimizer.param_groups[0]["step"] = step - 1
        scheduler.step()
        assert optimizer.param_groups[0]["lr"] == pytest.approx(want, rel=1e-12, abs=1e-18)
        assert optimizer.param_groups[1]["lr"] == pytest.approx(want / 2, rel=1e-12, abs=1e-18)
        if step < 7038:
            assert want == pytest.approx(nvidia_poly_lr(6e-3, step, 0.2843, 7038), rel=1e-12)


def test_poly_warmup_follows_optimizer_counter_and_survives_reload():
    w = nn.Parameter(torch.ones(2))
    optimizer = Lamb([w], lr=1.0)
    scheduler = PolyWarmUpScheduler(optimizer, warmup=0.1, total_steps=100, degree=2.0)
    for _ in range(4):
        scheduler.step()
        w.grad = torch.ones(2)
        optimizer.step()
    scheduler.step()  # a skipped (overflowed) step: the optimizer never stepped, the lr must not move
    scheduler.step()
    assert optimizer.param_groups[0]["step"] == 4
    assert scheduler.get_last_lr() == [pytest.approx(0.5)]  # step 5: 0.05 / 0.1

    saved_optimizer, saved_scheduler = optimizer.state_dict(), scheduler.state_dict()
    fresh = Lamb([nn.Parameter(torch.ones(2))], lr=1.0)
    fresh.load_state_dict(saved_optimizer)
    fresh_scheduler = PolyWarmUpScheduler(fresh, warmup=0.5, total_steps=10)
    fresh_scheduler.load_state_dict(saved_scheduler)
    assert fresh_scheduler.base_lrs == [1.0]
    assert fresh_scheduler.get_last_lr() == [pytest.approx(0.5)]
    fresh.param_groups[0]["step"] = 49
    fresh_scheduler.step()
    assert fresh_scheduler.get_last_lr() == [pytest.approx((1 - 0.5) ** 2)]


def grads_of(*values: list[float], dtype=torch.float32) -> list[nn.Parameter]:
    params = []
    for v in values:
        p = nn.Parameter(torch.zeros(len(v), dtype=dtype))
        p.grad = torch.tensor(v, dtype=dtype)
        params.append(p)
    return params


def test_loss_scaler_detects_inf_and_nan_but_not_large_finite_grads():
    scaler = DynamicLossScaler()
    assert not scaler.has_overflow(grads_of([1.0, 2.0], [3.0]))
    assert scaler.has_overflow(grads_of([1.0, 2.0], [math.inf]))
    assert scaler.has_overflow(grads_of([math.nan], [3.0]))
    # A 2-norm of these would overflow fp16; they are finite and must not count as overflow.
    assert not scaler.has_overflow(grads_of([60000.0] * 8, dtype=torch.float16))
    assert scaler.has_overflow(grads_of([60000.0], [-math.inf], dtype=torch.float16))
    no_grad = nn.Parameter(torch.ones(1))
    assert not scaler.has_overflow([no_grad])


def test_loss_scaler_backs_off_and_grows():
    scaler = DynamicLossScaler(init_scale=8.0, growth_interval=3, min_scale=2.0)
    scaler.update(True)
    assert scaler.scale == 4.0
    scaler.update(True)
    scaler.update(True)
    assert scaler.scale == 2.0  # clamped at min_scale
    scaler.update(False)
    scaler.update(False)
    scaler.update(True)  # an overflow restarts the count of good steps
    assert scaler.scale == 2.0
    for _ in range(3):
        scaler.update(False)
    assert scaler.scale == 4.0
    for _ in range(2):
        scaler.update(False)
    assert scaler.scale == 4.0

    restored = DynamicLossScaler()
    restored.load_state_dict(scaler.state_dict())
    restored.update(False)
    assert restored.scale == 8.0 and restored.state_dict() == {
        **scaler.state_dict(),
        "scale": 8.0,
        "good_steps": 0,
    }


def test_loss_scaler_ranks_agree_through_reduce_fn():
    """Two threads stand in for two ranks; the fake all-reduce takes the MAX of both flags."""
    world = 2
    barrier = threading.Barrier(world)
    flags: list[torch.Tensor | None] = [None] * world

    def all_reduce_max(rank: int):
        def reduce_fn(flag: torch.Tensor) -> torch.Tensor:
            assert flag.dtype == torch.float32 and flag.numel() == 1
            flags[rank] = flag.clone()
            barrier.wait(timeout=10)
            return torch.stack([f.reshape(()) for f in flags]).max().reshape(flag.shape)

        return reduce_fn

    rank_grads = [grads_of([1.0, 2.0]), grads_of([1.0], [math.nan])]
    results = [None] * world
    scalers = [DynamicLossScaler(init_scale=16.0) for _ in range(world)]

    def rank_main(rank: int) -> None:
        overflow = scalers[rank].has_overflow(rank_grads[rank], reduce_fn=all_reduce_max(rank))
        scalers[rank].update(overflow)
        results[rank] = overflow

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert results == [True, True]
    assert [s.scale for s in scalers] == [8.0, 8.0]
    assert not DynamicLossScaler().has_overflow(rank_grads[0])  # rank 0 alone saw no overflow


def test_unscale_multiplies_grads_in_place():
    params = grads_of([2.0, 4.0], [8.0], dtype=torch.float32) + grads_of([16.0], dtype=torch.float16)
    params.append(nn.Parameter(torch.ones(1)))  # no grad: left alone
    unscale_(params, 0.25)
    assert [p.grad.tolist() for p in params[:3]] == [[0.5, 1.0], [2.0], [4.0]]
    assert params[3].grad is None
    scaler = DynamicLossScaler(init_scale=4.0)
    scaler.unscale_(params)
    assert params[0].grad.tolist() == [0.125, 0.25]
