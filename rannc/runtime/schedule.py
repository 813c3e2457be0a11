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
