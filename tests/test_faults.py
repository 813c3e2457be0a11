"""A failure on one rank is named on every rank within seconds: a rank raising inside rannc (forward, backward)
while staying alive, a rank that exits without a word, a rank that stops calling; on pipeline and
data-parallel plans, at 2 and 3 ranks."""

from __future__ import annotations

import os
import time

import pytest
import torch

import models
from distributed import run_ranks

BATCH = 12


def _train(rank, world, stages, fault, faulty, steps=4):
    """Train; on the faulty rank inject `fault` at the third call. Returns (what this rank raised, seconds from
    the start of the faulty step to the error on this rank)."""
    import rannc
    from rannc.faults import RankFailure
    from rannc.runtime import pipeline

    torch.manual_seed(0)
    model = models.make("mlp")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    wrapped = rannc.RaNNCModule(model, optimizer, partition_num=stages, profile_repeats=1)
    for step in range(steps):
        if step == 2 and rank == faulty:
            if fault == "forward":
                def broken_forward(self, *args, **kwargs):
                    raise ValueError("injected forward failure\nsecond line")
                pipeline.StageRuntime._forward_one = broken_forward
            elif fault == "backward":
                def broken_backward(self, *args, **kwargs):
                    raise ValueError("injected backward failure")
                pipeline.StageRuntime._backward_one = broken_backward
            elif fault == "exit":
                os._exit(3)
            elif fault == "stop":
                time.sleep(14)   # alive, not calling: the others must name this rank within their timeout
                return "stopped", 0.0
        started = time.monotonic()
        try:
            batch = models.global_batch("mlp", BATCH, seed=step)
            loss = wrapped(*models.local_part(batch, rank, world))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        except RankFailure as exc:
            return f"RankFailure: {exc}", time.monotonic() - started
        except ValueError as exc:
            time.sleep(12)   # stay alive past the others' deadline: they must not wait for this process to end
            return f"own: {exc}", time.monotonic() - started
    return "finished", 0.0


# (3 ranks, 2 stages): stages of one replica on ranks 0 and 1, rank 2 idle but in every collective
@pytest.mark.parametrize("world,stages,fault,faulty", [(3, 1, "backward", 2), (3, 2, "forward", 1)])
def test_a_rank_raising_inside_rannc_is_named_on_every_rank_within_seconds(world, stages, fault, faulty):
    results = run_ranks(_train, world, stages, fault, faulty, timeout=300, env={"RANNC_COMM_TIMEOUT_S": "120"})
    assert results[faulty][0].startswith(f"own: injected {fault} failure")
    for rank, (message, seconds) in enumerate(results):
        if rank == faulty:
            continue
        assert message.startswith(f"RankFailure: rank {faulty} failed in {fault}: ValueError: injected {fault} "
                                  f"failure"), (rank, message)
        assert "second line" not in message
        assert seconds < 10, (rank, seconds, message)


@pytest.mark.parametrize("world,stages", [(3, 2)])
def test_a_rank_exiting_without_a_report_is_named_within_seconds(world, stages):
    results = run_ranks(_train, world, stages, "exit", world - 1, timeout=300,
                        env={"RANNC_COMM_TIMEOUT_S": "120"}, allow_exit={world - 1})
    for rank, (message, seconds) in enumerate(results[:world - 1]):
        assert message.startswith(f"RankFailure: rank {world - 1} stopped calling the model"), (rank, message)
        assert seconds < 10, (rank, seconds, message)


def test_a_rank_that_stops_calling_is_named_within_the_timeout():
    results = run_ranks(_train, 2, 1, "stop", 1, timeout=300, env={"RANNC_COMM_TIMEOUT_S": "5"})
    message, seconds = results[0]
    assert message.startswith("RankFailure: rank 1 stopped calling the model"), message
    assert 4 < seconds < 15, (seconds, message)
