"""Sibling linears fused: linears reading one input become one product over their stacked weights, computing what
the model computes (forward and gradients, at any batch size); groups whose results a view cannot take, or
whose members lie far apart, stay as they are; the fused graph's fingerprint differs from the unfused one."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rannc.config import RannConfig
from rannc.deploy import capture_blocks
from rannc.graph.capture import capture
from rannc.graph.fuse import LINEAR, fuse_sibling_linears
from rannc.profile.estimate import DEVICES, estimate_profiles

import rannc_models


class Siblings(nn.Module):
    """Attention-like projections of unequal widths read through views, a bias-free pair on another input, and a
    linear reading the first input again much later (too far to fuse)."""

    def __init__(self):
        super().__init__()
        self.query, self.key, self.value = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)
        self.gate, self.up = nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False)
        self.mix = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
        self.late = nn.Linear(8, 8)

    def forward(self, x, y):
        batch = x.shape[0]
        q = self.query(x).view(batch, 4, 2).transpose(1, 2)
        k = self.key(x).view(batch, 4, 2).transpose(1, 2)
        v = self.value(x)
        scores = (q * k).sum(1)                                      # (batch, 2)
        h = F.silu(self.gate(y)) * self.up(y)
        for layer in self.mix:
            h = torch.tanh(layer(h))
        h = h + self.late(x)
        return (scores.sum(1) + v.sum(1) + h.sum(1)).square().mean()


class Flattened(nn.Module):
    """A sibling's result flattened by view(-1), which a piece of a wider result cannot take."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.a(x).view(-1).square().sum() + self.b(x).sum()


class ChunkThenFlatten(Flattened):
    """The view(-1) on one chunk of a sibling's result."""

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        low, high = a.chunk(2, dim=0)
        return low.view(-1).square().sum() + high.sum() + b.sum()


class Returned(Flattened):
    """Siblings' results returned as they are: the caller may view them."""

    def forward(self, x):
        return self.a(x), self.b(x)


class Unaligned(Flattened):
    """Widths of 4: the second piece of the stacked gradient would start 16 bytes in with fp32 weights, 8 with the
    bf16 ones that param_dtype makes of them."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.a(x).sum() + self.b(x).square().sum()


def _batch(rows: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 8, generator=g), torch.randn(rows, 8, generator=g)


def _grads(model: nn.Module, fn, *inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = fn(*inputs)
    loss = loss[0] if isinstance(loss, tuple) else loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_siblings_become_one_product_and_compute_what_the_model_computes():
    torch.manual_seed(0)
    model = Siblings()
    captured = capture(model, _batch(4, 0))
    fused = fuse_sibling_linears(captured.gm)
    assert fused == [("model.query.weight", "model.key.weight", "model.value.weight"),
                     ("model.gate.weight", "model.up.weight")]    # the graph's attributes: model.<state_dict name>
    linears = [n for n in captured.gm.graph.nodes if n.target is LINEAR]
    assert len(linears) == 2 + 3 + 1      # q/k/v as one, gate/up as one, the three mix layers, late alone
    for rows, seed in ((4, 1), (7, 2)):   # the batch dimension stays symbolic
        batch = _batch(rows, seed)
        want_loss, want = _grads(model, model, *batch)
        got_loss, got = _grads(model, captured.gm, *batch)
        torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-6)
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.parametrize("model_type", [Flattened, ChunkThenFlatten, Returned, Unaligned])
def test_a_group_whose_pieces_would_not_serve_stays_unfused(model_type):
    torch.manual_seed(0)
    model = model_type()
    x = torch.randn(6, 4)
    captured = capture(model, (x,))
    assert fuse_sibling_linears(captured.gm) == []
    assert sum(n.target is LINEAR for n in captured.gm.graph.nodes) == 2
    want = model(x)
    got = captured.gm(x)
    for a, b in zip(got, want if isinstance(want, tuple) else (want,)):
        torch.testing.assert_close(a, b)
        assert a.is_contiguous()


def test_fusing_is_an_item_and_changes_the_fingerprint():
    torch.manual_seed(0)
    fused, _, _ = capture_blocks(Siblings(), _batch(4, 0), RannConfig())
    plain, _, _ = capture_blocks(Siblings(), _batch(4, 0), RannConfig(fuse_linears=False))
    assert sum(n.target is LINEAR for n in fused.gm.graph.nodes) == 6
    assert sum(n.target is LINEAR for n in plain.gm.graph.nodes) == 9
    assert fused.fingerprint != plain.fingerprint   # no profile or deployment of the one is taken for the other


def test_the_multi_rank_equivalence_models_include_a_fused_group():
    """test_rannc_models trains ForkJoinModel at several world sizes and plans against one process: with its two
    branches' first linears fused, that covers the fused graph cut into stages, sent between ranks and stepped."""
    captured = capture(rannc_models.ForkJoinModel(), (torch.randn(4, 10),))
    assert fuse_sibling_linears(captured.gm) == [("model.left1.weight", "model.right.weight")]


def test_estimated_profiles_price_the_fused_graph_as_the_unfused_one():
    """The dry run's estimate counts the work and activations of each sample: the stacked weights (computed from
    parameters alone) and the split's pieces (aliases of the wide result) add none, so fusing moves neither."""
    def estimate(config):
        torch.manual_seed(0)
        captured, lin, blocks = capture_blocks(Siblings(), _batch(4, 0), config)
        blocks_ = estimate_profiles(captured, lin, blocks, DEVICES["h100"]).blocks
        return (sum(b.activation_bytes.per_sample for b in blocks_), sum(b.fwd_ms.per_sample for b in blocks_),
                sum(b.fwd_ms.fixed for b in blocks_))

    fused_act, fused_fwd, fused_overhead = estimate(RannConfig())
    plain_act, plain_fwd, plain_overhead = estimate(RannConfig(fuse_linears=False))
    assert fused_act == pytest.approx(plain_act) and fused_fwd == pytest.approx(plain_fwd)
    assert fused_overhead < plain_overhead     # fewer operations launched
