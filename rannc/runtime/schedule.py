"""Pipeline schedules as data: for one stage, the ordered list of actions (forward or backward of a
micro-batch). The executor runs whatever list it is given; tests inspect the lists without running."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Action:
    kind: str          # "F" forward, "B" backward
    microbatch: int

    def __str__(self) -> str:
        return f"{self.kind}{self.microbatch}"


def gpipe_forward(microbatch_count: int) -> list[Action]:
    """Fill: every micro-batch's forward, in order (run inside the model call)."""
    return [Action("F", m) for m in range(microbatch_count)]


def gpipe_backward(microbatch_count: int) -> list[Action]:
    """Drain: every micro-batch's backward, last first (run inside loss.backward())."""
    return [Action("B", m) for m in reversed(range(microbatch_count))]


def one_f_one_b(stage: int, stage_count: int, microbatch_count: int) -> list[Action]:
    """1F1B for one stage: as many forwards as stages downstream (warm-up), then alternate one forward and
    one backward, then the remaining backwards. At most `stage_count - stage` micro-batches are in flight,
    instead of all of them as in GPipe."""
    warmup = min(stage_count - 1 - stage, microbatch_count)
    actions, forwards, backwards = [], 0, 0
    for _ in range(warmup):
        actions.append(Action("F", forwards))
        forwards += 1
    while forwards < microbatch_count:
        actions.append(Action("F", forwards))
        forwards += 1
        actions.append(Action("B", backwards))
        backwards += 1
    while backwards < microbatch_count:
        actions.append(Action("B", backwards))
        backwards += 1
    return actions


def in_flight(schedule: str, stage: int, stage_count: int, microbatch_count: int) -> int:
    """Micro-batches whose activations a stage holds at once under `schedule`."""
    if schedule == "1f1b":
        return min(microbatch_count, stage_count - stage)
    return microbatch_count
