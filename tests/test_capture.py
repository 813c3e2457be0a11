"""Capture: parameters stay the user's objects, tied weights are one node, the batch dimension is
symbolic, and a model that cannot be captured gets an error naming the operation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

from rannc.graph.blocks import linearize
from rannc.graph.capture import CaptureError, capture
from rannc.graph.stage import build_stage

import models


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        h = self.lin(x)
        if h.sum() > 0:       # Python control flow on a tensor's value: no single graph exists
            return h.mean()
        return -h.mean()


def test_data_dependent_control_flow_is_a_clear_error():
    with pytest.raises(CaptureError, match="could not capture DataDependent.forward") as info:
        capture(DataDependent(), (torch.randn(2, 4),))
    assert "data-dependent" in str(info.value)


def test_parameters_are_the_users_and_tied_weights_are_one():
    model = models.make("bert")
    captured = capture(model, tuple(models.global_batch("bert", 4, 0)))
    graph_params = {id(p) for p in captured.gm.parameters()}
    assert graph_params == {id(p) for p in model.parameters()}
    tied = [n for n in captured.gm.graph.nodes
            if n.op == "get_attr" and captured.gm.get_parameter(n.target) is model.embed.weight]
    assert len(tied) == 1 and len(tied[0].users) == 2   # read by the embedding and by the decoder


def test_one_graph_serves_every_batch_size():
    torch.manual_seed(0)
    model = models.make("skip")
    captured = capture(model, tuple(models.global_batch("skip", 8, 0)))
    lin = linearize(captured)
    whole = build_stage(captured, lin, 0, lin.size)
    for rows in (1, 3, 8):
        batch = models.global_batch("skip", rows, 1)
        torch.testing.assert_close(whole.module(*batch)[0], model(*batch))


class _WritesItsInput(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, x, target):
        target[:, 0].mul_(2)               # in place, through a view of the argument
        return ((self.linear(x) - target) ** 2).mean()


def test_in_place_write_to_an_argument_is_refused_by_name():
    with pytest.raises(CaptureError, match=r"writes in place to its argument #1.*Clone the input"):
        capture(_WritesItsInput(), (torch.randn(3, 4), torch.randn(3, 4)))


FINGERPRINT_OF_A_DROPOUT_MODEL = """
import torch, torch.nn as nn
from rannc.graph.capture import capture
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1), nn.Linear(4, 1))
print(capture(model, (torch.randn(2, 4),)).fingerprint)
"""


def test_fingerprint_is_the_same_in_every_process():
    """The fingerprint keys the profile cache and checks a loaded deployment, so a new process must compute the
    same one; the routed dropout's Python function once put its memory address into it."""
    import subprocess
    import sys

    namespace: dict = {}
    exec(FINGERPRINT_OF_A_DROPOUT_MODEL.replace("print(", "result = ("), namespace)
    fresh = subprocess.run([sys.executable, "-c", FINGERPRINT_OF_A_DROPOUT_MODEL], capture_output=True, text=True,
                           check=True, cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    assert fresh == namespace["result"]


class _WritesBuffers(nn.Module):
    """spectral_norm (its power iteration writes two vectors, under no_grad, through out=), a running average
    and a queue of its own, a counter written in an autocast block, and BatchNorm (whose statistics the mode
    switches handle)."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.utils.parametrizations.spectral_norm(nn.Linear(4, 4))
        self.bn = nn.BatchNorm1d(4)
        self.register_buffer("average", torch.zeros(4))
        self.register_buffer("queue", torch.zeros(8, 4))
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        h = self.bn(self.a(x))
        with torch.no_grad():
            self.average.mul_(0.9).add_(0.1 * h.mean(0))
            self.queue[:2] = h[:2]   # written through a view, as a MoCo-style queue is
        with torch.autocast("cpu", dtype=torch.bfloat16):   # a region of its own in the graph
            self.calls.add_(1.0)
        return h.pow(2).mean()


def test_buffers_written_in_forward_are_found_for_the_deployment_warning():
    """What the forward writes once per run of the graph, so once per micro-batch (named at deployment):
    spectral_norm's vectors and the model's own average and queue, not BatchNorm's statistics."""
    from rannc.graph.capture import written_buffers

    captured = capture(_WritesBuffers(), (torch.randn(4, 4),))
    assert written_buffers(captured) == ["a.parametrizations.weight.0._u", "a.parametrizations.weight.0._v",
                                         "average", "queue", "calls"]
    assert written_buffers(capture(models.make("bert"), tuple(models.global_batch("bert", 4, 0)))) == []


class _NoiseInTraining(nn.Module):
    """Adds noise in train mode only, through its own code: the eval-mode graph lacks an operation."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        h = self.lin(x)
        if self.training:
            h = h + 0.1 * torch.randn_like(h)
        return h.mean()


def test_the_forward_is_traced_in_eval_mode_too_only_where_its_code_reads_training(monkeypatch):
    """Dropout and BatchNorm layers read self.training in torch's own code, which rannc switches: one export.
    A model whose code reads it gets a second export, in eval mode, and the difference is named with its
    source line."""
    exports = []
    real = torch.export.export
    monkeypatch.setattr(torch.export, "export", lambda *a, **k: exports.append(1) or real(*a, **k))
    plain = capture(nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1), nn.BatchNorm1d(4)), (torch.randn(3, 4),))
    assert len(exports) == 1 and plain.eval_difference is None
    noisy = capture(_NoiseInTraining(), (torch.randn(3, 4),))
    assert len(exports) == 3
    assert "randn_like" in noisy.eval_difference and "h = h + 0.1 * torch.randn_like(h)" in noisy.eval_difference


class _Attention(nn.Module):
    """nn.MultiheadAttention with dropout: its code calls dropout only where the rate is above 0, so the
    eval-mode trace has no dropout op where the train-mode one has one; rannc's eval drops nothing either."""

    def __init__(self):
        super().__init__()
        self.attention = nn.MultiheadAttention(4, 2, dropout=0.1, batch_first=True)

    def forward(self, x):
        return self.attention(x, x, x)[0].mean()


class _DropoutKeptInEval(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return nn.functional.dropout(self.lin(x), 0.5, training=True).mean()   # Monte Carlo dropout


class _InheritsNoise(_NoiseInTraining):
    """Its forward, which reads self.training, is its base class's."""


def test_the_eval_mode_comparison_leaves_out_what_rannc_switches_and_nothing_else():
    x = torch.randn(3, 5, 4)
    assert capture(_Attention(), (x,)).eval_difference is None
    kept = capture(_DropoutKeptInEval(), (x,)).eval_difference
    assert "dropout on in eval mode" in kept and "training=True" in kept   # the switches would turn it off
    assert "randn_like" in capture(_InheritsNoise(), (torch.randn(3, 4),)).eval_difference
