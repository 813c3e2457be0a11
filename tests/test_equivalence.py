"""Distributed training equals single-process training on the same global batch: losses every step and
parameters after the last, for every test model, world sizes 1-4 and forced partitions of 1-3 stages
(replicas where the world allows), with SGD+momentum and Adam, clip_grad_norm, and gradient accumulation
with a delayed all-reduce.

Every case wraps a model anew, and capturing it is most of a case's time, so the matrix varies the optimizer
instead of multiplying by it: per (world, stages) every model trains once, half of them with SGD and half with
Adam, each model with both somewhere. The optimizer runs on each rank's own parameters after the all-reduce,
the same code whatever the plan."""

from __future__ import annotations

import copy

import pytest
import torch

import models
from distributed import run_ranks

MODELS = ["mlp", "bert", "skip", "multi"]
STEPS = 5
BATCH = 24
RTOL = 1e-5


def _optimizer(kind: str, params):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9)
    # eps keeps Adam from turning float rounding in near-zero gradients into full-size steps
    return torch.optim.Adam(params, lr=0.01, eps=1e-3)


def _train_pair(rank, world, name, stages, opt_kind, accumulation, **items):
    """Train a RaNNCModule and (on rank 0) the plain model side by side; return the largest differences."""
    import rannc

    torch.manual_seed(1234)
    model = models.make(name)
    reference = copy.deepcopy(model)
    optimizer = _optimizer(opt_kind, model.parameters())
    ref_optimizer = _optimizer(opt_kind, reference.parameters())
    wrapped = rannc.RaNNCModule(model, optimizer, partition_num=stages, profile_repeats=1, **items)
    rannc.delay_grad_allreduce(accumulation > 1)
    loss_err, losses = 0.0, []
    for _step in range(STEPS):
        for micro in range(accumulation):
            batch = models.global_batch(name, BATCH, seed=micro)
            loss = wrapped(*models.local_part(batch, rank, world))
            loss.backward()
            ref_loss = reference(*batch)
            ref_loss.backward()
            loss_err = max(loss_err, abs(loss.item() - ref_loss.item()) / max(1e-6, abs(ref_loss.item())))
            losses.append(loss.item())
        if accumulation > 1:
            wrapped.allreduce_grads()
        wrapped.clip_grad_norm(0.5)
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
        optimizer.step()
        ref_optimizer.step()
        optimizer.zero_grad()
        ref_optimizer.zero_grad()
    rannc.delay_grad_allreduce(False)
    state = wrapped.state_dict()
    param_err = 0.0
    if rank == 0:
        for key, value in reference.state_dict().items():
            scale = value.abs().max().item() + 1e-3
            param_err = max(param_err, (state[key] - value).abs().max().item() / scale)
    assert len(wrapped.deployment.stages) == stages
    return loss_err, param_err, losses[0] > losses[-accumulation]


def _matrix(rank, world, cases, items=None):
    return [(case, _train_pair(rank, world, *case, **(items or {}))) for case in cases]


def _cases(world: int, accumulation: int):
    """Every model at every stage count the world allows, SGD and Adam alternating over models and stages."""
    stage_counts = [s for s in (1, 2, 3) if s <= world]
    return [(name, stages, ("sgd", "adam")[(m + stages + world) % 2], accumulation)
            for m, name in enumerate(MODELS) for stages in stage_counts]


def _check(results):
    for case, (loss_err, param_err, fell) in results[0]:
        assert loss_err < RTOL, f"{case}: loss differs by {loss_err:.2e} (relative)"
        assert param_err < RTOL, f"{case}: parameters differ by {param_err:.2e} (relative)"
        assert fell, f"{case}: the loss did not fall"


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_training_matches_single_process(world):
    _check(run_ranks(_matrix, world, _cases(world, 1), timeout=600))


@pytest.mark.parametrize("world", [2, 3])
def test_gradient_accumulation_matches_single_process(world):
    """Four backwards per step with the all-reduce delayed to the last. At every stage count the tiny BERT (its
    embedding and decoder share one weight, on two stages where there are several) and one other model in turn,
    one with each optimizer."""
    others = [name for name in MODELS if name != "bert"]
    cases = []
    for stages in range(1, world + 1):
        other = others[(stages + 2 * (world - 2)) % len(others)]
        bert_opt = ("sgd", "adam")[(stages + world) % 2]
        cases += [("bert", stages, bert_opt, 4), (other, stages, "adam" if bert_opt == "sgd" else "sgd", 4)]
    _check(run_ranks(_matrix, world, cases, timeout=600))


def _accumulate_without_delay(rank, world, items):
    """Two backward calls before one step, with rannc's implicit all-reduce after each: the second must
    not sum the first (already summed) gradient again."""
    import rannc
    torch.manual_seed(3)
    model = models.make("bert")
    reference = copy.deepcopy(model)
    wrapped = rannc.RaNNCModule(model, partition_num=2 if world >= 2 else 1, profile_repeats=1, **items)
    for micro in range(2):
        batch = models.global_batch("bert", BATCH, seed=micro)
        (wrapped(*models.local_part(batch, rank, world)) / 2).backward()
        (reference(*batch) / 2).backward()
    norm = wrapped.clip_grad_norm(1e9).item()
    ref_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 1e9).item()
    return norm, ref_norm


@pytest.mark.parametrize("schedule", ["gpipe"])   # the other schedules: tests/test_schedule_runtime.py
def test_accumulation_with_implicit_allreduce_counts_each_gradient_once(schedule):
    items = {"schedule": schedule, "min_pipeline": 2, "max_pipeline": 2}
    for norm, ref_norm in run_ranks(_accumulate_without_delay, 4, items, timeout=300):
        assert abs(norm - ref_norm) < RTOL * ref_norm, (norm, ref_norm)


def _recompute_pair(rank, world):
    """The same training with recomputation forced on and off: dropout must draw the same masks when a stage
    recomputes its forward, so losses and parameters agree exactly."""
    import rannc
    results = []
    for mode in ("always", "never"):
        torch.manual_seed(5)
        model = models.make("bert")
        for layer in model.blocks:
            layer.dropout.p = layer.dropout1.p = layer.dropout2.p = 0.2
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        # two blocks: one possible 2-stage split, whatever the (noisy) profile says, so both modes draw the
        # dropout masks in the same order on the same ranks
        wrapped = rannc.RaNNCModule(model, optimizer, partition_num=2, recompute=mode, min_pipeline=2,
                                    max_pipeline=2, profile_repeats=1, max_blocks=2)
        torch.manual_seed(100 + rank)
        losses = []
        for step in range(3):
            batch = models.global_batch("bert", BATCH, seed=step)
            loss = wrapped(*models.local_part(batch, rank, world))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        assert all(s.recompute == (mode == "always") for s in wrapped.deployment.stages)
        results.append((losses, wrapped.state_dict(sync_all_ranks=True)))
    return results


def test_recomputation_with_dropout_equals_keeping_activations():
    for (losses_cp, state_cp), (losses, state) in run_ranks(_recompute_pair, 2, timeout=300):
        assert losses_cp == losses
        for key in state:
            assert torch.equal(state_cp[key], state[key]), key
