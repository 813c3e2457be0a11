"""A failure on one rank is named on every rank: within seconds for a rank raising inside rannc (forward,
backward, the optimizer step) while staying alive, a rank that exits without a word or is killed inside a call;
within the timeout for a rank that stops calling or hangs inside a call; on pipeline and data-parallel plans,
at 2 and 3 ranks."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

import models
from distributed import run_ranks

BATCH = 12
# A failing rank that catches its error lives this long; the others must name it within REPORTED_S (they take
# ~0.05 s): from its report, not from its process ending.
OWN_ALIVE_S = 6.0
REPORTED_S = 5.0


def _train(rank, world, stages, fault, faulty, steps=4):
    """Train; on the faulty rank inject `fault` at the third call. Returns (what this rank raised, seconds from
    the start of the faulty step to the error on this rank)."""
    import rannc
    from rannc.faults import RankFailure
    from rannc.runtime import pipeline

    class FlakySGD(torch.optim.SGD):
        fail = False

        def step(self, closure=None):
            if self.fail:
                raise ValueError("injected optimizer step failure")
            return super().step(closure)

    torch.manual_seed(0)
    model = models.make("mlp")
    optimizer = FlakySGD(model.parameters(), lr=0.01)
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
            elif fault == "optimizer step":
                optimizer.fail = True
            elif fault == "hang":
                real_forward = pipeline.StageRuntime._forward_one

                def hung_forward(self, *args, real_forward=real_forward, **kwargs):
                    time.sleep(18)   # inside the call: the others time out waiting for this rank's activations
                    return real_forward(self, *args, **kwargs)
                pipeline.StageRuntime._forward_one = hung_forward
            elif fault == "kill":
                def killed_forward(self, *args, **kwargs):
                    os.kill(os.getpid(), signal.SIGKILL)
                pipeline.StageRuntime._forward_one = killed_forward
            elif fault == "exit":
                os._exit(3)
            elif fault == "stop":
                time.sleep(12)   # alive, not calling: the others must name this rank within their timeout
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
            time.sleep(OWN_ALIVE_S)   # stay alive: the others must not wait for this process to end
            return f"own: {exc}", time.monotonic() - started
    return "finished", 0.0


# (3 ranks, 2 stages): stages of one replica on ranks 0 and 1, rank 2 idle but in every collective
@pytest.mark.parametrize("world,stages,fault,faulty", [(3, 1, "backward", 2), (3, 2, "forward", 1),
                                                       (2, 2, "optimizer step", 0)])
def test_a_rank_raising_inside_rannc_is_named_on_every_rank_within_seconds(world, stages, fault, faulty):
    results = run_ranks(_train, world, stages, fault, faulty, timeout=300, env={"RANNC_COMM_TIMEOUT_S": "120"})
    assert results[faulty][0].startswith(f"own: injected {fault} failure")
    for rank, (message, seconds) in enumerate(results):
        if rank == faulty:
            continue
        assert message.startswith(f"RankFailure: rank {faulty} failed in {fault}: ValueError: injected {fault} "
                                  f"failure"), (rank, message)
        assert "second line" not in message
        assert seconds < REPORTED_S, (rank, seconds, message)


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


def test_a_rank_killed_inside_a_call_is_named_within_seconds():
    results = run_ranks(_train, 3, 1, "kill", 1, timeout=300, env={"RANNC_COMM_TIMEOUT_S": "120"}, allow_exit={1})
    for rank in (0, 2):
        message, seconds = results[rank]
        assert message.startswith("RankFailure: rank 1 never came out of call 3"), (rank, message)
        assert seconds < 10, (rank, seconds, message)


def test_a_rank_hanging_inside_a_call_is_named_within_the_timeout():
    results = run_ranks(_train, 2, 2, "hang", 0, timeout=300, env={"RANNC_COMM_TIMEOUT_S": "5"})
    message, seconds = results[1]
    assert message.startswith("RankFailure: rank 0 never came out of call 3"), message
    assert "hangs inside the call" in message
    assert 4 < seconds < 15, (seconds, message)
    assert results[0][0].startswith("RankFailure: rank 0 never came out of call 3"), results[0]


def _fail_before_barrier(rank, world):
    """Every rank wraps a model (which installs the failure reports); rank 0's script then fails before the
    barrier, as the uncaught exception's report does; the others wait in rannc.barrier(). Returns what each
    raised."""
    import rannc
    from rannc import faults

    torch.manual_seed(0)
    model = models.make("mlp")
    rannc.RaNNCModule(model, torch.optim.SGD(model.parameters(), lr=0.1), partition_num=1)
    if rank == 0:
        faults.report(FileNotFoundError("no corpus here"), "the training script")
        return "reported"
    started = time.monotonic()
    try:
        rannc.barrier()
    except Exception as exc:  # noqa: BLE001 - what the rank raised is the result
        return f"{type(exc).__name__}: {exc}", time.monotonic() - started
    return "passed the barrier", time.monotonic() - started


def test_a_rank_failing_before_a_barrier_is_named_by_the_ranks_waiting_in_it():
    """Not the waiting rank's own next error (a missing file the failed rank was to write): the failure."""
    results = run_ranks(_fail_before_barrier, 3, timeout=300, env={"RANNC_COMM_TIMEOUT_S": "120"})
    assert results[0] == "reported"
    for rank in (1, 2):
        message, seconds = results[rank]
        assert message.startswith("RankFailure: rank 0 failed in the training script: FileNotFoundError: no "
                                  "corpus here"), (rank, message)
        assert f"rank {rank} stopped in a barrier" in message, message
        assert seconds < 10, (rank, seconds)


def _barrier_passed_after_a_report(rank, world):
    """Rank 0 reports a failure but (as when NCCL's watchdog aborts the barrier) the barrier still completes on
    every rank; rank 1 must raise the failure rather than go on."""
    import rannc
    from rannc import faults

    torch.manual_seed(0)
    model = models.make("mlp")
    rannc.RaNNCModule(model, torch.optim.SGD(model.parameters(), lr=0.1), partition_num=1)
    if rank == 0:
        faults._publish("rank 0 failed in the training script: OSError: disk full")
        faults.rdist.barrier()   # the plain barrier: rank 0 only lets the other pass
        return "reported"
    try:
        rannc.barrier()
    except Exception as exc:  # noqa: BLE001 - what the rank raised is the result
        return f"{type(exc).__name__}: {exc}"
    return "passed the barrier"


def test_a_barrier_that_passes_after_a_failure_raises_it():
    results = run_ranks(_barrier_passed_after_a_report, 2, timeout=120)
    assert results[0] == "reported"
    assert results[1].startswith("RankFailure: rank 0 failed in the training script: OSError: disk full"), results[1]
    assert "rank 1 stopped in a barrier" in results[1], results[1]
