"""Split backward for the zero-bubble schedules (rannc.split_backward): BI (input gradients) then
BW (weight gradients) gives the input gradients and every parameter's .grad of a plain
torch.autograd.backward on an identical copy of the stage, for chains, tied weights, first stages, unused
inputs, outputs and parameters, accumulation over micro-batches run in schedule order, autocast and
checkpointing; BW does not rerun the input part, runs once, and lets go of the graph."""

from __future__ import annotations

import copy
import gc
import weakref
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from rannc.split_backward import WeightGradient, backward_input

Forward = Callable[[nn.Module, list[torch.Tensor]], list[torch.Tensor]]


def _received(values: list[torch.Tensor]) -> list[torch.Tensor]:
    """What a stage receives: leaf copies, floating ones requiring grad."""
    return [v.detach().clone().requires_grad_(v.is_floating_point()) for v in values]


def _split(model: nn.Module, forward: Forward, values: list[torch.Tensor], grads: list[torch.Tensor]):
    """BI on a fresh forward; returns (received inputs, their gradients, the BW to run)."""
    inputs = _received(values)
    outputs = forward(model, inputs)
    pairs = [(o, g) for o, g in zip(outputs, grads) if o.requires_grad]
    input_grads, weight_gradient = backward_input([o for o, _ in pairs], [g for _, g in pairs],
                                                  [i for i in inputs if i.requires_grad], list(model.parameters()))
    return inputs, input_grads, weight_gradient


def _plain(model: nn.Module, forward: Forward, values: list[torch.Tensor],
           grads: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """The reference: one torch.autograd.backward; returns the grad-requiring inputs' .grad."""
    inputs = _received(values)
    outputs = forward(model, inputs)
    pairs = [(o, g) for o, g in zip(outputs, grads) if o.requires_grad]
    torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
    return [i.grad for i in inputs if i.requires_grad]


def _assert_close(actual: torch.Tensor | None, expected: torch.Tensor | None, rtol: float, name: str) -> None:
    assert (actual is None) == (expected is None), f"{name}: {actual} vs {expected}"
    if expected is not None:
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * 1e-2, msg=lambda m: f"{name}: {m}")


def _assert_same(model: nn.Module, reference: nn.Module, input_grads, reference_grads, rtol: float = 1e-6) -> None:
    assert len(input_grads) == len(reference_grads)
    for position, (actual, expected) in enumerate(zip(input_grads, reference_grads)):
        _assert_close(actual, expected, rtol, f"input {position}")
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        _assert_close(p.grad, q.grad, rtol, name)


def _check(model: nn.Module, forward: Forward, values: list[torch.Tensor], grads: list[torch.Tensor],
           rtol: float = 1e-6) -> tuple[list[torch.Tensor | None], WeightGradient]:
    """BI then BW against a plain backward on a copy; returns the split's input gradients and its BW."""
    reference = copy.deepcopy(model)
    _, input_grads, weight_gradient = _split(model, forward, values, grads)
    assert all(p.grad is None for p in model.parameters()), "BI must not touch .grad"
    weight_gradient.run()
    _assert_same(model, reference, input_grads, _plain(reference, forward, values, grads), rtol)
    return input_grads, weight_gradient


def _sequential(model: nn.Module, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [model(*inputs)]


def _chain() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.LayerNorm(16), nn.Linear(16, 8), nn.GELU(),
                         nn.LayerNorm(8))


class _Tied(nn.Module):
    """One weight used twice in a stage; `nested` puts the second use on the input path of the first."""

    def __init__(self, nested: bool):
        super().__init__()
        self.nested = nested
        self.inner = nn.Linear(6, 6)
        self.weight = nn.Parameter(torch.randn(6, 6) / 3)

    def forward(self, x):
        if self.nested:
            return F.gelu(x @ self.weight) @ self.weight
        return F.linear(F.gelu(self.inner(x) * self.weight.sum(0)), self.weight)


