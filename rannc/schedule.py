"""Pipeline schedules as data, read by the planner and the runtime: for every stage, the ordered list of its
actions; a checker (`validate`) and a timing model (`simulate`) that read those lists without running anything.

Terms. `p` physical stages (a rank's position in the pipeline), `m` micro-batches, `v` virtual stages per
physical stage (interleaved schedules). The model is cut into p * v chunks; chunk `c` lives on physical stage
`c % p` as its virtual stage `c // p` (Megatron's looping placement), so one micro-batch visits every physical
stage v times. Kinds: F forward, B full backward, and the zero-bubble split of B into BI (gradient of the
inputs, on the critical path) and BW (gradient of the weights, free to move later). Standard library only.
"""

from __future__ import annotations

import difflib
import functools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

KINDS = ("F", "B", "BI", "BW")

_ACTION_TEXT = re.compile(r"^(BI|BW|F|B)(\d+)(?:@(\d+))?$")


@dataclass(frozen=True)
class Action:
    kind: str             # "F", "B", "BI" or "BW"
    microbatch: int
    stage: int = 0        # virtual stage on this physical stage (0 unless interleaved)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Action kind must be one of {', '.join(KINDS)} (got {self.kind!r})")
        if self.microbatch < 0 or self.stage < 0:
            raise ValueError(f"Action micro-batch and virtual stage must be >= 0 (got {self.microbatch}, {self.stage})")

    def __str__(self) -> str:
        return f"{self.kind}{self.microbatch}" + (f"@{self.stage}" if self.stage else "")


def parse(text: str) -> list[Action]:
    """The actions written as `str(Action)` does, separated by spaces or commas: "F0 F1 B0 BI1@1"."""
    actions = []
    for word in re.split(r"[\s,]+", text.strip()):
        if not word:
            continue
        match = _ACTION_TEXT.match(word)
        if match is None:
            raise ValueError(f"cannot read action {word!r}; write a kind (F, B, BI, BW), a micro-batch and "
                             f"optionally @virtual-stage, e.g. F3, B0, BI2@1")
        kind, microbatch, stage = match.groups()
        actions.append(Action(kind, int(microbatch), int(stage or 0)))
    return actions


# ---- the single-stage lists the runtime runs today ---------------------------------------------------------

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


# ---- registry ------------------------------------------------------------------------------------------------

Schedule = Callable[..., list[list[Action]]]   # (stage_count, microbatch_count, virtual_stages=1) -> per stage

_SCHEDULES: dict[str, Schedule] = {}
_VIRTUAL: set[str] = set()


def register(name: str, *, virtual_stages: bool = False) -> Callable[[Schedule], Schedule]:
    """Register a schedule under `name`; `virtual_stages=True` if it takes virtual_stages > 1. The registered
    function gets its arguments checked before it runs."""
    def decorate(build: Schedule) -> Schedule:
        if name in _SCHEDULES:
            raise ValueError(f"pipeline schedule {name!r} is registered twice")

        @functools.wraps(build)
        def checked(stage_count: int, microbatch_count: int, virtual_stages: int = 1) -> list[list[Action]]:
            if stage_count < 1 or microbatch_count < 1 or virtual_stages < 1:
                raise ValueError(f"schedule {name!r} needs stage_count, microbatch_count and virtual_stages >= 1 "
                                 f"(got {stage_count}, {microbatch_count}, {virtual_stages})")
            if virtual_stages > 1 and name not in _VIRTUAL:
                raise ValueError(f"schedule {name!r} has one virtual stage per stage (got virtual_stages="
                                 f"{virtual_stages}); use one of {', '.join(sorted(_VIRTUAL))} for more")
            return build(stage_count, microbatch_count, virtual_stages)

        _SCHEDULES[name] = checked
        if virtual_stages:
            _VIRTUAL.add(name)
        return checked
    return decorate


