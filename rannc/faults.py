"""Fault containment: a failure on one rank becomes, on every rank and within seconds, an error that names the
failing rank and what went wrong.

The mechanism is torch.distributed's own key-value store (the rendezvous store every process already shares):

- A rank that fails inside rannc (forward, backward, clipping, planning), or whose script dies of an uncaught
  exception, writes "rank R failed in WHERE: Error: first line" under one key (the first failure wins), then
  destroys its process group, which closes its connections: a peer blocked in a collective with it fails at once
  instead of waiting for the timeout.
- A rank whose collective fails (a peer closed its connection, or the timeout passed) reads that key, waiting
  a few seconds for it, and raises `RankFailure` with its text. When no rank wrote one (a rank was killed, or
  hangs, or caught its exception and stopped calling), the per-rank call counters in the store say which
  ranks fell behind; that diagnosis is written under the key too, so every rank reports the same cause.

Under NCCL a closed connection does not wake a peer waiting inside a GPU kernel, so each rank also runs a
watchdog thread that polls the key once a second and, when another rank has failed, aborts this rank's NCCL
communicators: its blocked operation then fails and is explained as above (on 2 H200: a rank raising in
forward is named on the other within 0.6 s; `scripts/fault_drill.py`). A rank hanging under NCCL is still
ended by NCCL's own watchdog after the timeout (its flight-recorder dump names the collective that timed
out), before rannc can name the rank.

A rank that hangs is detected after `comm_timeout_s` (the process group's timeout), not within seconds: every
rank whose wait ends (by the timeout, or because a peer gave up) marks itself in the store as having left its
call, and the ranks that never do are named as the ones that hang inside it.
"""

from __future__ import annotations

import functools
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import torch.distributed as dist

from rannc import dist as rdist

FAILURE_KEY = "rannc/failure"
CALLS_KEY = "rannc/calls/{rank}"
LEFT_KEY = "rannc/left/{rank}"       # this rank's wait ended (it does not hang): where it was
WAIT_FOR_REPORT_S = 3.0
WATCHDOG_PERIOD_S = 1.0

_state: dict[str, Any] = {"store": None, "calls": 0, "hooked": False, "watchdog": None, "closing": False}


_TEARDOWN = threading.Lock()   # the watchdog's abort and this rank's own teardown, one at a time


class RankFailure(RuntimeError):
    """Another rank (or the group as a whole) failed; the message names the rank and the cause."""


def _store():
    """The default group's store, kept here so that it outlives the group (destroyed on failure)."""
    if _state["store"] is None and dist.is_initialized():
        try:
            _state["store"] = dist.distributed_c10d._get_default_store()
        except (RuntimeError, AttributeError, ValueError):
            return None
    return _state["store"]


def install() -> None:
    """After the process group exists: keep its store, and report uncaught exceptions of this process."""
    _store()
    if _state["hooked"] or rdist.get_world_size() < 2:
        return
    previous = sys.excepthook

    def report_then_print(kind, value, tb):
        if not isinstance(value, (KeyboardInterrupt, RankFailure)):
            report(value, "the training script")
        previous(kind, value, tb)

    sys.excepthook = report_then_print
    _state["hooked"] = True
    if rdist.uses_nccl():
        _state["watchdog"] = threading.Thread(target=_watch, name="rannc-fault-watchdog", daemon=True)
        _state["watchdog"].start()


def _watch() -> None:
    """NCCL only: abort this rank's communicators once another rank has reported a failure."""
    store = _store()
    while store is not None and dist.is_initialized():
        try:
            if store.check([FAILURE_KEY]) and store.get(FAILURE_KEY):
                # not while this rank tears its group down itself (two at once are a race; a failing rank under
                # NCCL once died of heap corruption after its report, before this lock: not re-run on GPUs yet)
                with _TEARDOWN:
                    if not _state["closing"]:
                        _state["closing"] = True
                        dist.distributed_c10d._abort_process_group()
                return
        except Exception:  # noqa: BLE001 - the group or store went away: nothing left to watch
            return
        time.sleep(WATCHDOG_PERIOD_S)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _publish(text: str) -> str:
    """Write `text` as the failure unless one is there already; returns the failure that stands."""
    store = _store()
    if store is None:
        return text
    try:
        return store.compare_set(FAILURE_KEY, "", text).decode()
    except Exception:  # noqa: BLE001 - the store may be gone with the group; the local text still stands
        return text