class _Counted(torch.autograd.Function):
    """Identity whose backward counts its runs."""

    runs = 0

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        _Counted.runs += 1
        return grad


class _ScaledLinear(torch.autograd.Function):
    """x @ w.T * scale, a parameter-consuming custom Function with a non-tensor argument."""

    @staticmethod
    def forward(ctx, x, weight, scale):
        ctx.save_for_backward(x, weight)
        ctx.scale = scale
        return x @ weight.t() * scale

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        return grad @ weight * ctx.scale, grad.t() @ x * ctx.scale, None


# ---- exactness ------------------------------------------------------------------------------------------

def test_chain_of_linear_gelu_layernorm():
    torch.manual_seed(0)
    _check(_chain(), _sequential, [torch.randn(4, 8)], [torch.randn(4, 8)])


@pytest.mark.parametrize("nested", [False, True], ids=["side_by_side", "on_input_path"])
def test_weight_used_twice_in_one_stage(nested):
    torch.manual_seed(1)
    _, weight_gradient = _check(_Tied(nested), _sequential, [torch.randn(3, 6)], [torch.randn(3, 6)])
    # on the input path, the first use's node cannot rerun alone: BW falls back to one backward
    assert weight_gradient._split is not nested


def test_embedding_first_stage_without_grad_requiring_inputs():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.LayerNorm(8))
    tokens = torch.randint(0, 10, (2, 5))

    def forward(m, inputs):
        return [m(tokens)]

    assert _check(model, forward, [], [torch.randn(2, 5, 8)])[0] == []


def test_two_received_inputs_one_without_gradient():
    torch.manual_seed(3)
    model = nn.Linear(5, 5)

    def forward(m, inputs):
        x, mask = inputs
        return [m(x) * (mask > 0)]  # the mask gets no gradient

    input_grads, _ = _check(model, forward, [torch.randn(4, 5), torch.randn(4, 5)], [torch.randn(4, 5)])
    assert input_grads[0] is not None and input_grads[1] is None


def test_two_outputs_one_with_zero_gradient():
    torch.manual_seed(4)
    model = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 3)])

    def forward(m, inputs):
        hidden = F.gelu(m[0](inputs[0]))
        return [m[1](hidden), hidden]

    _check(model, forward, [torch.randn(2, 4)], [torch.randn(2, 3), torch.zeros(2, 4)])


def test_output_of_parameters_only_and_input_not_reaching_any_parameter():
    torch.manual_seed(5)
    model = nn.Linear(3, 3)

    def forward(m, inputs):
        return [inputs[0] * 2, m.weight * 3 + m.bias]  # the second output does not depend on the input

    _check(model, forward, [torch.randn(3, 3)], [torch.randn(3, 3), torch.randn(3, 3)])


def test_parameters_the_outputs_do_not_use_stay_none():
    torch.manual_seed(6)
    model = nn.ModuleDict({"used": nn.Linear(4, 4), "unused": nn.Linear(4, 4)})

    def forward(m, inputs):
        return [m["used"](inputs[0])]

    _check(model, forward, [torch.randn(2, 4)], [torch.randn(2, 4)])
    assert all(p.grad is None for p in model["unused"].parameters())


def test_custom_function_consuming_the_weight():
    torch.manual_seed(7)
    model = nn.Linear(4, 4, bias=False)

    def forward(m, inputs):
        # its node, implemented in Python, is the output's: only the graph's owners keep it alive until BW
        return [_ScaledLinear.apply(F.gelu(inputs[0]), m.weight, 0.5)]

    _check(model, forward, [torch.randn(3, 4)], [torch.randn(3, 4)])