def get(name: str) -> Schedule:
    """The schedule registered as `name`."""
    try:
        return _SCHEDULES[name]
    except KeyError:
        close = difflib.get_close_matches(name, _SCHEDULES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown pipeline schedule {name!r} (known: {', '.join(names())}){hint}") from None


def names() -> list[str]:
    """Names of the registered schedules, in registration order."""
    return list(_SCHEDULES)


def supports_virtual_stages(name: str) -> bool:
    get(name)
    return name in _VIRTUAL


@register("gpipe")
def gpipe(stage_count: int, microbatch_count: int, virtual_stages: int = 1) -> list[list[Action]]:
    """All forwards, then all backwards last micro-batch first; every micro-batch is in flight at once."""
    return [gpipe_forward(microbatch_count) + gpipe_backward(microbatch_count) for _ in range(stage_count)]


@register("1f1b")
def one_f_one_b_all(stage_count: int, microbatch_count: int, virtual_stages: int = 1) -> list[list[Action]]:
    """PipeDream-flush: GPipe's step time, with at most `stage_count - stage` micro-batches in flight."""
    return [one_f_one_b(s, stage_count, microbatch_count) for s in range(stage_count)]


@register("interleaved_1f1b", virtual_stages=True)
def interleaved_1f1b(stage_count: int, microbatch_count: int, virtual_stages: int = 1) -> list[list[Action]]:
    """Megatron's interleaved 1F1B (Narayanan et al. SC'21 §2.2): micro-batches go in rounds of
    `stage_count` (where that does not divide m, m // stage_count rounds of at least stage_count, as torch
    does); within a round, forwards run virtual stage 0 first and backwards the last virtual stage first.
    Warm-up: 2 forwards per stage downstream plus (v - 1) rounds, so that the first backward meets no wait.
    The bubble shrinks by v for v times the p2p messages. With one virtual stage this is plain 1F1B."""
    p, m, v = stage_count, microbatch_count, virtual_stages
    if v == 1:
        return one_f_one_b_all(p, m)
    # Rounds of at least p micro-batches (m // p of them, the first ones one larger where p does not divide
    # m): a round shorter than p would let a stage's forward lead reach a forward that waits on a backward.
    rounds = max(1, m // p)
    sizes = [m // rounds + (1 if r < m % rounds else 0) for r in range(rounds)]
    forwards, backwards, start = [], [], 0
    for size in sizes:
        round_ = range(start, start + size)
        forwards += [(mb, vs) for vs in range(v) for mb in round_]
        backwards += [(mb, vs) for vs in reversed(range(v)) for mb in round_]
        start += size
    total = m * v
    result = []
    for s in range(p):
        warmup = min(2 * (p - 1 - s) + (v - 1) * sizes[0], total)
        actions = [Action("F", mb, vs) for mb, vs in forwards[:warmup]]
        for k in range(total - warmup):
            actions.append(Action("F", *forwards[warmup + k]))
            actions.append(Action("B", *backwards[k]))
        actions += [Action("B", mb, vs) for mb, vs in backwards[total - warmup:]]
        result.append(actions)
    return result


@register("zb_h1")
def zb_h1(stage_count: int, microbatch_count: int, virtual_stages: int = 1) -> list[list[Action]]:
    """ZB-H1 (Qi et al., "Zero Bubble Pipeline Parallelism", ICLR'24 §3.1): 1F1B with each backward split
    into BI and BW; stage s holds back its first s weight gradients (BW) and runs them at the end, where 1F1B
    leaves that stage idle. Same activations in flight as 1F1B; with F = BI = BW, a third of its bubble."""
    p, m = stage_count, microbatch_count
    result = []
    for s in range(p):
        actions, weights = [], 0
        for action in one_f_one_b(s, p, m):
            if action.kind == "F":
                actions.append(action)
                continue
            actions.append(Action("BI", action.microbatch))
            if action.microbatch >= s:          # the BI count so far exceeds the held-back s
                actions.append(Action("BW", weights))
                weights += 1
        actions += [Action("BW", mb) for mb in range(weights, m)]
        result.append(actions)
    return result


# ---- checks ------------------------------------------------------------------------------------------------

def validate(actions_per_stage: Sequence[Sequence[Action]], stage_count: int, microbatch_count: int,
             virtual_stages: int = 1) -> None:
    """Raise ValueError naming the first problem: a wrong number of stages, an action out of range, a
    (micro-batch, virtual stage) without exactly one F and either one B or one BI plus one BW, a backward
    before its forward or a BW before its BI on a stage, or stages that wait on each other forever."""
    if len(actions_per_stage) != stage_count:
        raise ValueError(f"schedule has {len(actions_per_stage)} stage lists for {stage_count} stages")
    for s, actions in enumerate(actions_per_stage):
        where: dict[tuple[str, int, int], int] = {}
        for i, action in enumerate(actions):
            if not isinstance(action, Action):
                raise ValueError(f"stage {s} action {i} is {action!r}, not an Action")
            if action.microbatch >= microbatch_count:
                raise ValueError(f"stage {s} runs {action} but there are {microbatch_count} micro-batches")
            if action.stage >= virtual_stages:
                raise ValueError(f"stage {s} runs {action} but there are {virtual_stages} virtual stages")
            key = (action.kind, action.microbatch, action.stage)
            if key in where:
                raise ValueError(f"stage {s} runs {action} twice (actions {where[key]} and {i})")
            where[key] = i
        for vs in range(virtual_stages):
            for mb in range(microbatch_count):
                _check_pair(s, actions, where, mb, vs)
    _walk(actions_per_stage, lambda stage, action: 0.0, 0.0, virtual_stages)


def _check_pair(s: int, actions: Sequence[Action], where: dict[tuple[str, int, int], int], mb: int, vs: int) -> None:
    """One (micro-batch, virtual stage) on stage s: one F, then one B or one BI followed by one BW."""
    def name(kind: str) -> str:
        return str(Action(kind, mb, vs))
    f, b, bi, bw = (where.get((kind, mb, vs)) for kind in KINDS)
    if f is None:
        raise ValueError(f"stage {s} never runs {name('F')}")
    if b is not None and (bi is not None or bw is not None):
        raise ValueError(f"stage {s} runs both {name('B')} and the split backward {name('BI')}/{name('BW')} of "
                         f"one micro-batch; use one or the other")
    if b is None and bi is None:
        raise ValueError(f"stage {s} never runs a backward of {name('F')} ({name('B')}, or {name('BI')} and "
                         f"{name('BW')})")
    if (bi is None) != (bw is None):
        raise ValueError(f"stage {s} runs {name('BI') if bi is not None else name('BW')} without "
                         f"{name('BW') if bi is not None else name('BI')}")
    first_backward = b if b is not None else bi
    if first_backward < f:
        raise ValueError(f"stage {s} runs {actions[first_backward]} before {name('F')}")
    if bw is not None and bw < bi:
        raise ValueError(f"stage {s} runs {name('BW')} before {name('BI')}")


def check_transfers(actions_per_stage: Sequence[Sequence[Action]], virtual_stages: int = 1) -> None:
    """Raise ValueError unless every stage receives the messages of each neighbour in the order that neighbour
    sends them, for forward values and for gradients separately. Point-to-point messages between two ranks
    are matched in issue order (NCCL has no tags), so a schedule violating this would silently hand a
    stage another micro-batch's tensor of the same shape. The runtime sends forward values and gradients on
    two process groups when a pair of ranks exchanges both in one direction (virtual stages)."""
    p = len(actions_per_stage)
    last = p * virtual_stages - 1
    if p < 2:
        if virtual_stages > 1:
            raise ValueError("virtual stages need at least 2 pipeline stages (a rank would send to itself)")
        return
    sent: dict[tuple[str, int, int], list[tuple[int, int]]] = {}
    received: dict[tuple[str, int, int], list[tuple[int, int]]] = {}
    for s, actions in enumerate(actions_per_stage):
        for action in actions:
            if action.kind == "BW":
                continue
            chunk = action.stage * p + s
            step = 1 if action.kind == "F" else -1
            direction = "forward" if action.kind == "F" else "gradient"
            if 0 <= chunk + step <= last:
                sent.setdefault((direction, s, (chunk + step) % p), []).append((action.microbatch, chunk))
            if 0 <= chunk - step <= last:
                received.setdefault((direction, (chunk - step) % p, s), []).append((action.microbatch, chunk - step))
    for key in sorted(set(sent) | set(received)):
        direction, src, dst = key
        out, into = sent.get(key, []), received.get(key, [])
        if out != into:
            first = next((k for k, (a, b) in enumerate(zip(out, into)) if a != b), min(len(out), len(into)))
            raise ValueError(f"stage {dst} receives {direction} messages from stage {src} in another order than "
                             f"they are sent (message {first}: sent {out[first:first + 1]}, received "
                             f"{into[first:first + 1]} as (micro-batch, piece))")


# ---- timing model ------------------------------------------------------------------------------------------

Costs = Callable[[int, Action], float] | Mapping


@dataclass
class SimResult:
    """One simulated step. Bubble: the share of stage time spent idle, (p x step - sum busy) / (p x step)."""

    step_ms: float                          # makespan: first action's start to last action's end
    busy_ms: list[float]                    # per stage, time spent running actions
    bubble_fraction: float
    peak_in_flight: list[int]               # per stage: most (micro-batch, virtual stage) pairs whose F has
                                            # run and whose B / BW has not (activations held)
    peak_weight_pending: list[int]          # per stage: most pairs whose BI has run and BW has not (zero bubble)
    timeline: list[tuple[int, Action, float, float]] = field(repr=False)   # (stage, action, start_ms, end_ms)

    @property
    def idle_ms(self) -> list[float]:
        return [self.step_ms - busy for busy in self.busy_ms]


def simulate(actions_per_stage: Sequence[Sequence[Action]], costs: Costs, p2p_ms: float = 0.0, *,
             virtual_stages: int | None = None) -> SimResult:
    """Time one step: each stage runs its list in order, one action at a time, each action as soon as its
    stage is free and its inputs are there. F of chunk c waits for F of chunk c - 1; B or BI of chunk c for
    B or BI of chunk c + 1 and F of c; BW for BI of c; `p2p_ms` is added where the waited-for chunk is on
    another stage (sends do not occupy either stage). `costs` gives an action's duration on a stage:
    `costs(stage, action)`, or a mapping from (stage, kind) or from kind to ms. `virtual_stages` defaults to
    the highest virtual stage in the lists plus one. Raises ValueError if the stages wait on each other
    forever."""
    if virtual_stages is None:
        virtual_stages = 1 + max((a.stage for actions in actions_per_stage for a in actions), default=0)
    duration = _duration(costs)
    timeline = _walk(actions_per_stage, duration, p2p_ms, virtual_stages)
    p = len(actions_per_stage)
    busy = [0.0] * p
    for s, _, start, end in timeline:
        busy[s] += end - start
    step = max((end for *_, end in timeline), default=0.0)
    bubble = (p * step - sum(busy)) / (p * step) if step > 0 else 0.0
    peaks = [_peaks(actions) for actions in actions_per_stage]
    return SimResult(step, busy, bubble, [held for held, _ in peaks], [pending for _, pending in peaks],
                     sorted(timeline, key=lambda row: (row[2], row[0])))


def _duration(costs: Costs) -> Callable[[int, Action], float]:
    if callable(costs):
        return costs
    if not isinstance(costs, Mapping):
        raise TypeError(f"costs must be a callable (stage, action) -> ms or a mapping; got {type(costs).__name__}")

    def lookup(stage: int, action: Action) -> float:
        if (stage, action.kind) in costs:
            return costs[stage, action.kind]
        if action.kind in costs:
            return costs[action.kind]
        raise ValueError(f"costs give no duration for {action.kind} on stage {stage}; add ({stage}, "
                         f"{action.kind!r}) or {action.kind!r}")
    return lookup


def _walk(actions_per_stage: Sequence[Sequence[Action]], duration: Callable[[int, Action], float], p2p_ms: float,
          virtual_stages: int) -> list[tuple[int, Action, float, float]]:
    """Start and end of every action (see `simulate`); raises ValueError on a deadlock."""
    p = len(actions_per_stage)
    last_chunk = p * virtual_stages - 1
    done: dict[tuple[str, int, int], float] = {}      # (F | B | W, micro-batch, chunk) -> end time
    position, free = [0] * p, [0.0] * p
    timeline: list[tuple[int, Action, float, float]] = []

    def needs(s: int, action: Action) -> tuple[tuple[str, int, int], list[tuple[tuple[str, int, int], bool]]]:
        chunk = action.stage * p + s
        mb = action.microbatch
        if action.kind == "F":
            return ("F", mb, chunk), ([(("F", mb, chunk - 1), (chunk - 1) % p != s)] if chunk > 0 else [])
        if action.kind == "BW":
            return ("W", mb, chunk), [(("B", mb, chunk), False)]
        deps = [(("F", mb, chunk), False)]
        if chunk < last_chunk:
            deps.append((("B", mb, chunk + 1), (chunk + 1) % p != s))
        return ("B", mb, chunk), deps

    # Each stage runs its list until an action waits on a product not yet made; it is tried again only when
    # that product appears (one pass over all actions, not one per round).
    waiting: dict[tuple[str, int, int], list[int]] = {}
    ready = list(range(p))
    while ready:
        s = ready.pop()
        actions = actions_per_stage[s]
        while position[s] < len(actions):
            action = actions[position[s]]
            produced, deps = needs(s, action)
            missing = next((dep for dep, _ in deps if dep not in done), None)
            if missing is not None:
                waiting.setdefault(missing, []).append(s)
                break
            start = max([free[s]] + [done[dep] + (p2p_ms if remote else 0.0) for dep, remote in deps])
            took = duration(s, action)
            if took < 0:
                raise ValueError(f"costs give a negative duration ({took}) for {action} on stage {s}")
            if produced in done:
                raise ValueError(f"stage {s} runs {action} twice")
            done[produced] = free[s] = start + took
            timeline.append((s, action, start, start + took))
            position[s] += 1
            ready.extend(waiting.pop(produced, ()))
    stuck = [f"stage {s} at {actions[position[s]]} (action {position[s]})"
             for s, actions in enumerate(actions_per_stage) if position[s] < len(actions)]
    if stuck:
        raise ValueError("schedule deadlocks: each stage waits for an action that never runs first: "
                         + "; ".join(stuck))
    return timeline


def _peaks(actions: Sequence[Action]) -> tuple[int, int]:
    """Most pairs held at once on one stage: activations (F run, B / BW not yet: the weights' gradients
    need the layers' inputs, so a split backward keeps them until its BW) and weight-gradient state (BI
    run, BW not yet). A stage runs one action at a time, so its list order is its time order."""
    held = pending = peak_held = peak_pending = 0
    for action in actions:
        if action.kind == "F":
            held += 1
            peak_held = max(peak_held, held)
        elif action.kind == "B":
            held -= 1
        elif action.kind == "BI":
            pending += 1
            peak_pending = max(peak_pending, pending)
        else:
            held -= 1
            pending -= 1
    return peak_held, peak_pending


def peak_in_flight(actions: Sequence[Action]) -> int:
    """Most (micro-batch, virtual stage) pairs whose activations one stage's list holds at once."""
    return _peaks(actions)[0]


@functools.lru_cache(maxsize=1024)
def _in_flight_per_stage(schedule: str, stage_count: int, microbatch_count: int,
                         virtual_stages: int) -> tuple[int, ...]:
    return tuple(peak_in_flight(actions) for actions in get(schedule)(stage_count, microbatch_count, virtual_stages))


def in_flight(schedule: str, stage: int, stage_count: int, microbatch_count: int, virtual_stages: int = 1) -> int:
    """Micro-batches whose activations a stage holds at once under `schedule`, read off its action list
    (GPipe: all m; 1F1B: min(m, stage_count - stage)). With virtual stages, counts (micro-batch, virtual
    stage) pairs, each holding about 1 / virtual_stages of a micro-batch's activations on that stage."""
    return _in_flight_per_stage(schedule, stage_count, microbatch_count, virtual_stages)[stage]