def _close_group() -> None:
    """Close this rank's connections so that peers blocked with it fail now rather than at the timeout."""
    with _TEARDOWN:
        _state["closing"] = True
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - already torn down or unusable: the peers see it closed either way
            pass


def report(exc: BaseException, where: str) -> None:
    """This rank failed: tell the others and close its connections (rannc cannot go on after this)."""
    if rdist.get_world_size() < 2 or _store() is None:
        return
    _publish(f"rank {rdist.get_rank()} failed in {where}: {first_line(exc)}")
    _close_group()


def count_call() -> None:
    """Record that this rank entered one more call (what tells a stalled rank apart)."""
    _state["calls"] += 1
    store = _store()
    if store is not None and rdist.get_world_size() > 1:
        store.set(CALLS_KEY.format(rank=rdist.get_rank()), str(_state["calls"]))


def _read_failure(wait_s: float) -> str | None:
    store = _store()
    if store is None:
        return None
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if store.check([FAILURE_KEY]):
                value = store.get(FAILURE_KEY).decode()
                if value:
                    return value
        except Exception:  # noqa: BLE001 - no store, no report
            return None
        if time.monotonic() > deadline:
            return None
        time.sleep(0.1)


def _diagnosis(world: int) -> str:
    """Why the group failed when no rank reported an error, in words: ranks that entered fewer calls than the
    others, else ranks that never left the call the others waited in."""
    calls = _calls_entered(world)
    if all(c < 0 for c in calls.values()):
        return ("the rendezvous store cannot be read, so no failure report either: the process that holds it "
                "(rank 0's, unless the launcher's agent holds it, as torchrun's does) has ended or is unreachable")
    entered = ", ".join(f"rank {r}: {c}" for r, c in calls.items())
    top = max(calls.values())
    behind = [r for r, c in calls.items() if 0 <= c < top]
    if behind:
        return (f"rank{'s' if len(behind) > 1 else ''} {_listed(behind)} stopped calling the model "
                f"(calls entered: {entered}); it hangs, exited without an error report, or caught an error and "
                f"went on alone")
    return _never_left(world, top) or (f"no rank reported an error and all entered {top} calls: a rank was "
                                       f"killed, or the ranks wait in different collectives (calls entered: "
                                       f"{entered})")


def _never_left(world: int, call: int) -> str | None:
    """The ranks still inside call `call` while the others' waits have ended. A rank waiting on another waiting
    rank (deep in a pipeline) leaves only when that one gives up, so the set is read until it stops shrinking."""
    left, deadline = _ranks_left(world), time.monotonic() + WAIT_FOR_REPORT_S
    while len(left) < world - 1 and time.monotonic() < deadline:
        time.sleep(0.5)
        now = _ranks_left(world)
        if len(now) == len(left):
            break
        left = now
    inside = [r for r in range(world) if r not in left]
    if not inside or len(inside) == world:
        return None
    waited = "; ".join(f"rank {r} in {where}" for r, where in sorted(left.items()))
    if len(inside) == 1:
        return (f"rank {inside[0]} never came out of call {call} while the others waited for it ({waited}): it "
                f"hangs inside the call (in the model's code or a kernel) or died in it")
    return (f"ranks {_listed(inside)} had not come out of call {call} while the others' waits ended ({waited}): "
            f"one of them hangs inside the call or died in it, the others may still be waiting for it")


