"""Every pipeline schedule trains exactly like single-process training (fp32, dropout off, the same global
batch): losses, gradients after each backward, parameters after several optimizer steps, and evaluation
under torch.no_grad(); with the tied embedding of the tiny BERT on different ranks, gradient accumulation
with a delayed and with an immediate all-reduce, and a forward in grad mode never followed by a backward
(it must leave the gradients as they were). Each rank also counts the activation sets it holds at once:
never more than the simulator reads off the schedule's lists; and under gloo its receives are posted ahead
of the actions that take them (in the order they are sent, or the values would be another micro-batch's)."""

from __future__ import annotations

import copy

import pytest
import torch

from rannc.schedule import get as get_schedule
from rannc.schedule import simulate

import models
from distributed import run_ranks
from side_by_side import grad_error, state_and_eval_errors

BATCH = 24
RTOL = 1e-5

SCHEDULES = [("gpipe", 1), ("1f1b", 1), ("zb_h1", 1), ("interleaved_1f1b", 2)]



def _train(rank, world, name, stages, schedule, virtual, accumulation, delay, stage_replicas=""):
    """Train a RaNNCModule and the plain model side by side for 3 steps; return the largest relative
    differences of losses, gradients, parameters and evaluation losses, and the pieces per rank."""
    import rannc

    torch.manual_seed(1234)
    model = models.make(name)
    reference = copy.deepcopy(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01, eps=1e-3)
    ref_optimizer = torch.optim.Adam(reference.parameters(), lr=0.01, eps=1e-3)
    wrapped = rannc.RaNNCModule(model, optimizer, partition_num=0 if stage_replicas else stages, schedule=schedule,
                                virtual_stages=virtual, stage_replicas=stage_replicas, min_pipeline=4, max_pipeline=4)
    names = [n for n, _ in reference.named_parameters()]
    errors = {"loss": 0.0, "grad": 0.0, "param": 0.0, "eval": 0.0, "lone forward": 0.0}
    rannc.delay_grad_allreduce(delay)
    for step in range(3):
        for micro in range(accumulation):
            batch = models.global_batch(name, BATCH, seed=10 * step + micro)
            local = models.local_part(batch, rank, world)
            if step == 1 and micro == accumulation - 1:
                # a forward in grad mode that no backward follows: gradients must stay as they were
                before = [wrapped.get_param_grad(n) for n in names]
                wrapped(*local)
                after = [wrapped.get_param_grad(n) for n in names]
                for b, a in zip(before, after):
                    if (a is None) != (b is None) or (a is not None and not torch.equal(a, b)):
                        errors["lone forward"] = 1.0
            loss = wrapped(*local)
            (loss / accumulation).backward()
            ref_loss = reference(*batch)
            (ref_loss / accumulation).backward()
            errors["loss"] = max(errors["loss"], abs(loss.item() - ref_loss.item()) / abs(ref_loss.item()))
        if delay:
            wrapped.allreduce_grads()
        errors["grad"] = max(errors["grad"], grad_error(wrapped, reference))
        optimizer.step()
        ref_optimizer.step()
        optimizer.zero_grad()
        ref_optimizer.zero_grad()
    rannc.delay_grad_allreduce(False)
    errors["param"], errors["eval"] = state_and_eval_errors(wrapped, reference, name, BATCH, rank, world)
    deployment = wrapped.deployment
    shape = (deployment.schedule, deployment.pipeline_depth, deployment.virtual_stages,
             ",".join(str(s.replicas) for s in deployment.stages))
    # activation sets held at once, counted by the executor, against what the simulator reads off the lists
    physical = deployment.stage_of_rank(rank)
    if physical is not None and deployment.pipeline_depth > 1:
        lists = get_schedule(deployment.schedule)(deployment.pipeline_depth, deployment.microbatch_count,
                                                  deployment.virtual_stages)
        simulated = simulate(lists, {"F": 1.0, "B": 2.0, "BI": 1.0, "BW": 1.0}).peak_in_flight[physical]
        held = wrapped._engine.runtime.peak_held
        if held > simulated:
            errors["held activations"] = float(held - simulated)
        if wrapped._engine.runtime.received_ahead == 0:   # every stage of a pipeline receives something
            errors["receives posted ahead (gloo)"] = 1.0
    return errors, shape


