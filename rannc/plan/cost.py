"""What a stage costs and what a whole training step costs, from block profiles: the one cost model that the
planner minimises, the exhaustive check compares against, and the deployment reports.

A stage is a contiguous range of blocks [i, j) run by `replicas` devices on micro-batches of `samples` rows,
holding `held` micro-batches' activations at once (the schedule says how many). Per micro-batch it spends its
*slot*: forward, backward (plus the forward again when it recomputes) and sending its outputs on. Once per
step it spends its *tail*: the part of the gradient all-reduce the last micro-batch's backward does not hide,
the gradient clipping and the optimizer step over its parameters. The step of a pipeline of S stages and M
micro-batches is predicted as

    (M + S - 1) x slowest slot + longest tail

which is GPipe's (and 1F1B's) makespan when the slots are equal and an upper bound otherwise. Memory is the
larger of the forward/backward peak (parameters, optimizer state, held activations, gradients, the in/out
buffers, the measured workspace; see `RangeTable.memory`) and the optimizer step's (parameters, gradients,
state and the step's temporaries).

`RangeTable` computes every range at once as (n+1) x (n+1) arrays (entry [i, j], infinite unless i < j), from
prefix sums, so that the planner's search is array arithmetic rather than millions of Python calls.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from rannc.profile.profiles import ProfileSet

GRAD_BUCKET_BYTES = 64 * 2**20     # the runtime's gradient all-reduce bucket (rannc/runtime/grads.py)
MIN_STAGE_FRACTION = 0.3           # a stage never costs less than this share of its blocks' profiled sum
# Bytes a training step holds beyond what profiling sees (the engine's buffers, the allocator's rounding),
# as a share of the predicted peak: measured 0.2-1.5% on one H200 (BERT-large at batch 64 and 256, the 4.9B
# model at batch 32), so that the prediction stays at or above the measured peak.
MEMORY_ALLOWANCE = 0.03


@dataclasses.dataclass(frozen=True)
class StageCost:
    fwd_ms: float                  # per micro-batch, per replica
    bwd_ms: float                  # including the recomputed forward
    send_ms: float                 # the values to the next stage
    allreduce_ms: float            # the whole gradient all-reduce of the stage's replicas
    exposed_allreduce_ms: float    # the part not hidden behind the last micro-batch's backward
    optimizer_ms: float
    clip_ms: float
    param_bytes: int
    activation_bytes: int          # one micro-batch
    memory_bytes: int
    recompute: bool
    grad_send_ms: float = 0.0      # the received values' gradients back to the previous stage

    @property
    def slot_ms(self) -> float:
        return self.fwd_ms + self.bwd_ms + self.send_ms + self.grad_send_ms

    @property
    def tail_ms(self) -> float:
        return self.exposed_allreduce_ms + self.clip_ms + self.optimizer_ms


def step_ms(slot_ms: float, tail_ms: float, stage_count: int, microbatch_count: int,
            virtual_stages: int = 1) -> float:
    """The predicted step of a pipeline whose slowest slot and longest tail are given. With v pieces per
    rank (interleaved 1F1B) a slot is a piece's, a rank runs M x v of them and the fill and drain take
    S - 1 of them: the bubble shrinks by v."""
    return (microbatch_count * virtual_stages + stage_count - 1) * slot_ms + tail_ms


def _prefix(values) -> np.ndarray:
    return np.concatenate([[0.0], np.cumsum(np.asarray(values, dtype=np.float64))])


def _span(prefix: np.ndarray) -> np.ndarray:
    """[i, j] = prefix[j] - prefix[i]: the sum over blocks i .. j-1."""
    return prefix[None, :] - prefix[:, None]


class CostModel:
    """Stage costs for one profile and one configuration; `table(replicas, samples)` is cached."""

    def __init__(self, profile: ProfileSet, opt_param_factor: float = 2.0, recompute: str = "auto",
                 schedule: str = "gpipe", count_clipping: bool = True, accumulate_grads: bool = True):
        self.profile = profile
        self.accumulate_grads = accumulate_grads
        self.recompute = recompute
        self.schedule = schedule
        self.count_clipping = count_clipping
        update = profile.update
        self.state_factor = (update.state_bytes_per_byte if update.state_bytes_per_byte is not None
                             else float(opt_param_factor))
        self.n = len(profile.blocks)
        self._tables: dict[tuple[int, int], RangeTable] = {}
        self._tensor_sums()

    def _tensor_sums(self) -> None:
        """Parameter bytes, gradient bytes and trainable tensor counts of every range, tied tensors once."""
        profile, n = self.profile, self.n
        users: dict[str, list[int]] = {}
        for k, block in enumerate(profile.blocks):
            for name in dict.fromkeys(block.tensors):
                users.setdefault(name, []).append(k)
        single = np.zeros((3, n))
        self.shared: list[tuple[float, float, float, np.ndarray]] = []
        for name, ks in users.items():
            size = float(profile.tensor_bytes.get(name, 0))
            trainable = bool(profile.trainable.get(name, False))
            row = (size, size if trainable else 0.0, 1.0 if trainable else 0.0)
            if len(ks) == 1:
                single[:, ks[0]] += row
            else:
                # a range [i, j) holds the tensor when some user k has i <= k < j: i <= the last user before j
                last_before = np.full(n + 1, -1, dtype=np.int64)
                for k in sorted(ks):
                    last_before[k + 1:] = k
                self.shared.append((*row, last_before))
        rows = np.arange(n + 1)[:, None]
        sums = [_span(_prefix(single[r])) for r in range(3)]
        for size, grad, count, last_before in self.shared:
            inside = rows <= last_before[None, :]
            sums[0] = sums[0] + size * inside
            sums[1] = sums[1] + grad * inside
            sums[2] = sums[2] + count * inside
        self.tensor_bytes, self.grad_bytes, self.grad_tensors = sums

    def table(self, replicas: int, samples: int) -> "RangeTable":
        key = (replicas, samples)
        if key not in self._tables:
            self._tables[key] = RangeTable(self, replicas, samples)
        return self._tables[key]


class RangeTable:
    """Every range's time and memory parts at one replica count and micro-batch size."""

    def __init__(self, model: CostModel, replicas: int, samples: int):
        profile, n = model.profile, model.n
        self.model, self.replicas, self.samples = model, replicas, samples
        blocks = profile.blocks
        fwd = _span(_prefix([b.fwd_ms(samples) for b in blocks]))
        bwd = _span(_prefix([b.bwd_ms(samples) for b in blocks]))
        boundaries = np.maximum(_span(_prefix(np.ones(n))) - 1.0, 0.0)    # blocks in the range minus one
        cal = profile.calibration
        self.fwd = np.maximum(fwd - boundaries * cal.fwd_overhead_ms(samples), MIN_STAGE_FRACTION * fwd)
        self.bwd = np.maximum(bwd - boundaries * cal.bwd_overhead_ms(samples), MIN_STAGE_FRACTION * bwd)
        self.act = _span(_prefix([b.activation_bytes(samples) for b in blocks]))
        out = np.array([b.out_bytes(samples) for b in blocks])
        self.in_bytes = np.concatenate([[0.0], out])[:, None]               # received by a range starting at i
        sent = np.concatenate([[0.0], out[:-1], [0.0]])                      # sent by a range ending at j < n
        self.out_bytes = sent[None, :]
        send = np.where(sent > 0, profile.p2p_latency_ms + sent / profile.p2p_bytes_per_ms, 0.0)
        self.send = np.broadcast_to(send[None, :], (n + 1, n + 1))
        # the backward sends the gradients of what the range received (as many bytes), one transfer each way
        grad_send = np.where(self.in_bytes > 0, profile.p2p_latency_ms + self.in_bytes / profile.p2p_bytes_per_ms,
                             0.0)
        self.grad_send = np.broadcast_to(grad_send, (n + 1, n + 1))
        grad = model.grad_bytes
        if replicas > 1:
            ring = 2.0 * (replicas - 1) / replicas / profile.allreduce_bytes_per_ms
            self.allreduce = np.where(grad > 0, profile.allreduce_latency_ms + ring * grad, 0.0)
            bucket = np.where(grad > 0, profile.allreduce_latency_ms + ring * np.minimum(grad, GRAD_BUCKET_BYTES),
                              0.0)
            self.exposed = np.maximum(self.allreduce - self.bwd, bucket)
        else:
            self.allreduce = self.exposed = np.zeros_like(grad)
        update = profile.update
        trains = model.grad_tensors > 0
        self.optimizer = np.where(trains, update.optimizer_ms_fixed, 0.0) + (
            update.optimizer_ms_per_tensor * model.grad_tensors + update.optimizer_ms_per_byte * grad)
        self.clip = (np.where(trains, update.clip_ms_fixed, 0.0) + update.clip_ms_per_tensor * model.grad_tensors
                     + update.clip_ms_per_byte * grad) if model.count_clipping else np.zeros_like(grad)
        self.tail = self.exposed + self.optimizer + self.clip
        self.static = model.tensor_bytes + grad * model.state_factor           # parameters and optimizer state
        self.step_memory = self.static + grad * (1.0 + update.optimizer_temp_bytes_per_byte)
        self.buffers = 2.0 * (self.in_bytes + self.out_bytes) + cal.workspace_bytes
        valid = np.triu(np.ones((n + 1, n + 1), dtype=bool), 1)
        self.invalid = ~valid
        self._choices: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def memory(self, held: int, recompute: bool) -> np.ndarray:
        """Peak bytes of every range holding `held` micro-batches. With gradients kept through the forward
        (accumulation) they add to the activations; otherwise the forward ends with `held` micro-batches'
        activations and no gradients, and each backward frees activations as gradients appear."""
        grad = self.model.grad_bytes
        if recompute:
            activations = held * self.in_bytes + self.act + grad
        elif self.model.accumulate_grads:
            activations = held * self.act + grad
        else:
            activations = (held - 1) * self.act + np.maximum(self.act, grad)
        return (1.0 + MEMORY_ALLOWANCE) * np.maximum(self.static + activations + self.buffers, self.step_memory)

    def choose(self, held: int, memory_cap: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(slot, recompute, memory) of every range holding `held` micro-batches: without recomputation where
        it fits (or the policy forbids it), else with it; slot = inf where neither fits."""
        key = (held, int(memory_cap))
        if key in self._choices:
            return self._choices[key]
        policy = self.model.recompute
        plain_memory = self.memory(held, False)
        recompute_memory = self.memory(held, True)
        plain_slot = self.fwd + self.bwd + self.send + self.grad_send
        recompute_slot = plain_slot + self.fwd
        if policy == "never":
            use = np.zeros_like(plain_slot, dtype=bool)
        elif policy == "always":
            use = np.ones_like(plain_slot, dtype=bool)
        else:
            use = plain_memory > memory_cap
        memory = np.where(use, recompute_memory, plain_memory)
        slot = np.where(use, recompute_slot, plain_slot)
        slot = np.where((memory > memory_cap) | self.invalid, math.inf, slot)
        result = (slot, use, memory)
        self._choices[key] = result
        return result

    def stage(self, i: int, j: int, held: int, memory_cap: float) -> StageCost:
        """One range's cost, as the planner sees it (memory may exceed the cap: the caller checks)."""
        _, use, memory = self.choose(held, memory_cap)
        recompute = bool(use[i, j])
        fwd, bwd = float(self.fwd[i, j]), float(self.bwd[i, j])
        return StageCost(fwd_ms=fwd, bwd_ms=bwd + (fwd if recompute else 0.0), send_ms=float(self.send[i, j]),
                         grad_send_ms=float(self.grad_send[i, j]),
                         allreduce_ms=float(self.allreduce[i, j]), exposed_allreduce_ms=float(self.exposed[i, j]),
                         optimizer_ms=float(self.optimizer[i, j]), clip_ms=float(self.clip[i, j]),
                         param_bytes=int(self.model.tensor_bytes[i, j]), activation_bytes=int(self.act[i, j]),
                         memory_bytes=int(memory[i, j]), recompute=recompute)