def test_autocast_bfloat16_matches_plain_backward_under_autocast():
    torch.manual_seed(8)

    def forward(m, inputs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return [m(inputs[0])]

    _check(_chain(), forward, [torch.randn(4, 8)], [torch.randn(4, 8)], rtol=1.6e-2)


# ---- micro-batches in schedule order ---------------------------------------------------------------------

def test_accumulates_onto_existing_grad_over_two_microbatches():
    torch.manual_seed(9)
    model = _chain()
    reference = copy.deepcopy(model)
    for p, q in zip(model.parameters(), reference.parameters()):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    batches = [([torch.randn(4, 8)], [torch.randn(4, 8)]) for _ in range(2)]
    split = [_split(model, _sequential, values, grads) for values, grads in batches]  # BI1 BI2
    for _, _, weight_gradient in split:  # BW1 BW2
        weight_gradient.run()
    for (values, grads), (_, input_grads, _) in zip(batches, split):
        reference_grads = _plain(reference, _sequential, values, grads)
        for actual, expected in zip(input_grads, reference_grads):
            _assert_close(actual, expected, 1e-6, "input")
    _assert_same(model, reference, [], [])


def test_each_microbatch_keeps_its_own_state():
    torch.manual_seed(10)
    model = _Tied(nested=False)
    reference = copy.deepcopy(model)
    batches = [([torch.randn(3, 6)], [torch.randn(3, 6)]) for _ in range(2)]
    _, grads0, bw0 = _split(model, _sequential, *batches[0])  # BI on micro-batch 0
    _, grads1, bw1 = _split(model, _sequential, *batches[1])  # BI on micro-batch 1
    bw0.run()  # BW of 0: exactly micro-batch 0's parameter gradients
    _assert_same(model, reference, grads0, _plain(reference, _sequential, *batches[0]))
    bw1.run()
    _assert_same(model, reference, grads1, _plain(reference, _sequential, *batches[1]))


# ---- what BW runs and holds -------------------------------------------------------------------------------

def test_bw_does_not_rerun_the_input_part():
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 4))

    def forward(m, inputs):
        # counted before the first weight's use, between the layers, and after the last one
        hidden = m[1](m[0](_Counted.apply(inputs[0])))
        return [_Counted.apply(m[2](_Counted.apply(hidden)))]

    _Counted.runs = 0
    _, _, weight_gradient = _split(model, forward, [torch.randn(2, 4)], [torch.randn(2, 4)])
    assert _Counted.runs == 3
    weight_gradient.run()
    assert _Counted.runs == 3
    assert all(p.grad is not None for p in model.parameters())


def test_checkpointed_stage_is_exact_and_recomputes_once_in_bw():
    torch.manual_seed(12)
    model = _chain()
    runs = 0

    def forward(m, inputs):
        def body(x):
            nonlocal runs
            runs += 1
            return m(x)
        return [checkpoint(body, inputs[0], use_reentrant=False)]

    reference = copy.deepcopy(model)
    values, grads = [torch.randn(4, 8)], [torch.randn(4, 8)]
    _, input_grads, weight_gradient = _split(model, forward, values, grads)
    runs = 0
    weight_gradient.run()
    if hasattr(torch.utils.checkpoint, "GraphExecGroup"):  # one recomputation for all of BW's calls
        assert runs == 1
    _assert_same(model, reference, input_grads, _plain(reference, forward, values, grads))


def test_second_run_raises():
    torch.manual_seed(13)
    _, _, weight_gradient = _split(_chain(), _sequential, [torch.randn(2, 8)], [torch.randn(2, 8)])
    weight_gradient.run()
    with pytest.raises(RuntimeError, match="called twice"):
        weight_gradient.run()


def test_bw_lets_go_of_the_graph_and_kept_gradients():
    torch.manual_seed(14)
    model = _chain()
    kept: list[weakref.ref] = []
    model[3].register_forward_pre_hook(lambda _m, args: kept.append(weakref.ref(args[0])))  # a saved activation
    _, _, weight_gradient = _split(model, _sequential, [torch.randn(2, 8)], [torch.randn(2, 8)])
    assert isinstance(weight_gradient, WeightGradient)
    gc.collect()
    assert kept[0]() is not None, "the graph must live until BW"
    weight_gradient.run()
    gc.collect()
    assert kept[0]() is None
    assert not weight_gradient._boundaries and not weight_gradient._graph_owners