def _matrix(rank, world, cases):
    return [(case, _train(rank, world, *case)) for case in cases]


def _every_schedule_cases(world: int, stages: int) -> list[tuple]:
    schedules = SCHEDULES if world == 4 else SCHEDULES[1:]
    return [("bert", stages, schedule, virtual, 1, False) for schedule, virtual in schedules]


def _accumulation_cases() -> list[tuple]:
    return [("skip", 2, schedule, virtual, 2, delay) for schedule, virtual in SCHEDULES[1:] for delay in (True, False)]


UNEQUAL = {3: [("1,2", "gpipe"), ("1,2", "1f1b"), ("2,1", "zb_h1")],
           4: [("1,3", "1f1b"), ("2,1,1", "gpipe"), ("2,1,1", "zb_h1")]}


def _unequal_cases(world: int) -> list[tuple]:
    return [("bert", len(vector.split(",")), schedule, 1, 2, schedule == "gpipe", vector)
            for vector, schedule in UNEQUAL.get(world, [])]


EVERY_SCHEDULE = [(2, 2), (3, 3), (4, 2)]   # (world, stages)
_RUNS: dict = {}


def _run(world: int):
    """One launch per world size runs every case of this file at that size (starting 3 or 4 ranks and their
    first capture cost seconds), shared by the tests that check them."""
    if world not in _RUNS:
        cases = [c for w, stages in EVERY_SCHEDULE if w == world for c in _every_schedule_cases(w, stages)]
        cases += (_accumulation_cases() if world == 4 else []) + _unequal_cases(world)
        try:
            _RUNS[world] = run_ranks(_matrix, world, cases, timeout=600)
        except AssertionError as exc:
            _RUNS[world] = exc
    return _RUNS[world]


def _check(world: int, cases: list[tuple]):
    results = _run(world)
    if isinstance(results, AssertionError):
        pytest.fail(f"the run of {world} ranks failed: {results}")
    results = [[(case, r) for case, r in rank_results if case in cases] for rank_results in results]
    assert [case for case, _ in results[0]] == cases, f"{world} ranks ran {[case for case, _ in results[0]]}"
    for rank, rank_results in enumerate(results):
        for case, (errors, _) in rank_results:
            assert errors.get("held activations", 0.0) == 0.0, (
                f"{case}: rank {rank} held {errors['held activations']:.0f} more activation sets than simulated")
    for case, (errors, shape) in results[0]:
        name, stages, schedule, virtual = case[:4]
        assert shape[:3] == (schedule, stages, virtual), f"{case}: planned {shape}"
        if len(case) > 6:
            assert shape[3] == case[6], f"{case}: planned {shape}"
        for what, err in errors.items():
            assert err < RTOL, f"{case} on {world} ranks: {what} differs by {err:.2e} (relative)"


@pytest.mark.parametrize("world,stages", EVERY_SCHEDULE)
def test_every_schedule_matches_single_process(world, stages):
    """The tiny BERT (embedding tied to the decoder) under each schedule, without accumulation; at 4 ranks
    two replicas of a 2-stage pipeline. GPipe alone is tested at many more shapes in test_equivalence.py."""
    _check(world, _every_schedule_cases(world, stages))


def test_every_schedule_accumulates_like_single_process():
    """Two backwards per step, summed over replicas once at the end (delay) or after each (no delay)."""
    _check(4, _accumulation_cases())


@pytest.mark.parametrize("world", [3, 4])
def test_unequal_replicas_match_single_process(world):
    """Stages with different replica counts: each splits a micro-batch's rows among its replicas, and
    values and gradients pass between the replicas of neighbouring stages by rows (delayed all-reduce for
    GPipe, immediate for the others)."""
    _check(world, _unequal_cases(world))