def _calls_entered(world: int) -> dict[int, int]:
    """rank -> calls it entered (0 before its first, -1 when the store cannot be read)."""
    try:
        return {rank: int(value or 0) for rank, value in _per_rank(CALLS_KEY, world).items()}
    except Exception:  # noqa: BLE001 - unreadable: every count unknown
        return dict.fromkeys(range(world), -1)


def _ranks_left(world: int) -> dict[int, str]:
    """rank -> where its wait ended, for the ranks that marked themselves (see explain)."""
    try:
        return {rank: where for rank, where in _per_rank(LEFT_KEY, world).items() if where is not None}
    except Exception:  # noqa: BLE001 - unreadable: none known to have left
        return {}


def _per_rank(template: str, world: int) -> dict[int, str | None]:
    """Every rank's value of a per-rank store key (None where the rank never set it)."""
    store = _store()
    keys = [template.format(rank=rank) for rank in range(world)]
    return {rank: store.get(key).decode() if store.check([key]) else None for rank, key in enumerate(keys)}


def _listed(ranks: list[int]) -> str:
    return ", ".join(map(str, ranks))


def explain(exc: BaseException, where: str) -> RankFailure:
    """The error to raise on this rank after its communication failed in `where`: the failure another rank
    reported, else a diagnosis from the store. First this rank marks in the store that its wait ended (so that
    it is not taken for the rank that hangs) and closes its group (so that peers still waiting for it fail now
    and mark themselves too)."""
    world, rank = rdist.get_world_size(), rdist.get_rank()
    _mark_left(rank, where)
    _close_group()
    reported = _read_failure(WAIT_FOR_REPORT_S)
    if reported is None:
        reported = _publish(f"{_diagnosis(world)}; first seen by rank {rank} in {where}: {first_line(exc)}")
    return RankFailure(f"{reported} [rank {rank} stopped in {where}]")


def _mark_left(rank: int, where: str) -> None:
    store = _store()
    if store is not None:
        try:
            store.set(LEFT_KEY.format(rank=rank), where)
        except Exception:  # noqa: BLE001 - no store: the diagnosis will say less
            pass


def is_comm_error(exc: BaseException) -> bool:
    """Whether `exc` is a failed collective or transfer (the peer's side of someone else's failure)."""
    if isinstance(exc, (dist.DistError, RankFailure)):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        marker in text for marker in ("Connection closed by peer", "Connection reset", "Timed out", "timed out",
                                      "Read error", "Broken pipe", "NCCL", "gloo", "process group",
                                      "ProcessGroup", "Socket"))


def guarded(where: str, report_own: bool = True) -> Callable:
    """Wrap a rannc entry point: a failed collective becomes the RankFailure naming who failed; the step's own
    failure is reported to the other ranks, unless `report_own` is off (checks whose errors every rank raises
    together, so that nobody is left waiting)."""
    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except RankFailure:
                raise
            except Exception as exc:
                # not dist.is_initialized(): an aborted group (NCCL) is gone too, and still to be explained
                if rdist.get_world_size() < 2 or _store() is None:
                    raise
                if is_comm_error(exc):
                    raise explain(exc, where) from exc
                if report_own:
                    report(exc, where)
                raise
        return run
    return decorate


def barrier() -> None:
    """rannc.barrier(): every rank waits for the others. A rank that failed meanwhile (its script raised
    before reaching the barrier) is named here, as its failure, instead of this rank going on to fail on what
    the failed rank never made: under NCCL the watchdog's abort can end a barrier as if it had passed."""
    if rdist.get_world_size() < 2:
        return
    explained("a barrier")(rdist.barrier)()   # a failed collective explained as any other
    reported = _read_failure(0.0)
    if reported is not None:
        raise RankFailure(f"{reported} [rank {rdist.get_rank()} stopped in a barrier]")


def explained(where: str) -> Callable:
    """`guarded` for a step whose own errors every rank raises together."""
    return guarded(where, report_own=False)
